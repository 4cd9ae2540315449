"""An ONNX copy of a model's network, run by ONNX Runtime in place of the PyTorch forward pass.

On a CPU, ONNX Runtime runs the same CNN about 2x faster than eager PyTorch (BENCHMARKS.md, throughput),
and batch prediction is mostly forward pass. mmdx keeps decoding and preprocessing (they are the
same code either way), so only the network is exported: calibrated logits from the collated tensors.
`DiagnosisModel.load(dir, onnx=file)` then builds no PyTorch network and imports no timm.

The file is written beside the model directory, never into it; its own sha256 (with its size and
inputs) is recorded in the model directory's exports.json, which the directory's checksums cover
(artifact.record_export). Predict runs only a file whose size and then sha256 are recorded there: an
edited graph or initializer, another model's graph, or a graph built to allocate without bound is
refused before ONNX Runtime parses it, and nothing is read from the file's own metadata. An ONNX graph
is data, not code: ONNX Runtime runs only its built-in operators, and no custom-op library is ever
registered.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from multimodal.data.batches import MODALITY_KEYS
from multimodal.errors import UserError
from multimodal.output import atomic_file

# The collated tensors a network may take, in the order the graph takes them.
INPUTS = tuple(k for keys in MODALITY_KEYS.values() for k in keys.graph)
# only the batch size and the number of present images vary (graph_inputs pads views and tokens)
_AXES = {k: {0: "images" if k in ("image", "image_slot") else "batch"} for k in INPUTS}
TOLERANCE = 1e-4  # largest |probability difference| export accepts against the PyTorch network


def graph_inputs(batch: dict, cfg, pad_id: int = 0) -> dict:
    """The collated batch as the graph takes it. Images: only the present ones, [N, C, H, W], with
    image_slot[n] = b * max_images + v, so the CNN runs on what is there and not on padding. Text:
    padded to text.max_length (masked, so outputs are unchanged): the traced attention has its sequence
    length built in."""
    out = dict(batch)
    if "image" in batch:
        img, mask = batch["image"], batch["image_mask"]
        V = cfg.image.max_images - mask.shape[1]
        if V > 0:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], V)], 1)
        slot = mask.reshape(-1).nonzero(as_tuple=True)[0]
        present = img.reshape(-1, *img.shape[2:])[batch["image_mask"].reshape(-1)]
        if not len(slot):  # no image in the batch: one blank image in a masked slot keeps the shapes valid
            slot, present = slot.new_zeros(1), img.new_zeros(1, *img.shape[2:])
        out["image"], out["image_slot"], out["image_mask"] = present.contiguous(), slot, mask
    if "text_ids" in batch:
        L = cfg.text.max_length - batch["text_ids"].shape[1]
        if L > 0:
            ids = batch["text_ids"]
            out["text_ids"] = torch.cat([ids, ids.new_full((ids.shape[0], L), pad_id)], 1)
            out["text_mask"] = torch.cat([batch["text_mask"], batch["text_mask"].new_zeros(ids.shape[0], L)], 1)
    return out


class _Graph(torch.nn.Module):
    def __init__(self, net, keys: list[str]):
        super().__init__()
        self.net, self.keys = net, keys

    def forward(self, *xs):
        return self.net(dict(zip(self.keys, xs)))


def _pad_id(model) -> int:
    return model.prep.text.pad_id if model.prep.text is not None else 0


def _weights_digest(model) -> str:
    if model.model_dir is None:
        raise UserError("export and --onnx need a saved model: DiagnosisModel.load(dir) or --model DIR")
    sums = json.loads((Path(model.model_dir) / "checksums.json").read_text())
    return sums["model.safetensors"]


def _paired(model, path: Path) -> dict:
    """The record export made of this very file in the model directory: the size must be one recorded
    (so a huge file is never read), then the sha256 (read no further than that size)."""
    from multimodal.model.artifact import exports
    from multimodal.output import sha256_file
    from multimodal.pretrained import regular_file

    _weights_digest(model)  # a saved model
    size = regular_file(path, "ONNX file")
    recs = exports(model.model_dir)
    rec = recs.get(sha256_file(path, max_bytes=size)) if any(r["bytes"] == size for r in recs.values()) else None
    if rec is None:
        raise UserError(f"{path} was not exported from {model.model_dir} (its sha256 is not recorded in "
                        f"{model.model_dir}/exports.json); run mmdx export again")
    return rec


_ARENA: list[int] = []  # the cap of the process's one CPU arena, once registered with ONNX Runtime


def _capped_arena() -> int:
    """Every tensor a graph allocates comes from one CPU arena capped at half this machine's memory: a
    graph that asks for more (one edited together with its record in exports.json) fails in one line
    instead of driving the machine into swap or the OOM killer. Same speed as ONNX Runtime's own arena."""
    import onnxruntime as ort

    if not _ARENA:
        cap = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({"max_mem": cap}))
        _ARENA.append(cap)
    return _ARENA[0]


