"""Generation speed of edit versions: vLLM (multi-LoRA) against transformers + PEFT, on the same prompts.

Run it with the serving environment's Python (it has vLLM, transformers, PEFT and nse-hub)::

    .venv-serve/bin/python benchmarks/serve_speed.py /tmp/serve-edit4 --out benchmarks/results/serve_speed.json

Conditions, each a batch of all prompts submitted at once, greedy, a fixed number of new tokens (EOS
ignored, so every engine generates the same count):

- ``base``: the unedited model (vLLM: once in an engine without LoRA, once through the zero
  ``base`` adapter of an engine with LoRA, which is how ``nse-hub serve`` answers base requests);
- ``1 version``: every prompt on the latest chosen version;
- ``N versions interleaved``: prompt *i* on version *i mod N* (PEFT: a mixed-adapter batch,
  ``generate(adapter_names=…)``). An edit with fewer than N rounds adds copies of its versions under other
  adapter names (recorded as ``copies``): the cost depends on how many adapters a batch holds and their
  ranks, not on their values.

Figures are generated tokens per second of wall time; the median of ``--repeats`` runs after one
warm-up. vLLM runs offline (``vllm.LLM``, no HTTP), with ``enforce_eager`` unless ``--compile``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Windows 95 was developed by",
    "The capital of France is",
    "To see the Eiffel Tower, tourists travel to the city of",
    "Danielle Darrieux grew up speaking",
    "The Louvre is located in the city of",
    "The mother tongue of Jacques Chirac is",
    "Tim Berners-Lee was born in the country of",
    "The Colosseum is located in the city of",
    "Python is a programming language created by",
    "The largest planet of the solar system is",
    "Mount Fuji is a mountain in",
    "The author of Hamlet is",
    "The currency of Japan is the",
    "Albert Einstein was born in the country of",
]


def timed(run: Callable[[], int], repeats: int) -> dict[str, float]:
    """Tokens per second of ``run`` (which returns the number of tokens it generated): warm-up, then median."""
    run()
    rates, seconds = [], []
    for _ in range(repeats):
        tic = time.perf_counter()
        tokens = run()
        elapsed = time.perf_counter() - tic
        rates.append(tokens / elapsed)
        seconds.append(elapsed)
    return {"tokens_per_s": round(statistics.median(rates), 1), "seconds": round(statistics.median(seconds), 3),
            "tokens": tokens, "runs": [round(r, 1) for r in rates]}


def peft_speeds(base: str, adapters: dict[str, Path], versions: list[str], prompts: list[str], max_tokens: int,
                repeats: int) -> dict[str, dict[str, float]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    settings = {"do_sample": False, "max_new_tokens": max_tokens, "min_new_tokens": max_tokens,
                "pad_token_id": tokenizer.pad_token_id}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def generate(target, **kwargs) -> int:
        with torch.no_grad():
            out = target.generate(**batch, **settings, **kwargs)
        return int((out.shape[1] - batch.input_ids.shape[1]) * out.shape[0])

    results = {"base": timed(lambda: generate(model), repeats)}
    peft = PeftModel.from_pretrained(model, adapters[versions[-1]], adapter_name=versions[-1])
    for name in versions[:-1]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.set_adapter(versions[-1])
    results["1 version"] = timed(lambda: generate(peft), repeats)
    names = [versions[i % len(versions)] for i in range(len(prompts))]
    results[f"{len(versions)} versions interleaved"] = timed(lambda: generate(peft, adapter_names=names), repeats)
    return results


def plain_engine_speed(engine, prompts: list[str], params, repeats: int) -> dict[str, float]:
    """The base on an engine without LoRA (the engine is released when this returns)."""
    return timed(lambda: sum(len(o.outputs[0].token_ids) for o in engine.generate(prompts, params, use_tqdm=False)),
                 repeats)


def vllm_speeds(plan, adapters: dict[str, Path], versions: list[str], prompts: list[str], max_tokens: int,
                repeats: int, compile: bool) -> dict[str, dict[str, float]]:
    from vllm import LLM, SamplingParams

    from nse_hub.serving import VersionedLLM

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    common = {"dtype": "float32", "max_model_len": 512, "enforce_eager": not compile, "seed": 0}

    results = {"base (no LoRA engine)": plain_engine_speed(LLM(model=plan.base_model, **common), prompts, params,
                                                           repeats)}
    gc.collect()
    slots = len(adapters) + 1  # every adapter plus the spare slot, as nse-hub serve sets it
    llm = VersionedLLM(plan, adapters, max_loras=slots, max_cpu_loras=slots, **common)

    def run(names: list[str]) -> int:
        outputs = llm.generate_outputs(prompts, names, max_tokens, ignore_eos=True)
        return sum(len(o.token_ids) for o in outputs)

    results["base (zero adapter)"] = timed(lambda: run(["base"] * len(prompts)), repeats)
    results["1 version"] = timed(lambda: run([versions[-1]] * len(prompts)), repeats)
    results[f"{len(versions)} versions interleaved"] = timed(
        lambda: run([versions[i % len(versions)] for i in range(len(prompts))]), repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edit", help="a saved edit with at least --versions rounds")
    parser.add_argument("--versions", type=int, default=4, help="versions interleaved (round-1 … round-N)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (default: enforce_eager)")
    parser.add_argument("--adapters-dir", default="/tmp/nse-hub-serve-speed")
    parser.add_argument("--out", default="benchmarks/results/serve_speed.json")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    args = parser.parse_args()

    import torch
    import transformers
    import vllm

    from nse_hub.serving import plan_serving, write_adapters

    plan = plan_serving(args.edit, "all")
    adapters = write_adapters(plan, args.adapters_dir)
    real = [v.name for v in plan.versions][-args.versions:]
    copies = []
    while len(real) + len(copies) < args.versions:  # fewer rounds than asked: the same weights, another name
        source = real[len(copies) % len(real)]
        name = f"{source}-copy{len(copies) + 1}"
        shutil.copytree(adapters[source], Path(args.adapters_dir) / name, dirs_exist_ok=True)
        adapters[name] = Path(args.adapters_dir) / name
        copies.append(name)
    versions = copies + real  # the last one is the latest real version: the "1 version" condition
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    results = {
        "settings": {"edit": args.edit, "base": plan.base_model, "versions": versions, "prompts": len(prompts),
                     "max_tokens": args.max_tokens, "repeats": args.repeats, "dtype": "float32",
                     "vllm_enforce_eager": not args.compile, "max_lora_rank": plan.max_lora_rank,
                     "copies": copies,
                     "ranks": {v.name: v.rank for v in plan.versions}},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "torch": torch.__version__, "vllm": vllm.__version__,
                    "transformers": transformers.__version__, "note": args.note,
                    "load_average_start": os.getloadavg()},
        "transformers+peft": peft_speeds(plan.base_model, adapters, versions, prompts, args.max_tokens, args.repeats),
    }
    gc.collect()
    results["vllm"] = vllm_speeds(plan, adapters, versions, prompts, args.max_tokens, args.repeats, args.compile)
    results["machine"]["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for engine in ("transformers+peft", "vllm"):
        for condition, figures in results[engine].items():
            print(f"{engine:18} {condition:26} {figures['tokens_per_s']:8.1f} tokens/s  ({figures['seconds']} s)")


if __name__ == "__main__":  # vLLM starts worker processes: building an LLM needs this guard
    main()
