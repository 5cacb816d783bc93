"""Deterministic synthetic captioning data: coloured shapes on simple backgrounds.

The offline `demo` checkpoint is trained on this data, so it has to be

- learnable by a tiny model: a small closed vocabulary, and captions that are a pure
  function of the scene (objects listed in reading order, fixed phrasing per template);
- meaningful to score: each image has five reference captions written with different
  templates and lengths (from ~10 to ~45 words), so BLEU/CIDEr reward getting the
  content right rather than copying one sentence;
- long enough to show speculative decoding: the long templates describe every object
  in its own sentence, which is where self-speculative decoding gains most;
- reproducible anywhere: every example is derived from a hash of (split, index) and
  drawn with PIL primitives only (no fonts), so the same index gives the same pixels
  and captions on every machine (for a given Pillow version).

Splits are disjoint at the level of scenes, not only seeds: each scene's canonical key
(background + objects) is hashed into 100 buckets, and a split only accepts scenes from
its own buckets (train 0-89, validation 90-94, test 95-99). So no test scene (the exact
combination of background and objects) ever appears in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------
# The scene vocabulary. Everything a caption can say comes from these tables.
# ----------------------------------------------------------------------------------

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Canonical resolution: with a patch-8 ViT this is an 8x8 grid of patches and every
# object covers one to three patches in each direction.
DEFAULT_IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

# Saturated colours chosen to stay distinguishable after downsampling to 64x64.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (250, 225, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")

# Object diameter as a fraction of one grid cell (a third of the image side).
_SIZE_FRACTION = {"small": 0.55, "large": 0.85}

# 3x3 grid cells in reading order; (row, col).
CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(3) for c in range(3))

# Two phrasings of each position, so that templates differ from each other.
POSITION_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
POSITION_PHRASES_ALT: dict[tuple[int, int], str] = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "at the left",
    (1, 1): "in the middle",
    (1, 2): "at the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}

COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth")
MAX_OBJECTS = 4
NUM_CAPTIONS = 5

# Split membership by scene-key bucket (out of 100): see the module docstring.
_SPLIT_BUCKETS: dict[str, range] = {
    "train": range(0, 90),
    "validation": range(90, 95),
    "test": range(95, 100),
}

# Bump when the generator changes in a way that changes examples.
GENERATOR_VERSION = "v1"


# ----------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: what the captions say (shape/colour/size/cell) plus render jitter."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    # Render-only nuisance variation (not mentioned in captions), in units of a cell.
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def position(self) -> str:
        return POSITION_PHRASES[(self.row, self.col)]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A full scene. Objects are sorted in reading order of their grid cells."""

    background: str
    texture: str
    objects: tuple[SceneObject, ...]
    # Render-only texture parameters (not mentioned in captions).
    stripe_angle: int = 0  # one of 0, 45, 90, 135 degrees
    pattern_period: float = 0.12  # stripe/dot spacing as a fraction of the image side

    def key(self) -> str:
        """Canonical description of everything captions depend on."""
        objs = "|".join(f"{o.row}{o.col}:{o.size}:{o.colour}:{o.shape}" for o in self.objects)
        return f"{self.background}:{self.texture};{objs}"

    def to_dict(self) -> dict:
        """A JSON-friendly description (the `scene` returned by `make_example`)."""
        return {
            "background": self.background,
            "texture": self.texture,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "row": o.row,
                    "col": o.col,
                    "position": o.position,
                }
                for o in self.objects
            ],
            "key": self.key(),
        }


def _seed(split: str, index: int, attempt: int) -> int:
    # sha256 rather than Python's hash(): stable across processes and machines.
    text = f"fastvlm-synthetic-{GENERATOR_VERSION}/{split}/{index}/{attempt}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % 100


def _pick(rng: random.Random, items: Sequence):
    # Only rng.random() is used: its stream is the one part of `random` that Python
    # guarantees to stay the same across versions (choice/randrange may change).
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


