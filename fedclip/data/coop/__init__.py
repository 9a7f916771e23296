"""The CoOp benchmark: eleven classification data sets and four ImageNet variants, each read
from the on-disk layout of CoOp's DATASETS.md (Zhou et al., "Learning to Prompt for
Vision-Language Models", IJCV 2022; https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md).

`root` is CoOp's `$DATA`; each data set lives in its own folder under it:

    Caltech101      caltech-101/101_ObjectCategories/<class>/*.jpg
    OxfordPets      oxford_pets/images/*.jpg, oxford_pets/annotations/{trainval,test}.txt
    Flowers102      oxford_flowers/jpg/image_NNNNN.jpg, imagelabels.mat, cat_to_name.json
                    (setid.mat optional)
    Food101         food-101/images/<class>/*.jpg (meta/{classes,train,test}.txt optional)
    DTD             dtd/images/<class>/*.jpg (labels/{train1,val1,test1}.txt optional)
    EuroSAT         eurosat/2750/<Class>/*.jpg
    UCF101          ucf101/UCF-101-midframes/<Class_Name>/*.jpg
                    (ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt optional)
    StanfordCars    stanford_cars/{cars_train,cars_test}/*.jpg, devkit/{cars_meta,
                    cars_train_annos}.mat, cars_test_annos_withlabels.mat
    FGVCAircraft    fgvc_aircraft/images/*.jpg, variants.txt, images_variant_{train,val,test}.txt
    SUN397          sun397/SUN397/<letter>/<class>[/<subclass>]/*.jpg
                    (ClassName.txt, Training_01.txt, Testing_01.txt optional)
    ImageNet        imagenet/images/{train,val}/<wnid>/*.JPEG, imagenet/classnames.txt
    ImageNetV2      imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
    ImageNetSketch  imagenet-sketch/images/<wnid>/*.JPEG
    ImageNetA       imagenet-adversarial/imagenet-a/<wnid>/*.jpg
    ImageNetR       imagenet-rendition/imagenet-r/<wnid>/*.jpg

Splits. Where CoOp publishes a fixed split, `split_zhou_<Name>.json` in the data set's folder,
it is used as is: fedclip's train split is CoOp's train and its test split CoOp's test (CoOp's
val, which it uses for model selection, is not read); labels and class names come from the
file. Without it the reader takes the data set's own train/test lists where they exist (the
"optional" files above), and otherwise draws a seeded stratified 80/20 split that is saved as
`split_fedclip_<Class>.json` next to the data and reused (`files.seeded_split`). `key(split)`
names which of these was used, so cached features never mix them. FGVCAircraft and ImageNet
have no CoOp split file: CoOp reads their official lists, as these readers do. ImageNetV2,
-Sketch, -A and -R are for evaluation only (CoOp's domain-generalisation targets): their
train split is empty, and their labels index the ImageNet classes they contain.

Class names are CoOp's readable names with underscores turned into spaces: Caltech-101's
"Faces" is "face", EuroSAT's "AnnualCrop" is "Annual Crop Land", UCF101's "Apply_Eye_Makeup"
is "Apply Eye Makeup", SUN397's "/a/apartment_building/outdoor" is "outdoor apartment building".

Food101, EuroSAT and SUN397 take `download: true`: torchvision's download of these lands in
the layout above. For the others the missing-data error gives the official source.
"""

from fedclip.data.coop.base import _CoOpDataset
from fedclip.data.coop.imagenet import ImageNet, ImageNetA, ImageNetR, ImageNetSketch, ImageNetV2
from fedclip.data.coop.sets import (
    DTD,
    SUN397,
    UCF101,
    Caltech101,
    EuroSAT,
    FGVCAircraft,
    Flowers102,
    Food101,
    OxfordPets,
    StanfordCars,
)

COOP_DATASETS: tuple[type[_CoOpDataset], ...] = (
    Caltech101,
    OxfordPets,
    Flowers102,
    Food101,
    DTD,
    EuroSAT,
    UCF101,
    StanfordCars,
    FGVCAircraft,
    SUN397,
    ImageNet,
    ImageNetV2,
    ImageNetSketch,
    ImageNetA,
    ImageNetR,
)
"""Every reader of this package, in CoOp's order (ImageNet's variants last)."""

__all__ = [
    "COOP_DATASETS",
    "DTD",
    "SUN397",
    "UCF101",
    "Caltech101",
    "EuroSAT",
    "FGVCAircraft",
    "Flowers102",
    "Food101",
    "ImageNet",
    "ImageNetA",
    "ImageNetR",
    "ImageNetSketch",
    "ImageNetV2",
    "OxfordPets",
    "StanfordCars",
]
