"""An example third-party tokcomp plugin.

It provides the LLM-side strategy ``keep_every_nth`` (`KeepEveryNth`) and the preset ``every-other``. Both are
registered by the hook implementations in `tokcomp_example_plugin.plugin`, which ``pyproject.toml`` announces
under the entry-point group ``tokcomp``. Once the package is installed, they are used like tokcomp's own:

    import tokcomp as tc

    schedule = tc.Schedule([tc.Stage("keep_every_nth", site="llm", layers=[2], n=3)])
    schedule = tc.Schedule.preset("every-other")
"""

from __future__ import annotations

from .strategies import KeepEveryNth

__all__ = ["KeepEveryNth", "__version__"]

__version__ = "0.1.0"
