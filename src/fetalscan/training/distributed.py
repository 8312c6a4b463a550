"""Data-parallel fine-tuning across processes and machines (PyTorch DDP through torchrun).

``fetalscan train`` and ``fetalscan cv`` with ``--mode finetune --strategy ddp --devices N
--num-nodes M`` train every network of the run with ``torch.nn.parallel.DistributedDataParallel``
(Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
VLDB 13(12)): N processes per machine on M machines, NCCL between GPUs, gloo between CPU
processes. The default ``cached`` mode needs none of this: it embeds each image once with a
frozen backbone and trains a small head on the cached features in seconds.

How it is run
-------------
- One machine: ``fetalscan train ... --strategy ddp --devices 2`` starts ``torchrun
  --standalone --nproc-per-node 2`` on the same command line (:func:`launch_local`).
- Several machines (Slurm, see ``docs/scale.md``): launch ``torchrun --nnodes M
  --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m fetalscan train ...``
  on every node; each worker finds ``RANK`` / ``WORLD_SIZE`` in its environment and joins
  (:func:`process_group`).

What each process does
----------------------
Every rank decodes the images, builds the same folds and makes the same calls; only the
fine-tuning itself (:func:`fetalscan.training.loop.fit_finetune`) talks to the others:

- *Sampling.* Every rank draws the same seeded permutation of the training images each
  epoch (the single-process order; like ``DistributedSampler``'s ``seed + epoch``, the same
  on all ranks), cuts it into the same global batches of ``batch_size`` images, and takes
  its share ``batch[rank::world]`` (:func:`rank_share`). The global batches are therefore
  exactly those of a single-process run.
- *Loss.* Each rank's loss is its share of the class-weighted mean over the *global* batch
  (times the world size, because DDP averages gradients), so the averaged gradient is the
  single-process gradient up to float rounding. Reported training and validation losses are
  summed over ranks (all-reduce) and the validation loss of rank 0 is broadcast, so early
  stopping decides the same epoch on every rank.
- *Files.* Only rank 0 writes (:func:`is_main`); the others run with no output folder.

Batch normalisation: on GPUs its layers become ``SyncBatchNorm`` (statistics of the global
batch, as in one process); on CPU (gloo, no ``SyncBatchNorm``) each process normalises with
its own share's statistics, so a network with batch norm trained on CPU processes is close
to, not equal to, its single-process twin. Augmentation and dropout draw from a per-rank
seed (rank 0 keeps the single-process seed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fetalscan.errors import FetalscanError

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp")

#: Offset between the augmentation / dropout seeds of consecutive ranks.
RANK_SEED_STRIDE = 104729

#: The variables torchrun (and ``srun`` with torchrun) sets in each worker.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistributedConfig:
    """How many processes train: ``strategy`` ``none`` (one process) or ``ddp``; ``devices``
    processes (GPUs, or CPU processes) per machine on ``num_nodes`` machines. The CLI maps
    ``--strategy``, ``--devices`` and ``--num-nodes`` onto these fields."""

    strategy: str = "none"
    devices: int = 1
    num_nodes: int = 1

    @property
    def world_size(self) -> int:
        return int(self.devices) * int(self.num_nodes)

    def validate(self, mode: str | None = None) -> None:
        """Refuse unknown strategies, counts below 1, and ``ddp`` outside fine-tuning (``mode``)."""
        if self.strategy not in STRATEGIES:
            raise FetalscanError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("devices", "num_nodes"):
            if int(getattr(self, name)) < 1:
                raise FetalscanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "none" and self.world_size > 1:
            raise FetalscanError(f"--devices {self.devices} --num-nodes {self.num_nodes} needs --strategy ddp "
                                 "(one process trains otherwise)")
        if self.strategy == "ddp" and mode is not None and mode != "finetune":
            raise FetalscanError(f"--strategy ddp needs --mode finetune (got --mode {mode}): the cached mode trains "
                                 "a small head on cached features in seconds and has nothing to distribute")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------- launching / joining


def launched() -> bool:
    """Whether this process was started by torchrun (its rank is in the environment)."""
    return all(k in os.environ for k in _LAUNCH_ENV)


def launch_local(argv: Sequence[str], config: DistributedConfig) -> int:
    """Run ``fetalscan <argv>`` in ``config.devices`` processes on this machine through
    ``torchrun --standalone`` and return its exit code (the first failing worker stops the others).

    Several machines cannot be started from here: each runs its own torchrun (docs/scale.md).
    """
    config.validate()
    if config.num_nodes > 1:
        raise FetalscanError(f"--num-nodes {config.num_nodes}: start torchrun on every machine (one launch per "
                             "node, e.g. srun ... torchrun --nnodes M --rdzv-endpoint HOST:PORT -m fetalscan ...; "
                             "docs/scale.md); fetalscan starts the processes itself only on one machine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.devices}",
           "-m", "fetalscan", *argv]
    log.info("starting %d processes: %s", config.devices, " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.devices)))
    return subprocess.run(cmd, env=env, check=False).returncode


@contextlib.contextmanager
def process_group(config: DistributedConfig, device: str = "auto") -> Iterator[DistContext | None]:
    """Join the torchrun process group for the block (``None`` and nothing done with ``strategy`` none).

    NCCL when the run is on CUDA (each process on GPU ``LOCAL_RANK``), gloo on CPU. The
    world size must be ``devices * num_nodes``. Ranks other than 0 report no progress.
    """
    if config.strategy != "ddp":
        yield None
        return
    if not launched():
        raise FetalscanError("--strategy ddp: this process was not started by torchrun (RANK, WORLD_SIZE, "
                             "LOCAL_RANK unset); run the command itself, which starts torchrun on one machine, or "
                             "launch it with torchrun on each machine (docs/scale.md)")
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world != config.world_size:
        raise FetalscanError(f"--devices {config.devices} x --num-nodes {config.num_nodes} = {config.world_size} "
                             f"processes, but torchrun started {world} (WORLD_SIZE); make them agree")
    local = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend)
    ctx = DistContext(dist.get_rank(), world, local, backend)
    if not ctx.is_main:  # rank 0 speaks for the run: the others report errors only
        from fetalscan import progress

        progress.enable(False)
        logging.getLogger("fetalscan").setLevel(logging.ERROR)
    log.info("DDP rank %d of %d (%s)", ctx.rank, world, backend)
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- inside the training loop


def active() -> DistContext | None:
    """The process group this process trains in, or ``None`` for single-process training."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       dist.get_backend())


def is_main() -> bool:
    """Whether this process writes files: always in one process, rank 0 in a process group."""
    ctx = active()
    return ctx is None or ctx.is_main


def rank_share(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's images of a global batch: ``batch[rank::world]`` (the shares partition the batch)."""
    return batch[ctx.rank::ctx.world_size]


def wrap(model: nn.Module, device: torch.device, ctx: DistContext) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (batch norm synchronised on CUDA); weights broadcast from rank 0."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index if device.index is not None
                                                          else torch.cuda.current_device()])
    return DistributedDataParallel(model)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over every rank (float64)."""
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device if active_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (so every rank takes the same decision on it)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device if active_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def active_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None