def _session(path: Path, threads: Optional[int] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    _capped_arena()
    opts.add_session_config_entry("session.use_env_allocators", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
        raise UserError(f"{path}: not an ONNX model ({' '.join(str(e).split())[:120]})") from None


def _example_batch(model, records) -> dict:
    from multimodal.data.batches import RecordDataset
    from multimodal.data.batches import make_loader

    rec = model.records(records)
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config, views="first")
    dl = make_loader(ds, model.config, model.prep, False, torch.device("cpu"), 8)
    for batch in dl:
        if batch["ok"].all():
            return batch
    raise UserError(f"{rec.source}: no batch of 8 records that all load; export needs example records")


def export_onnx(model, out, records, opset: int = 17) -> dict:
    """Trace the network on a batch of `records` into `out` (.onnx), check ONNX Runtime agrees with
    PyTorch on that batch within TOLERANCE, and return {"path", "max_abs_diff", "inputs"}."""
    from multimodal.output import sha256_file

    from multimodal.model.artifact import record_export

    digest = _weights_digest(model)
    net = model.net.to("cpu").eval()
    batch = graph_inputs(_example_batch(model, records), model.config, _pad_id(model))
    keys = [k for k in INPUTS if k in batch]
    graph = _Graph(net, keys).eval()
    args = tuple(batch[k] for k in keys)
    with torch.no_grad():
        ref = graph(*args).numpy()

    def write(tmp: str) -> None:
        with warnings.catch_warnings():  # shapes the graph fixes on purpose (image size, token grid)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the BiLSTM's initial states are made from the batch's own size inside the graph
            warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1")
            torch.onnx.export(graph, args, tmp, dynamo=False, input_names=keys, output_names=["logits"],
                              dynamic_axes={k: _AXES[k] for k in keys} | {"logits": {0: "batch"}},
                              opset_version=opset)

    path = atomic_file(out, write, inputs=[model.model_dir])
    try:
        got = _session(path).run(None, {k: batch[k].numpy() for k in keys})[0]
        diff = float(np.abs(torch.sigmoid(torch.from_numpy(got)) - torch.sigmoid(torch.from_numpy(ref))).max())
        if diff > TOLERANCE:
            raise UserError(f"export: ONNX Runtime differs from PyTorch by {diff:.2g} (over {TOLERANCE}); not written")
        record_export(model.model_dir, sha256_file(path), {"bytes": path.stat().st_size, "inputs": keys}, digest)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return {"path": str(path), "max_abs_diff": diff, "inputs": keys}


class OnnxNetwork:
    """Stands in for the PyTorch network in run_inference: same batch dict in, calibrated logits out."""

    def __init__(self, path, model, threads: Optional[int] = None):
        self.path = path = Path(path)
        self.keys = _paired(model, path)["inputs"]
        self.session = _session(path, threads)
        if sorted(i.name for i in self.session.get_inputs()) != sorted(self.keys):
            raise UserError(f"{path}: the graph's inputs are not the ones {model.model_dir}/exports.json records")
        if "image" in self.keys and "image_slot" not in self.keys:
            raise UserError(f"{path} has the padded image layout of an older mmdx; run mmdx export again")
        self.num_outputs = model.prep.labels.num_outputs
        self.cfg, self.pad_id = model.config, _pad_id(model)

    def eval(self):
        return self

    def __call__(self, batch: dict, absent=None) -> torch.Tensor:
        if absent:
            raise UserError("absent= needs the PyTorch network; predict without --onnx")
        if "image_group" in batch:  # image.predict_views: all; each group fits the graph's layout
            from multimodal.model.network import over_view_groups

            return over_view_groups(batch, self)
        batch = graph_inputs(batch, self.cfg, self.pad_id)
        try:
            return torch.from_numpy(self.session.run(None, {k: batch[k].numpy() for k in self.keys})[0])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            raise UserError(f"{self.path}: ONNX Runtime could not run the graph (the arena is capped at "
                            f"{_capped_arena() / 2**30:.0f} GiB): {' '.join(str(e).split())[:160]}") from None
