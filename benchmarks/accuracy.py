"""Run the default ``tokcomp eval`` on the shipped model and write ``docs/accuracy.md``.

    python benchmarks/accuracy.py --threads 1

It makes one `tokcomp.evaluate.evaluate` call (the one ``tokcomp eval --threads 1`` makes), writes the JSON
to ``benchmarks/results/accuracy.json``, the curves to ``docs/assets/accuracy*.png`` and the page from them.
Every number on the page comes from that JSON; the text around the numbers does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = ROOT / "docs" / "assets"
CURVES = ("digit", "stripes", "count", "position")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _ci(acc: dict) -> str:
    lo, hi = acc["ci95"]
    return f"{acc['accuracy']:.1%} ({lo:.0%}–{hi:.0%})"


def _row(s: dict, qtypes: list[str]) -> str:
    if s["error"]:
        return f"| `{s['name']}` | error: {s['error'][:80]} |" + " |" * (len(qtypes) + 3)
    cells = [
        f"`{s['name']}`",
        _pct(s["retained"]),
        _ci(s["overall"]),
        *(f"{s['per_type'][q]['accuracy']:.0%}" for q in qtypes),
        _pct(s["agreement"]),
        "–" if s["speedup"] is None else f"{s['speedup']:.2f}×",
    ]
    return "| " + " | ".join(cells) + " |"


def _table(rows: list[dict], qtypes: list[str]) -> list[str]:
    head = ["schedule", "kept", "all (95% CI)", *qtypes, "same answer", "prefill speed-up"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + [_row(s, qtypes) for s in rows]


# Recipes measured on the way to the shipped one: what changed, the flags that rerun it on top of today's
# TrainConfig defaults, what the training script's own check (its first 350 held-out questions, one
# forward pass each) gave, and, for the later runs, the same check on 1,400 questions (200 per type;
# None where it was not run). Each was one run of 1,400 steps on 1 thread, two runs side by side on the
# 2-core machine (10-17 min each); 350 questions put about +-5 points on each number, 1,400 about +-2.5.
CHECK_EXAMPLES = 1400
"""Held-out questions of the one-forward check next to the generate() run (200 per type)."""
_FP32 = " --bf16 false"  # every row before the shipped one trained in fp32
_OLD = " --segments 0 --pictures ''" + _FP32  # what the rows before the segment targets ran without
HISTORY: list[tuple[str, str, float, float | None]] = [
    ("the previous shipped recipe: questions one after another, auxiliary loss at the visual tokens",
     "--shared false --per-type 1 --balance 0 --balanced false --rope-theta 100 --vision-heads 4" + _OLD, 0.563, None),
    ("each question packed with its picture as if asked alone (`encode_shared`), 2 per type, rare kinds "
     + "weighted up", "--per-type 2 --balanced false --rope-theta 100 --vision-heads 4" + _OLD, 0.637, None),
    ("rotary base 10 instead of 100", "--per-type 2 --balanced false --vision-heads 4" + _OLD, 0.663, None),
    ("even yes/no and counts in the extra questions", "--per-type 2 --vision-heads 4" + _OLD, 0.663, None),
    ("auxiliary weight 2, rare kinds weighted fully", "--per-type 2 --dense 2 --balance 1 --vision-heads 4" + _OLD,
     0.600, None),
    ("3 questions per type and picture", "--vision-heads 4" + _OLD, 0.766, None),
    ("5 questions per type (a third slower a step)", "--per-type 5 --vision-heads 4" + _OLD, 0.751, None),
    ("3 per type, rare kinds weighted fully", "--balance 1 --vision-heads 4" + _OLD, 0.737, None),
    ("3 per type, a ViT of 2 heads of 32 instead of 4 of 16", _OLD.strip(), 0.803, 0.766),
    ("+ per-cell digit segments at the merger output (`vqa.segment_labels`, a training-only head)",
     "--pictures ''" + _FP32, 0.814, 0.802),
    ("segment weight 2 instead of 1", "--pictures '' --segments 2" + _FP32, 0.797, 0.795),
    ("+ pictures of count scenes twice, position, relation and exist scenes once (`training_pictures`)",
     _FP32.strip(), 0.809, 0.820),
    ("the previous shipped model: the row above, 2,100 steps on 2 threads (15.3 min)",
     "--steps 2100 --threads 2" + _FP32, 0.891, 0.883),
]


def _remains(check: dict) -> str:
    """Where the shipped model still fails, from the one-forward check's accuracy per answer."""
    exist, count = check["by_answer"]["exist"], check["by_answer"]["count"]
    return (f" What remains: the model says \"yes\" to {1 - exist['no']:.0%} of the `exist` questions whose "
            "answer is \"no\" (it reads colours more reliably than shapes, and a drawn colour on another "
            f"shape often passes), while it gets {exist['yes']:.0%} of the \"yes\" right; and it gets counts "
            f"of 3 and 4 right {count['3']:.0%} and {count['4']:.0%} of the time, against {count['0']:.0%} and "
            f"{count['1']:.0%} for 0 and 1. Both need the vision tower to tell shapes apart and objects "
            "apart, and a 2-block ViT trained for 12 CPU minutes does that only part of the time.")


