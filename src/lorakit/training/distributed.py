"""Several processes, one model: PyTorch DistributedDataParallel under `torchrun`.

`torchrun --nproc-per-node N -m lorakit train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; each
process trains on its slice of every global batch (gloo on CPU, nccl on GPU) and gradients are
averaged. Only rank 0 writes files or prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainingError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> World:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is built for CPU only" if torch.version.cuda is None else "torch finds no GPU"
        raise TrainingError(f"--device cuda: no CUDA device is available ({why}); use --device cpu or auto")
    if device == "cuda" and size > 1:
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"--device cuda: process {local_rank} of this machine has no GPU of its own "
                f"({torch.cuda.device_count()} available); start at most that many processes"
            )
        device = f"cuda:{local_rank}"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if size == 1:
        return World(device=chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=chosen)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, value: float) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t.item())


def gather_rng(world: World, state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's random state (rank 0 saves them all), in rank order."""
    if not world.distributed:
        return [state]
    local = state.to(world.device)
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
