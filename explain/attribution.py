"""Per-patient attributions over every modality at once (issue #3).

The Captum side: the network as Captum sees it, targets, baselines, and one batch through Integrated
Gradients or Grad-CAM (`attribute_batch`). Records → one `PatientExplanation` each is explain/patients.py.

What is attributed
    The *calibrated logit* of the target class, i.e. the network output after temperature scaling:
    binary → the single logit z (for the negative class, -z); multiclass → that class's softmax logit;
    multilabel → that label's logit. Probabilities are not attributed (saturating, not additive).

method="ig" (default)
    One joint Integrated Gradients path per batch of patients, through Captum's
    `LayerIntegratedGradients` with three "layers" integrated together (same alpha for all):
      image   → the normalised pixels (an `nn.Identity` in front of the image encoder);
      text    → the output of the token-embedding layer (`encoder.embedding`, LSTM or HF);
      tabular → the feature-token tensor of the tabular encoder (`TabularEncoder.tokens`), so
                categorical features and missing-value flags are attributed like numbers.
    Captum expands the batch to n_steps × patients and runs it in one go (or in chunks of
    `internal_batch_size`). Baselines: black image (display 0, normalised); for text, every
    non-special token replaced by the pad token (special tokens and the attention mask are
    kept, so [CLS]/[SEP] get exactly zero); tabular tokens at the training means (num 0,
    missing flag 0, category 0 = unknown). Completeness: sum of all attributions of a patient
    ≈ logit(input) - logit(baseline); the gap is `convergence_delta`. Text and tabular paths are
    smooth (|delta| ~ 1e-4 of the logit difference at 32 steps); the pixel path from a black image
    can be steep for a CNN trained from scratch with batch norm (a darkened image is far outside
    its training data), so check the delta and raise `n_steps` (128-256) when it is large.

A fusion strategy's ensemble (fusion.strategy unimodal / auto: a weighted mixture of networks)
    The same one pass, split by network: `split_by_member` gives each member its own input layers
    (its own pixel hook, its own copy of an encoder the members share), so the path integral of the
    mixture's logit comes out per member: what reached the mixture through that network's inputs
    (the mixture's gradient along the path, chain rule through that network only, times the input
    change). The members' parts add up to the mixture's attribution (float rounding: tested to 1e-5
    of its scale) at no extra Integrated Gradients pass. The mixture is a weighted mean of the
    members' probabilities, not of their logits, so a member's part is not its weight times the
    attribution of its own logit: the mixture leans less on a network that is already sure.

method="gradcam"
    Image maps from `LayerGradCam` on the CNN's last feature stage (the module that produces
    `backbone.forward_features`), bilinearly upsampled to the model input; signed (no ReLU),
    so positive still means "towards the target". Text and tabular still use joint Layer IG
    (image held at its input value). `modality_share` then covers text and tabular only
    (Grad-CAM values are not on the IG scale), and `convergence_delta` refers to that IG run.

"""
from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from multimodal.data.batches import MODALITY_KEYS, TABULAR_KEYS, to_device
from multimodal.inference.forward import probabilities
from multimodal.model.network import members

MODALITY_INPUTS = {m: keys.attributed for m, keys in MODALITY_KEYS.items()}
MODALITY_EXTRA = {m: keys.unattributed for m, keys in MODALITY_KEYS.items()}
METHODS = ("ig", "gradcam")


# -- the network as Captum sees it --------------------------------------------------------------
class AttributionForward(nn.Module):
    """Positional tensors → [N, K] attributed logits. Binary nets get two columns [-z, z], so a class
    index is a column index for every task type. `pixels` is the hook point for pixel-level IG."""

    def __init__(self, net: nn.Module, keys: Sequence[str], task: str):
        super().__init__()
        self.net, self.keys, self.task = net, list(keys), task
        self.pixels = nn.Identity()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.keys, args))
        if "image" in batch:
            batch["image"] = self.pixels(batch["image"])
        z = self.net(batch).float()
        return torch.cat([-z, z], 1) if self.task == "binary" else z


