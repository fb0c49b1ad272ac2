"""Face annotation readers on small fixtures in the real formats, malformed lines included."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from _formats import affectnet_row, photo, pts_text, save_image, wflw_line, write_aflw_mat

from selftrain.data import build_source
from selftrain.data.annotations import FaceLandmarkSource, FaceTableSource, read_pairs
from selftrain.data.annotations.face_landmarks import FLIP_PAIRS_68
from selftrain.data.sources import KNOWN_SCHEMES, DataError
from selftrain.data.targets import BadAnnotationError
from selftrain.metrics_faces import EXPRESSIONS, landmark_metrics, verification_metrics


def skip_reasons(records: list[dict[str, str]]) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in records}


def points(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(2, 40, size=(n, 2)).round(3)


# ---------------------------------------------------------------------------------------- 300W


def test_pts_reads_300w_files_and_drops_malformed_ones(tmp_path: Path) -> None:
    root = tmp_path / "300W"
    a, b = points(68, 1), points(68, 2)
    for name, text in {
        "01_Indoor/indoor_001": pts_text(a), "01_Indoor/indoor_002": pts_text(b),
        "bad/no_close": pts_text(a).replace("}\n", ""),
        "bad/count": pts_text(a).replace("n_points:  68", "n_points: 67"),
        "bad/word": pts_text(a).replace("\n{\n", "\n{\n1.0 oops\n", 1).replace("n_points:  68", "n_points: 69"),
        "bad/five": pts_text(points(5)),
        "bad/no_image": pts_text(a),
    }.items():  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).with_suffix(".pts").write_text(text)
        if name != "bad/no_image":
            save_image((root / name).with_suffix(".png" if name.endswith("001") else ".jpg"), photo(48, 44))
    source = build_source(f"pts:{root}")
    assert isinstance(source, FaceLandmarkSource) and len(source) == 2 and source.num_points == 68
    assert [source.key(0), source.key(1)] == ["01_Indoor/indoor_001.png", "01_Indoor/indoor_002.jpg"]
    kp = source.load_targets(1)["keypoints"].numpy()
    assert np.allclose(kp[:, :2], b, atol=1e-3) and (kp[:, 2] == 1).all()
    assert source.interocular == (36, 45) and source.keypoint_flip_pairs == FLIP_PAIRS_68
    reasons = skip_reasons(source.annotation_skips)
    assert reasons["bad/no_close.jpg"] == "no '}' closing the points"
    assert reasons["bad/count.jpg"] == "n_points says 67 but the file has 68 points"
    assert reasons["bad/word.jpg"] == "line 4: expected 'x y', got '1.0 oops'"
    assert reasons["bad/five.jpg"] == "5 points, but the other faces have 68"
    assert reasons["bad/no_image.jpg"] == "image file not found"
    with pytest.raises(BadAnnotationError, match=r"count\.pts: bad/count\.jpg: n_points says 67"):
        build_source(f"pts:{root}", strict=True)
    # The readers' targets feed the face metrics directly.
    targets = np.stack([source.load_targets(i)["keypoints"].numpy() for i in range(2)])
    assert landmark_metrics(targets, targets) == {"nme": 0.0, "failure_rate": 0.0, "auc": 100.0}


def test_flip_pairs_68_mirror_each_point_once() -> None:
    flat = [k for pair in FLIP_PAIRS_68 for k in pair]
    assert len(flat) == len(set(flat)) and set(range(68)) - set(flat) == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}


# ---------------------------------------------------------------------------------------- WFLW


def test_wflw_lines_with_several_faces_per_image(tmp_path: Path) -> None:
    images = tmp_path / "WFLW_images"
    for name in ("0--Parade/a.jpg", "1--Handshaking/b.jpg"):
        save_image(images / name, photo(50, 60))
    p, q = points(98, 3), points(98, 4)
    lines = [
        wflw_line(p, (1, 2, 40, 45), (0, 1, 0, 0, 1, 0), "0--Parade/a.jpg"),
        wflw_line(q, (5, 5, 30, 30), (1, 0, 0, 0, 0, 0), "0--Parade/a.jpg"),  # a second face of a.jpg
        wflw_line(p, (1, 2, 40, 45), (0, 0, 0, 0, 0, 0), "1--Handshaking/b.jpg"),
        "",
        wflw_line(p[:97], (1, 2, 40, 45), (0, 0, 0, 0, 0, 0), "1--Handshaking/b.jpg"),
        wflw_line(p, (1, 2, 40, 45), (0, 2, 0, 0, 0, 0), "1--Handshaking/b.jpg"),
        wflw_line(p, (40, 2, 1, 45), (0, 0, 0, 0, 0, 0), "1--Handshaking/b.jpg"),
        wflw_line(p, (1, 2, 40, 45), (0, 0, 0, 0, 0, 0), "1--Handshaking/b.jpg").replace(" ", " x", 1),
        wflw_line(p, (1, 2, 40, 45), (0, 0, 0, 0, 0, 0), "2--Demonstration/gone.jpg"),
    ]
    annotations = tmp_path / "list_98pt_rect_attr_train.txt"
    annotations.write_text("\n".join(lines) + "\n")
    source = build_source(f"wflw:{annotations}?images={images}")
    assert [source.key(i) for i in range(len(source))] == ["0--Parade/a.jpg", "0--Parade/a.jpg#1", "1--Handshaking/b.jpg"]
    assert np.allclose(source.load_targets(1)["keypoints"][:, :2].numpy(), q, atol=1e-5)
    assert source.boxes.tolist() == [[1, 2, 40, 45], [5, 5, 30, 30], [1, 2, 40, 45]]
    assert source.attributes.tolist() == [[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert source.interocular == (60, 72) and source.num_points == 98
    reasons = skip_reasons(source.annotation_skips)
    assert reasons["line 5"].startswith("line 5: 205 fields, expected 207")
    assert reasons["line 6"] == "line 6: attribute flags must be 0 or 1, got [0.0, 2.0, 0.0, 0.0, 0.0, 0.0]"
    assert reasons["line 7"].startswith("line 7: degenerate face box")
    assert reasons["line 8"].startswith("line 8: not a number")
    assert reasons["2--Demonstration/gone.jpg"] == "image file not found"
    with pytest.raises(BadAnnotationError, match="list_98pt_rect_attr_train.txt: line 5: line 5: 205 fields"):
        build_source(f"wflw:{annotations}?images={images}", strict=True)


# --------------------------------------------------------------------------------- AFLW2000-3D


def test_aflw3d_reads_pt3d_68_and_drops_bad_mat_files(tmp_path: Path) -> None:
    root = tmp_path / "AFLW2000"
    root.mkdir()
    pt3d = np.vstack([points(68, 5).T, np.linspace(-10, 10, 68)[None]])  # (3, 68): x, y, z
    for name in ("image00002", "image00004", "no_key", "wrong_shape", "nan", "garbage", "lonely"):
        if name != "lonely":
            save_image(root / f"{name}.jpg", photo(45, 45))
    write_aflw_mat(root / "image00002.mat", pt3d)
    write_aflw_mat(root / "image00004.mat", pt3d + 1)
    write_aflw_mat(root / "lonely.mat", pt3d)
    from scipy.io import savemat

    savemat(str(root / "no_key.mat"), {"pt2d": pt3d[:2]})
    savemat(str(root / "wrong_shape.mat"), {"pt3d_68": pt3d[:, :21]})
    savemat(str(root / "nan.mat"), {"pt3d_68": np.where(np.arange(68) == 3, np.nan, pt3d)})
    (root / "garbage.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    source = build_source(f"aflw3d:{root}")
    assert [source.key(i) for i in range(len(source))] == ["image00002.jpg", "image00004.jpg"]
    assert source.target_keys == ("keypoints", "points3d")
    targets = source.load_targets(1)
    assert np.allclose(targets["points3d"].numpy(), pt3d.T + 1, atol=1e-5)
    assert np.allclose(targets["keypoints"].numpy(), np.c_[pt3d.T[:, :2] + 1, np.ones(68)], atol=1e-5)
    reasons = skip_reasons(source.annotation_skips)
    assert reasons["no_key.jpg"] == "no 'pt3d_68' variable"
    assert reasons["wrong_shape.jpg"].startswith("'pt3d_68' must be a 3 x 68 numeric array, got (3, 21)")
    assert reasons["nan.jpg"] == "'pt3d_68' has NaN or infinite values"
    assert reasons["garbage.jpg"].startswith("not a readable MATLAB file")
    assert reasons["lonely.jpg"] == "image file not found"
    # Resizing 45 -> 90 doubles x, y and (geometric mean of the two scales) z.
    resized = build_source(f"aflw3d:{root}", image_size=90).load_targets(0)["points3d"].numpy()
    assert np.allclose(resized, pt3d.T * 2, atol=1e-4)
    with pytest.raises(BadAnnotationError, match="garbage.mat"):
        build_source(f"aflw3d:{root}", strict=True)


# -------------------------------------------------------------------------------------- LFW pairs


def test_lfw_pairs_folds_kinds_and_malformed_lines(tmp_path: Path) -> None:
    lfw = tmp_path / "lfw"
    for name, count in {"Abel_Pacheco": 4, "Akhmed_Zakayev": 3, "Slobodan_Milosevic": 2}.items():
        for n in range(1, count + 1):
            save_image(lfw / name / f"{name}_{n:04d}.jpg", photo(20, 20, seed=n))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t2\n" + "\n".join([
        "Abel_Pacheco\t1\t4", "Akhmed_Zakayev\t1\t3",                                   # fold 0, same
        "Abel_Pacheco\t1\tAkhmed_Zakayev\t3", "Abel_Pacheco\t2\tSlobodan_Milosevic\t1",  # fold 0, different
        "Slobodan_Milosevic\t1\t2", "Abel_Pacheco\t2\tAkhmed_Zakayev\t1",               # fold 1: 2nd is misplaced
        "Akhmed_Zakayev\t2\tSlobodan_Milosevic\t9", "Abel_Pacheco\t3\tx",                # missing image, bad number
    ]) + "\n")  # fmt: skip
    result = read_pairs(pairs, lfw)
    assert len(result) == 5
    assert result.same.tolist() == [True, True, False, False, True]
    assert result.fold.tolist() == [0, 0, 0, 0, 1]
    first = [result.images[result.a[0]], result.images[result.b[0]]]
    assert first == [lfw / "Abel_Pacheco/Abel_Pacheco_0001.jpg", lfw / "Abel_Pacheco/Abel_Pacheco_0004.jpg"]
    assert result.a[2] == result.a[0]  # Abel_Pacheco_0001 is one image, embedded once
    reasons = skip_reasons(result.skips)
    assert reasons["line 7"] == "line 7: a different-person pair among the same-person pairs of fold 1"
    assert reasons["line 8"] == "line 8: image file not found"
    assert reasons["line 9"] == "line 9: image numbers must be positive integers, got ['3', 'x']"
    with pytest.raises(BadAnnotationError, match="pairs.txt: line 7"):
        read_pairs(pairs, lfw, strict=True)
    short = tmp_path / "short.txt"
    short.write_text("10\t300\nAbel_Pacheco\t1\t4\n")
    with pytest.raises(DataError, match="promises 10 x 2 x 300 = 6000 pairs, the file has 1 lines"):
        read_pairs(short, lfw)
    # One embedding per distinct image: a person's images point one way, so same-person pairs score 1.
    person = {"Abel_Pacheco": [1.0, 0.0], "Akhmed_Zakayev": [0.0, 1.0], "Slobodan_Milosevic": [-1.0, 0.2]}
    embeddings = np.array([person[path.parent.name] for path in result.images])
    scores = verification_metrics(embeddings, result.a, result.b, result.same, result.fold, fars=(0.5,))
    assert scores == {"accuracy": 100.0, "accuracy_std": 0.0, "tar@far=0.5": 100.0}
    dev = tmp_path / "pairsDevTrain.txt"  # one number: one fold
    dev.write_text("1\nAbel_Pacheco\t1\t2\nAbel_Pacheco\t1\tAkhmed_Zakayev\t1\n")
    assert read_pairs(dev, lfw).fold.tolist() == [0, 0]


# ------------------------------------------------------------------------------- AU and AffectNet


def test_au_csv_intensities_and_bad_rows(tmp_path: Path) -> None:
    for name in ("SN001/0001.jpg", "SN001/0002.jpg", "SN002/0001.jpg"):
        save_image(tmp_path / name, photo(30, 30))
    path = tmp_path / "disfa.csv"
    rows = [["image", "AU1", "AU02", "au4", "subject"],
            ["SN001/0001.jpg", "0", "2", "5", "SN001"], ["SN001/0002.jpg", "1.5", "0", "3", "SN001"],
            ["SN002/0001.jpg", "6", "0", "0", "SN002"], ["SN002/0001.jpg", "", "0", "0", "SN002"],
            ["SN002/0001.jpg", "x", "0", "0"], ["SN001/0001.jpg", "1", "1", "1", "SN001"],
            ["SN009/0001.jpg", "1", "1", "1", "SN009"], ["", "1", "1", "1", "-"]]  # fmt: skip
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    source = build_source(f"au:{path}")
    assert isinstance(source, FaceTableSource) and len(source) == 2 and source.au_names == ["AU1", "AU2", "AU4"]
    assert source.describe()["au_names"] == ["AU1", "AU2", "AU4"]
    assert source.load_targets(1)["au"].tolist() == [1.5, 0.0, 3.0]
    reasons = [r["reason"] for r in source.annotation_skips]
    assert reasons == ["line 4: AU1 = 6 outside [0, 5]", "line 5: AU1 is not a number: ''",
                       "line 6: 4 fields, the header has 5", "line 9: empty image name",
                       "line 7: the image is already annotated", "image file not found (line 8 of disfa.csv)"]  # fmt: skip
    with pytest.raises(BadAnnotationError, match="disfa.csv: SN002/0001.jpg: line 4"):
        build_source(f"au:{path}", strict=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,smile\na.jpg,1\n")
    with pytest.raises(DataError, match="AU<number> columns"):
        build_source(f"au:{bad}")


def test_affectnet_csv_expressions_valence_arousal(tmp_path: Path) -> None:
    images = tmp_path / "Manually_Annotated_Images"
    for k in range(4):
        save_image(images / f"{k}/img{k}.jpg", photo(50, 50, seed=k))
    lm = points(68, 7)
    rows = [list(("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                  "facial_landmarks", "expression", "valence", "arousal")),
            affectnet_row("0/img0.jpg", 1, 0.5, -0.25, lm), affectnet_row("1/img1.jpg", 6, -0.8, 0.9, lm),
            affectnet_row("2/img2.jpg", 8, -2, -2, lm), affectnet_row("2/img2.jpg", 10, -2, -2, lm),
            affectnet_row("2/img2.jpg", 3, 1.5, 0, lm), affectnet_row("2/img2.jpg", 3, 0, 0, lm[:60]),
            affectnet_row("2/img2.jpg", 3, 0, 0, lm, box=(5, 5, 0, 10)),
            affectnet_row("3/img3.jpg", 7, 0.1, 0.2, lm)]  # fmt: skip
    path = tmp_path / "training.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    source = build_source(f"affectnet:{path}?images={images}")
    assert source.classes == list(EXPRESSIONS) and source.labels.tolist() == [1, 6, 7]
    targets = source.load_targets(1)
    assert targets["boxes"].tolist() == [[2, 3, 42, 47]] and targets["labels"].tolist() == [6]
    assert targets["valence_arousal"].tolist() == pytest.approx([-0.8, 0.9])
    assert targets["keypoints"].shape == (68, 3) and np.allclose(targets["keypoints"][:, :2], lm, atol=0.01)
    assert source.num_points == 68 and source.keypoint_flip_pairs == FLIP_PAIRS_68
    reasons = [r["reason"] for r in source.annotation_skips]
    assert reasons == ["line 4: expression 8 (none): no expression label",
                       "line 5: expression 10 (no face): no expression label",
                       "line 6: valence = 1.5 outside [-1, 1]",
                       "line 7: facial_landmarks has 120 values, expected 68 x 2 = 136",
                       "line 8: empty face box 0 x 10"]  # fmt: skip
    resized = build_source(f"affectnet:{path}?images={images}", image_size=25).load_targets(1)
    assert resized["boxes"].tolist() == [[1, 1.5, 21, 23.5]]


def test_face_schemes_are_registered(tmp_path: Path) -> None:
    assert {"pts", "wflw", "aflw3d", "au", "affectnet"} <= set(KNOWN_SCHEMES)
    with pytest.raises(DataError, match="unknown query parameter 'x'"):
        build_source(f"pts:{tmp_path}?x=1")
    with pytest.raises(DataError, match="no .pts files"):
        build_source(f"pts:{tmp_path}")
