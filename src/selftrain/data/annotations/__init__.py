"""Annotation readers for the dense tasks: COCO JSON, VOC masks, depth maps and keypoint tables.

URIs (relative paths are relative to the working directory):

- ``coco:ANNOTATIONS.json[?images=DIR]`` -- boxes, labels, a per-pixel class mask and, when a
  category declares keypoints, ``(n, P, 3)`` keypoints aligned with the boxes. ``DIR`` defaults
  to the JSON file's folder.
- ``voc:ROOT[?split=train][&classes=21]`` -- ``ROOT/JPEGImages/NAME.jpg`` with the palette-index
  mask ``ROOT/SegmentationClass/NAME.png``; ``split`` reads ``ROOT/ImageSets/Segmentation/SPLIT.txt``.
- ``depth:ROOT[?scale=1000]`` -- ``ROOT/images/NAME.*`` with ``ROOT/depth/NAME.png`` (16-bit,
  divided by ``scale``: 1000 for millimetres, 256 for KITTI) or ``ROOT/depth/NAME.npy`` (metres).
- ``keypoints:FILE.csv[?images=DIR]`` / ``keypoints:FILE.json[?images=DIR]`` -- one ``(P, 3)``
  set of points per image; ``DIR`` defaults to the file's folder.

``classes`` are always the object classes (box label ``c``); a mask says background with 0, class
``c`` with ``c + 1`` and "no label" with 255, and ``mask_classes`` (``["background", *classes]``)
names its values, which a segmentation run checks. ``labels`` are one image-level class per image
(the largest object) for stratified splits; depth maps have none (``-1``).

Face formats (``pts:``, ``wflw:``, ``aflw3d:``, ``au:``, ``affectnet:`` and LFW pairs files) are
in :mod:`.face_landmarks` and :mod:`.faces`.

Each format has its own module (:mod:`.coco`, :mod:`.voc`, :mod:`.depth`, :mod:`.keypoints`); the
checks, skip records and ``image_size`` geometry they share are in :mod:`.base`.
"""

from selftrain.data.annotations.base import (
    AnnotatedSource,
    logger,
    resize_exact,
    resize_targets,
)
from selftrain.data.annotations.coco import CocoSource, build_coco, rle_string_counts
from selftrain.data.annotations.depth import DepthSource, build_depth
from selftrain.data.annotations.face_landmarks import FaceLandmarkSource, build_aflw3d, build_pts, build_wflw
from selftrain.data.annotations.faces import (
    FaceTableSource, PairSet, PairSource, build_affectnet, build_au, build_lfw_pairs, read_pairs,
)  # fmt: skip
from selftrain.data.annotations.keypoints import KeypointSource, build_keypoints
from selftrain.data.annotations.voc import VOC_CLASSES, VocSource, build_voc

#: Builders of the face schemes, by scheme (``build_source`` dispatches to them).
FACE_BUILDERS = {
    "pts": build_pts, "wflw": build_wflw, "aflw3d": build_aflw3d, "au": build_au, "affectnet": build_affectnet,
    "lfw-pairs": build_lfw_pairs,
}  # fmt: skip

__all__ = [
    "FACE_BUILDERS",
    "FaceLandmarkSource",
    "FaceTableSource",
    "PairSet",
    "PairSource",
    "build_affectnet",
    "build_aflw3d",
    "build_au",
    "build_pts",
    "build_wflw",
    "read_pairs",
    "VOC_CLASSES",
    "AnnotatedSource",
    "CocoSource",
    "DepthSource",
    "KeypointSource",
    "VocSource",
    "build_coco",
    "build_depth",
    "build_keypoints",
    "build_voc",
    "logger",
    "resize_exact",
    "resize_targets",
    "rle_string_counts",
]
