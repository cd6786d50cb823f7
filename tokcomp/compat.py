"""What tokcomp needs to know about the installed `transformers`: the tested range and renamed keywords.

The runtime hooks into `transformers` internals (decoder-layer keyword arguments, cache objects, the
prefill call `generate()` makes). Those change between releases without a deprecation that a hook
would see: 5.24 renamed the forward keyword ``past_key_values`` to ``cache``, and a hook that read the
old name took every decoding step for a new prefill. So `compress` refuses a version outside the range
the test suite ran on, instead of running and giving wrong answers.

Examples:
    ```python
    from tokcomp.compat import TESTED_TRANSFORMERS, cache_of

    print(TESTED_TRANSFORMERS)                     # e.g. ('5.17', '5.24')
    assert cache_of({"cache": None, "use_cache": True}) is None
    ```
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from packaging.version import Version

from .errors import UnsupportedVersionError

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "CACHE_KEYWORDS",
    "TESTED_TRANSFORMERS",
    "cache_of",
    "check_transformers_version",
    "without_cache",
]

TESTED_TRANSFORMERS: tuple[str, str] = ("5.17", "5.24")
"""The lowest and the highest `transformers` minor release the test suite passes on (CI runs both ends)."""

ALLOW_UNTESTED_ENV = "TOKCOMP_ALLOW_UNTESTED_TRANSFORMERS"
"""Set this environment variable to ``1`` to run on an untested `transformers` (with a warning)."""

CACHE_KEYWORDS: tuple[str, ...] = ("past_key_values", "cache", "cache_params")
"""Every keyword a forward may receive its cache under: 5.17–5.23 use the first, 5.24 the second
(linear-attention layers used the third before 5.24)."""


def cache_of(kwargs: Mapping[str, Any]) -> Any:
    """The cache a forward, a language model or a decoder layer was called with, under any of its names.

    Args:
        kwargs: The call's keyword arguments.

    Returns:
        The cache object, or ``None`` when the call has none.
    """
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``kwargs`` without any cache keyword (for replaying a call without its cache)."""
    return {k: v for k, v in kwargs.items() if k not in CACHE_KEYWORDS}


def _minor(version: str) -> Version:
    v = Version(version)
    return Version(f"{v.major}.{v.minor}")


def check_transformers_version(allow_untested: bool = False, version: str | None = None) -> None:
    """Refuse a `transformers` release outside `TESTED_TRANSFORMERS`, before any hook is installed.

    Args:
        allow_untested: Run anyway, with a warning (the environment variable `ALLOW_UNTESTED_ENV` set to
            ``1`` does the same).
        version: The version to check; the installed one when ``None`` (tests pass a fake one).

    Raises:
        UnsupportedVersionError: The version is outside the tested range and no override was given.
    """
    if version is None:
        import transformers

        version = transformers.__version__
    low, high = TESTED_TRANSFORMERS
    if _minor(low) <= _minor(version) <= _minor(high):
        return
    where = f"transformers {version} is outside the range tokcomp is tested on ({low}.x to {high}.x)"
    if allow_untested or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(f"{where}; running anyway because the untested-version override is set. Check "
                      "the results against an uncompressed run.", RuntimeWarning, stacklevel=3)
        return
    raise UnsupportedVersionError(
        f"{where}: its internals may differ and give wrong answers silently. Install a tested version "
        f"(pip install 'transformers>={low},<{Version(high).major}.{Version(high).minor + 1}'), or, at your "
        f"own risk, pass allow_untested_transformers=True to tokcomp.compress or set {ALLOW_UNTESTED_ENV}=1."
    )
