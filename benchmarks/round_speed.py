"""Seconds per edit and peak memory for rounds of 10, 50 and 100 requests, per phase.

The same first ``--edits`` CounterFact records are edited in rounds of each ``--batches`` size (by
default 100 records: 10 rounds of 10, 2 of 50, 1 of 100), each size in a fresh process with the
same warm statistics cache, so that its peak RSS is its own and the one-time second-moment pass
(made by a first, separate process and reported as ``stats_seconds``) is not in any round. Context
templates are generated once per session and reported apart (``templates``).

Per round size it reports seconds per edit for each phase (values, keys, solve, scoring, total) and
the peak resident memory: of the whole process, during the value optimisation, and during the rest
of the rounds (sampled every 20 ms with psutil when it is installed; else only the process peak from
``resource.getrusage``). ``--reference`` adds the reference's one-request-at-a-time value loop
(``optimize_values_reference``) at the first round size, for comparison. ``--methods`` times each method's rounds
the same way, one process per method and round size, one after another (side by side on the same machine).

    python benchmarks/round_speed.py --edits 100 --batches 10 50 100
    python benchmarks/round_speed.py --edits 100 --batches 100 --methods nse nse_null alphaedit memit_seq ultraedit
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
import threading
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"
PHASES = ("templates", "values", "keys", "solve", "scoring", "total")


class MemorySampler:
    """Peak RSS (MiB) per labelled phase, sampled by a background thread (needs psutil)."""

    def __init__(self, interval: float = 0.02) -> None:
        try:
            import psutil
        except ImportError:
            self.process = None
        else:
            self.process = psutil.Process()
        self.phase = "setup"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> MemorySampler:
        if self.process is not None:
            self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        if self.process is not None:
            self._thread.join()

    def sample(self) -> None:
        if self.process is not None:
            rss = self.process.memory_info().rss / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()


def child(implementation: str, model: str, data: Path, edits: int, batch: int, method: str = "nse") -> dict:
    from nse_hub import EditSession, load_requests
    from nse_hub.algorithm import optimize_values, optimize_values_reference

    requests = load_requests(data, limit=edits)
    optimize = {"batched": optimize_values, "reference": optimize_values_reference}[implementation]
    with MemorySampler() as memory:
        started = time.perf_counter()
        session = EditSession.from_pretrained(model, device="cpu", method=method)
        load_seconds = time.perf_counter() - started
        memory.sample()
        loaded_rss = memory.peaks.get("setup")

        def values(*args, **kwargs):
            memory.phase = "values"
            memory.sample()
            try:
                return optimize(*args, **kwargs)
            finally:
                memory.sample()
                memory.phase = "rest of round"

        session.value_optimizer = values
        per_round = []
        for start in range(0, len(requests), batch):
            memory.phase = "rest of round"
            report = session.edit(requests[start:start + batch], progress=False)
            memory.sample()
            seconds = dict(report.seconds)
            seconds["values"] = seconds.get("values", 0.0) + seconds.get("features", 0.0)  # UltraEdit: features
            per_round.append({phase: seconds.get(phase, 0.0) for phase in (*PHASES, "stats")}
                             | {"edits": len(report.requests), "efficacy": report.metrics().get("efficacy"),
                                "value_steps": sum(r.value_steps for r in report.requests)})
    n = sum(r["edits"] for r in per_round)
    per_edit = {phase: sum(r[phase] for r in per_round) / n for phase in PHASES if phase != "templates"}
    # Round totals include the one-time context templates (and statistics, when the cache was cold) of the
    # first round: leave them out per edit.
    per_edit["total"] -= sum(r["templates"] + r["stats"] for r in per_round) / n
    return {"implementation": implementation, "method": method, "batch": batch, "edits": n,
            "load_seconds": load_seconds,
            "templates_seconds": sum(r["templates"] for r in per_round),
            "seconds_per_edit": per_edit, "rounds": per_round,
            "value_steps_per_edit": sum(r["value_steps"] for r in per_round) / n,
            "efficacy": sum((r["efficacy"] or 0) * r["edits"] for r in per_round) / n,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loaded_rss_mib": loaded_rss,
            "phase_peak_rss_mib": {k: v for k, v in memory.peaks.items() if k != "setup"}}


def warm_statistics(model: str, method: str = "nse") -> float:
    """Compute the session's statistics (and nothing else) once; returns the seconds it took."""
    from nse_hub import EditSession
    from nse_hub.stats import second_moments

    session = EditSession.from_pretrained(model, device="cpu", method=method)
    if not session.config.uses_second_moments:  # UltraEdit
        return 0.0
    started = time.perf_counter()
    second_moments(session.model, session.tokenizer, session.layout, session.config.layers, session.stats_spec,
                   session.config.batch_size, progress=False)
    return time.perf_counter() - started


