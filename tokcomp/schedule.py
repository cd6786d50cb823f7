"""Schedules: which strategy runs where.

A `Stage` is one strategy at one site, at some layers; a `Schedule` is an ordered list of stages.
Nothing here touches a model: `tokcomp.compress` resolves and validates a schedule against a model's
adapter before installing anything.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contracts import SITES, Strategy
from .errors import ScheduleError
from .params import check_instance, check_params, field_hints, suggest, to_file_value

if TYPE_CHECKING:
    from .contracts import Adapter

__all__ = ["ResolvedStage", "Schedule", "Stage"]


@dataclass
class Stage:
    """One strategy at one site.

    Args:
        strategy: A strategy instance, or the registered name of one (``"spu"``); with a name, ``params``
            are its parameters.
        site: ``"encoder"``, ``"projector"`` or ``"llm"``.
        layers: The layers (encoder blocks for ``encoder``, decoder layers for ``llm``) at whose input the
            strategy runs; ``None`` takes the strategy's default for the model.
        **params: Parameters for a strategy given by name.

    Raises:
        ScheduleError: ``layers`` is not an int, a range or a list of ints (a string, floats, bools), or
            parameters are given next to a strategy instance.

    Examples:
        >>> import tokcomp as tc
        >>> tc.Stage("fastv", site="llm", layers=[2], keep_ratio=0.5).strategy_name
        'fastv'
        >>> tc.Stage("spu", layers=range(2, 4)).layers
        [2, 3]
    """

    strategy: Strategy | str
    site: str = "llm"
    layers: Iterable[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        strategy: Strategy | str,
        site: str = "llm",
        layers: Iterable[int] | None = None,
        **params: Any,
    ) -> None:
        self.strategy = strategy
        self.site = site
        self.layers = _layers(layers)
        self.params = params
        if isinstance(strategy, Strategy) and params:
            raise ScheduleError(
                f"Stage got parameters {sorted(params)} next to a strategy instance; set them on the instance "
                f"({type(strategy).__name__}(...)) or pass the strategy by name"
            )
        if not isinstance(strategy, (Strategy, str)):
            raise ScheduleError(
                f"Stage needs a Strategy instance or a registered strategy name, got {type(strategy).__name__}"
            )

    @property
    def strategy_name(self) -> str:
        """The registered name of the stage's strategy."""
        return self.strategy if isinstance(self.strategy, str) else type(self.strategy).name

    def build_strategy(self, where: str | None = None) -> Strategy:
        """The strategy instance (instantiated from the registry when given by name).

        Args:
            where: How error messages name the stage (``"stage 1 (fastv at site 'llm')"``).

        Raises:
            ScheduleError: An unknown parameter (with the closest valid name) or a wrong-typed one.
        """
        if isinstance(self.strategy, Strategy):
            return self.strategy
        from . import registry

        cls = registry.get_strategy(self.strategy).obj
        where = where or f"strategy {self.strategy!r}"
        params = check_params(cls, self.params, f"{where}: bad parameters", types=False)
        try:
            return cls(**params)
        except TypeError as exc:
            raise ScheduleError(f"{where}: bad parameters {self.params}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the stage (`Schedule.from_dict` reads it back to an equal stage)."""
        strategy = self.build_strategy()
        hints = field_hints(type(strategy))
        return {
            "strategy": type(strategy).name,
            "site": self.site,
            "layers": None if self.layers is None else list(self.layers),
            "params": {k: to_file_value(v, hints.get(k, Any)) for k, v in strategy.params().items()},
        }


def _layers(layers: Any) -> list[int] | None:
    """``layers`` as a list of ints; a string, floats or bools are refused (each could hide a typo)."""
    if layers is None:
        return None
    if isinstance(layers, (bool, str, bytes, float)):
        raise ScheduleError(
            f"layers={layers!r}: write an int, a range or a list of ints (layers=[2, 3] or range(2, 28))"
        )
    if not isinstance(layers, Iterable):
        layers = [layers]
    out = []
    for x in layers:
        if isinstance(x, bool):
            raise ScheduleError(f"layers={layers!r}: {x!r} is a bool, not a layer index; write ints")
        try:
            out.append(operator.index(x))
        except TypeError:
            raise ScheduleError(
                f"layers={layers!r}: {x!r} is not an integer layer index; write an int, a range or a list "
                "of ints (layers=[2, 3] or range(2, 28))"
            ) from None
    return out


@dataclass(frozen=True)
class ResolvedStage:
    """A stage checked against a model: a strategy instance and concrete, sorted layers.

    Attributes:
        index: Position of the stage in its schedule.
        strategy: The strategy instance.
        site: The site.
        layers: Sorted, de-duplicated layer indices.
    """

    index: int
    strategy: Strategy
    site: str
    layers: tuple[int, ...]

    @property
    def label(self) -> str:
        """A short name for reports: ``"1:spu@llm"``."""
        return f"{self.index}:{type(self.strategy).name}@{self.site}"


class Schedule:
    """An ordered list of stages.

    Args:
        stages: The stages, in data-flow order (encoder, projector, then LLM layers).

    Examples:
        >>> import tokcomp as tc
        >>> from tokcomp.strategies import SPU
        >>> len(tc.Schedule([tc.Stage(SPU(), site="llm", layers=range(2, 4))]))
        1
    """

    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        stages = list(stages)
        for i, s in enumerate(stages):
            if not isinstance(s, Stage):
                raise ScheduleError(
                    f"stage {i}: a Schedule holds Stage objects, got {type(s).__name__}: wrap it in tc.Stage "
                    "(or load stage dicts with Schedule.from_dict / Schedule.coerce)"
                )
        self.stages: list[Stage] = stages
        self.name: str | None = None

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.strategy_name}@{s.site}" for s in self.stages)
        return f"Schedule([{inner}])" if self.name is None else f"Schedule.preset({self.name!r})"

    @classmethod
    def preset(cls, name: str, num_layers: int | None = None) -> Schedule:
        """A registered preset (``"luvc-document"``, ``"fastv"``, ``"vtw"``, ``"spu"``, ...).

        Args:
            name: The preset's registered name (`tokcomp.registry.presets` lists them).
            num_layers: The LLM depth the preset is built for. ``None`` defers it: the schedule is built
                for the model at `tokcomp.compress`.
        """
        from . import registry

        reg = registry.get_preset(name)
        sched = _PresetSchedule(name, reg.obj) if num_layers is None else reg.obj(num_layers)
        sched.name = name
        return sched

    def for_model(self, num_layers: int) -> Schedule:
        """The schedule for an LLM of depth ``num_layers`` (presets build themselves here)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (loadable with `Schedule.from_dict`)."""
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any) -> Schedule:
        """A schedule from `Schedule.to_dict` output, a hand-written file of that shape, or ``{"preset": name}``.

        Everything is checked here, at load: unknown keys (with the closest valid name), parameters at the
        stage level instead of under ``"params"``, ``"stages"`` beside ``"preset"``, wrong types, unknown
        strategies and parameters, and each strategy's own parameter checks. Messages name the stage index.

        Raises:
            ScheduleError: Saying which entry is wrong and what to write.

        Examples:
            >>> import tokcomp as tc
            >>> s = tc.Schedule.from_dict({"stages": [{"strategy": "fastv", "layers": [2],
            ...                                        "params": {"keep_ratio": 0.5}}]})
            >>> s.stages[0].build_strategy().keep_ratio
            0.5
            >>> tc.Schedule.from_dict({"stages": [{"strategy": "fastv", "layer": [2]}]})
            Traceback (most recent call last):
            ...
            tokcomp.errors.ScheduleError: stage 0 (fastv): unknown key 'layer' (did you mean 'layers'?); a stage takes strategy, site, layers, params
        """
        if not isinstance(data, dict):
            raise ScheduleError(
                f"a schedule is a mapping with 'stages' (a list of stages) or 'preset' (a name), got "
                f"{type(data).__name__}"
            )
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            k = unknown[0]
            raise ScheduleError(
                f"unknown top-level key {k!r}{suggest(str(k), _TOP_KEYS)}; a schedule has either 'stages' (a "
                "list of stages) or 'preset' (a registered preset name)"
            )
        if "preset" in data:
            if "stages" in data:
                raise ScheduleError(
                    "the schedule has both 'preset' and 'stages'; keep one: {\"preset\": name} or "
                    "{\"stages\": [...]}"
                )
            name = data["preset"]
            if not isinstance(name, str):
                raise ScheduleError(f"'preset' must be a preset name (a string), got {name!r}")
            return cls.preset(name)
        if "stages" not in data:
            raise ScheduleError("the schedule has no 'stages' (a list of stages) and no 'preset' (a name)")
        raw_stages = data["stages"]
        if not isinstance(raw_stages, list):
            raise ScheduleError(f"'stages' must be a list of stages, got {type(raw_stages).__name__}")
        return cls([_stage_from_dict(i, raw) for i, raw in enumerate(raw_stages)])

    @classmethod
    def from_file(cls, path: str | Path) -> Schedule:
        """Load a schedule from a JSON or YAML file (``.yaml``/``.yml``) of the `from_dict` shape.

        Raises:
            ScheduleError: The file is missing, is not valid JSON/YAML (the message gives line and column),
                or its content is refused by `from_dict` (the message starts with the file's name).
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ScheduleError(f"cannot read the schedule file {str(path)!r}: {exc.strerror or exc}") from None
        data = _parse_text(text, path)
        try:
            return cls.from_dict(data)
        except ScheduleError as exc:
            raise ScheduleError(f"{path}: {exc}") from None

    @classmethod
    def coerce(cls, schedule: Any) -> Schedule:
        """What `tokcomp.compress` accepts as a schedule, as a `Schedule`.

        Accepted: a `Schedule`; ``None`` (no stage); a `Stage`; a list or tuple of `Stage` objects and/or
        stage dicts; a schedule dict (`from_dict`); a preset name.

        Raises:
            ScheduleError: Anything else, named by its type (a bare strategy: wrap it in a `Stage`).

        Examples:
            >>> import tokcomp as tc
            >>> len(tc.Schedule.coerce(tc.Stage("fastv", layers=[2])))
            1
            >>> len(tc.Schedule.coerce([{"strategy": "spu", "layers": [2, 3]}]))
            1
        """
        if isinstance(schedule, Schedule):
            return schedule
        if schedule is None:
            return cls([])
        if isinstance(schedule, Stage):
            return cls([schedule])
        if isinstance(schedule, str):
            return cls.preset(schedule)
        if isinstance(schedule, dict):
            return cls.from_dict(schedule)
        if isinstance(schedule, Strategy):
            raise ScheduleError(
                f"got a bare strategy {type(schedule).__name__}; wrap it in a stage that says where it runs: "
                f"tc.Stage({type(schedule).__name__}(...), site={min(schedule.sites)!r}, layers=[...])"
            )
        if isinstance(schedule, (list, tuple)):
            stages = []
            for i, s in enumerate(schedule):
                if isinstance(s, Stage):
                    stages.append(s)
                elif isinstance(s, dict):
                    stages.append(_stage_from_dict(i, s))
                else:
                    raise ScheduleError(
                        f"stage {i}: a schedule list holds tc.Stage objects or stage dicts, got "
                        f"{type(s).__name__}" + (": wrap it in tc.Stage(...)" if isinstance(s, Strategy) else "")
                    )
            return cls(stages)
        raise ScheduleError(
            f"a schedule is a tc.Schedule, a tc.Stage, a list of stages, a schedule dict or a preset name; "
            f"got {type(schedule).__name__}"
        )

    def resolve(self, adapter: Adapter) -> list[ResolvedStage]:
        """Check every stage against ``adapter`` and give concrete strategies and layers.

        Raises:
            ScheduleError: With a message saying what to change.
        """
        num_layers = adapter.num_layers
        schedule = self.for_model(num_layers)
        resolved: list[ResolvedStage] = []
        for i, stage in enumerate(schedule.stages):
            where = f"stage {i} ({stage.strategy_name} at site {stage.site!r})"
            if stage.site not in SITES:
                raise ScheduleError(f"{where}: unknown site {stage.site!r}; use one of {', '.join(SITES)}")
            strategy = stage.build_strategy(where)
            check_instance(strategy, where)
            if stage.site not in strategy.sites:
                raise ScheduleError(
                    f"{where}: strategy {type(strategy).name!r} cannot run at site {stage.site!r}; it supports "
                    f"{', '.join(sorted(strategy.sites))}. Move the stage to one of those sites."
                )
            if stage.site not in adapter.sites:
                raise ScheduleError(
                    f"{where}: the {adapter.name!r} adapter does not support the {stage.site!r} site yet "
                    f"(it supports {', '.join(sorted(adapter.sites))})."
                )
            if stage.site == "projector":
                layers = [0]  # the projector runs once
            elif stage.site == "encoder":
                layers = stage.layers if stage.layers is not None else strategy.default_layers(adapter.num_vision_blocks)
            else:
                layers = stage.layers if stage.layers is not None else strategy.default_layers(num_layers)
            layers = tuple(sorted({int(x) for x in layers}))
            if not layers:
                raise ScheduleError(f"{where}: no layers given; pass layers=[...] with at least one index")
            if stage.site == "encoder":
                depth = adapter.num_vision_blocks
                bad = [x for x in layers if not 0 <= x < depth]
                if bad:
                    raise ScheduleError(
                        f"{where}: block(s) {bad} outside the vision encoder, which has {depth} blocks (valid "
                        f"indices 0..{depth - 1}; a stage runs at the input of the blocks it names)."
                    )
            if stage.site == "llm":
                bad = [x for x in layers if not 0 <= x < num_layers]
                if bad:
                    raise ScheduleError(
                        f"{where}: layer(s) {bad} outside the model's LLM, which has {num_layers} decoder "
                        f"layers (valid indices 0..{num_layers - 1})."
                    )
            r = ResolvedStage(i, strategy, stage.site, layers)
            try:
                strategy.validate(stage, adapter)
            except ScheduleError as exc:
                raise ScheduleError(f"{where}: {exc}") from None
            resolved.append(r)
        order = {"encoder": 0, "projector": 1, "llm": 2}
        sites = [order[r.site] for r in resolved]
        if sites != sorted(sites):
            raise ScheduleError(
                "stages must be listed in data-flow order: encoder stages, then projector, then llm"
            )
        return resolved


class _PresetSchedule(Schedule):
    """A preset whose stages depend on the model's depth; built at `tokcomp.compress`."""

    def __init__(self, name: str, factory: Any) -> None:
        super().__init__([])
        self.name = name
        self._factory = factory

    def for_model(self, num_layers: int) -> Schedule:
        return self._factory(num_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.name}

    def __len__(self) -> int:  # unknown until the model is known
        raise TypeError("a preset's length is known once built for a model: Schedule.preset(name, num_layers)")


