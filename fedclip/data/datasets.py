"""Classification data sets with a train and a test split.

Every source exposes the same small interface (`DatasetSource`): readable class names for the
text prompts, cheap integer labels for the partitioners (no image decoding), and a
torch `Dataset` of (image, label) pairs for training. Sources are picked in YAML with
`class_path`, so each constructor's arguments are the config keys and its docstring is the help.

- `Shapes`: procedurally drawn coloured shapes; always available, used by the offline quickstarts
  (in its "tungsten" style, a colour cast the tiny backbone is not pre-trained on) and the tests.
- `CIFAR10`, `CIFAR100`: through torchvision, from the published python-pickle batches.

This module gathers them: the contract is in `source`, Shapes in `shapes`, CIFAR in `cifar`.
"""

from fedclip.data.cifar import CIFAR10, CIFAR100
from fedclip.data.shapes import (
    COLOURS,
    SHAPES,
    Shapes,
    check_shapes_args,
    draw_shape,
    jittered_colour,
    paint_shape,
    shapes_combination,
)
from fedclip.data.source import SPLITS, DatasetSource, IndexedSubset, _check_split
from fedclip.errors import DataError

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "COLOURS",
    "SHAPES",
    "SPLITS",
    "DataError",
    "DatasetSource",
    "IndexedSubset",
    "Shapes",
    "_check_split",
    "check_shapes_args",
    "draw_shape",
    "jittered_colour",
    "paint_shape",
    "shapes_combination",
]
