"""Which process am I: rank, world size, device and a barrier, for sharding stage 2 over processes.

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) this is
``accelerate.PartialState``: NCCL on GPUs (one device per process, ``cuda:<local rank>``), gloo on
CPU-only machines. A plain ``python 02_augment_sd.py`` gets the one-process :class:`Dist` without
importing torch or accelerate; the stage runs the same shard/merge code either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from ..errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
# Ranks wait at barriers for the slowest shard (hours of SD on a big dataset); the launcher kills
# every rank when one fails, so a long timeout never turns into a silent hang.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Dist:
    """One process of a ``world``-process run (``world == 1``: a plain run)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # None: the default (cuda when available, else cpu)
    _barrier: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for one process)."""
        if self.world > 1 and self._barrier is not None:
            self._barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world``-th item from ``rank`` (balanced, disjoint)."""
        return list(items[self.rank::self.world])

    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


def world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(key)
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None
    return 1


def get_dist() -> Dist:
    """The current process's :class:`Dist`; initialises the process group under a launcher."""
    if world_size_from_env() <= 1:
        return Dist()
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    kwargs = {} if torch.distributed.is_initialized() else {"timeout": BARRIER_TIMEOUT}
    state = PartialState(cpu=cpu, **kwargs)
    if state.num_processes <= 1:
        log.warning("WORLD_SIZE > 1 but accelerate found no process group: running as one process")
        return Dist()
    log.info("augment: process %d of %d on %s (%s)", state.process_index, state.num_processes, state.device,
             state.distributed_type)
    return Dist(rank=state.process_index, world=state.num_processes, device=str(state.device),
                _barrier=state.wait_for_everyone)
