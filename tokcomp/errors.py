"""The exceptions tokcomp raises: each names what is wrong and what to change."""

from __future__ import annotations

__all__ = [
    "PluginError",
    "RuntimeStateError",
    "ScheduleError",
    "TokcompError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "UsageError",
]


class TokcompError(Exception):
    """Base class of every error tokcomp raises on purpose."""


class ScheduleError(TokcompError, ValueError):
    """A schedule cannot run on this model; raised by `tokcomp.compress` before anything runs."""


class UnsupportedModelError(TokcompError, TypeError):
    """No registered adapter recognises the model passed to `tokcomp.compress`."""


class PluginError(TokcompError, ImportError):
    """A plugin failed to load, or two plugins registered the same name."""


class RuntimeStateError(TokcompError, RuntimeError):
    """The model was called in a way the compression runtime cannot follow (e.g. a foreign KV cache)."""


class UnsupportedVersionError(TokcompError, RuntimeError):
    """The installed `transformers` is outside the range tokcomp is tested on (see `tokcomp.compat`)."""


class UsageError(TokcompError, ValueError):
    """A command-line argument is wrong (``tokcomp visualize --layers 99`` on an 8-layer model); the ``tokcomp``
    command prints the message as one line and exits with status 2."""