def _cuda_safe(device: torch.device):
    """cuDNN's LSTM has no backward in eval mode; plain CUDA kernels do."""
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def _member_layers(net: nn.Module, modality: str, layer) -> list[tuple[list[int], nn.Module]]:
    """(the members that read it, module) for each distinct `layer(i, member)` of the ensemble members
    that see `modality`: one entry per member, or one for several where they share the module."""
    found: dict[int, tuple[list[int], nn.Module]] = {}
    for i, n in enumerate(members(net)):
        if modality in n.encoders:
            mod = layer(i, n)
            found.setdefault(id(mod), ([], mod))[0].append(i)
    return list(found.values())


def split_by_member(net: nn.Module) -> nn.Module:
    """A weighted ensemble as Integrated Gradients sees it to tell its networks apart: every member owns
    its encoder modules (one the members share is copied, so it runs once per member here) and reads the
    pixels through its own `nn.Identity` (`member_pixels[i]`), so each layer of the pass belongs to one
    member. Same tensors as `net` (no weights copied), same outputs; any other network comes back as is."""
    if not getattr(net, "weighted", False) or hasattr(net, "member_pixels"):
        return net
    tensors = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
    out = copy.deepcopy(net, memo=dict(tensors))
    for i, member in enumerate(net.members):
        out.members[i] = copy.deepcopy(member, memo=dict(tensors))  # a memo per member: nothing shared
    out.member_pixels = nn.ModuleList(nn.Identity() for _ in out.members)
    for pixels, member in zip(out.member_pixels, out.members):
        if "image" in member.encoders:
            member.encoders["image"].register_forward_pre_hook(_through(pixels), with_kwargs=True)
    return out


def _through(pixels: nn.Module):
    """A forward pre-hook that passes an image encoder's pixels through `pixels` (Captum's layer)."""
    def hook(module, args, kwargs):
        if "image" in kwargs:
            return args, {**kwargs, "image": pixels(kwargs["image"])}
        return (pixels(args[0]), *args[1:]), kwargs
    return hook


def gradcam_layers(net: nn.Module, cfg, device) -> list[tuple[list[int], nn.Module]]:
    """The last feature stage of each member's image backbone (Grad-CAM's layer), with the members using it."""
    return _member_layers(net, "image", lambda i, n: _last_feature_layer(n.encoders["image"].backbone,
                                                                      cfg.image.in_chans, cfg.image.size, device))


