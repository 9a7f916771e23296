"""Shapes: coloured shapes drawn on the fly, the built-in offline data set (and the drawing
code MultiShapes shares)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from fedclip.data.args import integer
from fedclip.data.source import SPLITS, DatasetSource, _check_split, _Transformed
from fedclip.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
    "pink": (240, 125, 185),
    "black": (25, 25, 25),
}


SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")

# Image styles: (weight, RGB) of a colour cast blended into every pixel after drawing.
# "plain" is what the tiny backbone is pre-trained on (fedclip.backbone.tiny); "tungsten" is
# the same scenes under warm indoor light, which the backbone never sees: every colour moves
# towards orange (red looks orange, blue looks grey, pink looks salmon).
STYLES: dict[str, tuple[float, tuple[int, int, int]] | None] = {
    "plain": None,
    "tungsten": (0.3, (255, 150, 40)),
}


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    v = np.arange(2 * points)
    radius = np.where(v % 2 == 0, 1.0, inner)
    angle = np.pi * (v / points - 0.5)  # first point straight up
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)  # (2 * points, 2)


def _cross(half_width: float = 0.3) -> np.ndarray:
    w = half_width
    arm = np.array([(-w, -1.0), (w, -1.0), (w, -w)])  # the top arm and the corner after it
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])  # turns (x, y) into (-y, x)
    return np.concatenate([arm @ np.linalg.matrix_power(quarter, k).T for k in range(4)])  # (12, 2)


_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]),
    "triangle": np.array([(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]),
    "star": _star(),
    "cross": _cross(),
    "diamond": np.array([(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]),
}


def shapes_combination(c: int) -> tuple[str, str]:
    """(colour, shape) of Shapes class c.

    Class c = q * 8 + r has colour r and shape (r + q) mod 7, so classes 0-7 already differ in
    both colour and shape (red circle, green square, blue triangle, yellow star, purple cross,
    orange ring, pink diamond, black circle, red square, ...) and classes 0-55 are all 8 x 7
    combinations, each exactly once.
    """
    colours = list(COLOURS)
    q, r = divmod(c, len(colours))
    return colours[r], SHAPES[(r + q) % len(SHAPES)]


def draw_shape(colour: str, shape: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of a `colour` `shape` on a lightly noisy grey background.

    Size, position, a small rotation and the exact colour come from `rng`.
    """
    s = image_size
    grey = int(rng.integers(185, 236))
    tint = rng.integers(-8, 9, size=3)
    noise = rng.integers(-10, 11, size=(s, s, 3))
    background = np.clip(grey + tint + noise, 0, 255).astype(np.uint8)  # (s, s, 3)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)

    fill = jittered_colour(colour, rng)
    radius = rng.uniform(0.18, 0.32) * s
    cx, cy = rng.uniform(radius, s - radius, size=2)
    paint_shape(draw, shape, (cx - radius, cy - radius, cx + radius, cy + radius), fill, rng)
    return image


def apply_style(image: Image.Image, style: str) -> Image.Image:
    """`image` as seen in `style` (see STYLES): unchanged for "plain"."""
    cast = STYLES[style]
    if cast is None:
        return image
    weight, rgb = cast
    pixels = (1 - weight) * np.asarray(image, dtype=np.float32) + weight * np.array(rgb)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def jittered_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """`colour` with each channel moved by up to +-20, from `rng`."""
    base = np.array(COLOURS[colour])
    return tuple(int(v) for v in np.clip(base + rng.integers(-20, 21, size=3), 0, 255))


def paint_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[float, float, float, float],
    fill: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    """Draw `shape` filling the square `box` (x0, y0, x1, y1); polygons get a slight tilt."""
    x0, y0, x1, _ = box
    radius = (x1 - x0) / 2
    cx, cy = x0 + radius, box[1] + radius
    if shape == "circle":
        draw.ellipse(list(box), fill=fill)
    elif shape == "ring":
        draw.ellipse(list(box), outline=fill, width=max(1, round(0.35 * radius)))
    else:
        # Only a small tilt: a square turned by 45 degrees would be a diamond.
        a = rng.uniform(-0.25, 0.25)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        points = _OUTLINES[shape] @ rot.T * radius + (cx, cy)  # (V, 2)
        draw.polygon(points.ravel().tolist(), fill=fill)


