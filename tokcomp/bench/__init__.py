"""Measurement: FLOPs of a run, and a benchmark of schedules against the uncompressed model.

Two parts:

* `flops_breakdown` turns a `tokcomp.Report` into FLOPs: the vision encoder with the tokens each block
  actually ran on, the LLM prefill per layer (attention and MLP separated) with the token counts the run
  had, the uncompressed baseline next to it, and the strategies' own measured overhead.
* `run_bench` runs the uncompressed model and one or more schedules on the same inputs, in one process,
  in interleaved repetitions (uncompressed, schedule 1, schedule 2, ..., uncompressed, ...), and reports
  medians and spreads of what was measured, next to what the FLOPs promise. ``tokcomp bench`` is its
  command line.

What each measured number is (every repetition is one ``generate()`` call):

* ``prefill_s``: the vision tower plus the first forward of ``generate()`` over the whole prompt (the
  prefill), timed with forward hooks; ``vision_s`` and ``llm_s`` are the vision tower and the language
  model (its decoder layers, with tokcomp's own hooks and strategies inside) alone.
* ``ttft_s``: from the ``generate()`` call to the first token's logits (everything: input preparation,
  vision, prefill).
* ``decode_tokens_per_s``: ``(N − 1)`` tokens over the time between the first and the N-th token's logits.
* ``peak_memory_bytes``: on CPU, the growth of the process's peak resident set (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs`` after ``gc.collect()`` and ``malloc_trim``) from the start of
  ``generate()`` to the end of the prefill: the activations, caches and temporaries of vision + prefill,
  not the weights. On CUDA, ``torch.cuda.max_memory_allocated`` over the same span. ``None`` where neither
  is available. ``llm_peak_memory_bytes``: the same from the language model's input to the end of the
  prefill (memory in use at that point as the base). Measured in the warm-up run only: handing freed
  memory back to the OS makes the next allocations page-fault, which would slow the timed rounds (by ~15%
  at 1k tokens on a CPU). During that run glibc's mmap threshold is lowered to 64 KiB, so that freed
  tensors leave the resident set at once and the peak follows the live tensors, not the heap's history;
  the timed runs use glibc's dynamic maximum, 32 MiB.
* ``kv_cache_bytes``: sum over layers of the key and value tensors in the ``DynamicCache`` right after the
  prefill.
* fidelity: KL divergence ``KL(p_uncompressed || p_compressed)`` of the next-token distributions at the
  first generated position (nats, mean over samples), and the fraction of the N greedy tokens equal to
  the uncompressed model's, position by position.

The package's modules, one job each: `tokcomp.bench.breakdown` (FLOPs of a report),
`tokcomp.bench.probes` (machine, memory and timing instruments), `tokcomp.bench.measure` (`run_bench`),
`tokcomp.bench.results` (the result types and their JSON), `tokcomp.bench.tables` (the table in every
output format), `tokcomp.bench.plots`, `tokcomp.bench.models` (what ``--model`` builds),
`tokcomp.bench.schedules` (`load_schedule`) and `tokcomp.bench.cli`. Every public name is importable
from `tokcomp.bench` itself.

Speed-ups are ratios of medians (uncompressed median / compressed median; for decode rates the other way
round). The FLOPs-ideal speed-ups come from `flops_breakdown`.

Examples:
    >>> import tokcomp as tc
    >>> from tokcomp import testing
    >>> from tokcomp.bench import run_bench
    >>> model = testing.tiny_model("qwen2_vl")
    >>> inputs = testing.tiny_inputs("qwen2_vl", [[testing.make_image(224, 168)]])
    >>> res = run_bench(model, inputs, {"spu": tc.Schedule.preset("spu")}, repeats=1, new_tokens=2,
    ...                 progress=False)
    >>> sorted(res.schedules)
    ['spu']
"""

from __future__ import annotations

from .breakdown import flops_breakdown
from .cli import add_arguments, cli
from .measure import run_bench
from .models import DTYPES, build_model_and_inputs
from .plots import plot_speedups
from .probes import machine_info
from .results import BenchResult, ScheduleResult, Spread
from .schedules import load_schedule
from .tables import FORMATS, render

__all__ = [
    "DTYPES",
    "FORMATS",
    "BenchResult",
    "ScheduleResult",
    "Spread",
    "add_arguments",
    "build_model_and_inputs",
    "cli",
    "flops_breakdown",
    "load_schedule",
    "machine_info",
    "plot_speedups",
    "render",
    "run_bench",
]
