"""torch.distributed glue for `torchrun`: which rank this is, which device it uses, and a barrier.

torchrun starts one process per GPU (or per CPU worker) and tells each its place
through `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (and `MASTER_ADDR`/`MASTER_PORT` for the
rendezvous). Ranks exchange no data: rank r scores shards r, r + W, r + 2W, … into part
files (`ches_curate.scoring.sharded`), all ranks meet at a barrier, and rank 0 merges. The
process group is gloo on CPU and NCCL on CUDA, where rank r uses `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable

from ches_curate.errors import ChesCurateError
from ches_curate.models import resolve_device
from ches_curate.scoring.config import ScoringConfig
from ches_curate.scoring.sharded import ShardResult, score_shards

BARRIER_TIMEOUT = timedelta(hours=24)
"""How long a rank waits at the barrier: a rank whose parts exist already waits for a whole shard being redone."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    def shards(self, n_shards: int) -> range:
        """The shards this rank scores: rank, rank + world_size, … below `n_shards`."""
        return range(self.rank, n_shards, self.world_size)


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The torchrun placement from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`; None outside torchrun."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        launch = Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ChesCurateError(
            f"RANK={environ['RANK']!r}, WORLD_SIZE={environ['WORLD_SIZE']!r} are not integers; "
            "launch with torchrun, or unset them to run every shard in this process"
        ) from None
    if not 0 <= launch.rank < launch.world_size:
        raise ChesCurateError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world_size}")
    return launch


def rank_device(launch: Launch, device: str = "auto") -> str:
    """`cuda:LOCAL_RANK` when `device` is `cuda`, or `auto` with CUDA available; otherwise `device` resolved."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{launch.local_rank}"
    return resolve_device(device)


@contextmanager
def process_group(launch: Launch, device: str, timeout: timedelta = BARRIER_TIMEOUT) -> Iterator[None]:
    """Join the torchrun job's process group (NCCL for a CUDA device, gloo otherwise), and leave it after."""
    import torch
    import torch.distributed as dist

    options: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        options["device_id"] = torch.device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **options)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(device: str) -> None:
    """Wait until every rank of the process group gets here."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        dist.barrier(device_ids=[torch.device(device).index])
    else:
        dist.barrier()


def score_distributed(
    launch: Launch,
    source_factory: Callable[[], Any],
    n_shards: int,
    work_dir: str | os.PathLike,
    model: str = "default",
    config: ScoringConfig | None = None,
    **shard_options: Any,
) -> list[ShardResult]:
    """Score this rank's shards on its own device, then wait at a barrier for every other rank.

    When this returns on any rank, every part exists, so rank 0 can merge. A rank that
    crashes makes torchrun stop the others; its parts are simply missing, and running
    the job again (or `--rank` for the missing shards) redoes only those.
    """
    config = config or ScoringConfig()
    device = rank_device(launch, config.device)
    with process_group(launch, device):
        results = score_shards(
            source_factory, launch.shards(n_shards), n_shards, work_dir, model, replace(config, device=device),
            **shard_options,
        )
        barrier(device)
    return results
