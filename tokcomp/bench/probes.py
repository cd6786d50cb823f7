"""The instruments of a benchmark: `machine_info` (what it ran on), peak-memory measurement (Linux
``VmHWM`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and the forward hooks that time the
vision tower, the prefill and every decoded token."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .breakdown import _vision_module

__all__ = ["machine_info"]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the measurements ran on: CPU model, cores, threads, memory, library versions, load."""
    import transformers

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [
                    f
                    for f in line.split(":", 1)[1].split()
                    if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                ]
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": device,
    }
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _mmap_threshold(nbytes: int) -> None:
    """glibc's threshold above which an allocation gets its own mapping (returned to the OS when freed)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)


def _proc_status(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class _Memory:
    """Peak memory growth over a span: Linux VmHWM on CPU, the CUDA allocator's peak on CUDA.

    `start` opens the span (the whole prefill); `checkpoint` (at the language model's input) closes the
    vision part and opens the LLM part, so `llm_peak` is the LLM prefill's own growth and `peak` the larger
    of both parts, each over the memory in use when the span began.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.base: int | None = None
        self.base_llm: int | None = None
        self.before_llm: int | None = None
        self.ok = self.cuda or _proc_status("VmHWM") is not None
        self.active = False

    def _reset(self) -> int | None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return int(torch.cuda.memory_allocated())
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.ok = False
        return _proc_status("VmRSS")

    def _high(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return _proc_status("VmHWM")

    def start(self) -> None:
        self.active = True
        self.base_llm = self.before_llm = None
        if not self.cuda:
            # Every tensor above 64 KiB gets its own mapping and goes back to the OS when freed, so the RSS
            # peak follows the live tensors rather than the heap's history (freed blocks of earlier layers
            # that later allocations of other sizes cannot reuse).
            _mmap_threshold(64 * 1024)
        self.base = self._reset()

    def stop(self) -> None:
        """End a measured span: back to glibc's dynamic maximum threshold (32 MiB) for timed runs."""
        if self.active and not self.cuda:
            _mmap_threshold(32 * 1024 * 1024)
            _malloc_trim()
        self.active = False

    def checkpoint(self) -> None:
        if not (self.active and self.ok) or self.base_llm is not None:
            return
        self.before_llm = self._high()
        self.base_llm = self._reset()

    def peak(self) -> int | None:
        if not self.ok or self.base is None or not self.active:
            return None
        high = max(x for x in (self._high(), self.before_llm) if x is not None)
        return max(0, high - self.base)

    def llm_peak(self) -> int | None:
        high = self._high()
        if not self.ok or self.base_llm is None or not self.active or high is None:
            return None
        return max(0, high - self.base_llm)


def _cache_bytes(cache: Any) -> tuple[int, list[int]]:
    total, lengths = 0, []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(la, "keys", None), getattr(la, "values", None)) for la in layers]
    else:  # older caches
        pairs = list(zip(getattr(cache, "key_cache", []), getattr(cache, "value_cache", [])))
    for k, v in pairs:
        for t in (k, v):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        lengths.append(int(k.shape[-2]) if isinstance(k, torch.Tensor) and k.dim() >= 2 else 0)
    return total, lengths


class _Probe:
    """Forward hooks that time the vision tower, the language model and the first forward of a generate()."""

    def __init__(self, model: torch.nn.Module, memory: _Memory, sync: bool) -> None:
        self.model = model
        self.memory = memory
        self.sync = sync
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.forwards: list[tuple[float, float]] = []
        self.vision: list[tuple[float, float]] = []
        self.llm: list[tuple[float, float]] = []
        self.cache_bytes: int | None = None
        self.cache_lengths: list[int] = []
        self.peak: int | None = None
        self.llm_peak: int | None = None
        self.token_times: list[float] = []
        self._open: dict[str, float] = {}

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def install(self) -> None:
        lm = None
        with contextlib.suppress(Exception):
            from ..runtime import find_adapter

            lm = find_adapter(self.model).language_model
        vis = _vision_module(self.model)
        for name, mod in (("forwards", self.model), ("llm", lm), ("vision", vis)):
            if mod is None:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if name == "llm" and not self.llm:
                self.memory.checkpoint()
            self._open[name] = self._now()

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            start = self._open.pop(name, None)
            if start is None:
                return
            getattr(self, name).append((start, self._now()))  # reset() replaces the lists
            if name == "llm" and len(self.llm) == 1:
                self.llm_peak = self.memory.llm_peak()
            if name == "forwards" and len(self.forwards) == 1:
                self.peak = self.memory.peak()
                cache = getattr(out, "past_key_values", None)
                if cache is not None:
                    self.cache_bytes, self.cache_lengths = _cache_bytes(cache)

        return hook

    def logits_processor(self) -> Any:
        from transformers import LogitsProcessor

        probe = self

        class _Stamp(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                probe.token_times.append(probe._now())
                return scores

        return _Stamp()

    def prefill_parts(self) -> tuple[float, float | None, float | None]:
        """(prefill, vision, llm) seconds of the first forward (vision before it counted in)."""
        if not self.forwards:
            raise RuntimeError("the model's forward never ran")
        f0, f1 = self.forwards[0]
        vis_before = sum(b - a for a, b in self.vision if b <= f0)
        vis_inside = sum(b - a for a, b in self.vision if a >= f0 and b <= f1)
        llm = [b - a for a, b in self.llm if a >= f0 and b <= f1]
        vision = vis_before + vis_inside if self.vision else None
        return (f1 - f0) + vis_before, vision, (llm[0] if llm else None)
