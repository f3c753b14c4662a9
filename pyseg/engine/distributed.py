"""Process-group helpers: set up from torchrun's environment (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "cleanup_distributed", "is_dist", "rank", "world_size", "is_main", "barrier",
           "all_gather_object", "ShardSampler", "reduce_mean"]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_distributed(device: torch.device) -> tuple[int, int, int]:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns (rank, world_size, local_rank). Backend: nccl for CUDA devices, gloo otherwise. On CUDA each process
    uses ``cuda:<LOCAL_RANK>``.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if ws > 1 and not is_dist():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return rank(), world_size(), local


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_mean(value: float, device) -> float:
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r gets indices r, r+W, r+2W, … — every sample exactly once over all ranks (no
    padding duplicates, unlike ``DistributedSampler``), so summed confusion matrices equal a single process's."""

    def __init__(self, n: int, num_replicas: int | None = None, rank_: int | None = None):
        self.n = n
        self.world = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))
