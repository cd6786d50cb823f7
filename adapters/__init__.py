"""tokcomp's built-in adapters (one module per architecture family), registered through the ``tokcomp``
entry point."""

from __future__ import annotations

from collections.abc import Callable

from tokcomp.hookspecs import hookimpl

from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

__all__ = [
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaOnevisionAdapter",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "tokcomp_register_adapters",
]


@hookimpl
def tokcomp_register_adapters(register: Callable[[type], None]) -> None:
    """Register the built-in adapters."""
    for cls in (Qwen2VLAdapter, Qwen3VLAdapter, LlavaOnevisionAdapter, InternVLAdapter, LlavaAdapter):
        register(cls)
