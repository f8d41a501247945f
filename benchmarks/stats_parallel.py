"""The statistics pass in 1 process and data-parallel in N (torch.distributed, gloo on the CPU): seconds and equality.

    python benchmarks/stats_parallel.py --model smollm2-135m --samples 128 --length 64 --nproc 2 --json out.json

Each run has its own empty statistics cache and one thread per process; the N-process run is launched with
``torchrun --nproc-per-node N`` and times ``second_moments`` inside each process (the slowest rank counts).
Prints the seconds of both and the largest absolute difference between their matrices (the one-process C as the
reference), per edit layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One process: the session's statistics pass, timed; rank 0 writes the seconds of every rank."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    from nse_hub import EditSession
    from nse_hub.stats import second_moments

    session = EditSession.from_pretrained(args.model, device="cpu", mom2_dataset=args.corpus,
                                          mom2_n_samples=args.samples, mom2_sample_length=args.length)
    with session.deltas.original():
        spec = session.stats_spec
        tic = time.perf_counter()
        second_moments(session.model, session.tokenizer, session.layout, session.config.layers, spec,
                       session.config.batch_size, progress=False)
        seconds = time.perf_counter() - tic
    every = [seconds]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seconds)
        every = gathered
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        paths = {layer: str(spec.path(session.layout, layer)) for layer in session.config.layers}
        Path(args.worker).write_text(json.dumps({"seconds": every, "paths": paths}))


def run(args: argparse.Namespace, nproc: int) -> dict:
    cache = Path(tempfile.mkdtemp(prefix=f"nse-hub-stats-{nproc}-"))
    models = Path(os.environ.get("NSE_HUB_CACHE", Path.home() / ".cache" / "nse-hub")) / "models"
    (cache / "models").symlink_to(models, target_is_directory=True)
    result = cache / "result.json"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", str(nproc)]
    command = [*launcher, __file__, "--worker", str(result), "--model", args.model, "--corpus", args.corpus,
               "--samples", str(args.samples), "--length", str(args.length)]
    env = {**os.environ, "NSE_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    tic = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    out = json.loads(result.read_text())
    out["wall_seconds"] = time.perf_counter() - tic
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="model", help="mom2_dataset (default: text sampled from the model)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    from safetensors.torch import load_file

    one, many = run(args, 1), run(args, args.nproc)
    difference = {}
    for layer, path in one["paths"].items():
        a, b = load_file(path)["second_moment"], load_file(many["paths"][layer])["second_moment"]
        difference[layer] = {"max_abs": float((a - b).abs().max()), "max_abs_entry": float(a.abs().max()),
                             "equal": bool(torch.equal(a, b))}
    summary = {"model": args.model, "corpus": args.corpus, "tokens": args.samples * args.length,
               "seconds_1": max(one["seconds"]), f"seconds_{args.nproc}": max(many["seconds"]),
               f"seconds_per_rank_{args.nproc}": many["seconds"], "difference": difference}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
