"""Peak memory of ingest + store (no scoring) at 10k, 100k and 1M synthetic pairs.

Each measurement runs in a fresh Python process, so its peak RSS (`ru_maxrss`) belongs
to that size alone. Two stages per size and input format, side by side:

- `read`: stream `ingest.read_pairs` to the end (parse + validate + pair_id);
- `read+store`: `Store.register_dataset(name, path, read_pairs(path))` into a new DuckDB file.

`baseline` is the RSS after the imports, before any row is read; `growth` = peak - baseline
is what the data costs. Streaming means `growth` stays roughly flat from 10k to 1M pairs.
Results go to a Markdown table (default bench/RESULTS_ingest_memory.md).

    .venv/bin/python bench/ingest_memory.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("read", "read+store")
FORMATS = ("jsonl", "parquet")
WORDS = "the quick brown fox jumps over a lazy dog while I explain how to bake bread safely".split()


def synthetic_pair(i: int) -> dict[str, str]:
    """A distinct pair of hh-rlhf-like length (~600 bytes), deterministic in `i`."""
    text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(24))
    return {
        "prompt": f"Question {i}: {text} {text}?",
        "chosen": f"Answer {i}: {text}. {text}.",
        "rejected": f"Refusal {i}: I'm sorry, I cannot help with {text}.",
    }


def write_inputs(n: int, directory: Path) -> dict[str, Path]:
    """The same `n` pairs as JSONL and as Parquet (written in 10k-row groups, never all in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": directory / f"pairs_{n}.jsonl", "parquet": directory / f"pairs_{n}.parquet"}
    if all(p.exists() for p in paths.values()):
        return paths
    chunk = 10_000
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    with open(paths["jsonl"], "w", encoding="utf-8") as jsonl, pq.ParquetWriter(paths["parquet"], schema) as parquet:
        for start in range(0, n, chunk):
            rows = [synthetic_pair(i) for i in range(start, min(n, start + chunk))]
            jsonl.writelines(json.dumps(row) + "\n" for row in rows)
            parquet.write_table(pa.Table.from_pylist(rows, schema=schema))
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(stage: str, source: Path, db: Path) -> dict:
    """Run one stage in this process and return its numbers (called in a fresh child)."""
    from ches_curate.ingest import read_pairs
    from ches_curate.store import Store

    store = Store(db) if stage == "read+store" else None
    baseline = peak_rss_mb()
    started = time.perf_counter()
    if store is None:
        n_pairs = sum(1 for _ in read_pairs(source))
    else:
        n_pairs = store.register_dataset("bench", str(source), read_pairs(source)).n_pairs
    return {"n_pairs": n_pairs, "seconds": time.perf_counter() - started, "baseline_mb": baseline,
            "peak_mb": peak_rss_mb(), "db_mb": db.stat().st_size / 2**20 if db.exists() else 0.0}


def run_child(stage: str, source: Path, db: Path) -> dict:
    db.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, __file__, "--child", stage, str(source), str(db)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "# Ingest + store memory (no scoring)",
        "",
        f"{datetime.date.today()} on {platform.machine()} ({platform.processor() or 'cpu'}), Python "
        f"{platform.python_version()}; each cell a fresh process. `{command}`",
        "",
        "| input | stage | pairs | baseline MB | peak RSS MB | growth MB | seconds | pairs/s | DuckDB MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['stage']} | {r['n_pairs']:,} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] - r['baseline_mb']:.0f} | {r['seconds']:.1f} | {r['n_pairs'] / r['seconds']:,.0f} | "
            f"{r['db_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="Comma-separated pair counts.")
    parser.add_argument("--formats", default=",".join(FORMATS), help="Input formats: jsonl, parquet.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where inputs and DuckDB files go (default: temp).")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS_ingest_memory.md"))
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "SOURCE", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, source, db = args.child
        print(json.dumps(measure(stage, Path(source), Path(db))))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ches_ingest_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in map(int, args.sizes.split(",")):
        paths = write_inputs(n, workdir)
        for fmt in args.formats.split(","):
            for stage in STAGES:
                result = run_child(stage, paths[fmt], workdir / f"bench_{n}_{fmt}.duckdb")
                results.append({"format": fmt, "stage": stage, **result})
                print(f"{fmt:8} {stage:11} {n:>9,} pairs: peak {result['peak_mb']:7.0f} MB "
                      f"(baseline {result['baseline_mb']:.0f}) {result['seconds']:7.1f} s", flush=True)
    command = "python bench/ingest_memory.py " + " ".join(sys.argv[1:])
    # Hand-written sections after the table (a diagnosis, say) survive a rerun.
    notes = args.results.read_text().partition("\n## ")[2] if args.results.exists() else ""
    args.results.write_text(markdown(results, command.strip()) + (f"\n## {notes}" if notes else ""))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
