"""Ingest: read preference pairs from JSONL, CSV, Parquet or Hugging Face datasets, one row at a time.

`read_pairs` turns every input row into either a `PreferencePair` or, with
`on_error="quarantine"`, a `RejectedRow` that says which field is wrong and why, so
no row is dropped silently. Row problems name the file, the 1-based line (JSONL,
CSV) or row (Parquet, datasets), the field and the fix; file-level problems (a
missing, unreadable, special or empty file, wrong or repeated columns, wrong column
types) always raise `InputError`.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ches_curate.errors import ChesCurateError, InputError
from ches_curate.pairs import Message, PreferencePair, Prompt, normalize_text

FORMATS = ("prompt_chosen_rejected", "conversational", "hh_rlhf")
ON_ERROR = ("fail", "quarantine")
QUARANTINE_HINT = "use --on-error quarantine to keep going"
_UTF8_HINT = "re-encode the file as UTF-8 or " + QUARANTINE_HINT
RAW_LIMIT = 2048
"""Characters of a rejected row's raw text kept for the quarantine table."""

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_FILE_SUFFIXES = (*_JSONL_SUFFIXES, ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_REQUIRED = {"prompt_chosen_rejected": ("prompt", "chosen", "rejected"), "conversational": ("chosen", "rejected"),
             "hh_rlhf": ("chosen", "rejected"), "auto": ("chosen", "rejected")}
_DETECT_LIMIT = 100
"""Rows read without finding one whose columns fit a format before the file is declared unusable."""
_BATCH_ROWS = 1024
MAX_NESTING = 100
"""Levels of JSON arrays and objects a row may have (the row object is level 1).

Deeper rows are refused when read, so that no later step (metadata JSON, the store,
export) can run out of Python's recursion limit on them. Parquet and Arrow files
never get here: their readers refuse deeper schemas first."""


@dataclass(frozen=True)
class RejectedRow:
    """An input row that could not become a pair: where it is, which field is wrong, why, and its raw text."""

    source: str
    line: int | None
    field: str | None
    reason: str
    raw: str


class _RowProblem(Exception):
    """A problem with one row, raised before its location is attached."""

    def __init__(self, field: str | None, reason: str, hint: str = QUARANTINE_HINT):
        super().__init__(reason)
        self.field, self.reason, self.hint = field, reason, hint


@dataclass(frozen=True)
class _Row:
    number: int
    raw: str
    record: dict[str, Any] | None
    problem: _RowProblem | None = None


def read_pairs(source: str | os.PathLike, *, format: str = "auto", on_error: str = "fail",
               split: str | None = None) -> Iterator[PreferencePair | RejectedRow]:
    """Stream the preference pairs in `source`, in input order.

    `source` is a `.jsonl`/`.ndjson`/`.json` (JSON Lines), `.csv` or `.parquet` file,
    a directory written by `datasets.Dataset.save_to_disk`, or a hub dataset id
    `owner/name[:split]` (`split` defaults to `train`). `format` is one of `FORMATS`
    or `auto` (detected from the first row that fits one). Each pair's `row` is its
    0-based position among all input rows, rejected rows included. With
    `on_error="fail"` the first bad row raises `InputError`; with `"quarantine"` it is
    yielded as a `RejectedRow` and reading goes on.
    """
    _check_options(format, on_error)
    name, unit, rows = _open_source(source, format, split)
    return _items(name, unit, rows, format, on_error)


def read_table(table: Any, *, name: str = "<table>", format: str = "auto",
               on_error: str = "fail") -> Iterator[PreferencePair | RejectedRow]:
    """Stream the pairs of an in-memory table, a pandas `DataFrame` or a `datasets.Dataset` (a pipeline's
    upstream artifact), exactly as `read_pairs` reads a file of the same rows; errors name the table `name`."""
    import datasets

    _check_options(format, on_error)
    if not isinstance(table, datasets.Dataset):
        table = datasets.Dataset.from_pandas(table, preserve_index=False)
    return _items(name, "row", _dataset_rows(name, format, table), format, on_error)


def _check_options(format: str, on_error: str) -> None:
    if format not in (*FORMATS, "auto"):
        raise ChesCurateError(f"unknown format {format!r}; choose one of: auto, {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ChesCurateError(f"unknown on_error {on_error!r}; choose one of: {', '.join(ON_ERROR)}")


def _open_source(source: str | os.PathLike, requested: str, split: str | None) -> tuple[str, str, Iterator[_Row]]:
    name = os.fspath(source)
    path = Path(name)
    kind = _path_kind(name)
    if kind == "directory":
        return name, "row", _dataset_rows(name, requested, _load_local_dataset(name, split))
    if kind == "file":
        suffix = path.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            return name, "line", _jsonl_rows(path)
        if suffix == ".csv":
            return name, "line", _csv_rows(path, name, requested)
        if suffix == ".parquet":
            return name, "row", _parquet_rows(path, name, requested)
        raise InputError(name, None, None, f"has an unsupported type '{suffix}'",
                         "expected .jsonl, .csv, .parquet or a datasets directory")
    if isinstance(source, str) and _HUB_ID.match(source) and not source.lower().endswith(_FILE_SUFFIXES):
        dataset_id, _, id_split = source.partition(":")
        return name, "row", _dataset_rows(name, requested, _load_hub_dataset(dataset_id, id_split or split or "train"))
    raise InputError(name, None, None, "does not exist", "check the path; hub dataset ids look like owner/name[:split]")


_SPECIAL_FILES = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}


def _path_kind(name: str) -> str | None:
    """`file` or `directory` when `name` is one we can read, None when nothing is there; otherwise `InputError`.

    Only `stat` and `lstat` look at a special file, so a named pipe is never opened (which
    would block until something writes to it).
    """
    try:
        mode = os.stat(name).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(name, None, None, "is a symbolic link loop",
                             "point at the file itself, or fix the links") from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise InputError(name, None, None, "cannot be read: permission denied (on a folder in its path)",
                             "fix the permissions or run as a user who can read it") from None
        if err.errno == errno.ENOTDIR:
            raise InputError(name, None, None, "does not exist: a part of its path is a file, not a folder",
                             "check the path") from None
        if err.errno != errno.ENOENT:
            raise InputError(name, None, None, f"cannot be read ({err.strerror})") from None
        if os.path.islink(name):
            raise InputError(name, None, None, f"is a symbolic link to {os.readlink(name)}, which does not exist",
                             "fix the link or point at the file itself") from None
        return None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(name, None, None, f"is {_SPECIAL_FILES.get(stat.S_IFMT(mode), 'a special file')}, "
                         "not a regular file", "save the pairs to a .jsonl, .csv or .parquet file and pass that")
    try:
        if stat.S_ISDIR(mode):
            os.scandir(name).close()
        else:
            open(name, "rb").close()
    except PermissionError:
        raise InputError(name, None, None, "cannot be read: permission denied",
                         "fix its permissions (chmod u+r) or run as a user who can read it") from None
    except OSError as err:
        raise InputError(name, None, None, f"cannot be read ({err.strerror})") from None
    return "directory" if stat.S_ISDIR(mode) else "file"


def _items(name: str, unit: str, rows: Iterable[_Row], requested: str,
           on_error: str) -> Iterator[PreferencePair | RejectedRow]:
    """Resolve the format from the first row that fits one, then convert every row in input order.

    Rows read before the format is known wait in `pending` (at most `_DETECT_LIMIT`), so
    a bad first row is reported as a bad row rather than as a wrong file.
    """
    fmt: str | None = None
    pending: list[tuple[int, _Row]] = []
    waiting = False
    n_rows = 0
    for index, row in enumerate(rows):
        n_rows += 1
        if fmt is None and row.record is not None:
            fmt = _resolve(row.record, requested)
        pending.append((index, row))
        waiting = fmt is None and (waiting or row.record is not None)
        if waiting and len(pending) < _DETECT_LIMIT:
            continue
        if waiting:
            fmt = _fallback_format(name, pending, requested)
        yield from (_item(name, unit, i, pending_row, fmt, on_error) for i, pending_row in pending)
        pending, waiting = [], False
    if pending:
        fmt = _fallback_format(name, pending, requested)
        yield from (_item(name, unit, i, pending_row, fmt, on_error) for i, pending_row in pending)
    if n_rows == 0:
        raise InputError(name, None, None, "has no rows", "expected at least one preference pair")


def _item(name: str, unit: str, index: int, row: _Row, fmt: str | None,
          on_error: str) -> PreferencePair | RejectedRow:
    try:
        if row.problem is not None:
            raise row.problem
        return _convert(row.record, fmt, index)
    except _RowProblem as problem:
        if on_error == "fail":
            raise InputError(name, row.number, problem.field, problem.reason, problem.hint, unit=unit) from None
        return RejectedRow(name, row.number, problem.field, problem.reason, row.raw[:RAW_LIMIT])


def _detect(record: dict[str, Any]) -> str | None:
    """The format a row is written in, or None when its keys and types fit none."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if record.get("prompt") is not None:
            return "prompt_chosen_rejected"
        if all(HUMAN in text and ASSISTANT in text for text in (chosen, rejected)):
            return "hh_rlhf"
    return None


def _resolve(record: dict[str, Any], requested: str) -> str | None:
    if requested == "auto":
        return _detect(record)
    return requested if all(key in record for key in _REQUIRED[requested]) else None


def _convert(record: dict[str, Any], fmt: str, index: int) -> PreferencePair:
    prompt, chosen, rejected, used = _CONVERTERS[fmt](record)
    if chosen == rejected:
        raise _RowProblem("rejected", "is identical to 'chosen'",
                          "a pair needs two different responses; " + QUARANTINE_HINT)
    metadata = {key: value for key, value in record.items() if key not in used}
    for key, value in metadata.items():
        if not _is_utf8(key + json.dumps(value, ensure_ascii=False, default=str)):
            raise _RowProblem(_printable(key), "is not valid UTF-8 text", _UTF8_HINT)
    return PreferencePair(prompt, chosen, rejected, row=index, format=fmt, metadata=metadata)


def _from_prompt_chosen_rejected(record: dict[str, Any]) -> tuple[Prompt, str, str, tuple[str, ...]]:
    prompt, chosen, rejected = (_field_text(record, key) for key in ("prompt", "chosen", "rejected"))
    return prompt, chosen, rejected, ("prompt", "chosen", "rejected")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):(?: |\Z)")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(text: str) -> tuple[list[Message], str] | None:
    """(prompt messages, response) of an hh-rlhf transcript; None unless it is turns ending with the assistant's.

    Turns are split as TRL's hh-rlhf preparation splits them: at `\\n\\nHuman: ` (a `user`
    message) and `\\n\\nAssistant: ` (an `assistant` message), each message's content being the
    text up to the next turn marker. The final turn must be the assistant's: its content is
    the response, the turns before it are the prompt. A transcript ending in
    `\\n\\nAssistant:` has an empty response. Text before the first turn makes it unsplittable.
    """
    parts = _HH_TURN.split(text)
    if parts[0] or len(parts) < 3 or parts[-2] != "Assistant":
        return None
    turns = [{"role": _HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]
    return turns[:-1], turns[-1]["content"]


def _from_hh_rlhf(record: dict[str, Any]) -> tuple[Prompt, str, str, tuple[str, ...]]:
    """Parse both transcripts with `split_hh_transcript`; their prompts must be identical (never guessed)."""
    prompts, responses = [], []
    for key in ("chosen", "rejected"):
        text = _field_text(record, key)
        split = split_hh_transcript(text)
        if split is None:
            raise _RowProblem(key, _hh_fault(text), "not an hh-rlhf transcript: add a 'prompt' column or pass --format")
        prompts.append(split[0])
        responses.append(_check_text(key, split[1], "after the last '\\n\\nAssistant:'"))
    if prompts[0] != prompts[1]:
        cut = [text[: text.rfind(ASSISTANT) + len(ASSISTANT)] for text in (record["chosen"], record["rejected"])]
        differ_at = next((i for i, (a, b) in enumerate(zip(*cut)) if a != b), min(map(len, cut)))
        raise _RowProblem("rejected", "does not match 'chosen': chosen and rejected transcripts differ before "
                          f"the last assistant turn (first difference at character {differ_at})",
                          "fix the transcripts or " + QUARANTINE_HINT)
    if not prompts[0]:
        raise _RowProblem("chosen", "has no turn before its last '\\n\\nAssistant:' turn; the prompt would be empty")
    return prompts[0], responses[0], responses[1], ("chosen", "rejected")


def _hh_fault(text: str) -> str:
    """Why `split_hh_transcript` cannot split `text`."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        return "has no '\\n\\nAssistant:' turn"
    if parts[0]:
        return "has text before its first turn (turns start with '\\n\\nHuman: ' or '\\n\\nAssistant: ')"
    return f"ends with a '{parts[-2]}' turn, not the assistant's response"


