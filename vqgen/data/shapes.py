"""The built-in captioned-shapes dataset: procedural scenes, their images and captions.

A scene is 1..3 coloured shapes on a 3x3 grid over a plain dark background, at most one
object per cell, each centred in its cell. Every sample is a pure function of
``(seed, split, index)`` (a private ``random.Random`` seeded from a hash of the three), so the
same sample comes back in any order, in any process, on any machine.

Captions use varied English templates, synonyms ("big/large", "top left/upper left",
"center/middle") and varied attribute and object order, so a text encoder has to read the
language rather than match a fixed string. They come in two disjoint families (``FAMILIES``):
``train``, the wording of every dataset caption, and ``other``, the same attribute and position
words in other attribute orders with other connectives, which training never sees and
evaluation uses to measure how much adherence depends on the training wording.
``vqgen.eval.scene.parse_caption`` inverts every wording of both, and
``vqgen.eval.scene.detect`` reads the scene back from pixels.

Hold-out specs such as ``"green triangle"``, ``"big circle"``, ``"red top left"`` or
``"center"`` name attribute combinations that the ``train`` split never contains and every
``holdout`` sample does, to measure compositional generalisation.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Well separated hues, all far from the background. The darker hues are lightened so that
# a small object's outline lives in luma as well as in chroma: JPEG keeps luma at full
# resolution but halves chroma's, which would otherwise blur a small shape away.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 55, 55),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 50),
    "green": (40, 185, 60),
    "blue": (60, 115, 245),
    "purple": (185, 85, 235),
    "white": (235, 235, 235),
}
SIZES: tuple[str, ...] = ("small", "big")
# Canonical position names on the 3x3 grid -> (row, col).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
CELL_NAMES: dict[tuple[int, int], str] = {cell: name for name, cell in POSITIONS.items()}
BACKGROUND: tuple[int, int, int] = (18, 18, 28)
GRID = 3
# Object extent as a fraction of the cell side; big objects leave a margin so that
# antialiased edges never reach a neighbouring cell.
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "big": 0.84}
SUPERSAMPLE = 4  # draw at 4x and box-downsample: exact area antialiasing

# Words the captions use for each attribute value (the first is the canonical one).
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "big": ("big", "large"),
}
# Position words compose: a vertical word sets the row, a horizontal one the column, and a
# centre word stands for the middle of whichever axis is not named ("top" = top middle).
VERTICAL_WORDS: dict[str, int] = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
HORIZONTAL_WORDS: dict[str, int] = {"left": 0, "right": 2}
CENTRE_WORDS: tuple[str, ...] = ("center", "centre", "middle", "central")
# Words that carry no attribute ("and" and "plus" separate objects in captions); anything
# else in a caption or hold-out spec is an error.
FILLER_WORDS: frozenset[str] = frozenset(
    "and plus a an the one there is are there's here we see can in at on of to with has have holds "
    "contains shows showing show image picture photo drawing scene canvas it its which that "
    "placed located sits sitting positioned corner side edge part area size sized shape "
    "object coloured colored".split()
)

Lexeme = tuple[str, Any]  # (attribute, value), e.g. ("colour", "red"), ("vertical", 0)


def _lexicon() -> dict[str, Lexeme]:
    table: dict[str, Lexeme] = {}
    for attribute, words in (("shape", SHAPE_WORDS), ("colour", COLOUR_WORDS), ("size", SIZE_WORDS)):
        for value, synonyms in words.items():
            table |= {w: (attribute, value) for w in synonyms}
    table |= {w: ("vertical", r) for w, r in VERTICAL_WORDS.items()}
    table |= {w: ("horizontal", c) for w, c in HORIZONTAL_WORDS.items()}
    table |= {w: ("centre", True) for w in CENTRE_WORDS}
    return table


LEXICON: dict[str, Lexeme] = _lexicon()

# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape, colour, size and grid cell (row, col), each 0..2 from the top left."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for name, valid in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"SceneObject {name} {getattr(self, name)!r} is not one of {list(valid)}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"SceneObject cell ({self.row}, {self.col}) lies outside the {GRID}x{GRID} grid")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def position(self) -> str:
        """Canonical position name, e.g. ``"top left"``."""
        return CELL_NAMES[self.cell]

    def __str__(self) -> str:
        return f"{self.size} {self.colour} {self.shape} at {self.position}"


Scene = tuple[SceneObject, ...]  # canonical order: sorted by (row, col)


def make_scene(objects: Sequence[SceneObject]) -> Scene:
    """Sort objects into canonical order; two objects in one cell is an error."""
    scene = tuple(sorted(objects, key=lambda o: o.cell))
    for a, b in zip(scene, scene[1:]):
        if a.cell == b.cell:
            raise ValueError(f"two objects share the {a.position} cell: {a} / {b}")
    return scene


# --------------------------------------------------------------------------------------
# Words -> attributes (shared by hold-out specs here and the caption parser in vqgen.eval)
# --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9']+|[;.,!?()]")


def tokenize(text: str) -> list[str]:
    """Lower-case words and the punctuation that separates phrases (``; . , ! ? ( )``).

    Hyphens split words ("top-left" = "top left"); colons and quotes are dropped.
    """
    tokens = (t.strip("'") for t in _TOKEN.findall(text.lower().replace("-", " ")))
    return [t for t in tokens if t]


def unknown_words(words: Sequence[str]) -> list[str]:
    """Words that are neither vocabulary nor filler, in order of first appearance."""
    seen = dict.fromkeys(w for w in words if w[0].isalnum() and w not in LEXICON and w not in FILLER_WORDS)
    return list(seen)


def read_attributes(words: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Attribute values named by ``words``: ``({"shape": ..., "colour": ..., "size": ...,
    "cell": (row, col)}, conflicts)``; attributes not named are absent.

    ``conflicts`` lists human-readable clashes such as ``"sizes 'big' and 'small'"``.
    Unknown words must be checked first with :func:`unknown_words`.
    """
    found: dict[str, dict[Any, str]] = {}  # attribute -> {value: first word naming it}
    for w in words:
        if w in LEXICON:
            attribute, value = LEXICON[w]
            found.setdefault(attribute, {}).setdefault(value, w)
    plural = {"shape": "shapes", "colour": "colours", "size": "sizes", "vertical": "rows", "horizontal": "columns"}
    conflicts = [
        f"{plural[a]} " + " and ".join(f"'{w}'" for w in values.values())
        for a, values in found.items()
        if len(values) > 1
    ]
    first = {a: next(iter(values)) for a, values in found.items()}
    attrs = {a: first[a] for a in ("shape", "colour", "size") if a in first}
    if first.keys() & {"vertical", "horizontal", "centre"}:
        # an axis without a word is the middle one: "top" = top middle, "center" = (1, 1)
        attrs["cell"] = (first.get("vertical", 1), first.get("horizontal", 1))
    return attrs, conflicts


