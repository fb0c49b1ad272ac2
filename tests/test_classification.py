import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selftrain.tasks import TASKS


@pytest.fixture
def task():
    return TASKS.get("classification")(4)


def test_loss_equals_cross_entropy_for_one_hot_and_naive_soft_ce(task):
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(task.loss(logits, task.targets(labels)).mean(), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(6, 4), 1)
    naive = torch.stack([-sum(soft[i, k] * torch.log_softmax(logits[i], 0)[k] for k in range(4)) for i in range(6)])
    assert torch.allclose(task.loss(logits, soft), naive, atol=1e-6)


def test_metrics_hand_computed():
    task = TASKS.get("classification")(10)
    logits = torch.zeros(4, 10)
    logits[0, 3] = 5  # right
    logits[1, 2] = 5  # wrong, label 7 second best
    logits[1, 7] = 4
    logits[2, 1] = 5  # wrong, label 9 nowhere near
    logits[2, 9] = -5
    logits[3, 0] = 5  # right
    m = task.metrics(logits, torch.tensor([3, 7, 9, 0]))
    assert m["top1"] == pytest.approx(50.0) and m["top5"] == pytest.approx(75.0)


def test_encode_pseudo_soft_hard_and_temperature(task):
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    soft = task.encode_pseudo(logits)
    p = torch.softmax(logits, 1).numpy()
    assert np.allclose(soft["classification.probs"], p) and list(soft["classification.label"]) == [0, 2]
    assert np.allclose(soft["classification.confidence"], p.max(1))
    warm = task.encode_pseudo(logits, temperature=2.0)
    assert np.allclose(warm["classification.probs"], torch.softmax(logits / 2, 1).numpy())
    assert np.allclose(warm["classification.confidence"], p.max(1))  # confidence ignores temperature
    hard = task.encode_pseudo(logits, hard=True)
    assert np.array_equal(hard["classification.probs"], np.eye(4, dtype=np.float32)[[0, 2]])


def test_pseudo_columns_round_trip_through_arrow(task):
    import pyarrow as pa

    enc = task.encode_pseudo(torch.randn(5, 4))
    table = pa.table(task.pseudo_table_columns(enc))
    assert torch.allclose(task.decode_pseudo(table), torch.from_numpy(enc["classification.probs"]))


def test_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        TASKS.get("classification")(1)


def test_registry_rejects_duplicates():
    with pytest.raises(KeyError, match="already registered"):
        TASKS.register("classification")(object)
