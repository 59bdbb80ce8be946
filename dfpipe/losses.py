r"""Training losses of an expert: cross-entropy + EMA-teacher KL consistency + supervised InfoNCE.

    L_total = w_ce * L_CE + w_kl * L_KL + w_nce * L_NCE

Notation: B samples, K = 2 classes (1 = fake), logits z_i in R^K, p_i = softmax(z_i), labels y_i.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossWeights
from .errors import ConfigError

log = logging.getLogger(__name__)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
            class_weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    r"""Weighted, label-smoothed cross-entropy (PyTorch's ``F.cross_entropy`` semantics).

    logits (B, K), labels (B,) long, smoothing eps, class weights w (K,) (all 1 if None)::

        L_CE = sum_i [ (1 - eps) * w_{y_i} * (-log p_{i,y_i})
                       + (eps / K) * sum_k w_k * (-log p_{i,k}) ]  /  sum_i w_{y_i}

    i.e. the target is (1 - eps) * onehot(y) + eps / K, and the mean is weighted by the samples' class
    weights, so class weights rebalance classes without changing the loss scale.
    """
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)  # (K,)
    return F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)


def kl_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Self-distillation from the EMA teacher: KL(p_t^T || p_s^T) * T^2, teacher detached.

    p^T = softmax(z / T). For logits (B, K)::

        L_KL = T^2 / B * sum_i sum_k p^T_{t,ik} * (log p^T_{t,ik} - log p^T_{s,ik})

    Why: the teacher is the exponential moving average of the student's weights run on the same batch
    (mean-teacher consistency). Its predictions are a temporal ensemble of past students, smoother and less
    noisy than the student's, so pulling the student toward them regularises it (less overconfident,
    steadier on label noise and augmentations) at no extra data cost. The teacher is detached: it is
    updated only by the EMA, never by this gradient. T > 1 softens both distributions so the relative
    confidence of the two classes carries signal; T^2 keeps gradient scale independent of T (Hinton et al.).
    """
    t = float(temperature)
    if t <= 0:
        raise ConfigError(f"kl temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / t, dim=1)  # (B, K)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)  # (B, K)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def supcon_infonce(feats: torch.Tensor, labels: torch.Tensor, temperature: float,
                   queue_feats: torch.Tensor | None = None, queue_labels: torch.Tensor | None = None) -> torch.Tensor:
    r"""Supervised InfoNCE (SupCon, Khosla et al. 2020, the L_out form) on L2-normalised features.

    u_i = f_i / ||f_i||. Candidates A(i) = every batch sample except i, plus every queue entry.
    Positives P(i) = {a in A(i) : y_a = y_i}. For each anchor i (batch samples only) with |P(i)| > 0::

        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(u_i.u_p / t) / sum_{a in A(i)} exp(u_i.u_a / t) )

    L_NCE = mean of l_i over anchors with |P(i)| > 0, and 0 if there is none (returned as a zero that
    still belongs to the graph, so ``backward`` works). The queue (Q, D) with labels (Q,) adds positives
    and negatives without gradient, which keeps the loss informative when batches are small.
    """
    if temperature <= 0:
        raise ConfigError(f"InfoNCE temperature must be > 0, got {temperature}")
    anchors = F.normalize(feats, dim=1)  # (B, D)
    keys, key_labels = anchors, labels  # (B, D), (B,)
    if queue_feats is not None:
        if queue_labels is None or len(queue_labels) != len(queue_feats):
            raise ValueError("queue_feats needs queue_labels of the same length")
        queue = F.normalize(queue_feats.detach().to(anchors.dtype), dim=1)  # (Q, D)
        keys = torch.cat([anchors, queue])  # (B + Q, D)
        key_labels = torch.cat([labels, queue_labels.to(labels.device, labels.dtype)])  # (B + Q,)
    b = anchors.shape[0]
    sim = anchors @ keys.T / temperature  # (B, B + Q)
    not_self = torch.ones_like(sim, dtype=torch.bool)
    not_self[:, :b].fill_diagonal_(False)  # a sample is neither its own positive nor in its denominator
    positive = (labels[:, None] == key_labels[None, :]) & not_self  # (B, B + Q)
    log_denom = torch.logsumexp(sim.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    log_prob = sim - log_denom  # (B, B + Q)
    n_pos = positive.sum(dim=1)  # (B,)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return (anchors * 0.0).sum()  # zero, still connected to the graph
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # (B,)
    per_anchor = -pos_sum[has_pos] / n_pos[has_pos]  # (A,)
    return per_anchor.mean()


class JointLoss(nn.Module):
    r"""L_total = w_ce * L_CE + w_kl * L_KL + w_nce * L_NCE (see the functions for each term).

    ``forward(out, labels, teacher_logits=None)`` with ``out`` an expert's output dict
    (``logits`` (B, 2), ``feat`` (B, D), optionally ``proj`` (B, P), which the NCE term then uses) returns ``{"total", "ce", "kl", "nce"}``: ``total`` carries the
    graph (call ``backward`` on it), the others are the unweighted terms, detached, for logging.
    A term whose weight is 0 is not computed and reported as 0; L_KL is 0 without teacher logits.

    ``gather`` (under DDP: :func:`dfpipe.train.distributed.gather_across_ranks`) concatenates a per-rank
    tensor over the ranks, with gradient. L_NCE is then taken over the global batch, the same value on
    every rank, so each anchor meets the positives and negatives of all ranks, not of its own few
    samples. Its gradient is exact: the all-gather's backward hands each rank the sum over the ranks of
    the gradient of its own samples (``world`` x the one-process one), and DDP's gradient average
    divides by ``world`` again. CE and KL stay per rank: their DDP average is the global-batch mean.
    """

    def __init__(self, weights: LossWeights, label_smoothing: float = 0.0, temperature: float = 0.1,
                 kl_temperature: float = 2.0, class_weights: torch.Tensor | Sequence[float] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        if min(weights.ce, weights.kl, weights.nce) < 0:
            raise ConfigError(f"loss weights must be >= 0, got {weights}")
        if weights.ce == weights.kl == weights.nce == 0:
            raise ConfigError("all loss weights are 0: nothing to train")
        self.weights = weights
        self.label_smoothing = float(label_smoothing)
        self.temperature = float(temperature)
        self.kl_temperature = float(kl_temperature)
        cw = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", cw, persistent=False)  # moves with .to(device)
        self.gather = gather

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                queue_feats: torch.Tensor | None = None,
                queue_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = out["logits"]  # (B, 2)
        zero = logits.new_zeros(())
        w = self.weights
        terms = {"ce": zero, "kl": zero, "nce": zero}
        if w.ce > 0:
            terms["ce"] = ce_loss(logits, labels, self.label_smoothing, self.class_weights)
        if w.kl > 0 and teacher_logits is not None:
            terms["kl"] = kl_consistency(logits, teacher_logits, self.kl_temperature)
        if w.nce > 0:
            feats = out.get("proj", out.get("feat"))  # the projection head's output when the expert has one
            if feats is None:
                raise KeyError("JointLoss: nce weight > 0 needs out['feat'] (B, D) or out['proj'] (B, P)")
            nce_labels = labels
            if self.gather is not None:  # (world * B, D), (world * B,): the global batch
                feats, nce_labels = self.gather(feats), self.gather(labels)
            terms["nce"] = supcon_infonce(feats, nce_labels, self.temperature, queue_feats, queue_labels)
        total = w.ce * terms["ce"] + w.kl * terms["kl"] + w.nce * terms["nce"]
        if logits.requires_grad and not total.requires_grad:  # e.g. KL only, no teacher: keep backward() valid
            total = total + 0.0 * logits.sum()
        # terms are for logging: detached, so float() on them neither warns nor keeps the graph alive
        return {"total": total, **{k: v.detach() for k, v in terms.items()}}