_TOP_KEYS = ("stages", "preset")
_STAGE_KEYS = ("strategy", "site", "layers", "params")


def _stage_from_dict(i: int, raw: Any) -> Stage:
    """Stage ``i`` of a schedule file, checked key by key (see `Schedule.from_dict`)."""
    if not isinstance(raw, dict):
        raise ScheduleError(
            f"stage {i}: a stage is a mapping with keys {', '.join(_STAGE_KEYS)}, got {type(raw).__name__} "
            f"{raw!r}"
        )
    name = raw.get("strategy")
    if name is None:
        other = [k for k in raw if k not in _STAGE_KEYS]
        hint = f" (is {other[0]!r} meant to be 'strategy'?)" if other else ""
        raise ScheduleError(f"stage {i}: missing 'strategy' (a registered strategy name){hint}")
    if not isinstance(name, str):
        raise ScheduleError(f"stage {i}: 'strategy' must be a registered strategy name (a string), got {name!r}")
    from . import registry

    try:
        cls = registry.get_strategy(name).obj
    except ScheduleError as exc:
        raise ScheduleError(f"stage {i}: {exc}") from None
    where = f"stage {i} ({name})"
    fields = field_hints(cls)
    for key in raw:
        if key in _STAGE_KEYS:
            continue
        if key in fields:
            raise ScheduleError(
                f"{where}: {key!r} is a parameter of {name!r}; put it under 'params': "
                f"{{\"params\": {{\"{key}\": {json.dumps(raw[key])}}}}}"
            )
        raise ScheduleError(
            f"{where}: unknown key {key!r}{suggest(str(key), _STAGE_KEYS)}; a stage takes "
            f"{', '.join(_STAGE_KEYS)}"
        )
    site = raw.get("site", "llm")
    if not isinstance(site, str) or site not in SITES:
        raise ScheduleError(f"{where}: 'site' must be one of {', '.join(SITES)}, got {site!r}"
                            + (suggest(site, SITES) if isinstance(site, str) else ""))
    params = raw.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ScheduleError(f"{where}: 'params' must be a mapping of parameter names to values, got {params!r}")
    params = check_params(cls, {str(k): v for k, v in params.items()}, f"{where}", from_file=True)
    layers = raw.get("layers")
    if isinstance(layers, dict):
        raise ScheduleError(f"{where}: 'layers' must be an int or a list of ints, got {layers!r}")
    try:
        stage = Stage(name, site=site, layers=layers, **params)
    except ScheduleError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    check_instance(stage.build_strategy(where), where)
    return stage


def _parse_text(text: str, path: Path) -> Any:
    """A schedule file's content: YAML for ``.yaml``/``.yml``, JSON otherwise; errors say where."""
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ScheduleError(f"{path}: not valid YAML{at}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScheduleError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} (schedule files are "
            "JSON, or YAML with a .yaml/.yml suffix)"
        ) from None
