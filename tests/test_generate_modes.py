"""Ordinary `transformers` usage under every preset on every tiny architecture (issue #11), each against an
oracle that does not come from the code under test:

* ``num_return_sequences=k`` with greedy sampling (``top_k=1``) gives ``k`` copies of the greedy result.
* Seeded sampling with ``num_return_sequences=2`` equals seeded sampling on the batch expanded by hand (every
  sample twice, processed and encoded as separate samples): the same draws from the same distributions.
* Beam search: the first step's logits of every beam are the greedy first-step logits of its sample, and the
  beams of a batch are those of each sample run alone (batch equals samples).
* ``use_cache=False`` (every step a fresh compressed prefill) equals decoding with the cache, for presets
  whose decisions do not depend on the last token; FastV and PACT re-score with every step's last token when
  there is no cache (their reference behaviour), so for them the first step agrees.
* Multi-turn chat: the second turn, continuing the first turn's cache with ``generate(past_key_values=...)``,
  equals feeding the new turn token by token into a copy of that cache; and, for presets whose decisions do
  not depend on the text after the images, one prefill of the whole conversation under the same schedule.
* A hand-written decoding loop (prefill with ``model(..., use_cache=True)``, then one token at a time into a
  ``copy.deepcopy`` of the cache) equals ``generate()`` greedy.

Every preset x every architecture runs each mode against its oracle, except the two most expensive oracles
(sampling on a batch expanded by hand, and beam search on a batch against each sample alone): those run on
every architecture with ``luvc`` (encoder and LLM stages) and on LLaVA, the smallest model, under every
other preset.

Plus: scoring with ``labels=`` (the loss equals the cross-entropy computed by hand from the returned logits
counted from the end, and the unpatched model's loss for an empty schedule), the lengths of hidden states and
attentions, a cache continued after its ``with`` block, LLaVA-OneVision with ``use_cache=False``, and extreme
aspect ratios.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import cached_model
from packaging.version import Version

import tokcomp as tc
from tokcomp import testing

PRESETS = sorted(tc.registry.presets())
ARCHS = list(testing.ARCHITECTURES)
# Presets whose decisions read the prompt's text (the last token's attention; CDPruner's relevance to the
# text after the image): a prefill of a longer sequence may decide differently, so only the first step is
# compared with a prefill of the whole sequence.
LAST_TOKEN = {"fastv", "pact", "pact-qwen2-vl", "cdpruner", "vscan"}  # vscan: FastV at half depth
NEW = 2  # new tokens per generate() call
SPECIAL = list(range(4, 12))  # the architectures' special tokens in the tiny vocabulary (tokcomp.testing)
ATOL, RTOL = 2e-4, 1e-4


def _samples():
    return [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]]


def _prompts():
    return ["w7 w8 w9 w10 w11", "w12 w13"]


def _batch(arch: str, repeat: int = 1):
    samples, prompts = _samples(), _prompts()
    samples = [s for s in samples for _ in range(repeat)]
    prompts = [p for p in prompts for _ in range(repeat)]
    return testing.tiny_inputs(arch, samples, prompts=prompts)


def _gen(model, inputs, **kw):
    # no placeholder id is generated: a conversation re-read by the processor's rules must not gain images
    kw = {"max_new_tokens": NEW, "do_sample": False, "output_logits": True, "return_dict_in_generate": True,
          "suppress_tokens": SPECIAL, **kw}
    return model.generate(**inputs, **kw)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def _turn_two(arch: str, one, sequences: torch.Tensor, words: list[int]) -> dict:
    """The whole conversation after turn 1 plus a new user turn, without the pixels (they are in the cache)."""
    ids = torch.cat([sequences, torch.tensor([words])], 1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in one:  # Qwen's M-RoPE needs to know which tokens are visual
        tt = one["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(1, ids.shape[1] - tt.shape[1])], 1)
    return out


def _skip_if_refused(model, preset: str) -> None:
    """A preset whose placement the schedule validator refuses for this architecture by design (VisionZip's
    encoder-site preset in front of a grid projector) is skipped, as in the adapter matrix."""
    try:
        tc.compress(model, preset)
    except tc.ScheduleError as exc:
        pytest.skip(f"rejected by the schedule validator by design: {exc}")


def _pixels(one) -> dict:
    return {k: v for k, v in one.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
def test_return_sequences_beams_and_no_cache(preset, arch):
    if arch == "internvl" and Version(transformers.__version__) < Version("5.18"):
        pytest.skip("transformers 5.17's generate() repeats InternVL's per-tile pixel_values as if they were "
                    "per sample: the unpatched model's return sequences and beams are wrong there too")
    model = cached_model(arch)
    _skip_if_refused(model, preset)
    batch = _batch(arch)
    with torch.no_grad(), tc.compress(model, preset) as run:
        greedy = _gen(model, batch)
        removed = run.report()
        # several return sequences: k copies of the greedy result (sampling from the top token only: generate()
        # refuses num_return_sequences with do_sample=False)
        nrs = _gen(model, batch, num_return_sequences=2, do_sample=True, top_k=1)
        assert torch.equal(nrs.sequences, greedy.sequences.repeat_interleave(2, 0))
        _close(nrs.logits[0], greedy.logits[0].repeat_interleave(2, 0))
        # beam search: every beam starts from its sample's greedy logits
        beams = _gen(model, batch, num_beams=2, num_return_sequences=2)
        _close(beams.logits[0], greedy.logits[0].repeat_interleave(2, 0))
        # no KV cache: every step is a compressed prefill of the whole sequence
        fresh = _gen(model, batch, use_cache=False)
    if preset in LAST_TOKEN:
        _close(fresh.logits[0], greedy.logits[0])
    else:
        assert torch.equal(fresh.sequences, greedy.sequences)
        for a, b in zip(fresh.logits, greedy.logits):
            _close(a, b)
    # what reaches the LLM is already compressed by encoder- and projector-site stages (original_visual)
    fewest = [min(row[b] for row in removed.visual_tokens) for b in range(2)]
    assert sum(fewest) < sum(removed.uncompressed_visual), "the preset removed nothing"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
def test_hand_loop_copied_cache_and_multi_turn(preset, arch):
    model = cached_model(arch)
    _skip_if_refused(model, preset)
    one = testing.batch_item(_batch(arch), 0)
    with torch.no_grad(), tc.compress(model, preset):
        ref = _gen(model, one)
        # a hand-written decoding loop on a copy of the prefilled cache = generate() greedy
        out = model(**one, use_cache=True)
        cache = copy.deepcopy(out.past_key_values)
        logits = [out.logits[:, -1]]
        for _ in range(NEW - 1):
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1])
        for a, b in zip(logits, ref.logits):
            _close(a, b)
        # multi-turn: turn 2 continues turn 1's cache, like feeding its tokens one by one into a copy of it
        turn2 = _turn_two(arch, one, ref.sequences, [20, 21, 22])
        reused = _gen(model, turn2, past_key_values=copy.deepcopy(ref.past_key_values))
        stepped = copy.deepcopy(ref.past_key_values)
        # the tokens the cache has not seen: turn 1's last generated token, then the new turn
        for word in turn2["input_ids"][0, stepped.get_seq_length():]:
            last = model(input_ids=word.view(1, 1), past_key_values=stepped, use_cache=True).logits[:, -1]
        _close(reused.logits[0], last)
        if preset not in LAST_TOKEN:  # and like one prefill of the whole conversation
            whole = _gen(model, {**turn2, **_pixels(one)})
            assert torch.equal(whole.sequences, reused.sequences)
            for a, b in zip(whole.logits, reused.logits):
                _close(a, b)


def _sampling_and_beams(preset: str, arch: str) -> None:
    model = cached_model(arch)
    batch = _batch(arch)
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, preset):
        # seeded sampling on the generate()-expanded batch = on the batch expanded by hand
        torch.manual_seed(7)
        sampled = model.generate(**batch, max_new_tokens=NEW, do_sample=True, num_return_sequences=2, top_k=0)
        torch.manual_seed(7)
        by_hand = model.generate(**_batch(arch, repeat=2), max_new_tokens=NEW, do_sample=True, top_k=0)
        # beam search on a batch = on each sample alone
        beams = _gen(model, batch, num_beams=2, num_return_sequences=2)
        beams_one = _gen(model, testing.batch_item(batch, 0), num_beams=2, num_return_sequences=2)
    assert torch.equal(sampled[:, L:], by_hand[:, -NEW:])
    assert torch.equal(beams.sequences[:2, L:], beams_one.sequences[:, -NEW:])


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_and_beam_search_on_every_architecture(arch):
    _sampling_and_beams("luvc", arch)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "luvc"])
def test_sampling_and_beam_search_under_every_preset(preset):
    _sampling_and_beams(preset, "llava")


# --------------------------------------------------------------------------------------------------------
# scoring with labels, and the lengths of what a compressed forward returns


def _last_k_labels(ids: torch.Tensor, k: int) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -k:] = ids[:, -k:]
    return labels


def _ce_from_the_end(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The loss of the last ``k`` tokens of every row, by position from the end (the documented contract):
    position ``-j-1`` of the logits predicts token ``-j`` of the prompt."""
    pred = logits[:, -k - 1:-1].float()
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, -k:].reshape(-1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["luvc", "fastv", "vtw"])
def test_labels_give_the_loss_of_the_last_text_tokens(preset, arch):
    model = cached_model(arch)
    batch = _batch(arch)  # left-padded, as generate() pads
    ids = batch["input_ids"]
    k = 2
    with torch.no_grad(), tc.compress(model, preset) as run:
        out = model(**batch, labels=_last_k_labels(ids, k))
        final = run.kept_positions(run.adapter.num_layers - 1)
    assert out.logits.shape[1] < ids.shape[1], "nothing was removed: the check would be vacuous"
    assert out.logits.shape[1] == final.shape[1]
    _close(out.loss, _ce_from_the_end(out.logits, ids, k))


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_labels_under_an_empty_schedule_give_the_unpatched_loss(arch):
    model = cached_model(arch)
    batch = _batch(arch)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    with torch.no_grad():
        want = model(**batch, labels=labels).loss
        with tc.compress(model, tc.Schedule([])):
            got = model(**batch, labels=labels).loss
    assert torch.equal(got, want)


