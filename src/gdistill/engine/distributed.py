"""torchrun / DistributedDataParallel set-up and the few collective helpers the trainer needs.

``torchrun --nproc_per_node N -m gdistill train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; a
plain ``gdistill train`` runs as a single process with world size 1.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before the process
    group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str) -> torch.device:
    """Join the process group when launched by torchrun and return this process's device."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if world_size() > 1 and torch.cuda.is_available() and device_name != "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel, buffers not synchronised at each forward (as
    detectron2); the trainer broadcasts rank 0's after each step (:func:`broadcast_buffers`)."""
    # Recent torch (2.14 here) names it forward_sync_buffers and warns on broadcast_buffers.
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False}
    )


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, in one broadcast per dtype.

    DDP keeps the parameters identical but, with buffer sync off, each rank's BatchNorm running
    statistics follow its own batches: the evaluated shards, the EMA teacher and the saved
    checkpoint (rank 0's) would then be different models."""
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()


def weights_fingerprint(*modules: torch.nn.Module) -> list[float]:
    """A cheap per-tensor summary of modules' parameters and buffers, to check that ranks agree."""
    with torch.no_grad():
        return [
            float(t.double().sum())
            for m in modules
            for t in (*m.parameters(), *m.buffers())
        ]
