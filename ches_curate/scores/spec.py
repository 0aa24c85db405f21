"""The score interface: what a score plugin registers, what it is given, and the registry.

A score is a named per-pair number computed a batch of pairs at a time. It says what it
`needs`; the scoring pass hands it exactly that, from the one forward pass CHES already
runs (nothing is computed twice):

- `texts`: the pairs (`PreferencePair`: prompt, chosen, rejected, metadata);
- `tokens`: their token ids as scored (`EncodedPair`, TRL's contract);
- `hidden_states`: per response the float64 sum of the final hidden states at the
  positions that predict its tokens, and the state at its last predicting position;
- `logprobs`: per response log pi(y|x), summed over its tokens, from the same pass;
- `own_model`: nothing from the scoring model; the score loads a model of its own.

A score that needs `tokens`, `hidden_states` or `logprobs` depends on the scoring model
(and its tokenization), so its values are stored under that model's key; the others are
stored once per pair, whatever model scores the dataset (`model_bound`).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from ches_curate import plugins
from ches_curate.errors import ChesCurateError

if TYPE_CHECKING:
    import torch

    from ches_curate.pairs import PreferencePair
    from ches_curate.tokenization import EncodedPair

SCORE_HOOK = "register_scores"
NEEDS = ("texts", "tokens", "hidden_states", "logprobs", "own_model")
"""What a score may need (see the module docstring)."""
FORWARD_NEEDS = frozenset({"hidden_states", "logprobs"})
"""Needs that only the scoring model's forward pass can meet."""
MODEL_BOUND_NEEDS = FORWARD_NEEDS | {"tokens"}
COLUMN_SCORES = ("ches", "ln_ches", "last_hidden_ip", "edit_distance")
"""The built-in scores stored as columns of the `scores` table (`SCORE_COLUMNS`); every other score is a row of
`plugin_scores`."""
RESERVED_NAMES = frozenset({
    "dataset_name", "dataset_version", "row", "pair_id", "model_key", "tokenization_version", "chosen_tokens",
    "rejected_tokens", "truncated", "run_id", "scored_at", "prompt", "chosen", "rejected", "format", "metadata",
})
"""Columns of `latest_scores` and of the policies' table that no score may be named."""
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class HiddenStates:
    """Per pair (rows in batch order): float64 sums of the hidden states predicting each response's tokens,
    and the hidden state at each response's last predicting position (the model's dtype)."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_last: torch.Tensor
    rejected_last: torch.Tensor


@dataclass(frozen=True)
class ResponseLogProbs:
    """Per pair: log pi(y+|x) and log pi(y-|x) summed over the response tokens (float64), and the token counts."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class ScoreBatch:
    """What a score's `compute` is given: the pairs, and the inputs the scores of this pass need (else None)."""

    pairs: list[PreferencePair]
    pair_ids: list[str]
    tokens: list[EncodedPair] | None = None
    hidden: HiddenStates | None = None
    logprobs: ResponseLogProbs | None = None
    model_key: str | None = None
    device: str = "cpu"

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, indices: Sequence[int]) -> ScoreBatch:
        """The same batch restricted to the pairs at `indices` (in that order)."""
        picked = list(indices)

        def rows(value: Any) -> Any:
            if value is None:
                return None
            if isinstance(value, list):
                return [value[i] for i in picked]
            return type(value)(**{f.name: getattr(value, f.name)[picked] for f in fields(value)})

        return replace(self, pairs=rows(self.pairs), pair_ids=rows(self.pair_ids), tokens=rows(self.tokens),
                       hidden=rows(self.hidden), logprobs=rows(self.logprobs))


class Score(ABC):
    """A per-pair score: a unique `name` (its SQL column), a `version`, a `description`, its `needs`, `compute`.

    Subclassing is optional: `register` accepts any object with these attributes.
    Scores with `default = False` are computed only when named (`score --scores`).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"texts"})
    default: ClassVar[bool] = True

    @abstractmethod
    def compute(self, batch: ScoreBatch) -> Sequence[float]:
        """One float per pair of `batch`, in its order. Raising, or NaN/inf for a pair, quarantines that pair
        for this score only (the other pairs and scores are kept)."""


def model_bound(score: Any) -> bool:
    """Whether the score's values depend on the scoring model (and are stored under its key)."""
    return bool(set(score.needs) & MODEL_BOUND_NEEDS)


def needs_forward(score: Any) -> bool:
    """Whether the score needs the scoring model's forward pass (hidden states or log-probs)."""
    return bool(set(score.needs) & FORWARD_NEEDS)


def check_score(score: Any) -> None:
    """Reject objects that cannot work as a score, with a message saying what is wrong."""
    if isinstance(score, type):
        raise TypeError(f"register() got the class {score.__name__}; pass an instance: register({score.__name__}())")
    name = getattr(score, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise TypeError(f"score {score!r} needs a `name` in lower_snake_case (it becomes a SQL column), got {name!r}")
    if name in RESERVED_NAMES:
        raise TypeError(f"score '{name}' is named like a column of latest_scores; choose another name")
    version = getattr(score, "version", None)
    if not isinstance(version, str) or not version:
        raise TypeError(f"score '{name}' needs a non-empty string `version` (got {version!r})")
    needs = getattr(score, "needs", None)
    if not isinstance(needs, (set, frozenset, tuple, list)) or not needs or set(needs) - set(NEEDS):
        raise TypeError(f"score '{name}' needs `needs`: a non-empty set of {', '.join(NEEDS)} (got {needs!r})")
    if not callable(getattr(score, "compute", None)):
        raise TypeError(f"score '{name}' needs a `compute(batch)` method")


def available_scores() -> dict[str, plugins.Registered]:
    """Every registered score by name (sorted), with the plugin that registered it."""
    return plugins.registered(SCORE_HOOK, kind="score", check=check_score)


def get_score(name: str) -> plugins.Registered:
    """The registered score called `name`; an unknown name is an error listing the registered ones."""
    found = available_scores()
    if name not in found:
        raise ChesCurateError(f"unknown score '{name}' (registered: {', '.join(found) or 'none'}; a score plugin "
                              f"may be disabled by {plugins.DISABLED_PLUGINS_ENV})")
    return found[name]


def selected_scores(names: Sequence[str] | None, exclude: Sequence[str] = ()) -> list[plugins.Registered]:
    """The scores a run computes: `names` (`all` for every registered one), or by default those with
    `default = True`; `exclude` (the scores stored elsewhere) is left out."""
    found = available_scores()
    if names is None:
        chosen = [name for name, entry in found.items() if getattr(entry.obj, "default", True)]
    elif "all" in names:
        chosen = list(found)
    else:
        chosen = list(dict.fromkeys(names))
        for name in chosen:
            get_score(name)
    return [found[name] for name in chosen if name not in exclude]


def is_finite(value: Any) -> bool:
    """Whether `value` is a real, finite number (bool excluded)."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
