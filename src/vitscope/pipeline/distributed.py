"""``analyze`` under ``torchrun``: the chunks are split across the processes of one job.

Every chunk is independent (its own partial sums, merged in chunk order by the final steps), so a
job of N processes writes the same chunk folders as one process would: each rank takes the next
unfinished chunk whenever it is free (:meth:`Job.take_turns`). Once every rank is done, the final steps run on rank 0,
except the two that cost most, which are shared out too: the pattern catalogues (one autoencoder per
rank) and then the pruning curves (the curve images in fixed groups, taken by whichever rank is
free, their sums added in group order on rank 0). The run is therefore the same, bit for bit, for any number of processes, and
a run started with N resumes with M.

The run folder's lock belongs to the job: rank 0 takes it and records the job's id, the other
ranks check that the holder is their own job, and any other command is refused as usual.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

T = TypeVar("T")

#: How long a rank waits for the others (a chunk can take long on a big model; a dead rank makes
#: torchrun stop the job long before this).
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Job:
    """This process's place in the job: ``rank`` of ``world`` processes (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    job_id: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, item: int) -> bool:
        """Whether item ``item`` of a fixed round-robin split is this process's (``item % world == rank``)."""
        return item % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0, its value (or the error it raised) given to every rank.

        An error on rank 0 is raised on every rank, so no rank waits for a step that never comes.
        """
        if self.world == 1:
            return make()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except BaseException as e:  # handed to the other ranks, then re-raised here
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if self.is_main:
                raise value
            raise type(value)(*value.args) if isinstance(value, Exception) else RuntimeError(str(value))
        return value


    def everyone(self, make: Callable[[], T]) -> list[T]:
        """``make()`` run on every rank at once; every rank gets the list of all ranks' values, in
        rank order. An error on any rank is raised on every rank (none waits for a value that never
        comes)."""
        if self.world == 1:
            return [make()]
        import torch.distributed as dist

        try:
            mine: tuple[str, Any] = ("ok", make())
        except BaseException as e:  # handed to the other ranks, then re-raised here
            mine = ("error", e)
        boxes: list[Any] = [None] * self.world
        dist.all_gather_object(boxes, mine)
        for rank, (kind, value) in enumerate(boxes):
            if kind == "error":
                if rank == self.rank:
                    raise value
                raise type(value)(*value.args) if isinstance(value, Exception) else RuntimeError(f"rank {rank} failed: {value!r}")
        return [value for _, value in boxes]


    def take_turns(self, counter: "os.PathLike[str] | str", n: int) -> Iterator[int]:
        """The indices ``0..n-1`` shared out as the ranks ask for them: each rank gets the next
        unclaimed index whenever it is free, so a rank that started late or has cheaper items takes
        more. ``counter`` is a file in the run folder (which every rank sees) that holds the next
        index; :func:`reset_turns` must have set it to 0 (on one rank, before any rank starts).
        One process simply counts.

        Which rank takes which index varies from run to run; callers keep results by index.
        """
        if self.world == 1:
            yield from range(n)
            return
        import fcntl

        path = os.fspath(counter)
        while True:
            with open(path, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # (released when the file closes)
                i = int(f.read() or 0)
                f.seek(0)
                f.write(str(i + 1))
                f.truncate()
            if i >= n:
                return
            yield i


def reset_turns(counter: "os.PathLike[str] | str") -> None:
    """Start the shared counter of :meth:`Job.take_turns` at 0 (call on one rank, before the others start)."""
    with open(os.fspath(counter), "w") as f:
        f.write("0")


def current_job(device: Any = None) -> Job:
    """The job this process belongs to; under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is
    started here when the caller has not (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Job()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = str(device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    job_id = os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return Job(rank=rank, world=world, local_rank=local_rank, job_id=job_id)


def device_for(job: Job, device: Any) -> Any:
    """One device per rank: ``cuda`` (or the default on a CUDA machine) becomes ``cuda:<local rank>``."""
    if job.world == 1:
        return device
    import torch

    if (device is None and torch.cuda.is_available()) or str(device) == "cuda":
        return f"cuda:{job.local_rank}"
    return device
