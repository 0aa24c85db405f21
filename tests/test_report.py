"""The HTML curation report: contents computed from the store, escaping, self-containment, empty sections, CLI."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from ches_curate.commands import report as report_command
from ches_curate.errors import ChesCurateError
from ches_curate.ingest import RejectedRow
from ches_curate.pairs import PreferencePair
from ches_curate.policies import apply_policy
from ches_curate import report_plots
from ches_curate.report import ReportConfig, build_report, selection_cut
from ches_curate.report_quality import finding_bound
from ches_curate.store import Store

MODEL = "tiny_llama@sha256:0123abcd/float32"
N_PAIRS = 48
SCRIPT = "<script>alert(1)</script>"
SCRIPT_ROW = 7
CHAT_ROW = 10
LONG_ROW = 3
LONG_CHARS = 6000


def make_pairs() -> list[PreferencePair]:
    """Pairs with hostile text: a script tag, an onerror image in a chat turn, markup that closes <details>."""
    pairs = []
    for i in range(N_PAIRS):
        prompt: str | list = f'question {i} & "quotes"'
        if i == SCRIPT_ROW:
            prompt = f"Tell me {SCRIPT} now"
        elif i == CHAT_ROW:
            prompt = [{"role": "user", "content": "hi <img src=x onerror=alert(2)>"}]
        chosen = "x" * LONG_CHARS if i == LONG_ROW else f"good answer {i}"
        pairs.append(PreferencePair(prompt, chosen, f"bad answer {i} </details><b>bold</b>", row=i,
                                    format="conversational" if i == CHAT_ROW else "prompt_chosen_rejected"))
    return pairs


def fake_scores(pairs: list[PreferencePair]) -> pd.DataFrame:
    """Synthetic scores: CHES rises with the row but the script and chat rows score highest."""
    rng = np.random.default_rng(0)
    ches = np.arange(len(pairs), dtype=np.float64) + rng.uniform(0, 0.5, len(pairs))
    ches[SCRIPT_ROW], ches[CHAT_ROW] = 100.0, 90.0
    chosen_tokens = rng.integers(5, 40, len(pairs))
    rejected_tokens = rng.integers(5, 40, len(pairs))
    return pd.DataFrame({
        "row": [p.row for p in pairs], "pair_id": [p.pair_id for p in pairs], "ches": ches,
        "ln_ches": ches / np.sqrt(chosen_tokens * rejected_tokens), "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens, "last_hidden_ip": rng.normal(0, 1, len(pairs)),
        "edit_distance": rng.uniform(0, 1, len(pairs)), "truncated": False,
    })


@dataclass
class Populated:
    store: Store
    scores: pd.DataFrame
    percentile_id: int
    random_id: int
    kept: dict[int, np.ndarray]


def populated_store(path: Path) -> Populated:
    """A store with one scored dataset, two selections, a quality run, quarantine and three ablation arms."""
    store = Store(path)
    pairs = make_pairs()
    rejected = RejectedRow("demo.jsonl", 49, "rejected", "field 'rejected' is empty <b>", "{}")
    store.register_dataset("demo", "demo.jsonl", [*pairs, rejected])
    store.register_model(MODEL, {"name": "tiny_llama", "dtype": "float32"})
    run_id = store.start_score_run("demo", 1, MODEL)
    store.write_scores(run_id, MODEL, fake_scores(pairs))
    store.finish_score_run(run_id, "finished")
    scores = store.scores("demo", 1, MODEL)
    ids, kept = {}, {}
    # ranked by ches explicitly, whatever the policies' default score: the tests below draw its cut on CHES
    for name, params in (("percentile", {"p": 75, "score_column": "ches"}), ("random", {"n": 12, "seed": 1})):
        result = apply_policy(scores, name, params)
        ids[name] = store.save_selection(name, result.params, "demo", 1, MODEL, result.frame, result.score_column)
        kept[ids[name]] = result.frame["kept"].to_numpy()
    _add_quality(store)
    _add_ablations(store, scores, ids, kept)
    return Populated(store, scores, ids["percentile"], ids["random"], kept)


def _add_quality(store: Store) -> None:
    run_id = store.sql(
        "INSERT INTO quality_runs (suite, dataset_name, dataset_version, success, n_rows, failure_rate) "
        "VALUES ('pairs', 'demo', 1, false, 48, 0.0625) RETURNING quality_run_id", write=True,
    ).quality_run_id.iloc[0]
    store.sql(
        "INSERT INTO quality_results VALUES (?, 'prompt_not_empty', 'error', true, 0, '[]', NULL), "
        "(?, 'chosen_differs_from_rejected', 'error', false, 3, ?, ?)",
        write=True, params=[int(run_id), int(run_id), json.dumps(["aaaaaaaaaaaaaaaa1", "b2", "c3"]),
                            json.dumps({"description": "chosen and rejected differ", "note": "<i>dup</i>",
                                        "unexpected_sample": ["<i>same</i> answer", "other"]})],
    )


ARMS = {  # arm: (preferred, dispreferred, refusal before, refusal after)
    "full": (-2.5, -4.0, 0.2, 0.1), "percentile": (-0.75, -3.0, 0.2, 0.3), "random": (-2.25, -3.5, 0.2, 0.15),
}


def _add_ablations(store: Store, scores: pd.DataFrame, ids: dict[str, int], kept: dict[int, np.ndarray]) -> None:
    insert = ("INSERT INTO ablations (ablation_id, arm, policy, selection_id, dataset_name, dataset_version, model_key, "
              "n_train_pairs, preferred_logp_change, dispreferred_logp_change, refusal_rate_before, refusal_rate_after, "
              "created_at, train_seed) VALUES (?, ?, ?, ?, 'demo', 1, ?, ?, ?, ?, ?, ?, ?, 0)")
    # An older run of the `full` arm: the report must show only the latest row of each arm.
    store.sql(insert, write=True, params=[1, "full", None, None, MODEL, 48, 99.0, 99.0, 0.9, 0.9, "2020-01-01"])
    for arm, (preferred, dispreferred, before, after) in ARMS.items():
        selection_id = ids.get(arm)
        train = np.ones(len(scores), bool) if selection_id is None else kept[selection_id]
        store.sql(insert, write=True, params=[2, arm, None if arm == "full" else arm, selection_id, MODEL,
                                              int(train.sum()), preferred, dispreferred, before, after, "2025-06-01"])
        likelihoods = pd.DataFrame({
            "pair_id": scores.pair_id[train], "before": -20.0, "after": -20.0 - 0.05 * scores.ches[train],
        })
        with store.connect() as con:
            con.register("lk", likelihoods)
            con.execute("INSERT INTO pair_likelihoods SELECT 2, ?, pair_id, before, after, before, after - 1, 0 FROM lk",
                        [arm])


class Page(HTMLParser):
    """Every tag's attributes, the text of each <section>, and its tables' rows of cell texts."""

    def __init__(self, html: str):
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []
        self.text: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.summaries: list[str] = []
        self.section_summaries: dict[str, list[str]] = {}
        self._section, self._row, self._cell, self._summary = "", None, None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, name, value or "") for name, value in attrs]
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr":
            self._row = []
            self.tables.setdefault(self._section, []).append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "summary":
            self._summary = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "summary":
            self.summaries.append(" ".join(self._summary.split()))
            self.section_summaries.setdefault(self._section, []).append(self.summaries[-1])
            self._summary = None

    def handle_data(self, data):
        self.text[self._section] = self.text.get(self._section, "") + data
        if self._cell is not None:
            self._cell += data
        if self._summary is not None:
            self._summary += data

    def rows(self, section: str) -> list[list[str]]:
        return [row for row in self.tables.get(section, []) if row and row[0] not in ("#", "id", "arm", "run", "suite", "stage")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Populated:
    return populated_store(tmp_path_factory.mktemp("report") / "store.duckdb")


@pytest.fixture(scope="module")
def demo_html(demo) -> str:
    return build_report(demo.store, "demo", selection_id=demo.percentile_id, config=ReportConfig(top_pairs=5))


def test_user_text_is_html_escaped(demo_html):
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in demo_html
    assert "<script" not in demo_html.lower()
    assert "hi &lt;img src=x onerror=alert(2)&gt;" in demo_html
    assert "&lt;/details&gt;&lt;b&gt;bold&lt;/b&gt;" in demo_html
    assert "field &#39;rejected&#39; is empty &lt;b&gt;" in demo_html
    page = Page(demo_html)
    assert not [a for a in page.attrs if a[1].lower().startswith("on")], "no event-handler attribute may appear"


def test_report_is_self_contained(demo_html):
    page = Page(demo_html)
    urls = [(tag, name, value) for tag, name, value in page.attrs if name in ("src", "href", "action", "data")]
    assert all(not re.match(r"\s*(https?:)?//", value) for _, _, value in urls), urls
    assert all(value.startswith("#") for tag, name, value in urls if name == "href")
    assert "http://" not in demo_html and "https://" not in demo_html
    assert "default-src 'none'; img-src data:" in demo_html
    # CHES, ln-CHES, ln-CHES vs edit distance, CHES vs response length, log-prob change, refusal rate,
    # per-pair CHES vs log-prob change.
    assert len(page.images) == 7
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
        assert image.format == "PNG" and image.width > 300 and image.height > 150


def test_cut_line_is_the_boundary_between_kept_and_removed_scores(demo, demo_html):
    ches = demo.scores.ches.to_numpy()
    removed = ches > np.percentile(ches, 75)
    expected = (ches[~removed].max() + ches[removed].min()) / 2
    cut = selection_cut(ches, demo.kept[demo.percentile_id], "ches", "ches")
    assert cut.value == pytest.approx(expected)
    assert (cut.kept_edge, cut.removed_edge) == (ches[~removed].max(), ches[removed].min())
    text = " ".join(Page(demo_html).text["scores"].split())
    assert f"Cut on ches at {expected:.4g}: the nearest kept score is {ches[~removed].max():.4g}" in text
    assert "Cut on ln_ches" not in text  # the percentile selection ranked by ches only


@pytest.mark.parametrize(
    ("values", "kept", "score_column", "expected"),
    [
        ([1, 2, 3, 4], [True, True, False, False], "ches", (2.5, 2, 3)),
        ([1, 2, 3, 4], [False, False, True, True], "-ches", (2.5, 3, 2)),  # a negated score removes the lowest
        ([1, 3, 3, 4], [True, True, False, False], "ches", (3, 3, 3)),  # a tie split by rank
        ([1, 2, 3, 4], [True, False, True, False], "ches", None),  # overlapping: no threshold (random policy)
        ([1, 2, 3, 4], [True, True, True, True], "ches", None),  # nothing removed
        ([1, 2, 3, 4], [True, True, False, False], "ln_ches", None),  # ranked by another score
        ([1, np.nan, 3, 4], [True, True, False, False], "ches", (2, 1, 3)),  # NaN scores are ignored
    ],
)
def test_selection_cut_on_hand_made_scores(values, kept, score_column, expected):
    cut = selection_cut(values, kept, score_column, "ches")
    assert (None if cut is None else (cut.value, cut.kept_edge, cut.removed_edge)) == expected


def test_highest_ches_pairs_are_listed_in_order_with_clipped_text(demo):
    html = build_report(demo.store, "demo", selection_id=demo.percentile_id,
                        config=ReportConfig(top_pairs=len(demo.scores), text_chars=1000))
    page = Page(html)
    rows = page.rows("top-pairs")
    expected = demo.scores.sort_values("ches", ascending=False)
    assert [row[1] for row in rows] == [f"{v:.4g}" for v in expected.ches]
    assert [int(row[5]) for row in rows] == expected.row.tolist()
    assert rows[0][4] == f"{expected.chosen_tokens.iloc[0]} / {expected.rejected_tokens.iloc[0]}"
    assert [rows[0][6], rows[-1][6]] == ["removed", "kept"]
    assert page.summaries[:2] == [f"Tell me {SCRIPT} now", "user: hi <img src=x onerror=alert(2)>"]
    assert f"{LONG_CHARS - 1000:,} more characters" in html
    assert "x" * 1000 in html and "x" * 1001 not in html


def test_selection_table_counts_every_selection(demo, demo_html):
    rows = Page(demo_html).rows("selections")
    assert [row[0] for row in rows] == [str(demo.percentile_id), str(demo.random_id)]
    for row, selection_id in zip(rows, (demo.percentile_id, demo.random_id)):
        n_kept = int(demo.kept[selection_id].sum())
        assert row[4:7] == [str(n_kept), str(N_PAIRS - n_kept), f"{(N_PAIRS - n_kept) / N_PAIRS:.1%}"]
        tokens = (demo.scores.chosen_tokens + demo.scores.rejected_tokens).to_numpy()
        kept = demo.kept[selection_id]
        assert row[7] == f"{tokens[kept].mean():.3g} / {tokens[~kept].mean():.3g}"  # response lengths beside the cut
    assert rows[0][1:3] == ["percentile", json.dumps({"p": 75.0, "score_column": "ches"}, sort_keys=True)]


def test_quality_findings_are_one_row_each_failures_first_raw_result_collapsed(demo_html):
    page = Page(demo_html)
    findings = [row for row in page.rows("quality") if len(row) == 7 and row[2] in ("error", "warn")]
    assert page.section_summaries["quality"] == ["chosen_differs_from_rejected", "prompt_not_empty"]
    assert [row[2:7] for row in findings] == [["error", "FAIL", "3", "<i>same</i> answer", "—"],
                                              ["error", "pass", "0", "", "—"]]
    collapsed = findings[0][1]  # the summary, then what <details> hides: description, failing pairs, raw JSON
    assert collapsed.startswith("chosen_differs_from_rejected")
    assert "chosen and rejected differ; first failing pairs aaaaaaaaaaaa, b2, c3" in collapsed
    assert '"note": "<i>dup</i>"' in collapsed
    assert ["ingest", "field 'rejected' is empty <b>", "1"] in page.rows("quality")
    assert "Quarantined rows: 1." in page.text["quality"]


def test_ablation_section_shows_latest_row_per_arm_one_column_each(demo, demo_html):
    page = Page(demo_html)
    header = page.tables["ablations"][0]
    metrics = {row[0]: dict(zip(header[1:], row[1:])) for row in page.rows("ablations")}
    assert header[0] == "arm" and set(header[1:]) == set(ARMS)
    for arm, (preferred, dispreferred, before, after) in ARMS.items():
        assert metrics["preferred logp change"][arm] == f"{preferred:.4g}"
        assert metrics["dispreferred logp change"][arm] == f"{dispreferred:.4g}"
        assert (metrics["refusal rate before"][arm], metrics["refusal rate after"][arm]) == (f"{before:.4g}", f"{after:.4g}")
    assert metrics["selection"]["percentile"] == str(demo.percentile_id)
    n_likelihoods = N_PAIRS + sum(int(k.sum()) for k in demo.kept.values())
    assert f"Per pair ({n_likelihoods} points)" in " ".join(Page(demo_html).text["ablations"].split())


def test_sections_without_data_say_so(tmp_path):
    store = Store(tmp_path / "empty.duckdb")
    store.register_dataset("bare", "bare.jsonl", make_pairs()[:3])
    page = Page(build_report(store, "bare"))
    assert page.images == []
    assert "No scores for this dataset version yet" in page.text["scores"]
    assert "No scored pairs to show" in page.text["top-pairs"]
    assert "No selections for this dataset version" in page.text["selections"]
    assert "No quality runs" in page.text["quality"] and "Nothing quarantined" in page.text["quality"]
    assert "No ablations for this dataset version yet" in page.text["ablations"]
    assert "No selection yet, so nothing was removed" in page.text["removed-pairs"]
    assert "No selection of an earlier version" in page.text["refresh-diff"]
    assert "No probe runs of this model in the store" in page.text["probes"]


def copy_of(store: Store, tmp_path: Path) -> Store:
    """A copy of the module's store, for a test that adds to it."""
    path = tmp_path / "copy.duckdb"
    shutil.copyfile(store.path, path)
    return Store(path)