def _verdict(base: dict, chance: dict, qtypes: list[str], training: dict, check: dict | None) -> list[str]:
    """What the uncompressed numbers allow, said from the numbers, and how the recipe got there."""
    acc = base["overall"]["accuracy"]
    at_chance = [q for q in qtypes if base["per_type"][q]["ci95"][0] <= chance[q]]
    above = [q for q in qtypes if q not in at_chance]
    # The verdict follows the larger sample when there is one: the generate() run's few hundred
    # questions put several points of noise on the overall figure.
    per = check["accuracy"] if check else {q: base["per_type"][q]["accuracy"] for q in qtypes}
    overall = check["accuracy"]["all"] if check else acc
    weak = sorted(qtypes, key=lambda q: per[q])[:3]
    cfg = training["config"]
    out = []
    verdict = ("**The model falls short of the 90% target**" if overall < 0.9 else "**The model meets the 90% target**")
    sample = (f"{overall:.1%} on {check['examples']:,} held-out questions (one forward pass each), {acc:.1%} on "
              f"the {base['overall']['total']} of the `generate()` run below" if check else f"{acc:.1%} overall")
    out.append(
        f"{verdict} (issue 10): {sample}; the weakest types are "
        + ", ".join(f"`{q}` ({per[q]:.0%})" for q in weak) + ". "
        "Before this recipe, the model learnt the background colour and little else (39.5% with the "
        "answer loss alone); an auxiliary loss at the visual tokens took it to 56%, and seven variants "
        "of that recipe (rotary bases, question order, curricula, learning rate, a deeper ViT) all "
        "landed between 46% and 56%. The runs since, each changing one thing (rerun one with "
        "`python -m tokcomp.train --out DIR --steps 1400 --threads 1 FLAGS`):"
    )
    out.append("\n".join([
        "| recipe | flags | held-out (350) | held-out (1,400) |",
        "|---|---|---|---|",
        *(f"| {what} | {f'`{flags}`' if flags else '(defaults)'} | {value:.1%} | "
          f"{'–' if wide is None else f'{wide:.1%}'} |" for what, flags, value, wide in HISTORY),
        ("| **shipped**: the row above"
         + (" in bf16 autocast with eager attention (a third faster a step)" if cfg.get("bf16") else "")
         + f", {cfg['steps']} steps on {cfg['threads']} threads "
         f"({training['seconds'] / 60:.1f} min) | `python -m tokcomp.train --out DIR` | "
         f"**{training['accuracy']['all']:.1%}** | "
         + (f"**{check['accuracy']['all']:.1%}** |" if check else "– |")),
    ]))
    out.append(
        "Marking each object's first visual token in the auxiliary targets, so that counting could "
        "count one token per object, gave 74.3% with `count` unchanged and was dropped. What the "
        "packing fixed is visible per type: once every question sat where it sits at inference, the "
        "answer position learnt to look in the named cell through the rotary positions (the colour "
        "of the object at a named cell went from chance to all right), and more questions per "
        "picture were the largest single gain. The per-cell segment targets were the next: the digit "
        "was mostly confused between digits that differ in one vertical segment (2/3, 5/6, 8/9), and "
        "asking each visual token which segments lie in its cell took the digit from 39% to 67% (200 "
        "questions each). Count scenes twice in the stream took counting from 57% to 70%: they are the "
        "only scenes with three or more objects of a colour, and the model answered 2 for most counts of "
        "3 and 4. Training the forward in bf16 autocast with eager attention made a step a third faster "
        "on this CPU (sdpa gains little from bf16 here), so 3,000 steps fit in 12 minutes where 2,100 "
        "took 15 in fp32; the shipped row is that run. \"Hard\" extra questions were tried and dropped (the code is gone): `exist` negatives "
        "always on a drawn colour and four in five extra counts of 0-2 left out gave 64.6% with the "
        "segment targets (the model then answered \"no\" to almost every `exist`), 72.3% with count "
        "scenes twice as well."
        + (_remains(check) if check and "by_answer" in check else "")
    )
    if at_chance:
        out.append(
            "For " + ", ".join(f"`{q}`" for q in at_chance) + " the uncompressed model is not reliably above "
            "chance (its 95% interval reaches chance), so the tables below cannot say what compression costs "
            "on those types; read the columns of " + ", ".join(f"`{q}`" for q in above) + " instead."
        )
    return [line for o in out for line in ("", o)]


