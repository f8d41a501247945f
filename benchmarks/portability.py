"""Multi-hop portability (MQuAKE): edit the single-hop facts of the first N cases, ask the multi-hop questions.

The facts of the cases (each once; MQuAKE cases share facts) are edited in rounds of ``--batch`` on SmolLM2 with
``--method``; the unedited model and the edited one are then evaluated on the rewrites (ES, teacher-forced and
generation-based) and on every case's three multi-hop questions (portability and multi-hop accuracy, both
judgments). The work is done in steps — the unedited evaluation, each round, the edited model's edit metrics, its
multi-hop figures — each saved under ``--state`` when done; no step starts after ``--budget`` seconds, so a long
run is made in parts by running the same command again (``--budget 0``: one step per part). ``--so-far`` evaluates
the saved rounds instead (running protocol): the edits made so far, and the cases whose every fact they hold, with
the unedited model's figures on the same cases.

    python benchmarks/portability.py --cases 50 --batch 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from nse_hub.evaluation import METRIC_NAMES, EvalOptions, Evaluation, evaluate_session, measure_portability
from nse_hub.io import atomic_write_json
from nse_hub.models import cache_dir
from nse_hub.multihop import case_requests, load_multihop_cases
from nse_hub.requests import fact_key
from nse_hub.sequential import SESSION_DIR, describe_device, resume_session

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COLUMNS = (("efficacy", "ES"), ("efficacy_generation", "ES gen"), ("portability", "portability"),
           ("portability_generation", "portability gen"), ("portability_true", "multi-hop acc (orig.)"),
           ("portability_true_generation", "multi-hop acc (orig.) gen"))


def table(rows: list[tuple[str, dict]]) -> str:
    """The Markdown table benchmarks/README.md records: one row per model."""
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[k]:.1f}" if k in metrics else "–" for k, _ in COLUMNS)
                     + " |")
    return "\n".join(lines)


def settings(args: argparse.Namespace, cases: list, requests: list, session: Any) -> dict[str, Any]:
    return {"data": str(args.data), "cases": len(cases), "edits": len(requests), "batch": args.batch,
            "method": args.method, "model": args.model, "device": describe_device(session.device)}


def so_far(args: argparse.Namespace, cases: list, requests: list, state: Path, progress_file: Path,
           progress: dict, out: Path) -> None:
    """The running protocol after the saved rounds, on the cases whose facts are all written (edited and unedited)."""
    session = resume_session(args.model, state, device=args.device)  # the session saved in state/SESSION_DIR
    if not session.rounds:
        raise SystemExit(f"no round saved in {state / SESSION_DIR} yet: run without --so-far first")
    done = min(len(requests), len(session.rounds) * args.batch)
    written = {fact_key(r) for r in requests[:done]}
    covered = [case for case in cases if all(fact_key(r) in written for r in case.requests)]
    # final protocol inside evaluate_session so that the unedited model is measured on the same cases too
    evaluation = evaluate_session(session, requests[:done], options=EvalOptions(portability=covered),
                                  record=False)
    evaluation.protocol = "running"
    progress.setdefault("so_far", {})[str(len(session.rounds))] = evaluation.to_dict()
    atomic_write_json(progress_file, progress)
    atomic_write_json(out, {"settings": settings(args, cases, requests, session), **progress})
    unedited = {key.removeprefix("unedited_"): value for key, value in evaluation.metrics.items()
                if key.startswith("unedited_")}
    print(f"after {len(session.rounds)} round(s): {done} edits; {len(covered)} of {len(cases)} cases have every "
          "fact written:")
    print(table([("unedited (same cases)", unedited), (f"{args.method.upper()} (running)", evaluation.metrics)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "mquake" / "MQuAKE-hard.json")
    parser.add_argument("--cases", type=int, default=50, help="the first N MQuAKE cases (default 50)")
    parser.add_argument("--batch", type=int, default=50, help="edits per round (default 50)")
    parser.add_argument("--method", default="nse")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds after which no new step starts in this part (default 600)")
    parser.add_argument("--so-far", action="store_true",
                        help="evaluate the rounds saved so far (the cases they cover) instead of continuing")
    parser.add_argument("--state", type=Path, help="saved session and progress (default ~/.cache/nse-hub/runs/NAME)")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/NAME.json)")
    args = parser.parse_args()
    started = time.monotonic()
    name = f"portability-mquake-hard-{args.cases}-{args.method}-x{args.batch}"
    state = args.state or cache_dir() / "runs" / name
    out = args.out or Path(__file__).parent / "results" / f"{name}.json"
    cases = load_multihop_cases(args.data, limit=args.cases)
    requests = case_requests(cases)
    options = EvalOptions(portability=cases)
    progress_file = state / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {"round_seconds": []}

    steps = 0  # done in this part: the first step always runs

    def out_of_time() -> bool:
        nonlocal steps
        steps += 1
        if steps == 1 or time.monotonic() - started <= args.budget:
            return False
        print("stopped (--budget); run the same command to continue", flush=True)
        return True

    if args.so_far:
        so_far(args, cases, requests, state, progress_file, progress, out)
        return
    if "base" not in progress:
        out_of_time()
        session = resume_session(args.model, None, device=args.device)
        progress["base"] = evaluate_session(session, requests, options=options).to_dict()
        atomic_write_json(progress_file, progress)
        print(f"unedited: {progress['base']['metrics']}", flush=True)
    session = resume_session(args.model, state, method=args.method, device=args.device)
    rounds = (len(requests) + args.batch - 1) // args.batch
    for index in range(len(session.rounds), rounds):
        if out_of_time():
            return
        report = session.edit(requests[index * args.batch:(index + 1) * args.batch], progress=False)
        session.save_pretrained(state / SESSION_DIR)
        progress["round_seconds"] = [*progress["round_seconds"][:index], report.seconds]
        atomic_write_json(progress_file, progress)
        print(f"round {index + 1}/{rounds}: {report.seconds.get('total', 0):.0f} s", flush=True)
    # The final evaluation in two steps (the edits, then the questions); the unedited figures are the base step's.
    if "final" not in progress:
        if out_of_time():
            return
        progress["final"] = evaluate_session(session, requests, options=EvalOptions()).to_dict()
        atomic_write_json(progress_file, progress)
    if "final_portability" not in progress:
        if out_of_time():
            return
        progress["final_portability"] = measure_portability(session.model, session.tokenizer, session.layout,
                                                            cases, options)
        atomic_write_json(progress_file, progress)
    base, final = Evaluation(**progress["base"]), Evaluation(**progress["final"])
    final.metrics.update(progress["final_portability"])
    final.portability_cases = len(cases)
    atomic_write_json(out, {"settings": settings(args, cases, requests, session), **progress,
                            "final": final.to_dict()})
    print(f"{len(cases)} MQuAKE cases, {len(requests)} distinct single-hop edits in rounds of {args.batch}:")
    print(table([("unedited", base.metrics), (f"{args.method.upper()} (final)", final.metrics)]))
    print("; ".join(f"{key} = {METRIC_NAMES[key]}" for key, _ in COLUMNS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
