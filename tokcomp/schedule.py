"""Schedules: which strategy runs where.

A `Stage` is one strategy at one site, at some layers; a `Schedule` is an ordered list of stages.
Nothing here touches a model: `tokcomp.compress` resolves and validates a schedule against a model's
adapter before installing anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contracts import SITES, Strategy
from .errors import ScheduleError

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

    Examples:
        >>> import tokcomp as tc
        >>> tc.Stage("fastv", site="llm", layers=[2], keep_ratio=0.5).strategy_name
        'fastv'
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
        self.layers = None if layers is None else [int(x) for x in layers]
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

    def build_strategy(self) -> Strategy:
        """The strategy instance (instantiated from the registry when given by name)."""
        if isinstance(self.strategy, Strategy):
            return self.strategy
        from . import registry

        cls = registry.get_strategy(self.strategy).obj
        try:
            return cls(**self.params)
        except TypeError as exc:
            raise ScheduleError(f"strategy {self.strategy!r}: bad parameters {self.params}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the stage."""
        strategy = self.build_strategy()
        return {
            "strategy": type(strategy).name,
            "site": self.site,
            "layers": None if self.layers is None else list(self.layers),
            "params": _jsonable(strategy.params()),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


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
        for s in stages:
            if not isinstance(s, Stage):
                raise ScheduleError(f"a Schedule holds Stage objects, got {type(s).__name__}: wrap it in tc.Stage")
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
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """A schedule from `Schedule.to_dict` output (or a hand-written file of that shape)."""
        if "preset" in data:
            return cls.preset(str(data["preset"]))
        stages = []
        for raw in data.get("stages", []):
            stages.append(Stage(raw["strategy"], site=raw.get("site", "llm"), layers=raw.get("layers"),
                                **raw.get("params", {})))
        return cls(stages)

    @classmethod
    def from_file(cls, path: str | Path) -> Schedule:
        """Load a schedule from a JSON file written by `Schedule.to_dict` (or ``{"preset": "name"}``)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

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
            strategy = stage.build_strategy()
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
            try:
                strategy.check()
            except ScheduleError as exc:
                raise ScheduleError(f"{where}: {exc}") from None
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
