"""ches_curate: exact, fast CHES scoring and curation of DPO preference data.

Heavy modules (torch, transformers) load on first use, so `ches-curate sql` and
`--help` stay fast.
"""

from __future__ import annotations

import importlib

from ches_curate.hookspecs import hookimpl
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair

__version__ = "0.1.0"

_LAZY = {
    "Scorer": "ches_curate.scoring",
    "ScoringConfig": "ches_curate.scoring",
    "score_pairs": "ches_curate.scoring",
    "load_model": "ches_curate.models",
    "read_pairs": "ches_curate.ingest",
    "Store": "ches_curate.store",
}

__all__ = ["PreferencePair", "SCORE_COLUMNS", "hookimpl", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ches_curate' has no attribute {name!r}")
