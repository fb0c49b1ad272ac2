"""Data sources, safe image decoding and label-fraction splits.

``build_source(uri)`` opens ``fashion-mnist[:train|:test]``, ``idx:PREFIX`` or
``imagefolder:DIR``; ``scan`` finds unreadable images once, up front;
``labeled_subset`` / ``save_split`` / ``load_split`` fix which samples keep labels.
"""

from selftrain.data.images import decode_image
from selftrain.data.sources import (
    BadImageError,
    DataError,
    ScanResult,
    Source,
    build_source,
    scan,
)
from selftrain.data.splits import labeled_subset, load_split, save_split

__all__ = [
    "BadImageError",
    "DataError",
    "ScanResult",
    "Source",
    "build_source",
    "decode_image",
    "labeled_subset",
    "load_split",
    "save_split",
    "scan",
]