def _from_conversational(record: dict[str, Any]) -> tuple[Prompt, str, str, tuple[str, ...]]:
    """The response is each list's final assistant message; the prompt is `prompt` or the shared prefix."""
    chosen, rejected = _field_messages(record, "chosen"), _field_messages(record, "rejected")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise _RowProblem(f"{key}[{len(messages) - 1}].role", "must be 'assistant' (the response is the final "
                              f"message), got {messages[-1]['role']!r}")
    prefix = chosen[:-1]
    if rejected[:-1] != prefix:
        raise _RowProblem("rejected", "differs from 'chosen' before the final assistant message")
    prompt: Prompt
    if record.get("prompt") is None:
        if not prefix:
            raise _RowProblem("prompt", "is missing and 'chosen' has no messages before its final assistant message")
        prompt = prefix
    else:
        raw_prompt = record["prompt"]
        prompt = _field_text(record, "prompt") if isinstance(raw_prompt, str) else _field_messages(record, "prompt")
        as_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if prefix and prefix != as_messages:
            raise _RowProblem("chosen", "repeats a conversation that differs from 'prompt'")
    responses = (_check_text(f"{key}[{len(msgs) - 1}].content", msgs[-1]["content"])
                 for key, msgs in (("chosen", chosen), ("rejected", rejected)))
    return prompt, *responses, ("prompt", "chosen", "rejected")


