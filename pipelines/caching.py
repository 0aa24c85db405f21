"""ZenML cache policies keyed on what a step reads outside its inputs: the store it opens and the files it reads.

ZenML's cache key covers a step's code, parameters and input artifacts. The steps also read
the DuckDB store and files by path, which ZenML cannot see; so each cached step adds a
fingerprint of them through `CachePolicy(cache_func=...)`, computed just before it would run:

- the store's identity: its path and the time it was created (`schema_version`), so a store
  deleted or replaced makes every step run again. The store's *contents* are not in the key:
  each step's reads are its input artifacts (a dataset version with its content hash, a score
  run, a selection), whose values are in the key, and its own writes would change the key of
  every re-run;
- each file it reads (the source, the quality config, plugin files, a local model directory):
  size and modification time. A hub dataset id cannot be checked offline, so ingest gets a
  fresh key and always runs (a model named by hub id or `default` is in the parameters).

ZenML's cache function takes no arguments, so what it fingerprints is written into its name:
`ches_curate.pipelines.caching:state_<base32 JSON>` is resolved by this module's `__getattr__`,
in any process that imports it. Steps that write files a user may delete (`export_curated`,
`curation_report`) are not cached.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable

from zenml.config.cache_policy import CachePolicy

from ches_curate.pipeline_config import PipelineConfig
from ches_curate.pipelines.sources import package_source

PREFIX = "state_"


def store_identity(path: str) -> str:
    """The store's resolved path and creation time; opening it creates a missing one, as the step would."""
    from ches_curate.store import Store

    store = Store(path)
    created = store.sql("SELECT applied_at FROM schema_version WHERE version = 1").applied_at.iloc[0]
    return f"{Path(path).resolve()}@{created}"


def file_state(path: str | None) -> str:
    """`path`'s size and modification time (a folder: of every file below it); a fresh value if it is not local."""
    if path is None:
        return "-"
    found = Path(path)
    if not found.exists():
        return f"not local: {uuid.uuid4()}"
    files = sorted(p for p in found.rglob("*") if p.is_file()) if found.is_dir() else [found]
    return hashlib.sha256("".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode()
                          ).hexdigest()


def fingerprint(store: str | None, files: list[str | None]) -> str:
    """What the cache function returns: the store's identity and each file's state."""
    return json.dumps([store_identity(store) if store else "-", [file_state(f) for f in files]])


def reads(store: str | None, *files: str | None) -> CachePolicy:
    """ZenML's default cache policy plus `fingerprint(store, files)`."""
    encoded = base64.b32encode(json.dumps([store, list(files)]).encode()).decode().rstrip("=").lower()
    return CachePolicy(cache_func=package_source(__name__, PREFIX + encoded))


def __getattr__(name: str) -> Callable[[], str]:
    """`state_<base32 JSON>`: the no-argument cache function fingerprinting the store and files it names."""
    if not name.startswith(PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    encoded = name.removeprefix(PREFIX).upper()
    store, files = json.loads(base64.b32decode(encoded + "=" * (-len(encoded) % 8)))
    return functools.partial(fingerprint, store, files)


def step_reads(config: PipelineConfig) -> dict[str, CachePolicy]:
    """The cache policy of each cached step of the pipelines, from the config it runs with."""
    plugins = [p for p in config.plugins if p.endswith(".py")]
    model = config.scoring.model if Path(config.scoring.model).exists() else None  # a name is in the parameters
    return {
        "ingest_dataset": reads(config.store, config.dataset.source),
        "validate_pairs": reads(config.store, config.quality),
        "score_pairs": reads(config.store, model),
        "validate_scores": reads(config.store, config.quality),
        "select_pairs": reads(config.store, *plugins),
        "reselect_pairs": reads(config.store, *plugins),
        "ablate": reads(config.store, model, config.ablation.evaluate.source, *plugins),
        "generate_refusal_pairs": reads(None, model, config.refusal and config.refusal.source, *plugins),
        "ablate_on_held_out": reads(config.store, model, *plugins),
    }


def cache_options(config: PipelineConfig, step_name: str) -> dict[str, Any]:
    """`with_options` keywords for a step of the pipelines: its cache policy, or caching off for a step that
    writes files outside the store (they are cheap, and a user may have deleted them)."""
    policy = step_reads(config).get(step_name)
    return {"cache_policy": policy} if policy is not None else {"enable_cache": False}
