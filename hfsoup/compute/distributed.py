"""Data-parallel scoring under ``accelerate launch`` (one process per GPU, across nodes too).

hfsoup starts no processes of its own: ``accelerate launch [--num_processes N] -m hfsoup ...``
(or ``torchrun``) starts them and sets ``WORLD_SIZE``/``RANK``; :func:`processes` then joins
accelerate's process group (``PartialState``: NCCL on GPUs, gloo on CPUs). Every process
streams the same ingredients and holds the same soup; each scores its share of every split and
the outputs are gathered, so every process takes the same decisions. Only the main process
writes and pushes.

Note: accelerate's ``--cpu`` flag starts a single process unless MPI is set up
(``--mpirun_hostfile``); on a machine without GPUs, ``accelerate launch --multi_gpu
--num_processes N`` starts N processes through torchrun and hfsoup joins them over gloo.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from typing import Any

import torch


class Processes:
    """This process's place among the processes scoring together.

    Attributes:
        rank: this process's index (0 is the main process).
        world: how many processes there are (1: no ``accelerate launch``).
        local_rank: its index on this node (picks its GPU).
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj``, on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, n: int) -> range:
        """The items of ``0..n-1`` this process takes: every ``world``-th, from ``rank``."""
        return range(self.rank, n, self.world)

    def device(self) -> torch.device:
        """This process's default device: its node-local GPU, else the CPU."""
        if torch.cuda.is_available() and not _cpu_only():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def hardware(self, devices: list[str]) -> dict[str, Any]:
        """What every process ran on: ``{processes, nodes, devices: [{kind, name, count}]}``.

        ``devices`` are the devices this process used (``"cuda:0"``, ``"cpu"``); GPUs are counted
        once per node and index, the CPU once per process that computed on it.
        """
        mine = (socket.gethostname(), [_describe(d) for d in devices])
        seen: dict[tuple, dict[str, Any]] = {}
        hosts = set()
        for rank, (host, used) in enumerate(self.gather(mine)):
            hosts.add(host)
            for kind, name, index in used:
                key = (host, kind, index if kind == "cuda" else rank)
                seen.setdefault(key, {"kind": kind, "name": name})
        counts: dict[tuple[str, str], int] = {}
        for entry in seen.values():
            counts[(entry["kind"], entry["name"])] = (
                counts.get((entry["kind"], entry["name"]), 0) + 1
            )
        return {
            "processes": self.world,
            "nodes": len(hosts),
            "devices": [
                {"kind": kind, "name": name, "count": n}
                for (kind, name), n in sorted(counts.items())
            ],
        }


def _describe(device: str) -> tuple[str, str, int | None]:
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index or 0
        return "cuda", torch.cuda.get_device_name(index), index
    import platform

    return dev.type, platform.processor() or platform.machine() or dev.type, None


def _cpu_only() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def _from_env(keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return default


def _launched_world() -> int:
    return _from_env(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched), read from the
    environment alone: safe in error paths, where joining the process group could hang."""
    return _from_env(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)


@cache
def processes() -> Processes:
    """The processes of this run: joins accelerate's process group when launched with several.

    A single process (the usual case) needs no process group and gets ``Processes()``.
    """
    if _launched_world() <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only() or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, state.local_process_index)
