"""Load a checkpoint's processor with ``from_pretrained``, with or without torchvision.

``transformers`` 5.x has a PIL image processor for every supported architecture, but its video
processors need torchvision. Without torchvision, ``AutoProcessor.from_pretrained`` of a folder whose
processor owns a video processor (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, InternVL) fails while building
that video processor, even when only images will ever be processed. `load_processor` is the way
through: it tries ``AutoProcessor.from_pretrained`` first and, only when torchvision is missing and the
processor class has a video processor, builds the same processor class from the folder's tokenizer, its
image processor (the PIL backend), its processor settings and its chat template, without the video
processor. Video inputs then raise a clear error instead of failing deep inside the library.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from functools import cache
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils import is_torchvision_available

__all__ = ["VideoProcessorUnavailableError", "load_processor"]


class VideoProcessorUnavailableError(RuntimeError):
    """Video inputs were given to a processor loaded without its (torchvision-only) video processor."""


def load_processor(path: str | os.PathLike[str], **kwargs: Any) -> ProcessorMixin:
    """The processor of the checkpoint at ``path`` (a local folder or a hub id), for images and text.

    Wherever it works (torchvision installed, or a processor without a video processor such as
    LLaVA-1.5's ``LlavaProcessor``) this is exactly ``AutoProcessor.from_pretrained(path, **kwargs)``.
    Where that call fails in the video processor (no torchvision, or, with a warning, a checkpoint without a
    video processor config such as `tokcomp.testing.save_tiny_pretrained` writes), the processor class
    named by the folder
    (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``LlavaOnevisionProcessor``, ``InternVLProcessor``, ...)
    is built from ``AutoTokenizer`` + ``AutoImageProcessor`` (which picks the ``*ImageProcessorPil``
    class) and the folder's processor settings and chat template, with no video processor. The result is
    an instance of a small subclass of that class (``isinstance(p, Qwen2VLProcessor)`` holds) that
    processes images and text exactly as the library class does and raises
    `VideoProcessorUnavailableError` on video inputs.

    Args:
        path: Folder written by ``save_pretrained`` or a hub model id.
        **kwargs: Passed to every ``from_pretrained`` call (``revision``, ``trust_remote_code``,
            ``min_pixels``/``max_pixels`` for Qwen's image processor, ...).

    Returns:
        The processor.

    Raises:
        Exception: Whatever ``AutoProcessor.from_pretrained`` raised, when the failure is not the missing
            video processor.

    Examples:
        ```python
        from tokcomp.integrations.processors import load_processor

        processor = load_processor("Qwen/Qwen2-VL-2B-Instruct")
        processor.tokenizer.padding_side = "left"
        ```
    """
    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except Exception as exc:
        # With torchvision the only failure worked around is a checkpoint that has no video processor
        # config (as folders saved without torchvision); anything else is the library's error to report.
        if is_torchvision_available() and "video processor" not in str(exc):
            raise
        cls = None
        with contextlib.suppress(Exception):  # unreadable folder: the original error says it best
            cls = _processor_class(path, **kwargs)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        if is_torchvision_available():
            warnings.warn(
                f"{path}: no video processor could be loaded ({exc}); loading {cls.__name__} for images only",
                stacklevel=2,
            )
    return _without_video(cls, path, **kwargs)


def _image_processor(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The folder's image processor; without torchvision its ``*ImageProcessorPil`` class.

    transformers 5.18+ falls back to the PIL backend by itself. In 5.17 ``AutoImageProcessor`` is a
    placeholder that raises without torchvision, so the PIL class named by the folder's processor settings
    is loaded directly.
    """
    try:
        return AutoImageProcessor.from_pretrained(path, **kwargs)
    except ImportError:
        if is_torchvision_available():
            raise
    import transformers
    from transformers.utils import cached_file

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    name = None
    for file in ("preprocessor_config.json", "processor_config.json"):
        with contextlib.suppress(Exception):
            with open(cached_file(path, file, **hub), encoding="utf-8") as f:
                settings = json.load(f)
            settings = settings.get("image_processor", settings)
            name = settings.get("image_processor_type")
            if name:
                break
    cls = getattr(transformers, f"{name.removesuffix('Pil')}Pil", None) if name else None
    if cls is None:
        raise ImportError(
            f"{path}: no PIL image processor found for {name!r} and torchvision is not installed; "
            "install torchvision (with a matching torch build) to load this processor"
        )
    return cls.from_dict(settings, **{k: v for k, v in kwargs.items() if k not in _HUB_KWARGS})


def _processor_class(path: str | os.PathLike[str], **kwargs: Any) -> type[ProcessorMixin] | None:
    """The processor class a folder names (its processor config), else the one its model type maps to."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    name = None
    with contextlib.suppress(OSError, ValueError):  # no processor config: use the model type below
        name = ProcessorMixin.get_processor_dict(path, **hub)[0].get("processor_class")
    if name is None:
        model_type = AutoConfig.from_pretrained(path, **hub).model_type
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, ProcessorMixin) else None


# from_pretrained arguments that say where and how to fetch files; the rest are image-processor settings.
_HUB_KWARGS = frozenset(
    {"revision", "trust_remote_code", "cache_dir", "token", "local_files_only", "subfolder", "force_download"}
)


def _without_video(cls: type[ProcessorMixin], path: str | os.PathLike[str], **kwargs: Any) -> ProcessorMixin:
    sub = _video_free_subclass(cls)
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    processor_dict, init_kwargs = sub.get_processor_dict(path, **hub)
    args: list[Any] = []
    for name in sub.get_attributes():
        if name == "video_processor":
            args.append(None)
        elif name == "tokenizer":
            args.append(AutoTokenizer.from_pretrained(path, **hub))
        elif name == "image_processor":
            args.append(_image_processor(path, **kwargs))
        else:
            raise RuntimeError(
                f"{cls.__name__} needs a {name!r}, which load_processor cannot build without torchvision; "
                "install a torchvision build that matches your torch"
            )
    return sub.from_args_and_dict(args, processor_dict, **init_kwargs)


@cache
def _video_free_subclass(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    def check_argument_for_proper_class(self: ProcessorMixin, argument_name: str, argument: Any) -> Any:
        # ProcessorMixin type-checks every sub-processor; without torchvision the video-processor mapping
        # is a dummy, so even None fails. Only this subclass relaxes it, only for the video processor.
        if argument_name == "video_processor" and argument is None:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    def _process_videos(self: ProcessorMixin, *args: Any, **kw: Any) -> Any:
        raise VideoProcessorUnavailableError(
            f"this {cls.__name__} was loaded without its video processor (torchvision is not installed, or "
            "the checkpoint has no video processor config); video inputs need torchvision (a build matching "
            "your torch) and the checkpoint's video processor; images work as is"
        )

    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"{cls.__name__} without a video processor (built by tokcomp's load_processor).",
        "check_argument_for_proper_class": check_argument_for_proper_class,
    }
    if hasattr(cls, "_process_videos"):
        namespace["_process_videos"] = _process_videos
    return type(cls.__name__, (cls,), namespace)
