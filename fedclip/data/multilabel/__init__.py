"""Multi-label data sets: every image has a set of classes, scored by mAP.

`MultiLabelSource` extends the `DatasetSource` contract with `targets(split)`, the 0/1 matrix
of which classes each image shows. Partitioners still receive one integer per image:
`labels(split)` is each image's rarest positive class (rarity counted on the train split), so a
Dirichlet partition keyed on it spreads the rare classes as unevenly as the common ones. Images
with no positive class are left out of their split, and how many is logged.

- `MultiShapes`: several coloured shapes per image, drawn on the fly; offline, like `Shapes`.
- `VOC2007`: PASCAL VOC 2007, 20 classes; root/VOCdevkit/VOC2007/ (torchvision can download it).
- `COCO2014`: MS-COCO 2014, 80 classes; root/coco/{train2014,val2014,annotations}/.
- `NUSWIDE`: NUS-WIDE, 81 concepts; root/nus_wide/{Flickr,ImageList,Groundtruth}/.
"""

from fedclip.data.multilabel.base import MultiLabelSource, rarest_labels
from fedclip.data.multilabel.coco import COCO2014
from fedclip.data.multilabel.nuswide import NUSWIDE
from fedclip.data.multilabel.shapes import MultiShapes, draw_shape_into
from fedclip.data.multilabel.voc import VOC2007, VOC_CLASSES

MULTILABEL_DATASETS: tuple[type[MultiLabelSource], ...] = (MultiShapes, VOC2007, COCO2014, NUSWIDE)
"""Every multi-label source of this package."""

__all__ = [
    "COCO2014",
    "MULTILABEL_DATASETS",
    "NUSWIDE",
    "VOC2007",
    "VOC_CLASSES",
    "MultiLabelSource",
    "MultiShapes",
    "draw_shape_into",
    "rarest_labels",
]
