"""Dense targets move with their images: masks, depth, boxes and keypoints stay aligned."""

import pytest
import torch

from selftrain.augment import BatchAugment, warp_targets
from selftrain.data.targets import IGNORE_INDEX

H = W = 96
RECTS = {1: (10, 12, 42, 40), 2: (50, 46, 86, 82)}  # class -> x1, y1, x2, y2 in pixel edges
DEPTH = {1: 3.0, 2: 5.0}
BACKGROUND, OBJECT = 0.25, 1.0  # outside the image kornia pads with 0, darker than both
# Per rectangle: centre, then corners 2 px inside (top-left, top-right, bottom-left, bottom-right).
KP_CLASS = [1] * 5 + [2] * 5
CENTRES = [0, 5]
FLIP_PAIRS = [(1, 2), (3, 4), (6, 7), (8, 9)]


def _scene(batch: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Bright rectangles on a grey canvas; mask = class, depth = constant, box and keypoints per rectangle."""
    image = torch.full((batch, 1, H, W), BACKGROUND)
    mask = torch.zeros(H, W, dtype=torch.int64)
    depth = torch.zeros(H, W)
    points = []
    for cls, (x1, y1, x2, y2) in RECTS.items():
        image[:, :, y1:y2, x1:x2] = OBJECT
        mask[y1:y2, x1:x2] = cls
        depth[y1:y2, x1:x2] = DEPTH[cls]
        points.append(((x1 + x2) / 2, (y1 + y2) / 2))
        points += [(x1 + 2, y1 + 2), (x2 - 2, y1 + 2), (x1 + 2, y2 - 2), (x2 - 2, y2 - 2)]
    keypoints = torch.tensor([[x, y, 1.0] for x, y in points] + [[5.0, 5.0, 0.0]])  # the last one is invisible
    target = {
        "boxes": torch.tensor(list(RECTS.values()), dtype=torch.float32),
        "labels": torch.tensor(list(RECTS), dtype=torch.int64),
        "scores": torch.tensor([0.9, 0.8]),
        "mask": mask,
        "depth": depth,
        "keypoints": keypoints,
    }
    return image, [{k: v.clone() for k, v in target.items()} for _ in range(batch)]


def _objects(mask: torch.Tensor) -> torch.Tensor:
    return (mask == 1) | (mask == 2)


def _grow(region: torch.Tensor, outside: bool = False) -> torch.Tensor:
    """The region and its 8 neighbours, (H, W) bool; ``outside``: whether beyond the border belongs to it."""
    padded = torch.nn.functional.pad(region[None, None].float(), (1, 1, 1, 1), value=float(outside))
    return torch.nn.functional.max_pool2d(padded, 3, stride=1)[0, 0] > 0


def _neighbours(mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 mask values around the pixel holding point (x, y)."""
    col, row = int(x), int(y)
    return mask[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2]


def _looks_like_object(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Pixels whose intensity is nearer the objects' than the background's, or None where colour ops erased it.

    The levels are read after the photometric policy, which may darken, invert or posterize: an object pixel
    is one lying past the midpoint from the background level towards the object level.
    """
    objects, background = _objects(mask), mask == 0
    if objects.sum() == 0 or background.sum() == 0:
        return None
    obj_level, bg_level = image[objects].median(), image[background].median()
    contrast = obj_level - bg_level
    if contrast.abs() < 0.3:  # e.g. solarize turned the objects as dark as the background
        return None
    return (image - bg_level) * contrast.sign() > 0.5 * contrast.abs()


def _check_aligned(images, targets, *, colour_ops: bool, corners: bool, flips_ordered: bool = False) -> int:
    """Asserts every alignment property per sample; returns how many samples had an image comparison."""
    compared = 0
    for image, t in zip(images, targets):
        image = image.mean(0)
        mask, inside = t["mask"], t["mask"] != IGNORE_INDEX
        # depth: exactly the rectangles' constants where the mask says so, 0 (no value) elsewhere
        expected = torch.zeros(H, W)
        for cls, value in DEPTH.items():
            expected[mask == cls] = value
        assert torch.equal(t["depth"], expected)
        # boxes: each equals the bounding box of its class's mask pixels within 1 px
        assert len(t["boxes"]) == len(t["labels"]) == len(t["scores"])
        for box, label in zip(t["boxes"], t["labels"]):
            ys, xs = torch.nonzero(mask == label, as_tuple=True)
            if len(xs):
                from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                assert (box - from_mask).abs().max() <= 1.0, (box, from_mask)
        for cls in RECTS:
            ys, xs = torch.nonzero(mask == cls, as_tuple=True)
            if len(xs) and xs.max() - xs.min() >= 2 and ys.max() - ys.min() >= 2:
                assert cls in t["labels"].tolist()  # a visible object keeps its box
        # keypoints: v = 0 exactly outside the image; visible ones sit on their rectangle's pixels
        kp = t["keypoints"]
        x, y, v = kp.unbind(1)
        in_image = (x >= 0) & (x < W) & (y >= 0) & (y < H)
        assert (v[:-1] <= in_image[:-1].float()).all() and v[-1] == 0
        for k in torch.nonzero(in_image[:-1] & (v[:-1] == 0)).flatten().tolist():
            # lost to the padding of an earlier warp (zoom, then a policy shift): the mask shows that too,
            # unless the point lies within a pixel of the border, where no pixel centre is outside
            at_border = not (1 <= x[k] < W - 1 and 1 <= y[k] < H - 1)
            assert at_border or (_neighbours(mask, x[k], y[k]) == IGNORE_INDEX).any(), kp[k]
        checked = [k for k in (range(10) if corners else CENTRES) if v[k] > 0]
        for k in checked:  # a point just inside the padding's edge may lie in a pixel whose centre is outside
            near = _neighbours(mask, x[k], y[k])
            assert mask[int(y[k]), int(x[k])] in (KP_CLASS[k], IGNORE_INDEX) and (near == KP_CLASS[k]).any(), kp[k]
        if flips_ordered:  # flip_pairs keep "left" points left of their "right" partners
            for left, right in FLIP_PAIRS:
                if v[left] > 0 and v[right] > 0:
                    assert x[left] < x[right]
        # image: its bright pixels are the mask's object pixels
        bright = _looks_like_object(image, mask)
        objects = _objects(mask)
        if bright is not None and objects.sum() >= 100:
            # Within 1 px of the mask's outline both ways. Two bilinear warps (jitter, then a policy shear)
            # blur an edge over 2 px, and equalize turns even faint blends bright: 2 px when colour ops ran.
            # Beyond the image border counts as "not object": bilinear sampling blends the border with padding.
            grown = _grow(_grow(objects)) if colour_ops else _grow(objects)
            assert not (bright & inside & ~grown).any() and not (~_grow(~objects, outside=True) & ~bright).any()
            iou = (bright & objects & inside).sum() / ((bright | objects) & inside).sum()
            assert colour_ops or iou > 0.9, iou
            for k in checked:
                if not (_neighbours(mask, x[k], y[k]) == IGNORE_INDEX).any():  # else blended with the padding
                    assert bright[int(y[k]), int(x[k])], kp[k]
            compared += 1
        if not colour_ops:
            # One bilinear warp: a pixel is "ignore" exactly when its centre lies outside the warped image,
            # and then takes under half the canvas level (0.25) along one axis; an inside pixel at least half
            # along each axis (a quarter at a corner).
            assert (image[~inside] <= 0.25 / 2 + 1e-3).all() and (image[inside] >= 0.25 / 4 - 1e-3).all()
    return compared


@pytest.mark.parametrize(
    ("strength", "scale_range"), [("S1", None), ("S2", None), ("S3", None), ("S4", None), ("S1", (0.1, 2.0))]
)
def test_targets_follow_the_image(strength, scale_range):
    torch.manual_seed(0)
    images, targets = _scene(24)
    aug = BatchAugment(strength, scale_range=scale_range)
    out_images, out = aug.forward_dense(images, targets, flip_pairs=FLIP_PAIRS)
    compared = _check_aligned(
        out_images,
        out,
        colour_ops=strength != "S1",
        corners=scale_range is None,  # at scale 0.1 a corner point 2 px inside lies 0.2 px from the edge
        flips_ordered=strength == "S1",  # no rotation or shear
    )
    assert compared >= 4  # enough samples kept their contrast and size for the image comparison


def test_large_scale_jitter_reaches_small_scales():
    torch.manual_seed(0)
    images, targets = _scene(32)
    aug = BatchAugment("S1", scale_range=(0.1, 2.0))
    aug.forward_dense(images, targets)
    matrix = aug.geometric.transform_matrix
    scale = (matrix[:, 0, 0] * matrix[:, 1, 1] - matrix[:, 0, 1] * matrix[:, 1, 0]).abs().sqrt()
    assert scale.min() < 0.4 and scale.max() > 1.5 and scale.min() >= 0.1 - 1e-5
    assert "scale_range=(0.1, 2.0)" in repr(aug)


def test_policy_geometry_moves_targets():
    """RandAugment's rotate/shear/translate are recorded by kornia per operation and move the targets as well."""
    moved = 0
    for seed in range(4):
        torch.manual_seed(seed)
        images, targets = _scene(16)
        aug = BatchAugment("S4")
        out_images, out = aug.forward_dense(images, targets)
        steps = aug._policy_steps()
        product = torch.eye(3).expand(16, 3, 3)
        for matrix in steps:
            product = matrix @ product
        assert torch.allclose(product, aug.photometric.transform_matrix, atol=1e-5)
        moved += not torch.allclose(product, torch.eye(3).expand(16, 3, 3), atol=1e-4)
        _check_aligned(out_images, out, colour_ops=True, corners=True)
    assert moved >= 2


def test_what_one_warp_pads_stays_lost():
    """Zoom in 2x, then shift 10 px right: the left strip shows padding though the product maps it into the image."""
    target = {
        "mask": torch.ones(H, W, dtype=torch.int64),
        "depth": torch.ones(H, W),
        "boxes": torch.tensor([[16.0, 40.0, 30.0, 60.0]]),
        "labels": torch.tensor([1]),
        "keypoints": torch.tensor([[20.0, 50.0, 1.0]]),
    }
    centre = (W - 1) / 2  # kornia scales about the centre of the pixel centres
    zoom = torch.tensor([[[2.0, 0.0, -centre], [0.0, 2.0, -centre], [0.0, 0.0, 1.0]]])
    out = warp_targets([target], [zoom, _translate(10, 0)], (H, W))[0]
    assert (out["mask"][:, :10] == IGNORE_INDEX).all() and (out["mask"][:, 10:] == 1).all()
    assert (out["depth"][:, :10] == 0).all() and (out["depth"][:, 10:] == 1).all()
    # x: 16 -> 2 * 15.5 - 47.5 + 0.5 = -16 (clipped to 0), 30 -> 12; then + 10. y: 40 -> 32, 60 -> 72.
    assert torch.allclose(out["boxes"], torch.tensor([[10.0, 32.0, 22.0, 72.0]]))
    assert out["keypoints"][0, 2] == 0  # x = 20 left the image after the zoom (at -8), though it ends at 11


def test_flip_alone_is_exact():
    import kornia.augmentation as K

    images, targets = _scene(2)
    flip = K.AugmentationSequential(K.RandomHorizontalFlip(p=1.0))
    flipped = flip(images)
    out = warp_targets(targets, flip.transform_matrix, (H, W), flip_pairs=FLIP_PAIRS)
    assert torch.equal(flipped, images.flip(-1))
    for before, after in zip(targets, out):
        assert torch.equal(after["mask"], before["mask"].flip(-1))
        assert torch.equal(after["depth"], before["depth"].flip(-1))
        x1, y1, x2, y2 = before["boxes"].unbind(1)
        assert torch.allclose(after["boxes"], torch.stack([W - x2, y1, W - x1, y2], dim=1), atol=1e-4)
        mirrored = before["keypoints"].clone()
        mirrored[:, 0] = W - mirrored[:, 0]
        order = list(range(len(mirrored)))
        for left, right in FLIP_PAIRS:
            order[left], order[right] = right, left
        assert torch.allclose(after["keypoints"][:, :2], mirrored[order, :2], atol=1e-4)
        assert torch.equal(after["keypoints"][:, 2], mirrored[order, 2])


def _translate(dx: float, dy: float, scale: float = 1.0) -> torch.Tensor:
    return torch.tensor([[[scale, 0.0, dx], [0.0, scale, dy], [0.0, 0.0, 1.0]]])


def test_out_of_image_pixels_become_ignore_and_no_depth():
    _, targets = _scene(1)
    out = warp_targets(targets, _translate(5, 3), (H, W))[0]
    assert (out["mask"][:3] == IGNORE_INDEX).all() and (out["mask"][:, :5] == IGNORE_INDEX).all()
    assert torch.equal(out["mask"][3:, 5:], targets[0]["mask"][:-3, :-5])
    assert (out["depth"][:3] == 0).all() and (out["depth"][:, :5] == 0).all()
    assert torch.equal(out["depth"][3:, 5:], targets[0]["depth"][:-3, :-5])
    assert torch.allclose(out["boxes"], targets[0]["boxes"] + torch.tensor([5.0, 3.0, 5.0, 3.0]))


def test_degenerate_boxes_are_dropped_with_labels_and_scores():
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 5.0, 60.0, 20.0], [20.0, 20.0, 21.5, 40.0]]),
        "labels": torch.tensor([3, 4, 5]),
        "scores": torch.tensor([0.3, 0.4, 0.5]),
    }
    # x -> x + 40 on a 96 px wide image: box 0 -> [40, 50] kept; box 1 -> [90, 100] clipped to 6 px wide, kept;
    # box 2 -> [60, 61.5], 1.5 px wide, kept. Then at scale 0.5 (x -> 0.5 x + 40): box 2 is 0.75 px wide: dropped.
    out = warp_targets([target], _translate(40, 0), (H, W))[0]
    assert torch.allclose(out["boxes"], torch.tensor([[40.0, 0, 50, 10], [90, 5, 96, 20], [60, 20, 61.5, 40]]))
    half = _translate(40, 0, scale=0.5)
    half[0, :2, 2] -= 0.25  # scale about continuous coordinate 0: kornia's matrices act on pixel centres
    out = warp_targets([target], half, (H, W))[0]
    assert torch.allclose(out["boxes"], torch.tensor([[40.0, 0, 45, 5], [65, 2.5, 70, 10]]))
    assert out["labels"].tolist() == [3, 4] and out["scores"].tolist() == pytest.approx([0.3, 0.4])
    gone = warp_targets([target], _translate(W, 0), (H, W))[0]  # everything pushed out of the image
    assert gone["boxes"].shape == (0, 4) and len(gone["labels"]) == len(gone["scores"]) == 0


