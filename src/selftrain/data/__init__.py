"""Data sources, safe image decoding and label-fraction splits.

``build_source(uri)`` opens ``fashion-mnist[:train|:test]``, ``idx:PREFIX``,
``imagefolder:DIR`` or a generated scene set ``scenes:train|test[?n=...]`` (a
:class:`SceneSource` with boxes, class masks and layer depth); ``scan`` finds
unreadable images once, up front;
``labeled_subset`` / ``save_split`` / ``load_split`` fix which samples keep labels.
"""

from selftrain.data.annotations import (
    CocoSource,
    DepthSource,
    KeypointSource,
    VocSource,
)
from selftrain.data.images import decode_image
from selftrain.data.scenes import SCENE_CLASSES, SceneConfig, SceneSource
from selftrain.data.sources import (
    BadImageError,
    DataError,
    ScanResult,
    Source,
    build_source,
    scan,
)
from selftrain.data.splits import kshot_subset, labeled_subset, load_split, save_split

__all__ = [
    "SCENE_CLASSES",
    "BadImageError",
    "CocoSource",
    "DataError",
    "DepthSource",
    "KeypointSource",
    "ScanResult",
    "SceneConfig",
    "SceneSource",
    "Source",
    "VocSource",
    "build_source",
    "decode_image",
    "kshot_subset",
    "labeled_subset",
    "load_split",
    "save_split",
    "scan",
]
