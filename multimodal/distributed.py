"""Training on several processes with PyTorch's own engine (torchrun + DistributedDataParallel).

The commands stay the same: `torchrun --nproc_per_node=N $(which mmdx) train ...` sets WORLD_SIZE,
RANK and LOCAL_RANK, and everything below reads them. A plain process is rank 0 of 1 and none of this
runs. gloo on CPU, NCCL on GPU. Rank 0 fits the preprocessing, scores validation, stops early,
calibrates and saves; the other ranks receive its decisions and wait for it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from multimodal.errors import UserError


@dataclass(frozen=True)
class ProcessState:
    """Where this process stands among torchrun's: the one place WORLD_SIZE, RANK and LOCAL_RANK are
    read (in the spirit of accelerate's PartialState). Streamed prediction shards by it too."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "ProcessState":
        env = os.environ
        world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, int(env.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def state() -> ProcessState:
    return ProcessState.from_env()


def world_size() -> int:
    return state().world


def rank() -> int:
    return state().rank


def active() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def device_for_rank(requested: torch.device) -> torch.device:
    """One GPU per process (LOCAL_RANK) where the run is on CUDA."""
    if active() and requested.type == "cuda":
        return torch.device("cuda", state().local_rank)
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
    size = _wire(torch.tensor([len(data)], dtype=torch.long))
    dist.broadcast(size, src=0)
    n = int(size.item())
    buf = _wire(torch.frombuffer(bytearray(data), dtype=torch.uint8) if is_main() else torch.empty(n, dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def total(n: int) -> int:
    """The sum of `n` over ranks."""
    return int(summed(torch.tensor([n], dtype=torch.long)).item())


def summed(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `t` over ranks, returned on the CPU."""
    if not active():
        return t
    import torch.distributed as dist

    w = _wire(t.clone())
    dist.all_reduce(w)
    return w.cpu()


def _wire(t: torch.Tensor) -> torch.Tensor:
    """`t` where the process group's collectives can take it: NCCL moves CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    return t.to(torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" else t


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around the network for the training steps; `net` itself stays what is validated and saved.
    Unused parameters are allowed: modality dropout and absent modalities leave encoders out of a step."""
    if not active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)