def _sample_scene(rng: random.Random) -> Scene:
    n = 1 + min(int(rng.random() * MAX_OBJECTS), MAX_OBJECTS - 1)
    # Partial Fisher-Yates over the 9 cells: n distinct cells.
    cells = list(CELLS)
    for i in range(n):
        j = i + min(int(rng.random() * (len(cells) - i)), len(cells) - i - 1)
        cells[i], cells[j] = cells[j], cells[i]
    chosen = sorted(cells[:n])  # reading order: captions must not depend on draw order
    objects = []
    for row, col in chosen:
        objects.append(
            SceneObject(
                shape=_pick(rng, SHAPES),
                colour=_pick(rng, COLOUR_NAMES),
                size=_pick(rng, SIZES),
                row=row,
                col=col,
            )
        )
    # The background never shares a colour with an object, so every object is visible.
    used = {o.colour for o in objects}
    background = _pick(rng, [c for c in COLOUR_NAMES if c not in used])
    texture = _pick(rng, TEXTURES)
    return Scene(background=background, texture=texture, objects=tuple(objects))


def _add_jitter(rng: random.Random, scene: Scene) -> Scene:
    objects = tuple(
        dataclasses.replace(
            o,
            dx=(rng.random() - 0.5) * 0.14,
            dy=(rng.random() - 0.5) * 0.14,
            scale=0.92 + 0.12 * rng.random(),
        )
        for o in scene.objects
    )
    return dataclasses.replace(
        scene,
        objects=objects,
        stripe_angle=_pick(rng, (0, 45, 90, 135)),
        pattern_period=0.10 + 0.06 * rng.random(),
    )


def make_scene(split: str, index: int) -> Scene:
    """The scene of example `index` of `split` (pure function of its arguments)."""
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    buckets = _SPLIT_BUCKETS[split]
    attempt = 0
    while True:
        # Rejection sampling on the scene-key bucket keeps splits disjoint; it costs
        # ~20 cheap attempts for the 5% splits and no rendering.
        rng = random.Random(_seed(split, index, attempt))
        scene = _sample_scene(rng)
        if _bucket(scene.key()) in buckets:
            return _add_jitter(rng, scene)
        attempt += 1


# ----------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _full(o: SceneObject) -> str:
    return f"{o.size} {o.colour} {o.shape}"  # sizes start with a consonant: "a ..."


def _background_adjective(scene: Scene) -> str:
    return f"a {scene.texture} {scene.background} background"


def _background_sentence(scene: Scene) -> str:
    if scene.texture == "plain":
        return f"the background is plain {scene.background}."
    pattern = "stripes" if scene.texture == "striped" else "dots"
    return f"the background is {scene.background} with {pattern}."


def _count(n: int, noun: str) -> str:
    return f"{COUNT_WORDS[n]} {noun}" + ("s" if n != 1 else "")


def scene_captions(scene: Scene) -> list[str]:
    """Five reference captions, each from its own template (fully determined by scene).

    0: short list with sizes ("a large red circle and a small blue star on a ...").
    1: long: count sentence, then one sentence per object with its position.
    2: long, position first ("at the top left there is ..."), background last.
    3: shortest: colours and shapes only.
    4: long, ordinal ("the first is a ... in the ..., the second ...").
    """
    objs = scene.objects
    n = len(objs)
    bg = _background_adjective(scene)
    caps = []

    caps.append(f"{_join([f'a {_full(o)}' for o in objs])} on {bg}.")

    verb = "is" if n == 1 else "are"
    sentences = [f"there {verb} {_count(n, 'object')} on {bg}."]
    sentences += [f"a {_full(o)} is {o.position}." for o in objs]
    caps.append(" ".join(sentences))

    sentences = [f"{POSITION_PHRASES_ALT[(o.row, o.col)]} there is a {_full(o)}." for o in objs]
    sentences.append(_background_sentence(scene))
    caps.append(" ".join(sentences))

    plain = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in objs]
    bg_plain = f"{_article(scene.background)} {scene.background} background"
    caps.append(f"a picture of {_join(plain)} on {bg_plain}.")

    sentences = [f"this image shows {_count(n, 'shape')} on {bg}."]
    if n == 1:
        sentences.append(f"it is a {_full(objs[0])} {objs[0].position}.")
    else:
        sentences += [f"the {ORDINALS[i]} is a {_full(o)} {o.position}." for i, o in enumerate(objs)]
    caps.append(" ".join(sentences))
    return caps


def vocabulary() -> list[str]:
    """Every word (punctuation stripped) that any caption can contain, sorted."""
    words: set[str] = set()
    fixed = [
        "a an on and there is are object objects shape shapes background",
        "the with stripes dots plain picture of this image shows it",
        " ".join(TEXTURES),
    ]
    texts = (
        fixed
        + list(SHAPES)
        + list(COLOUR_NAMES)
        + list(SIZES)
        + list(COUNT_WORDS[1:])
        + list(ORDINALS)
        + list(POSITION_PHRASES.values())
        + list(POSITION_PHRASES_ALT.values())
    )
    for text in texts:
        words.update(text.split())
    return sorted(words)


