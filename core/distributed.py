"""Training on several processes at once: torchrun and PyTorch's DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 -m core.train --preset layernorm --out runs/ddp

torchrun starts one process per GPU (or per share of the CPU cores) and tells each where it
stands in its environment: RANK (0 .. WORLD_SIZE-1 across all machines), LOCAL_RANK (on this
machine) and WORLD_SIZE. Every process holds a whole copy of the model and trains on batches
of its own; DistributedDataParallel averages the gradients across processes during backward,
so every copy takes the same step, as one process would on all the batches at once.

Without these variables nothing here does anything: the plain single-process path runs.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def backend_for(device: str) -> str:
    """nccl moves gradients from GPU to GPU; gloo works on CPUs. device: TrainConfig.device."""
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_gpu else "gloo"


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the process group torchrun set up, and leave it at the end; outside torchrun, do
    nothing. device is TrainConfig.device: it picks the backend."""
    if not under_torchrun():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this process's GPU
    dist.init_process_group(backend)  # reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    # On an exception the teardown is skipped: it is collective and could hang while other ranks
    # wait in a collective; torchrun stops them once this process exits with its traceback.
    yield
    # Leave together: rank 1 tearing gloo down while rank 0 still evaluated and saved made rank 1
    # abort ("terminate called without an active exception") in 1 of 8 runs of the torchrun test
    # (0 of 32 with the barrier).
    dist.barrier()
    dist.destroy_process_group()


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside a process group."""
    if in_process_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over all processes (a collective: every rank must call it), or t alone."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return t
    total = t.clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total / world_size
