"""Combining the loss on human labels with the loss on pseudo labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selftrain.distributed import mean_over_ranks


def _update_average(average: torch.Tensor, value: torch.Tensor, first: bool, decay: float) -> None:
    """One step of an exponential moving average kept in a buffer (in place); the first value is copied."""
    if first:
        average.copy_(value)
    else:
        average.mul_(decay).add_((1 - decay) * value)


class LossNormalization(nn.Module):
    """Loss normalization of Zoph et al. 2020, "Rethinking Pre-training and Self-training" (§3.2).

    ``L = 1/(1+a) * (L_h + a * (avg(L_h) / avg(L_p)) * L_p)``, where ``avg`` are exponential
    moving averages of the (detached) human and pseudo losses and ``a`` the pseudo-label
    weight. It keeps the pseudo term on the scale of the human term whatever the
    temperature, label type or task, so ``a`` needs no retuning. With ``normalize=False`` it
    is the plain weighted sum ``L_h + a * L_p``.

    The averages are buffers, so they are saved in checkpoints and a resumed run continues
    with the same scale.

    Example:
        >>> norm = LossNormalization(alpha=1.0, decay=0.99)
        >>> total = norm(torch.tensor(2.0), torch.tensor(0.5))  # first step: averages = losses
        >>> round(total.item(), 4)
        2.0
    """

    def __init__(self, alpha: float = 1.0, decay: float = 0.99, normalize: bool = True) -> None:
        super().__init__()
        self.alpha, self.decay, self.normalize = alpha, decay, normalize
        self.register_buffer("avg_human", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("avg_pseudo", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def forward(self, loss_human: torch.Tensor, loss_pseudo: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return loss_human + self.alpha * loss_pseudo
        h, p = loss_human.detach().double(), loss_pseudo.detach().double()
        if self.training:
            # Under torchrun each rank sees its share of the batch: the averages follow the global
            # batch's losses, so every rank (and a one-process run) weighs the pseudo term alike.
            h, p = mean_over_ranks(torch.stack([h, p])).unbind()
            _update_average(self.avg_human, h, self.count == 0, self.decay)
            _update_average(self.avg_pseudo, p, self.count == 0, self.decay)
            self.count += 1
        scale = (self.avg_human / self.avg_pseudo.clamp_min(1e-12)).to(loss_pseudo.dtype)
        return (loss_human + self.alpha * scale * loss_pseudo) / (1 + self.alpha)


def self_label_loss(
    logits: torch.Tensor,
    clean_logits: torch.Tensor,
    threshold: float | AdaptiveThreshold,
    align: DistributionAlignment | None = None,
    balance: ClassBalance | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabeled term (Sohn et al. 2020) for classification.

    The model's own prediction on a clean (or weakly augmented) image becomes a hard label for an
    augmented view of it, where that prediction's confidence reaches ``threshold``:
    ``mean_i 1[max p_i >= t] * CE(logits_i, argmax p_i)`` with ``p = softmax(clean_logits)``,
    averaged over all images, kept or not. With ``align``, ``p`` is first distribution-aligned
    (:class:`DistributionAlignment`); an :class:`AdaptiveThreshold` as ``threshold`` gives each
    image the threshold of its label's class; with ``balance`` each kept image is weighted by its
    label's :class:`ClassBalance` weight. Returns the loss and the fraction kept.

    Example:
        >>> clean = torch.tensor([[4.0, 0.0], [0.1, 0.0]])  # confident / unsure
        >>> loss, kept = self_label_loss(torch.zeros(2, 2), clean, threshold=0.9)
        >>> round(loss.item(), 4), kept.item()  # ln(2) / 2: one image of two kept
        (0.3466, 0.5)
    """
    probs = clean_logits.detach().float().softmax(dim=1)
    if align is not None:
        probs = align(probs)
    confidence, label = probs.max(dim=1)
    if isinstance(threshold, AdaptiveThreshold):
        threshold = threshold(probs)[label]
    keep = (confidence >= threshold).float()
    weight = keep * balance(label, keep) if balance is not None else keep
    ce = F.cross_entropy(logits.float(), label, reduction="none")
    return (ce * weight).mean(), keep.mean()


