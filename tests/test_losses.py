import pytest
import torch

from selftrain.losses import LossNormalization


def test_loss_normalization_matches_hand_computed_values():
    norm = LossNormalization(alpha=2.0, decay=0.5)
    # step 1: averages are the losses themselves: (2 + 2 * (2/1) * 1) / 3 = 2
    assert norm(torch.tensor(2.0), torch.tensor(1.0)).item() == pytest.approx(2.0)
    # step 2: avg_h = 0.5*2 + 0.5*4 = 3, avg_p = 0.5*1 + 0.5*3 = 2 -> (4 + 2 * 1.5 * 3) / 3 = 13/3
    assert norm(torch.tensor(4.0), torch.tensor(3.0)).item() == pytest.approx(13 / 3)
    assert norm.avg_human.item() == pytest.approx(3.0) and norm.avg_pseudo.item() == pytest.approx(2.0)


def test_plain_weighted_sum():
    norm = LossNormalization(alpha=0.5, normalize=False)
    assert norm(torch.tensor(2.0), torch.tensor(4.0)).item() == pytest.approx(4.0)


def test_gradient_flows_through_both_terms_but_not_the_averages():
    norm = LossNormalization(alpha=1.0)
    h = torch.tensor(2.0, requires_grad=True)
    p = torch.tensor(0.5, requires_grad=True)
    norm(h, p).backward()
    assert h.grad.item() == pytest.approx(0.5)  # 1/(1+a)
    assert p.grad.item() == pytest.approx(0.5 * 2.0 / 0.5)  # a/(1+a) * avg_h/avg_p


def test_eval_mode_does_not_update_averages_and_state_round_trips():
    norm = LossNormalization()
    norm(torch.tensor(1.0), torch.tensor(2.0))
    norm.eval()
    norm(torch.tensor(9.0), torch.tensor(9.0))
    assert norm.avg_human.item() == pytest.approx(1.0)
    other = LossNormalization()
    other.load_state_dict(norm.state_dict())
    assert other.count.item() == 1 and other.avg_pseudo.item() == pytest.approx(2.0)
