"""CHES throughput: the paper's per-example loop vs our engine, side by side in one run.

(a) paper: batch 1, two full forward passes per pair through the causal LM with
    `output_hidden_states=True` (logits computed), summing `hidden_states[-1]`;
(b) ours: `ches_curate.scoring.Scorer` (batched, length-bucketed, prompt KV cache
    shared by both responses, no LM head).

Both use the same pairs, model, tokenization and threads. Prints pairs/s, tokens/s,
speed-up, achieved GFLOP/s against this machine's measured fp32 matmul rate, peak RSS,
and the largest relative difference between the two score columns.

    .venv/bin/python bench/ches_throughput.py --pairs 48 --batch-size 8
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from ches_curate.ingest import read_pairs
from ches_curate.models import load_model
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import Scorer, ScoringConfig
from ches_curate.tokenization import encode_pair

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl"


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


@torch.inference_mode()
def paper_loop(loaded, pairs):
    """Batch 1, two full passes per pair, logits computed: the published algorithm."""
    scores = []
    for pair in pairs:
        encoded = encode_pair(loaded.tokenizer, pair)
        prompt_len = len(encoded.prompt_ids)
        sums = []
        for response in (encoded.chosen_ids, encoded.rejected_ids):
            out = loaded.model(torch.tensor([encoded.prompt_ids + response]), output_hidden_states=True)
            sums.append(out.hidden_states[-1][0, prompt_len - 1 : prompt_len - 1 + len(response)].double().sum(0))
        s_plus, s_minus = sums
        scores.append(float(s_plus @ s_minus - s_plus @ s_plus))
    return scores


def token_counts(loaded, pairs):
    """Tokens each method feeds: paper = 2P + |y+| + |y-|; ours = P + |y+| - 1 + |y-| - 1."""
    paper = ours = 0
    for pair in pairs:
        e = encode_pair(loaded.tokenizer, pair)
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        paper += 2 * p + c + r
        ours += p + c + r - 2
    return paper, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    pairs = [p for p in read_pairs(args.data, on_error="quarantine") if isinstance(p, PreferencePair)][: args.pairs]
    n_params = sum(p.numel() for p in loaded.model.base_model.parameters()) - loaded.model.get_input_embeddings().weight.numel()
    head_params = loaded.model.get_output_embeddings().weight.numel()
    paper_tokens, our_tokens = token_counts(loaded, pairs)
    peak = matmul_gflops() if loaded.device == "cpu" else float("nan")

    start = time.perf_counter()
    paper = paper_loop(loaded, pairs)
    paper_s = time.perf_counter() - start

    scorer = Scorer(loaded, ScoringConfig(batch_size=args.batch_size))
    start = time.perf_counter()
    ours = sorted((row for frame in scorer.score_batches(pairs) for row in frame.itertuples()), key=lambda r: r.row)
    ours_s = time.perf_counter() - start

    max_rel = max(abs(o.ches - p) / max(abs(p), 1e-12) for o, p in zip(ours, paper))
    paper_flops = 2 * (n_params + head_params) * paper_tokens
    our_flops = 2 * n_params * our_tokens
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, device {loaded.device}, {args.dtype}")
    print(f"model: {loaded.key} ({n_params / 1e6:.0f}M non-embedding params); {len(pairs)} hh-rlhf pairs")
    print(f"measured fp32 matmul peak: {peak:.0f} GFLOP/s")
    print(f"{'method':<8}{'seconds':>9}{'pairs/s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'% peak':>8}")
    for name, secs, tokens, flops in (("paper", paper_s, paper_tokens, paper_flops), ("ours", ours_s, our_tokens, our_flops)):
        print(f"{name:<8}{secs:>9.1f}{len(pairs) / secs:>9.2f}{tokens / secs:>10.0f}{flops / secs / 1e9:>9.1f}"
              f"{100 * flops / secs / 1e9 / peak:>7.0f}%")
    print(f"speed-up: {paper_s / ours_s:.2f}x (tokens fed: paper {paper_tokens}, ours {our_tokens}, "
          f"{paper_tokens / our_tokens:.2f}x fewer)")
    print(f"max relative CHES difference ours vs paper loop: {max_rel:.1e}; peak RSS {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