def _summary(data: dict, qtypes: list[str]) -> list[str]:
    """What the tables say, computed from them: the LUVC preset against the paper's claim, and which
    strategies hold the reliable question types at a quarter of the tokens."""
    scheds = data["schedules"]
    base = scheds[0]
    chance = data["task"]["chance"]
    reliable = [q for q in qtypes if base["per_type"][q]["ci95"][0] > chance[q]]
    out = ["## What the numbers say", ""]
    luvc = next((s for s in scheds if s["name"] == "luvc" and not s["error"]), None)
    if luvc:
        drop = base["overall"]["accuracy"] - luvc["overall"]["accuracy"]
        claim = ("more than the paper's \"negligible\" loss" if drop > 0.02 else "within the paper's \"negligible\"")
        out += [(f"- **`luvc`** (OIM in the encoder, then SPU to zero visual tokens) kept {luvc['retained']:.0%} of "
                 f"the visual tokens and answered {luvc['overall']['accuracy']:.1%} against {base['overall']['accuracy']:.1%} "
                 f"uncompressed: {drop * 100:.1f} points lost, {claim} (on this small model; see the limits below).")]
    quarter = [s for s in scheds if s["kind"] == "budget" and s["budget"] == 0.25 and not s["error"]]
    if quarter and reliable:
        def score(s: dict) -> float:
            return sum(s["per_type"][q]["accuracy"] for q in reliable) / len(reliable)

        floor = next((score(s) for s in quarter if s["strategy"] == "random"), None)
        ranked = sorted(quarter, key=score, reverse=True)
        cells = ", ".join(f"`{s['strategy']}` {score(s):.0%}" for s in ranked)
        out += [(f"- At a quarter of the visual tokens, mean accuracy over the types the uncompressed model answers "
                 f"reliably ({', '.join(f'`{q}`' for q in reliable)}; uncompressed {score(base):.0%}): {cells}.")]
        if floor is not None:
            below = [f"`{s['strategy']}`" for s in ranked if score(s) < floor]
            if below:
                out += [f"- Below the `random` floor ({floor:.0%}) at that budget: {', '.join(below)}."]
    return out + [""]


def _token_table(data: dict) -> list[str]:
    """What the visual tokens' own outputs name, from ``tokcomp.train.token_accuracy``."""
    tokens = data.get("token_accuracy")
    if not tokens:
        return []
    kinds = [k for k in ("background", "colour", "shape", "cell", "stripes", "digit") if k in tokens]
    return [
        "### What the visual tokens know",
        "",
        ("Training also asks each visual token to name what is drawn under it: an object's colour and shape, "
        "the digit, the stripe orientation or the background, and which of the five named cells it lies "
        "in (`tokcomp.vqa.token_labels`, the words of the task). A pretrained VLM learns such local "
        "features from captions and grounding data; this model gets them from this loss. How often the "
        f"shipped model's visual tokens name each kind right, on {data['token_accuracy_pictures']} held-out "
        "pictures (`tokcomp.train.token_accuracy`):"),
        "",
        "| " + " | ".join(kinds) + " |",
        "|" + "---|" * len(kinds),
        "| " + " | ".join(f"{tokens[k]:.0%}" for k in kinds) + " |",
        "",
        ("Where a kind is named well here but its question type is answered badly above, the detail is in "
        "the visual tokens and the answer position does not read it: what a compression strategy keeps "
        "or drops then shows less in that type's column."),
        "",
    ]


