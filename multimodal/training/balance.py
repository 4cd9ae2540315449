"""On-the-fly gradient modulation with generalisation enhancement (OGM-GE; Peng et al., CVPR 2022)
for the joint network (fusion.balance: ogm_ge).

Joint training lets the modality that explains the training cases first take over: its encoder keeps
the larger gradients while the others under-learn. OGM-GE measures, on every batch, how well each
modality predicts the label by itself and slows the encoders of the ones ahead. The measure here is
each modality's auxiliary head (fusion.aux_weight trains them): the mean probability it gives the true
class on the batch's records that have the modality. With that score s_m, modality m's encoder
gradients are multiplied by

    k_m = 1 - tanh(alpha * (s_m / mean_j s_j - 1))   where s_m is above the mean, else 1,

so a modality ahead of the others learns more slowly, by more the further ahead. The ratio to the
mean of all modalities, and the "- 1" that makes k continuous at the mean, generalise the paper's two-
modality ratio to three. Generalisation enhancement then adds Gaussian noise, with the standard
deviation of each weight matrix's own gradient, to the weight gradients of every encoder (slowed or
not), as the authors' code does, to restore the gradient noise that the scaling took away.

Under torchrun the scores are summed over ranks before the coefficients are taken, and the noise comes
from a generator seeded by train.seed, so every rank applies the same update.
"""
from __future__ import annotations

import torch

from multimodal import distributed


class GradientModulation:
    """`scale(aux, y)` after backward (and AMP unscaling), before clipping."""

    def __init__(self, net, alpha: float, task: str, seed: int, noise: bool = True):
        self.alpha, self.task, self.noise = alpha, task, noise
        self.params = {m: [p for p in enc.parameters() if p.requires_grad] for m, enc in net.encoders.items()}
        self.generator = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)

    def true_class_prob(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[n] the probability each record's head gives its true label (multilabel: mean over labels)."""
        logits = logits.detach().float()
        if self.task == "multiclass":
            return torch.softmax(logits, 1).gather(1, y[:, None].long())[:, 0]
        target = y.float().reshape(logits.shape)
        valid = ~torch.isnan(target)
        p = torch.sigmoid(logits)
        right = torch.where(torch.nan_to_num(target) > 0.5, p, 1 - p) * valid
        return right.sum(1) / valid.sum(1).clamp(min=1)

    def coefficients(self, aux: dict, y: torch.Tensor) -> dict[str, float]:
        """{modality: k_m} for this batch; 1 for all when fewer than two modalities could be scored."""
        sums = torch.zeros(2, len(aux), dtype=torch.float64)
        for j, (logits, present) in enumerate(aux.values()):
            if present.any():
                sums[0, j] = self.true_class_prob(logits[present], y[present]).sum().double()
                sums[1, j] = present.sum()
        sums = distributed.summed(sums)
        scored = sums[1] > 0
        if scored.sum() < 2:
            return {m: 1.0 for m in aux}
        s = sums[0] / sums[1].clamp(min=1)
        ratio = s / s[scored].mean()
        k = torch.where(scored & (ratio > 1), 1 - torch.tanh(self.alpha * (ratio - 1)), torch.ones_like(ratio))
        return dict(zip(aux, k.tolist()))

    @torch.no_grad()
    def scale(self, aux: dict, y: torch.Tensor) -> dict[str, float]:
        """Multiply each modality's encoder gradients by its k_m, add the GE noise; → the coefficients."""
        coefficients = self.coefficients(aux, y)
        for m, k in coefficients.items():
            for p in self.params.get(m, []):
                if p.grad is None:
                    continue
                std = p.grad.float().std() if p.grad.dim() >= 2 and self.noise else None
                p.grad.mul_(k)
                if std is not None and torch.isfinite(std):
                    noise = torch.randn(p.grad.shape, generator=self.generator, device=p.grad.device)
                    p.grad.add_(noise.to(p.grad.dtype) * std.to(p.grad.dtype))
        return coefficients
