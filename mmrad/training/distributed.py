"""Data-parallel training with torch.distributed (DDP): who am I, and how to start N of me.

``mmrad train`` runs unchanged on 1 or N processes. Under ``torchrun`` (which
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) each process
joins the process group: gloo on the CPU, nccl on GPUs (one GPU per process,
``cuda:LOCAL_RANK``). Every process builds the same model from the same seed;
DDP all-reduces (averages) the trainable gradients.

What we guarantee: step k on N processes uses exactly the cases and the
simulated anomalies of step k on one process (the global batch of
``train.batch_size`` cases is split into N equal contiguous shards, and the
anomaly of case j of step k is seeded by (seed, step, j), not by the
process). Every loss is a mean over equally sized shards, so the averaged
gradient is the one-process gradient; the trained weights and the logged
losses equal the one-process run up to floating-point summation order
(tests/unit/training/test_distributed.py: 2 gloo processes vs 1). Only rank 0 writes
checkpoints, the model, metrics and logs.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmrad.core.errors import DataError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def under_launcher() -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group when launched as one of N; returns (context, this process's device)."""
    if not under_launcher():
        return Context(), device
    context = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if not context.is_main:  # one voice in the log: rank 0's
        logging.getLogger("mmrad").setLevel(logging.WARNING)
    return context, device


def stop(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(batch_size: int, context: Context) -> range:
    """The positions in the global batch this process trains on (equal contiguous shards)."""
    if batch_size % context.world:
        raise DataError("params.yaml", f"train.batch_size ({batch_size}) must be divisible by the number of "
                                       f"training processes ({context.world}): each takes an equal shard")
    size = batch_size // context.world
    return range(context.rank * size, (context.rank + 1) * size)


def mean_across(values: dict[str, float], context: Context) -> dict[str, float]:
    """The mean of per-process values (the global batch's loss from the shards' losses)."""
    if not context.active:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / context.world for k, v in zip(keys, tensor.tolist())}


def launch_command(processes: int, argv: list[str]) -> list[str]:
    """torchrun for ``mmrad <argv>`` on ``processes`` local processes (what ``train.processes > 1`` runs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "mmrad", *argv]
