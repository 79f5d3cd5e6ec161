"""Class lists. The ImageNette / ImageWoof orders are the canonical ones of the IDC /
Minimax evaluation code (label i is the i-th WordNet id): a different order silently
mislabels every image, the most common cause of failed reproductions. The orders are
facts taken from that code; nothing is sorted here.
"""
from __future__ import annotations

from importlib import resources

IMAGENETTE: tuple[str, ...] = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)
IMAGEWOOF: tuple[str, ...] = (
    "n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
    "n02089973", "n02087394", "n02115641", "n02099601", "n02105641",
)

# Human-readable names of the WordNet ids above.
WNID_NAMES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
    "n02096294": "Australian terrier",
    "n02093754": "Border terrier",
    "n02111889": "Samoyed",
    "n02088364": "beagle",
    "n02086240": "Shih-Tzu",
    "n02089973": "English foxhound",
    "n02087394": "Rhodesian ridgeback",
    "n02115641": "dingo",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
}

# ImageNet-1K class index: the rank of a wnid among the 1000 sorted ILSVRC-2012 wnids (the
# label a class-conditional ImageNet model such as DiT expects). The list ships as
# assets/imagenet_wnids.txt, one wnid per line in index order.
IMAGENET_WNIDS: tuple[str, ...] = tuple(
    resources.files("lgd.data").joinpath("assets", "imagenet_wnids.txt").read_text().split()
)
IMAGENET_INDEX: dict[str, int] = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
