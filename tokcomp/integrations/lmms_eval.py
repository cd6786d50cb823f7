"""An lmms-eval chat model that runs a checkpoint under a tokcomp schedule (``--model tokcomp``).

Installed with the ``lmms-eval`` extra and registered through lmms-eval's ``lmms_eval.models`` entry
point (`tokcomp.integrations.lmms_eval_manifest`); the docs page "Evaluating with lmms-eval" has the
install and launch commands.

`TokcompModel` loads the checkpoint with ``from_pretrained`` (``AutoModelForImageTextToText``; the
processor with `tokcomp.integrations.processors.load_processor`), renders each request's messages with
the processor's chat template (a plain prompt when it has none), and runs its own batched, left-padded
``generate()`` inside ``tokcomp.compress(model, schedule)``. What tokcomp measured is written into
lmms-eval's results (``results["throughput"]``, see `TokcompModel`). Under ``accelerate launch`` each
process loads one model on its own device and lmms-eval shards the requests (data parallelism).

Examples:
    ```bash
    lmms-eval eval --model tokcomp \\
        --model_args pretrained=Qwen/Qwen2-VL-2B-Instruct,schedule=luvc,dtype=bfloat16 \\
        --tasks mme --batch_size 8 --output_path results/
    ```
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from typing_extensions import Self

import tokcomp as tc
from tokcomp.flops import model_shapes
from tokcomp.integrations.processors import load_processor
from tokcomp.schedule import Schedule

try:  # the lmms-eval extra; without it the module still imports (for the API reference) but cannot run
    from accelerate import Accelerator
    from lmms_eval import utils as lmms_utils
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.models.model_utils.gen_metrics import log_metrics
    from lmms_eval.protocol import ChatMessages
except ImportError as _exc:
    _IMPORT_ERROR: ImportError | None = _exc
    _LmmsBase = object  # type: ignore[assignment,misc]
else:
    _IMPORT_ERROR = None

__all__ = ["METRIC_PREFIX", "TokcompModel", "schedule_from_arg"]

METRIC_PREFIX = "tokcomp_"
"""Prefix of tokcomp's numbers among lmms-eval's throughput metrics (``avg_tokcomp_...`` in the results)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_MAX_NEW_TOKENS = 1024


