"""tokcomp: training-free visual-token compression for Hugging Face vision-language models.

Examples:
    ```python
    import tokcomp as tc
    from tokcomp.strategies import SPU

    schedule = tc.Schedule([tc.Stage(SPU(), site="llm", layers=range(2, 28))])
    with tc.compress(model, schedule) as run:
        out = model.generate(**inputs, max_new_tokens=64)
    print(run.report())
    ```
"""

from __future__ import annotations

from . import presets, registry
from .contracts import (
    Adapter,
    LLMDecision,
    LLMStrategy,
    LLMView,
    Projections,
    SampleLayout,
    Strategy,
    VisualItem,
)
from .errors import (
    PluginError,
    RuntimeStateError,
    ScheduleError,
    TokcompError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .hookspecs import hookimpl
from .report import Report, StageEvent
from .runtime import CompressionRun, compress, find_adapter
from .schedule import Schedule, Stage

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "CompressionRun",
    "LLMDecision",
    "LLMStrategy",
    "LLMView",
    "PluginError",
    "Projections",
    "Report",
    "RuntimeStateError",
    "SampleLayout",
    "Schedule",
    "ScheduleError",
    "Stage",
    "StageEvent",
    "Strategy",
    "TokcompError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "VisualItem",
    "__version__",
    "compress",
    "find_adapter",
    "hookimpl",
    "presets",
    "registry",
]
