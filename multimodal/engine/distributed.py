"""Training on several processes with PyTorch's own engine (torchrun + DistributedDataParallel).

The commands stay the same: `torchrun --nproc_per_node=N $(which mmdx) train ...` sets WORLD_SIZE,
RANK and LOCAL_RANK, and everything below reads them. A plain process is rank 0 of 1 and none of this
runs. gloo on CPU, NCCL on GPU. Rank 0 fits the preprocessing, scores validation, stops early,
calibrates and saves; the other ranks receive its decisions and wait for it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def device_for_rank(requested: torch.device) -> torch.device:
    """One GPU per process (LOCAL_RANK) where the run is on CUDA."""
    if active() and requested.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return requested


def init(device: torch.device) -> None:
    if not active():
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` (a JSON value: no pickles, even between our own processes) on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    data = json.dumps(obj).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.long)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if is_main() else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.tolist()).decode())


def total(n: int) -> int:
    """The sum of `n` over ranks."""
    if not active():
        return n
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the network for the training steps; `net` itself stays what is validated and saved.
    Unused parameters are allowed: modality dropout and absent modalities leave encoders out of a step."""
    if not active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)
