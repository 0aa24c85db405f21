"""Regenerate the ingest fixtures in tests/data/ (run from anywhere: `python tests/data/make_fixtures.py`).

The files are committed; this script documents how the binary ones (Parquet) and the
byte-level faults (non-UTF-8) were written. Each file in `bad/` holds one fault and is
named for it; its other rows are valid so a test can check nothing else is lost.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
BAD = HERE / "bad"

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think.", "id": "q1"},
    {"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof\nthe gutters hum a low song\n"
     "night keeps its secrets", "rejected": "Rain is wet.", "id": "q2"},
    {"prompt": "Translate 'naïve café' to English.", "chosen": "Naive café.", "rejected": "I cannot help with that.",
     "id": "q3"},
]


def _msg(role: str, content) -> dict:
    return {"role": role, "content": content}


CONVERSATIONAL = [
    # No prompt: the prompt is the shared multi-turn prefix, the response the final assistant message.
    {"chosen": [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Name a prime."),
                _msg("assistant", "7")],
     "rejected": [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Name a prime."),
                  _msg("assistant", "9")],
     "source": "chat"},
    # An explicit message prompt and completion-only responses (TRL's explicit-prompt layout).
    {"prompt": [_msg("system", "Be brief."), _msg("user", "2+2?")],
     "chosen": [_msg("assistant", "4")], "rejected": [_msg("assistant", "5")]},
    # A string prompt repeated as the first user message of each response (UltraFeedback layout).
    {"prompt": "Say hi.", "chosen": [_msg("user", "Say hi."), _msg("assistant", "Hi!")],
     "rejected": [_msg("user", "Say hi."), _msg("assistant", "No.")]},
]

HH_RLHF = [
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are overrated."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken "
               "cross the road? To get to the other side.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."},
]

OK = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
OK2 = {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}
CONV_OK = {"chosen": [_msg("user", "Hi"), _msg("assistant", "Hello")],
           "rejected": [_msg("user", "Hi"), _msg("assistant", "Bye")]}

# Each entry: file name -> lines (dicts are JSON-encoded, str/bytes written as is).
BAD_JSONL = {
    "malformed_json.jsonl": [OK, '{"prompt": "Hi?", "chosen": "Hello." "rejected": "Go away."}', OK2],
    "missing_field.jsonl": [OK, {"prompt": "Sky colour?", "chosen": "Blue."}, OK2],
    "empty_prompt.jsonl": [OK, {"prompt": "   ", "chosen": "Blue.", "rejected": "Green."}],
    "empty_response.jsonl": [{"prompt": "Sky colour?", "chosen": "Blue.", "rejected": ""}, OK],
    "chosen_equals_rejected.jsonl": [OK, {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Blue."}],
    "non_utf8.jsonl": [OK, b'{"prompt": "Sky colour?", "chosen": "Bl\xffue.", "rejected": "Green."}', OK2],
    "non_string_content.jsonl": [OK, {"prompt": "Sky colour?", "chosen": 42, "rejected": "Green."}],
    "non_string_message_content.jsonl": [
        CONV_OK,
        {"chosen": [_msg("user", "Hi"), _msg("assistant", ["Hello"])],
         "rejected": [_msg("user", "Hi"), _msg("assistant", "Bye")]}],
    "conversational_prefix_mismatch.jsonl": [
        CONV_OK,
        {"chosen": [_msg("user", "Hi"), _msg("assistant", "Hello")],
         "rejected": [_msg("user", "Hey"), _msg("assistant", "Bye")]}],
    "mismatched_hh_transcripts.jsonl": [
        HH_RLHF[0],
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Knock knock.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Joke?\n\nAssistant: No."}],
    "not_json_object.jsonl": [OK, '["Sky colour?", "Blue.", "Green."]'],
    "wrong_columns.jsonl": [{"question": "Hi?", "good": "Hello.", "bad": "Go away."},
                            {"question": "Sky colour?", "good": "Blue.", "bad": "Green."}],
    "empty.jsonl": [],
    # Not ingest errors: duplicates are the quality stage's job, long responses the scorer's (--max-length).
    "duplicate_pairs.jsonl": [OK, OK2, OK],
    "response_1mb.jsonl": [{"prompt": "Repeat 'a' forever.", "chosen": "No.", "rejected": "a " * (1 << 19)}],
}


def _write_jsonl(path: Path, lines: list) -> None:
    with path.open("wb") as out:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            out.write((line if isinstance(line, bytes) else line.encode()) + b"\n")


def main() -> None:
    BAD.mkdir(exist_ok=True)
    _write_jsonl(HERE / "pairs.jsonl", PAIRS)
    with (HERE / "pairs.csv").open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=["id", "prompt", "chosen", "rejected"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(PAIRS)
    pq.write_table(pa.Table.from_pylist(PAIRS), HERE / "pairs.parquet")
    _write_jsonl(HERE / "conversational.jsonl", CONVERSATIONAL)
    _write_jsonl(HERE / "hh_rlhf.jsonl", HH_RLHF)
    for name, lines in BAD_JSONL.items():
        _write_jsonl(BAD / name, lines)
    (BAD / "wrong_columns.csv").write_text("question,good,bad\nHi?,Hello.,Go away.\n")
    (BAD / "ragged_row.csv").write_text("prompt,chosen,rejected\nHi?,Hello.,Go away.\nSky colour?,Blue.\n")
    pq.write_table(pa.table({"prompt": ["Hi?", "Sky colour?"], "chosen": [1, 2], "rejected": ["Go away.", "Green."]}),
                   BAD / "wrong_types.parquet")
    pq.write_table(pa.table({"prompt": ["Hi?", "Sky colour?"], "chosen": ["Hello.", None],
                             "rejected": ["Go away.", "Green."]}), BAD / "null_field.parquet")


if __name__ == "__main__":
    main()