# ----------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------

# Draw at 4x and box-downsample: antialiased edges without depending on PIL's
# (version-dependent) antialiasing of primitives.
_SUPERSAMPLE = 4


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _pattern_colour(background: str) -> tuple[int, int, int]:
    rgb = COLOURS[background]
    # Light backgrounds get darker marks, dark ones lighter marks: visible but subtle.
    if sum(rgb) > 500:
        return _mix(rgb, (0, 0, 0), 0.22)
    return _mix(rgb, (255, 255, 255), 0.3)


def _draw_texture(draw: ImageDraw.ImageDraw, scene: Scene, side: int) -> None:
    if scene.texture == "plain":
        return
    colour = _pattern_colour(scene.background)
    period = scene.pattern_period * side
    if scene.texture == "striped":
        width = max(1, int(round(period * 0.4)))
        # Lines along direction `angle`, stepping across the image along the normal.
        if scene.stripe_angle in (0, 90):
            k = 0.0
            while k < side + period:
                if scene.stripe_angle == 0:
                    draw.line([(0, k), (side, k)], fill=colour, width=width)
                else:
                    draw.line([(k, 0), (k, side)], fill=colour, width=width)
                k += period
        else:
            step = period * 1.4142
            k = -float(side)
            while k < 2 * side:
                if scene.stripe_angle == 45:
                    draw.line([(k, side), (k + side, 0)], fill=colour, width=width)
                else:
                    draw.line([(k, 0), (k + side, side)], fill=colour, width=width)
                k += step
    else:  # dotted
        radius = period * 0.18
        y = period / 2
        row = 0
        while y < side:
            x = period / 2 + (period / 2 if row % 2 else 0.0)
            while x < side:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
                x += period
            y += period
            row += 1


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, side: int) -> None:
    cell = side / 3.0
    cx = (o.col + 0.5 + o.dx) * cell
    cy = (o.row + 0.5 + o.dy) * cell
    r = 0.5 * _SIZE_FRACTION[o.size] * o.scale * cell
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        h = r * 0.85  # same visual weight as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif o.shape == "triangle":
        cy += r * 0.15  # centre of mass, not of the bounding circle
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.95, cy + r * 0.65), (cx - r * 0.95, cy + r * 0.65)],
            fill=fill,
        )
    elif o.shape == "star":
        draw.polygon(_star_points(cx, cy, r * 1.1), fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif o.shape == "cross":
        t = r * 0.36
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Draws `scene` as an RGB image of `image_size` x `image_size` pixels."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, scene, side)
    for o in scene.objects:
        _draw_object(draw, o, side)
    return image.reduce(_SUPERSAMPLE)


# ----------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------


def make_example(split: str, index: int, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[Image.Image, list[str], dict]:
    """Example `index` of `split`: (RGB image, 5 reference captions, scene dict)."""
    scene = make_scene(split, index)
    return render_scene(scene, image_size), scene_captions(scene), scene.to_dict()


def caption_corpus(n: int, split: str = "train") -> list[str]:
    """Exactly `n` caption strings (for tokenizer training), all five templates mixed.

    Takes every caption of scenes 0, 1, 2, ... of `split` until `n` are collected. No
    images are rendered, so this is fast.
    """
    out: list[str] = []
    index = 0
    while len(out) < n:
        out.extend(scene_captions(make_scene(split, index)))
        index += 1
    return out[:n]


def write_example_images(
    out_dir: str,
    n: int = 6,
    split: str = "test",
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> list[str]:
    """Writes `n` example PNGs plus `captions.jsonl` (image, captions) to `out_dir`.

    Images are written at the canonical size: they are exactly what the demo model
    sees, so they can be fed to the captioning CLI as they are.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    lines = []
    for i in range(n):
        image, captions, _ = make_example(split, i, image_size)
        name = f"{split}_{i:04d}.png"
        path = os.path.join(out_dir, name)
        image.save(path, format="PNG", optimize=True)
        paths.append(path)
        lines.append(json.dumps({"image": name, "captions": captions}))
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths
