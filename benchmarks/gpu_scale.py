"""A Llama-3-8B-shaped random model on one device: the statistics pass and one round of 100 edits, per phase.

    python benchmarks/gpu_scale.py --json gpu_scale.json                     # CUDA, bf16, 32 layers (~5 min, H100)
    python benchmarks/gpu_scale.py --device cpu --layers 2 --tiny            # a smoke test on the CPU (seconds)
    python benchmarks/gpu_scale.py --device cpu --layers 2 --vocab 1024      # full width, reduced depth (CPU)

Nothing is downloaded: the model is built from the shipped config (tests/fixtures/configs/llama-3-8b, vocabulary
128,256) with random weights directly on the device, the text comes from the test tokenizer
(tests/fixtures/tiny-tokenizer: token ids below 1,024), the corpus of the statistics pass is random words
written to a temporary file, and the requests are synthetic ("The city of <name> is in" → a country word).
The statistics pass reads a fixed number of tokens (``--stat-tokens``, default 10 · d_ff = 143,360); the value
step runs a fixed number of Adam steps (``--steps``; early stopping is off). NSE then AlphaEdit each make one
round of ``--edits`` requests on the unedited model (the statistics are measured once, in NSE's round, and read
from the cache by AlphaEdit's).

Printed per method and phase: seconds (the round's own clock) and peak memory — CUDA:
``torch.cuda.max_memory_allocated`` reset at the start of each phase; CPU: peak resident memory (VmHWM, reset
through /proc/self/clear_refs) — beside the prediction of ``nse_hub.plan.memory_plan`` for the same shape and
settings. The settings the 8-minute budget fixes (steps, NSE passes) are printed with the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
CONFIG = ROOT / "tests" / "fixtures" / "configs" / "llama-3-8b"
TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-tokenizer"
GIB = 2**30

WORDS = ("river", "market", "stone", "winter", "garden", "castle", "letter", "harbor", "silver", "forest", "window",
         "station", "teacher", "village", "engine", "mountain", "bridge", "summer", "paper", "island", "music",
         "north", "city", "school", "doctor", "country", "music", "painter", "language", "famous", "old", "new")
COUNTRIES = ("France", "Spain", "Brazil", "Japan", "Canada", "Egypt", "Italy", "Norway", "Peru", "Kenya")


def build_model(args: argparse.Namespace, device: str):
    """The Llama-3-8B config (or a tiny one of its head layout) with ``args.layers`` layers, random, on ``device``."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(CONFIG)
    config.num_hidden_layers = args.layers
    if args.tiny:  # the same head layout at 1/64 of the width
        config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 224, 4
        config.num_key_value_heads, config.head_dim = 1, 16
    if args.vocab:
        config.vocab_size = args.vocab
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype))
    return model.eval(), config


def write_corpus(folder: Path, tokens: int) -> Path:
    """Random words in long paragraphs (full 64-token samples), at least ``tokens`` of them (a word is 1–3
    tokens of the test tokenizer)."""
    rng = random.Random(0)
    path = folder / "corpus.txt"
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(1000)) + "." for _ in range(tokens // 1000 + 1)]
    path.write_text("\n\n".join(paragraphs))
    return path


def requests(count: int) -> list[dict]:
    rng = random.Random(1)
    names = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3)).title()
             for _ in range(count)]
    return [{"prompt": f"The city of {name} is in", "subject": name, "target_new": COUNTRIES[i % len(COUNTRIES)]}
            for i, name in enumerate(names)]


class Peaks:
    """Peak memory per phase (see benchmarks/memory_plan.py's PhasePeaks): CUDA counters on a GPU, RSS on the CPU."""

    def __new__(cls, device: str):
        from memory_plan import PhasePeaks

        if not device.startswith("cuda"):
            return PhasePeaks()

        import torch

        class DevicePeaks(PhasePeaks):
            @staticmethod
            def hwm() -> int:
                torch.cuda.synchronize()
                return torch.cuda.max_memory_allocated()

            @staticmethod
            def reset() -> None:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        return DevicePeaks()


