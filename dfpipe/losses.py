r"""Training losses of an expert: cross-entropy + EMA-teacher KL consistency + supervised InfoNCE, and, for
an expert with local branches (``info_heads``), the local / global information losses of Ba et al. 2024
(the method and how this differs from the paper: :mod:`dfpipe.models.info`).

    L_total = w_ce * (L_CE + L_infoCE) + w_kl * L_KL + w_nce * L_NCE + w_lil * L_LIL + w_gil * L_GIL

(L_infoCE, L_LIL and L_GIL only with branches). With mixup (:func:`mixup`) every label-dependent term
l(y) becomes lam * l(y_a) + (1 - lam) * l(y_b).

Notation: B samples, K = 2 classes (1 = fake), logits z_i in R^K, p_i = softmax(z_i), labels y_i.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InfoMI, LossWeights
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


INFO_MI = get_args(InfoMI)  # ("kl", "wasserstein")


def info_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float,
                    kind: str = "kl") -> torch.Tensor:
    r"""Per-sample divergence D(p^T || q^T) of two class distributions, p^T = softmax(logits / T).

    Logits (..., K) -> (...). ``kind``:

    * ``"kl"``: sum_k p_k (log p_k - log q_k), the variational estimate of the mutual-information
      differences the LIL / GIL terms are built on (:mod:`dfpipe.models.info`);
    * ``"wasserstein"``: the 1-Wasserstein distance between p and q on the classes under the 0/1 ground
      metric, which is the total variation 1/2 sum_k |p_k - q_k| (for K = 2: |p_fake - q_fake|).

    Both are 0 exactly when p = q and grow as they part. No T^2 factor (the reference code has none).
    """
    t = float(temperature)
    if t <= 0:
        raise ConfigError(f"info temperature must be > 0, got {temperature}")
    if kind == "kl":
        log_p, log_q = F.log_softmax(p_logits / t, dim=-1), F.log_softmax(q_logits / t, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if kind == "wasserstein":
        return 0.5 * (torch.softmax(p_logits / t, dim=-1) - torch.softmax(q_logits / t, dim=-1)).abs().sum(dim=-1)
    raise ConfigError(f"unknown info_mi {kind!r}; choose one of {list(INFO_MI)}")


def local_information_loss(joint_logits: torch.Tensor, loo_logits: torch.Tensor, temperature: float,
                           kind: str = "kl", gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                           ) -> torch.Tensor:
    r"""L_LIL = exp(-mean_b sum_i D(q(y|f) || q(y|f_{-i}))), in (0, 1]; q(y|f) detached (a target).

    ``joint_logits`` (B, K): q(y | f_1..f_n); ``loo_logits`` (B, n, K): q(y | f without f_i). The sum over i
    estimates sum_i I(f_i; y | f_{-i}), the label information each local feature alone holds: the loss is 1
    when every leave-one-out prediction equals the joint one (fully redundant features) and falls as they
    part. ``gather`` (DDP): the batch mean is that of the global batch, as for the NCE term.
    """
    target = joint_logits.detach().unsqueeze(1).expand_as(loo_logits)  # (B, n, K)
    per_sample = info_divergence(target, loo_logits, temperature, kind).sum(dim=1)  # (B,)
    if gather is not None:
        per_sample = gather(per_sample)  # (world * B,)
    return torch.exp(-per_sample.mean())


def global_information_loss(joint_logits: torch.Tensor, logits: torch.Tensor, temperature: float,
                            kind: str = "kl") -> torch.Tensor:
    r"""L_GIL = mean_b D(q(y|f) || q(y|z)); q(y|f) detached (a target).

    ``joint_logits`` (B, K): q(y | f_1..f_n); ``logits`` (B, K): the classifier's q(y | z), z = fusion(f).
    Estimates I(f; y) - I(z; y) >= 0, the label information lost in the fusion: 0 when z predicts as f does.
    """
    return info_divergence(joint_logits.detach(), logits, temperature, kind).mean()


def mixup(x: torch.Tensor, labels: torch.Tensor, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    r"""Mixup (Zhang et al. 2018) of a batch: (lam * x + (1 - lam) * x[perm], labels[perm], lam).

    lam ~ Beta(alpha, alpha) and perm (a permutation of the B samples) come from ``rng`` only. The loss
    takes ``mix=(labels[perm], lam)`` and mixes every label-dependent term the same way.
    """
    if alpha <= 0:
        raise ConfigError(f"mixup alpha must be > 0 (0 = off, not called), got {alpha}")
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], labels[perm], lam


class JointLoss(nn.Module):
    r"""L_total = w_ce * (L_CE + L_infoCE) + w_kl * L_KL + w_nce * L_NCE + w_lil * L_LIL + w_gil * L_GIL.

    ``forward(out, labels, teacher_logits=None, mix=None)`` with ``out`` an expert's output dict
    (``logits`` (B, 2), ``feat`` (B, D), optionally ``proj`` (B, P), which the NCE term then uses) returns
    ``{"total", "ce", "kl", "nce"}``: ``total`` carries the graph (call ``backward`` on it), the others are
    the unweighted terms, detached, for logging. A term whose weight is 0 is not computed and reported as 0;
    L_KL is 0 without teacher logits.

    An expert with local branches (training mode: ``info_logits`` (B, 2) and ``info_loo_logits`` (B, n, 2) in
    ``out``) adds ``"info_ce"``, ``"lil"`` and ``"gil"``: L_infoCE = CE(q(y|f)) + mean_i CE(q(y|f_{-i})), the
    cross-entropy that makes its variational heads estimate the label posteriors (always computed, so every
    head gets a gradient, weighted like L_CE), and the terms of :func:`local_information_loss` /
    :func:`global_information_loss` (divergence ``info_mi`` at ``info_temperature``). ``mix=(labels_b, lam)``:
    the batch is a :func:`mixup`; every label-dependent term (CE, infoCE, NCE) is
    lam * term(labels) + (1 - lam) * term(labels_b).

    ``gather`` (under DDP: :func:`dfpipe.train_experts.distributed.gather_across_ranks`) concatenates a per-rank
    tensor over the ranks, with gradient. L_NCE and L_LIL's batch mean are then taken over the global batch,
    the same value on every rank (NCE: each anchor meets the positives and negatives of all ranks, not of
    its own few samples; LIL: exp of the global mean, not a mean of per-rank exps). Their gradient is exact:
    the all-gather's backward hands each rank the sum over the ranks of the gradient of its own samples
    (``world`` x the one-process one), and DDP's gradient average divides by ``world`` again. The other terms
    stay per rank: means over samples, their DDP average is the global-batch mean.
    """

    def __init__(self, weights: LossWeights, label_smoothing: float = 0.0, temperature: float = 0.1,
                 kl_temperature: float = 2.0, class_weights: torch.Tensor | Sequence[float] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None, info_temperature: float = 1.5,
                 info_mi: str = "kl") -> None:
        super().__init__()
        all_weights = (weights.ce, weights.kl, weights.nce, weights.lil, weights.gil)
        if min(all_weights) < 0:
            raise ConfigError(f"loss weights must be >= 0, got {weights}")
        if max(all_weights) == 0:
            raise ConfigError("all loss weights are 0: nothing to train")
        if info_mi not in INFO_MI:
            raise ConfigError(f"unknown info_mi {info_mi!r}; choose one of {list(INFO_MI)}")
        if info_temperature <= 0:
            raise ConfigError(f"info_temperature must be > 0, got {info_temperature}")
        self.weights = weights
        self.label_smoothing = float(label_smoothing)
        self.temperature = float(temperature)
        self.kl_temperature = float(kl_temperature)
        self.info_temperature = float(info_temperature)
        self.info_mi = info_mi
        cw = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", cw, persistent=False)  # moves with .to(device)
        self.gather = gather

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ce_loss(logits, labels, self.label_smoothing, self.class_weights)

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                queue_feats: torch.Tensor | None = None, queue_labels: torch.Tensor | None = None,
                mix: tuple[torch.Tensor, float] | None = None) -> dict[str, torch.Tensor]:
        logits = out["logits"]  # (B, 2)
        zero = logits.new_zeros(())
        w = self.weights
        info = "info_logits" in out
        if (w.lil > 0 or w.gil > 0) and not info:
            raise ConfigError("loss.lil / loss.gil > 0 need an expert with local branches (info_heads >= 2) in "
                              "training mode: its output has no info_logits")
        terms = {"ce": zero, "kl": zero, "nce": zero}

        def by_label(term: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            """A label-dependent term, mixed as the inputs were under mixup."""
            if mix is None:
                return term(labels)
            labels_b, lam = mix
            return lam * term(labels) + (1.0 - lam) * term(labels_b)

        if w.ce > 0:
            terms["ce"] = by_label(lambda y: self._ce(logits, y))
        if w.kl > 0 and teacher_logits is not None:
            terms["kl"] = kl_consistency(logits, teacher_logits, self.kl_temperature)
        if w.nce > 0:
            feats = out.get("proj", out.get("feat"))  # the projection head's output when the expert has one
            if feats is None:
                raise KeyError("JointLoss: nce weight > 0 needs out['feat'] (B, D) or out['proj'] (B, P)")
            gather = self.gather or (lambda t: t)
            feats = gather(feats)  # (world * B, D): the global batch
            terms["nce"] = by_label(lambda y: supcon_infonce(feats, gather(y), self.temperature, queue_feats,
                                                             queue_labels))
        total = w.ce * terms["ce"] + w.kl * terms["kl"] + w.nce * terms["nce"]
        if info:
            joint, loo = out["info_logits"], out["info_loo_logits"]  # (B, 2), (B, n, 2)
            n = loo.shape[1]
            terms["info_ce"] = by_label(lambda y: self._ce(joint, y)  # the mean over i: one CE over the B * n rows
                                        + self._ce(loo.flatten(0, 1), y.repeat_interleave(n)))
            terms["lil"] = terms["gil"] = zero
            if w.lil > 0:
                terms["lil"] = local_information_loss(joint, loo, self.info_temperature, self.info_mi, self.gather)
            if w.gil > 0:
                terms["gil"] = global_information_loss(joint, logits, self.info_temperature, self.info_mi)
            total = total + w.ce * terms["info_ce"] + w.lil * terms["lil"] + w.gil * terms["gil"]
        if logits.requires_grad and not total.requires_grad:  # e.g. KL only, no teacher: keep backward() valid
            total = total + 0.0 * logits.sum()
        # terms are for logging: detached, so float() on them neither warns nor keeps the graph alive
        return {"total": total, **{k: v.detach() for k, v in terms.items()}}
