"""Seconds per edit round and per phase, and peak memory: nse-hub's engine vs the reference's way.

Both runs edit the same CounterFact records in rounds of ``--batch`` with the same settings; they
differ only in the value optimisation: nse-hub's batched one (``optimize_values``) or the
straightforward one-request-at-a-time loop of the reference implementation
(``optimize_values_reference``). Each runs in a fresh process, so that its peak RSS is its own. The
statistics cache starts empty, so the first run's first round includes the one-time second-moment
pass (reported as ``stats``).

    python benchmarks/round_speed.py --rounds 3 --batch 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"
PHASES = ("stats", "templates", "values", "keys", "solve", "scoring", "total")


def child(implementation: str, model: str, data: Path, rounds: int, batch: int) -> dict:
    from nse_hub import EditSession, load_requests
    from nse_hub.algorithm import optimize_values, optimize_values_reference

    requests = load_requests(data, limit=rounds * batch)
    started = time.perf_counter()
    session = EditSession.from_pretrained(model, device="cpu")
    session.value_optimizer = {"batched": optimize_values, "reference": optimize_values_reference}[implementation]
    load_seconds = time.perf_counter() - started
    per_round = []
    for start in range(0, len(requests), batch):
        report = session.edit(requests[start:start + batch], progress=False)
        per_round.append({phase: report.seconds.get(phase, 0.0) for phase in PHASES}
                         | {"efficacy": report.efficacy(), "value_steps": sum(r.value_steps for r in report.requests)})
    return {"implementation": implementation, "load_seconds": load_seconds, "rounds": per_round,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def table(results: list[dict]) -> str:
    lines = ["| value optimisation | round | values s | keys s | solve s | scoring s | stats s (once) | total s | "
             "efficacy | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for index, r in enumerate(result["rounds"], start=1):
            lines.append(f"| {result['implementation']} | {index} | {r['values']:.1f} | {r['keys']:.1f} | "
                         f"{r['solve']:.2f} | {r['scoring']:.1f} | {r['stats']:.1f} | {r['total']:.1f} | "
                         f"{100 * (r['efficacy'] or 0):.0f} % | {result['peak_rss_mib']:.0f} |")
    batched, reference = (next(r for r in results if r["implementation"] == name) for name in ("batched", "reference"))

    def mean_values(result: dict) -> float:
        return sum(r["values"] for r in result["rounds"]) / len(result["rounds"])

    lines.append(f"\nValue optimisation, mean per round: batched {mean_values(batched):.1f} s, reference "
                 f"{mean_values(reference):.1f} s — {mean_values(reference) / mean_values(batched):.1f}× faster.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "round_speed.json")
    parser.add_argument("--child", choices=["batched", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.data, args.rounds, args.batch)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="nse-hub-bench-") as cache:
        models = Path(os.environ.get("NSE_HUB_CACHE", Path.home() / ".cache" / "nse-hub")) / "models"
        (Path(cache) / "models").symlink_to(models, target_is_directory=True)
        for implementation in ("batched", "reference"):
            command = [sys.executable, __file__, "--child", implementation, "--model", args.model,
                       "--data", str(args.data), "--rounds", str(args.rounds), "--batch", str(args.batch)]
            output = subprocess.run(command, capture_output=True, text=True, check=True,
                                    env={**os.environ, "NSE_HUB_CACHE": cache})
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "model": args.model, "rounds": args.rounds,
                                    "batch": args.batch, "results": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