def test_keypoints_leaving_the_image_are_hidden():
    target = {"keypoints": torch.tensor([[10.0, 10.0, 1.0], [90.0, 10.0, 0.7], [50.0, 50.0, 0.0]])}
    out = warp_targets([target], _translate(8, 0), (H, W))[0]["keypoints"]
    assert torch.allclose(out, torch.tensor([[18.0, 10.0, 1.0], [98.0, 10.0, 0.0], [58.0, 50.0, 0.0]]))


def test_variable_box_counts_and_missing_keys():
    torch.manual_seed(0)
    images = torch.rand(3, 3, H, W)
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[10.0, 10, 50, 50], [20, 30, 40, 60], [0, 0, W, H]]), "labels": torch.arange(3)},
        {"mask": torch.zeros(H, W, dtype=torch.int64)},
    ]
    originals = [{k: v.clone() for k, v in t.items()} for t in targets]
    _, out = BatchAugment("S3").forward_dense(images, targets)
    assert [sorted(t) for t in out] == [sorted(t) for t in targets]
    assert out[0]["boxes"].shape == (0, 4) and len(out[1]["boxes"]) == len(out[1]["labels"]) >= 1
    assert out[2]["mask"].dtype == torch.int64 and set(out[2]["mask"].unique().tolist()) <= {0, IGNORE_INDEX}
    for before, t in zip(originals, targets):  # the inputs are left as they were
        assert all(torch.equal(before[k], t[k]) for k in before)