_CONVERTERS = {"prompt_chosen_rejected": _from_prompt_chosen_rejected, "conversational": _from_conversational,
               "hh_rlhf": _from_hh_rlhf}


def _field_text(record: dict[str, Any], key: str) -> str:
    if key not in record:
        raise _RowProblem(key, "is missing")
    return _check_text(key, record[key])


def _check_text(field: str, value: Any, where: str = "", allow_blank: bool = False) -> str:
    """`value`, `normalize_text`-ed, if it is non-blank (unless allowed), valid UTF-8 text; otherwise a problem
    naming `field`. Every text of a row passes here, so every comparison of a row's texts is made as `pair_id` makes it.
    """
    if value is None:
        raise _RowProblem(field, "is null")
    if not isinstance(value, str):
        raise _RowProblem(field, f"must be a string, got {type(value).__name__}")
    if not _is_utf8(value):
        raise _RowProblem(field, "is not valid UTF-8 text", _UTF8_HINT)
    if not allow_blank and not value.strip():
        raise _RowProblem(field, f"is empty {where}".rstrip())
    return normalize_text(value)


def _field_messages(record: dict[str, Any], key: str) -> list[Message]:
    if key not in record:
        raise _RowProblem(key, "is missing")
    value = record[key]
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise _RowProblem(key, f"must be a non-empty list of {{role, content}} messages, got {got}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RowProblem(f"{key}[{i}]", f"must be a {{role, content}} message, got {type(message).__name__}")
        for part in ("role", "content"):
            if part not in message:
                raise _RowProblem(f"{key}[{i}].{part}", "is missing")
        if extra := next((part for part in message if part not in ("role", "content")), None):
            raise _RowProblem(f"{key}[{i}].{_printable(str(extra))}", "is not kept: a message is scored and stored as "
                              "role and content only, so remove the key (it would be dropped unseen)")
        # A prompt message may be blank (an empty system message); the caller checks the responses.
        messages.append({part: _check_text(f"{key}[{i}].{part}", message[part], allow_blank=True)
                         for part in ("role", "content")})
    return messages


def _is_utf8(text: str) -> bool:
    """False for text holding undecodable bytes (kept as lone surrogates by the readers)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_columns(name: str, columns: Iterable[str], requested: str) -> None:
    columns = list(columns)
    if all(key in columns for key in _REQUIRED[requested]):
        return
    expected = (f"{', '.join(_REQUIRED[requested])} (--format {requested})" if requested != "auto" else
                "prompt, chosen, rejected, or chosen, rejected (hh-rlhf transcripts or message lists)")
    raise InputError(name, None, None, f"has columns {', '.join(columns) or '(none)'}; expected columns {expected}",
                     "rename the columns; aliases are not guessed")


def _fallback_format(name: str, pending: list[tuple[int, _Row]], requested: str) -> str:
    """A format for rows none of which fits one: wrong columns fail the file, otherwise each row is reported."""
    records = [row.record for _, row in pending if row.record is not None]
    _check_columns(name, dict.fromkeys(key for record in records for key in record), requested)
    if requested != "auto":
        return requested
    record = next((r for r in records if "chosen" in r and "rejected" in r), records[0])
    if isinstance(record.get("chosen"), list):
        return "conversational"
    return "prompt_chosen_rejected" if record.get("prompt") is not None else "hh_rlhf"


def _check_arrow_schema(name: str, schema: Any, requested: str, kind: str) -> None:
    """Column names and types of a Parquet file or Arrow-backed dataset, checked before any row is read."""
    import pyarrow as pa

    _check_unique_columns(name, schema.names)
    _check_columns(name, schema.names, requested)
    for key in _REQUIRED["prompt_chosen_rejected"]:
        if key not in schema.names or (key == "prompt" and requested == "hh_rlhf"):
            continue
        text_ok = requested != "conversational" or key == "prompt"
        messages_ok = requested in ("conversational", "auto")
        dtype = schema.field(key).type
        is_text = pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)
        is_messages = (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_struct(
            dtype.value_type)
        if not (pa.types.is_null(dtype) or (text_ok and is_text) or (messages_ok and is_messages)):
            expected = " or ".join(["string"] * text_ok + ["a list of {role, content} messages"] * messages_ok)
            raise InputError(name, None, key, f"has {kind} type {dtype}; expected {expected}",
                             "write this column with the expected type")


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    """One row per non-blank line; bytes are decoded line by line so a bad byte is reported at its line."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            # surrogateescape keeps undecodable bytes so the field holding them can be named later.
            text = line.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
            if not text.strip():
                continue
            raw = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
            try:
                record = json.loads(text, object_pairs_hook=_unique_keys)
            except _RepeatedKey as repeated:
                yield _Row(number, raw, None, _RowProblem(_printable(repeated.key), "is a repeated key in one JSON "
                                                          "object; remove one of them (which one to keep is not guessed)"))
                continue
            except json.JSONDecodeError as exc:
                yield _Row(number, raw, None, _RowProblem(None, f"is malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            except RecursionError:  # json's parser recurses once per level of [ and {
                yield _Row(number, raw, None, _RowProblem(None, _TOO_DEEP))
                continue
            if not isinstance(record, dict):
                yield _Row(number, raw, None, _RowProblem(None, f"must be a JSON object, got {type(record).__name__}"))
            elif too_deep := next((key for key, value in record.items() if _nesting(value) >= MAX_NESTING), None):
                yield _Row(number, raw, None, _RowProblem(_printable(too_deep), _TOO_DEEP))
            else:
                yield _Row(number, raw, record)


class _RepeatedKey(ValueError):
    """A JSON object names a key twice; `json` would keep the last value without a word."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` that refuses a repeated key, as a repeated CSV column is refused."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


_TOO_DEEP = f"is JSON nested too deeply (more than {MAX_NESTING} levels of [ and {{)"


def _nesting(value: Any) -> int:
    """Levels of lists and dicts in `value` (0 for a scalar), counted without recursion, up to `MAX_NESTING`."""
    depth, level = 0, [value]
    while depth < MAX_NESTING:
        containers = [item for item in level if isinstance(item, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def _csv_rows(path: Path, name: str, requested: str) -> Iterator[_Row]:
    """One row per CSV record, numbered by the line it starts on; quoted fields may span lines."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long responses are data, not a CSV error
    consumed: list[str] = []

    def decoded_lines(handle: Iterable[bytes]) -> Iterator[str]:
        for line in handle:
            consumed.append(line.decode("utf-8", "surrogateescape"))
            yield consumed[-1]

    with path.open("rb") as handle:
        reader = csv.reader(decoded_lines(handle))
        try:
            header = next(reader, None)
            if header is None:
                return
            if not header:
                raise InputError(name, 1, None, "is blank; the first line must be the header",
                                 "put the column names, e.g. prompt,chosen,rejected, on line 1")
            header[0] = header[0].removeprefix("\ufeff")
            _check_unique_columns(name, header, line=1)
            _check_columns(name, header, requested)
            start = reader.line_num + 1
            consumed.clear()
            for values in reader:
                number, start, raw = start, reader.line_num + 1, _printable("".join(consumed).rstrip("\r\n"))
                consumed.clear()
                if not values:
                    continue
                if len(values) == len(header):
                    yield _Row(number, raw, dict(zip(header, values)))
                else:
                    problem = _RowProblem(None, f"has {len(values)} values but the header has {len(header)} columns")
                    yield _Row(number, raw, None, problem)
        except csv.Error as exc:
            raise InputError(name, reader.line_num, None, f"is not valid CSV ({exc})", "fix the quoting") from None


def _check_unique_columns(name: str, columns: Iterable[str], line: int | None = None) -> None:
    """Refuse a file that names a column twice: a row keeps one value per name, so the other would be dropped unseen."""
    first_at: dict[str, int] = {}
    for column, key in enumerate(columns, 1):
        if key in first_at:
            raise InputError(name, line, _printable(key), f"is a repeated column name (columns {first_at[key]} and "
                             f"{column})", "rename or remove one of them; which one to keep is not guessed")
        first_at[key] = column


def _arrow_rows(batches: Iterable[Any]) -> Iterator[_Row]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield _Row(number, json.dumps(record, ensure_ascii=False, default=str), record)


def _parquet_rows(path: Path, name: str, requested: str) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(name, None, None, f"is not a readable Parquet file ({exc})") from None
    _check_arrow_schema(name, parquet.schema_arrow, requested, "Parquet")
    yield from _arrow_rows(parquet.iter_batches(batch_size=_BATCH_ROWS))


def _dataset_rows(name: str, requested: str, dataset: Any) -> Iterator[_Row]:
    _check_arrow_schema(name, dataset.features.arrow_schema, requested, "Arrow")
    yield from _arrow_rows(dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS))


def _load_local_dataset(name: str, split: str | None) -> Any:
    """A dataset saved with `save_to_disk`; for a DatasetDict, the split asked for, the only one, or `train`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(name)
    except FileNotFoundError:
        raise InputError(name, None, None, "is a directory but not one written by datasets' save_to_disk",
                         "point at a .jsonl, .csv or .parquet file or a saved dataset") from None
    except PermissionError as err:
        where = f" on {err.filename}" if err.filename else ""
        raise InputError(name, None, None, f"cannot be read: permission denied{where}",
                         "fix the permissions or run as a user who can read it") from None
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    split = split or (next(iter(loaded)) if len(loaded) == 1 else "train")
    if split not in loaded:
        raise InputError(name, None, None, f"has no split {split!r}; splits: {', '.join(loaded)}",
                         "pick one with --split")
    return loaded[split]


def _load_hub_dataset(dataset_id: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except (OSError, ValueError, ConnectionError) as exc:  # not found, offline, unknown split
        raise InputError(dataset_id, None, None, f"could not be loaded from the hub ({exc})",
                         "check the dataset id and split, and that you are online") from None
