"""Training one run on several processes with ``torch.distributed`` (DDP): NCCL on CUDA, gloo on
the CPU. Rank 0 alone writes the run folder (record, metrics, checkpoint, W&B); every rank trains
on its own share of the same seeded global batch.

A run becomes distributed in one of three ways, all read from the environment:

* ``torchrun --nproc_per_node=N -m harness.train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
* ``trainer.devices=N`` makes ``arena-train`` start that torchrun command itself;
* Hydra's submitit launcher with ``hydra.launcher.tasks_per_node=N`` starts N tasks of the job;
  submitit's environment (``SUBMITIT_*``/``SLURM_*``) gives each its rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process sits among the processes that train one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world torchrun or submitit describe in the environment (one process when neither)."""
    if "WORLD_SIZE" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        export_submitit_environment()
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return World()
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def export_submitit_environment() -> None:
    """Turn a submitit task's environment into torchrun's variables (rank, world size, master)."""
    try:
        import submitit
    except ImportError:
        return
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def start(world: World, device: torch.device) -> None:
    """Join the process group of ``world`` (once per process)."""
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.size)


def device_of(world: World, device: torch.device) -> torch.device:
    """Each rank's own GPU on CUDA (``cuda:<local rank>``); the CPU is shared."""
    if world.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sums of ``values`` over every rank (the values themselves in one process)."""
    if not world.distributed:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(obj, world: World):
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def finish(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