def test_labels_follow_the_compaction_of_every_position():
    """Every label (not only the last ones) is compared with the slot that holds its token."""
    model = cached_model("llava")
    batch = _batch("llava")
    ids = batch["input_ids"]
    labels = ids.masked_fill(~batch["attention_mask"].bool(), -100)
    with torch.no_grad(), tc.compress(model, "luvc") as run:
        out = model(**batch, labels=labels)
        final = run.kept_positions(run.adapter.num_layers - 1)
    # by hand: the kept tokens of each row, in order, each predicting the next kept token
    losses = []
    for b in range(ids.shape[0]):
        pos = final[b][final[b] >= 0]
        pos = pos[batch["attention_mask"][b, pos].bool()]
        row = out.logits[b, -pos.numel():]
        target = labels[b, pos]
        losses.append(torch.nn.functional.cross_entropy(row[:-1].float(), target[1:], reduction="sum"))
    n = sum(int((labels[b, final[b][final[b] >= 0]][1:] != -100).sum()) for b in range(ids.shape[0]))
    _close(out.loss, torch.stack(losses).sum() / n)


def test_hidden_states_and_attentions_have_the_lengths_of_their_layers():
    model = testing.tiny_model("qwen2_vl", attn_implementation="eager")  # fresh: output_attentions leaves hooks
    batch = _batch("qwen2_vl")
    with torch.no_grad(), tc.compress(model, "luvc") as run:
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        n = run.adapter.num_layers
        slots = [run.kept_positions(i).shape[1] for i in range(n)]
    assert [h.shape[1] for h in out.hidden_states] == [slots[0], *slots]  # embeddings, then each layer's output
    assert [tuple(a.shape[-2:]) for a in out.attentions] == [(s, s) for s in slots]
    assert slots[-1] < slots[0] < batch["input_ids"].shape[1]


