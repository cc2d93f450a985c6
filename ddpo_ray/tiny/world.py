"""A procedurally drawn, captioned 64x64 image world: the pretraining data of the `tiny` model.

Each image is a few coloured shapes on a plain or patterned background, drawn from a seed,
with a caption built from what was drawn ("two small red circles on a striped blue
background"). The world is made so that DDPO has something to learn on a CPU:
- JPEG size varies a lot and both ways: plain backgrounds compress to ~1 kB, striped,
  checkered and dotted ones are several times larger; shapes add edges.
- prompts mean something checkable: colour, shape, count, size, position.
- captions are often partial (no background, no size), so a prompt like "a red circle"
  leaves the background to the model: that freedom is what the RL reward can steer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "orange": (245, 135, 30),
    "purple": (140, 60, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (6, 9), "large": (13, 18)}  # radius range in pixels
COUNTS = {1: "a", 2: "two", 3: "three"}
TEXTURES = ("plain", "striped", "checkered", "dotted")
POSITIONS = {  # centre of a single object, as a fraction of the image
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Scene:
    """What one image shows; the caption is derived from it."""

    count: int
    size: str
    colour: str
    shape: str
    background: str
    texture: str
    position: str | None  # single objects only
    centres: tuple[tuple[float, float], ...]  # pixel centres
    radius: float

    def caption(self, with_size: bool = True, with_position: bool = True, with_background: bool = True) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        words = [self.size] if with_size else []
        words += [self.colour, noun]
        words.insert(0, _count_word(self.count, words[0]))
        if with_position and self.position:
            words.append(self.position)
        if with_background:
            words.append(f"on a {self.texture} {self.background} background")
        return " ".join(words)

    def background_caption(self) -> str:
        return f"a {self.texture} {self.background} background"


def _count_word(count: int, next_word: str) -> str:
    if count == 1 and next_word[0] in "aeiou":
        return "an"
    return COUNTS[count]


def object_prompt(count: int, colour: str, shape: str) -> str:
    """A prompt that names the objects only ("two red circles"), leaving the rest open."""
    return f"{_count_word(count, colour)} {colour} {shape}{'s' if count > 1 else ''}"


def random_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.choice(list(COUNTS)))
    size = str(rng.choice(list(SIZES)))
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    background = str(rng.choice([c for c in COLOURS if c != colour]))
    texture = str(rng.choice(TEXTURES))
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high)) if count == 1 else float(rng.uniform(low, high) * 0.8)
    position = None
    if count == 1:
        position = str(rng.choice(list(POSITIONS)))
        fx, fy = POSITIONS[position]
        jitter = rng.uniform(-3, 3, size=2)
        centres = ((fx * IMAGE_SIZE + jitter[0], fy * IMAGE_SIZE + jitter[1]),)
    else:
        centres = _spread_centres(rng, count, radius)
    return Scene(count, size, colour, shape, background, texture, position, centres, radius)


def _spread_centres(rng: np.random.Generator, count: int, radius: float) -> tuple[tuple[float, float], ...]:
    """Centres inside the image that overlap little (best of a few random tries)."""
    margin = radius + 1
    best, best_gap = None, -1.0
    for _ in range(20):
        pts = rng.uniform(margin, IMAGE_SIZE - margin, size=(count, 2))
        gaps = [np.linalg.norm(pts[i] - pts[j]) for i in range(count) for j in range(i + 1, count)]
        if min(gaps) > best_gap:
            best, best_gap = pts, min(gaps)
        if best_gap > 2 * radius + 2:
            break
    return tuple((float(x), float(y)) for x, y in best)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """A second tone for patterns: darker for light colours, lighter for dark ones."""
    if sum(rgb) > 3 * 128:
        return tuple(int(c * factor) for c in rgb)
    return tuple(int(c + (255 - c) * (1 - factor)) for c in rgb)


def _draw_background(draw: ImageDraw.ImageDraw, scene: Scene, rng: np.random.Generator) -> None:
    base = COLOURS[scene.background]
    draw.rectangle([0, 0, IMAGE_SIZE, IMAGE_SIZE], fill=base)
    if scene.texture == "plain":
        return
    other = _shade(base, 0.55)
    if scene.texture == "striped":
        width = int(rng.choice([3, 4, 6]))
        vertical = bool(rng.integers(2))
        for start in range(0, IMAGE_SIZE, 2 * width):
            box = [start, 0, start + width - 1, IMAGE_SIZE] if vertical else [0, start, IMAGE_SIZE, start + width - 1]
            draw.rectangle(box, fill=other)
    elif scene.texture == "checkered":
        cell = int(rng.choice([4, 8]))
        for y in range(0, IMAGE_SIZE, cell):
            for x in range(0, IMAGE_SIZE, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=other)
    elif scene.texture == "dotted":
        step = int(rng.choice([6, 8]))
        for y in range(step // 2, IMAGE_SIZE, step):
            for x in range(step // 2, IMAGE_SIZE, step):
                draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=other)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:
        raise ValueError(f"shape={shape!r}; expected one of {SHAPES}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The (64, 64, 3) uint8 image of `scene` (rng varies pattern sizes)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, scene, rng)
    for cx, cy in scene.centres:
        _draw_shape(draw, scene.shape, cx, cy, scene.radius, COLOURS[scene.colour])
    return np.asarray(image, dtype=np.uint8)


def object_mask(scene: Scene) -> np.ndarray:
    """(64, 64) bool: the pixels `render` paints in the objects' colour (a segmentation target)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(mask)
    for cx, cy in scene.centres:
        _draw_shape(draw, scene.shape, cx, cy, scene.radius, 255)
    return np.asarray(mask) > 127


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A full or partial caption, the mix the text-to-image model is trained on.

    Partial captions teach the model to fill in what the prompt leaves open; the empty
    caption (10%) trains the unconditional branch classifier-free guidance needs.
    """
    u = rng.uniform()
    if u < 0.10:
        return ""
    if u < 0.15:
        return scene.background_caption()
    return scene.caption(
        with_size=bool(rng.uniform() < 0.6),
        with_position=bool(rng.uniform() < 0.6),
        with_background=bool(rng.uniform() < 0.5),
    )


def make_batch(rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, list[Scene]]:
    """`batch_size` random images (N, 64, 64, 3) uint8 and their scenes."""
    scenes = [random_scene(rng) for _ in range(batch_size)]
    images = np.stack([render(scene, rng) for scene in scenes])
    return images, scenes


# --- reading captions back: the attributes a tiny-world caption or prompt names ----------------

ATTRIBUTES: dict[str, tuple] = {
    "count": tuple(COUNTS),
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS) + ("none",),  # "none": several objects, no position
    "background": tuple(COLOURS),
    "texture": TEXTURES,
}
_COUNT_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3}


def scene_attributes(scene: Scene) -> dict[str, object]:
    """Every attribute of `scene`, as `ATTRIBUTES` names them."""
    return {
        "count": scene.count, "size": scene.size, "colour": scene.colour, "shape": scene.shape,
        "position": scene.position or "none", "background": scene.background, "texture": scene.texture,
    }


def parse_caption(text: str) -> dict[str, object]:
    """The attributes a caption or prompt of this world names: {"count": 2, "colour": "red", ...}.

    The inverse of `Scene.caption`, `object_prompt` and `background_caption` (any of their
    partial forms); an attribute the text leaves open is absent. Text outside the world's
    grammar raises ValueError naming it.
    """
    words = text.lower().strip().rstrip(".").split()
    named: dict[str, object] = {}
    if len(words) >= 4 and words[-1] == "background" and words[-4] == "a":
        *head, texture, background, _ = words
        if texture not in TEXTURES or background not in COLOURS:
            raise ValueError(f"caption {text!r}: expected '<texture> <colour> background' at its end")
        named["texture"], named["background"] = texture, background
        words = head[:-2] if head[-2:] == ["on", "a"] else head[:-1]  # "on a ..." or a lone "a ..."
    for phrase in POSITIONS:
        if " ".join(words[-len(phrase.split()):]) == phrase:
            named["position"] = phrase
            words = words[: -len(phrase.split())]
            break
    if not words:
        if "background" not in named:
            raise ValueError(f"caption {text!r} names nothing of the tiny world")
        return named
    if words[0] not in _COUNT_WORDS or len(words) not in (3, 4):
        raise ValueError(
            f"caption {text!r}: expected '<a|an|two|three> [small|large] <colour> <shape>' "
            f"with a colour from {list(COLOURS)} and a shape from {list(SHAPES)}"
        )
    named["count"] = _COUNT_WORDS[words[0]]
    if len(words) == 4:
        named["size"] = words[1]
    colour, noun = words[-2], words[-1]
    shape = noun[:-1] if named["count"] > 1 and noun.endswith("s") else noun
    if named.get("size", "small") not in SIZES or colour not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"caption {text!r}: expected '<a|an|two|three> [small|large] <colour> <shape>' "
            f"with a colour from {list(COLOURS)} and a shape from {list(SHAPES)}"
        )
    named["colour"], named["shape"] = colour, shape
    return named