def page(data: dict, training: dict, command: str, date: str, commit: str, params: int) -> str:
    """The Markdown of docs/accuracy.md from the eval JSON and the checkpoint's training.json."""
    qtypes = data["task"]["qtypes"]
    scheds = data["schedules"]
    base = scheds[0]
    presets = [s for s in scheds if s["kind"] == "preset"]
    budget = [s for s in scheds if s["kind"] == "budget"]
    n = data["task"]["examples"]
    m = data["machine"]
    cfg = training["config"]
    tr_acc = training["accuracy"]
    chance = data["task"]["chance"]
    check = data.get("forward_check")
    lines = [
        "# Accuracy under compression",
        "",
        "<!-- generated by benchmarks/accuracy.py; edit that script, not this page -->",
        "",
        ("What does a schedule cost in answers? tokcomp ships a small Qwen2-VL trained on a synthetic visual "
        "question-answering task (`tokcomp.vqa`) so that this can be measured on a CPU in minutes. "
        "`tokcomp eval` answers held-out questions uncompressed and under every schedule, through "
        "`generate()` in left-padded batches, and reports the accuracy per question type with 95% Wilson "
        "intervals, the visual tokens each schedule really kept, and the measured prefill speed-up."),
        "",
        (f"Generated by `{command}` (finished {date}, tokcomp at commit {commit}); the whole run took "
        f"**{data['wall_s'] / 60:.1f} min** on {m['logical_cpus']} logical CPUs ({m['cpu']}), "
        f"{m['torch_threads']} torch thread(s), load average {m['load_average'][0]:.1f} at the start and "
        f"{m.get('load_average_end', [float('nan')])[0]:.1f} at the end (the machine is shared with other work). "
        f"The JSON is `benchmarks/results/accuracy.json`. The same numbers, in a terminal:"),
        "",
        "```bash",
        "tokcomp eval --threads 1 --out eval-out/    # table + eval-out/eval.json + eval-out/eval.png",
        "```",
        "",
        "## The model and the task",
        "",
        (f"- **Model**: `Qwen2VLForConditionalGeneration` (the real `transformers` class) with a "
        f"{cfg['vision_depth']}-block ViT of width {cfg['vision_width']} ({cfg['vision_heads']} heads, patch 14, 2x2 merge) and a "
        f"{cfg['layers']}-layer LLM of width {cfg['hidden']} ({cfg['heads']} heads, {cfg['kv_heads']} "
        f"key/value heads), trained from scratch by `python -m tokcomp.train --out DIR` "
        f"with the answer loss plus an auxiliary loss at the visual tokens (weight {cfg.get('dense', 0)}; "
        "see *What the visual tokens know*); "
        + (f"each picture is asked up to {cfg['per_type']} questions of every type, packed in one row so that "
           "each is computed as if asked alone (`tokcomp.train.encode_shared`); rotary base "
           f"{cfg['rope_theta']:g}; " if cfg.get("shared") else "")
        + (f"a training-only head on the merger output learns which digit segments lie in each visual "
           f"token's cell (`tokcomp.vqa.segment_labels`, weight {cfg['segments']:g}); " if cfg.get("segments") else "")
        + (f"the pictures are the training split's scenes of the types `{cfg['pictures']}`, in that "
           "pattern (`tokcomp.train.training_pictures`); " if cfg.get("pictures") else "")
        + ("the forward in bf16 autocast with eager attention (weights, optimiser and checkpoint fp32, the "
           "checkpoint saved with `sdpa`); " if cfg.get("bf16") else "")
        + f"{cfg['steps']} steps of {cfg['batch']} pictures, {training['seconds'] / 60:.1f} min of training "
        f"on this machine with {cfg['threads']} thread(s). The checkpoint is in the package: "
        "`tokcomp.testing.trained_model()`."),
        (f"- **Task**: 336x336 pictures, so **{data['visual_tokens']} visual tokens** per picture enter the "
        "LLM; seven question types, one-word answers (see `tokcomp.vqa` for the drawing rules); "
        f"{n} held-out questions (`split=\"test\"`, seed {data['task']['seed']}), {n // len(qtypes)} per type."),
        ("- **kept**: visual tokens over all LLM layers and samples relative to no compression "
        "(`Report.retained_fraction`, encoder-side reductions included), as measured in the run."),
        "- **same answer**: share of questions answered as the uncompressed model answers them.",
        ("- **prefill speed-up**: time to the first generated token, uncompressed over compressed, summed "
        "over the batches; the uncompressed model runs in the same process, interleaved with the schedules. "
        "On a model this small, fixed per-call costs (the vision tower, Python hooks) are a large share, so "
        "speed-ups are far below the token ratio; the [benchmarks](benchmarks.md) measure speed at real sizes."),
        "",
        "| question type | chance | uncompressed |",
        "|---|---|---|",
        *(f"| `{q}` | {chance[q]:.0%} | {_ci(base['per_type'][q])} |" for q in qtypes),
        f"| **all** | | **{_ci(base['overall'])}** |",
        "",
        *_verdict(base, chance, qtypes, training, data.get("forward_check")),
        "",
        (f"(The training script's own check on its first {training['eval_examples']} held-out questions, one "
        f"forward pass each, gave {tr_acc['all']:.1%}.)"
         + (f" On {check['examples']:,} held-out questions ({check['examples'] // len(qtypes)} per type, one forward "
            f"pass each, `tokcomp.train.predict`), a tighter figure than the {n} above: "
            f"**{check['accuracy']['all']:.1%}**; "
            + ", ".join(f"`{q}` {check['accuracy'][q]:.0%}" for q in qtypes) + "." if check else "")),
        "",
        *_token_table(data),
        *_summary(data, qtypes),
        "## Presets",
        "",
        *_table([base, *presets], qtypes),
        "",
        (f"Each preset at its own settings on this {data['num_layers']}-layer model (a preset is a function of the LLM depth; "
        "`tokcomp list` describes them)."),
        "",
        "## Every strategy at equal budgets",
        "",
        "![accuracy against visual tokens kept](assets/accuracy.png)",
        "",
        ("Budgets are mean fractions of visual tokens over the LLM layers, mapped to each strategy's own "
        "parameters by `tokcomp.budgets.budget_schedules` (the same mapping as the speed benchmarks). "
        f"LLM-side pruners at layer 2 cannot go below 2/{data['num_layers']} of the tokens on a {data['num_layers']}-layer LLM, so at the smaller "
        "budgets they act at layer 1 with a 1% floor; ToMe runs at 50% only. The x axis is what each schedule "
        "measured, not the target. `random` and `downsample` (grey, dashed) are the floor to beat."),
        "",
        *_table(sorted(budget, key=lambda s: (s["strategy"], -(s["budget"] or 0))), qtypes),
        "",
        "### Fine detail and counting",
        "",
    ]
    for q in CURVES:
        lines += [f"![{q} accuracy against visual tokens kept](assets/accuracy-{q}.png)", ""]
    lines += [
        "## Commands",
        "",
        ("Every row above comes from the one run at the top. One row alone (the same numbers, up to the "
        "timing):"),
        "",
        "```bash",
        "tokcomp eval --threads 1 -s luvc --budgets none          # a preset against the uncompressed model",
        "tokcomp eval --threads 1 -s my_schedule.json --budgets 0.25   # your schedule file, plus every strategy at 25%",
        "tokcomp eval --threads 1 -s my_plugin.schedules:mine     # a plugin's strategy ('module:attr')",
        "python -m tokcomp.train --out my-checkpoint && tokcomp eval --model my-checkpoint   # retrain, evaluate",
        "python benchmarks/accuracy.py --threads 1                # this page",
        "```",
        "",
        ("From Python: `tokcomp.evaluate.evaluate(model, processor, schedules, budgets=..., examples=...)` "
        "returns the same `EvalResult`."),
        "",
        "## The model in your own code",
        "",
        ("The checkpoint is a plain `save_pretrained` folder (`tokcomp.testing.trained_model_path()`): "
         "`Qwen2VLForConditionalGeneration.from_pretrained(path)` loads it. Its processor is saved as its two "
         "parts (tokenizer, image processor), because without torchvision a `Qwen2VLProcessor` with no video "
         "processor cannot be saved whole; `trained_model()` rebuilds it:"),
        "",
        "```python",
        "import tokcomp as tc",
        "from tokcomp.testing import trained_model",
        "from tokcomp.train import encode",
        "from tokcomp.vqa import make_examples",
        "",
        "model, processor = trained_model()",
        "examples = make_examples(7, seed=0, split=\"test\")   # one question of each type",
        "inputs = encode(processor, examples)                # left-padded batch, 144 visual tokens per picture",
        "with tc.compress(model, tc.Schedule.preset(\"fastv\")) as run:",
        "    out = model.generate(**inputs, max_new_tokens=1, do_sample=False)",
        "answers = processor.tokenizer.convert_ids_to_tokens(out[:, -1].tolist())",
        "for e, a in zip(examples, answers):",
        "    print(f\"{e.question:50} truth {e.answer:10} fastv {a}\")",
        "```",
        "",
        "## What this can and cannot tell",
        "",
        ("It **can** tell whether a schedule keeps the information a question needs, under the real model "
        "class, the real processor and `generate()`: a strategy that drops the picture's digit or averages "
        "away its stripes loses those answers here, as it would on a pretrained model. It ranks strategies "
        "against each other and against the floor (`random`, `downsample`) on identical questions, and it "
        "catches regressions in minutes on a CPU. The per-type columns say which kind of detail a method "
        "gives up first."),
        "",
        "It **cannot** stand in for a pretrained VLM's benchmark numbers:",
        "",
        ("- The model is tiny, trained from scratch on one narrow task. Its attention patterns, which FastV, "
        "PACT and VTW score tokens by, and the spread of information across visual tokens, which SPU and OIM "
        "rely on, are not those of a model pretrained on billions of image-text pairs. A method tuned to "
        "pretrained attention statistics may do better (or worse) there than here."),
        ("- The auxiliary loss trains every visual token to name its own cell's content and place, so here each "
        "token carries its detail explicitly and locally. In a pretrained VLM information is spread over "
        "tokens differently (registers, background tokens that summarise), which changes what dropping or "
        "merging a token costs."),
        (f"- {data['num_layers']} LLM layers leave little room for layer schedules: a pruner at layer 2 already spends a third of "
        "the LLM at full width, and VTW's choice of K has only that many values. Papers' \"negligible loss\" claims are "
        "measured on 28- to 80-layer LLMs, where late layers use visual tokens little."),
        ("- The pictures are simple: flat colours, a few objects on a 3x3 grid, one digit, one stripe patch. "
        "Real images are redundant in other ways (texture, background), and real questions (documents, "
        "charts, video) need other details."),
        ("- One-word answers from a closed vocabulary measure recognition, not the long answers where "
        "compression errors compound over decoding."),
        ("- The prefill speed-ups are those of a 1.5M-parameter model, dominated by fixed costs; see the "
        "[benchmarks](benchmarks.md) for speed at real sizes."),
        "",
        ("Treat a loss here as a warning worth checking on a real model, and a method that beats the floor here "
        "as a candidate, not a result."),
    ]
    return "\n".join(lines) + "\n"