def _last_feature_layer(backbone: nn.Module, in_chans: int, size: int, device) -> nn.Module:
    """The submodule whose output is `backbone.forward_features(x)` (the CNN's last feature stage)."""
    seen: list[tuple[nn.Module, object]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod, o)))
             for name, m in backbone.named_modules() if name]
    try:
        with torch.no_grad():
            out = backbone.forward_features(torch.zeros(1, in_chans, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
    if not (isinstance(out, torch.Tensor) and out.ndim == 4):
        raise ValueError("method='gradcam' needs a CNN image backbone (forward_features → [N, C, h, w])")
    for mod, o in reversed(seen):
        if o is out:
            return mod
    for mod, o in reversed(seen):
        if isinstance(o, torch.Tensor) and o.shape == out.shape:
            return mod
    raise ValueError("cannot find the image backbone's last feature stage for Grad-CAM")


# -- targets ------------------------------------------------------------------------------------
def _fixed_target(target, classes: list[str], task: str) -> Optional[int]:
    """Class index when one target holds for every patient; None = per patient (multiclass/-label)."""
    if target is None:
        return 1 if task == "binary" else None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < len(classes):
            raise ValueError(f"target index {target} out of range for classes {classes}")
        return int(target)
    if str(target) in classes:
        return classes.index(str(target))
    raise ValueError(f"unknown target {target!r}; classes are {classes}")


def class_probs(z: torch.Tensor, task: str) -> torch.Tensor:
    """[N, K] probability per class column (binary: [1-p, p])."""
    if task == "binary":
        p = probabilities(z, task)
        return torch.stack([1 - p, p], 1)
    return probabilities(z, task)


# -- batches ------------------------------------------------------------------------------------
def _select(batch: dict, keep: torch.Tensor) -> dict:
    n, idx = len(keep), keep.nonzero(as_tuple=True)[0].tolist()
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim and len(v) == n:
            out[k] = v[keep]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def _present(net, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {m: t.present for m, t in net.encode(batch).items()}


def _text_baseline(batch: dict, pad_id: int) -> torch.Tensor:
    ids = batch["text_ids"]
    special = torch.tensor(np.array([e.special_tokens_mask for e in batch["text_encodings"]], bool),
                           device=ids.device).reshape(ids.shape)
    return torch.where(special, ids, torch.full_like(ids, pad_id))


def baseline_batch(model, batch: dict, present: Optional[dict] = None) -> dict:
    """The IG reference point of every input tensor (also the 'masked' value used by deletion tests)."""
    prep, out = model.prep, {}
    if "image" in batch:
        mean, std = prep.image.mean.to(batch["image"].device), prep.image.std.to(batch["image"].device)
        out["image"] = ((0 - mean) / std).expand_as(batch["image"]).contiguous()
    if "text_ids" in batch:
        out["text_ids"] = _text_baseline(batch, prep.text.pad_id)
    if "num" in batch:
        keep = present["tabular"] if present is not None else torch.ones(len(batch["num"]), dtype=torch.bool)
        keep = keep.to(batch["num"].device)
        # a patient without tabular data keeps its own (all-missing) inputs, so the baseline does
        # not switch the modality on (its tokens stay masked and get zero attribution either way)
        for k in TABULAR_KEYS.attributed:
            out[k] = torch.where(keep[:, None], torch.zeros_like(batch[k]), batch[k])
    return out


@dataclass
class _BatchResult:
    """Everything one batch produced; faithfulness() reads the raw tensors, explain() the explanations."""

    batch: dict
    rows: list[int]                      # record indices of the ok rows, in batch order
    target: torch.Tensor                 # [b] class index per row
    probs: torch.Tensor                  # [b, K] per-class probability
    present: dict[str, torch.Tensor]     # modality → [b] bool
    image: Optional[torch.Tensor] = None     # [b, V, H, W] signed map (ig or gradcam)
    text: Optional[torch.Tensor] = None      # [b, L] per-token score
    tabular: Optional[torch.Tensor] = None   # [b, F] per-feature score
    delta: Optional[torch.Tensor] = None     # [b]
    members: Optional[list[dict[str, torch.Tensor]]] = None
    """A weighted ensemble's attributions split by network (split_by_member): per member, its part of
    `image` / `text` / `tabular` for the modalities it reads; they add up to those. None otherwise."""

    def add(self, modality: str, scores: torch.Tensor, who: list[int]) -> None:
        """Adds one layer's [b, ...] scores to the modality's total and, where one member owns the
        layer and the members are split, to that member's part."""
        total = getattr(self, modality)
        setattr(self, modality, scores if total is None else total + scores)
        if self.members is not None and len(who) == 1:
            self.members[who[0]][modality] = scores


def _ig(fwd: AttributionForward, layers: list[nn.Module], inputs: tuple, baselines: tuple, extra: tuple,
        target: torch.Tensor, n_steps: int, internal_batch_size: Optional[int]):
    import warnings

    from captum.attr import LayerIntegratedGradients

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Multiple layers provided")
        lig = LayerIntegratedGradients(fwd, layers)
    attrs, delta = lig.attribute(inputs, baselines=baselines, target=target.tolist(),
                                 additional_forward_args=extra, n_steps=n_steps,
                                 internal_batch_size=internal_batch_size, return_convergence_delta=True)
    return [a[0] if isinstance(a, (tuple, list)) else a for a in attrs], delta


def _gradcam(fwd: AttributionForward, layer: nn.Module, inputs: tuple, extra: tuple, target: torch.Tensor,
             image_mask: torch.Tensor) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    B, V = image_mask.shape
    H, W = inputs[0].shape[-2:]
    cam = LayerGradCam(fwd, layer).attribute(inputs, target=target.tolist(), additional_forward_args=extra,
                                             relu_attributions=False)
    cam = LayerAttribution.interpolate(cam.detach(), (H, W), interpolate_mode="bilinear")
    out = cam.new_zeros(B * V, H, W)
    out[image_mask.reshape(-1)] = cam[:, 0]
    return out.reshape(B, V, H, W)


def attribute_batch(model, batch: dict, *, target=None, method: str = "ig", n_steps: int = 32,
                    internal_batch_size: Optional[int] = None, net: Optional[nn.Module] = None,
                    cam_layers: Optional[list[tuple[list[int], nn.Module]]] = None,
                    by_member: bool = True) -> _BatchResult:
    """Attributions for one collated batch whose rows all loaded (ok). Raw tensors on CPU. A weighted
    ensemble's come split by network too (`members`), unless `by_member` is False: then one layer per
    distinct module, as for any other network (the mixture's attribution only, shared encoders run once)."""
    net = net if net is not None else model.net
    net = split_by_member(net) if by_member else net
    cfg, task, device = model.config, model.config.task.type, next(net.parameters()).device
    mods = net.modalities
    batch = to_device(batch, device)
    rows = batch["index"].tolist()
    present = _present(net, batch)
    with torch.no_grad():
        probs = class_probs(net(batch).float(), task)
    fixed = _fixed_target(target, model.classes, task)
    tgt = (torch.full((len(rows),), fixed, dtype=torch.long, device=device) if fixed is not None
           else probs.argmax(1))

    in_keys = [k for m in mods for k in MODALITY_INPUTS[m]]
    ex_keys = [k for m in mods for k in MODALITY_EXTRA[m]]
    fwd = AttributionForward(net, in_keys + ex_keys, task)
    inputs = tuple(batch[k] for k in in_keys)
    extra = tuple(batch[k] for k in ex_keys)
    base = baseline_batch(model, batch, present)
    # a modality nobody in the batch has is left out of the path (its layer would get no gradient)
    ig_mods = [m for m in mods if bool(present[m].any()) and not (m == "image" and method == "gradcam")]
    res = _BatchResult(batch=batch, rows=rows, target=tgt.cpu(), probs=probs.cpu(), present={
        m: p.cpu() for m, p in present.items()}, members=[{} for _ in members(net)] if hasattr(
            net, "member_pixels") else None)
    if ig_mods:
        baselines = tuple(base[k] if m in ig_mods else batch[k] for m in mods for k in MODALITY_INPUTS[m])
        layers = [(m, who, layer) for m in ig_mods for who, layer in _ig_layers(net, fwd, m)]
        attrs, delta = _ig(fwd, [layer for *_, layer in layers], inputs, baselines, extra, tgt, n_steps,
                           internal_batch_size)
        res.delta = delta.detach().float().cpu()
        for (m, who, _), a in zip(layers, attrs):
            # image [b, V, C, H, W] → [b, V, H, W]; text [b, L, E] → [b, L]; tabular [b, F, D] → [b, F]
            res.add(m, a.detach().float().sum(2 if m == "image" else -1).cpu(), who)
    if "image" in mods and method == "gradcam" and bool(present["image"].any()):
        # Grad-CAM is linear in the gradient, so the mixture's map is the sum of each member layer's
        for who, layer in cam_layers or gradcam_layers(net, cfg, device):
            res.add("image", _gradcam(fwd, layer, inputs, extra, tgt, batch["image_mask"]).float().cpu(), who)
    return res


def _ig_layers(net: nn.Module, fwd: AttributionForward, modality: str) -> list[tuple[list[int], nn.Module]]:
    """The layers Integrated Gradients integrates for `modality`, with the members reading each: one per
    member (one for several where they share it); IG over all of them at once, summed, is the attribution
    of the ensemble's output. Pixels: each member's own hook where the members are split, else one."""
    if modality == "image":
        pixels = getattr(net, "member_pixels", None)
        return _member_layers(net, "image", lambda i, n: pixels[i] if pixels is not None else fwd.pixels)
    if modality == "text":
        return _member_layers(net, "text", lambda i, n: n.encoders["text"].embedding)
    return _member_layers(net, "tabular", lambda i, n: n.encoders["tabular"].tokens)


__all__ = ["attribute_batch", "baseline_batch", "class_probs", "eval_mode", "gradcam_layers", "split_by_member",
           "AttributionForward"]
