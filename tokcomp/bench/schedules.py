"""Schedules for a benchmark: `load_schedule` reads every form a user may write on the command line."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from ..errors import ScheduleError
from ..params import suggest
from ..schedule import Schedule

__all__ = ["load_schedule"]


def load_schedule(spec: Any) -> Schedule:
    """A schedule from a spec: anything `Schedule.coerce` takes (a `Schedule`, a `Stage`, a list of stages or
    stage dicts, a preset name), a JSON or YAML file (`Schedule.from_file`), or ``"package.module:attr"``
    naming a Schedule or a function returning one.

    Raises:
        ScheduleError: The spec names no preset, file or importable object, or what it names is refused
            (a `ValueError`, as before).
    """
    if not isinstance(spec, str):
        return Schedule.coerce(spec)
    from .. import registry

    if spec in registry.presets():
        return Schedule.preset(spec)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ScheduleError(f"schedule file {spec} does not exist")
        return Schedule.from_file(path)
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ScheduleError(f"schedule {spec!r}: cannot import it: {type(exc).__name__}: {exc}") from None
        if callable(obj) and not isinstance(obj, Schedule):
            obj = obj()
        return load_schedule(obj)
    raise ScheduleError(
        f"unknown schedule {spec!r}{suggest(spec, registry.presets())}: use a preset name ({', '.join(sorted(registry.presets()))}), a JSON or "
        "YAML file, or 'module:attr'"
    )


def _describe(schedule: Schedule, model: torch.nn.Module) -> dict[str, Any]:
    from ..runtime import find_adapter

    adapter = find_adapter(model)
    stages = schedule.resolve(adapter)
    out: dict[str, Any] = {"preset": getattr(schedule, "name", None), "stages": []}
    for s in stages:
        layers = list(s.layers)
        span = f"{layers[0]}..{layers[-1]}" if len(layers) > 2 else ",".join(map(str, layers))
        out["stages"].append(
            {
                "label": s.label,
                "site": s.site,
                "layers": layers,
                "params": _jsonable(s.strategy.params()),
                "text": f"{s.label}[{span}]",
            }
        )
    out["text"] = " + ".join(st["text"] for st in out["stages"]) or "(none)"
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)
