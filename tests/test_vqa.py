"""The synthetic VQA task: deterministic, and every answer is right, read back from the pixels.

The oracle here does not use the generator's answer logic: it finds the objects in the picture (the
non-background pixels of each grid cell), names their colour from the RGB values and their shape from
how much of their bounding box they fill, decodes the digit from which segment centres are inked, and the
stripes from which neighbouring pixels are equal. Only the locations of the digit and the stripe patch
are taken from the drawing parameters.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from tokcomp import vqa

# The standard seven-segment code (segments a..g: top, top right, bottom right, bottom, bottom left,
# top left, middle), written out here independently of the generator's table.
SEVEN_SEGMENT = {
    (1, 1, 1, 1, 1, 1, 0): "0", (0, 1, 1, 0, 0, 0, 0): "1", (1, 1, 0, 1, 1, 0, 1): "2",
    (1, 1, 1, 1, 0, 0, 1): "3", (0, 1, 1, 0, 0, 1, 1): "4", (1, 0, 1, 1, 0, 1, 1): "5",
    (1, 0, 1, 1, 1, 1, 1): "6", (1, 1, 1, 0, 0, 0, 0): "7", (1, 1, 1, 1, 1, 1, 1): "8",
    (1, 1, 1, 1, 0, 1, 1): "9",
}
NAMED = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "centre": (1, 1)}


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda k: float(np.abs(rgb.astype(int) - palette[k]).sum()))


def read_objects(ex: vqa.Example) -> dict[tuple[int, int], tuple[str, str]]:
    """(row, col) -> (colour, shape) of the object seen in each grid cell."""
    px = np.asarray(ex.image).astype(int)
    bg_rgb = np.array(vqa.BACKGROUNDS[ex.scene.background])
    skip = set()
    for item in (ex.scene.digit, ex.scene.stripes):
        skip.add((item.y // 112, item.x // 112))
    seen = {}
    for r in range(3):
        for c in range(3):
            if (r, c) in skip:
                continue
            cell = px[r * 112 : (r + 1) * 112, c * 112 : (c + 1) * 112]
            ink = np.abs(cell - bg_rgb).sum(-1) > 60
            if ink.sum() < 200:
                continue
            ys, xs = np.nonzero(ink)
            fill = ink.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.93 else "circle" if fill > 0.65 else "triangle"
            names = list(vqa.COLOURS)
            palette = np.array([vqa.COLOURS[n] for n in names])
            dist = np.abs(cell[ys, xs][:, None, :] - palette[None]).sum(-1)
            votes = np.bincount(dist.argmin(1), minlength=len(names))
            seen[(r, c)] = (names[int(votes.argmax())], shape)
    return seen


def read_answer(ex: vqa.Example, objects: dict[tuple[int, int], tuple[str, str]] | None = None) -> str:
    """The answer to the question, from the picture (``objects``: `read_objects` of it, if known)."""
    px = np.asarray(ex.image).astype(int)
    words = ex.question.split()
    objects = read_objects(ex) if objects is None else objects
    if words[:5] == ["what", "colour", "is", "the", "background"]:
        # A pixel that no object, digit or stripe covers.
        occupied = np.zeros(px.shape[:2], bool)
        for o in ex.scene.objects:
            x0, y0, x1, y1 = o.box()
            occupied[y0 : y1 + 1, x0 : x1 + 1] = True
        for it in (ex.scene.digit, ex.scene.stripes):
            w = getattr(it, "size", None) or it.width
            h = getattr(it, "size", None) or it.height
            occupied[it.y : it.y + h, it.x : it.x + w] = True
        y, x = np.argwhere(~occupied)[0]
        return nearest(px[y, x], vqa.BACKGROUNDS)
    if words[:2] == ["what", "shape"]:
        return objects[NAMED[words[-2]]][1]
    if words[:2] == ["what", "colour"]:
        return objects[NAMED[words[-2]]][0]
    if words[:2] == ["how", "many"]:
        return str(min(5, sum(colour == words[2] for colour, _ in objects.values())))
    if words[:3] == ["is", "the", words[2]] and "object" in words:
        (a,) = [cell for cell, (colour, _) in objects.items() if colour == words[2]]
        (b,) = [cell for cell, (colour, _) in objects.items() if colour == words[-3]]
        k = 1 if "left" in words else 0
        return "yes" if a[k] < b[k] else "no"
    if words[:3] == ["is", "there", "a"]:
        return "yes" if (words[3], words[4]) in objects.values() else "no"
    if words[:2] == ["what", "digit"]:
        d = ex.scene.digit
        code = []
        for rect in d.segments().values():
            x0, y0, x1, y1 = rect
            centre = px[(y0 + y1) // 2, (x0 + x1) // 2]
            code.append(int(np.abs(centre - vqa.BACKGROUNDS[ex.scene.background]).sum() > 100))
        return SEVEN_SEGMENT[tuple(code)]
    if words[:3] == ["which", "way", "do"]:
        s = ex.scene.stripes
        patch = px[s.y : s.y + s.size, s.x : s.x + s.size, 0]
        if (patch[:, 1:] == patch[:, :-1]).all():
            return "horizontal"
        if (patch[1:] == patch[:-1]).all():
            return "vertical"
        assert (patch[1:, :-1] == patch[:-1, 1:]).all()
        return "diagonal"
    raise AssertionError(f"unparsed question {ex.question!r}")


EXAMPLES = vqa.make_examples(70, seed=3, split="test") + vqa.make_examples(35, seed=0, split="train")


def test_every_answer_matches_the_picture() -> None:
    for ex in EXAMPLES:
        assert ex.answer in vqa.ANSWERS
        assert set(ex.question.split()) <= set(vqa.VOCABULARY)
        assert read_answer(ex) == ex.answer, (ex.index, ex.split, ex.qtype, ex.question)


def test_extra_questions_match_the_picture() -> None:
    rng = random.Random(5)
    checked = Counter()
    for ex in EXAMPLES[:35]:
        objects = read_objects(ex)
        for qtype in vqa.QTYPES:
            qa = vqa.ask(ex.scene, qtype, rng)
            if qa is None:
                continue
            other = vqa.Example(ex.image, qa[0], qa[1], qtype, ex.scene, ex.index, ex.split, ex.seed)
            assert read_answer(other, objects) == qa[1], qa
            checked[qtype] += 1
    assert set(checked) == set(vqa.QTYPES)


def test_balanced_extra_questions_match_the_picture_and_even_the_odds() -> None:
    # The pixel oracle checks every answer; `balanced` makes "yes" about as common as "no" and asks
    # about drawn colours more often, where the scene's own odds give mostly "no" and count 0.
    rng = random.Random(11)
    answers: dict[bool, Counter] = {False: Counter(), True: Counter()}
    counts: dict[bool, list[int]] = {False: [], True: []}
    for ex in EXAMPLES:
        objects = read_objects(ex)
        for balanced in (False, True):
            for qtype in ("exist", "count"):
                question, answer = vqa.ask(ex.scene, qtype, rng, balanced=balanced)
                other = vqa.Example(ex.image, question, answer, qtype, ex.scene, ex.index, ex.split, ex.seed)
                assert read_answer(other, objects) == answer, (question, answer)
                if qtype == "exist":
                    answers[balanced][answer] += 1
                else:
                    counts[balanced].append(int(answer))
    n = len(EXAMPLES)
    assert answers[False]["yes"] < 0.3 * n
    assert 0.35 * n < answers[True]["yes"] < 0.65 * n
    assert sum(counts[True]) > 1.3 * sum(counts[False])


def test_deterministic_and_splits_differ() -> None:
    a = vqa.make_examples(14, seed=7, split="train")
    b = vqa.make_examples(14, seed=7, split="train")
    assert [e.question for e in a] == [e.question for e in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    later = vqa.make_examples(4, seed=7, split="train", start=10)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a[10:], later))
    test = vqa.make_examples(14, seed=7, split="test")
    other_seed = vqa.make_examples(14, seed=8, split="train")
    for other in (test, other_seed):
        assert not any(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, other))


def test_balanced_answers() -> None:
    ex = vqa.make_examples(7 * 60, seed=1, split="train")
    assert [e.qtype for e in ex[:7]] == list(vqa.QTYPES)
    for qtype in vqa.QTYPES:
        answers = Counter(e.answer for e in ex if e.qtype == qtype)
        # Every answer of the type occurs, none dominates (chance stays near 1 / number of answers).
        assert max(answers.values()) / sum(answers.values()) < 2.5 * vqa.chance_accuracy(qtype), answers
    counts = Counter(e.answer for e in ex if e.qtype == "count")
    assert set(counts) == {str(k) for k in range(6)}
    # The stripe patch follows its own rule (Stripes.is_dark) pixel for pixel.
    s = ex[0].scene.stripes
    px = np.asarray(ex[0].image)
    for y in range(s.y, s.y + s.size, 3):
        for x in range(s.x, s.x + s.size, 3):
            assert (px[y, x] == 0).all() == s.is_dark(x, y)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        vqa.make_examples(1, split="val")
    with pytest.raises(ValueError, match="n and start"):
        vqa.make_examples(-1)
    with pytest.raises(ValueError, match="question type"):
        vqa.chance_accuracy("colour")


def test_token_labels_name_what_the_pixels_show() -> None:
    # Oracle from the pixels: a cell named by an object colour holds mostly pixels of that RGB, and an
    # object of that colour and shape overlaps it; a cell named by a stripe orientation lies on the stripe
    # patch (black and white pixels only); a cell named by the digit overlaps the digit's box; a cell in
    # one of the five named cells of the 3x3 grid ends with that name (written out here by hand), a cell
    # in a corner names nothing; every object is named by some cell.
    names = {(1, 0): "left", (1, 2): "right", (0, 1): "top", (2, 1): "bottom", (1, 1): "centre"}
    for ex in vqa.make_examples(14, seed=3, split="train"):
        labels = vqa.token_labels(ex.scene)
        assert len(labels) == 144 and all(set(words) <= set(vqa.VOCABULARY) for words in labels)
        px = np.asarray(ex.image).astype(int)
        for k, words in enumerate(labels):
            r, c = divmod(k, 12)
            where = names.get((r // 4, c // 4))
            if where:
                assert words[-1] == where
                words = words[:-1]
            word = words[0]
            x0, y0 = c * 28, r * 28
            cell = px[y0 : y0 + 28, x0 : x0 + 28].reshape(-1, 3)
            if word in vqa.COLOURS:
                assert len(words) == 2
                assert (np.abs(cell - vqa.COLOURS[word]).sum(-1) < 30).mean() >= 0.25, (ex.index, k, word)
                assert any(o.colour == word and o.shape == words[1] and o.box()[0] < x0 + 28
                           and x0 <= o.box()[2] and o.box()[1] < y0 + 28 and y0 <= o.box()[3]
                           for o in ex.scene.objects)
            elif word in vqa.STRIPES:
                bw = (cell.min(-1) == cell.max(-1)) & ((cell[:, 0] == 0) | (cell[:, 0] == 255))
                assert bw.mean() >= 0.25 and word == ex.scene.stripes.orientation and len(words) == 1
            elif word.isdigit():
                d = ex.scene.digit
                assert word == str(d.value) and len(words) == 1
                assert d.x < x0 + 28 and x0 < d.x + d.width and d.y < y0 + 28 and y0 < d.y + d.height
            else:
                assert words == (ex.scene.background,)
        for obj in ex.scene.objects:
            assert (obj.colour, obj.shape) in {w[:2] for w in labels}
    with pytest.raises(ValueError, match="multiple of 3"):
        vqa.token_labels(ex.scene, grid=8)


def test_segment_labels_count_the_inked_pixels_of_each_cell() -> None:
    # Oracle from the pixels: a segment is lit if the pixel at its centre is inked (its rectangle from
    # the drawing parameters); a lit segment's ink, cut out of the picture, is counted in every 28 px
    # cell. An unlit segment marks no cell, though lit neighbours ink its rectangle's corners.
    for ex in vqa.make_examples(21, seed=4, split="test"):
        d = ex.scene.digit
        px = np.asarray(ex.image).astype(int)
        ink = np.abs(px - np.array(vqa.BACKGROUNDS[ex.scene.background])).sum(-1) > 100
        bits, near = vqa.segment_labels(ex.scene)
        assert bits.shape == (144, 7) and near.shape == (144,)
        for j, name in enumerate(vqa.SEGMENT_NAMES):
            x0, y0, x1, y1 = d.segments()[name]
            if not ink[(y0 + y1) // 2, (x0 + x1) // 2]:
                assert not bits[:, j].any(), (ex.index, name)
                continue
            alone = np.zeros_like(ink)
            alone[y0 : y1 + 1, x0 : x1 + 1] = ink[y0 : y1 + 1, x0 : x1 + 1]
            per_cell = alone.reshape(12, 28, 12, 28).sum(axis=(1, 3)).ravel()
            assert (bits[:, j] == (per_cell >= d.stroke**2)).all(), (ex.index, name)
        box = np.zeros_like(ink)
        box[d.y : d.y + d.height, d.x : d.x + d.width] = True
        assert (near == (box.reshape(12, 28, 12, 28).sum(axis=(1, 3)).ravel() >= d.stroke**2)).all()
        # The union of the bits is the digit: its value reads back through the seven-segment table.
        code = tuple(int(bits[:, j].any()) for j in range(7))
        assert SEVEN_SEGMENT[code] == str(d.value)