_OUTPUTS = (":!docs/accuracy.md", ":!benchmarks/results/accuracy.json", ":!docs/assets/accuracy*.png")


def _commit() -> str:
    """The short commit of the checkout, marked when tracked files other than this script's outputs differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no", "--", ".", *_OUTPUTS) else "")


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and write the page."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--examples", type=int, default=None, help="default: tokcomp eval's default")
    p.add_argument("--from-json", default=None, help="rewrite the page from an existing JSON, no run")
    args = p.parse_args(argv)
    from tokcomp import evaluate, testing

    torch.set_num_threads(args.threads)
    command = f"python benchmarks/accuracy.py --threads {args.threads}"
    # Taken before the run writes its outputs, so that only changes the run did not make mark the stamp.
    commit = _commit()
    model, processor = testing.trained_model()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        result = None
    else:
        kwargs = {"examples": args.examples} if args.examples else {}
        result = evaluate.evaluate(**kwargs)
        data = result.to_dict()
        from tokcomp import train, vqa

        pictures = vqa.make_examples(32, seed=0, split="test", start=20_000)
        data["token_accuracy"] = train.token_accuracy(model, processor, pictures)
        data["token_accuracy_pictures"] = len(pictures)
        held_out = vqa.make_examples(CHECK_EXAMPLES, seed=0, split="test")
        answers = train.predict(model, processor, held_out)
        # The same per-type figures as the training script's own check.
        data["forward_check"] = {"examples": len(held_out), "accuracy": train._accuracy(answers, held_out)}
        by_answer: dict[str, dict[str, list[bool]]] = {}
        for a, e in zip(answers, held_out):
            if e.qtype in ("count", "exist"):
                by_answer.setdefault(e.qtype, {}).setdefault(e.answer, []).append(a == e.answer)
        data["forward_check"]["by_answer"] = {q: {k: sum(v) / len(v) for k, v in sorted(d.items())}
                                              for q, d in by_answer.items()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "accuracy.json").write_text(json.dumps(data, indent=1) + "\n")
        evaluate.plot_accuracy(result, ASSETS / "accuracy.png")
        for q in CURVES:
            evaluate.plot_accuracy(result, ASSETS / f"accuracy-{q}.png", qtype=q)
    training = json.loads((testing.trained_model_path() / "training.json").read_text())
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    params = sum(p.numel() for p in model.parameters())
    (ROOT / "docs" / "accuracy.md").write_text(page(data, training, command, date, commit, params))
    print(f"wrote docs/accuracy.md ({data['wall_s']:.0f} s run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
