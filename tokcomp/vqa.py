"""A synthetic visual question-answering task, generated in code and deterministic from a seed.

Each example is a 336x336 picture, a question and a one-word answer from a closed vocabulary
(`ANSWERS`). The picture is a 3x3 grid of 112 px cells on a plain background: coloured shapes sit in
the five named cells (``left``, ``right``, ``top``, ``bottom``, ``centre``) and in two of the corners,
a small seven-segment digit sits in one corner and a patch of thin stripes in another. The questions
probe visual detail at several scales, so that compression strategies differ:

| qtype | question (example) | answers | what it needs |
|---|---|---|---|
| ``global`` | what colour is the background ? | white, gray, black | any visual token |
| ``position`` | what shape is at the left ? / what colour is the object at the top ? | shapes, colours | one region |
| ``count`` | how many red objects are there ? | 0 ... 5 (5 means five or more) | every object |
| ``relation`` | is the red object left of the blue object ? | yes, no | two regions |
| ``exist`` | is there a green circle ? | yes, no (balanced) | every object |
| ``digit`` | what digit is written ? | 0 ... 9 | a 2x2-token detail |
| ``stripes`` | which way do the stripes run ? | horizontal, vertical, diagonal | 1-2 px texture |

Answers are computed from the drawing parameters (`Scene`), never from a model. Example ``i`` of a
split and seed is drawn from its own random stream, so ``make_examples(n, seed, split)`` is a prefix
of ``make_examples(n + k, seed, split)`` and the same call always gives the same pixels. Question types
cycle in `QTYPES` order, so every slice of 7 examples holds one of each.

Examples:
    >>> from tokcomp.vqa import make_examples
    >>> ex = make_examples(7, seed=0, split="test")
    >>> [e.qtype for e in ex] == list(QTYPES)
    True
    >>> ex[0].image.size, ex[0].answer in ANSWERS
    ((336, 336), True)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "BACKGROUNDS",
    "COLOURS",
    "IMAGE_SIZE",
    "POSITIONS",
    "QTYPES",
    "SEGMENT_NAMES",
    "SHAPES",
    "SPLITS",
    "STRIPES",
    "VOCABULARY",
    "Digit",
    "Example",
    "Scene",
    "Shape",
    "Stripes",
    "ask",
    "chance_accuracy",
    "make_examples",
    "render",
    "segment_labels",
    "token_labels",
]

IMAGE_SIZE = 336
"""Side of every picture in pixels (12x12 merged Qwen2-VL tokens of 28 px)."""
CELL = IMAGE_SIZE // 3

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "cyan": (20, 200, 210),
}
"""Object colours: name -> RGB."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
"""Background colours: name -> RGB."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Object shapes."""
STRIPES: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
"""Orientations of the stripe patch."""
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (1, 0),
    "right": (1, 2),
    "top": (0, 1),
    "bottom": (2, 1),
    "centre": (1, 1),
}
"""Named positions: name -> (row, column) of the 3x3 grid."""
_CORNERS = ((0, 0), (0, 2), (2, 0), (2, 2))
QTYPES: tuple[str, ...] = ("global", "position", "count", "relation", "exist", "digit", "stripes")
"""The question types, in the order examples cycle through them."""
SPLITS: tuple[str, ...] = ("train", "test")
"""The splits: independent random streams, so the held-out pictures are never trained on."""
MAX_COUNT = 5
"""Counts are answered ``0`` ... ``5``; ``5`` means five or more."""

ANSWERS: tuple[str, ...] = (
    *BACKGROUNDS,
    *COLOURS,
    *SHAPES,
    *(str(d) for d in range(10)),
    "yes",
    "no",
    *STRIPES,
)
"""Every possible answer (one word each)."""

_QUESTION_WORDS = (  # noqa: SIM905 - one readable line; the order fixes the token ids
    "what colour is the background ? shape at object how many objects are there is left of above "
    "a digit written which way do stripes run"
).split()
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys([*_QUESTION_WORDS, *POSITIONS, *ANSWERS]))
"""Every word a question or an answer can contain (questions are split on single spaces)."""

