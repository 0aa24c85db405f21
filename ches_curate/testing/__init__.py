"""The plugin author's kit: run a policy or a score on a few pairs in memory, with no store.

    from ches_curate.testing import make_pairs, run_policy, run_score, tiny_model

    pairs = make_pairs([("2+2?", "4", "5"), ("Hi?", "Hello! How can I help?", "No.")])
    result = run_policy(MyPolicy(), pairs, {"k": 1}, ches=[3.0, 1.0])   # a SelectionResult
    values = run_score(MyTextScore(), pairs)                            # pair_id, value, failure
    values = run_score(MyTokenScore(), pairs, model=tiny_model(tmp_path / "tiny"))

The objects are registered as a temporary plugin named `testing` (and unregistered after),
so they go through exactly the checks and code paths of an installed plugin: `apply_policy`
for a policy; for a score, the scoring engine's one forward pass when it needs the model
(token ids, hidden states, log-probs), or its `compute` on the texts alone.
`tiny_model` builds a tiny random Llama (or GPT-2) with a small BPE tokenizer, offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from ches_curate import plugins
from ches_curate.hookspecs import hookimpl
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair

__all__ = ["make_pairs", "registered", "run_policy", "run_score", "score_table", "tiny_model"]

TESTING_PLUGIN = "testing"


def make_pairs(rows: Iterable[PreferencePair | tuple | dict]) -> list[PreferencePair]:
    """Pairs from `(prompt, chosen, rejected)` tuples, dicts with those keys, or pairs; `row` is their position."""
    pairs = []
    for row, item in enumerate(rows):
        if isinstance(item, PreferencePair):
            item = {"prompt": item.prompt, "chosen": item.chosen, "rejected": item.rejected}
        elif not isinstance(item, dict):
            item = dict(zip(("prompt", "chosen", "rejected"), item))
        pairs.append(PreferencePair(item["prompt"], item["chosen"], item["rejected"], row=row))
    return pairs


def score_table(pairs: Sequence[PreferencePair], **scores: Sequence[float]) -> pd.DataFrame:
    """The table a policy is given (`Store.scores` plus any stored score): `SCORE_COLUMNS`, the texts, and one column
    per keyword (`ches=[...]`, `reward_margin=[...]`); unnamed built-in scores are 0, token counts are word counts."""
    frame = pd.DataFrame({
        "row": [p.row for p in pairs], "pair_id": [p.pair_id for p in pairs],
        "chosen_tokens": [len(p.chosen.split()) for p in pairs],
        "rejected_tokens": [len(p.rejected.split()) for p in pairs],
        "truncated": False,
    })
    for column in ("ches", "ln_ches", "last_hidden_ip", "edit_distance"):
        frame[column] = 0.0
    frame = frame[list(SCORE_COLUMNS)]
    frame = frame.assign(prompt=[p.prompt for p in pairs], chosen=[p.chosen for p in pairs],
                         rejected=[p.rejected for p in pairs], format=[p.format for p in pairs],
                         metadata=[dict(p.metadata) for p in pairs])
    for name, values in scores.items():
        frame[name] = pd.Series(list(values), dtype="float64")
    return frame


@contextmanager
def registered(*objects: Any) -> Iterator[None]:
    """Within the block, `objects` (policy and score instances) are registered as the plugin `testing`."""

    class Testing:
        @hookimpl
        def register_filter_policies(self, register):
            for obj in objects:
                if callable(getattr(obj, "select", None)):
                    register(obj)

        @hookimpl
        def register_scores(self, register):
            for obj in objects:
                if callable(getattr(obj, "compute", None)):
                    register(obj)

    plugins.reset()
    manager = plugins.plugin_manager()
    manager.register(Testing(), name=TESTING_PLUGIN)
    try:
        yield
    finally:
        plugins.reset()


def run_policy(policy: Any, pairs: Sequence[PreferencePair] | pd.DataFrame, params: dict[str, Any] | None = None,
               **scores: Sequence[float]):
    """`policy` applied to `pairs` (or a ready score table) as `ches-curate filter` would: a `SelectionResult`."""
    from ches_curate.policies import apply_policy

    table = pairs if isinstance(pairs, pd.DataFrame) else score_table(pairs, **scores)
    with registered(policy):
        return apply_policy(table, policy.name, params)


def run_score(score: Any, pairs: Sequence[PreferencePair], model: Any = None, **config: Any) -> pd.DataFrame:
    """`score` on `pairs`: one row per pair scored (pair_id, value, failure), in input order, as the scoring pass
    computes it.

    With `model` (a `LoadedModel`, a model directory, or `tiny_model(...)`), the pairs go
    through the engine (`ScoringConfig(**config)`); a score that needs only texts runs without one.
    """
    from ches_curate.scores.compute import compute_score
    from ches_curate.scores.spec import ScoreBatch, model_bound, needs_forward

    with registered(score):
        entry = plugins.Registered(score, TESTING_PLUGIN)
        if model is None:
            if model_bound(score) or needs_forward(score):
                raise ValueError(f"score '{score.name}' needs {sorted(score.needs)}: pass model=tiny_model(dir)")
            result = compute_score(entry, ScoreBatch(list(pairs), [p.pair_id for p in pairs]))
            values, failures = dict(zip((p.pair_id for p in pairs), result.values)), result.failures
        else:
            from ches_curate.scoring import Scorer, ScoringConfig

            scorer = Scorer(model, ScoringConfig(**{"on_error": "quarantine", **config, "scores": (score.name,)}))
            frames = list(scorer.score_batches(pairs))
            table = (pd.concat(frames).sort_values("row", kind="stable") if frames
                     else pd.DataFrame(columns=["pair_id", score.name]))
            values, failures = dict(zip(table.pair_id, table[score.name])), scorer.score_failures
    reasons = {f.pair_id: f.describe() for f in failures}
    return pd.DataFrame({"pair_id": list(values), "value": list(values.values()),
                         "failure": [reasons.get(pair_id) for pair_id in values]})


def tiny_model(directory: str | Path, arch: str = "llama", chat_template: bool = True):
    """A tiny random `arch` model (`llama`, `gpt2`, ...) with a small BPE tokenizer, saved to `directory` and loaded."""
    from ches_curate.models import load_model
    from ches_curate.testing.tiny_models import build_tiny_model

    return load_model(str(build_tiny_model(Path(directory), arch=arch, chat_template=chat_template)))
