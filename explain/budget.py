"""How many Integrated Gradients rows (path steps × patients) one forward/backward pass may hold.

Captum's default runs every step of every patient of a batch at once: 8 patients × 32 steps through a
three-network ensemble with two 160-px photographs each reached 18 GB and was killed by the OOM killer
without a line of output. The bound here comes from the machine and the model: the tensors autograd keeps
for the backward pass of one row, measured on one real row, against a share of the memory still available.
"""
from __future__ import annotations

import logging

import torch

from multimodal.runtime import available_memory

log = logging.getLogger("mmdx")

MEMORY_SHARE = 0.5
"""Share of the available memory the attribution passes may take; the rest is for everything else."""
OVERHEAD = 2.0
"""Peak memory of a forward/backward pass per byte autograd saves: the gradients, which are as large
as what they flow through, and the pass's transient buffers (measured in BENCHMARKS.md, explain memory)."""


def saved_bytes(net: torch.nn.Module, batch: dict) -> int:
    """Bytes autograd saves for backward in one forward pass over `batch`, with the pixels requiring a
    gradient as Integrated Gradients' do. Tensors saved twice are counted once, the weights not at all."""
    weights = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    batch = dict(batch)
    if "image" in batch:
        batch["image"] = batch["image"].detach().float().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(batch)
    return sum(seen.values())


def row_bytes(net: torch.nn.Module, row: dict) -> tuple[int, int]:
    """(bytes saved per row, bytes saved once per pass) from one record and the same record twice: what a
    pass keeps grows with its rows, while some of it (tensors derived from the weights) does not."""
    one = saved_bytes(net, row)
    two = saved_bytes(net, {k: _twice(v) for k, v in row.items()})
    per_row = max(two - one, 1)
    return per_row, max(one - per_row, 0)


def _twice(v):
    if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1:
        return torch.cat([v, v])
    if isinstance(v, list) and len(v) == 1:
        return v * 2
    return v


def largest_row(batch: dict) -> torch.Tensor:
    """Mask of the batch's costliest record to measure: most images, then most report tokens."""
    size = torch.zeros(len(batch["index"]), dtype=torch.long)
    for key, weight in (("image_mask", 1 << 20), ("text_mask", 1)):
        if key in batch:
            size += weight * batch[key].reshape(len(size), -1).sum(1).long().cpu()
    return torch.arange(len(size)) == int(size.argmax())


def rows_per_pass(net: torch.nn.Module, row: dict, most: int, device: torch.device, max_views: int = 1) -> int:
    """At most `most` rows per pass, fewer when OVERHEAD × what autograd saves for them would take more
    than MEMORY_SHARE of what `device` has available. `row`'s cost is scaled up as if it had `max_views`
    images (a later batch may have more than the measured record). Logged, so that a run stopped for
    memory after this has said what it planned to use."""
    per_row, once = (OVERHEAD * b for b in row_bytes(net, row))
    if "image_mask" in row:
        per_row *= max_views / max(int(row["image_mask"].sum()), 1)
    free = available_memory(device)
    rows = int(max(1, min(most, (MEMORY_SHARE * free - once) // per_row)))
    log.info("explain: %d Integrated Gradients rows per pass (about %.0f MB each, %.1f GB available); "
             "--internal-batch-size sets it", rows, per_row / 2**20, free / 2**30)
    return rows


__all__ = ["largest_row", "rows_per_pass", "row_bytes", "saved_bytes", "MEMORY_SHARE", "OVERHEAD"]
