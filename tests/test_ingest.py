"""Ingest: every format parses to the right prompt/chosen/rejected, and every bad row is named or quarantined."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ches_curate.errors import ChesCurateError, InputError
from ches_curate.ingest import RAW_LIMIT, RejectedRow, read_pairs, split_hh_transcript
from ches_curate.pairs import PreferencePair

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
HINT = "(use --on-error quarantine to keep going)"


def _split(items):
    pairs = [item for item in items if isinstance(item, PreferencePair)]
    rejected = [item for item in items if isinstance(item, RejectedRow)]
    assert len(pairs) + len(rejected) == len(items)
    return pairs, rejected


def _jsonl_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _input_rows(path: Path) -> int:
    """Rows of a file counted independently of the reader."""
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        if path.suffix == ".csv":
            return sum(1 for _ in csv.reader(handle)) - 1
        return sum(1 for line in handle if line.strip())


def test_prompt_chosen_rejected_jsonl_keeps_fields_and_extra_columns_as_metadata():
    pairs = list(read_pairs(DATA / "pairs.jsonl"))
    records = _jsonl_records(DATA / "pairs.jsonl")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in records
    ]
    assert pairs[2].prompt == "Translate 'naïve café' to English."
    assert [p.metadata for p in pairs] == [{"id": "q1"}, {"id": "q2"}, {"id": "q3"}]
    assert [p.row for p in pairs] == [0, 1, 2]
    assert {p.format for p in pairs} == {"prompt_chosen_rejected"}


def test_pair_id_is_the_same_from_jsonl_csv_and_parquet():
    by_source = {
        suffix: [(p.pair_id, p.prompt, p.chosen, p.rejected, p.row, p.metadata)
                 for p in read_pairs(DATA / f"pairs.{suffix}")]
        for suffix in ("jsonl", "csv", "parquet")
    }
    assert by_source["csv"] == by_source["jsonl"] == by_source["parquet"]
    assert len(by_source["jsonl"]) == 3
    canonical = json.dumps(
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
        ensure_ascii=False, sort_keys=True, separators=(",", ":"),
    )
    assert by_source["csv"][0][0] == hashlib.sha256(canonical.encode()).hexdigest()


def test_conversational_prompt_is_the_shared_prefix_or_the_given_prompt():
    pairs = list(read_pairs(DATA / "conversational.jsonl"))
    assert [p.format for p in pairs] == ["conversational"] * 3
    shared, explicit, repeated = pairs
    assert shared.prompt == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a prime."},
    ]
    assert (shared.chosen, shared.rejected, shared.metadata) == ("7", "9", {"source": "chat"})
    assert explicit.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert (explicit.chosen, explicit.rejected) == ("4", "5")
    assert (repeated.prompt, repeated.chosen, repeated.rejected) == ("Say hi.", "Hi!", "No.")
    # One pair, one id, whatever the layout: plain strings, TRL conversational, UltraFeedback.
    as_messages = PreferencePair([{"role": "user", "content": "Say hi."}], "Hi!", "No.")
    assert repeated.pair_id == PreferencePair("Say hi.", "Hi!", "No.").pair_id == as_messages.pair_id


def transcript(messages: list[dict], response: str) -> str:
    """An hh-rlhf transcript written back from its turns: the inverse of the parse."""
    turns = [*messages, {"role": "assistant", "content": response}]
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


def test_hh_rlhf_transcripts_become_conversations_as_trl_prepares_them():
    first, second = read_pairs(DATA / "hh_rlhf.jsonl")
    assert first.format == second.format == "hh_rlhf"
    assert first.prompt == [{"role": "user", "content": "How do I boil an egg?"}]
    assert (first.chosen, first.rejected) == ("Put it in boiling water for nine minutes.", "Eggs are overrated.")
    assert second.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Tell me a joke."}]
    assert second.rejected == "No."
    record = _jsonl_records(DATA / "hh_rlhf.jsonl")[1]
    assert transcript(second.prompt, second.chosen) == record["chosen"]
    assert transcript(second.prompt, second.rejected) == record["rejected"]
    assert split_hh_transcript(record["rejected"]) == (second.prompt, "No.")
    assert split_hh_transcript("\n\nHuman: Hi\n\nAssistant:") == ([{"role": "user", "content": "Hi"}], "")
    assert split_hh_transcript("\n\nHuman: Hi") is None
    assert split_hh_transcript("Human: Hi\n\nAssistant: Hello.") is None


@pytest.mark.parametrize(("chosen", "field", "reason"), [
    ("Human: Hi\n\nAssistant: Hello.", "chosen",
     "has text before its first turn (turns start with '\\n\\nHuman: ' or '\\n\\nAssistant: ')"),
    ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye", "chosen",
     "ends with a 'Human' turn, not the assistant's response"),
    ("\n\nAssistant: Hello.", "chosen",
     "has no turn before its last '\\n\\nAssistant:' turn; the prompt would be empty"),
])
def test_unparseable_hh_rlhf_transcripts_are_quarantined_with_the_reason(tmp_path, chosen, field, reason):
    path = tmp_path / "hh.jsonl"
    rejected = chosen.replace("Hello.", "Go away.") if "Hello." in chosen else chosen + " no"
    path.write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    (row,) = read_pairs(path, format="hh_rlhf", on_error="quarantine")
    assert isinstance(row, RejectedRow) and (row.line, row.field, row.reason) == (1, field, reason)


def test_strings_without_a_prompt_or_hh_markers_are_rejected_row_by_row(tmp_path):
    path = tmp_path / "no_prompt.jsonl"
    path.write_text(json.dumps({"chosen": "Yes.", "rejected": "No."}) + "\n")
    with pytest.raises(InputError) as err:
        list(read_pairs(path))
    assert str(err.value) == (
        f"{path}:1: field 'chosen' has no '\\n\\nAssistant:' turn "
        "(not an hh-rlhf transcript: add a 'prompt' column or pass --format)"
    )
    (rejected,) = read_pairs(path, on_error="quarantine")
    assert (rejected.line, rejected.field, rejected.raw) == (1, "chosen", '{"chosen": "Yes.", "rejected": "No."}')


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("pairs.jsonl", "prompt_chosen_rejected"), ("conversational.jsonl", "conversational"),
     ("hh_rlhf.jsonl", "hh_rlhf")],
)
def test_auto_detection_gives_the_same_pairs_as_the_explicit_format(name, fmt):
    auto = list(read_pairs(DATA / name))
    assert {p.format for p in auto} == {fmt}
    assert auto == list(read_pairs(DATA / name, format=fmt))


def test_auto_detection_skips_a_bad_first_row_and_reports_it_as_a_row(tmp_path):
    path = tmp_path / "first_row_bad.jsonl"
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    path.write_text(json.dumps({"chosen": "", "rejected": good["rejected"]}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(InputError) as err:
        list(read_pairs(path))
    assert str(err.value) == f"{path}:1: field 'chosen' is empty {HINT}"
    pairs, rejected = _split(list(read_pairs(path, on_error="quarantine")))
    assert [(r.line, r.field) for r in rejected] == [(1, "chosen")]
    assert [(p.row, p.format, p.chosen) for p in pairs] == [(1, "hh_rlhf", "Hello.")]


def test_explicit_format_that_does_not_fit_the_columns_fails_the_file():
    with pytest.raises(InputError) as err:
        list(read_pairs(DATA / "hh_rlhf.jsonl", format="prompt_chosen_rejected", on_error="quarantine"))
    assert str(err.value) == (
        f"{DATA / 'hh_rlhf.jsonl'}: has columns chosen, rejected; expected columns prompt, chosen, rejected "
        "(--format prompt_chosen_rejected) (rename the columns; aliases are not guessed)"
    )


# name, message after the path, the rejected rows as (line, field, reason).
ROW_FAULTS = [
    ("malformed_json.jsonl", f":2: is malformed JSON (Expecting ',' delimiter at column 38) {HINT}",
     [(2, None, "is malformed JSON (Expecting ',' delimiter at column 38)")]),
    ("missing_field.jsonl", f":2: field 'rejected' is missing {HINT}", [(2, "rejected", "is missing")]),
    ("empty_prompt.jsonl", f":2: field 'prompt' is empty {HINT}", [(2, "prompt", "is empty")]),
    ("empty_response.jsonl", f":1: field 'rejected' is empty {HINT}", [(1, "rejected", "is empty")]),
    ("chosen_equals_rejected.jsonl",
     ":2: field 'rejected' is identical to 'chosen' (a pair needs two different responses; "
     "use --on-error quarantine to keep going)", [(2, "rejected", "is identical to 'chosen'")]),
    ("non_utf8.jsonl",
     ":2: field 'chosen' is not valid UTF-8 text (re-encode the file as UTF-8 or use --on-error quarantine to keep "
     "going)",
     [(2, "chosen", "is not valid UTF-8 text")]),
    ("non_string_content.jsonl", f":2: field 'chosen' must be a string, got int {HINT}",
     [(2, "chosen", "must be a string, got int")]),
    ("non_string_message_content.jsonl", f":2: field 'chosen[1].content' must be a string, got list {HINT}",
     [(2, "chosen[1].content", "must be a string, got list")]),
    ("conversational_prefix_mismatch.jsonl",
     f":2: field 'rejected' differs from 'chosen' before the final assistant message {HINT}",
     [(2, "rejected", "differs from 'chosen' before the final assistant message")]),
    ("mismatched_hh_transcripts.jsonl",
     ":2: field 'rejected' does not match 'chosen': chosen and rejected transcripts differ before the last assistant "
     "turn (first difference at character 24) (fix the transcripts or use --on-error quarantine to keep going)",
     [(2, "rejected", "does not match 'chosen': chosen and rejected transcripts differ before the last assistant "
       "turn (first difference at character 24)")]),
    ("not_json_object.jsonl", f":2: must be a JSON object, got list {HINT}",
     [(2, None, "must be a JSON object, got list")]),
    ("ragged_row.csv", f":3: has 2 values but the header has 3 columns {HINT}",
     [(3, None, "has 2 values but the header has 3 columns")]),
    ("null_field.parquet", f": row 2: field 'chosen' is null {HINT}", [(2, "chosen", "is null")]),
]


@pytest.mark.parametrize(("name", "message", "expected_rejected"), ROW_FAULTS, ids=[f[0] for f in ROW_FAULTS])
def test_bad_row_fails_with_file_line_and_field_or_is_quarantined_with_nothing_lost(name, message, expected_rejected):
    path = BAD / name
    with pytest.raises(InputError) as err:
        list(read_pairs(path))
    assert str(err.value) == f"{path}{message}"

    pairs, rejected = _split(list(read_pairs(path, on_error="quarantine")))
    assert [(r.line, r.field, r.reason) for r in rejected] == expected_rejected
    assert {r.source for r in rejected} == {str(path)}
    assert all(r.raw for r in rejected)
    n_input_rows = _input_rows(path)
    assert len(pairs) + len(rejected) == n_input_rows
    first_line = 2 if path.suffix == ".csv" else 1  # one-line records; a CSV's line 1 is its header
    rejected_rows = {line - first_line for line, _, _ in expected_rejected}
    assert [p.row for p in pairs] == [row for row in range(n_input_rows) if row not in rejected_rows]


FILE_FAULTS = [
    ("empty.jsonl", ": has no rows (expected at least one preference pair)"),
    ("wrong_columns.jsonl", ": has columns question, good, bad; expected columns prompt, chosen, rejected, or chosen, "
     "rejected (hh-rlhf transcripts or message lists) (rename the columns; aliases are not guessed)"),
    ("wrong_columns.csv", ": has columns question, good, bad; expected columns prompt, chosen, rejected, or chosen, "
     "rejected (hh-rlhf transcripts or message lists) (rename the columns; aliases are not guessed)"),
    ("wrong_types.parquet", ": field 'chosen' has Parquet type int64; expected string or a list of {role, content} "
     "messages (write this column with the expected type)"),
]


@pytest.mark.parametrize(("name", "message"), FILE_FAULTS, ids=[f[0] for f in FILE_FAULTS])
@pytest.mark.parametrize("on_error", ["fail", "quarantine"])
def test_bad_file_fails_even_in_quarantine_mode(name, message, on_error):
    path = BAD / name
    with pytest.raises(InputError) as err:
        list(read_pairs(path, on_error=on_error))
    assert str(err.value) == f"{path}{message}"


def test_every_file_in_the_bad_corpus_is_covered_by_a_test():
    covered = {f[0] for f in ROW_FAULTS} | {f[0] for f in FILE_FAULTS} | {"duplicate_pairs.jsonl", "response_1mb.jsonl"}
    assert {p.name for p in BAD.iterdir()} == covered


def test_duplicates_and_a_1mb_response_are_not_ingest_errors():
    first, second, third = read_pairs(BAD / "duplicate_pairs.jsonl")
    assert first.pair_id == third.pair_id != second.pair_id
    assert [first.row, second.row, third.row] == [0, 1, 2]
    (long,) = read_pairs(BAD / "response_1mb.jsonl")
    assert long.rejected == "a " * (1 << 19)


def test_shared_hh_rlhf_reports_mismatched_transcripts_and_empty_responses(shared_hh_path):
    items = list(read_pairs(shared_hh_path, on_error="quarantine"))
    pairs, rejected = _split(items)
    assert len(items) == _input_rows(shared_hh_path) == 1500
    mismatched = [r.line for r in rejected if "differ before the last assistant turn" in r.reason]
    assert mismatched == [811, 1100, 1266, 1268, 1326]
    assert [(r.line, r.field, r.reason) for r in rejected if r.line not in mismatched] == [
        (338, "chosen", "is empty after the last '\\n\\nAssistant:'"),
        (707, "chosen", "is empty after the last '\\n\\nAssistant:'"),
    ]
    assert {r.field for r in rejected if r.line in mismatched} == {"rejected"}
    assert len(pairs) == 1493 and {p.format for p in pairs} == {"hh_rlhf"}
    records = _jsonl_records(shared_hh_path)
    for pair in pairs:
        record = records[pair.row]
        assert transcript(pair.prompt, pair.chosen) == record["chosen"]
        assert transcript(pair.prompt, pair.rejected) == record["rejected"]
    assert max(len(p.prompt) for p in pairs) > 1
    assert {m["role"] for p in pairs for m in p.prompt} == {"user", "assistant"}


def test_local_datasets_directory_is_read_like_the_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = _jsonl_records(DATA / "pairs.jsonl")
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "single")
    expected = [(p.pair_id, p.row, p.metadata) for p in read_pairs(DATA / "pairs.jsonl")]
    assert [(p.pair_id, p.row, p.metadata) for p in read_pairs(tmp_path / "single")] == expected

    bad = [dict(records[0]), {**records[1], "rejected": " "}]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                                   "test": datasets.Dataset.from_list(bad)})
    splits.save_to_disk(tmp_path / "splits")
    assert [p.pair_id for p in read_pairs(tmp_path / "splits")] == [pair_id for pair_id, _, _ in expected]
    with pytest.raises(InputError) as err:
        list(read_pairs(tmp_path / "splits", split="test"))
    assert str(err.value) == f"{tmp_path / 'splits'}: row 2: field 'rejected' is empty {HINT}"


def test_hub_id_with_split_suffix_is_loaded_with_that_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(dataset_id, split):
        calls.append((dataset_id, split))
        return datasets.Dataset.from_list(_jsonl_records(DATA / "pairs.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(list(read_pairs("someone/prefs:test"))) == 3
    assert len(list(read_pairs("someone/prefs"))) == 3
    assert calls == [("someone/prefs", "test"), ("someone/prefs", "train")]


def test_missing_local_file_fails_at_call_time_not_as_a_hub_id():
    with pytest.raises(InputError) as err:
        read_pairs("data/missing.jsonl")
    assert str(err.value) == (
        "data/missing.jsonl: does not exist (check the path; hub dataset ids look like owner/name[:split])"
    )


def test_rows_are_streamed_one_at_a_time(tmp_path):
    path = tmp_path / "second_line_bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    items = read_pairs(path)
    assert next(items).chosen == "a"
    with pytest.raises(InputError):
        next(items)


def test_csv_lines_count_physical_lines_of_multiline_records(tmp_path):
    path = tmp_path / "multiline.csv"
    path.write_text('prompt,chosen,rejected\nQ,"one\ntwo\nthree",no\nQ2,,x\n')
    with pytest.raises(InputError) as err:
        list(read_pairs(path))
    assert str(err.value) == f"{path}:5: field 'chosen' is empty {HINT}"


def test_quarantined_raw_text_is_truncated(tmp_path):
    path = tmp_path / "long_identical.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "x" * 10_000, "rejected": "x" * 10_000}) + "\n")
    (row,) = read_pairs(path, on_error="quarantine")
    assert row.reason == "is identical to 'chosen'"
    assert len(row.raw) == RAW_LIMIT and row.raw.startswith('{"prompt": "p"')


def test_unknown_format_or_on_error_is_a_user_error():
    with pytest.raises(ChesCurateError, match="unknown format 'dpo'"):
        read_pairs(DATA / "pairs.jsonl", format="dpo")
    with pytest.raises(ChesCurateError, match="unknown on_error 'skip'"):
        read_pairs(DATA / "pairs.jsonl", on_error="skip")