def schedule_from_arg(spec: Any) -> Schedule:
    """The schedule named by the ``schedule=`` model argument.

    Args:
        spec: ``"none"`` (or empty / None: no compression, the reference run), a registered preset name
            (``luvc``, ``fastv``, ...), a JSON schedule file (``Schedule.from_file``), or
            ``"package.module:attr"`` naming a `tokcomp.Schedule` or a function returning one.

    Returns:
        The schedule.

    Raises:
        ValueError: If the string names no preset, file or importable object.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return Schedule([])
    spec = str(spec)
    if spec in tc.registry.presets():
        return Schedule.preset(spec)
    if spec.endswith(".json") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise ValueError(f"schedule file {spec} does not exist")
        return Schedule.from_file(spec)
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        obj = obj() if callable(obj) and not isinstance(obj, Schedule) else obj
        if not isinstance(obj, Schedule):
            raise ValueError(f"schedule {spec!r} gives a {type(obj).__name__}, not a tokcomp.Schedule")
        return obj
    raise ValueError(
        f"unknown schedule {spec!r}: use none, a preset ({', '.join(sorted(tc.registry.presets()))}), "
        "a JSON schedule file, or 'module:attr'"
    )


class TokcompModel(_LmmsBase):
    """lmms-eval chat model: a ``transformers`` VLM checkpoint generating under a tokcomp schedule.

    Model arguments (``--model_args key=value,...``) are the constructor's. Requests are batched
    ``batch_size`` at a time (grouped by generation settings), left-padded, and generated in one
    ``model.generate()`` call per batch inside ``tokcomp.compress``. Stop strings (``until``) are cut from
    the decoded text.

    After each request type, tokcomp's numbers are logged through lmms-eval's metric log, which lands in
    the results JSON under ``results["throughput"]`` as ``avg_<name>`` (summed over all ranks first):

    - ``avg_tokcomp_retained_visual_fraction``: visual tokens processed over all LLM layers, relative to
      the uncompressed model (`tokcomp.Report.retained_fraction`, pooled over every sample).
    - ``avg_tokcomp_llm_flops_ratio``: LLM prefill FLOPs compressed / uncompressed
      (`tokcomp.Report.llm_flops`, the formula of `tokcomp.flops`).
    - ``avg_tokcomp_prefill_s``: mean wall time of one batch's prefill (vision tower + the first forward of
      ``generate()``), ``avg_tokcomp_prefill_s_total`` their sum, ``avg_tokcomp_batches`` how many.
    - ``avg_tokcomp_visual_tokens`` / ``avg_tokcomp_visual_tokens_uncompressed``: visual tokens entering the
      LLM per sample, summed.

    Args:
        pretrained: Checkpoint folder or hub id.
        schedule: See `schedule_from_arg`; ``none`` gives the uncompressed reference with the same
            measurements.
        device: Device for a single process (``cuda``, ``cuda:1``, ``cpu``); under ``accelerate launch``
            with several processes each uses its own (``accelerator.device``).
        dtype: ``auto`` (the checkpoint's), ``bfloat16``, ``float16`` or ``float32``.
        attn_implementation: ``sdpa`` (default) or ``eager``; LLM-side stages need one of those.
        batch_size: Requests per ``generate()`` call.
        max_new_tokens: Default when a task sets none.
        system_prompt: Text (or a file holding it) put in a system turn of every request.
        min_pixels: Qwen2-VL image processor budget (processor argument), if set.
        max_pixels: Qwen2-VL image processor budget (processor argument), if set.
        trust_remote_code: Passed to ``from_pretrained``.
        allow_untested_transformers: Passed to ``tokcomp.compress``.
        **kwargs: Unknown model arguments raise ``TypeError``; lmms-eval's ``max_batch_size`` is accepted
            and ignored.

    Raises:
        ImportError: lmms-eval (the ``lmms-eval`` extra) is not installed.
        TypeError: An unknown model argument.
        ValueError: A bad ``dtype``, ``schedule`` or ``batch_size``.
        tokcomp.UnsupportedModelError: No tokcomp adapter supports the checkpoint's model class.
        tokcomp.ScheduleError: The schedule cannot run on this model (checked at load, not mid-run).
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        schedule: Any = "none",
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS,
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        trust_remote_code: bool = False,
        allow_untested_transformers: bool = False,
        **kwargs: Any,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(
                "the tokcomp lmms-eval model needs the lmms-eval extra: "
                "pip install -e '.[lmms-eval]' && pip install --no-deps lmms-eval==0.7.3"
            ) from _IMPORT_ERROR
        super().__init__()
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise TypeError(f"unknown model_args for --model tokcomp: {', '.join(sorted(kwargs))}")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            # Data parallelism: one whole model per process, on that process's device; lmms-eval shards
            # the requests by rank. No DDP wrapper: nothing is trained, and hooks go on the plain model.
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: use auto, {', '.join(_DTYPES)}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ValueError(
                f"batch_size={batch_size!r}: the tokcomp model needs an integer batch size"
            ) from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size={batch_size!r} must be at least 1")
        self.pretrained = str(pretrained)
        self.schedule = schedule_from_arg(schedule)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.allow_untested_transformers = bool(allow_untested_transformers)

        self._model = AutoModelForImageTextToText.from_pretrained(
            self.pretrained,
            dtype=_DTYPES.get(dtype, "auto"),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self._model.to(self._device).eval()
        processor_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if min_pixels is not None:
            processor_kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            processor_kwargs["max_pixels"] = int(max_pixels)
        self.processor = load_processor(self.pretrained, **processor_kwargs)
        self.processor.tokenizer.padding_side = "left"
        # An impossible schedule or an unsupported model fails here, before any request runs.
        tc.compress(self._model, self.schedule, allow_untested_transformers=self.allow_untested_transformers)
        self._llm_shape = model_shapes(self._model.config)[0]
        self._nested_images = getattr(self._model.config, "model_type", "") == "llava_onevision"

    # -- what lmms-eval reads --------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The ``transformers`` model."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        """Requests per ``generate()`` call."""
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self._device

    # -- requests --------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not supported: raises ``NotImplementedError`` naming the reason.

        lmms-eval 0.7.3 builds ``loglikelihood`` requests (``multiple_choice`` tasks) only for simple
        models (its chat tasks accept generation output types only), and scoring a continuation under
        compression waits on tokcomp's ``labels=`` contract for compacted outputs.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "the tokcomp lmms-eval model does not support 'loglikelihood' requests (multiple_choice tasks): "
            "it is a chat model, lmms-eval 0.7.3 sends loglikelihood requests only to simple models, and "
            "scoring continuations under compression waits on tokcomp's labels= contract; evaluate "
            "generation tasks (output_type: generate_until)"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: raises ``NotImplementedError``.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "the tokcomp lmms-eval model does not support 'generate_until_multi_round' requests yet; "
            "evaluate single-round generation tasks (output_type: generate_until)"
        )

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Generates an answer for every request, ``batch_size`` at a time, under the schedule.

        Args:
            requests: lmms-eval chat requests, ``args = (context, doc_to_messages, generation_kwargs,
                doc_id, task, split)``.

        Returns:
            One ``GenerationResult`` per request, in the order given.
        """
        totals = _Totals()
        collator = lmms_utils.Collator(
            [req.args for req in requests],
            lambda args: (args[4], args[3]),  # task, doc id: a stable order within each settings group
            group_fn=lambda args: args[2],
            grouping=True,
        )
        results: list[GenerationResult] = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            results.extend(self._generate_batch(list(chunk), totals))
        self._log(totals)
        return collator.get_original(results)

    # -- one batch -------------------------------------------------------------------------------------
    def _generate_batch(self, chunk: list[tuple], totals: _Totals) -> list[GenerationResult]:
        conversations, images = [], []
        for _ctx, doc_to_messages, _gen, doc_id, task, split in chunk:
            messages = doc_to_messages(self.task_dict[task][split][doc_id])
            if self.system_prompt:
                messages = self._apply_system_prompt(messages, self.system_prompt)
            chat = ChatMessages(messages=messages)
            sample_images, videos, audios = chat.extract_media()
            if videos or audios:
                raise NotImplementedError(
                    f"task {task!r} doc {doc_id}: the tokcomp lmms-eval model takes images and text; "
                    "video and audio inputs are not supported yet"
                )
            conversations.append(chat)
            images.append([_as_image(im) for im in sample_images])
        texts = [self._prompt(chat, n) for chat, n in zip(conversations, map(len, images))]
        gen = dict(chunk[0][2])
        until = gen.pop("until", None)
        stops = [until] if isinstance(until, str) else list(until or [])
        inputs = self._encode(texts, images)
        generate_kwargs = self._generate_kwargs(gen)

        # The timer's hooks go on first, so the prefill time includes tokcomp's own work at the model input.
        with (
            _PrefillTimer(self._model, sync=self._device.type == "cuda") as timer,
            tc.compress(
                self._model, self.schedule, allow_untested_transformers=self.allow_untested_transformers
            ) as run,
        ):
            out = self._model.generate(**inputs, **generate_kwargs)
        report = run.report()
        totals.add(report, self._llm_shape, timer.seconds)

        prompt_width = inputs["input_ids"].shape[1]
        new_tokens = out[:, prompt_width:]
        answers = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        pad = self.tokenizer.pad_token_id
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        results = []
        for answer, row, n_prompt in zip(answers, new_tokens, prompt_lengths):
            n_out = int((row != pad).sum()) if pad is not None else int(row.numel())
            totals.generated += n_out
            results.append(
                GenerationResult(
                    text=_cut(answer, stops),
                    token_counts=TokenCounts(input_tokens=int(n_prompt), output_tokens=n_out),
                )
            )
        for (ctx, *_), result in zip(chunk, results):
            self.cache_hook.add_partial("generate_until", (ctx, chunk[0][2]), result.text)
        return results

    def _prompt(self, chat: ChatMessages, num_images: int) -> str:
        if self.processor.chat_template:
            return self.processor.apply_chat_template(
                chat.to_hf_messages(), add_generation_prompt=True, tokenize=False
            )
        # No chat template: the image placeholders, then the turns' text.
        text = "\n".join(
            part.text for message in chat.messages for part in message.content if part.type == "text"
        )
        return "".join([self._image_placeholder()] * num_images) + ("\n" if num_images else "") + text

    def _image_placeholder(self) -> str:
        tok = self.tokenizer
        image = getattr(self.processor, "image_token", None) or getattr(tok, "image_token", None)
        if not image:
            raise ValueError(f"cannot find the image token of {type(self.processor).__name__}")
        # Qwen2-VL marks each image run with vision start/end tokens; M-RoPE relies on them.
        start = getattr(tok, "vision_start_token", None) or ""
        end = getattr(tok, "vision_end_token", None) or ""
        return f"{start}{image}{end}"

    def _encode(self, texts: list[str], images: list[list[Image.Image]]) -> Any:
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            # LLaVA-OneVision tells one anyres image from several base tiles by the nesting per sample.
            kwargs["images"] = images if self._nested_images else [im for sample in images for im in sample]
        inputs = self.processor(**kwargs).to(self._device)
        dtype = self._model.dtype
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(dtype)
        return inputs

    def _generate_kwargs(self, gen: dict[str, Any]) -> dict[str, Any]:
        temperature = float(gen.pop("temperature", 0) or 0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(gen.pop("num_beams", 1) or 1),
            "do_sample": bool(gen.pop("do_sample", temperature > 0)),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        top_p = gen.pop("top_p", None)
        if kwargs["do_sample"]:
            kwargs["temperature"] = temperature or 1.0
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        gen.pop("image_aspect_ratio", None)  # a LLaVA-repo setting some task configs carry
        kwargs.update(gen)  # anything else is a generate() argument (repetition_penalty, ...)
        return kwargs

    def _log(self, totals: _Totals) -> None:
        totals = totals.all_reduce(self._device) if self._world_size > 1 else totals
        metrics = {
            f"{METRIC_PREFIX}retained_visual_fraction": totals.retained_fraction(),
            f"{METRIC_PREFIX}llm_flops_ratio": totals.flops_ratio(),
            f"{METRIC_PREFIX}prefill_s": totals.prefill_s / totals.batches if totals.batches else 0.0,
            f"{METRIC_PREFIX}prefill_s_total": totals.prefill_s,
            f"{METRIC_PREFIX}batches": totals.batches,
            f"{METRIC_PREFIX}visual_tokens": totals.visual_in,
            f"{METRIC_PREFIX}visual_tokens_uncompressed": totals.visual_base,
        }
        log_metrics(
            total_elapsed_time=totals.elapsed_s,
            total_gen_tokens=totals.generated,
            avg_speed=totals.generated / totals.elapsed_s if totals.elapsed_s > 0 else 0.0,
            additional_metrics=metrics,
        )


class _Totals:
    """Sums over batches (and ranks) of what tokcomp reports, so ratios are pooled, not averaged."""

    _FIELDS = (
        "visual_layers",
        "visual_layers_base",
        "flops",
        "flops_base",
        "prefill_s",
        "elapsed_s",
        "batches",
        "generated",
        "visual_in",
        "visual_base",
    )

    def __init__(self) -> None:
        for name in self._FIELDS:
            setattr(self, name, 0)

    def add(self, report: tc.Report, shape: Any, timing: tuple[float, float]) -> None:
        self.visual_layers += sum(sum(row) for row in report.visual_tokens)
        self.visual_layers_base += sum(report.baseline_visual) * report.num_layers
        self.flops += report.llm_flops(shape)
        self.flops_base += report.llm_flops(shape, baseline=True)
        self.prefill_s += timing[0]
        self.elapsed_s += timing[1]
        self.batches += 1
        self.visual_in += sum(report.original_visual)
        self.visual_base += sum(report.baseline_visual)

    def retained_fraction(self) -> float:
        return self.visual_layers / self.visual_layers_base if self.visual_layers_base else 1.0

    def flops_ratio(self) -> float:
        return self.flops / self.flops_base if self.flops_base else 1.0

    def all_reduce(self, device: torch.device) -> _Totals:
        import torch.distributed as dist

        values = torch.tensor(
            [float(getattr(self, n)) for n in self._FIELDS], dtype=torch.float64, device=device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        out = _Totals()
        for name, value in zip(self._FIELDS, values.tolist()):
            setattr(out, name, int(value) if name not in ("prefill_s", "elapsed_s") else value)
        return out


class _PrefillTimer:
    """Times the first forward of ``generate()`` (the prefill: vision tower + LLM over the prompt) and the
    whole ``generate()`` with forward hooks on the model instance, removed on exit."""

    def __init__(self, model: torch.nn.Module, *, sync: bool) -> None:
        self.model = model
        self.sync = sync
        self._spans: list[float] = []
        self._open: float | None = None
        self._handles: list[Any] = []
        self._start = 0.0
        self.seconds: tuple[float, float] = (0.0, 0.0)

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self) -> Self:
        def pre(module: torch.nn.Module, args: Any) -> None:
            if not self._spans and self._open is None:
                self._open = self._now()

        def post(module: torch.nn.Module, args: Any, out: Any) -> None:
            if self._open is not None and not self._spans:
                self._spans.append(self._now() - self._open)

        self._handles = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        total = self._now() - self._start
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.seconds = (self._spans[0] if self._spans else 0.0, total)


def _as_image(obj: Any) -> Image.Image:
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    if isinstance(obj, str):
        with Image.open(obj) as im:
            return im.convert("RGB")
    if isinstance(obj, dict) and obj.get("bytes") is not None:
        import io

        with Image.open(io.BytesIO(obj["bytes"])) as im:
            return im.convert("RGB")
    raise TypeError(f"cannot read an image from {type(obj).__name__}")


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string (lmms-eval's ``until``)."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text