def test_forward_dense_images_equal_forward():
    images, targets = _scene(8)
    for strength in ["none", "S1", "S2", "S3", "S4"]:
        aug = BatchAugment(strength)
        torch.manual_seed(5)
        plain = aug(images)
        torch.manual_seed(5)
        dense, _ = aug.forward_dense(images, targets)
        assert torch.equal(plain, dense)
    _, unchanged = BatchAugment("none").forward_dense(images, targets)
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(unchanged, targets))


def test_refuses_bad_inputs():
    images, targets = _scene(2)
    aug = BatchAugment("S1")
    with pytest.raises(ValueError, match="2 images but 1 target"):
        aug.forward_dense(images, targets[:1])
    with pytest.raises(ValueError, match="cannot move target keys"):
        aug.forward_dense(images, [{"normals": torch.zeros(3, H, W)}, {}])
    with pytest.raises(ValueError, match="mask is"):
        aug.forward_dense(images, [{"mask": torch.zeros(H, W + 1, dtype=torch.int64)}, {}])
    with pytest.raises(ValueError, match="flip_pairs"):
        warp_targets(targets[:1], torch.diag(torch.tensor([-1.0, 1, 1]))[None], (H, W), flip_pairs=[(0, 11)])
    with pytest.raises(ValueError, match="scale_range"):
        BatchAugment("S3", scale_range=(0.0, 2.0))
    with pytest.raises(ValueError, match="no effect"):
        BatchAugment("none", scale_range=(0.5, 2.0))


def test_a_batch_without_any_box_passes_through():
    # A weak detector's pseudo labels can leave a whole batch without a box.
    aug = BatchAugment("S4")
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}, {}]
    images, out = aug.forward_dense(torch.rand(2, 1, 16, 16), targets)
    assert images.shape == (2, 1, 16, 16)
    assert out[0]["boxes"].shape == (0, 4) and len(out[0]["labels"]) == 0 and out[1] == {}