def plan_phases(config, method: str, args: argparse.Namespace, settings: dict, device: str) -> dict[str, int]:
    from nse_hub.plan import memory_plan

    plan = memory_plan(config, method=method, dtype=args.dtype, device="cuda" if device.startswith("cuda") else "cpu",
                       batch_size=args.edits, hparams=settings)
    return {**{p.name: p.bytes for p in plan.phases}, "peak": plan.peak_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--edits", type=int, default=100, help="requests in the round")
    parser.add_argument("--steps", type=int, default=20, help="Adam steps of the value optimisation (fixed)")
    parser.add_argument("--passes", type=int, default=2, help="NSE: update passes (max_iterations - 1)")
    parser.add_argument("--stat-tokens", type=int, help="tokens of the statistics pass (default 10 · d_ff)")
    parser.add_argument("--methods", nargs="+", default=["nse", "alphaedit"])
    parser.add_argument("--vocab", type=int, help="vocabulary size instead of the config's (≥ 1,024)")
    parser.add_argument("--tiny", action="store_true", help="hidden 64, d_ff 224: a smoke test of the script")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="nse-hub-gpu-scale-"))
    os.environ["NSE_HUB_CACHE"] = str(cache)  # an empty statistics cache: the pass runs, nothing is reused
    import torch
    from transformers import AutoTokenizer

    from nse_hub import EditSession

    device = args.device
    peaks = Peaks(device)
    peaks.install()
    peaks.start()
    tic = time.perf_counter()
    model, config = build_model(args, device)
    build_seconds = time.perf_counter() - tic
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    length = 64
    stat_tokens = args.stat_tokens or 10 * config.intermediate_size
    settings = {"mom2_dataset": str(write_corpus(cache, 2 * stat_tokens)), "mom2_n_samples": -(-stat_tokens // length),
                "mom2_sample_length": length, "v_num_grad_steps": args.steps, "v_early_stop_loss": 0.0,
                "max_iterations": args.passes + 1, "alpha": 0.0, "upper_bound": 1e9}  # every request written
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"{name}: Llama-3-8B shape, {args.layers} layers, hidden {config.hidden_size}, d_ff "
          f"{config.intermediate_size}, vocabulary {config.vocab_size}, {args.dtype}; built in {build_seconds:.1f} s; "
          f"{stat_tokens:,} statistics tokens, {args.edits} edits, {args.steps} value steps", flush=True)

    results = {"device": name, "layers": args.layers, "dtype": args.dtype, "hidden": config.hidden_size,
               "d_ff": config.intermediate_size, "vocab": config.vocab_size, "edits": args.edits, "steps": args.steps,
               "stat_tokens": stat_tokens, "build_seconds": build_seconds, "methods": {}}
    for method in args.methods:
        peaks.peaks, peaks.overall = {}, 0
        peaks.reset()
        session = EditSession.from_pretrained(model, method, tokenizer=tokenizer, **settings)
        peaks.wrap(session, "value_optimizer", "value step (per chunk)")
        tic = time.perf_counter()
        report = session.edit(requests(args.edits), progress=False)
        peaks.close(None)
        seconds = time.perf_counter() - tic
        predicted = plan_phases(config, method, args, settings, device)
        written = sum(bool(r.success()) for r in report.requests)
        results["methods"][method] = {"seconds": report.seconds, "round_seconds": seconds,
                                      "measured_bytes": dict(peaks.peaks), "measured_peak": peaks.overall,
                                      "predicted_bytes": predicted, "layers_edited": list(session.config.layers),
                                      "written": written}
        print(f"\n{method} (layers {list(session.config.layers)}): {seconds:.1f} s, {written} of {args.edits} "
              "requests written")
        print(f"{'phase':<24}{'seconds':>9}{'measured GiB':>14}{'predicted GiB':>15}")
        clock = {"statistics pass": "stats", "value step (per chunk)": "values", "key reads": "keys",
                 "solves": "solve", "null space": "null_space"}
        for phase, measured in peaks.peaks.items():
            spent = report.seconds.get(clock.get(phase, ""), float("nan"))
            print(f"{phase:<24}{spent:>9.1f}{measured / GIB:>14.2f}{predicted.get(phase, 0) / GIB:>15.2f}")
        print(f"{'peak':<24}{'':>9}{peaks.overall / GIB:>14.2f}{predicted['peak'] / GIB:>15.2f}")
        print("round clock:", {k: round(v, 1) for k, v in report.seconds.items()}, flush=True)
        session.rollback(0)
        del session, report
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
