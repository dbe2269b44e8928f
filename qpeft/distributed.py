"""The torch.distributed group of a run launched by torchrun / accelerate launch: who
this process is, and the few collectives and messages the pipeline needs (CPU gloo or
CUDA NCCL)."""

from __future__ import annotations

import os
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from an initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Join the process group when launched by torchrun / accelerate launch (WORLD_SIZE
    > 1): gloo on CPU, NCCL on GPUs. Returns this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or not torch.distributed.is_available():
        return device
    cuda = torch.device(device).type == "cuda"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else device


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """The sum of `tensor` over the group's processes, as a new tensor where `tensor`
    was (NCCL reduces on `device`, the process's GPU; gloo on the CPU)."""
    if rank_and_world()[1] == 1:
        return tensor.clone()
    work = tensor.to(device, copy=True)
    torch.distributed.all_reduce(work)
    return work.to(tensor.device)


def broadcast_object(obj: Any, device: str | torch.device) -> Any:
    """Rank 0's `obj` on every process (picklable; NCCL sends it through `device`)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=_object_device(device))
    return box[0]


def send_object(obj: Any, dst: int, device: str | torch.device) -> None:
    """Send a picklable object (tensors on the CPU) to rank `dst`, which `receive_object`s it."""
    torch.distributed.send_object_list([obj], dst=dst, device=_object_device(device))


def receive_object(src: int, device: str | torch.device) -> Any:
    box = [None]
    torch.distributed.recv_object_list(box, src=src, device=_object_device(device))
    return box[0]


def _object_device(device: str | torch.device) -> torch.device | None:
    """Where NCCL stages pickled objects (this process's GPU); None for gloo."""
    device = torch.device(device)
    return device if device.type == "cuda" else None
