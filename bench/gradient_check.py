"""Does CHES rank real pairs like the gradient quantity it approximates? (no training run)

Samples `--pairs` shared hh-rlhf harmless pairs (seeded), scores them with the engine
(CHES, ln-CHES, last-hidden inner product, edit distance) and computes
gradient_ches = <g+, g-> - ||g+||^2 over all parameters of the model in float32, then
prints each score's Spearman correlation with it and its top-decile precision.

    .venv/bin/python bench/gradient_check.py --pairs 200 --model default
"""

from __future__ import annotations

import os

# Under load, OpenMP threads that spin while waiting make 2-thread torch ~10x slower on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ches_curate.gradient_check import check_ches, rank_agreement, sample_pairs, verdict  # noqa: E402
from ches_curate.ingest import read_pairs  # noqa: E402
from ches_curate.models import load_model  # noqa: E402
from ches_curate.pairs import PreferencePair  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SHARED)
    parser.add_argument("--pairs", type=int, default=200, help="Pairs sampled (seeded) from the source.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-length", type=int, default=512, help="TRL's keep_start cap on prompt + response.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="Stop after the chunk that passes this many seconds; reports the pairs done.")
    parser.add_argument("--chunk", type=int, default=10, help="Pairs per chunk (the budget is checked between).")
    parser.add_argument("--csv", type=Path, help="Also write the per-pair frame here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    pairs = [p for p in read_pairs(args.source, format="hh_rlhf", on_error="quarantine")
             if isinstance(p, PreferencePair)]
    sample = sample_pairs(pairs, args.pairs, args.seed)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    clock = time.perf_counter()
    frames = []
    for start in range(0, len(sample), args.chunk):
        frames.append(check_ches(loaded, sample[start:start + args.chunk], max_length=args.max_length)[0])
        if args.budget_s is not None and time.perf_counter() - clock > args.budget_s:
            break
    seconds = time.perf_counter() - clock
    frame = pd.concat(frames, ignore_index=True)
    agreement = rank_agreement(frame)
    if args.csv:
        frame.to_csv(args.csv, index=False)

    print(f"date {started:%Y-%m-%d %H:%M} UTC | machine {platform.machine()} {os.cpu_count()} cpus, "
          f"{args.threads} torch threads | load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"model {loaded.key} | {len(frame)} of {len(sample)} sampled pairs done (seed {args.seed}, of {len(pairs)}) | "
          f"max_length {args.max_length} | truncated {int(frame['truncated'].sum())} | {seconds:.0f} s")
    print(f"{'score':<16}{'spearman':>10}{'top-decile precision':>22}")
    for row in agreement.itertuples():
        print(f"{row.score:<16}{row.spearman:>10.3f}{row.top_decile_precision:>22.2f}")
    print(verdict(agreement))


if __name__ == "__main__":
    main()
