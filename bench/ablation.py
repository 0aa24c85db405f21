"""Ablation on real data: does removing high-CHES pairs reduce likelihood displacement?

Trains SmolLM2-135M-Instruct (the default model) with DPO from the same start on
shared hh-rlhf harmless pairs, arm by arm: the full set, the pairs kept after removing
the highest-CHES half, the pairs kept after removing the highest-ln-CHES half, and a
random half (same size, seed 0). Then prints, per arm, the preferred/dispreferred
log-prob change, the fraction of pairs whose preferred log-prob fell, the CHES
correlation, and the refusal rate on held-out harmful prompts before and after.

Only pairs that fit `--max-length` tokens whole are used, so TRL trains on exactly
the tokens that are scored and tracked (no truncation). Held-out prompts are the first
human turns of later pairs of the file, disjoint from the training pairs.

    .venv/bin/python bench/ablation.py --pairs 128 --db /tmp/ablation.duckdb
"""

from __future__ import annotations

import os

# Under load, OpenMP threads that spin while waiting make 2-thread torch ~10x slower on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from ches_curate.ablation import run_ablation  # noqa: E402
from ches_curate.evaluate import EvalConfig, harmful_prompts  # noqa: E402
from ches_curate.scoring.incremental import score_dataset  # noqa: E402
from ches_curate.ingest import read_pairs  # noqa: E402
from ches_curate.models import load_model  # noqa: E402
from ches_curate.pairs import PreferencePair  # noqa: E402
from ches_curate.scoring import ScoringConfig  # noqa: E402
from ches_curate.store import Store  # noqa: E402
from ches_curate.tokenization import encode_pair  # noqa: E402
from ches_curate.train import TrainConfig  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl"
POLICIES = [("percentile", {"p": 50}), ("percentile", {"p": 50, "score_column": "ln_ches"})]
SHOWN = ("arm", "n_train_pairs", "preferred_logp_change", "dispreferred_logp_change", "preferred_decrease_fraction",
         "ches_logp_corr", "ches_logp_spearman", "refusal_rate_before", "refusal_rate_after", "train_loss",
         "reward_accuracy", "wall_time_s")


def fitting_pairs(tokenizer, source: Path, max_length: int) -> list[PreferencePair]:
    """Pairs of `source` whose prompt and longer response fit `max_length` tokens, in file order."""
    pairs = [p for p in read_pairs(source, format="hh_rlhf", on_error="quarantine") if isinstance(p, PreferencePair)]
    return [p for p in pairs if not encode_pair(tokenizer, p, max_length).truncated]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128, help="Training pairs of the full arm.")
    parser.add_argument("--eval-prompts", type=int, default=32, help="Held-out harmful prompts for refusal rates.")
    parser.add_argument("--max-length", type=int, default=160, help="Use only pairs that fit this many tokens.")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--db", type=Path, default=Path("bench_ablation.duckdb"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    started = time.perf_counter()
    loaded = load_model("default")
    candidates = fitting_pairs(loaded.tokenizer, SHARED, args.max_length)
    train_pairs = candidates[: args.pairs]
    prompts = harmful_prompts(candidates[args.pairs :], args.eval_prompts)
    print(f"{len(candidates)} of the shared pairs fit {args.max_length} tokens; training on {len(train_pairs)}, "
          f"{len(prompts)} held-out prompts; torch threads {torch.get_num_threads()}")

    store = Store(args.db)
    dv = store.register_dataset(f"hh_bench_{args.pairs}", str(SHARED), train_pairs)
    print(score_dataset(store, dv.name, loaded, ScoringConfig(max_length=args.max_length), progress=False).describe())
    config = TrainConfig(beta=args.beta, learning_rate=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                         max_length=args.max_length, save_model=False, output_dir="/tmp/ches_curate_bench_runs")
    rows = run_ablation(store, dv.name, loaded, POLICIES, config, prompts, seeds=(0,),
                        eval_config=EvalConfig(max_new_tokens=args.max_new_tokens))

    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, total {time.perf_counter() - started:.0f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    print("| " + " | ".join(SHOWN) + " |")
    print("|" + "---|" * len(SHOWN))
    for row in rows.itertuples():
        cells = [getattr(row, c) for c in SHOWN]
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if args.json:
        args.json.write_text(rows.drop(columns="config").to_json(orient="records", indent=1))


if __name__ == "__main__":
    main()