@dataclass(frozen=True)
class HoldoutSpec:
    """An attribute combination; ``None`` fields are unconstrained."""

    text: str = field(compare=False)  # as written, for messages
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.colour is None or obj.colour == self.colour)
            and (self.size is None or obj.size == self.size)
            and (self.cell is None or obj.cell == self.cell)
        )


def parse_holdout(spec: str) -> HoldoutSpec:
    """``"red top left"`` -> ``HoldoutSpec(colour="red", cell=(0, 0))``; any subset of
    shape / colour / size / position words, with the caption synonyms."""
    words = tokenize(spec)
    unknown = unknown_words(words)
    if unknown:
        known = ", ".join(sorted(LEXICON))
        raise ValueError(
            f"holdout spec {spec!r}: unknown words {', '.join(map(repr, unknown))}; "
            f"use shape, colour, size and position words: {known}"
        )
    attrs, conflicts = read_attributes(words)
    if conflicts:
        raise ValueError(f"holdout spec {spec!r} names two {'; '.join(conflicts)}; split it into two specs")
    if not attrs:
        raise ValueError(f"holdout spec {spec!r} names no attribute; give e.g. 'green triangle' or 'center'")
    return HoldoutSpec(text=spec, **attrs)


# --------------------------------------------------------------------------------------
# Sampling scenes
# --------------------------------------------------------------------------------------

ALL_OBJECTS: tuple[SceneObject, ...] = tuple(
    SceneObject(shape, colour, size, row, col)
    for shape in SHAPES
    for colour in COLOURS
    for size in SIZES
    for row in range(GRID)
    for col in range(GRID)
)
SPLITS = ("train", "holdout")