def test_defaults_follow_the_selection_then_the_latest_version(demo, tmp_path):
    store = copy_of(demo.store, tmp_path)
    store.register_dataset("demo", "demo_v2.jsonl", make_pairs()[:20])
    by_selection = Page(build_report(store, "demo", selection_id=demo.random_id))
    assert "demo v1" in by_selection.text["overview"]
    assert f"#{demo.random_id} random" in " ".join(by_selection.text["overview"].split())
    latest = Page(build_report(store, "demo", config=ReportConfig(top_pairs=0)))
    assert "demo v2" in latest.text["overview"] and "No selections" in latest.text["selections"]
    assert ["scored rows", "20"] in latest.tables["overview"]


def test_bad_requests_name_the_fix(demo, tmp_path):
    with pytest.raises(ChesCurateError, match=r"no scores from model 'nope' \(scored by: tiny_llama@"):
        build_report(demo.store, "demo", model_key="nope")
    with pytest.raises(ChesCurateError, match=r"no selection 999"):
        build_report(demo.store, "demo", selection_id=999)
    with pytest.raises(ChesCurateError, match=r"unknown dataset 'other'"):
        build_report(demo.store, "other")
    store = copy_of(demo.store, tmp_path)
    store.register_dataset("other", "o.jsonl", make_pairs()[:2])
    with pytest.raises(ChesCurateError, match=rf"selection {demo.random_id} filtered dataset 'demo' v1, not 'other' v1"):
        build_report(store, "other", selection_id=demo.random_id)
    store.register_model("second-model", {})
    run_id = store.start_score_run("demo", 1, "second-model")
    store.write_scores(run_id, "second-model", fake_scores(make_pairs()))
    with pytest.raises(ChesCurateError, match=r"scored by several models; pick one with --model-key: second-model, tiny"):
        build_report(store, "demo")