# The seven-segment layout of each digit: segments a (top), b (top right), c (bottom right), d (bottom),
# e (bottom left), f (top left), g (middle).
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


@dataclass(frozen=True)
class Shape:
    """One drawn object.

    Attributes:
        shape: One of `SHAPES`.
        colour: One of `COLOURS`.
        row: Grid row (0 top ... 2 bottom).
        col: Grid column (0 left ... 2 right).
        cx: Centre x in pixels.
        cy: Centre y in pixels.
        size: Side of the bounding square in pixels.
    """

    shape: str
    colour: str
    row: int
    col: int
    cx: int
    cy: int
    size: int

    def box(self) -> tuple[int, int, int, int]:
        """The bounding box ``(x0, y0, x1, y1)`` (inclusive) in pixels."""
        h = self.size // 2
        return (self.cx - h, self.cy - h, self.cx - h + self.size - 1, self.cy - h + self.size - 1)


@dataclass(frozen=True)
class Digit:
    """The seven-segment digit.

    Attributes:
        value: 0 ... 9.
        x: Left edge in pixels.
        y: Top edge in pixels.
        height: Height in pixels (the width is ``0.6 * height``).
        stroke: Segment thickness in pixels.
        colour: RGB of the segments (black on light backgrounds, white on black).
    """

    value: int
    x: int
    y: int
    height: int
    stroke: int
    colour: tuple[int, int, int]

    @property
    def width(self) -> int:
        """Width in pixels."""
        return round(self.height * 0.6)

    def segments(self) -> dict[str, tuple[int, int, int, int]]:
        """Every segment's rectangle ``(x0, y0, x1, y1)`` (inclusive), whether lit or not."""
        x0, y0, w, h, s = self.x, self.y, self.width, self.height, self.stroke
        x1, y1, ym = x0 + w - 1, y0 + h - 1, y0 + h // 2
        return {
            "a": (x0, y0, x1, y0 + s - 1),
            "b": (x1 - s + 1, y0, x1, ym),
            "c": (x1 - s + 1, ym, x1, y1),
            "d": (x0, y1 - s + 1, x1, y1),
            "e": (x0, ym, x0 + s - 1, y1),
            "f": (x0, y0, x0 + s - 1, ym),
            "g": (x0, ym - s // 2, x1, ym - s // 2 + s - 1),
        }

    def lit(self) -> str:
        """The lit segments' letters."""
        return _SEGMENTS[self.value]


@dataclass(frozen=True)
class Stripes:
    """The square patch of thin black-and-white stripes.

    Attributes:
        orientation: One of `STRIPES`.
        x: Left edge in pixels.
        y: Top edge in pixels.
        size: Side in pixels.
        period: Stripe period in pixels (half black, half white).
    """

    orientation: str
    x: int
    y: int
    size: int
    period: int

    def is_dark(self, px: int, py: int) -> bool:
        """Whether pixel ``(px, py)`` of the image (inside the patch) is a dark stripe."""
        u, v = px - self.x, py - self.y
        t = {"horizontal": v, "vertical": u, "diagonal": u + v}[self.orientation]
        return t % self.period < self.period // 2


@dataclass(frozen=True)
class Scene:
    """Everything that is drawn: the picture is a pure function of this (see `render`).

    Attributes:
        background: One of `BACKGROUNDS`.
        objects: The shapes, at most one per grid cell.
        digit: The digit (in a corner cell no shape uses).
        stripes: The stripe patch (in another free corner).
    """

    background: str
    objects: tuple[Shape, ...]
    digit: Digit
    stripes: Stripes


@dataclass
class Example:
    """One question about one picture.

    Attributes:
        image: The 336x336 RGB picture, ``render(scene)``.
        question: Words from `VOCABULARY` separated by single spaces.
        answer: One word from `ANSWERS`.
        qtype: One of `QTYPES`.
        scene: The drawing parameters the answer was computed from.
        index: Position in its split's stream.
        split: ``"train"`` or ``"test"``.
        seed: The seed of the stream.
    """

    image: Image.Image = field(repr=False)
    question: str
    answer: str
    qtype: str
    scene: Scene = field(repr=False)
    index: int
    split: str
    seed: int


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Shape, fill: int | tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = obj.box()
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(obj.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """Draws a scene.

    Args:
        scene: The drawing parameters.

    Returns:
        A 336x336 ``PIL.Image.Image`` in mode ``"RGB"``.
    """
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, COLOURS[obj.colour])
    d = scene.digit
    for name, rect in d.segments().items():
        if name in d.lit():
            draw.rectangle(rect, fill=d.colour)
    s = scene.stripes
    v, u = np.mgrid[0 : s.size, 0 : s.size]
    t = {"horizontal": v, "vertical": u, "diagonal": u + v}[s.orientation]
    patch = np.where(t % s.period < s.period // 2, 0, 255).astype(np.uint8)
    image.paste(Image.fromarray(np.repeat(patch[..., None], 3, axis=2), mode="RGB"), (s.x, s.y))
    return image


def token_labels(scene: Scene, grid: int = 12, cover: float = 0.25) -> list[tuple[str, ...]]:
    """What is drawn under each cell of a ``grid`` x ``grid`` split of the picture, and which named cell it is in.

    A cell's words are what covers most of it: the colour and the shape of an object, the digit's value
    on the digit's box, the orientation on the stripe patch, or else the background colour (a part names
    the cell if it covers at least ``cover`` of it); then, if the cell lies in one of the five named
    cells of the 3x3 grid (`POSITIONS`), that name. The words come from the drawing parameters (the same
    shapes `render` draws), never from a model. Training uses them as auxiliary targets at the visual
    tokens (`tokcomp.train.TrainConfig.dense`).

    Args:
        scene: The drawing parameters.
        grid: Cells per side (12: one merged Qwen2-VL token of 28 px each at 336 px); a multiple of 3.
        cover: Least fraction of a cell a part must cover to name it.

    Returns:
        ``grid * grid`` tuples of words from `VOCABULARY`, in row-major order, for example
        ``("red", "circle", "left")``, ``("7",)`` or ``("white", "centre")``.

    Raises:
        ValueError: If ``grid`` is not a multiple of 3.
    """
    if grid % 3:
        raise ValueError(f"grid must be a multiple of 3 (the picture is a 3x3 grid of cells), got {grid}")
    # One label picture drawn like `render` draws: 0 background, then one id per drawn part.
    parts: list[tuple[str, ...]] = [(scene.background,)]
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        parts.append((obj.colour, obj.shape))
        _draw_shape(draw, obj, len(parts) - 1)
    d = scene.digit
    parts.append((str(d.value),))
    draw.rectangle((d.x, d.y, d.x + d.width - 1, d.y + d.height - 1), fill=len(parts) - 1)
    s = scene.stripes
    parts.append((s.orientation,))
    draw.rectangle((s.x, s.y, s.x + s.size - 1, s.y + s.size - 1), fill=len(parts) - 1)
    ids = np.asarray(image)
    side = IMAGE_SIZE // grid
    cells = ids[: side * grid, : side * grid].reshape(grid, side, grid, side).transpose(0, 2, 1, 3)
    cells = cells.reshape(grid * grid, side * side)
    named = {cell: name for name, cell in POSITIONS.items()}
    out = []
    for k, cell in enumerate(cells):
        counts = np.bincount(cell, minlength=len(parts))
        counts[0] = 0
        best = int(counts.argmax())
        what = parts[best] if counts[best] >= cover * cell.size else parts[0]
        r, c = divmod(k, grid)
        where = named.get((3 * r // grid, 3 * c // grid))
        out.append((*what, where) if where else what)
    return out


SEGMENT_NAMES = "abcdefg"
"""The seven-segment letters in the order of `segment_labels`' columns: a top, b top right,
c bottom right, d bottom, e bottom left, f top left, g middle."""


def segment_labels(scene: Scene, grid: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Which of the digit's lit segments lie in each cell of a ``grid`` x ``grid`` split of the picture.

    The digit's value is the set of its lit segments (`Digit.lit`), so this splits "what digit" into
    parts that one cell can see: a cell holding the right half of a "3" holds segments b and c. A
    segment counts for a cell if at least ``stroke ** 2`` of its pixels fall in the cell. Training can
    use these as targets at the visual tokens (`tokcomp.train.TrainConfig.segments`).

    Args:
        scene: The drawing parameters.
        grid: Cells per side (12: one merged Qwen2-VL token of 28 px each at 336 px).

    Returns:
        bits: ``(grid * grid, 7)`` bool, row-major, columns in `SEGMENT_NAMES` order.
        near: ``(grid * grid,)`` bool, the cells that hold at least ``stroke ** 2`` pixels of the
            digit's box (lit or not), where the bits are meaningful.
    """
    d = scene.digit
    side = IMAGE_SIZE / grid
    edges = np.arange(grid + 1) * side
    lo, hi = edges[:-1], edges[1:]

    def overlap(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        # Inclusive pixel rectangles: pixel x covers [x, x + 1).
        w = np.clip(np.minimum(hi, x1 + 1) - np.maximum(lo, x0), 0, None)
        h = np.clip(np.minimum(hi, y1 + 1) - np.maximum(lo, y0), 0, None)
        return np.outer(h, w).ravel()

    least = d.stroke**2
    rects = d.segments()
    bits = np.stack([overlap(*rects[k]) >= least if k in d.lit() else np.zeros(grid * grid, bool)
                     for k in SEGMENT_NAMES], axis=1)
    near = overlap(d.x, d.y, d.x + d.width - 1, d.y + d.height - 1) >= least
    return bits, near


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------
def _shape_at(rng: random.Random, cell: tuple[int, int], shape: str, colour: str) -> Shape:
    row, col = cell
    size = rng.randrange(56, 89)
    half = size // 2
    cx = col * CELL + half + rng.randrange(0, CELL - size + 1)
    cy = row * CELL + half + rng.randrange(0, CELL - size + 1)
    return Shape(shape, colour, row, col, cx, cy, size)


def _fill(
    rng: random.Random, cells: list[tuple[int, int]], p: float, colours: list[str], avoid: set[tuple[str, str]]
) -> list[Shape]:
    """Random shapes in some of ``cells`` (each with probability ``p``), never a (shape, colour) in avoid."""
    out = []
    for cell in cells:
        if rng.random() >= p:
            continue
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(colours)
            if (shape, colour) not in avoid:
                break
        out.append(_shape_at(rng, cell, shape, colour))
    return out


def _example(seed: int, split: str, index: int) -> Example:
    rng = random.Random(f"tokcomp-vqa/{split}/{seed}/{index}")
    qtype = QTYPES[index % len(QTYPES)]
    background = rng.choice(list(BACKGROUNDS))
    corners = list(_CORNERS)
    rng.shuffle(corners)
    digit_cell, stripe_cell = corners[0], corners[1]
    free = [*POSITIONS.values(), corners[2], corners[3]]
    rng.shuffle(free)
    colours = list(COLOURS)
    objects: list[Shape] = []
    if qtype == "count":
        target = rng.choice(colours)
        answer_n = rng.randrange(MAX_COUNT + 1)
        n = answer_n if answer_n < MAX_COUNT else rng.choice((5, 6))
        objects = [_shape_at(rng, c, rng.choice(SHAPES), target) for c in free[:n]]
        others = [c for c in colours if c != target]
        objects += _fill(rng, free[n:], 0.5, others, set())
        question, answer = f"how many {target} objects are there ?", str(answer_n)
    elif qtype == "position":
        name = rng.choice(list(POSITIONS))
        cell = POSITIONS[name]
        obj = _shape_at(rng, cell, rng.choice(SHAPES), rng.choice(colours))
        objects = [obj, *_fill(rng, [c for c in free if c != cell], 0.6, colours, set())]
        if rng.random() < 0.5:
            question, answer = f"what shape is at the {name} ?", obj.shape
        else:
            question, answer = f"what colour is the object at the {name} ?", obj.colour
    elif qtype == "relation":
        c1, c2 = rng.sample(colours, 2)
        axis = rng.choice(("left", "above"))
        k = 1 if axis == "left" else 0  # compare columns for "left of", rows for "above"
        while True:
            a, b = rng.sample(free, 2)
            if a[k] != b[k]:
                break
        o1 = _shape_at(rng, a, rng.choice(SHAPES), c1)
        o2 = _shape_at(rng, b, rng.choice(SHAPES), c2)
        others = [c for c in colours if c not in (c1, c2)]
        objects = [o1, o2, *_fill(rng, [c for c in free if c not in (a, b)], 0.5, others, set())]
        relation = "left of" if axis == "left" else "above"
        question = f"is the {c1} object {relation} the {c2} object ?"
        answer = "yes" if a[k] < b[k] else "no"
    elif qtype == "exist":
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        present = rng.random() < 0.5
        rest = free
        if present:
            objects = [_shape_at(rng, free[0], shape, colour)]
            rest = free[1:]
        # Distractors sharing the shape or the colour make "no" hard to answer from one property.
        objects += _fill(rng, rest, 0.6, colours, {(shape, colour)})
        question, answer = f"is there a {colour} {shape} ?", "yes" if present else "no"
    else:
        objects = _fill(rng, free, 0.5, colours, set())
        question, answer = "", ""

    height = rng.randrange(30, 41)
    stroke = max(3, height // 8)
    width = round(height * 0.6)
    ink = (255, 255, 255) if background == "black" else (0, 0, 0)
    dr, dc = digit_cell
    digit = Digit(
        value=rng.randrange(10),
        x=dc * CELL + rng.randrange(8, CELL - width - 8),
        y=dr * CELL + rng.randrange(8, CELL - height - 8),
        height=height,
        stroke=stroke,
        colour=ink,
    )
    size = rng.randrange(36, 53)
    sr, sc = stripe_cell
    stripes = Stripes(
        orientation=rng.choice(STRIPES),
        x=sc * CELL + rng.randrange(8, CELL - size - 8),
        y=sr * CELL + rng.randrange(8, CELL - size - 8),
        size=size,
        period=rng.choice((2, 4)),
    )
    if qtype == "global":
        question, answer = "what colour is the background ?", background
    elif qtype == "digit":
        question, answer = "what digit is written ?", str(digit.value)
    elif qtype == "stripes":
        question, answer = "which way do the stripes run ?", stripes.orientation
    scene = Scene(background, tuple(sorted(objects, key=lambda o: (o.row, o.col))), digit, stripes)
    return Example(render(scene), question, answer, qtype, scene, index, split, seed)


def ask(scene: Scene, qtype: str, rng: random.Random, *, balanced: bool = False) -> tuple[str, str] | None:
    """A random question of a type about an existing scene, with its answer from the scene's parameters.

    Unlike the examples of `make_examples`, whose scenes are drawn so that each type's answers are
    balanced, these questions take the scene as it is (a ``count`` is often 0 or 1, an ``exist`` often
    "no"), unless ``balanced`` evens the odds. Training uses them to ask several questions about one
    picture.

    Args:
        scene: The drawing parameters.
        qtype: One of `QTYPES`.
        rng: Source of the random choices.
        balanced: Half of the ``exist`` questions ask about a drawn object ("yes") and the other half
            about a (colour, shape) not drawn ("no"); half of the ``count`` questions ask the colour
            of a drawn object (so larger counts come up), the other half any colour.

    Returns:
        ``(question, answer)``, or ``None`` if the scene has nothing to ask of that type (no object at a
        named position, or no two objects of distinct unique colours in different columns/rows).

    Raises:
        ValueError: If ``qtype`` is unknown.
    """
    objects = scene.objects
    if qtype == "global":
        return "what colour is the background ?", scene.background
    if qtype == "digit":
        return "what digit is written ?", str(scene.digit.value)
    if qtype == "stripes":
        return "which way do the stripes run ?", scene.stripes.orientation
    if qtype == "count":
        colour = rng.choice(objects).colour if balanced and objects and rng.random() < 0.5 else rng.choice(list(COLOURS))
        return f"how many {colour} objects are there ?", str(min(MAX_COUNT, sum(o.colour == colour for o in objects)))
    if qtype == "exist":
        drawn = {(o.shape, o.colour) for o in objects}
        if balanced and objects and rng.random() < 0.5:
            shape, colour = rng.choice(sorted(drawn))
        elif balanced:
            shape, colour = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in drawn])
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        present = (shape, colour) in drawn
        return f"is there a {colour} {shape} ?", "yes" if present else "no"
    if qtype == "position":
        named = {cell: name for name, cell in POSITIONS.items()}
        candidates = [o for o in objects if (o.row, o.col) in named]
        if not candidates:
            return None
        obj = rng.choice(candidates)
        name = named[(obj.row, obj.col)]
        if rng.random() < 0.5:
            return f"what shape is at the {name} ?", obj.shape
        return f"what colour is the object at the {name} ?", obj.colour
    if qtype == "relation":
        unique = [o for o in objects if sum(p.colour == o.colour for p in objects) == 1]
        axis = rng.choice(("left", "above"))
        k = "col" if axis == "left" else "row"
        pairs = [(a, b) for a in unique for b in unique if getattr(a, k) != getattr(b, k)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        relation = "left of" if axis == "left" else "above"
        answer = "yes" if getattr(a, k) < getattr(b, k) else "no"
        return f"is the {a.colour} object {relation} the {b.colour} object ?", answer
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def make_examples(n: int, seed: int = 0, split: str = "test", *, start: int = 0) -> list[Example]:
    """Generates ``n`` examples of a split.

    Args:
        n: Number of examples.
        seed: Seed of the stream; the same ``(seed, split)`` always gives the same examples.
        split: ``"train"`` or ``"test"`` (held-out): independent streams.
        start: Index of the first example in the stream (to continue a stream or take a later slice).

    Returns:
        Examples ``start`` ... ``start + n - 1``; their question types cycle through `QTYPES`.

    Raises:
        ValueError: If ``split`` is unknown or ``n``/``start`` is negative.

    Examples:
        >>> a = make_examples(3, seed=1, split="train")
        >>> b = make_examples(2, seed=1, split="train", start=1)
        >>> [e.question for e in a[1:]] == [e.question for e in b]
        True
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    return [_example(seed, split, i) for i in range(start, start + n)]


def chance_accuracy(qtype: str) -> float:
    """Accuracy of guessing uniformly among a question type's possible answers.

    Args:
        qtype: One of `QTYPES`.

    Returns:
        1 / (number of possible answers); ``position`` mixes shape (1/3) and colour (1/6) questions
        half and half.

    Raises:
        ValueError: If ``qtype`` is unknown.
    """
    table = {
        "global": 1 / len(BACKGROUNDS),
        "position": 0.5 / len(SHAPES) + 0.5 / len(COLOURS),
        "count": 1 / (MAX_COUNT + 1),
        "relation": 0.5,
        "exist": 0.5,
        "digit": 0.1,
        "stripes": 1 / len(STRIPES),
    }
    if qtype not in table:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    return table[qtype]
