"""
ddp.py: several processes (torchrun). Each process samples its share of the questions and trains on
its share of every minibatch; these helpers sum and gather across processes, and are no-ops in a
single process.
"""
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from flags import fail


def init(device: str) -> str:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU); returns this
    process's device. Only the first process prints."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")
    return device


def leave() -> None:
    """Leave the process group before exiting: gloo's threads can otherwise abort the process at
    exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def world_size() -> int:
    """The number of processes, known before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_split(cfg) -> None:
    """grpo.py's flags that must divide among the processes, and what runs in one process only."""
    world = world_size()
    if world > 1 and (cfg.dynamic_sampling or cfg.pool_size):
        fail("--dynamic_sampling and --pool_size run in one process for now (not under torchrun)")
    for name in ("exploration_batchsize", "batch_size"):
        if getattr(cfg, name) % world:
            fail(f"--{name} {getattr(cfg, name)} does not divide among {world} processes: use a "
                 f"multiple of {world}")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def sum_gradients(params: list) -> None:
    """Each parameter's .grad summed over all processes, as one flat tensor (one sync)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = all_sum(torch.cat([torch.zeros_like(p).flatten() if p.grad is None
                              else p.grad.flatten() for p in params]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def gather(rows: list) -> list:
    """Every process's rows, in rank order, on every process."""
    if not dist.is_initialized():
        return rows
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def progress(**kw):
    """A progress bar, shown by the first process only."""
    return tqdm(**kw, leave=False, dynamic_ncols=True, disable=rank_world()[0] > 0)
