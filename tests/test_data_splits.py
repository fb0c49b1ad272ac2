"""Tests for label-fraction splits and split files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from selftrain.data import DataError, labeled_subset, load_split, save_split


@pytest.fixture()
def labels() -> np.ndarray:
    """6000 samples per class for 10 classes (Fashion-MNIST train proportions), shuffled."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 6000))


def test_stratified_counts(labels: np.ndarray) -> None:
    subset = labeled_subset(labels, 0.01, seed=0)
    assert subset.dtype == np.int64 and len(subset) == 600
    assert np.all(np.diff(subset) > 0)
    assert np.bincount(labels[subset], minlength=10).tolist() == [60] * 10


def test_small_classes_keep_at_least_one() -> None:
    labels = np.array([0] * 1000 + [1] * 3 + [2])
    subset = labeled_subset(labels, 0.01, seed=5)
    assert np.bincount(labels[subset]).tolist() == [10, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_subsets_are_nested(labels: np.ndarray, seed: int) -> None:
    small, medium, large = (set(labeled_subset(labels, f, seed).tolist()) for f in (0.01, 0.1, 0.5))
    assert small < medium < large
    assert len(labeled_subset(labels, 1.0, seed)) == len(labels)


def test_deterministic_and_seed_dependent(labels: np.ndarray) -> None:
    a = labeled_subset(labels, 0.05, seed=3)
    assert np.array_equal(a, labeled_subset(labels.copy(), 0.05, seed=3))
    assert not np.array_equal(a, labeled_subset(labels, 0.05, seed=4))


def test_known_values_are_pinned() -> None:
    # Split files and published results depend on these exact indices; a change
    # to the seeding scheme (or a numpy stream change) must not go unnoticed.
    assert labeled_subset(np.array([0, 1] * 10), 0.2, seed=0).tolist() == [3, 8, 12, 19]
    assert labeled_subset(np.full(10, -1), 0.3, seed=1).tolist() == [4, 7, 8]


def test_unknown_labels_are_never_picked() -> None:
    labels = np.array([-1] * 50 + [0] * 10 + [1] * 10)
    subset = labeled_subset(labels, 1.0, seed=0)
    assert subset.tolist() == list(range(50, 70))


def test_all_unlabeled_uses_plain_permutation() -> None:
    labels = np.full(200, -1)
    subset = labeled_subset(labels, 0.1, seed=9)
    assert len(subset) == 20 and subset.min() >= 0 and subset.max() < 200
    assert set(subset.tolist()) < set(labeled_subset(labels, 0.3, seed=9).tolist())
    assert labeled_subset(np.empty(0, dtype=np.int64), 0.5, seed=0).tolist() == []


def test_keep_unknown_makes_the_unknown_samples_one_more_nested_stratum() -> None:
    # Dense sources: an image without an object (-1) still has targets and may be labeled.
    labels = np.random.default_rng(0).permutation(np.array([-1] * 40 + [0] * 30 + [1] * 30))
    subsets = [labeled_subset(labels, f, seed=2, keep_unknown=True) for f in (0.1, 0.3, 1.0)]
    assert set(subsets[0].tolist()) < set(subsets[1].tolist()) < set(subsets[2].tolist())
    assert len(subsets[2]) == 100 and np.bincount(labels[subsets[0]] + 1).tolist() == [4, 3, 3]
    # The known classes are drawn exactly as without the option; only the unknown stratum is added.
    plain = labeled_subset(labels, 0.3, seed=2)
    assert np.array_equal(subsets[1][labels[subsets[1]] >= 0], plain)
    assert np.array_equal(subsets[1], labeled_subset(labels, 0.3, seed=2, keep_unknown=True))
    assert not np.array_equal(subsets[1], labeled_subset(labels, 0.3, seed=3, keep_unknown=True))
    # All unknown (depth maps): the same unstratified permutation with or without the option.
    unknown = np.full(30, -1)
    assert np.array_equal(labeled_subset(unknown, 0.2, 5, keep_unknown=True), labeled_subset(unknown, 0.2, 5))


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan"), "0.5", True])
def test_invalid_fraction(labels: np.ndarray, fraction: object) -> None:
    with pytest.raises(ValueError, match="fraction"):
        labeled_subset(labels, fraction, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad_labels", "seed", "needle"),
    [(np.zeros((2, 2), dtype=int), 0, "1-D"), (np.array([0.5]), 0, "integers"),
     (np.array([-2, 0]), 0, ">= -1"), (np.array([0, 1]), -1, "seed")],
)  # fmt: skip
def test_invalid_labels_or_seed(bad_labels: np.ndarray, seed: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        labeled_subset(bad_labels, 0.5, seed=seed)


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "splits" / "f001.json"
    keys = ["train/000001", "cat/éclair.png", "train/000010"]
    meta = {"fraction": 0.01, "seed": 0, "source": {"uri": "fashion-mnist", "n": 3}}
    save_split(path, keys, meta)
    assert load_split(path) == (keys, meta)
    save_split(path, keys[:1], {"v": 2})  # overwrite in place
    assert load_split(path) == (keys[:1], {"v": 2})
    assert [p.name for p in path.parent.iterdir()] == ["f001.json"]  # no temp files left


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    with pytest.raises(ValueError, match="duplicates"):
        save_split(path, ["a", "a"], {})
    with pytest.raises(ValueError, match="strings"):
        save_split(path, ["a", 3], {})  # type: ignore[list-item]
    with pytest.raises(TypeError):
        save_split(path, ["a"], {"x": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "not found"), ("{oops", "not valid JSON"), ("[1, 2]", "not a split file"),
     (json.dumps({"meta": {}, "keys": [1]}), "list of strings")],
)  # fmt: skip
def test_load_errors_name_the_file(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "split.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=needle) as info:
        load_split(path)
    assert str(path) in str(info.value)