class DistributionAlignment(nn.Module):
    """Distribution alignment (Berthelot et al. 2020, ReMixMatch §3.2) of the self-labels.

    A model's predictions on the pool drift towards the classes it finds easy: the classes it
    confuses with them get few confident self-labels and are learned ever less. Alignment scales
    each prediction by ``prior / running``, where ``prior`` is the labeled split's class
    distribution and ``running`` an exponential moving average (``decay``) of the mean prediction
    on the pool batches, and renormalizes: ``p~ = normalize(p * prior / running)``.

    ``running`` starts as the first batch's mean and is a buffer, so it is checkpointed and a
    resumed run continues with the same value; under torchrun it follows the global batch.

    Example:
        >>> align = DistributionAlignment(torch.tensor([0.5, 0.5]))
        >>> align(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))  # running mean [0.7, 0.3]: class 0 is damped
        tensor([[0.6316, 0.3684],
                [0.3913, 0.6087]])
    """

    def __init__(self, prior: torch.Tensor, decay: float = 0.99) -> None:
        super().__init__()
        if prior.ndim != 1 or (prior <= 0).any():
            raise ValueError(f"distribution alignment: the prior must be a positive vector, got {prior.tolist()}")
        self.decay = decay
        self.register_buffer("prior", (prior / prior.sum()).double())
        self.register_buffer("running", torch.zeros_like(self.prior))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = mean_over_ranks(probs.detach().double().mean(dim=0))
            _update_average(self.running, mean, self.count == 0, self.decay)
            self.count += 1
        aligned = probs * (self.prior / self.running.clamp_min(1e-12)).to(probs.dtype)
        return aligned / aligned.sum(dim=1, keepdim=True)


class AdaptiveThreshold(nn.Module):
    """Self-adaptive thresholds of FreeMatch (Wang et al. 2023, §3.2) for the self-labels.

    A fixed threshold (0.95) keeps few self-labels early in training and starves the classes the
    model is unsure of all along. FreeMatch follows the model instead: a global threshold ``tau``,
    the exponential moving average (``decay``) of the pool batches' mean confidence, scaled per
    class by ``m_c / max(m)``, where ``m`` is the moving average of their mean prediction. A class
    the model predicts with less probability mass gets a lower threshold. Calling it with a batch
    of probabilities updates the averages (in training mode) and returns the K thresholds.

    The averages start at the first batch's values (the student usually starts from its teacher,
    not from chance as in the paper) and are buffers, so a resumed run continues with them;
    under torchrun they follow the global batch.

    Example:
        >>> thresholds = AdaptiveThreshold(num_classes=2)
        >>> thresholds(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))  # tau 0.8; m = [0.8, 0.2]
        tensor([0.8000, 0.2000])
    """

    def __init__(self, num_classes: int, decay: float = 0.99) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"adaptive thresholds need at least 2 classes, got {num_classes}")
        self.decay = decay
        self.register_buffer("tau", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("class_mean", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if self.training:
            p = probs.detach().double()
            stats = mean_over_ranks(torch.cat([p.max(dim=1).values.mean().view(1), p.mean(dim=0)]))
            _update_average(self.tau, stats[0], self.count == 0, self.decay)
            _update_average(self.class_mean, stats[1:], self.count == 0, self.decay)
            self.count += 1
        return (self.tau * self.class_mean / self.class_mean.max().clamp_min(1e-12)).to(probs.dtype)


class ClassBalance(nn.Module):
    """Class-balanced weights for the self-labels, so every class pulls on the student alike.

    With a fixed threshold the classes a model finds easy give most of the confident self-labels
    (Fashion-MNIST at 1% labels: ~5,000 each for trousers or bags, ~1,000 for shirts), so the
    self-label gradient is mostly about classes it already knows, and the confusable ones drift
    towards them. Each kept self-label of class ``c`` is weighted ``mean(s) / s_c``, where ``s`` is
    an exponential moving average (``decay``) of the fraction of each pool batch kept with that
    label; the weights of the kept images then add up to as much as without them, shared equally
    by the classes. A class with (almost) no self-labels yet gets at most ``max_weight``.

    ``s`` starts as the first batch's shares and is a buffer, so a resumed run continues with it;
    under torchrun it follows the global batch.

    Example:
        >>> balance = ClassBalance(num_classes=2)
        >>> label, keep = torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> balance(label, keep)  # shares [0.75, 0.25]: class 1 counts three times as much
        tensor([0.6667, 0.6667, 0.6667, 2.0000])
    """

    def __init__(self, num_classes: int, decay: float = 0.99, max_weight: float = 10.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"class balance needs at least 2 classes, got {num_classes}")
        if max_weight < 1:
            raise ValueError(f"class balance: max_weight must be >= 1, got {max_weight}")
        self.decay, self.max_weight = decay, max_weight
        self.register_buffer("share", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def forward(self, label: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Weights (B,) of the images with self-labels ``label`` (B,); ``keep`` (B,) marks the kept ones."""
        if self.training:
            kept = torch.zeros_like(self.share).index_add_(0, label, keep.detach().double())
            share = mean_over_ranks(kept / max(len(label), 1))
            _update_average(self.share, share, self.count == 0, self.decay)
            self.count += 1
        mean = self.share.mean()  # no self-label yet (mean 0): every weight is 1
        weights = torch.where(mean > 0, mean / torch.maximum(self.share, mean / self.max_weight), 1.0)
        return weights.to(keep.dtype)[label]


def cosine_weight(step: int, steps: int, start: float, end: float) -> float:
    """A weight moving from ``start`` at step 0 to ``end`` at step ``steps`` on a half cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
