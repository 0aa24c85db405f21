"""Built-in filter policies on hand-made score tables with answers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from ches_curate.errors import ChesCurateError
from ches_curate.pairs import SCORE_COLUMNS
from ches_curate.policies import apply_policy, available_policies

BUILTINS = ["chain", "length-normalized", "percentile", "quantile-slice", "random", "threshold", "top-k"]


def score_table(ches, pair_ids=None, **columns) -> pd.DataFrame:
    """A scores table shaped like `Store.scores`: SCORE_COLUMNS, then the pair texts.

    `ln_ches` defaults to the `ches` values, so the default score column ranks as `ches` does.
    """
    n = len(ches)
    pair_ids = pair_ids or [f"p{i:02d}" for i in range(n)]
    frame = pd.DataFrame(
        {
            "row": range(n),
            "pair_id": pair_ids,
            "ches": np.asarray(ches, dtype=float),
            "ln_ches": columns.pop("ln_ches", np.asarray(ches, dtype=float)),
            "chosen_tokens": 10,
            "rejected_tokens": 12,
            "last_hidden_ip": columns.pop("last_hidden_ip", np.zeros(n)),
            "edit_distance": columns.pop("edit_distance", np.ones(n)),
            "truncated": False,
            "prompt": columns.pop("prompt", [f"prompt {i}" for i in range(n)]),
            "chosen": [f"chosen {i}" for i in range(n)],
            "rejected": [f"rejected {i}" for i in range(n)],
            "format": "prompt_chosen_rejected",
            "metadata": [{} for _ in range(n)],
        }
    )
    assert not columns, f"unknown columns {columns}"
    assert list(frame.columns[: len(SCORE_COLUMNS)]) == list(SCORE_COLUMNS)
    return frame


def removed(result) -> set[str]:
    return set(result.frame.loc[~result.frame["kept"], "pair_id"])


def ranks(result) -> dict[str, int]:
    return dict(zip(result.frame["pair_id"], result.frame["rank"]))


def test_builtins_are_registered_by_the_builtin_plugin():
    found = available_policies()
    assert {name: found[name].plugin for name in BUILTINS} == {name: "builtin_policies" for name in BUILTINS}


def test_top_k_removes_the_k_highest_and_breaks_ties_by_pair_id():
    scores = score_table([3.0, 1.0, 3.0, 2.0], pair_ids=["d", "c", "b", "a"])
    result = apply_policy(scores, "top-k", {"k": 1})
    assert removed(result) == {"b"}  # b and d tie at 3.0; b has the smaller pair_id
    assert ranks(result) == {"b": 1, "d": 2, "a": 3, "c": 4}
    assert list(result.frame["pair_id"]) == ["d", "c", "b", "a"]  # aligned to the input rows
    # The default score is the paper's filter score, ln-CHES (here equal to ches).
    assert (result.policy, result.params, result.score_column) == ("top-k", {"score_column": "ln_ches", "k": 1}, "ln_ches")
    assert (result.n_kept, result.n_removed, result.removed_pair_ids) == (3, 1, ["b"])


def test_top_k_larger_than_the_table_removes_every_pair_and_zero_removes_none():
    scores = score_table([0.5, -1.0, 2.0])
    assert removed(apply_policy(scores, "top-k", {"k": 10})) == {"p00", "p01", "p02"}
    assert removed(apply_policy(scores, "top-k", {"k": 0})) == set()


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (50, {"p05", "p06", "p07", "p08", "p09"}),  # cut at position 4.5: (5 + 6) / 2 = 5.5
        (90, {"p09"}),  # position 8.1: 9 + 0.1 * (10 - 9) = 9.1
        (100, set()),  # the cut is the maximum; nothing lies strictly above it
        (0, {f"p{i:02d}" for i in range(1, 10)}),  # the cut is the minimum; only it is kept
    ],
)
def test_percentile_removes_strictly_above_the_linear_interpolated_cut(p, expected):
    scores = score_table([float(v) for v in range(1, 11)])
    assert removed(apply_policy(scores, "percentile", {"p": p})) == expected


def test_percentile_keeps_every_pair_tied_at_the_cut():
    scores = score_table([2.0, 2.0, 5.0, 7.0])
    assert removed(apply_policy(scores, "percentile", {"p": 0})) == {"p02", "p03"}
    assert removed(apply_policy(scores, "percentile", {"p": 25})) == {"p02", "p03"}  # cut at 2.0 + 0.75 * 0 = 2.0


def test_length_normalized_keeps_the_lowest_ln_ches_not_the_lowest_ches():
    ln_ches = np.arange(40, dtype=float)
    scores = score_table(-ln_ches, ln_ches=ln_ches)  # ches ranks the pairs in the opposite order
    default = apply_policy(scores, "length-normalized", {})
    assert set(default.frame.loc[default.frame["kept"], "pair_id"]) == {"p00", "p01"}  # 5% of 40 = 2
    assert default.params == {"score_column": "ln_ches", "n": None, "fraction": 0.05}
    by_n = apply_policy(scores, "length-normalized", {"n": 3})
    assert set(by_n.frame.loc[by_n.frame["kept"], "pair_id"]) == {"p00", "p01", "p02"}
    assert by_n.params["fraction"] is None
    assert apply_policy(scores, "length-normalized", {"n": 100}).n_removed == 0


def test_length_normalized_fraction_rounds_halves_up():
    scores = score_table(np.zeros(5), ln_ches=[5.0, 4.0, 3.0, 2.0, 1.0])
    result = apply_policy(scores, "length-normalized", {"fraction": 0.5})  # 2.5 pairs -> keep 3
    assert set(result.frame.loc[result.frame["kept"], "pair_id"]) == {"p02", "p03", "p04"}


def test_threshold_removes_strictly_greater_scores_and_negation_flips_the_column():
    scores = score_table([1.0, 2.0, 3.0], edit_distance=[1.0, 2.0, 3.0])
    assert removed(apply_policy(scores, "threshold", {"value": 2})) == {"p02"}
    # -edit_distance: -1 > -2, so the most similar pair (distance 1) goes.
    negated = apply_policy(scores, "threshold", {"value": -2, "score_column": "-edit_distance"})
    assert removed(negated) == {"p00"}
    assert negated.score_column == "-edit_distance"


def test_random_removes_n_pairs_reproducibly_from_a_pair_id_order():
    scores = score_table(np.zeros(20), pair_ids=[f"id{i:02d}" for i in range(20)][::-1])
    result = apply_policy(scores, "random", {"n": 5, "seed": 7})
    canonical = np.array(sorted(scores["pair_id"]))
    assert removed(result) == set(canonical[np.random.default_rng(7).permutation(20)[:5]])
    assert removed(apply_policy(scores, "random", {"n": 5, "seed": 7})) == removed(result)
    assert removed(apply_policy(scores, "random", {"n": 5, "seed": 8})) != removed(result)
    assert apply_policy(scores, "random", {"fraction": 0.25}).n_removed == 5
    assert set(result.frame.loc[result.frame["rank"] <= 5, "pair_id"]) == removed(result)


@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("top-k", {"k": 3}),
        ("percentile", {"p": 40}),
        ("length-normalized", {"n": 4}),
        ("threshold", {"value": 1.0}),
        ("random", {"n": 3, "seed": 1}),
        ("quantile-slice", {"percentile": 50, "n": 3}),
    ],
)
def test_selection_does_not_depend_on_row_order(policy, params):
    scores = score_table([2.0, 1.0, 2.0, 0.0, 2.0, 1.0, 3.0, 1.0], ln_ches=[1.0, 1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 1.0])
    shuffled = scores.sample(frac=1.0, random_state=3)
    first, second = apply_policy(scores, policy, params), apply_policy(shuffled, policy, params)
    assert ranks(first) == ranks(second)
    assert removed(first) == removed(second)
    assert list(second.frame["pair_id"]) == list(shuffled["pair_id"])


def test_every_builtin_ranks_removed_pairs_first():
    scores = score_table([0.3, 2.0, 1.0, 5.0, 4.0, 0.1])
    for policy, params in [("top-k", {"k": 2}), ("percentile", {"p": 50}), ("length-normalized", {"n": 2}),
                           ("threshold", {"value": 1.5}), ("random", {"n": 2}),
                           ("quantile-slice", {"percentile": 50, "n": 2})]:
        result = apply_policy(scores, policy, params)
        assert sorted(result.frame["rank"]) == list(range(1, 7))
        assert set(result.frame.loc[result.frame["rank"] <= result.n_removed, "pair_id"]) == removed(result), policy


@pytest.mark.parametrize(("percentile", "n", "kept"), [
    (0, 3, {"p00", "p01", "p02"}),      # the 3 lowest
    (100, 3, {"p07", "p08", "p09"}),    # the 3 highest
    (50, 3, {"p04", "p05", "p06"}),     # centred on position 4.5, rounded up to 5
    (50, 4, {"p03", "p04", "p05", "p06"}),  # an even window starts n/2 before the centre
    (25, 1, {"p02"}),                   # position round(2.25) = 2
    (100, 20, {f"p{i:02d}" for i in range(10)}),  # more than there are: all of them
])
def test_quantile_slice_keeps_the_window_centred_on_the_percentile(percentile, n, kept):
    scores = score_table([float(i) for i in range(10)]).sample(frac=1.0, random_state=0)  # p0i scores i
    result = apply_policy(scores, "quantile-slice", {"percentile": percentile, "n": n})
    assert set(result.frame.loc[result.frame["kept"], "pair_id"]) == kept


def test_quantile_slice_ranks_by_the_negated_column_with_a_minus():
    scores = score_table([0.0] * 6, edit_distance=[5.0, 0.0, 4.0, 1.0, 3.0, 2.0])
    result = apply_policy(scores, "quantile-slice", {"percentile": 100, "n": 2, "score_column": "-edit_distance"})
    assert set(result.frame.loc[result.frame["kept"], "pair_id"]) == {"p01", "p03"}  # the two smallest distances


def test_nan_scores_are_rejected_naming_the_count_and_first_pairs():
    scores = score_table([1.0, np.nan, 2.0, np.nan], pair_ids=["a", "b", "c", "d"], ln_ches=np.zeros(4))
    with pytest.raises(ChesCurateError) as err:
        apply_policy(scores, "top-k", {"k": 1, "score_column": "ches"})
    assert str(err.value) == (
        "2 of 4 pairs have no 'ches' score (NaN), first pair_ids: b, d; rescore them or rank by another score_column"
    )
    assert apply_policy(scores, "top-k", {"k": 1}).n_removed == 1


def test_arrow_tables_and_empty_tables_are_accepted():
    scores = score_table([1.0, 3.0, 2.0])
    assert removed(apply_policy(pa.Table.from_pandas(scores.drop(columns="metadata")), "top-k", {"k": 1})) == {"p01"}
    assert len(apply_policy(scores.iloc[:0], "percentile", {"p": 50}).frame) == 0


@pytest.mark.parametrize(
    ("policy", "params", "message"),
    [
        ("top-k", {"k": -1}, "policy 'top-k': param 'k': Input should be greater than or equal to 0 (got -1)"),
        ("top-k", {}, "policy 'top-k': param 'k': Field required"),
        ("top-k", {"k": "many"}, "policy 'top-k': param 'k': Input should be a valid integer, unable to parse "
                                 "string as an integer (got 'many')"),
        ("top-k", {"k": 1, "kk": 2}, "policy 'top-k': param 'kk': Extra inputs are not permitted "
                                     "(known params: score_column, k)"),
        ("top-k", {"k": 1, "score_column": "Ches!"}, "policy 'top-k': param 'score_column': must be a score name "
                                                      "such as ches, ln_ches, last_hidden_ip, edit_distance, "
                                                      "optionally prefixed by '-' (got 'Ches!')"),
        ("top-k", {"k": 1, "score_column": "chess"}, "the scores table has no score 'chess' (scores: ches, ln_ches, "
                                                      "last_hidden_ip, edit_distance); compute a registered score "
                                                      "with `ches-curate score --scores NAME` or bring values in with "
                                                      "`ches-curate scores import`"),
        ("percentile", {"p": 101}, "policy 'percentile': param 'p': Input should be less than or equal to 100 "
                                   "(got 101)"),
        ("threshold", {"value": "nan"}, "policy 'threshold': param 'value': Input should be a finite number "
                                        "(got 'nan')"),
        ("random", {}, "policy 'random': give exactly one of n (pairs to remove) or fraction"),
        ("length-normalized", {"n": 2, "fraction": 0.1}, "policy 'length-normalized': give n or fraction, not both"),
    ],
)
def test_bad_params_give_one_line_naming_the_param(policy, params, message):
    with pytest.raises(ChesCurateError) as err:
        apply_policy(score_table([1.0, 2.0]), policy, params)
    assert str(err.value) == message


def test_string_params_from_the_command_line_are_converted():
    result = apply_policy(score_table([1.0, 2.0, 3.0]), "top-k", {"k": "2", "score_column": "ches"})
    assert removed(result) == {"p01", "p02"}
    assert result.params["k"] == 2


def test_unknown_policy_lists_the_available_ones():
    with pytest.raises(ChesCurateError) as err:
        apply_policy(score_table([1.0]), "top_k", {"k": 1})
    assert str(err.value) == "unknown policy 'top_k' (available: " + ", ".join(available_policies()) + ")"
    assert all(f" {name}," in str(err.value) or f" {name})" in str(err.value) for name in BUILTINS)


def test_missing_score_column_is_named():
    message = r"the scores table has no score 'last_hidden_ip' \(scores: ches, ln_ches, edit_distance\)"
    with pytest.raises(ChesCurateError, match=message):
        apply_policy(score_table([1.0]).drop(columns="last_hidden_ip"), "top-k", {"k": 1, "score_column": "last_hidden_ip"})


def test_shipped_configs_filter_on_ln_ches_as_the_paper_does():
    """`make demo` once cut at the 90th percentile of raw ches: 227 response tokens removed vs 73 kept on average."""
    configs = sorted((Path(__file__).resolve().parents[1] / "pipelines" / "configs").glob("*.yaml"))
    policies = {path.name: yaml.safe_load(path.read_text()).get("policy") for path in configs}
    ranked_by = {name: available_policies()[spec["name"]].obj.Params(**spec.get("params", {})).score_column
                 for name, spec in policies.items() if spec}
    assert {"demo.yaml", "dev.yaml", "gpu.yaml"} <= set(ranked_by)
    assert set(ranked_by.values()) == {"ln_ches"}
