"""Compare hyperparameter settings on sequential CounterFact edits: how the presets were chosen.

Each variant edits the same first ``--edits`` records in rounds of ``--batch`` from the unedited model
and is judged on all of them after the last round (final protocol, teacher-forced): efficacy,
generalization, specificity and its magnitude (MEMIT's mean p(true) − p(new) on neighbourhood prompts,
which separates settings that the 0/1 specificity of one neighbour per record cannot). Variants are JSON
objects of hyperparameters on top of the model's preset.

    python benchmarks/presets.py --model gemma3-270m --edits 50 \\
        --variant '{}' --variant '{"layers": [2, 3, 4, 5, 6]}' --variant '{"v_lr": 10}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nse_hub import EditSession, load_requests
from nse_hub.evaluation import EvalOptions, measure_requests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"
COLUMNS = ("efficacy", "generalization", "specificity", "specificity_magnitude")


def measure(session: EditSession, requests: list) -> dict[str, float]:
    return measure_requests(session.model, session.tokenizer, session.layout, requests, EvalOptions(generation=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--variant", action="append", default=[], type=json.loads, help="JSON hyperparameters")
    parser.add_argument("--out", type=Path, help="append one JSON line per variant here")
    args = parser.parse_args()
    requests = load_requests(args.data, limit=args.edits)

    rows = [("unedited", measure(EditSession.from_pretrained(args.model), requests), 0.0)]
    for variant in args.variant or [{}]:
        session = EditSession.from_pretrained(args.model, **variant)
        started = time.perf_counter()
        for start in range(0, len(requests), args.batch):
            session.edit(requests[start:start + args.batch], progress=False)
        label = json.dumps(variant) if variant else f"preset {session.config.preset}"
        rows.append((label, measure(session, requests), time.perf_counter() - started))
        print(label, {k: round(rows[-1][1][k], 2) for k in COLUMNS}, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps({"model": args.model, "edits": args.edits, "batch": args.batch,
                                    "variant": variant, "config": session.config.to_dict(),
                                    "metrics": rows[-1][1], "seconds": rows[-1][2]}) + "\n")
    print(f"\n{args.model}, first {args.edits} records in rounds of {args.batch}, final protocol\n")
    print("| setting | ES | PS | NS | NS magnitude | edit seconds |\n|---|---|---|---|---|---|")
    for label, metrics, seconds in rows:
        print(f"| {label} | {metrics['efficacy']:.0f} | {metrics['generalization']:.0f} | "
              f"{metrics['specificity']:.0f} | {metrics['specificity_magnitude']:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
