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


def test_self_label_loss_matches_hand_computed_values():
    from selftrain.losses import self_label_loss

    # clean predictions: image 0 confident in class 1 (softmax of [0, 3, 0]: e^3/(e^3+2) = 0.909),
    # image 1 unsure (uniform), image 2 confident in class 0
    clean = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    view = torch.tensor([[1.0, 2.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    loss, kept = self_label_loss(view, clean, threshold=0.9)
    ce0 = -torch.log_softmax(view[0], 0)[1]  # log(1 + e^-1 + e^-2) - ... against label 1
    ce2 = -torch.log_softmax(view[2], 0)[0]
    assert kept.item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx((ce0 + ce2).item() / 3)
    loss, kept = self_label_loss(view, clean, threshold=0.95)  # only image 2 (0.987) passes
    assert kept.item() == pytest.approx(1 / 3) and loss.item() == pytest.approx(ce2.item() / 3)


def test_self_labels_carry_no_gradient_to_the_clean_predictions():
    from selftrain.losses import self_label_loss

    clean = torch.tensor([[4.0, 0.0]], requires_grad=True)
    view = torch.tensor([[0.0, 1.0]], requires_grad=True)
    self_label_loss(view, clean, threshold=0.5)[0].backward()
    assert clean.grad is None and view.grad is not None


def test_distribution_alignment_matches_hand_computed_values():
    from selftrain.losses import DistributionAlignment, self_label_loss

    align = DistributionAlignment(torch.tensor([1.0, 1.0]), decay=0.5)  # prior [0.5, 0.5]
    first = torch.tensor([[0.8, 0.2], [0.6, 0.4]])  # running mean [0.7, 0.3]
    # image 0: [0.8 * 0.5/0.7, 0.2 * 0.5/0.3] = [0.5714, 0.3333], normalized [0.6316, 0.3684]
    assert torch.allclose(align(first), torch.tensor([[12 / 19, 7 / 19], [9 / 23, 14 / 23]]), atol=1e-6)
    align(torch.tensor([[0.1, 0.9]]))  # running <- 0.5 [0.7, 0.3] + 0.5 [0.1, 0.9] = [0.4, 0.6]
    assert torch.allclose(align.running, torch.tensor([0.4, 0.6], dtype=torch.float64))
    align.eval()  # in eval mode it aligns without learning
    assert torch.allclose(align(torch.tensor([[0.4, 0.6]])), torch.tensor([[0.5, 0.5]]))
    assert align.count.item() == 2
    again = DistributionAlignment(torch.tensor([1.0, 1.0]))
    again.load_state_dict(align.state_dict())  # checkpointed with the run
    assert torch.equal(again.running, align.running) and again.count.item() == 2
    # In self_label_loss: a pool predicted as class 0 on average; the unsure image 1 tips to class 1.
    fresh = DistributionAlignment(torch.tensor([1.0, 1.0]))
    clean = torch.tensor([[0.9, 0.1], [0.55, 0.45]]).log()  # logits whose softmax is these probabilities
    view = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    loss, kept = self_label_loss(view, clean, threshold=0.5)  # unaligned: both images labeled class 0
    assert kept.item() == 1.0
    assert loss.item() == pytest.approx((-torch.log_softmax(view, 1)[:, 0]).mean().item())
    loss, kept = self_label_loss(view, clean, threshold=0.5, align=fresh)
    # running [0.725, 0.275]; image 1 -> [0.55/0.725, 0.45/0.275] normalized = [0.317, 0.683]: label 1
    assert kept.item() == 1.0
    expected = (-torch.log_softmax(view[0], 0)[0] - torch.log_softmax(view[1], 0)[1]) / 2
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="the prior must be a positive vector"):
        DistributionAlignment(torch.tensor([1.0, 0.0]))


def test_adaptive_thresholds_match_hand_computed_values():
    from selftrain.losses import AdaptiveThreshold, self_label_loss

    thresholds = AdaptiveThreshold(num_classes=2, decay=0.5)
    # first batch: tau = mean max prob = (0.9 + 0.7) / 2 = 0.8; class means [0.8, 0.2] -> [0.8, 0.2]
    assert torch.allclose(thresholds(torch.tensor([[0.9, 0.1], [0.7, 0.3]])), torch.tensor([0.8, 0.2]))
    # second: max probs 0.6 -> tau 0.5 * 0.8 + 0.5 * 0.6 = 0.7; means 0.5 [0.8, 0.2] + 0.5 [0.4, 0.6] = [0.6, 0.4]
    out = thresholds(torch.tensor([[0.4, 0.6]]))
    assert torch.allclose(out, torch.tensor([0.7, 0.7 * 0.4 / 0.6]))
    thresholds.eval()  # in eval mode it reads without learning
    assert torch.allclose(thresholds(torch.tensor([[1.0, 0.0]])), out) and thresholds.count.item() == 2
    again = AdaptiveThreshold(num_classes=2)
    again.load_state_dict(thresholds.state_dict())  # checkpointed with the run
    assert again.tau.item() == pytest.approx(0.7) and torch.equal(again.class_mean, thresholds.class_mean)
    # In self_label_loss each image meets its own class's threshold. Batch mean max prob 0.6875 = tau;
    # class means [0.6375, 0.3625] -> thresholds [0.6875, 0.391]: the class-1 image at 0.6 is kept,
    # the class-0 images at 0.65 and 0.6 are not; a fixed 0.95 would keep none of the four.
    clean = torch.tensor([[0.65, 0.35], [0.4, 0.6], [0.9, 0.1], [0.6, 0.4]]).log()
    view = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    loss, kept = self_label_loss(view, clean, threshold=AdaptiveThreshold(num_classes=2))
    assert kept.item() == pytest.approx(0.5)  # images 1 and 2 (class 0 at 0.9)
    expected = (-torch.log_softmax(view[1], 0)[1] - torch.log_softmax(view[2], 0)[0]) / 4
    assert loss.item() == pytest.approx(expected.item())
    assert self_label_loss(view, clean, threshold=0.95)[1].item() == 0.0
    with pytest.raises(ValueError, match="at least 2 classes"):
        AdaptiveThreshold(num_classes=1)


def test_class_balance_matches_hand_computed_values():
    from selftrain.losses import ClassBalance, self_label_loss

    balance = ClassBalance(num_classes=3, decay=0.5)
    label, keep = torch.tensor([0, 0, 0, 1, 2, 2]), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # kept shares [3/6, 1/6, 0]; mean 2/9: weights [4/9, 4/3, capped at 10] (class 2 has no self-label yet)
    assert torch.allclose(balance(label, keep), torch.tensor([4 / 9] * 3 + [4 / 3] + [10.0] * 2))
    # second batch, shares [0, 1/2, 1/2]: running 0.5 [1/2, 1/6, 0] + 0.5 [0, 1/2, 1/2] = [1/4, 1/3, 1/4]
    weights = balance(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(balance.share, torch.tensor([1 / 4, 1 / 3, 1 / 4], dtype=torch.float64))
    assert torch.allclose(weights, torch.tensor([(5 / 18) * 3, (5 / 18) * 4]))  # mean 5/18 over [1/3, 1/4]
    balance.eval()  # in eval mode it weighs without learning
    assert torch.allclose(balance(torch.tensor([0]), torch.tensor([1.0])), torch.tensor([10 / 9]))
    assert balance.count.item() == 2
    again = ClassBalance(num_classes=3)
    again.load_state_dict(balance.state_dict())  # checkpointed with the run
    assert torch.equal(again.share, balance.share) and again.count.item() == 2
    # In self_label_loss: three confident class-0 images and one class-1 image; the class-1 image
    # weighs three times each class-0 one, and the kept weights still add up to the kept count.
    clean = torch.tensor([[0.99, 0.01]] * 3 + [[0.01, 0.99]]).log()
    view = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    loss, kept = self_label_loss(view, clean, threshold=0.95, balance=ClassBalance(num_classes=2))
    ce = torch.nn.functional.cross_entropy(view, torch.tensor([0, 0, 0, 1]), reduction="none")
    assert kept.item() == 1.0
    assert loss.item() == pytest.approx(((ce[:3] * 2 / 3).sum() + ce[3] * 2).item() / 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassBalance(num_classes=1)
    with pytest.raises(ValueError, match="max_weight must be >= 1"):
        ClassBalance(num_classes=2, max_weight=0.5)


def test_cosine_weight_runs_from_start_to_end():
    from selftrain.losses import cosine_weight

    assert cosine_weight(0, 100, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_weight(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_weight(100, 100, 1.0, 0.2) == pytest.approx(0.2)
    assert cosine_weight(25, 100, 1.0, 0.0) == pytest.approx(0.5 * (1 + 2**-0.5))
