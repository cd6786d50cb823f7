"""tokcomp's built-in adapters (one module per architecture family), registered through the ``tokcomp``
entry point."""

from __future__ import annotations

from collections.abc import Callable

from tokcomp.hookspecs import hookimpl

from .qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen2VLAdapter", "tokcomp_register_adapters"]


@hookimpl
def tokcomp_register_adapters(register: Callable[[type], None]) -> None:
    """Register the built-in adapters."""
    register(Qwen2VLAdapter)
