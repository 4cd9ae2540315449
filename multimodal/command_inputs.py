"""What a command reads, stated to the output guard (multimodal.output.guard) before any work.

The records file, the model directory and the ONNX file are named on the command line; the images are
named inside the records, so the guard gets them here (Many), resolved exactly as the loader resolves
them (records.checked picks the root, the image columns' cells split at ';', a relative path joins the
root).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from multimodal.errors import UserError
from multimodal.inputs import Many

CHUNK_ROWS = 50_000  # the image cells of a chunk at a time: a large records file is never held whole


def record_images(records, cfg, image_root=None) -> Optional[Many]:
    """Every image path `records` (a file) names for a model of `cfg`, lazily; None when none is read."""
    if records is None or cfg is None or "image" not in cfg.modalities:
        return None

    def paths() -> Iterator[Path]:
        from multimodal.data.preprocess.image import record_paths  # the CLI starts without pydicom
        from multimodal.data.records import iter_record_chunks

        try:
            for rec in iter_record_chunks(records, cfg, CHUNK_ROWS, image_root):
                for cells in zip(*(rec.df[c].to_numpy() for c in cfg.image.columns)):
                    for rel in record_paths(cells):
                        yield Path(rel) if Path(rel).is_absolute() else rec.root / rel
        except UserError:  # records the loader refuses name no image it reads; the command says why, its way
            return

    return Many(paths, f"an image that {records} names (an input of this run)")


def stored_config(model_dir, image_root=None):
    """The config a model directory was trained with, as DiagnosisModel.load uses it (the training image
    root dropped, `image_root` instead), read without checking or loading anything: only to name the
    images for the guard. None when it cannot be read; loading the model then refuses it in one line."""
    from multimodal.config import config_from_dict

    try:
        cfg = config_from_dict(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None
    cfg.data.image_root = image_root
    return cfg


def command_inputs(args, cfg=None) -> list:
    """Everything a command reads, from its parsed arguments: the files named on the command line, local
    weights the config names, and every image the records name (resolved with the model's config where
    there is a model, against --image-root)."""
    if cfg is None and getattr(args, "model", None):
        cfg = stored_config(args.model, args.image_root)
    named = [getattr(args, k, None)
             for k in ("records", "val", "predict", "predictions", "config", "model", "onnx", "image_weights")]
    weights = [w for w in (getattr(s, "pretrained", None) for s in (cfg.image, cfg.text)) if isinstance(w, str)] \
        if cfg else []  # a section is None when its modality is not used
    root = getattr(args, "image_root", None)
    return named + weights + [record_images(getattr(args, k, None), cfg, root) for k in ("records", "val", "predict")]
