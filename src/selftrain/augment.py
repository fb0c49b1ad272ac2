"""Augmentation strengths S1-S4 of Zoph et al. 2020, applied to whole batches.

=========  ==========================================================================
strength   what it does (Zoph et al. 2020, §3.1)
=========  ==========================================================================
none       nothing
S1         horizontal flip + crop by small translation/scale jitter (0.9-1.1)
S2         S1 + AutoAugment (ImageNet policy)
S3         flip + large scale jitter (0.5-2.0) + AutoAugment
S4         flip + large scale jitter (0.5-2.0) + RandAugment (2 ops, magnitude 10)
=========  ==========================================================================

RandAugment uses the operations of Cubuk et al. 2020 (:data:`RANDAUGMENT_OPS`). kornia's
default list adds ``invert`` and ``solarize_add``, and we also leave out ``solarize``: on
dark-background images (Fashion-MNIST, MNIST) these flip most pixels, and with them a
student at 800 steps lost 3.5 points of accuracy instead of gaining (measured, 1% labels).

Why batches, and why kornia: per-sample torchvision v2 pipelines cost 170 us (S1) to 900 us
(S4) per 28 px image on one CPU core, more than the training step itself; kornia draws
independent parameters for every sample of a batch and applies them in a few vectorized
ops (20 us/image for S1). Geometric ops are one affine warp, so the same parameters can be
applied to dense targets (masks, depth, keypoints); the colour operations of the policies
touch the image only. ``scale_range`` replaces a strength's scale jitter, e.g. 0.1-2.0 for the
large scale jitter of Ghiasi et al. 2021. Grayscale images go through colour policies as
three equal channels and come back as their mean.

Dense targets (:meth:`BatchAugment.forward_dense`, :func:`warp_targets`) follow the image
through the per-sample matrices that kornia records while warping it (flip + affine jitter,
then the rotate/shear/translate operations inside AutoAugment/RandAugment, whose colour
operations leave the targets alone). Each of those is a separate warp that pads with zeros,
so the targets go through them step by step: whatever one warp pushed out of the image is gone
for the later ones, as it is for the image. kornia's own ``AugmentationSequential(data_keys=...)`` is
not used for them: in kornia 0.9 it takes no per-sample lists of boxes with different counts,
fills masks with 0 (a class) outside the image, and neither drops degenerate boxes nor hides
keypoints that leave the image. Maps are warped with nearest sampling, so a mask keeps its
classes and a depth map its ``0`` = no value (bilinear sampling would blend a hole's 0 into its
neighbours and invent depths); pixels coming from outside the image become
:data:`~selftrain.data.targets.IGNORE_INDEX` in masks and 0 in depth. Depth values are not
rescaled with the image (a zoom is read as a focal-length change, not as the camera moving).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from selftrain.config import AUGMENT_STRENGTHS
from selftrain.data.targets import IGNORE_INDEX, TARGET_KEYS

Targets = list[dict[str, torch.Tensor]]


RANDAUGMENT_OPS = [
    [("auto_contrast", 0, 1)], [("equalize", 0, 1)], [("rotate", -30.0, 30.0)], [("posterize", 4.0, 8.0)],
    [("color", 0.1, 1.9)], [("contrast", 0.1, 1.9)], [("brightness", 0.1, 1.9)], [("sharpness", 0.1, 1.9)],
    [("shear_x", -0.3, 0.3)], [("shear_y", -0.3, 0.3)], [("translate_x", -0.1, 0.1)], [("translate_y", -0.1, 0.1)],
]  # fmt: skip


class BatchAugment(nn.Module):
    """Augments a float batch in [0, 1], shape (B, C, H, W), with per-sample random parameters.

    Args:
        strength: One of ``none``, ``S1``-``S4`` (module table).
        scale_range: Overrides the strength's scale jitter ``(low, high)``, e.g. ``(0.1, 2.0)`` for the
            large scale jitter of Ghiasi et al. 2021; ``None`` keeps 0.9-1.1 (S1, S2) or 0.5-2.0 (S3, S4).
    """

    def __init__(self, strength: str, scale_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if strength not in AUGMENT_STRENGTHS:
            raise ValueError(f"unknown augmentation strength {strength!r}; known: {', '.join(AUGMENT_STRENGTHS)}")
        if scale_range is not None:
            if strength == "none":
                raise ValueError("scale_range has no effect with strength 'none'")
            if not 0 < scale_range[0] <= scale_range[1]:
                raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        import kornia.augmentation as K
        from kornia.augmentation.auto import AutoAugment, RandAugment

        self.strength = strength
        self.scale_range = scale_range
        self.geometric: nn.Module | None = None
        self.photometric: nn.Module | None = None
        if strength == "none":
            return
        if strength in ("S1", "S2"):
            translate, scale = (0.125, 0.125), (0.9, 1.1)
        else:  # large scale jitter
            translate, scale = (0.1, 0.1), (0.5, 2.0)
        jitter = K.RandomAffine(degrees=0, translate=translate, scale=scale_range or scale, p=1.0)
        self.geometric = K.AugmentationSequential(K.RandomHorizontalFlip(), jitter)
        if strength in ("S2", "S3"):
            self.photometric = AutoAugment("imagenet")
        elif strength == "S4":
            self.photometric = RandAugment(n=2, m=10, policy=RANDAUGMENT_OPS)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.geometric is not None:
            images = self.geometric(images)
        return self._apply_policy(images)

    @torch.no_grad()
    def forward_dense(
        self,
        images: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        flip_pairs: Sequence[tuple[int, int]] = (),
    ) -> tuple[torch.Tensor, Targets]:
        """Augments images and moves their dense targets with them (see the module docstring).

        The images come out exactly as :meth:`forward` makes them under the same random state.

        Args:
            images: Float batch (B, C, H, W) in [0, 1].
            targets: One dict per image with keys of :mod:`selftrain.data.targets`, in that image's pixels.
            flip_pairs: ``(left, right)`` keypoint indices swapped in every mirrored image, so that a
                "left eye" point stays the left eye; empty when the points have no sides.

        Returns:
            The augmented images and new target dicts (the inputs are not modified).
        """
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} target dicts")
        images, steps = self.forward_with_warps(images)
        if not steps:
            return images, [dict(t) for t in targets]
        return images, warp_targets(targets, steps, (images.shape[-2], images.shape[-1]), flip_pairs)

    @torch.no_grad()
    def forward_with_warps(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Augments images and returns the warps they went through, for :func:`warp_targets`.

        Several sets of targets (e.g. the masks, boxes and points of a multi-task batch) can then
        follow the same images, each with its own flip pairs. No warp (strength ``none``): ``[]``.
        """
        if self.geometric is None:
            return images, []
        images = self.geometric(images)
        steps = [self.geometric.transform_matrix]  # (B, 3, 3); the flip loses no pixel, so flip + affine is one warp
        images = self._apply_policy(images)
        return images, steps + self._policy_steps()

    def _policy_steps(self) -> list[torch.Tensor]:
        """The matrices of the policy operations of the last call, in the order they ran.

        kornia records the chosen sub-policies in ``_params`` (its replay contract) and a matrix per
        operation, the identity for colour operations. Each operation is a warp of its own, which
        pads with zeros, so the targets need the steps one by one, not only their product.
        """
        if self.photometric is None:
            return []
        steps: list[torch.Tensor] = []
        for chosen in self.photometric._params:
            sub_policy = self.photometric.get_submodule(chosen.name)
            for op in chosen.data:
                matrix = sub_policy.get_submodule(op.name).transform_matrix
                if matrix is not None:
                    steps.append(matrix)
        return steps

    def _apply_policy(self, images: torch.Tensor) -> torch.Tensor:
        if self.photometric is None:
            return images
        gray = images.shape[1] == 1
        x = images.expand(-1, 3, -1, -1) if gray else images
        x = self.photometric(x).clamp_(0, 1)
        return x.mean(dim=1, keepdim=True) if gray else x

    def extra_repr(self) -> str:
        return f"strength={self.strength}" + (f", scale_range={self.scale_range}" if self.scale_range else "")


