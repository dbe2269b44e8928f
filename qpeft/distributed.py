"""The torch.distributed group of a run launched by torchrun / accelerate launch: who
this process is, and the few collectives and messages the pipeline needs (CPU gloo or
CUDA NCCL)."""

from __future__ import annotations

import os
import pickle
from collections import deque
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from an initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, or no torch.distributed run: the process that prints progress."""
    return rank_and_world()[0] == 0


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


class ObjectSender:
    """Sends picklable objects (tensors on the CPU) to rank `dst` without waiting for
    each to be received, up to `window` in flight: the sender keeps working while the
    receiver is busy. Object k goes with tags 2k and 2k + 1 (its size, its bytes),
    matched by `receive_object(src, k)`."""

    def __init__(self, dst: int, device: str | torch.device, window: int = 4) -> None:
        self.dst, self.device, self.window = dst, _object_device(device), window
        self.sent = 0
        self.in_flight: deque[tuple[list[Any], tuple[torch.Tensor, torch.Tensor]]] = deque()

    def send(self, obj: Any) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        if self.device is not None:
            data, size = data.to(self.device), size.to(self.device)
        tag = 2 * self.sent
        works = [torch.distributed.isend(size, self.dst, tag=tag), torch.distributed.isend(data, self.dst, tag=tag + 1)]
        self.in_flight.append((works, (size, data)))  # the buffers live until sent
        self.sent += 1
        while len(self.in_flight) > self.window:
            self._wait_oldest()

    def close(self) -> None:
        while self.in_flight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        for work in self.in_flight.popleft()[0]:
            work.wait()


def receive_object(src: int, index: int, device: str | torch.device) -> Any:
    """Object number `index` (counting from 0) that rank `src`'s `ObjectSender` sent."""
    staging = _object_device(device) or torch.device("cpu")
    size = torch.empty(1, dtype=torch.int64, device=staging)
    torch.distributed.recv(size, src, tag=2 * index)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=staging)
    torch.distributed.recv(data, src, tag=2 * index + 1)
    return pickle.loads(data.cpu().numpy().tobytes())


def _object_device(device: str | torch.device) -> torch.device | None:
    """Where NCCL stages pickled objects (this process's GPU); None for gloo."""
    device = torch.device(device)
    return device if device.type == "cuda" else None
