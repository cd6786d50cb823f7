"""`run_bench`: the uncompressed model and each schedule on the same inputs, in interleaved repetitions
(what each number means is in the `tokcomp.bench` package docstring)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from ..report import Report
from ..schedule import Schedule
from .breakdown import flops_breakdown
from .probes import _Memory, _Probe, machine_info
from .results import BenchResult, ScheduleResult, Spread
from .schedules import _describe, load_schedule

__all__ = ["run_bench"]


@dataclass
class _Rep:
    prefill: float
    vision: float | None
    llm: float | None
    ttft: float
    decode: float | None
    peak: int | None
    llm_peak: int | None
    overhead: float
    cache_bytes: int | None
    cache_lengths: list[int]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


class _Runner:
    def __init__(
        self, model: torch.nn.Module, inputs: Mapping[str, Any], new_tokens: int, device: str
    ) -> None:
        self.model = model
        self.inputs = dict(inputs)
        self.new_tokens = new_tokens
        self.memory = _Memory(device)
        self.probe = _Probe(model, self.memory, sync=device.startswith("cuda") and torch.cuda.is_available())
        self.prompt_len = int(self.inputs["input_ids"].shape[1])

    def generate(self, schedule: Schedule | None, *, memory: bool = False) -> tuple[_Rep, Any, Report | None]:
        """One generate() call; ``memory``: measure peak memory (returns freed memory to the OS first,
        which costs page faults afterwards, so timed rounds do not)."""
        import tokcomp as tc

        probe = self.probe
        probe.reset()
        gen = {
            "max_new_tokens": self.new_tokens,
            "min_new_tokens": self.new_tokens,
            "do_sample": False,
            "return_dict_in_generate": True,
            "output_logits": True,
            "logits_processor": [probe.logits_processor()],
        }
        report = None
        overhead = 0.0
        ctx = tc.compress(self.model, schedule) if schedule is not None else contextlib.nullcontext()
        if memory:
            self.memory.start()
        with torch.no_grad(), ctx as run:
            t0 = probe._now()
            out = self.model.generate(**self.inputs, **gen)
            if run is not None:
                report = run.report()
                overhead = report.overhead_s
        prefill, vision, llm = probe.prefill_parts()
        times = probe.token_times
        decode = None
        if len(times) >= 2 and times[-1] > times[0]:
            decode = (len(times) - 1) / (times[-1] - times[0])
        rep = _Rep(
            prefill,
            vision,
            llm,
            times[0] - t0,
            decode,
            probe.peak,
            probe.llm_peak,
            overhead,
            probe.cache_bytes,
            list(probe.cache_lengths),
        )
        self.memory.stop()
        return rep, out, report


def _ratio(num: Spread | None, den: Spread | None, stat: str = "median") -> float | None:
    if num is None or den is None or getattr(den, stat) <= 0:
        return None
    return float(getattr(num, stat) / getattr(den, stat))


def _spread(vals: list[Any]) -> Spread | None:
    vals = [v for v in vals if v is not None]
    return Spread.of(vals) if vals else None


def run_bench(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    schedules: Mapping[str, Any],
    repeats: int = 3,
    new_tokens: int = 8,
    *,
    progress: bool = True,
    device: str | None = None,
    model_info: Mapping[str, Any] | None = None,
    inputs_info: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Benchmark ``schedules`` against the uncompressed model on the same inputs, in one process.

    One warm-up ``generate()`` per schedule (untimed: it also gives the token counts, the FLOPs and the
    fidelity numbers), then ``repeats`` rounds in which the uncompressed model and every schedule run in
    turn (uncompressed, schedule 1, ..., uncompressed, schedule 1, ...), so slow drifts of the machine
    hit all of them alike. Each run is one ``generate(max_new_tokens=new_tokens)``; what is measured in it
    is described in the module docstring.

    Args:
        model: A model tokcomp supports, on its device and dtype.
        inputs: Processor outputs (``input_ids``, pixels, ...) on the same device.
        schedules: Name → schedule (a `Schedule`, a list of `Stage`, or anything `load_schedule` takes).
            A schedule that fails validation is recorded with its ``error`` and skipped.
        repeats: Timed rounds (>= 1).
        new_tokens: Tokens to generate per run (>= 2 to measure decoding).
        progress: Show a progress bar (tqdm, on stderr).
        device: Where the model is (default: the device of its first parameter).
        model_info: Extra description of the model for the result (e.g. the shape and reductions).
        inputs_info: Extra description of the inputs.

    Returns:
        A `BenchResult`.
    """
    import tokcomp as tc

    if repeats < 1:
        raise UsageError("repeats must be >= 1")
    if new_tokens < 1:
        raise UsageError("new_tokens must be >= 1")
    t_start = time.perf_counter()
    dev = device or str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    machine = machine_info(dev)
    runner = _Runner(model, inputs, new_tokens, dev)
    loaded: dict[str, Schedule] = {}
    results: dict[str, ScheduleResult] = {}
    for name, spec in schedules.items():
        try:
            sched = load_schedule(spec)
            desc = _describe(sched, model)
            tc.compress(model, sched)  # validates
            loaded[name] = sched
            results[name] = ScheduleResult(name, desc)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the others still run
            results[name] = ScheduleResult(name, {"text": str(spec)}, error=f"{type(exc).__name__}: {exc}")
    baseline = ScheduleResult("uncompressed", {"preset": None, "stages": [], "text": "(none)"})
    order: list[tuple[str, Schedule | None]] = [("uncompressed", None), *loaded.items()]
    reps: dict[str, list[_Rep]] = {name: [] for name, _ in order}
    warm: dict[str, tuple[Any, Report | None]] = {}
    peaks: dict[str, tuple[int | None, int | None]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order) * (repeats + 1), desc="tokcomp bench", unit="run", leave=False)
    runner.probe.install()
    try:
        for name, sched in order:
            if bar is not None:
                bar.set_postfix_str(f"warm-up {name}")
            # the baseline's warm-up runs under an empty schedule: identical outputs, and a report
            rep, out, report = runner.generate(sched if sched is not None else Schedule([]), memory=True)
            warm[name] = (out, report)
            peaks[name] = (rep.peak, rep.llm_peak)
            if bar is not None:
                bar.update(1)
        for r in range(repeats):
            for name, sched in order:
                if bar is not None:
                    bar.set_postfix_str(f"round {r + 1}/{repeats} {name}")
                rep, _, _ = runner.generate(sched)
                reps[name].append(rep)
                if bar is not None:
                    bar.update(1)
    finally:
        runner.probe.remove()
        if bar is not None:
            bar.close()
    base_out, base_report = warm["uncompressed"]
    for name, _ in order:
        res = baseline if name == "uncompressed" else results[name]
        rs = reps[name]
        res.prefill_s = _spread([x.prefill for x in rs])
        res.vision_s = _spread([x.vision for x in rs])
        res.llm_s = _spread([x.llm for x in rs])
        res.ttft_s = _spread([x.ttft for x in rs])
        res.decode_tokens_per_s = _spread([x.decode for x in rs])
        res.peak_memory_bytes = _spread([peaks[name][0]])
        res.llm_peak_memory_bytes = _spread([peaks[name][1]])
        res.overhead_s = _spread([x.overhead for x in rs])
        res.kv_cache_bytes = int(rs[-1].cache_bytes or 0)
        res.kv_cache_lengths = rs[-1].cache_lengths
        out, report = warm[name]
        assert report is not None
        res.visual_tokens = [list(x) for x in report.visual_tokens]
        res.encoder_tokens = dict(report.encoder_tokens)
        res.retained_fraction = report.retained_fraction()
        res.flops = flops_breakdown(model, report, inputs=inputs)
        tokens = out.sequences[:, runner.prompt_len :]
        base_tokens = base_out.sequences[:, runner.prompt_len :]
        res.fidelity = {
            "kl_first_token": _kl(base_out.logits[0], out.logits[0]),
            "greedy_agreement": float((tokens == base_tokens).float().mean()),
            "tokens": tokens.tolist(),
        }
    for res in [baseline, *[results[n] for n in loaded]]:
        fl = res.flops
        res.speedup = {
            "prefill": _ratio(baseline.prefill_s, res.prefill_s),
            "llm": _ratio(baseline.llm_s, res.llm_s),
            "vision": _ratio(baseline.vision_s, res.vision_s),
            "ttft": _ratio(baseline.ttft_s, res.ttft_s),
            "decode": _ratio(res.decode_tokens_per_s, baseline.decode_tokens_per_s),
        }
        res.speedup_best = {
            "prefill": _ratio(baseline.prefill_s, res.prefill_s, "min"),
            "llm": _ratio(baseline.llm_s, res.llm_s, "min"),
            "vision": _ratio(baseline.vision_s, res.vision_s, "min"),
            "ttft": _ratio(baseline.ttft_s, res.ttft_s, "min"),
            "decode": _ratio(res.decode_tokens_per_s, baseline.decode_tokens_per_s, "max"),
        }
        ideal_vision = fl["vision"]["ideal_speedup"] if fl.get("vision") else None
        res.ideal_speedup = {
            "llm": fl["llm"]["ideal_speedup"],
            "vision": ideal_vision,
            "prefill": fl["total"]["ideal_speedup"],
        }
        res.efficiency = {
            k: (res.speedup[k] / res.ideal_speedup[k])  # type: ignore[operator]
            if res.speedup.get(k) and res.ideal_speedup.get(k)
            else None
            for k in ("llm", "prefill")
        }
        res.overhead_fraction = {
            "prefill": _ratio(res.overhead_s, res.prefill_s),
            "llm": _ratio(res.overhead_s, res.llm_s),
        }
    info = {"class": type(model).__name__, **(model_info or {})}
    info.setdefault("description", info["class"])
    inp = {
        "batch": int(inputs["input_ids"].shape[0]),
        "sequence_length": runner.prompt_len,
        "visual_tokens": list(base_report.baseline_visual) if base_report else None,
        "text_tokens": list(base_report.text_tokens) if base_report else None,
        **(inputs_info or {}),
    }
    notes = [
        (
            "prefill = vision tower + the first forward of generate() over the prompt (forward hooks); "
            "LLM = the language model alone, tokcomp's hooks included"
        ),
        "speed-ups are ratios of medians over the timed rounds; ideal = FLOPs ratio (tokcomp.flops)",
        (
            "peak memory = growth of peak RSS (VmHWM) from generate() start to the end of the prefill "
            "(warm-up run)"
            if not dev.startswith("cuda")
            else "peak memory = torch.cuda.max_memory_allocated growth"
        ),
    ]
    if not runner.memory.ok:
        notes.append("peak memory could not be measured on this platform")
    return BenchResult(
        model=info,
        inputs=inp,
        dtype=dtype,
        device=dev,
        repeats=repeats,
        new_tokens=new_tokens,
        machine=machine,
        baseline=baseline,
        schedules=results,
        wall_s=time.perf_counter() - t_start,
        notes=notes,
    )