def warp_targets(
    targets: Sequence[dict[str, torch.Tensor]],
    matrices: torch.Tensor | Sequence[torch.Tensor],
    size: tuple[int, int],
    flip_pairs: Sequence[tuple[int, int]] = (),
) -> Targets:
    """Moves each sample's dense targets through the warps its image went through.

    ``mask`` and ``depth`` are sampled once through the product of the warps, with nearest
    sampling; a pixel that any warp brought in from outside its input image becomes
    :data:`~selftrain.data.targets.IGNORE_INDEX` (mask) or 0 (depth), as the image got zeros
    there. ``boxes``: the box's corners are moved through the warps and the new box bounds the
    part still visible, i.e. inside every warp's output (exact, also for rotations after a crop);
    boxes narrower or lower than 1 px are dropped with their ``labels`` and ``scores``.
    ``keypoints``: x, y are moved; a point that leaves the image after any warp gets ``v = 0``;
    in mirrored samples (negative determinant) the ``flip_pairs`` swap places.

    Args:
        targets: One dict per sample (keys of :data:`selftrain.data.targets.TARGET_KEYS`).
        matrices: One (B, 3, 3) input -> output matrix per warp, in the order applied, in kornia's
            convention, which puts pixel ``i``'s centre at coordinate ``i`` (the targets' coordinates put
            its area at ``[i, i + 1)``).
        size: (H, W) of the images, the same before and after.
        flip_pairs: ``(left, right)`` keypoint index pairs to swap in mirrored samples.

    Returns:
        New target dicts; tensors not moved are shared with the inputs.
    """
    steps = [matrices] if isinstance(matrices, torch.Tensor) else list(matrices)
    if not steps or any(m.shape != (len(targets), 3, 3) for m in steps):
        raise ValueError(f"need (B, 3, 3) matrices for B = {len(targets)} target dicts, got {[m.shape for m in steps]}")
    identity = torch.eye(3, device=steps[0].device)
    steps = [m.float() for m in steps if not torch.equal(m.float(), identity.expand_as(m))] or [steps[0].float()]
    for t in targets:
        if unknown := sorted(set(t) - set(TARGET_KEYS)):
            raise ValueError(f"cannot move target keys {unknown}; known: {', '.join(TARGET_KEYS)}")
    out = [dict(t) for t in targets]
    size = (int(size[0]), int(size[1]))
    _warp_maps(out, steps, size)
    _warp_boxes(out, steps, size)
    _warp_keypoints(out, steps, size, flip_pairs)
    return out


