"""CHES throughput on CPU: the paper's per-example loop vs our engine vs the whole CLI, in one run.

(a) paper: batch 1, two full forward passes per pair through the causal LM with
    `output_hidden_states=True` (logits computed), summing `hidden_states[-1]`;
    compute only (pairs tokenized beforehand);
(b) ours, in process: `ches_curate.scoring.Scorer` with `batch_size=1`, then with its
    defaults (one row per pair under a block mask, token-budget batches);
(c) ours, whole process: `ches-curate score FILE --output T.parquet` with no flags, in a
    subprocess (imports, model load, reading, scoring, writing), with a temporary
    $CHES_CURATE_HOME that already holds the converted default model; and, apart, the
    start-up alone (imports + model load) in a fresh process.

All on the same pairs, model and threads. Prints seconds, pairs/s, tokens fed, achieved
GFLOP/s against this machine's fp32 matmul rate (measured at start and end), speed-ups
over (a), the largest relative CHES difference to (a), peak RSS and the load average.

    .venv/bin/python bench/ches_throughput.py --pairs 64
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ches_curate.ingest import read_pairs
from ches_curate.models import home_dir, load_model, resolve_model_dir
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import Scorer, ScoringConfig
from ches_curate.tokenization import encode_pair

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl"
STARTUP = "import time; t = time.perf_counter(); from ches_curate.scoring import Scorer; Scorer({!r}); " \
          "print(time.perf_counter() - t)"
# Runs a command and prints its peak RSS (kB). A small launcher, because a child of this big process is
# charged this process's RSS: Linux counts the memory a vforked child shared before its exec.
PEAK_RSS = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); " \
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best of three timings of `repeats` fp32 n x n products: the machine's dense rate right now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


@torch.inference_mode()
def paper_loop(loaded, encoded):
    """Batch 1, two full passes per pair, logits computed: the published algorithm."""
    scores = []
    for e in encoded:
        prompt_len = len(e.prompt_ids)
        sums = []
        for response in (e.chosen_ids, e.rejected_ids):
            out = loaded.model(torch.tensor([e.prompt_ids + response]), output_hidden_states=True)
            sums.append(out.hidden_states[-1][0, prompt_len - 1 : prompt_len - 1 + len(response)].double().sum(0))
        s_plus, s_minus = sums
        scores.append(float(s_plus @ s_minus - s_plus @ s_plus))
    return scores


def engine(loaded, pairs, config: ScoringConfig):
    """(seconds, CHES in pair order, tokens fed) for one in-process run of the engine."""
    scorer = Scorer(loaded, config)
    start = time.perf_counter()
    frames = list(scorer.score_batches(pairs))
    seconds = time.perf_counter() - start
    rows = sorted((r for f in frames for r in f.itertuples()), key=lambda r: r.row)
    return seconds, [r.ches for r in rows], sum(f.attrs["tokens"] for f in frames)


def whole_process(data: Path, pairs: list[PreferencePair], model: str, workdir: Path) -> tuple[float, float, int]:
    """(CLI seconds, start-up seconds, the CLI's peak RSS in MB) for `ches-curate score` with no flags."""
    source = workdir / "pairs.jsonl"
    with open(data, encoding="utf-8") as handle:  # the same input rows the in-process runs read
        source.write_text("".join(line for _, line in zip(range(pairs[-1].row + 1), handle)), encoding="utf-8")
    env = dict(os.environ)
    if model == "default":
        _, converted, _ = resolve_model_dir("default")  # converts once into the real home if needed
        home = workdir / "home"
        (home / "models").mkdir(parents=True)
        (home / "models" / converted.name).symlink_to(converted)
        env["CHES_CURATE_HOME"] = str(home)
    cli = Path(sys.executable).with_name("ches-curate")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(cli), "score", str(source), "--output",
                          str(workdir / "scores.parquet"), "--model", model],
                         check=True, env=env, stdout=subprocess.PIPE, text=True)
    cli_s = time.perf_counter() - start
    startup = subprocess.run([sys.executable, "-c", STARTUP.format(model)], check=True, env=env,
                             capture_output=True, text=True)
    return cli_s, float(startup.stdout.split()[-1]), int(run.stdout.split()[-1]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(SHARED))
    args = parser.parse_args()

    load_start = load_average()
    loaded = load_model(args.model, device="cpu")
    pairs = [p for p in read_pairs(args.data, on_error="quarantine") if isinstance(p, PreferencePair)][: args.pairs]
    encoded = [encode_pair(loaded.tokenizer, p) for p in pairs]
    body = sum(p.numel() for p in loaded.model.base_model.parameters()) - loaded.model.get_input_embeddings().weight.numel()
    head = loaded.model.get_output_embeddings().weight.numel()
    paper_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)
    peak_start = matmul_gflops()
    paper_loop(loaded, encoded[:1])  # warm-up: the first pass of a process pays for thread pools and page faults

    start = time.perf_counter()
    paper = paper_loop(loaded, encoded)
    runs = [("paper loop", time.perf_counter() - start, paper, paper_tokens, 2 * (body + head) * paper_tokens)]
    for name, config in (("ours, batch 1", ScoringConfig(batch_size=1)), ("ours, defaults", ScoringConfig())):
        seconds, ches, tokens = engine(loaded, pairs, config)
        runs.append((name, seconds, ches, tokens, 2 * body * tokens))
    with tempfile.TemporaryDirectory(prefix="ches_bench_") as workdir:
        cli_s, startup_s, child_rss = whole_process(Path(args.data), pairs, args.model, Path(workdir))
    runs.append(("ches-curate score", cli_s, None, runs[-1][3], runs[-1][4]))
    peak_end = matmul_gflops()
    peak = max(peak_start, peak_end)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; load average {load_start} at start, {load_average()} at end")
    print(f"model: {loaded.key} ({body / 1e6:.0f}M non-embedding params, LM head {head / 1e6:.0f}M); "
          f"{len(pairs)} hh-rlhf pairs; home {home_dir()}")
    print(f"fp32 matmul rate: {peak_start:.0f} GFLOP/s at start, {peak_end:.0f} at end (% peak uses {peak:.0f})")
    print(f"{'method':<19}{'seconds':>9}{'pairs/s':>9}{'tokens':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'% peak':>8}"
          f"{'speed-up':>10}{'max rel diff':>14}")
    paper_s = runs[0][1]
    for name, secs, ches, tokens, flops in runs:
        diff = max(abs(o - p) / max(abs(p), 1e-12) for o, p in zip(ches, paper)) if ches else float("nan")
        print(f"{name:<19}{secs:>9.1f}{len(pairs) / secs:>9.2f}{tokens:>8}{tokens / secs:>10.0f}"
              f"{flops / secs / 1e9:>9.1f}{100 * flops / secs / 1e9 / peak:>7.0f}%{paper_s / secs:>9.2f}x{diff:>14.1e}")
    print(f"whole process: start-up (imports + model load, fresh process) {startup_s:.1f} s = "
          f"{100 * startup_s / cli_s:.0f}% of the CLI's {cli_s:.1f} s")
    print(f"peak RSS: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB, "
          f"ches-curate score {child_rss} MB")


if __name__ == "__main__":
    main()
