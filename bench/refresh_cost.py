"""Refresh cost: scoring a dataset that gained 1% new pairs vs scoring it from scratch.

1. ingest N real hh-rlhf pairs as v1 and score them all (full);
2. ingest v2 = the same N pairs plus ceil(N/100) new ones and score it (refresh: only
   the new pairs have no score for the model key);
3. score v2 again (no-op: the fixed cost of a refresh with nothing to do).

The model is loaded once, before any timing. Ingest is timed apart from scoring.
Target: refresh <= 3% of full. Pairs beyond the 1,493 valid shared ones are variants
(a suffix on `chosen`) so that every pair is distinct.

    .venv/bin/python bench/refresh_cost.py --pairs 300            # default model (SmolLM2-135M)
    .venv/bin/python bench/refresh_cost.py --pairs 1000 --tiny    # tiny random Llama: store overhead dominates
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import torch

from ches_curate.scoring.incremental import score_dataset
from ches_curate.ingest import read_pairs
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import Scorer, ScoringConfig
from ches_curate.store import Store

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl"


def bench_pairs(n: int) -> list[PreferencePair]:
    """n distinct real pairs, cycling through the shared file with a variant suffix once it runs out."""
    real = [p for p in read_pairs(SHARED, on_error="quarantine") if isinstance(p, PreferencePair)]
    pairs = []
    for i, pair in enumerate(islice(cycle(real), n)):
        lap = i // len(real)
        chosen = pair.chosen if lap == 0 else f"{pair.chosen} (variant {lap})"
        pairs.append(PreferencePair(pair.prompt, chosen, pair.rejected, row=i, format=pair.format))
    return pairs


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="Pairs scored in full (default 300).")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="Fraction of new pairs (default 0.01).")
    parser.add_argument("--model", default="default", help="Model spec (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--tiny", action="store_true", help="Use a tiny random Llama instead (built in a temp dir).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, help="Truncate pairs to this many tokens (--tiny: 512, its context).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_new = math.ceil(args.pairs * args.new_fraction)
    pairs = bench_pairs(args.pairs + n_new)
    with tempfile.TemporaryDirectory(prefix="ches_refresh_") as tmp:
        model = args.model
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from ches_curate.testing.tiny_models import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny", arch="llama"))
            args.max_length = args.max_length or 512
        config = ScoringConfig(batch_size=args.batch_size, max_length=args.max_length)
        scorer, load_s = timed(Scorer, model, config)
        store = Store(Path(tmp) / "bench.duckdb")

        _, ingest_full = timed(store.register_dataset, "hh", "bench", pairs[: args.pairs])
        full, full_s = timed(score_dataset, store, "hh", scorer, progress=False)
        _, ingest_refresh = timed(store.register_dataset, "hh", "bench", pairs)
        refresh, refresh_s = timed(score_dataset, store, "hh", scorer, progress=False)
        noop, noop_s = timed(score_dataset, store, "hh", scorer, progress=False)

    assert (full.n_scored, refresh.n_scored, refresh.n_skipped, noop.n_scored) == (args.pairs, n_new, args.pairs, 0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"torch threads {args.threads}; model {scorer.key} (loaded in {load_s:.1f} s), batch {args.batch_size}, "
          f"max length {args.max_length}\n")
    print(f"{'step':<26} {'pairs scored':>12} {'ingest s':>9} {'score s':>9} {'score % of full':>16}")
    for name, summary, ingest_s, score_s in (
        ("full (v1)", full, ingest_full, full_s),
        (f"refresh (v2, +{n_new} new)", refresh, ingest_refresh, refresh_s),
        ("no-op refresh (v2 again)", noop, 0.0, noop_s),
    ):
        print(f"{name:<26} {summary.n_scored:>12,} {ingest_s:>9.2f} {score_s:>9.2f} {100 * score_s / full_s:>15.2f}%")
    ratio = refresh_s / full_s
    print(f"\nrefresh / full = {100 * ratio:.2f}% (target <= 3%: {'ok' if ratio <= 0.03 else 'missed'}); "
          f"ideal {100 * n_new / args.pairs:.2f}%; with ingest {100 * (refresh_s + ingest_refresh) / full_s:.2f}%")


if __name__ == "__main__":
    main()
