r"""Local branches and their fusion for the information losses of Ba et al., "Exposing the Deception:
Uncovering More Forgery Clues for Deepfake Detection" (AAAI 2024; github.com/QingyuLiu/Exposing-the-Deception).

The method (read from the paper's abstract and summaries and from its reference code; the equations are
the identities the reference code computes). n local features f_1..f_n of one image, f = (f_1, ..., f_n),
are fused into a global feature z = g(f) that the classifier reads. Variational classifiers stand in for the
true label posteriors: q(y|f), q(y|f_{-i}) (f without f_i) and q(y|z), each trained by cross-entropy.

* Local Information Loss. By the chain rule I(f; y) = I(f_{-i}; y) + I(f_i; y | f_{-i}); the last term, the
  label information only f_i holds, is ``E_f KL(p(y|f) || p(y|f_{-i}))``. Maximising its sum over i makes
  every local feature carry label information the others lack (the "non-overlapping", orthogonal clues)::

      L_LIL = exp( - sum_i E_b D(q_T(y|f) || q_T(y|f_{-i})) )          in (0, 1], 1 = fully redundant

* Global Information Loss. z is a function of f (y -> f -> z), so I(f; y) - I(z; y) =
  ``E_f KL(p(y|f) || p(y|z)) >= 0``: the label information lost in the fusion. Minimising it keeps all of it
  in z, while the narrow z (dim(z) < dim(f)) drops the rest (the information bottleneck)::

      L_GIL = E_b D(q_T(y|f) || q_T(y|z))

  q_T = softmax(logits / T) (the reference code: T = 1.5); q(y|f) is detached in both terms, a target.
  D is KL, or (``info_mi: wasserstein``) the 1-Wasserstein distance between the two class distributions.
* Total: L = L_CE(q(y|z)) + CE of the variational heads + alpha * L_LIL + beta * L_GIL (the paper's Eq. 13;
  alpha, beta set by hand here: ``loss.lil``, ``loss.gil``).
* Mixup (Zhang et al. 2018), as the reference training does: x = lam x_a + (1 - lam) x_b,
  lam ~ Beta(alpha, alpha) (alpha 0.5 there), each label-dependent term l(y) -> lam l(y_a) + (1 - lam) l(y_b).
* Several training datasets at once (the paper trains on FF++, Celeb-DF, DFDC...): stage 1's ``datasets``.

What this implementation does differently (CPU-sized, and to fit the pipeline):

* The paper's n local blocks are n whole backbones (4 x ResNet-34 in the reference code), each seeing the
  full image. Here they share one backbone: each branch is a 1x1 convolution + ReLU on the backbone's last
  feature map, average-pooled (:class:`InfoHeads`), so a branch picks its own channels and, since the ReLU
  comes before the pooling, its own spatial evidence; the losses, not the architecture, make them differ,
  as in the paper. Width d = D // n each (D = the backbone's feature width), so f is D wide.
* Fusion: Linear(n d, n d / 2) + ReLU + dropout + Linear(., d); the reference code's fusion (1000, 500 wide)
  also has BatchNorm1d, left out here (batch-size dependent, and nothing to fold it into at inference).
* The variational heads' cross-entropy: CE(q(y|f)) + the mean over i of CE(q(y|f_{-i})) (the reference sums
  over i, so its trunk sees n + 2 cross-entropies: with the mean the balance does not change with n); q(y|f)
  is trained whenever the branches exist (the reference trains it only with the GIL term on).
* KL is the plain per-sample KL averaged over the batch, in the direction of the identities above (the
  reference's ``nn.KLDivLoss(log q_f, q_other)`` averages over batch x classes and computes
  KL(q_other || q_f)). Wasserstein: for class distributions under the 0/1 ground metric W_1 is the total
  variation 1/2 sum_k |p_k - q_k| (for 2 classes |p_fake - q_fake|), exact and per sample; the reference
  runs 100 Sinkhorn iterations between the batch's two sets of prediction vectors, which compares the
  batch distributions rather than each sample's pair and would be per rank under DDP.
* Under DDP L_LIL's batch mean is taken over the global batch (gathered, like the NCE term), so its value
  and gradients are those of one process; L_GIL and the cross-entropies are per-sample means.
* The reference can weight the terms by learned uncertainty (Kendall et al.); not implemented.

At inference only the fused path runs (backbone -> branches -> z -> classifier); the variational heads
exist for training (their outputs appear in training mode only) and travel in the checkpoint unused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

NUM_CLASSES = 2


class InfoHeads(nn.Module):
    """n local branches on a (B, C, h, w) feature map, their fusion z and the variational classifiers.

    ``forward(fmap)`` returns ``{"z": (B, d)}`` and, in training mode, ``"info_logits"`` (B, 2), the logits
    of q(y | f_1..f_n), and ``"info_loo_logits"`` (B, n, 2), those of q(y | f without f_i) for each i.
    Every output is fp32 (the caller runs it outside autocast).
    """

    def __init__(self, in_channels: int, n: int, dropout: float) -> None:
        super().__init__()
        if n < 2:
            raise ConfigError(f"info_heads must be 0 (off) or >= 2 (local branches), got {n}")
        self.n = int(n)
        self.dim = max(1, int(in_channels) // self.n)  # d: f = (f_1..f_n) is about as wide as the pooled feature
        width = self.n * self.dim
        self.local = nn.Conv2d(in_channels, width, kernel_size=1)  # the n branches' 1x1 convolutions, at once
        self.fuse = nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(width // 2, self.dim))  # f (B, n d) -> z (B, d)
        self.joint = nn.Linear(width, NUM_CLASSES)  # q(y | f)
        self.leave_out = nn.ModuleList(nn.Linear(width - self.dim, NUM_CLASSES) for _ in range(self.n))  # q(y | f_-i)

    def local_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, n, d): branch i = mean over positions of ReLU(conv1x1_i(fmap))."""
        f = torch.relu(self.local(fmap)).mean(dim=(2, 3))  # (B, n d)
        return f.reshape(f.shape[0], self.n, self.dim)

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.local_features(fmap)  # (B, n, d)
        flat = f.flatten(1)  # (B, n d)
        out = {"z": self.fuse(flat)}  # (B, d)
        if self.training:
            out["info_logits"] = self.joint(flat)  # (B, 2)
            loo = [head(torch.cat([f[:, :i], f[:, i + 1:]], dim=1).flatten(1)) for i, head in enumerate(self.leave_out)]
            out["info_loo_logits"] = torch.stack(loo, dim=1)  # (B, n, 2)
        return out
