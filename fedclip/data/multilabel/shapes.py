"""MultiShapes: the built-in offline multi-label data set, drawn on the fly."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from fedclip.data.args import integer
from fedclip.data.multilabel.base import MultiLabelSource
from fedclip.data.shapes import (
    SHAPES,
    check_shapes_args,
    jittered_colour,
    paint_shape,
    shapes_combination,
)
from fedclip.data.source import SPLITS, _check_split
from fedclip.errors import ConfigError


def draw_shape_into(
    image: Image.Image,
    colour: str,
    shape: str,
    box: tuple[float, float, float, float],
    rng: np.random.Generator,
) -> None:
    """Draw a `colour` `shape` into `image`, filling the square `box` (x0, y0, x1, y1).

    As in `Shapes`: the exact colour is jittered and polygons get a slight tilt, from `rng`.
    """
    paint_shape(ImageDraw.Draw(image), shape, box, jittered_colour(colour, rng), rng)


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Shapes' lightly noisy grey background."""
    grey = int(rng.integers(185, 236))
    tint = rng.integers(-8, 9, size=3)
    noise = rng.integers(-10, 11, size=(size, size, 3))
    return Image.fromarray(np.clip(grey + tint + noise, 0, 255).astype(np.uint8), "RGB")


class MultiShapes(MultiLabelSource):
    """Several coloured shapes per image, drawn on the fly; needs no files or internet.

    The multi-label version of `Shapes`, with the same classes ("red circle", "green square",
    ...). Image i shows 1 to max_objects distinct classes, each at a random smaller size and
    position inside its own cell of a grid (so objects do not overlap), on Shapes' noisy grey
    background. Everything is deterministic in (seed, split, index); which classes an image
    shows comes first out of its generator, so `targets` never draws pixels.

    Args:
        num_classes: Number of classes, 1 to 56.
        train_images: Images in the train split.
        test_images: Images in the test split.
        image_size: Side of the square images in pixels.
        max_objects: Most classes in one image (each image has 1 to max_objects, uniformly);
            at most num_classes.
        seed: Seed of the drawing; train and test images always differ.
    """

    name = "multishapes"
    title = "MultiShapes"

    def __init__(
        self,
        num_classes: int = 10,
        train_images: int = 400,
        test_images: int = 200,
        image_size: int = 64,
        max_objects: int = 3,
        seed: int = 0,
    ):
        super().__init__()
        check_shapes_args(
            "MultiShapes",
            num_classes=num_classes,
            train_images=train_images,
            test_images=test_images,
            image_size=image_size,
            max_objects=max_objects,
        )
        if max_objects > num_classes:
            raise ConfigError(
                f"MultiShapes: max_objects must be <= num_classes ({num_classes}), "
                f"got {max_objects}"
            )
        self._num_classes = int(num_classes)
        self.train_images = int(train_images)
        self.test_images = int(test_images)
        self.image_size = int(image_size)
        self.max_objects = int(max_objects)
        self.seed = integer("MultiShapes", "seed", seed, minimum=0)
        self.grid = math.ceil(math.sqrt(max_objects))  # cells per side, one object per cell

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def classnames(self) -> list[str]:
        return [" ".join(shapes_combination(c)) for c in range(self._num_classes)]

    @property
    def class_groups(self) -> list[int]:
        """Classes grouped by shape, as in `Shapes`."""
        return [SHAPES.index(shapes_combination(c)[1]) for c in range(self._num_classes)]

    def planned_size(self, split: str) -> tuple[int, str]:
        _check_split(split)
        arg = f"{split}_images"
        return getattr(self, arg), f"{arg}={getattr(self, arg)}"

    def planned_pixels(self) -> tuple[int, str]:
        return self.image_size, f"image_size={self.image_size}"

    def _scene(self, split: str, i: int) -> tuple[np.ndarray, np.random.Generator]:
        """The classes of image i in drawing order, and its generator, positioned to draw."""
        rng = np.random.default_rng((self.seed, SPLITS.index(split), i))
        k = int(rng.integers(1, self.max_objects + 1))
        return rng.choice(self._num_classes, size=k, replace=False), rng

    def _read(self, split: str) -> tuple[list[int], np.ndarray]:
        n = self.train_images if split == "train" else self.test_images
        targets = np.zeros((n, self._num_classes), dtype=np.uint8)
        for i in range(n):
            targets[i, self._scene(split, i)[0]] = 1
        return list(range(n)), targets

    def _image(self, split: str, ref: int) -> Image.Image:
        classes, rng = self._scene(split, ref)
        s = self.image_size
        image = _background(s, rng)
        cell = s / self.grid
        cells = rng.choice(self.grid * self.grid, size=len(classes), replace=False)
        for c, where in zip(classes.tolist(), cells.tolist(), strict=True):
            row, col = divmod(where, self.grid)
            radius = rng.uniform(0.3, 0.45) * cell
            cx = rng.uniform(col * cell + radius, (col + 1) * cell - radius)
            cy = rng.uniform(row * cell + radius, (row + 1) * cell - radius)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            draw_shape_into(image, *shapes_combination(c), box, rng)
        return image

    def key(self, split: str) -> str:
        _check_split(split)
        n = self.train_images if split == "train" else self.test_images
        return (
            f"multishapes-c{self._num_classes}-n{n}-px{self.image_size}-k{self.max_objects}"
            f"-seed{self.seed}/{split}"
        )
