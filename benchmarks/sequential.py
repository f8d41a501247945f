"""Sequential editing: N CounterFact edits in rounds of b with NSE and MEMIT, on SmolLM2 by default.

Writes ``results.json`` (every figure with its protocol), ``curves.png`` (metrics against the number
of edits, running protocol) and prints the Markdown tables that benchmarks/README.md records: the
final protocol for the unedited model and each method, and general ability (suite accuracy,
perplexity) before and after.

    python benchmarks/sequential.py --edits 100 --batch 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nse_hub import EditSession, load_requests
from nse_hub.evaluation import EvalOptions, evaluate_session
from nse_hub.sequential import plot_curves, run_sequential, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COLUMNS = (("efficacy", "ES"), ("generalization", "PS"), ("specificity", "NS"), ("score", "S"),
           ("efficacy_generation", "ES gen"), ("generalization_generation", "PS gen"), ("fluency", "fluency"))


def final_table(results: dict) -> str:
    rows = [("unedited", results["base"])] + [(run["method"].upper(), run["final"]) for run in results["runs"]]
    header = "| model | " + " | ".join(label for _, label in COLUMNS) + " | perplexity | " + \
        " | ".join(rows[0][1]["general"].get("tasks", {})) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, evaluation in rows:
        metrics, general = evaluation["metrics"], evaluation["general"]
        cells = [f"{metrics[key]:.1f}" if key in metrics else "–" for key, _ in COLUMNS]
        cells.append(f"{general['perplexity']:.2f}" if "perplexity" in general else "–")
        cells += [f"{task['accuracy']:.0f}" for task in general.get("tasks", {}).values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(results: dict) -> str:
    lines = ["| method | rounds | mean s/round | values | keys | solve | scoring |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        seconds = run["round_seconds"]

        def mean(key: str, seconds: list = seconds) -> float:
            return sum(s.get(key, 0.0) for s in seconds) / len(seconds)

        lines.append(f"| {run['method'].upper()} | {len(seconds)} | {mean('total'):.1f} | {mean('values'):.1f} | "
                     f"{mean('keys'):.1f} | {mean('solve'):.2f} | {mean('scoring'):.1f} |")
    return "\n".join(lines)


def _setting(pair: str) -> tuple[str, object]:
    key, _, value = pair.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=SHARED / "counterfact_easyedit" / "counterfact-edit.json")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["nse", "memit"])
    parser.add_argument("--suite", type=Path, default=SHARED / "glue_eval" / "dataset")
    parser.add_argument("--suite-examples", type=int, default=100)
    parser.add_argument("--fluency-records", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                        help="a hyperparameter on top of the preset, for both methods (value read as JSON)")
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"sequential-{args.edits}x{args.batch}"
    requests = load_requests(args.data, limit=args.edits)
    options = EvalOptions(fluency_records=args.fluency_records)
    suite = args.suite if args.suite.is_dir() else None
    base_session = EditSession.from_pretrained(args.model, device=args.device)
    base = evaluate_session(base_session, requests, options=options, suite=suite, suite_examples=args.suite_examples)
    del base_session
    runs, configs = [], {}
    for method in args.methods:
        session = EditSession.from_pretrained(args.model, method=method, device=args.device, **dict(args.set))
        configs[method] = session.config.to_dict()
        runs.append(run_sequential(session, requests, args.batch, options=options, suite=suite,
                                   suite_examples=args.suite_examples))
        print(f"{method}: final {runs[-1].final.metrics}", flush=True)
    settings = {"model": args.model, "data": str(args.data), "edits": args.edits, "batch": args.batch,
                "suite_examples": args.suite_examples, "options": vars(options),
                "config": configs}
    write_results(out / "results.json", base, runs, settings)
    plot_curves(runs, out / "curves.png", base)
    results = json.loads((out / "results.json").read_text())
    print(final_table(results))
    print()
    print(speed_table(results))


if __name__ == "__main__":
    main()
