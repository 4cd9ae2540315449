"""Image encoder: any timm model, read as spatial tokens so fusion can attend to image regions."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ENCODERS, Tokens


def pretrained_stats(model_name: str, in_chans: int) -> tuple[list[float], list[float]] | None:
    """Mean/std the timm weights were trained with (averaged over RGB for one-channel input)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or cfg.mean is None:
        return None
    mean, std = list(cfg.mean), list(cfg.std)
    if in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std


@ENCODERS.register("timm")
class TimmImageEncoder(nn.Module):
    """[B, V, C, H, W] images with a [B, V] view mask → [B, V*T, D] tokens, T feature positions per view.

    Only present views go through the backbone; several views of one patient give several token sets.
    """

    input_keys = ("image", "image_mask")

    def __init__(self, model_name: str, in_chans: int = 1, image_size: int = 128, token_grid: int = 4,
                 pretrained: bool = False, checkpoint_path: str | None = None):
        super().__init__()
        import timm

        self.backbone = timm.create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint_path or "",
                                          in_chans=in_chans, num_classes=0, global_pool="")
        self.output_dim = self.backbone.num_features
        self.token_grid = token_grid
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            probe = self._tokens(torch.zeros(1, in_chans, image_size, image_size))
            self.backbone.train(was)
        self.tokens_per_image = probe.shape[1]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        if f.ndim == 4:  # CNN feature map [n, D, h, w]
            if f.shape[-1] > self.token_grid or f.shape[-2] > self.token_grid:
                f = F.adaptive_avg_pool2d(f, self.token_grid)
            f = f.flatten(2).transpose(1, 2)
        return f

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor) -> Tokens:
        B, V = image_mask.shape
        present = image_mask.reshape(-1)
        out = image.new_zeros(B * V, self.tokens_per_image, self.output_dim)
        if present.any():
            feats = self._tokens(image.reshape(B * V, *image.shape[2:])[present])
            out = out.to(feats.dtype).index_put((present.nonzero(as_tuple=True)[0],), feats)
        return Tokens(out.reshape(B, V * self.tokens_per_image, self.output_dim),
                      image_mask.repeat_interleave(self.tokens_per_image, dim=1))
