"""Captioned image grids: the PNGs of an epoch's samples and of a held-out evaluation.

Each cell is an image (tiny 64x64 samples are upscaled, nearest, to be seen) over its prompt,
word-wrapped to two lines, and its reward. Written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpo_ray.infra.images import as_image_array
from ddpo_ray.records.files import atomic_write

# Grid layout, in pixels.
MIN_CELL_WIDTH = 128  # tiny 64x64 samples are upscaled (nearest) to at least this width
CAPTION_PADDING = 4
PROMPT_LINES = 2  # prompt lines in a caption; the reward goes on the line below
GRID_GAP = 2
GRID_BACKGROUND = (200, 200, 200)


def write_image_grid(
    path: Path,
    images: np.ndarray | Sequence[Image.Image | np.ndarray],
    prompts: Sequence[str],
    rewards: Sequence[float],
    max_images: int = 16,
    columns: int | None = None,
    prompt_lines: int = PROMPT_LINES,
) -> Path:
    """Write up to `max_images` images as one captioned grid (prompt, then r=reward) to `path`.

    `columns` defaults to a square-ish layout; a prompt wraps to at most `prompt_lines` lines.
    Written atomically; returns `path`.
    """
    array = as_image_array(images)
    n = len(array)
    if isinstance(prompts, str) or len(prompts) != n:
        got = "a single str" if isinstance(prompts, str) else f"{len(prompts)}"
        raise ValueError(f"prompts: expected {n} prompts (one per image), got {got}")
    if len(rewards) != n:
        raise ValueError(f"rewards: expected {n} rewards (one per image), got {len(rewards)}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images: expected a positive integer, got {max_images!r}")

    count = min(n, max_images)
    cols = min(columns, count) if columns else math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    height, width = array.shape[1:3]
    scale = math.ceil(MIN_CELL_WIDTH / width) if width < MIN_CELL_WIDTH else 1
    cell_width, image_height = width * scale, height * scale

    font = ImageFont.load_default()
    line_height = font.getbbox("Agjy|")[3] + 2
    caption_height = 2 * CAPTION_PADDING + (prompt_lines + 1) * line_height
    cell_height = image_height + caption_height
    grid = Image.new(
        "RGB",
        (cols * cell_width + (cols + 1) * GRID_GAP, rows * cell_height + (rows + 1) * GRID_GAP),
        GRID_BACKGROUND,
    )
    draw = ImageDraw.Draw(grid)
    text_width = cell_width - 2 * CAPTION_PADDING
    for i in range(count):
        x = GRID_GAP + (i % cols) * (cell_width + GRID_GAP)
        y = GRID_GAP + (i // cols) * (cell_height + GRID_GAP)
        image = Image.fromarray(array[i])
        if scale > 1:
            image = image.resize((cell_width, image_height), Image.Resampling.NEAREST)
        grid.paste(image, (x, y))
        draw.rectangle([x, y + image_height, x + cell_width - 1, y + cell_height - 1], fill="white")
        prompt = _drawable(str(prompts[i]), font)
        lines = _wrap(prompt, font, text_width, prompt_lines) + ["r=%.3f" % float(rewards[i])]
        for j, text in enumerate(lines):
            draw.text((x + CAPTION_PADDING, y + image_height + CAPTION_PADDING + j * line_height),
                      text, fill="black", font=font)

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """The bitmap fallback font only has Latin-1; FreeType draws anything (missing glyphs as boxes)."""
    text = " ".join(text.split())  # newlines and tabs would break the caption layout
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken; overflow ends in "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = _fitting_prefix(current, font, width)
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _fitting_prefix(text: str, font: Any, width: int) -> int:
    """Length of the longest prefix of `text` that fits in `width` pixels (at least 1)."""
    cut = 1
    while cut < len(text) and font.getlength(text[: cut + 1]) <= width:
        cut += 1
    return cut