def check_shapes_args(owner: str, num_classes: int, **counts: int) -> None:
    """`ConfigError` naming the argument unless every count is an integer >= 1 and
    num_classes is 1 to the number of colour-shape classes."""
    for arg, value in {"num_classes": num_classes, **counts}.items():
        integer(owner, arg, value, minimum=1)
    max_classes = len(COLOURS) * len(SHAPES)
    if num_classes > max_classes:
        raise ConfigError(f"{owner}: num_classes must be <= {max_classes}, got {num_classes}")


class _ShapesImages(torch.utils.data.Dataset):
    """(PIL image, label) pairs of one Shapes split; images are drawn on access."""

    def __init__(self, source: Shapes, split: str):
        self.num_classes = source.num_classes
        self.image_size = source.image_size
        self.seed = source.seed
        self.style = source.style
        self.split_id = SPLITS.index(split)
        self.length = len(source.labels(split))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        label, k = i % self.num_classes, i // self.num_classes
        # Keyed by (class, k) rather than i: a class's images stay the same when num_classes or
        # the number of images per class changes.
        rng = np.random.default_rng((self.seed, self.split_id, label, k))
        image = draw_shape(*shapes_combination(label), self.image_size, rng)
        return apply_style(image, self.style), label


class Shapes(DatasetSource):
    """Coloured shapes on a noisy background, drawn on the fly; needs no files or internet.

    Class c is a colour-and-shape pair such as "red circle" or "blue triangle" (8 colours x 7
    shapes, interleaved so that the first classes differ in both). Each image has its shape at a
    random size and position with a slight tilt and colour jitter, and is deterministic in
    (seed, split, index). Item i of a split has label i mod num_classes.

    `style` sets the lighting. "plain" (the default) is what fedclip's tiny backbone is
    pre-trained on (`backbone.pretrained: shapes`). "tungsten" is the distribution shift of the
    offline quickstarts: the same scenes under warm indoor light, every pixel blended 30%
    towards orange (255, 150, 40), a look the backbone never saw. Colours drift (red towards
    orange, blue towards grey, pink towards salmon), so zero-shot CLIP names the wrong colours
    (43% mean client accuracy in configs/quickstart.yaml, against about 80% on "plain"). The
    shapes survive and the colours stay distinct from one another, so a context learned on the
    clients' images re-aligns the class texts with them (68% there after 5 rounds).

    Args:
        num_classes: Number of classes, 1 to 56.
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        image_size: Side of the square images in pixels.
        seed: Seed of the drawing; train and test images always differ.
        style: "plain" or "tungsten" (see above); the images differ only by the cast.
    """

    name = "shapes"

    def __init__(
        self,
        num_classes: int = 10,
        train_per_class: int = 32,
        test_per_class: int = 16,
        image_size: int = 64,
        seed: int = 0,
        style: str = "plain",
    ):
        if not isinstance(style, str) or style not in STYLES:
            raise ConfigError(f"Shapes: style must be one of {', '.join(STYLES)}, got {style!r}")
        check_shapes_args(
            "Shapes",
            num_classes=num_classes,
            train_per_class=train_per_class,
            test_per_class=test_per_class,
            image_size=image_size,
        )
        self._num_classes = int(num_classes)
        self.train_per_class = int(train_per_class)
        self.test_per_class = int(test_per_class)
        self.image_size = int(image_size)
        self.seed = integer("Shapes", "seed", seed, minimum=0)
        self.style = style

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def classnames(self) -> list[str]:
        return [" ".join(shapes_combination(c)) for c in range(self._num_classes)]

    def _per_class(self, split: str) -> int:
        _check_split(split)
        return self.train_per_class if split == "train" else self.test_per_class

    @property
    def class_groups(self) -> list[int]:
        """Classes grouped by shape (all the circles, all the squares, ...)."""
        return [SHAPES.index(shapes_combination(c)[1]) for c in range(self._num_classes)]

    def planned_size(self, split: str) -> tuple[int, str]:
        arg = "train_per_class" if split == "train" else "test_per_class"
        return self._num_classes * self._per_class(split), f"{arg}={self._per_class(split)}"

    def planned_pixels(self) -> tuple[int, str]:
        return self.image_size, f"image_size={self.image_size}"

    def labels(self, split: str) -> np.ndarray:
        n = self._num_classes * self._per_class(split)
        return np.arange(n, dtype=np.int64) % self._num_classes

    def dataset(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        _check_split(split)
        return _Transformed(_ShapesImages(self, split), transform)

    def key(self, split: str) -> str:
        return (
            f"shapes-c{self._num_classes}-n{self._per_class(split)}-px{self.image_size}"
            f"-seed{self.seed}{'' if self.style == 'plain' else '-' + self.style}/{split}"
        )
