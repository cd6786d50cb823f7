"""LLaVA-OneVision under a tokcomp schedule: load, chat template, left padding, batched generate().

    python examples/real-checkpoints/llava_onevision.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \
        --schedule luvc --images cat.jpg chart.png --prompts "Describe the image." "What does the chart show?"

Each sample's images are passed as their own list: the processor tells one image (anyres: a base view plus
tiles) from several images (one base view each) by that nesting.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import tokcomp as tc
from tokcomp.integrations.processors import load_processor
from tokcomp.testing import make_image


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="llava-hf/llava-onevision-qwen2-0.5b-ov-hf", help="hub id or local folder"
    )
    parser.add_argument("--schedule", default="luvc", help="a preset name, a schedule JSON file, or none")
    parser.add_argument("--images", nargs="*", default=None, help="image files (default: two drawn pictures)")
    parser.add_argument("--prompts", nargs="*", default=None, help="one question per image")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    images = (
        [Image.open(p).convert("RGB") for p in args.images]
        if args.images
        else [make_image(448, 336, seed=0), make_image(336, 448, seed=1)]
    )
    prompts = args.prompts or ["Describe the image."] * len(images)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model.to(args.device).eval()
    # AutoProcessor.from_pretrained(args.model) works too where torchvision is installed; load_processor
    # also works without it (images only: the OneVision video processor needs torchvision).
    processor = load_processor(args.model)
    processor.tokenizer.padding_side = "left"  # batched generation pads on the left

    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        for prompt in prompts
    ]
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
    ]
    inputs = processor(
        text=texts, images=[[image] for image in images], padding=True, return_tensors="pt"
    ).to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    if args.schedule == "none":
        schedule = None  # the uncompressed model, with the same report
    elif args.schedule.endswith(".json"):
        schedule = tc.Schedule.from_file(args.schedule)
    else:
        schedule = tc.Schedule.preset(args.schedule)
    with tc.compress(model, schedule) as run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for prompt, answer in zip(prompts, answers):
        print(f"Q: {prompt}\nA: {answer}\n")
    print(run.report())
    return answers


if __name__ == "__main__":
    main()
