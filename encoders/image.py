"""Image encoder: any timm model, read as spatial tokens so fusion can attend to image regions.

Pretrained weights on a few hundred patients want most of the network frozen: `freeze` keeps all,
none, or all but the last N stages fixed (frozen BatchNorm stays in eval mode, so its statistics are
the pretrained ones). The frozen part is a prefix of the network, so its output can be computed once
per image and cached (multimodal/data/features.py); `forward` then takes that activation instead of pixels
(`stage` = where it was cut) and runs only the trainable rest.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from multimodal.config import ImageConfig
from multimodal.data.batches import IMAGE_KEYS

from .base import ENCODERS, Tokens
from .fold import fold_batchnorm
from .weights import Weights, create_backbone, resolve, timm_arch
from .weights import pretrained_stats  # noqa: F401  (re-exported)

_STAGE_CONTAINERS = ("blocks", "stages", "layers", "features")
_HEADS = ("global_pool", "head", "fc", "classifier", "head_drop", "pre_logits")


def _flat_sequence(backbone: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """forward_features as a flat list of (name, module), and the indices that are stages.

    Works for timm CNNs whose forward_features runs their top-level children in order (ResNets,
    EfficientNets, MobileNets, ConvNeXt, RegNet...); the encoder checks that on a probe input and
    refuses partial freezing where it does not hold."""
    seq, stages = [], []
    for name, child in backbone.named_children():
        if name in _HEADS:
            continue
        if name in _STAGE_CONTAINERS and isinstance(child, nn.Sequential):
            for sub, m in child.named_children():
                stages.append(len(seq))
                seq.append((f"{name}.{sub}", m))
        else:
            if name.startswith("layer") and name[5:].isdigit():
                stages.append(len(seq))
            seq.append((name, child))
    return seq, stages


def pooling_matrix(n: int, g: int, like: torch.Tensor) -> torch.Tensor:
    """[g, n]: row i averages the cells [floor(i n / g), ceil((i + 1) n / g)), which is what
    adaptive_avg_pool2d does along one side. A constant the ONNX exporter can take where a feature map
    does not divide into the token grid (adaptive pooling over a 5x5 map cannot be exported)."""
    m = torch.zeros(g, n, dtype=like.dtype, device=like.device)
    for i in range(g):
        a, b = i * n // g, -(-(i + 1) * n // g)
        m[i, a:b] = 1.0 / (b - a)
    return m


@ENCODERS.register("timm")
class TimmImageEncoder(nn.Module):
    """[B, V, C, H, W] images with a [B, V] view mask → [B, V*T, D] tokens, T feature positions per view.

    Only present views go through the backbone; several views of one patient give several token sets.
    `freeze`: "none", "all", or an int N = train only the last N stages (and what follows them).
    """

    modality = "image"
    input_keys = IMAGE_KEYS.inputs

    def __init__(self, model_name: str, in_chans: int = 1, image_size: int = 128, token_grid: int = 4,
                 weights: Optional[Weights] = None, freeze: Union[str, int] = "none", max_views: int = 1):
        super().__init__()
        self.backbone = create_backbone(model_name, weights or Weights(), in_chans)
        # NHWC convolutions: 1.2-1.4x the images/s of NCHW on 2 CPU cores, forward and backward
        # (BENCHMARKS.md, throughput); features within 5e-6 of NCHW. Saved weights are made contiguous.
        self.backbone.to(memory_format=torch.channels_last)
        self.output_dim = self.backbone.num_features
        self.token_grid = token_grid
        self.probe_shape = (in_chans, image_size, image_size)
        self._seq, stages = _flat_sequence(self.backbone)
        self.cut = self._cut_index(freeze, stages)
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            x = torch.zeros(1, in_chans, image_size, image_size).uniform_(generator=torch.Generator().manual_seed(0))
            whole = self.backbone.forward_features(x)
            # a meta-device build (shapes only: see model/artifact.py) has no values to compare
            flat = whole if whole.is_meta else self._run(x, 0, len(self._seq))
            self.sequential = flat.shape == whole.shape and (whole.is_meta or torch.allclose(flat, whole, atol=1e-5))
            self.backbone.train(was)
        if not self.sequential and self.cut not in (0, len(self._seq)):
            raise ValueError(f"{model_name}: partial freezing (image.freeze={freeze}) is not supported for this "
                             f"architecture; use 'all' or 'none'")
        self.tokens_per_image = self._pool(whole).shape[1]
        self.token_layout = (max_views, self.tokens_per_image)  # token v * T + t: view v, grid cell t
        for _, m in self._seq[: self.cut]:
            m.requires_grad_(False)
        if freeze == "all":
            self.backbone.requires_grad_(False)

    @classmethod
    def from_config(cls, ic: ImageConfig, prep=None, stored: Optional[dict] = None, offline: bool = False):
        """From the `image` section (image.encoder: the timm architecture). `offline`: weights come from
        a model directory next, so none are resolved (no hub, file or cache is looked at). The weights'
        digest is kept as `weights_digest`: feature caches are keyed by it."""
        arch = timm_arch(ic.encoder)  # before any weights or cache file is touched
        weights = Weights() if offline else resolve(ic.pretrained, arch)
        enc = cls(model_name=arch, in_chans=ic.in_chans, image_size=ic.size, token_grid=ic.token_grid,
                  weights=weights, freeze=ic.freeze, max_views=ic.max_images)
        enc.weights_digest = weights.digest
        return enc

    def _cut_index(self, freeze, stages: list[int]) -> int:
        """Index into the flat sequence of the first trainable module (0: all trainable)."""
        if freeze == "none":
            return 0
        if freeze == "all":
            return len(self._seq)
        n = int(freeze)
        if not stages or n < 1 or n > len(stages):
            raise ValueError(f"image.freeze={n}: the model has {len(stages)} stages")
        return stages[-n]

    def fold_batchnorm_(self) -> int:
        """Fold the backbone's BatchNorms into the convolutions before them, in place (encoders/fold.py):
        for an inference copy only, as the folded backbone has none left to train or save."""
        probe = torch.zeros(2, *self.probe_shape).uniform_(generator=torch.Generator().manual_seed(0))
        was = self.backbone.training
        self.backbone.eval()
        folded = fold_batchnorm(self.backbone, probe.to(next(self.backbone.parameters()).device),
                                lambda x: self.backbone.forward_features(x.contiguous(memory_format=torch.channels_last)))
        self.backbone.train(was)
        self._seq, _ = _flat_sequence(self.backbone)  # a BatchNorm that was a top-level child is gone there too
        return folded

    @property
    def frozen(self) -> list[nn.Module]:
        return [m for _, m in self._seq[: self.cut]]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen:  # frozen BatchNorm keeps its pretrained statistics
            m.eval()
        return self

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start == 0 and stop == len(self._seq) and not getattr(self, "sequential", True):
            return self.backbone.forward_features(x.contiguous(memory_format=torch.channels_last))
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for _, m in self._seq[start:stop]:
            x = m(x)
        return x

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [n, C, H, W] → the activation where the trainable part starts (what a cache keeps)."""
        with torch.no_grad():
            return self._run(x, 0, self.cut)

    def _pool(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim == 4:  # CNN feature map [n, D, h, w]
            h, w, g = int(f.shape[-2]), int(f.shape[-1]), self.token_grid
            if (h > g or w > g) and h % g == 0 and w % g == 0:
                f = F.avg_pool2d(f, (h // g, w // g))  # = adaptive pooling here, and ONNX can export it
            elif h > g or w > g:  # adaptive pooling's overlapping cells (5x5 → 4x4), as two constant maps
                f = torch.einsum("ih,ndhw,jw->ndij", pooling_matrix(h, g, f), f, pooling_matrix(w, g, f))
            f = f.flatten(2).transpose(1, 2)
        return f

    def _tokens(self, x: torch.Tensor, stage: int = 0) -> torch.Tensor:
        if stage == 0 and self.cut:
            # no graph through frozen layers in training; attribution (x.requires_grad) still gets one
            with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
                x = self._run(x, 0, self.cut)
            stage = self.cut
        return self._pool(self._run(x, stage, len(self._seq)))

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor, image_stage: int = 0,
                image_slot: Optional[torch.Tensor] = None) -> Tokens:
        """`image_stage`: 0 for pixels, or the cut index when `image` holds cached frozen activations.
        `image_slot`: `image` is then only the present images [N, C, H, W], image_slot[n] = b * V + v
        their place (the ONNX graph's layout: no data-dependent indexing inside it)."""
        B, V = image_mask.shape
        out = image.new_zeros(B * V, self.tokens_per_image, self.output_dim)
        if image_slot is None:
            present = image_mask.reshape(-1)
            image_slot = present.nonzero(as_tuple=True)[0]
            image = image.reshape(B * V, *image.shape[2:])[present]
        if image_slot.shape[0]:
            feats = self._tokens(image, int(image_stage))
            out = out.to(feats.dtype).index_put((image_slot,), feats)
        return Tokens(out.reshape(B, V * self.tokens_per_image, self.output_dim),
                      image_mask.repeat_interleave(self.tokens_per_image, dim=1))