@lru_cache(maxsize=64)
def _pools(holdout: tuple[str, ...], split: str) -> tuple[tuple[SceneObject, ...], tuple[SceneObject, ...]]:
    """(pool of the first object, pool of the others) for a split under hold-out specs."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    specs = [parse_holdout(s) for s in holdout]
    held = [any(s.matches(o) for s in specs) for o in ALL_OBJECTS]
    if split == "holdout":
        if not specs:
            raise ValueError("split 'holdout' needs at least one holdout spec (e.g. holdout=['green triangle'])")
        # one held-out object guaranteed, the others anything
        return tuple(o for o, h in zip(ALL_OBJECTS, held) if h), ALL_OBJECTS
    allowed = tuple(o for o, h in zip(ALL_OBJECTS, held) if not h)
    return allowed, allowed


def sample_scene(
    rng: random.Random,
    min_objects: int = 1,
    max_objects: int = 2,
    holdout: Sequence[str] = (),
    split: str = "train",
) -> Scene:
    """Draw a scene: ``min_objects..max_objects`` objects, uniform over the allowed
    (shape, colour, size, cell) combinations, in distinct cells.

    ``split="train"`` never yields an object matching a ``holdout`` spec;
    ``split="holdout"`` always yields at least one.
    """
    if not 1 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(
            f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) <= {GRID * GRID}"
        )
    first_pool, pool = _pools(tuple(holdout), split)
    cells = {o.cell for o in pool}
    if not first_pool or len(cells) < max_objects:
        raise ValueError(
            f"holdout {list(holdout)} leaves the {split!r} split too few cells ({len(cells)}) "
            f"for {max_objects} objects; hold out fewer combinations or lower max_objects"
        )
    objects = [rng.choice(first_pool)]
    for _ in range(rng.randint(min_objects, max_objects) - 1):
        used = {o.cell for o in objects}
        objects.append(rng.choice([o for o in pool if o.cell not in used]))
    return make_scene(objects)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _outline(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) with half-extent ``half`` (pixels)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        return list(zip(cx + half * np.cos(t), cy + half * np.sin(t)))
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":  # apex up; its bounding box and its centroid straddle the centre
        return [(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, fill: Any) -> None:
    """Draw ``obj`` on a canvas of ``side`` x ``side`` pixels (the supersampled one)."""
    cell = side / GRID
    cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
    draw.polygon(_outline(obj.shape, cx, cy, SIZE_FRACTION[obj.size] * cell / 2), fill=fill)


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < 24:
        raise ValueError(f"resolution must be an integer >= 24 pixels, got {resolution!r}")


def render_scene(scene: Scene, resolution: int = 32) -> Image.Image:
    """The scene as an antialiased RGB image of ``resolution`` x ``resolution`` pixels."""
    _check_resolution(resolution)
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        _draw_object(draw, obj, side, COLOURS[obj.colour])
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def render_mask(obj: SceneObject, resolution: int) -> np.ndarray:
    """Coverage of ``obj`` in [0, 1], float32 [R, R]: the renderer's own antialiased
    template, which the scene checker matches against."""
    _check_resolution(resolution)
    side = resolution * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    _draw_object(ImageDraw.Draw(mask), obj, side, 255)
    return np.asarray(mask.resize((resolution, resolution), Image.Resampling.BOX), np.float32) / 255


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32))  # [H, W, 3]
    return rearrange(pixels, "h w c -> c h w") / 127.5 - 1


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

# Position phrases per cell: bare names (for "top left: ...", "the top left has ...") and
# the prepositions that read naturally before each.
_POSITION_NAMES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("top left", "upper left", "top-left", "top left corner", "upper left corner"),
    (0, 1): ("top", "top center", "top middle", "upper middle", "top centre"),
    (0, 2): ("top right", "upper right", "top-right", "top right corner", "upper right corner"),
    (1, 0): ("left", "middle left", "center left", "left side", "left edge"),
    (1, 1): ("center", "middle", "centre", "center of the image", "middle of the picture"),
    (1, 2): ("right", "middle right", "center right", "right side", "right edge"),
    (2, 0): ("bottom left", "lower left", "bottom-left", "bottom left corner", "lower left corner"),
    (2, 1): ("bottom", "bottom center", "bottom middle", "lower middle", "bottom centre"),
    (2, 2): ("bottom right", "lower right", "bottom-right", "bottom right corner", "lower right corner"),
}


# The prepositions before a bare position name: "at the top", "on the left side", "in the centre".
_PREPOSITIONS: dict[str, tuple[str, ...]] = {"row": ("at",), "side": ("on", "at"), "area": ("in", "at")}


def _where(name: str, rng: random.Random) -> str:
    """A prepositional phrase for a bare position name: "at the top", "on the left side"."""
    if name in ("top", "bottom"):
        return f"{_PREPOSITIONS['row'][0]} the {name}"  # no draw: the only choice
    kind = "side" if name.split()[0] in ("left", "right") else "area"
    return f"{rng.choice(_PREPOSITIONS[kind])} the {name}"

# Caption families. ``train`` is the wording of every dataset caption; ``other`` describes the
# same scenes with the same attribute and position words, in attribute orders and with
# connectives the training captions never use, to measure how much of a model's adherence is
# tied to the training wording. The families are disjoint: every ``other`` phrase template has
# a word no ``train`` caption can contain (``family_words`` lists each family's words, and a
# test checks the templates against them).
FAMILIES: tuple[str, ...] = ("train", "other")

# One object's phrase; fields: {a} article for the next word, {size} {colour} {shape}
# {where} (prepositional phrase), {name} (bare position name) and the family's own
# connective words (``CONNECTIVES``). Templates whose text has a comma are only joined with
# hard separators ("; ", " and ", sentences; " plus ") so that commas never have to
# separate objects in the same caption.
PHRASE_TEMPLATES: tuple[str, ...] = (
    "{a} {size} {colour} {shape} {where}",  # a large red circle in the top left
    "{name}: {a} {size} {colour} {shape}",  # top left: a big red circle
    "there is {a} {colour} {shape}, {size}, {where}",  # there is a red circle, large, at ...
    "{where}, {a} {size} {colour} {shape}",  # in the upper left, a tiny blue square
    "{a} {size} {shape} in {colour} {where}",  # a big circle in red at the bottom
    "the {name} {has} {a} {size} {colour} {shape}",  # the top left has a big red circle
    "{a} {size}, {colour} {shape} {where}",  # a small, blue square at the bottom
)
# The other family: the attribute orders the training family never uses (colour before size,
# shape first) and its own verbs, participles and joiners.
OTHER_PHRASE_TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {size} {shape} {placed} {where}",  # a red big circle placed at the top left
    "{where} {sits} {a} {colour} {size} {shape}",  # in the upper left sits a blue tiny square
    "{a} {shape} {coloured} {colour}, {size}, {where}",  # a circle coloured red, large, at the top
    "{a} {shape}, {size} {colour}, {placed} {where}",  # a circle, big red, located in the center
    "{a} {shape} {where}, {coloured} {colour}, {size}",  # a disc on the left, colored blue, small
)
TEMPLATES: dict[str, tuple[str, ...]] = {"train": PHRASE_TEMPLATES, "other": OTHER_PHRASE_TEMPLATES}
# Attribute orders for caption augmentation (``data.caption_attribute_orders``): the places
# around the shape noun that ``PHRASE_TEMPLATES`` never give the size and colour words, said
# with the training family's own words ("in" before a colour, commas around a size). Augmented
# wordings drawn from both lists show every order of the two adjectives and of adjective and
# noun, so that order carries no meaning; the dataset's captions stay as they are, and the
# ``other`` family keeps the verbs, participles and joiners training never sees.
ORDER_TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {size} {shape} {where}",  # a red large circle at the top
    "{a} {shape} in {colour}, {size}, {where}",  # a circle in red, large, at the top
    "{a} {shape}, {size}, in {colour} {where}",  # a square, tiny, in blue on the left
)
CONNECTIVES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"has": ("has", "holds", "contains", "shows")},
    "other": {
        "placed": ("placed", "located", "positioned", "sitting"),
        "sits": ("sits", "is placed", "is located"),
        "coloured": ("coloured", "colored"),
    },
}
_OPENINGS = ("", "an image of ", "a picture of ", "a drawing of ")
# what each family joins object phrases with (the train family's in ``_join_train``)
JOINERS: dict[str, tuple[str, ...]] = {"train": (" and ", ", and ", ", ", "; ", ". "), "other": (" plus ", ", with ")}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"caption family {family!r} is not one of {list(FAMILIES)}")


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _phrase(obj: SceneObject, template: str, rng: random.Random, family: str = "train") -> str:
    words = {
        "size": rng.choice(SIZE_WORDS[obj.size]),
        "colour": rng.choice(COLOUR_WORDS[obj.colour]),
        "shape": rng.choice(SHAPE_WORDS[obj.shape]),
        "name": rng.choice(_POSITION_NAMES[obj.cell]),
    }
    words |= {slot: rng.choice(choices) for slot, choices in CONNECTIVES[family].items()}
    words["where"] = _where(words["name"], rng)
    # the article agrees with whichever word follows it in this template
    following = template.split("{a} ", 1)[1].split("}", 1)[0].lstrip("{")
    return template.format(a=_article(words[following]), **words)


def _capitalise_maybe(text: str, rng: random.Random) -> str:
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def _join_train(phrases: list[str], templates: list[str], rng: random.Random) -> str:
    """"and", semicolons or sentences; commas only when no phrase has one of its own."""
    joiner = rng.choice(("and", "semicolon", "sentences")) if len(phrases) > 1 else "and"
    if joiner == "sentences":
        return " ".join(p[0].upper() + p[1:] + "." for p in phrases)
    if joiner == "semicolon":
        text = "; ".join(phrases)
    elif len(phrases) <= 2:
        text = " and ".join(phrases)
    elif any("," in p for p in phrases):  # commas already inside phrases: a; b; and c
        text = "; ".join(phrases[:-1]) + "; and " + phrases[-1]
    else:  # a, b and c / a, b, and c
        text = ", ".join(phrases[:-1]) + rng.choice((" and ", ", and ")) + phrases[-1]
    if templates[0].startswith("{a}"):
        text = rng.choice(_OPENINGS) + text
    return _capitalise_maybe(text, rng)


def _join_other(phrases: list[str], templates: list[str], rng: random.Random) -> str:
    """"a plus b plus c", or "a, with b plus c" when no phrase has a comma and the second
    starts with its article (so that "with" reads as English)."""
    with_ok = len(phrases) > 1 and not any("," in p for p in phrases) and templates[1].startswith("{a}")
    if with_ok and rng.random() < 0.5:
        text = phrases[0] + ", with " + " plus ".join(phrases[1:])
    else:
        text = " plus ".join(phrases)
    return _capitalise_maybe(text, rng)


def describe(
    scene: Scene, rng: random.Random, template: int | None = None, family: str = "train", attribute_orders: bool = False
) -> str:
    """A natural-English caption of ``scene`` in caption family ``family`` (see ``FAMILIES``),
    wording chosen by ``rng``.

    Objects are described in random order, each with a random phrase template of the family
    (or ``TEMPLATES[family][template]`` for all of them; with ``attribute_orders``, a training
    family template of ``PHRASE_TEMPLATES + ORDER_TEMPLATES``) and random synonyms, then joined
    with the family's connectives (train: "and", semicolons or separate sentences; other:
    "plus" or "with"); commas join objects only when no phrase has a comma of its own, so a
    comma never leaves it ambiguous where an object ends.
    """
    _check_family(family)
    if not scene:
        raise ValueError("cannot describe an empty scene")
    if attribute_orders and family != "train":
        raise ValueError(f"attribute_orders extends the training family's templates, not family {family!r}'s")
    templates = TEMPLATES[family] + (ORDER_TEMPLATES if attribute_orders else ())
    objects = list(scene)
    rng.shuffle(objects)
    indices = [rng.randrange(len(templates)) if template is None else template for _ in objects]
    chosen = [templates[i] for i in indices]
    phrases = [_phrase(o, t, rng, family) for o, t in zip(objects, chosen)]
    return (_join_train if family == "train" else _join_other)(phrases, chosen, rng)


def family_words(family: str) -> frozenset[str]:
    """Every word (``tokenize``'s tokens) a caption of ``family`` can contain: its templates'
    own words, its connectives, openings and joiners, and the shared attribute, position and
    preposition words. The families' disjointness rests on it (``vqgen.data.shapes`` docs)."""
    _check_family(family)
    templates = TEMPLATES[family] + (ORDER_TEMPLATES if family == "train" else ())
    texts = [re.sub(r"\{[a-z]+\}", " ", t) for t in templates]
    texts += [w for choices in CONNECTIVES[family].values() for w in choices]
    texts += list(JOINERS[family]) + list(_OPENINGS if family == "train" else ())
    texts += [w for table in (SIZE_WORDS, COLOUR_WORDS, SHAPE_WORDS, _POSITION_NAMES) for ws in table.values() for w in ws]
    texts += [*(p for choices in _PREPOSITIONS.values() for p in choices), "the", "a", "an"]
    return frozenset(w for text in texts for w in tokenize(text))


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The private RNG of one sample: independent of access order and of the process."""
    digest = hashlib.blake2b(f"vqgen-shapes/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def wording(scene: Scene, family: str, seed: int, index: int, variant: int = 0, attribute_orders: bool = False) -> str:
    """A caption of ``scene`` in ``family``, a pure function of ``(seed, family, index,
    variant, attribute_orders)``: how evaluation words prompt ``index`` in each family, and how
    training words sample ``index`` again (``variant`` >= 1) under ``data.caption_augmentation``
    (and ``data.caption_attribute_orders``, see ``describe``)."""
    _check_family(family)
    rng = sample_rng(seed, f"wording/{family}/{variant}" + ("/orders" if attribute_orders else ""), index)
    return describe(scene, rng, family=family, attribute_orders=attribute_orders)


class ShapesDataset(Dataset):
    """``num`` captioned-shapes samples; ``ds[i]`` -> ``{"image": float32 [3, R, R] in
    [-1, 1], "caption": str, "scene": Scene}``, a pure function of (seed, split, i)."""

    def __init__(
        self,
        num: int,
        seed: int = 0,
        resolution: int = 32,
        min_objects: int = 1,
        max_objects: int = 2,
        holdout: Sequence[str] = (),
        split: str = "train",
    ) -> None:
        if num < 0:
            raise ValueError(f"ShapesDataset num must be >= 0, got {num}")
        _check_resolution(resolution)
        self.num, self.seed, self.resolution, self.split = num, seed, resolution, split
        self.min_objects, self.max_objects, self.holdout = min_objects, max_objects, tuple(holdout)
        # validate the hold-out specs and object counts now, not at the first __getitem__
        sample_scene(random.Random(0), min_objects, max_objects, self.holdout, split)

    @classmethod
    def from_config(cls, data_cfg: Any, split: str = "train", num: int | None = None) -> ShapesDataset:
        """Build from a ``vqgen.config.DataConfig``; errors name the config key."""
        try:
            return cls(
                num=data_cfg.num if num is None else num,
                seed=data_cfg.seed,
                resolution=data_cfg.resolution,
                min_objects=data_cfg.min_objects,
                max_objects=data_cfg.max_objects,
                holdout=data_cfg.holdout,
                split=split,
            )
        except ValueError as e:
            key = "data.holdout" if "holdout" in str(e) else "data"
            raise ValueError(f"config key '{key}': {e}") from e

    def __len__(self) -> int:
        return self.num

    def scene_and_caption(self, index: int) -> tuple[Scene, str]:
        """The sample's scene and caption without rendering the image."""
        if not 0 <= index < self.num:
            raise IndexError(f"ShapesDataset index {index} out of range for {self.num} samples")
        rng = sample_rng(self.seed, self.split, index)
        scene = sample_scene(rng, self.min_objects, self.max_objects, self.holdout, self.split)
        return scene, describe(scene, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, caption = self.scene_and_caption(index)
        return {"image": to_tensor(render_scene(scene, self.resolution)), "caption": caption, "scene": scene}

    @staticmethod
    def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """DataLoader ``collate_fn``: images stacked to [B, 3, R, R]; captions and scenes
        (which differ in length) kept as lists."""
        return {
            "image": torch.stack([item["image"] for item in batch]),
            "caption": [item["caption"] for item in batch],
            "scene": [item["scene"] for item in batch],
        }

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(num={self.num}, seed={self.seed}, resolution={self.resolution}, "
            f"objects={self.min_objects}..{self.max_objects}, split={self.split!r}, holdout={list(self.holdout)})"
        )