def table(results: list[dict]) -> str:
    columns = ("method", "value optimisation", "round size", "rounds", "values (UltraEdit: features) s/edit",
               "keys s/edit", "solve s/edit", "scoring s/edit", "total s/edit", "Adam steps/edit", "efficacy",
               "peak RSS MiB: process / values / rest")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        e, peaks = r["seconds_per_edit"], r["phase_peak_rss_mib"]
        peak = " / ".join(f"{peaks[k]:.0f}" if k in peaks else "–" for k in ("values", "rest of round"))
        optimisation = "–" if r.get("method") == "ultraedit" else r["implementation"]
        lines.append(f"| {r.get('method', 'nse')} | {optimisation} | {r['batch']} | {len(r['rounds'])} | "
                     f"{e['values']:.2f} | "
                     f"{e['keys']:.2f} | {e['solve']:.3f} | {e['scoring']:.2f} | {e['total']:.2f} | "
                     f"{r['value_steps_per_edit']:.1f} | {r['efficacy']:.0f} % | "
                     f"{r['peak_rss_mib']:.0f} / {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--edits", type=int, default=100, help="records edited at every round size")
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 50, 100], help="round sizes")
    parser.add_argument("--reference", action="store_true",
                        help="also run the reference's per-request value loop at the first round size")
    parser.add_argument("--methods", nargs="+", default=["nse"], help="edit methods to time, one after another")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "round_speed.json")
    parser.add_argument("--child", choices=["batched", "reference", "stats"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="nse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "stats":
        print(json.dumps({"stats_seconds": warm_statistics(args.model, args.method)}))
        return
    if args.child:
        print(json.dumps(child(args.child, args.model, args.data, args.edits, args.batch, args.method)))
        return
    runs = [("batched", batch, method) for method in args.methods for batch in args.batches]
    runs += [("reference", args.batches[0], "nse")] if args.reference else []
    results = []
    with tempfile.TemporaryDirectory(prefix="nse-hub-bench-") as cache:
        models = Path(os.environ.get("NSE_HUB_CACHE", Path.home() / ".cache" / "nse-hub")) / "models"
        (Path(cache) / "models").symlink_to(models, target_is_directory=True)
        env = {**os.environ, "NSE_HUB_CACHE": cache}
        base = [sys.executable, __file__, "--model", args.model, "--data", str(args.data), "--edits", str(args.edits)]

        def run(*extra: str) -> dict:
            output = subprocess.run([*base, *extra], capture_output=True, text=True, check=True, env=env)
            return json.loads(output.stdout.strip().splitlines()[-1])

        machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
        header = {"machine": machine, "model": args.model, "edits": args.edits, "batches": args.batches,
                  "command": "python benchmarks/round_speed.py " + " ".join(sys.argv[1:]),
                  "stats_seconds": {method: run("--child", "stats", "--method", method)["stats_seconds"]
                                    for method in dict.fromkeys(args.methods)}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for implementation, batch, method in runs:
            results.append(run("--child", implementation, "--batch", str(batch), "--method", method))
            print(table(results[-1:]).splitlines()[-1], flush=True)
            args.out.write_text(json.dumps({**header, "results": results}, indent=2) + "\n")  # after each size
    print(table(results))


if __name__ == "__main__":
    main()
