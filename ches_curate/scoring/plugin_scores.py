"""Plugin scores of a stored dataset: written with each scored batch, and computed later for pairs scored before.

`score --dataset` stores each batch's plugin scores (`Scorer.plugin_scores`) beside its
CHES rows. A score added later, or a new version of one, is computed for the pairs the
model already scored (`backfill_plugin_scores`) without running CHES again: a score that
needs only texts or tokens runs on them alone; one that needs hidden states or log-probs
runs the forward pass for those pairs, and only the plugin scores are written.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from itertools import islice

import pandas as pd

from ches_curate.scores.compute import compute_scores
from ches_curate.scores.spec import ScoreBatch, model_bound, needs_forward
from ches_curate.scoring.engine import Scorer
from ches_curate.store import Store
from ches_curate.store.plugin_scores import (
    INDEPENDENT, ROW_COLUMNS, definition, missing_plugin_scores, write_plugin_scores,
)
from ches_curate.tokenization import TruncationError, encode_pair

CHUNK_PAIRS = 256
"""Pairs per batch when scores run without the forward pass."""


def write_batch_plugin_scores(store: Store, scorer: Scorer, frame: pd.DataFrame, tokenization_version: str,
                              run_id: int) -> int:
    """Store the plugin score columns of a score frame (NaN with the failure's reason where a score failed)."""
    entries = [entry for entry in scorer.plugin_scores if entry.obj.name in frame.columns]
    if not entries or frame.empty:
        return 0
    failures = {(f.pair_id, f.score): f.describe() for f in scorer.score_failures}
    rows = []
    for entry in entries:
        score, bound = entry.obj, model_bound(entry.obj)
        key, version = (scorer.key, tokenization_version) if bound else (INDEPENDENT, INDEPENDENT)
        for pair_id, value in zip(frame["pair_id"], frame[score.name]):
            failed = value is None or math.isnan(value)
            rows.append((pair_id, key, version, score.name, score.version, None if failed else float(value),
                         failures.get((pair_id, score.name), "no value") if failed else None))
    table = pd.DataFrame(rows, columns=list(ROW_COLUMNS)).astype({"value": "float64"})
    return write_plugin_scores(store, table, definitions(entries), run_id=run_id)


def definitions(entries: list) -> list[dict]:
    """`score_definitions` rows of registered scores."""
    return [definition(e.obj.name, e.obj.version, e.plugin, e.obj.description, list(e.obj.needs), model_bound(e.obj))
            for e in entries]


def backfill_plugin_scores(store: Store, name: str, version: int, scorer: Scorer, tokenization_version: str,
                           run_id: int) -> int:
    """Compute the plugin scores (or score versions) missing for pairs `scorer.key` already scored; returns the
    pairs given at least one score."""
    wanted = [(e.obj.name, e.obj.version, model_bound(e.obj)) for e in scorer.plugin_scores]
    missing = missing_plugin_scores(store, name, version, scorer.key, tokenization_version, wanted)
    if missing.empty:
        return 0
    todo = [e for e in scorer.plugin_scores if e.obj.name in set(missing.score_name)]
    ids = set(missing.pair_id)
    pairs = (p for p in store.dataset_pairs(name, version, distinct=True) if p.pair_id in ids)
    if any(needs_forward(e.obj) for e in todo):
        runner = copy.copy(scorer)  # the same model and failure lists; only these scores
        runner.plugin_scores = todo
        frames = runner.score_batches(pairs, total=len(ids))
    else:
        frames = _without_forward(scorer, todo, pairs)
    done = 0
    for frame in frames:
        write_batch_plugin_scores(store, scorer, frame, tokenization_version, run_id)
        done += len(frame)
    return done


def _without_forward(scorer: Scorer, entries: list, pairs: Iterable) -> Iterator[pd.DataFrame]:
    """Frames of pair_id and the `entries`' values, computed from texts (and token ids) alone."""
    tokens_needed = any("tokens" in e.obj.needs for e in entries)
    config = scorer.config
    iterator = iter(pairs)
    while chunk := list(islice(iterator, CHUNK_PAIRS)):
        tokens = []
        if tokens_needed:
            encodable = []
            for pair in chunk:
                try:
                    tokens.append(encode_pair(scorer.loaded.tokenizer, pair, config.max_length, config.chat_template))
                    encodable.append(pair)
                except TruncationError:  # not scorable under these settings: it has no CHES score either
                    continue
            chunk = encodable
        batch = ScoreBatch(chunk, [p.pair_id for p in chunk], tokens or None, model_key=scorer.key,
                           device=scorer.loaded.device)
        frame = pd.DataFrame({"pair_id": batch.pair_ids})
        for values in compute_scores(entries, batch):
            frame[values.name] = values.values
            scorer.score_failures += values.failures
        yield frame
