"""The model directory: everything needed to predict, as safetensors + JSON (no pickles), with
checksums so a damaged or edited directory is refused instead of silently predicting wrong.

    config.json          resolved config + which class to build
    model.safetensors    weights
    preprocessing.json   label names, scaler statistics, category maps, image mean/std, text encoder config
    tokenizer.json       tokenizers' own format (when text is used)
    metrics.json         training history and validation metrics
    versions.json        library versions it was trained with
    checksums.json       sha256 of every file above
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from .config import Config, config_from_dict
from .errors import UserError

FORMAT_VERSION = 1
CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("mmdx", "torch", "timm", "transformers", "tokenizers", "captum", "pydicom", "numpy",
                "pandas", "scikit-learn", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def save(out_dir, cfg: Config, prep, net, metrics: Optional[dict] = None) -> Path:
    """Write to a temporary sibling folder, then move into place, so a crash never leaves half a model."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _dump(tmp / "config.json", {"model_class": "DiagnosisModel", "format_version": FORMAT_VERSION,
                                    "config": cfg.model_dump(mode="json")})
        state = prep.state()
        text_enc = net.encoders["text"] if "text" in net.encoders else None
        state["text_encoder_config"] = text_enc.config_dict() if hasattr(text_enc, "config_dict") else None
        _dump(tmp / "preprocessing.json", state)
        if prep.text is not None:
            (tmp / "tokenizer.json").write_text(prep.text.to_json())
        save_model(net, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _dump(tmp / "metrics.json", metrics or {})
        _dump(tmp / "versions.json", library_versions())
        _dump(tmp / CHECKSUMS, {p.name: _sha256(p) for p in sorted(tmp.iterdir())})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify(model_dir) -> dict:
    """Refuse a directory whose files are missing or differ from the recorded checksums."""
    d = Path(model_dir)
    if not (d / CHECKSUMS).is_file():
        raise UserError(f"{d}: not a model directory (no {CHECKSUMS})")
    sums = json.loads((d / CHECKSUMS).read_text())
    for name, digest in sums.items():
        if not (d / name).is_file():
            raise UserError(f"{d}: {name} is missing")
        if _sha256(d / name) != digest:
            raise UserError(f"{d}: {name} does not match its recorded checksum (modified or corrupt)")
    return sums


def load(model_dir, device: Optional[torch.device] = None):
    """→ (config, preprocessing, network on `device`, metrics). Works whatever device it was trained on."""
    from safetensors.torch import load_model

    from .build import build_network
    from .preprocess import Preprocessing

    d = Path(model_dir)
    verify(d)
    head = json.loads((d / "config.json").read_text())
    if head.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{d}: written by a newer version of mmdx (format {head['format_version']})")
    cfg = config_from_dict(head["config"], source=str(d / "config.json"))
    state = json.loads((d / "preprocessing.json").read_text())
    tok = (d / "tokenizer.json").read_text() if (d / "tokenizer.json").is_file() else None
    prep = Preprocessing.from_state(cfg, state, tok)
    net = build_network(cfg, prep, text_config=state.get("text_encoder_config"), weights_follow=True)
    device = device or torch.device("cpu")
    load_model(net, str(d / "model.safetensors"), device=str(device))
    net.to(device).eval()
    return cfg, prep, net, json.loads((d / "metrics.json").read_text())
