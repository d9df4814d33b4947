"""Data-parallel training on several processes (PyTorch DDP): who this process is, how the
processes are started, and what each one draws.

Two ways in, one code path:

- ``focaltrack train --nproc N`` starts N processes itself (`launch`): loopback, a free
  port, ranks 0…N-1 on this machine;
- ``torchrun --nproc-per-node N --no-python focaltrack train ...`` (or any launcher that
  sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``):
  `from_env` finds the variables and joins the process group torchrun describes, which
  may span several nodes.

Backend: NCCL when the ranks train on CUDA GPUs (rank ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``),
gloo on CPUs. What each rank does differently from a single-process run is decided by the
functions here: `rank_seed` (its own batches), `rank_batch` (its share of the global
batch), `rank_threads` (its share of the cores).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from focaltrack.common.errors import FocaltrackError

#: The variables a launcher (torchrun, `launch`) sets for every rank.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(FocaltrackError, RuntimeError):
    """A rank of a multi-process training could not start or failed: the message says which."""


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: the ranks on this machine (torchrun's LOCAL_WORLD_SIZE); None: all of them
    local_world_size: int | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, writes the bundle and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ranks_here(self) -> int:
        return self.world_size if self.local_world_size is None else self.local_world_size


SINGLE = Rank()


def from_env(environ: dict[str, str] | None = None) -> Rank | None:
    """The rank a launcher such as torchrun gave this process, or None when started alone.

    A world of one (``torchrun --nproc-per-node 1``) counts as started by a launcher: it
    still joins a process group, so a one-process DDP run can be compared with a plain one.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    missing = [v for v in ENV_VARS if v not in env]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE and RANK are set but {', '.join(missing)} not: start distributed "
            "training with torchrun or focaltrack train --nproc N"
        )
    try:
        local = env.get("LOCAL_WORLD_SIZE")
        r = Rank(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env["LOCAL_RANK"]),
            None if local is None else int(local),
        )
    except ValueError as e:
        raise DistributedError(f"bad RANK / WORLD_SIZE / LOCAL_RANK: {e}") from e
    if not 0 <= r.rank < r.world_size:
        raise DistributedError(f"RANK {r.rank} is outside WORLD_SIZE {r.world_size}")
    return r


def rank_seed(seed: int, rank: Rank) -> int:
    """The synthesizer seed of ``rank``: ``seed`` itself in a world of one (a single-process
    run draws exactly what it always drew), else the rank-th child of a NumPy SeedSequence
    of (seed, world size): independent streams, fixed by the seed and the world size."""
    if rank.world_size == 1:
        return seed
    # modulo 2⁶⁴: SeedSequence takes no negative entropy (the CLI's --seed may be negative)
    children = np.random.SeedSequence([seed % 2**64, rank.world_size]).spawn(rank.world_size)
    # torch.Generator takes 64 bits; the sign bit is left clear
    return int(children[rank.rank].generate_state(1, np.uint64)[0] >> np.uint64(1))


def rank_batch(global_batch: int, rank: Rank) -> int:
    """This rank's share of a preset's (global) batch: equal shares, the first
    ``global_batch % world_size`` ranks one more, so the shares add up to the global batch."""
    if rank.world_size > global_batch:
        raise ValueError(
            f"{rank.world_size} processes for a batch of {global_batch}: at most one process "
            "per batch element"
        )
    q, r = divmod(global_batch, rank.world_size)
    return q + (1 if rank.rank < r else 0)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def rank_threads(rank: Rank, cores: int | None = None) -> int:
    """CPU threads per rank: this machine's cores shared out over the ranks on it, so they
    do not oversubscribe them."""
    return max(1, (usable_cores() if cores is None else cores) // rank.ranks_here)


def rank_device(device: str | None, rank: Rank) -> torch.device:
    """The device of ``rank``: ``cuda:LOCAL_RANK`` when training on GPUs (auto or cuda),
    else the CPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type != "cuda":
        return d
    if not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    if d.index is not None and rank.world_size > 1:
        raise ValueError(
            f"--device {device} with {rank.world_size} processes: each process takes the GPU "
            "of its local rank; pass --device cuda"
        )
    if rank.local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"local rank {rank.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
            "start at most one process per GPU"
        )
    return torch.device("cuda", rank.local_rank)


def init_process_group(rank: Rank, device: torch.device) -> None:
    """Join the process group described by the launcher's variables (NCCL on GPUs)."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=rank.rank,
        world_size=rank.world_size,
    )


def is_initialized() -> bool:
    return bool(dist.is_available() and dist.is_initialized())


def backend() -> str | None:
    return str(dist.get_backend()) if dist.is_initialized() else None


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` in DistributedDataParallel when a process group is up, else ``net``.

    DDP broadcasts rank 0's parameters and buffers at construction (the ranks start equal),
    averages the gradients during ``backward`` (so the ranks step equally), and broadcasts
    rank 0's BatchNorm running statistics before every forward. The gradient buckets are
    views of the gradients (no copy; and the channels-last gradients keep their layout).
    """
    if not is_initialized():
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        net,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch(nproc: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``fn(rank, *args, **kwargs)`` in ``nproc`` new processes on this machine, each with the
    launcher's variables set and the process group joined; returns when all have ended.

    ``fn`` and its arguments must be picklable (a module-level function): the processes are
    started with ``spawn``. If one fails, the others are stopped and a `DistributedError`
    names the failing rank and its error's last line.
    """
    from torch.multiprocessing.spawn import (
        ProcessExitedException,
        ProcessRaisedException,
        spawn,
    )

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, not {nproc}")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    try:
        spawn(_rank_main, args=(nproc, env, fn, args, kwargs), nprocs=nproc, join=True)
    except ProcessRaisedException as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise DistributedError(
            f"training process {e.error_index} failed: {lines[-1] if lines else e}"
        ) from None
    except ProcessExitedException as e:
        raise DistributedError(
            f"training process {e.error_index} ended with exit code {e.exit_code}"
        ) from None


def _rank_main(
    index: int,
    nproc: int,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nproc))
    # one machine: gloo talks over loopback (it otherwise picks the interface the host
    # name resolves to, which a container or laptop may not have)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    fn(Rank(index, nproc, index), *args, **kwargs)
