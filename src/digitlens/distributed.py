"""Several processes, one result: torchrun + DistributedDataParallel, with PyTorch's own tools.

``torchrun --standalone --nproc-per-node N -m digitlens train|explain ...`` starts N processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`context` joins
them into one process group (gloo on the CPU, NCCL on CUDA, chosen from the device).
``digitlens train|explain --nproc N`` calls torchrun for you (:func:`launch`).

Only rank 0 touches the run folder: it checks it, writes it and decides what every rank reads
(:func:`rank0_decides` broadcasts its result, or its error, so every rank stops with the same
one-line message instead of waiting forever at a barrier).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from digitlens.errors import DigitlensError

#: Seconds a rank waits for the others at a collective before giving up (``DIGITLENS_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 600


@dataclass
class DistContext:
    """This process's place in the group: rank, world size, local rank (GPU index on its node),
    the backend, and whether digitlens created the group (then it also destroys it)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def requested() -> bool:
    """True in a process started by torchrun with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def context(device: torch.device) -> DistContext | None:
    """Join (or reuse) the process group torchrun describes in the environment; None for one process.
    The backend is NCCL for a CUDA ``device``, gloo otherwise."""
    if not requested() and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise DigitlensError("torchrun: this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("DIGITLENS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       backend=dist.get_backend(), owns_group=owns)


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA under torchrun (one GPU per process),
    else ``device`` unchanged."""
    if device.type == "cuda" and requested():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise DigitlensError(f"--nproc: rank {index} has no GPU ({torch.cuda.device_count()} here); "
                                 "start at most one process per GPU")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def rank0_decides(ctx: DistContext | None, decide):
    """``decide()`` run on rank 0 only, its return value (any picklable object, between our own
    processes) given to every rank; a DigitlensError on rank 0 is raised on every rank."""
    if ctx is None:
        return decide()
    box = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", decide())
        except DigitlensError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise DigitlensError(value)
    return value


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (returned); unchanged for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext | None) -> None:
    """Wait until every rank got here (nothing for one process)."""
    if ctx is not None:
        dist.barrier()


def finish(ctx: DistContext | None) -> None:
    """Leave the group digitlens created (a group the caller created is left to the caller)."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, ctx: DistContext | None) -> slice:
    """This rank's contiguous share of ``n`` items (rank 0 first); everything for one process."""
    if ctx is None:
        return slice(0, n)
    per = -(-n // ctx.world_size)
    return slice(min(n, ctx.rank * per), min(n, (ctx.rank + 1) * per))


def launch(args: list[str], nproc: int, *, timeout: float | None = None) -> int:
    """Run ``python -m digitlens ARGS`` in ``nproc`` processes through torchrun (standalone rendezvous
    on this machine); returns torchrun's exit status. Each process gets one CPU thread per core share
    (torchrun's default sets OMP_NUM_THREADS=1)."""
    if nproc < 1:
        raise DigitlensError(f"--nproc {nproc}: must be at least 1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "digitlens", *args]
    try:
        return subprocess.run(command, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        raise DigitlensError(f"--nproc {nproc}: torchrun did not finish within {timeout:.0f} s") from None


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` option (what each torchrun process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out
