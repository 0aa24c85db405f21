"""The cost of the built-in log-prob scores on top of CHES: the same pairs scored with and without them.

Both runs use one loaded model and the engine's defaults; they alternate, `--repeats` times each, and the
fastest of each is compared (a shared machine slows runs at random, never speeds them up). Within the
runs with log-probs, the time spent computing them (`score_pass.response_logprobs`) is also measured
against the rest of the same run, which a busy machine disturbs far less than a comparison of two runs.
The log-probs add the LM head at the positions that predict response tokens: 2 * hidden * vocab FLOPs per
response token, which the script also predicts from the token counts.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/logprob_cost.py --pairs 48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ches_curate.ingest import read_pairs
from ches_curate.models import load_model
from ches_curate.scoring import Scorer, ScoringConfig
from ches_curate.scoring import engine

SAMPLE = Path(__file__).resolve().parents[1] / "ches_curate" / "data" / "hh_rlhf_harmless_sample.jsonl"
LOGPROBS = ("chosen_logp", "rejected_logp", "chosen_logp_mean", "rejected_logp_mean", "logp_margin")


LOGPROB_SECONDS = [0.0]


def timed(scorer: Scorer, pairs: list) -> tuple[float, list]:
    started = time.perf_counter()
    frames = list(scorer.score_batches(pairs))
    return time.perf_counter() - started, frames


def count_logprob_time(compute):
    def timed_compute(*args):
        started = time.perf_counter()
        result = compute(*args)
        LOGPROB_SECONDS[0] += time.perf_counter() - started
        return result
    return timed_compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    load_start = os.getloadavg()
    loaded = load_model(args.model)
    pairs = [p for p in read_pairs(SAMPLE, on_error="quarantine") if hasattr(p, "pair_id")][: args.pairs]
    runs = {"CHES only (defaults)": Scorer(loaded, ScoringConfig()),
            "CHES + log-prob scores": Scorer(loaded, ScoringConfig(scores=LOGPROBS))}
    engine.response_logprobs = count_logprob_time(engine.response_logprobs)
    best: dict[str, float] = {}
    shares = []
    for _ in range(args.repeats):
        for name, scorer in runs.items():
            LOGPROB_SECONDS[0] = 0.0
            seconds, frames = timed(scorer, pairs)
            best[name] = min(best.get(name, float("inf")), seconds)
            if scorer.wants_logprobs:
                shares.append(LOGPROB_SECONDS[0] / (seconds - LOGPROB_SECONDS[0]))
            table = frames
    fed = sum(f.attrs["tokens"] for f in table)
    response_tokens = int(sum(int(f.chosen_tokens.sum() + f.rejected_tokens.sum()) for f in table))
    config = loaded.model.config
    head = 2 * config.hidden_size * config.vocab_size
    body = 2 * sum(p.numel() for n, p in loaded.model.base_model.named_parameters() if "embed" not in n)
    finite = all(bool(torch.isfinite(torch.tensor(f[list(LOGPROBS)].to_numpy())).all()) for f in table)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; load average {json.dumps([round(x, 2) for x in load_start])} at start, "
          f"{json.dumps([round(x, 2) for x in os.getloadavg()])} at end")
    print(f"model: {loaded.key}; {len(pairs)} hh-rlhf pairs ({SAMPLE.name}); {fed} tokens fed, {response_tokens} "
          f"response tokens; log-probs finite: {finite}; mode {runs['CHES only (defaults)'].mode}")
    base = best["CHES only (defaults)"]
    print(f"{'run':26} {'best s':>8} {'pairs/s':>8} {'vs CHES only':>12}")
    for name, seconds in best.items():
        print(f"{name:26} {seconds:8.2f} {len(pairs) / seconds:8.2f} {seconds / base:11.3f}x")
    print(f"within the runs with log-probs: computing them took +{min(shares):.1%} of the rest of the run (best; "
          f"all: {', '.join(f'{x:.1%}' for x in shares)})")
    print(f"predicted from FLOPs: +{response_tokens * head / (fed * body):.1%} (LM head {head / 1e6:.1f} MFLOP per "
          f"response token, body {body / 1e6:.1f} MFLOP per fed token)")


if __name__ == "__main__":
    main()
