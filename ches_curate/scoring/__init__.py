"""CHES scoring: the arithmetic, the engine, and the runs that score a file, a stored dataset or shards.

- `config`: `ScoringConfig` (torch-free);
- `ches`: CHES and ln-CHES on tensors, nothing else;
- `engine`: `Scorer`, exact and batched, and `score_pairs`;
- `file_run`: a file scored into Parquet, rejected rows beside it;
- `incremental`: a stored dataset scored incrementally and resumably (`score_dataset`);
- `sharded`: `pair_id`-hash shards, atomic part files and their merge;
- `distributed`: the torchrun glue around `sharded`;
- `progress`: progress bars and periodic progress lines.

Names load on first use, so importing `ches_curate.scoring.config` (or this package) does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "ScoringConfig": "config",
    "DEFAULT_BATCH_TOKENS": "config",
    "Scorer": "engine",
    "score_pairs": "engine",
    "normalized_edit_distance": "engine",
    "score_dataset": "incremental",
    "ScoreRunSummary": "incremental",
    "score_file": "file_run",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
