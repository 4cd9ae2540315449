"""The model directory: everything needed to predict, as safetensors + JSON (no pickles), with
checksums so a damaged or edited directory is refused instead of silently predicting wrong.

    config.json          resolved config + which class to build
    model.safetensors    weights
    preprocessing.json   label names, scaler statistics, category maps, image mean/std, text encoder config
    tokenizer.json       tokenizers' own format (when text is used)
    metrics.json         training history and validation metrics
    versions.json        library versions it was trained with
    exports.json         (after mmdx export) the sha256, size and inputs of each ONNX file exported from it
    checksums.json       sha256 of every file above; a file it does not list is refused

It is integrity, not authenticity: anyone can recompute checksums. So loading trusts nothing in the
directory to run code or reach outside it: the network is built from the stored architecture alone.

Privacy: tokenizer.json holds the vocabulary learnt from the training reports and preprocessing.json
the categorical values seen in training. Words in fewer than `text.min_doc_freq` reports and categories
of fewer than `tabular.min_category_count` records are left out (see README, "Privacy").
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from multimodal.output import sha256_file

from multimodal.config import Config, config_from_dict
from multimodal.errors import UserError
from multimodal.model.network import members
from multimodal.output import MODEL_MANIFEST as CHECKSUMS
from multimodal.formats import strict_json
from multimodal.output import staged_dir

EXPORTS = "exports.json"

FORMAT_VERSION = 2
REQUIRED = frozenset({"config.json", "model.safetensors", "preprocessing.json", "metrics.json", "versions.json"})


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
    path.write_text(strict_json(obj), encoding="utf-8")


def save(out_dir, cfg: Config, prep, net, metrics: Optional[dict] = None, overwrite: bool = False,
         inputs=()) -> Path:
    """Fill a temporary sibling folder, then swap it in (see output.staged_dir): a crash never leaves half
    a model, and a folder that is not an earlier model directory is never replaced."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with staged_dir(out, "model", overwrite=overwrite, inputs=inputs) as tmp:
        _dump(tmp / "config.json", {"model_class": "DiagnosisModel", "format_version": FORMAT_VERSION,
                                    "config": cfg.model_dump(mode="json")})
        state = prep.state()
        text_enc = next((n.encoders["text"] for n in members(net) if "text" in n.encoders), None)
        state["text_encoder_config"] = text_enc.config_dict() if hasattr(text_enc, "config_dict") else None
        _dump(tmp / "preprocessing.json", state)
        if prep.text is not None:
            (tmp / "tokenizer.json").write_text(prep.text.to_json(), encoding="utf-8")
        weights = net.state_dict()
        save_file({k: weights[k].contiguous() for k in dict.fromkeys(stored_names(weights).values())},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates its file 0600 whatever the umask; it gets the mode its siblings got
        os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
        _dump(tmp / "metrics.json", metrics or {})
        _dump(tmp / "versions.json", library_versions())
        _dump(tmp / CHECKSUMS, {p.name: sha256_file(p) for p in sorted(tmp.iterdir())})
    return out


def stored_names(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """state_dict name → the name its tensor is stored under. A module shared by ensemble members
    appears in state_dict once per member; the file keeps the first name only (safetensors' own
    shared-tensor handling cannot read channels_last weights)."""
    first: dict[tuple, str] = {}
    out = {}
    for k, v in weights.items():
        ident = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else (k,)
        out[k] = first.setdefault(ident, k)
    return out


def _load_weights(net, path: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    names = stored_names(net.state_dict())
    stored = load_file(str(path), device=str(device))
    expected = set(names.values())
    if set(stored) != expected:
        odd = sorted(set(stored) ^ expected)[0]
        raise RuntimeError(f"{'unexpected' if odd in stored else 'missing'} tensor {odd}")
    net.load_state_dict({k: stored[v] for k, v in names.items()}, strict=True)


def _required(cfg_raw: dict) -> set[str]:
    mods = cfg_raw.get("config", {}).get("modalities", [])
    return set(REQUIRED) | ({"tokenizer.json"} if "text" in mods else set())


def verify(model_dir) -> dict:
    """The manifest must list every file in the directory, and every file must match it: an unlisted,
    missing or edited file is refused (a `{}` manifest proves nothing)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a model directory (no such folder)")
    if not (d / CHECKSUMS).is_file():
        raise UserError(f"{d}: not a model directory (no {CHECKSUMS})")
    try:
        sums = json.loads((d / CHECKSUMS).read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{d}: {CHECKSUMS} is not valid JSON") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise UserError(f"{d}: {CHECKSUMS} is not a file -> sha256 mapping")
    present = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.name != CHECKSUMS and not p.is_dir()}
    unlisted = sorted(present - set(sums))
    if unlisted:
        raise UserError(f"{d}: {unlisted[0]} is not listed in {CHECKSUMS} (unknown or added file)")
    for name, digest in sums.items():
        if "/" in name or name.startswith(".") or not (d / name).is_file():
            raise UserError(f"{d}: {name} is missing")
        if sha256_file(d / name) != digest:
            raise UserError(f"{d}: {name} does not match its recorded checksum (modified or corrupt)")
    missing = sorted(REQUIRED - set(sums))
    if missing:
        raise UserError(f"{d}: {missing[0]} is missing")
    return sums


def record_export(model_dir, onnx_sha256: str, info: dict, weights_sha256: str) -> None:
    """Vouch for one ONNX file in the model directory itself: its sha256 goes into exports.json, which
    checksums.json covers. A pairing kept anywhere else (in the ONNX file, or beside it) is as easy to
    forge as the graph; this one is as hard to change as the weights. The directory is re-staged whole
    (hard links: no weights copied) so the swap is atomic, and only if its weights are still the ones the
    graph was traced from."""
    d = Path(model_dir)
    sums = verify(d)
    if sums.get("model.safetensors") != weights_sha256:
        raise UserError(f"{d} changed while it was being exported; run mmdx export again")
    known = exports(d) | {onnx_sha256: info}
    try:
        with staged_dir(d, "model", overwrite=True) as tmp:
            for name in sums:
                if name != EXPORTS:
                    _link_or_copy(d / name, tmp / name)
            _dump(tmp / EXPORTS, known)
            _dump(tmp / CHECKSUMS, {k: v for k, v in sums.items() if k != EXPORTS}
                  | {EXPORTS: sha256_file(tmp / EXPORTS)})
    except OSError as e:  # e.g. a read-only model directory: the ONNX file cannot be vouched for
        raise UserError(f"cannot record the export in {d} ({e.strerror or e}); predict --onnx needs it there") from None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def exports(model_dir) -> dict[str, dict]:
    """ONNX sha256 → {"bytes", "inputs"} as export recorded them (empty: nothing exported), checked
    against checksums.json; an edited or malformed record is one line, not a traceback later."""
    d = Path(model_dir)
    if not (d / EXPORTS).is_file():
        return {}
    sums = _read_json(d, CHECKSUMS)
    if not isinstance(sums, dict) or sums.get(EXPORTS) != sha256_file(d / EXPORTS):
        raise UserError(f"{d}: {EXPORTS} does not match its recorded checksum (modified or corrupt)")
    recs = _read_json(d, EXPORTS)
    ok = isinstance(recs, dict) and all(
        isinstance(k, str) and len(k) == 64 and isinstance(r, dict) and isinstance(r.get("bytes"), int)
        and isinstance(r.get("inputs"), list) and r["inputs"] and all(isinstance(i, str) for i in r["inputs"])
        for k, r in recs.items())
    if not ok:
        raise UserError(f"{d}: {EXPORTS} is not an ONNX sha256 -> {{bytes, inputs}} mapping")
    return recs


def _read_json(d: Path, name: str):
    try:
        return json.loads((d / name).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{d}: {name} is not valid JSON") from None


def read(model_dir):
    """→ (config, preprocessing, preprocessing state, metrics): everything but the network, checksums
    verified. Cheap: no timm import, no weights read. The ONNX path needs no more; build_stored()
    makes the PyTorch network from it."""
    from multimodal.data.preprocess import Preprocessing

    d = Path(model_dir)
    sums = verify(d)
    head = _read_json(d, "config.json")
    if not isinstance(head, dict) or not isinstance(head.get("config"), dict):
        raise UserError(f"{d}: config.json has no 'config' section")
    if head.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{d}: written by a newer version of mmdx (format {head['format_version']})")
    missing = sorted(_required(head) - set(sums))
    if missing:
        raise UserError(f"{d}: {missing[0]} is missing")
    cfg = config_from_dict(_upgraded(head), source=str(d / "config.json"))
    state = _read_json(d, "preprocessing.json")
    tok = (d / "tokenizer.json").read_text(encoding="utf-8") if "text" in cfg.modalities else None
    try:
        prep = Preprocessing.from_state(cfg, state, tok)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{d}: preprocessing.json does not fit config.json ({type(e).__name__}: {e})") from None
    _check_tokenizer(d, prep, state)
    return cfg, prep, state, _read_json(d, "metrics.json")


def _upgraded(head: dict) -> dict:
    """The stored config in today's terms: a field added since its format version is set to what
    that version built (format 1: image tokens without view and cell embeddings)."""
    cfg = dict(head["config"])
    if head.get("format_version", 0) < 2 and isinstance(cfg.get("fusion"), dict):
        cfg["fusion"] = {"token_positions": False} | cfg["fusion"]
    return cfg


def _check_tokenizer(d: Path, prep, state) -> None:
    """Every id the stored tokenizer can emit must index the text encoder's embedding (as many rows as the
    tokenizer has ids, or a transformer config's vocab_size): an edited tokenizer.json with shifted ids
    would otherwise fail inside torch, at build or in every batch, as a traceback."""
    if prep.text is None:
        return
    tc = state.get("text_encoder_config") if isinstance(state, dict) else None
    rows = tc.get("vocab_size") if isinstance(tc, dict) else None
    rows = rows if isinstance(rows, int) else prep.text.vocab_size
    ids = list(prep.text.tokenizer.get_vocab(with_added_tokens=True).values()) + [prep.text.pad_id]
    if None in ids or min(ids) < 0 or max(ids) >= rows:
        top = "no padding token" if None in ids else f"token ids up to {max(ids)}"
        raise UserError(f"{d}: tokenizer.json does not fit the model ({top}, {rows} embedding rows)")


def build_stored(model_dir, cfg, prep, state: dict, device: Optional[torch.device] = None):
    """The network of a directory read() has checked, with its weights, in eval mode on `device`
    (whatever device it was trained on). Built from config.json, preprocessing.json and
    model.safetensors alone: no hub or folder lookups, no pretrained weights fetched, no remote code
    (see build.build_network(offline=True)). The architecture is checked against the stored tensors'
    shapes before any memory is given to it."""
    from safetensors import SafetensorError

    from multimodal.model.build import build_network

    d = Path(model_dir)
    text_config = state.get("text_encoder_config")
    try:
        _check_shapes(d / "model.safetensors", cfg, prep, text_config)
        net = build_network(cfg, prep, text_config=text_config, offline=True)
        device = device or torch.device("cpu")
        _load_weights(net, d / "model.safetensors", device)
    except (RuntimeError, SafetensorError, OSError) as e:
        first = " ".join(str(e).split())[:200]
        raise UserError(f"{d}: model.safetensors does not fit the network config.json describes ({first})") from None
    return net.to(device).eval()


def _check_shapes(weights: Path, cfg, prep, text_config) -> None:
    """The network config.json describes, built on the meta device (shapes only, no memory), must have
    exactly the tensors model.safetensors holds, shape for shape (read from its header). An edited
    architecture (fusion.dim: 100000) is refused here instead of allocating gigabytes of weights first."""
    from safetensors import safe_open

    from multimodal.model.build import build_network

    with safe_open(str(weights), framework="pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # even shapes-only modules cost memory per layer: a layer count no file of this size can fill is
    # refused before the meta build (a million-layer config would take minutes and gigabytes there)
    most = max(n for n in _layer_counts(cfg, text_config) if isinstance(n, int))
    if most > len(got):
        raise RuntimeError(f"config.json asks for {most} layers, the file holds {len(got)} tensors")
    with torch.device("meta"):
        net = build_network(cfg, prep, text_config=text_config, offline=True)
    want: dict[str, tuple] = {}
    seen: set[int] = set()
    for k, v in net.state_dict(keep_vars=True).items():  # as stored_names: a shared tensor once
        if v.numel() and id(v) in seen:
            continue
        seen.add(id(v))
        want[k] = tuple(v.shape)
    odd = sorted(set(want) ^ set(got))
    if odd:
        raise RuntimeError(f"{'unexpected' if odd[0] in got else 'missing'} tensor {odd[0]}")
    for k, shape in want.items():
        if got[k] != shape:
            raise RuntimeError(f"{k} is {got[k]} in the file, {shape} in the network")


def _layer_counts(cfg, text_config) -> list:
    """The config values that set how many modules get built (each holds at least one stored tensor)."""
    counts = [cfg.fusion.layers]
    if "text" in cfg.modalities and cfg.text.encoder == "lstm":
        counts.append(cfg.text.layers)
    if "text" in cfg.modalities and cfg.text.encoder == "hf" and isinstance(text_config, dict):
        counts.append(text_config.get("num_hidden_layers"))
    return counts