def _move_points(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Points (N, K, 2) in target coordinates through matrices (N, 3, 3) in kornia's pixel-centre convention."""
    centres = points - 0.5
    return centres @ matrix[:, :2, :2].transpose(1, 2) + matrix[:, None, :2, 2] + 0.5


def _with_owner(targets: Targets, key: str, width: int) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """The samples holding ``key``, their row counts, all rows concatenated (N, width) and each row's sample."""
    which = [i for i, t in enumerate(targets) if key in t]
    rows = [targets[i][key].reshape(-1, width) for i in which]
    counts = [len(r) for r in rows]
    flat = torch.cat(rows).float() if rows else torch.zeros(0, width)
    owner = torch.repeat_interleave(torch.tensor(which, dtype=torch.long), torch.tensor(counts, dtype=torch.long))
    return which, counts, flat, owner.to(flat.device)


def _warp_maps(targets: Targets, steps: list[torch.Tensor], size: tuple[int, int]) -> None:
    from kornia.geometry.transform import warp_affine

    which = [i for i, t in enumerate(targets) if "mask" in t or "depth" in t]
    if not which:
        return
    for i in which:
        for key in ("mask", "depth"):
            if key in targets[i] and tuple(targets[i][key].shape) != size:
                raise ValueError(f"sample {i}: {key} is {tuple(targets[i][key].shape)} but its image is {size}")
    device = next(targets[i][k] for i in which for k in ("mask", "depth") if k in targets[i]).device
    index = torch.tensor(which, device=steps[0].device)
    # Products of the last k warps, k = 1..n: output pixel q shows image content only where every one of
    # them maps q back into the image (elsewhere one of the warps padded with zeros).
    suffixes = [steps[-1][index].to(device)]
    for matrix in reversed(steps[:-1]):
        suffixes.append(suffixes[-1] @ matrix[index].to(device))

    def warp(values: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:  # (n, C, H, W) -> (n, C, H, W)
        return warp_affine(
            values, matrix[:, :2], size, mode="nearest", padding_mode="zeros",
            align_corners=False,  # as kornia's RandomAffine and the policies warp the image
        )  # fmt: skip

    # One warp for mask, depth and the validity of the whole chain; nearest sampling copies class ids and
    # depths, never blends them. A sample without one of the maps carries zeros in its channel.
    stacked = torch.zeros(len(which), 3, *size, device=device)
    stacked[:, 2] = 1
    for j, i in enumerate(which):
        for channel, key in enumerate(("mask", "depth")):
            if key in targets[i]:
                stacked[j, channel] = targets[i][key]
    moved = warp(stacked, suffixes[-1])
    inside = moved[:, 2] > 0
    for matrix in suffixes[:-1]:
        inside &= warp(stacked[:, 2:], matrix)[:, 0] > 0
    for j, i in enumerate(which):
        t = targets[i]
        for channel, (key, fill) in enumerate((("mask", IGNORE_INDEX), ("depth", 0))):
            if key in t:
                t[key] = torch.where(inside[j], moved[j, channel], fill).to(t[key].dtype)


def _warp_boxes(targets: Targets, steps: list[torch.Tensor], size: tuple[int, int]) -> None:
    which, counts, boxes, owner = _with_owner(targets, "boxes", 4)
    for i in which:
        for key in ("labels", "scores"):
            if key in targets[i] and len(targets[i][key]) != len(targets[i]["boxes"]):
                raise ValueError(f"sample {i}: {len(targets[i]['boxes'])} boxes but {len(targets[i][key])} {key}")
    if not len(boxes):  # no sample has a box (e.g. pseudo labels of a weak detector): nothing to move
        return
    height, width = size
    image = torch.tensor([[0.0, 0.0, width, height]], device=boxes.device)
    # The object's box through all warps, and each warp's output image through the warps after it: the
    # object stays visible where all of these overlap (whatever fell outside one output was padded).
    suffix = torch.eye(3, device=boxes.device).expand(len(boxes), 3, 3)
    regions = []
    for matrix in reversed(steps):
        regions.append(_move_points(_corners(image).expand(len(boxes), -1, -1), suffix))
        suffix = suffix @ matrix.to(boxes.device)[owner]
    polygons = torch.stack([_move_points(_corners(boxes), suffix), *regions], dim=1)  # (N, M, 4, 2)
    low, high = _intersection_bounds(polygons)
    # A box under 1 px in width or height is no object any more (also what clean_boxes would refuse).
    keep = ((high - low) >= 1).all(dim=1)
    new = torch.cat([low, high], dim=1)
    for i, box, kept in zip(which, new.split(counts), keep.split(counts)):
        t = targets[i]
        t["boxes"] = box[kept].to(t["boxes"].dtype)
        for key in ("labels", "scores"):
            if key in t:
                t[key] = t[key][kept.to(t[key].device)]


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (N, 4) -> their corners (N, 4, 2), in order around the rectangle."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack([x1, y1, x2, y1, x2, y2, x1, y2], dim=1).reshape(-1, 4, 2)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _intersection_bounds(polygons: torch.Tensor, tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding box of the intersection of M convex quadrilaterals per row, (N, M, 4, 2) -> low, high (N, 2).

    The intersection's vertices are the corners lying in every quadrilateral and the crossings of
    their edges that do; the bounds of those are exact (a rotated object cut by an earlier warp gets
    the box of what is left, not of its whole outline). An empty intersection gives low = high.
    """
    n, m = polygons.shape[:2]
    starts = polygons.reshape(n, 4 * m, 2)
    edges = (polygons.roll(-1, dims=2) - polygons).reshape(n, 4 * m, 2)
    # crossings of every pair of edges: a + t (b - a) = c + u (d - c), 0 <= t, u <= 1
    a, ab, c, cd = starts[:, :, None], edges[:, :, None], starts[:, None], edges[:, None]
    denom = _cross(ab, cd)  # (N, E, E)
    safe = torch.where(denom.abs() > 1e-9, denom, torch.ones_like(denom))
    t, u = _cross(c - a, cd) / safe, _cross(c - a, ab) / safe
    crossing = (denom.abs() > 1e-9) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    points = torch.cat([starts, (a + t[..., None] * ab).reshape(n, -1, 2)], dim=1)  # (N, Q, 2)
    valid = torch.cat([torch.ones(n, 4 * m, dtype=torch.bool, device=points.device), crossing.reshape(n, -1)], 1)
    # inside a convex polygon: on the inner side of all its edges, whichever way round it runs
    area = _cross(edges.reshape(n, m, 4, 2), edges.reshape(n, m, 4, 2).roll(-1, dims=2)).sum(dim=2)  # (N, M)
    turn = torch.where(area < 0, -1.0, 1.0)[:, None, :, None]
    offset = points[:, :, None, None] - polygons[:, None]  # (N, Q, M, 4, 2)
    side = _cross(edges.reshape(n, 1, m, 4, 2), offset) / edges.reshape(n, 1, m, 4, 2).norm(dim=-1).clamp_min(1e-12)
    valid &= (turn * side >= -tol).all(dim=-1).all(dim=-1)
    inf = torch.full_like(points, torch.inf)
    low = torch.where(valid[..., None], points, inf).amin(dim=1)
    high = torch.where(valid[..., None], points, -inf).amax(dim=1)
    empty = ~valid.any(dim=1)
    low, high = low.masked_fill(empty[:, None], 0.0), high.masked_fill(empty[:, None], 0.0)
    return low, high


def _warp_keypoints(
    targets: Targets, steps: list[torch.Tensor], size: tuple[int, int], flip_pairs: Sequence[tuple[int, int]]
) -> None:
    height, width = size
    which, counts, points, owner = _with_owner(targets, "keypoints", 3)
    if not which:
        return
    xy, visibility = points[:, :2], points[:, 2]
    total = torch.eye(3, device=steps[0].device).expand_as(steps[0])
    for matrix in steps:  # a point outside the image after any warp is lost: the image was padded there
        xy = _move_points(xy[:, None], matrix.to(points.device)[owner])[:, 0]  # (N, 2)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        visibility = torch.where(inside, visibility, 0.0)
        total = matrix @ total
    moved = torch.cat([xy, visibility[:, None]], dim=1)
    linear = total[:, :2, :2]
    mirrored = (linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0] < 0).tolist()
    for i, kp in zip(which, moved.split(counts)):
        if flip_pairs and mirrored[i]:
            kp = kp[_flip_permutation(flip_pairs, len(kp))]
        targets[i]["keypoints"] = kp.to(targets[i]["keypoints"].dtype)


def _flip_permutation(flip_pairs: Sequence[tuple[int, int]], n: int) -> list[int]:
    """The point order of a mirrored image: each ``(left, right)`` pair swapped, other points in place."""
    order = list(range(n))
    seen: set[int] = set()
    for left, right in flip_pairs:
        if not (0 <= left < n and 0 <= right < n) or {left, right} & seen:
            raise ValueError(f"flip_pairs {list(flip_pairs)} are no disjoint index pairs of {n} keypoints")
        seen |= {left, right}
        order[left], order[right] = right, left
    return order
