"""Integrations of tokcomp with the tools users already work in.

- `tokcomp.integrations.processors`: load a checkpoint's processor with `from_pretrained`, also on an
  install without torchvision (where the video processors of Qwen2-VL, LLaVA-OneVision and InternVL
  cannot be built).
- `tokcomp.integrations.lmms_eval`: an lmms-eval model (``--model tokcomp``), installed with the
  ``lmms-eval`` extra; see the docs page "Evaluating with lmms-eval".

Nothing here is imported by ``import tokcomp``: each module is imported on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["lmms_eval_manifest"]


def lmms_eval_manifest() -> Any:
    """The lmms-eval 0.7 registration of the ``tokcomp`` chat model (the ``lmms_eval.models`` entry point).

    lmms-eval calls this while it builds its model registry, so it only names the class; the model module
    (`tokcomp.integrations.lmms_eval`) is imported when ``--model tokcomp`` is used.

    Returns:
        A ``lmms_eval.models.registry_v2.ModelManifest`` with model id ``tokcomp`` and
        ``tokcomp.integrations.lmms_eval.TokcompModel`` as its chat class.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokcomp", chat_class_path="tokcomp.integrations.lmms_eval.TokcompModel")