# --------------------------------------------------------------------------------------------------------
# caches


def test_a_cache_continued_after_its_block_ended_is_refused():
    model = cached_model("llava")
    one = testing.batch_item(_batch("llava"), 0)
    with torch.no_grad(), tc.compress(model, "luvc"):
        out = model(**one, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad(), pytest.raises(tc.RuntimeStateError) as info:
        model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    msg = str(info.value)
    assert "block that has ended" in msg and "inside the same" in msg, msg
    with torch.no_grad(), tc.compress(model, "luvc"), pytest.raises(tc.RuntimeStateError) as info:
        model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    assert "another tokcomp.compress block" in str(info.value)


def test_an_uncompressed_cache_is_refused_with_the_right_diagnosis():
    model = cached_model("llava")
    one = testing.batch_item(_batch("llava"), 0)
    with torch.no_grad():
        out = model(**one, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        with tc.compress(model, "luvc"), pytest.raises(tc.RuntimeStateError) as info:
            model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    assert "not computed inside this tokcomp.compress block" in str(info.value)


def test_two_conversations_decode_independently_in_one_block():
    model = cached_model("internvl")
    batch = _batch("internvl")
    a, b = testing.batch_item(batch, 0), testing.batch_item(batch, 1)
    with torch.no_grad(), tc.compress(model, "luvc"):
        ref_a, ref_b = _gen(model, a), _gen(model, b)
        out_a, out_b = model(**a, use_cache=True), model(**b, use_cache=True)
        ta, tb = out_a.logits[:, -1:].argmax(-1), out_b.logits[:, -1:].argmax(-1)
        step_a = model(input_ids=ta, past_key_values=out_a.past_key_values, use_cache=True).logits[:, -1]
        step_b = model(input_ids=tb, past_key_values=out_b.past_key_values, use_cache=True).logits[:, -1]
    _close(step_a, ref_a.logits[1])
    _close(step_b, ref_b.logits[1])


# --------------------------------------------------------------------------------------------------------
# LLaVA-OneVision without a cache, extreme aspect ratios


def test_llava_onevision_encoder_stage_without_cache():
    model = cached_model("llava_onevision")
    batch = _batch("llava_onevision")
    with torch.no_grad(), tc.compress(model, "luvc") as run:
        cached = _gen(model, batch)
        fresh = _gen(model, batch, use_cache=False)
        assert run.num_prefills == 1 + NEW
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits):
        _close(a, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(28, 1000), (1000, 28)])
def test_extreme_aspect_ratios(arch, size):
    model = cached_model(arch)
    images = [[testing.make_image(*size, seed=3)], [testing.make_image(140, 196, seed=2)]]
    batch = testing.tiny_inputs(arch, images, prompts=_prompts())  # every processor and model takes them
    with torch.no_grad(), tc.compress(model, "luvc") as run:
        out = _gen(model, batch)
        single = _gen(model, testing.batch_item(batch, 0))
        rep = run.report()
    assert rep.visual_tokens[-1][0] == 0
    _close(out.logits[0][0], single.logits[0][0])