def test_cli_writes_the_report(demo, tmp_path):
    app = typer.Typer()
    report_command.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `report` a named subcommand
    output = tmp_path / "out" / "report.html"
    result = CliRunner().invoke(app, ["report", "--dataset", "demo", "--selection", str(demo.percentile_id),
                                      "--top", "3", "--output", str(output), "--db", str(demo.store.path)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "report.html" in result.output
    assert len(Page(output.read_text(encoding="utf-8")).section_summaries["top-pairs"]) == 3
    missing = CliRunner().invoke(app, ["report", "--dataset", "demo", "--output", str(output),
                                       "--db", str(tmp_path / "typo.duckdb")])
    assert isinstance(missing.exception, ChesCurateError) and "no store at" in str(missing.exception)
    assert not (tmp_path / "typo.duckdb").exists()



def test_removed_pairs_are_listed_by_rank_with_their_texts(demo, demo_html):
    page = Page(demo_html)
    selection = demo.store.selection(demo.percentile_id)
    removed = selection[~selection.kept].sort_values("rank")
    ches = demo.scores.set_index("pair_id").ches
    rows = [row for row in page.rows("removed-pairs") if row[0] != "rank"]
    assert [int(row[0]) for row in rows] == removed["rank"].tolist()
    assert [row[1] for row in rows] == [f"{ches[p]:.4g}" for p in removed.pair_id]
    assert all(row[6] == "removed" for row in rows)
    assert page.section_summaries["removed-pairs"][0] == f"Tell me {SCRIPT} now"  # CHES 100: removed first
    assert "bad answer 7 </details><b>bold</b>" in page.text["removed-pairs"]


def test_histogram_range_leaves_an_outlier_out_and_counts_it():
    from ches_curate.report_plots import plot_range

    values = np.concatenate([np.linspace(-50, 50, 99), [-4.3e7]])
    shown = plot_range(values)
    q1, q3 = np.percentile(values, [25, 75])  # the far-out fence lies between the data and the outlier
    assert (shown.low, shown.high) == (-50.0, 50.0) and q1 - 3 * (q3 - q1) > -4.3e7
    assert (shown.n_below, shown.n_above) == (1, 0)
    assert plot_range(values, cut=-400.0).low == -400.0  # the cut line is always drawn
    assert plot_range(np.array([2.0, 2.0, 2.0])) == plot_range(np.array([2.0])) == type(shown)(2.0, 2.0, 0, 0)


def test_report_of_a_refreshed_version_shows_the_diff_with_the_previous_selection(demo, tmp_path):
    store = copy_of(demo.store, tmp_path)
    first = apply_policy(demo.scores, "percentile", {"p": 75, "score_column": "ches"})  # the user's (the fixture's is an ablation arm's)
    old_id = store.save_selection("percentile", first.params, "demo", 1, MODEL, first.frame, "ches", source="pipeline")
    store.register_dataset("demo", "demo_v2.jsonl", make_pairs()[:20])  # the same pairs are already scored
    result = apply_policy(store.scores("demo", 2, MODEL), "percentile", {"p": 75, "score_column": "ches"})
    new_id = store.save_selection("percentile", result.params, "demo", 2, MODEL, result.frame, "ches", source="refresh")
    page = Page(build_report(store, "demo", config=ReportConfig(top_pairs=0)))
    before = store.selection(old_id).set_index("pair_id").kept
    after = store.selection(new_id).set_index("pair_id").kept
    gone = before.index.difference(after.index)
    flipped = [p for p in after.index if before[p] != after[p]]
    now_removed = sum(1 for p in flipped if not after[p])
    text = " ".join(page.text["refresh-diff"].split())
    assert (f"Against selection #{old_id} of v1: 0 added, {len(gone)} removed, "
            f"{len(flipped) - now_removed} now kept, {now_removed} now removed, "
            f"{len(after) - len(flipped)} unchanged.") in text
    rows = [row for row in page.rows("refresh-diff") if row[0] != "change"]
    assert len(rows) == len(gone) + len(flipped)
    texts = {p.pair_id: p for p in make_pairs()}  # each changed pair shows its texts, shortened, not its id
    changed = [*flipped, *gone]
    assert sorted(row[3:6] for row in rows) == sorted(
        [texts[p].prompt_text, texts[p].chosen, texts[p].rejected] for p in changed)
    assert not any(p in " ".join(sum(rows, [])) for p in changed)


def _insert_ablations(store: Store, rows: list[dict], likelihoods: pd.DataFrame | None = None) -> None:
    """`ablations` rows (and `pair_likelihoods` rows) written directly, as `ches_curate.ablation.write_arm` would."""
    frame = pd.DataFrame(rows).assign(dataset_name="demo", dataset_version=1, model_key=MODEL)
    columns = ", ".join(frame.columns)
    with store.connect() as con:
        con.register("new_ablations", frame)
        con.execute(f"INSERT INTO ablations ({columns}) SELECT {columns} FROM new_ablations")
        if likelihoods is not None:
            con.register("new_likelihoods", likelihoods)
            columns = ", ".join(likelihoods.columns)
            con.execute(f"INSERT INTO pair_likelihoods ({columns}) SELECT {columns} FROM new_likelihoods")


SLICE_COLUMNS = ("ches", "-edit_distance")
SLICE_PERCENTILES = (0.0, 50.0, 100.0)
SLICE_SEEDS = (0, 1, 2)


def slice_change(column: str, percentile: float, seed: int) -> float:
    """A made-up preferred log-prob change: CHES slices lose more the higher their percentile; seeds spread it."""
    slope = -2.0 if column == "ches" else 0.25
    return slope * percentile / 100 + 0.1 * seed - 0.05 * seed**2


def _add_quantile_slices(store: Store) -> None:
    rows = [{"ablation_id": ablation_id, "arm": f"quantile-slice(n=8,percentile={p:g},score_column={column})",
             "policy": "quantile-slice", "n_train_pairs": 8, "design": "quantile-slices", "train_seed": seed,
             "score_column": column, "percentile": p, "created_at": created_at,
             "preferred_logp_change": 99.0 if ablation_id == 5 else slice_change(column, p, seed)}
            for ablation_id, created_at in ((5, "2025-07-01"), (6, "2025-07-02"))  # 5: an older run, not shown
            for column in SLICE_COLUMNS for p in SLICE_PERCENTILES for seed in SLICE_SEEDS]
    _insert_ablations(store, rows)


def test_seed_spread_aggregates_each_group_over_its_seeds():
    from ches_curate.report_ablation import seed_spread

    rows = pd.DataFrame({
        "score_column": ["ches", "ches", "ches", "ln_ches", "ches", "ln_ches"],
        "percentile": [50.0, 50.0, 50.0, 0.0, 0.0, 0.0],
        "train_seed": [0, 1, 2, 0, 0, 1],
        "preferred_logp_change": [-1.0, -3.0, np.nan, 2.0, 0.5, 4.0],
    })
    spread = seed_spread(rows, ["score_column", "percentile"], "preferred_logp_change")
    assert spread[["score_column", "percentile"]].values.tolist() == [["ches", 50.0], ["ln_ches", 0.0], ["ches", 0.0]]
    assert spread["mean"].tolist() == [-2.0, 3.0, 0.5]
    assert spread["min"].tolist() == [-3.0, 2.0, 0.5] and spread["max"].tolist() == [-1.0, 4.0, 0.5]
    assert spread.n_seeds.tolist() == [2, 2, 1]  # the NaN of seed 2 is left out
    assert spread.seeds.tolist() == [[0, 1], [0, 1], [0]] and spread["values"].tolist() == [[-1.0, -3.0], [2.0, 4.0], [0.5]]
    empty = seed_spread(rows.assign(preferred_logp_change=np.nan), ["score_column"], "preferred_logp_change")
    assert empty.n_seeds.tolist() == [0, 0] and empty["mean"].isna().all()


def test_quantile_slices_are_drawn_as_figure_2_one_line_per_score_with_seed_spread(demo, tmp_path, monkeypatch):
    from ches_curate import report_plots

    store = copy_of(demo.store, tmp_path)
    _add_quantile_slices(store)
    drawn, draw = {}, report_plots.quantile_slice_curves

    def record(lines, ylabel):
        drawn.update(lines)
        return draw(lines, ylabel)

    monkeypatch.setattr(report_plots, "quantile_slice_curves", record)
    page = Page(build_report(store, "demo", selection_id=demo.percentile_id, config=ReportConfig(top_pairs=0)))

    labels = {"ches": "CHES", "-edit_distance": "edit distance (negated: most similar high)"}
    assert sorted(drawn) == sorted(labels.values())
    for column, label in labels.items():
        x, spread = drawn[label]
        assert list(x) == list(SLICE_PERCENTILES)
        expected = np.array([[slice_change(column, p, s) for s in SLICE_SEEDS] for p in SLICE_PERCENTILES])
        np.testing.assert_allclose(spread.mean, expected.mean(axis=1))
        np.testing.assert_allclose(spread.low, expected.min(axis=1))
        np.testing.assert_allclose(spread.high, expected.max(axis=1))
        np.testing.assert_allclose(np.array(spread.values), expected)

    text = " ".join(page.text["ablations"].split())
    assert "Quantile slices (Razin et al., Figure 2)" in text
    assert "Ablation #6: DPO on slices of up to 8 pairs" in text and "trained once per seed (0, 1, 2)" in text
    assert "high-percentile slices lose the most preferred likelihood" in text
    assert ("img", "alt", "Figure 2: preferred log-prob change per quantile slice") in page.attrs
    assert len(page.images) == 8  # the seven of the demo store and Figure 2
    table = {row[0]: row[1:] for row in page.tables["ablations"] if row[0] in ("score \\ percentile", *labels.values())}
    assert table["score \\ percentile"] == ["0", "50", "100"]
    for column, label in labels.items():
        cells = []
        for p in SLICE_PERCENTILES:
            values = [slice_change(column, p, s) for s in SLICE_SEEDS]
            cells.append(f"{np.mean(values):.4g} [{min(values):.4g}, {max(values):.4g}]")
        assert table[label] == cells
    # The slices have their own figure: the arms table and bars keep the other designs' arms only.
    header = page.tables["ablations"][0]
    assert header[0] == "arm" and set(header[1:]) == set(ARMS)


def test_keep_lowest_arms_with_several_seeds_show_each_seed_and_bars_of_their_mean(demo, tmp_path, monkeypatch):
    from ches_curate import report_plots

    store = copy_of(demo.store, tmp_path)
    arms = {"full": -2.0, "length-normalized(fraction=0.25,score_column=ln_ches)": -0.5, "random(n=36,seed={})": -1.5}
    policies = (None, "length-normalized", "random")
    pair_ids = demo.scores.pair_id.tolist()
    rows, likelihoods = [], []
    for seed in (0, 1):
        for (name, change), policy in zip(arms.items(), policies):
            arm = name.format(seed)
            rows.append({"ablation_id": 7, "arm": arm, "policy": policy, "design": "keep-lowest", "train_seed": seed,
                         "n_train_pairs": 4, "preferred_logp_change": change - seed,
                         "dispreferred_logp_change": -3.0 - seed, "created_at": "2025-08-01"})
            likelihoods += [{"ablation_id": 7, "arm": arm, "train_seed": seed, "pair_id": p,
                             "preferred_logp_before": -10.0, "preferred_logp_after": -10.0 - seed} for p in pair_ids[:4]]
    # A pair_likelihoods row of a seed with no ablations row is joined to nothing.
    likelihoods.append({**likelihoods[0], "train_seed": 9})
    _insert_ablations(store, rows, pd.DataFrame(likelihoods))
    bars, draw = {}, report_plots.grouped_bars

    def record(names, series, ylabel):
        bars[ylabel] = (names, series)
        return draw(names, series, ylabel)

    monkeypatch.setattr(report_plots, "grouped_bars", record)
    page = Page(build_report(store, "demo", selection_id=demo.percentile_id, config=ReportConfig(top_pairs=0)))

    header = page.tables["ablations"][0]
    seeds = next(row for row in page.tables["ablations"] if row[0] == "train seed")
    columns = list(zip(header[1:], seeds[1:]))
    # `full` of seed 0 replaces the demo's older `full`; its other arms (seed 0) stay.
    assert sorted(columns) == sorted([("percentile", "0"), ("random", "0"),
                                      *((arm.format(seed), str(seed)) for arm in arms for seed in (0, 1))])
    preferred = next(row for row in page.tables["ablations"] if row[0] == "preferred logp change")
    assert dict(zip(columns, preferred[1:]))[("full", "1")] == "-3"

    names, series = bars["mean log-prob change"]
    # The random control of each seed draws with that seed: one control, one bar.
    assert names == ["percentile", "random", "full", "length-normalized(fraction=0.25,score_column=ln_ches)",
                     "random(n=36)"]
    for i, (arm, change) in enumerate(arms.items(), start=2):
        assert series["preferred"].mean[i] == pytest.approx(change - 0.5)
        assert (series["preferred"].low[i], series["preferred"].high[i]) == (change - 1, change)
        assert list(series["preferred"].values[i]) == [change, change - 1]
    assert series["preferred"].mean[0] == ARMS["percentile"][0] and list(series["preferred"].values[0]) == [-0.75]
    assert "Bars are means over the training seeds" in " ".join(page.text["ablations"].split())
    n_likelihoods = sum(int(k.sum()) for k in demo.kept.values()) + 2 * len(arms) * 4
    assert f"Per pair ({n_likelihoods} points)" in " ".join(page.text["ablations"].split())


@pytest.mark.parametrize(("arm", "design", "policy", "bar"), [
    ("random(n=36,seed=2)", "keep-lowest", "random", "random(n=36)"),
    ("random(seed=2,n=36)", "keep-lowest", "random", "random(n=36)"),
    ("random(n=36,seed=2)", "policies", "random", "random(n=36,seed=2)"),  # controls of one seed, several sizes
    ("length-normalized(fraction=0.05,score_column=ln_ches)", "keep-lowest", "length-normalized",
     "length-normalized(fraction=0.05,score_column=ln_ches)"),
])
def test_keep_lowest_random_controls_of_all_seeds_share_one_bar(arm, design, policy, bar):
    from ches_curate.report_ablation import _bar

    assert _bar(arm, design, policy) == bar


def test_ablations_of_a_store_before_migration_8_take_their_seed_from_their_config(tmp_path):
    import duckdb

    from ches_curate.store import migrations

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrations.apply(con, up_to=7)
    pairs = make_pairs()
    for arm, seed in (("full", 3), ("percentile", None)):
        config = json.dumps({"train": {"seed": seed}}) if seed is not None else None
        con.execute("INSERT INTO ablations (ablation_id, arm, dataset_name, dataset_version, model_key, "
                    "preferred_logp_change, config) VALUES (1, ?, 'demo', 1, ?, -1.0, ?)", [arm, MODEL, config])
        for pair in pairs[:5]:
            con.execute("INSERT INTO pair_likelihoods VALUES (1, ?, ?, -5.0, -6.0, -5.0, -7.0)", [arm, pair.pair_id])
    con.close()
    store = Store(path)
    store.register_dataset("demo", "demo.jsonl", pairs)
    store.register_model(MODEL, {})
    run_id = store.start_score_run("demo", 1, MODEL)
    store.write_scores(run_id, MODEL, fake_scores(pairs))
    store.finish_score_run(run_id, "finished")
    page = Page(build_report(store, "demo", config=ReportConfig(top_pairs=0)))
    rows = {row[0]: row[1:] for row in page.tables["ablations"]}
    assert rows["arm"] == ["full", "percentile"] and rows["train seed"] == ["3", "0"]
    assert rows["design"] == ["policies", "policies"]
    assert "Per pair (10 points)" in " ".join(page.text["ablations"].split())


def test_probe_runs_of_the_model_are_listed_newest_first_with_their_first_gainers(demo, tmp_path):
    store = copy_of(demo.store, tmp_path)
    gainers = '[{"token": "Yes", "prob_before": 0.05, "prob_after": 0.12}]'
    base = {"model_key": MODEL, "prompt": "<script>alert(1)</script> Is the sky blue?", "preferred": "No",
            "dispreferred": "Never", "mode": "paper", "leading_space": False, "steps": 100, "seed": 0,
            "p_plus_before": 0.305, "p_minus_before": 1.8e-4, "loss_monotone": True, "single_token_ches": -3.32,
            "hidden_norm_sq": 2852.0, "predicted_gainers": "[]"}
    first = store.record_probe_run(base | {"learning_rate": 1e-7, "p_plus_after": 0.723, "p_plus_min": 0.305,
                                           "p_plus_min_step": 0, "displaced": False, "top_gainers": gainers})
    second = store.record_probe_run(base | {"learning_rate": 1e-4, "p_plus_after": 0.2, "p_plus_min": 0.048,
                                            "p_plus_min_step": 2, "displaced": True, "top_gainers": "[]"})
    store.record_probe_run(base | {"model_key": "another@x/float32", "learning_rate": 1e-5, "top_gainers": "[]"})

    html = build_report(store, "demo", model_key=MODEL)
    text = " ".join(Page(html).text["probes"].split())
    assert "The latest 2 of 2 probe runs of this model" in text and "(1 of these runs)" in text
    rows = Page(html).tables["probes"][1:]
    assert [row[0] for row in rows] == [str(second), str(first)]  # newest first, only this model's
    assert [row[-2] for row in rows] == ["—", "'Yes'"]  # no token rose in the second run
    assert "0.305 → 0.723" in text and "0.048 (2)" in text and "'Yes'" in text
    assert "1e-05" not in text  # another model's run
    assert "<script>alert" not in html and "&lt;script&gt;" in html


def how_to_read(html: str) -> str:
    return " ".join(Page(html).text["how-to-read"].split())


def test_how_to_read_says_what_the_scores_measure_and_what_the_selection_removed(demo, demo_html, tmp_path):
    text = how_to_read(demo_html)
    assert "A higher score means a higher risk of likelihood displacement" in text
    assert "ln-CHES divides each sum by its response's length" in text
    ches, kept = demo.scores.ches.to_numpy(), demo.kept[demo.percentile_id]
    cut = (ches[kept].max() + ches[~kept].min()) / 2
    assert (f"Selection #{demo.percentile_id} (percentile" in text and "ranked the pairs by ches and removed "
            f"{(~kept).sum()} of {N_PAIRS} pairs ({(~kept).sum() / N_PAIRS:.1%})") in text
    assert f"It removed every pair scoring above {cut:.4g} on ches" in text
    random = how_to_read(build_report(demo.store, "demo", selection_id=demo.random_id, config=ReportConfig(top_pairs=0)))
    assert f"removed {N_PAIRS - demo.kept[demo.random_id].sum()} of {N_PAIRS} pairs" in random
    assert "No single value of CHES or ln-CHES separates the pairs it removed" in random
    store = Store(tmp_path / "bare.duckdb")
    store.register_dataset("bare", "bare.jsonl", make_pairs()[:3])
    assert "No selection of this version and model yet" in how_to_read(build_report(store, "bare"))


def test_histograms_explain_pairs_removed_by_another_score(demo, tmp_path, monkeypatch):
    calls = {}

    def record(values, label, kept=None, cut=None, cut_label="cut", note=None):
        calls[label] = (cut, note)
        return "data:image/png;base64,"

    monkeypatch.setattr(report_plots, "score_histogram", record)
    page = Page(build_report(demo.store, "demo", selection_id=demo.percentile_id, config=ReportConfig(top_pairs=0)))
    note = f"removed pairs were chosen by ches (selection #{demo.percentile_id}), not by a ln-CHES cut"
    assert calls["CHES"][0] is not None and calls["CHES"][1] is None  # ranked by CHES: the cut line
    assert calls["ln-CHES"] == (None, note)
    assert note in " ".join(page.text["scores"].split())  # and under the figure
    store = copy_of(demo.store, tmp_path)
    by_ln = apply_policy(demo.scores, "percentile", {"p": 75, "score_column": "ln_ches"})
    ln_id = store.save_selection("percentile", by_ln.params, "demo", 1, MODEL, by_ln.frame, "ln_ches", source="cli")
    build_report(store, "demo", selection_id=ln_id, config=ReportConfig(top_pairs=0))
    assert calls["ln-CHES"][0] is not None and calls["ln-CHES"][1] is None
    assert calls["CHES"] == (None, f"removed pairs were chosen by ln_ches (selection #{ln_id}), not by a CHES cut")


def test_length_plot_caption_names_the_scale_the_axis_has(demo, demo_html, tmp_path):
    caption = " ".join(Page(demo_html).text["scores"].split())
    assert "y: CHES, on a linear scale" in caption and "symmetric log" not in caption
    store = copy_of(demo.store, tmp_path)
    store.sql("UPDATE scores SET ches = -4.3e7 WHERE pair_id = ?", write=True, params=[demo.scores.pair_id.iloc[0]])
    caption = " ".join(Page(build_report(store, "demo", config=ReportConfig(top_pairs=0))).text["scores"].split())
    assert "y: CHES, on a symmetric log scale" in caption
    values = np.concatenate([np.linspace(-50, 50, 99), [-4.3e7]])
    assert report_plots.symlog_threshold(values) == pytest.approx(np.percentile(np.abs(values), 90))
    assert report_plots.symlog_threshold(np.linspace(-50, 50, 99)) is None


def test_drift_findings_show_the_bound_they_were_checked_against(demo, tmp_path):
    store = copy_of(demo.store, tmp_path)
    run_id = int(store.sql(
        "INSERT INTO quality_runs (suite, dataset_name, dataset_version, model_key, success, n_rows, failure_rate) "
        "VALUES ('scores', 'demo', 1, ?, true, 48, 0) RETURNING quality_run_id", write=True, params=[MODEL],
    ).quality_run_id.iloc[0])
    mean = {"kwargs": {"column": "ches", "min_value": 20.25, "max_value": 27.75}, "observed_value": 31.5}
    quantiles = {"kwargs": {"column": "ln_ches", "quantile_ranges": {"quantiles": [0.1, 0.9],
                                                                     "value_ranges": [[0.5, 1.5], [2.0, 3.0]]}},
                 "observed_value": {"quantiles": [0.1, 0.9], "values": [1.0, 3.5]}}
    store.sql("INSERT INTO quality_results VALUES (?, 'ches_mean_drift', 'warn', false, NULL, '[]', ?), "
              "(?, 'ln_ches_quantiles_drift', 'warn', false, NULL, '[]', ?)", write=True,
              params=[run_id, json.dumps(mean), run_id, json.dumps(quantiles)])
    rows = {row[1].split("{")[0]: row for row in Page(build_report(store, "demo")).rows("quality") if len(row) == 7}
    assert rows["ches_mean_drift"][5:7] == ["31.5", "[20.25, 27.75]"]
    assert rows["ln_ches_quantiles_drift"][5:7] == ["p10 1, p90 3.5", "p10 in [0.5, 1.5]; p90 in [2, 3]"]
    assert finding_bound({"max_value": 4000}) == "[−∞, 4,000]" and finding_bound({"column": "chosen"}) == ""

