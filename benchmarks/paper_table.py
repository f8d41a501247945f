"""The paper-style comparison: method × (ES, PS, NS, ES gen, fluency, perplexity) at chosen numbers of edits.

Reads the ``results.json`` files that ``benchmarks/sequential.py`` writes. ES, PS, NS and generation-based ES
at N edits come from the run's running-protocol point at N (all N edits so far, evaluated on the model edited
N times); fluency, perplexity and the suite exist only where the run's final evaluation was made at N. An
unedited row is printed for each distinct record count of the inputs' base evaluations.

    python benchmarks/paper_table.py --at 500 1000 2000 \\
        --run NSE=benchmarks/results/counterfact-2000x100-cuda:nse \\
        --run AlphaEdit=benchmarks/results/counterfact-2000x100-cuda:alphaedit \\
        --plot benchmarks/results/paper-scale-cuda.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from nse_hub.evaluation import Evaluation
from nse_hub.sequential import SequentialRun, plot_curves

METRICS = (("efficacy", "ES"), ("generalization", "PS"), ("specificity", "NS"), ("efficacy_generation", "ES gen"))


@dataclass
class LabelledRun:
    label: str
    run: SequentialRun
    base: Evaluation | None


def parse_run(spec: str) -> LabelledRun:
    """``LABEL=FOLDER:METHOD`` (FOLDER holds results.json) → the run of METHOD in it."""
    label, sep, rest = spec.partition("=")
    folder, sep2, method = rest.rpartition(":")
    if not (sep and sep2 and label and method):
        raise SystemExit(f"--run {spec!r}: write LABEL=FOLDER:METHOD, e.g. NSE=benchmarks/results/x:nse")
    results = json.loads((Path(folder) / "results.json").read_text())
    runs = [SequentialRun.from_dict(r) for r in results["runs"] if r["method"] == method]
    if not runs:
        found = sorted(r["method"] for r in results["runs"])
        raise SystemExit(f"--run {spec!r}: {folder}/results.json has no {method!r} run (it has {found})")
    base = Evaluation(**results["base"]) if results.get("base") else None
    return LabelledRun(label, runs[0], base)


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(runs: list[LabelledRun], at: list[int]) -> str:
    header = "| method | edits | " + " | ".join(name for _, name in METRICS) + " | fluency | perplexity |"
    lines = [header, "|---|---|" + "---|" * (len(METRICS) + 2)]
    bases = {b.edits: b for b in (r.base for r in runs) if b is not None}
    for edits, base in sorted(bases.items()):
        cells = [_cell(base.metrics.get(key)) for key, _ in METRICS]
        lines.append(f"| unedited (first {edits} records) | 0 | " + " | ".join(cells) +
                     f" | {_cell(base.metrics.get('fluency'))} | {_cell(base.general.get('perplexity'), 2)} |")
    for labelled in runs:
        points = {e.edits: e for e in labelled.run.curve}
        final = labelled.run.final
        for edits in at:
            point = points.get(edits) or (final if final and final.edits == edits else None)
            if point is None:
                continue
            cells = [_cell(point.metrics.get(key)) for key, _ in METRICS]
            at_final = final if final and final.edits == edits else None
            fluency = at_final.metrics.get("fluency") if at_final else None
            perplexity = at_final.general.get("perplexity") if at_final else None
            lines.append(f"| {labelled.label} | {edits} | " + " | ".join(cells) +
                         f" | {_cell(fluency)} | {_cell(perplexity, 2)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER:METHOD",
                        help="a run to tabulate (repeat); FOLDER holds a results.json of benchmarks/sequential.py")
    parser.add_argument("--at", type=int, nargs="+", default=[500, 1000, 2000], help="numbers of edits")
    parser.add_argument("--plot", type=Path, help="also draw every run's curves into this PNG")
    args = parser.parse_args()
    runs = [parse_run(spec) for spec in args.run]
    print(table(runs, args.at))
    if args.plot:
        base = max((r.base for r in runs if r.base), key=lambda b: b.edits, default=None)
        plot_curves([r.run for r in runs], args.plot, base, labels=[r.label for r in runs])
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
