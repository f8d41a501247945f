"""Sequential editing: N CounterFact edits in rounds of B with any methods, on SmolLM2 by default; resumable.

Every method's session is saved after each round under ``--state`` (default ``~/.cache/nse-hub/runs/<name>``),
with its running curve, so that an interrupted run continues where it stopped when the same command is run
again (a 2000-edit run takes hours on a CPU: run it in parts). Methods can run in separate processes on the same
``--state``/``--out`` (one ``--methods`` each); the unedited model's evaluation is made once and reused.

Writes ``results.json`` (every figure with its protocol, finished and unfinished runs), ``curves.png`` (metrics
against the number of edits, running protocol) and prints the Markdown tables that benchmarks/README.md records.

    python benchmarks/sequential.py --edits 100 --batch 10
    python benchmarks/sequential.py --edits 2000 --batch 100 --methods nse --running-every 5 --name counterfact-2000x100
    python benchmarks/sequential.py --edits 10000 --batch 100 --methods ultraedit --running-every 10 \
        --running-sample 1000 --probes rewrite --name counterfact-10000x100
    # the same with StableEdit's settings, as its own run beside it
    python benchmarks/sequential.py --edits 10000 --batch 100 --methods ultraedit --label stableedit \
        --set ultraedit_whitening=full --set ultraedit_ridge=10 --set ultraedit_lr=5e-4 --warmup 600 \
        --running-every 10 --running-sample 1000 --probes rewrite --name counterfact-10000x100

NSE and NSE-null take each round's value targets from ``<state>/values`` (computing and storing the missing ones),
so the two methods' runs share them, and helper processes can compute them ahead while a run solves (the value step
is most of an NSE round's time on a CPU). Each process claims the round it computes: helpers skip each other's
rounds and the run waits for a round a helper is computing, so start as many helpers as there are free cores::

    python benchmarks/sequential.py --edits 10000 --batch 100 --methods nse_null --name counterfact-10000x100 &
    python benchmarks/sequential.py --edits 10000 --batch 100 --methods nse_null --name counterfact-10000x100 \
        --values-ahead                # from the first missing round on; --values-ahead last-first: from the end

MEMIT and AlphaEdit optimise their targets on the weights the earlier rounds left: they store them in the same
folder as a replay log (``ValueStore``), so a run whose saved session was lost re-solves its rounds from them.

The unedited model is evaluated (once, on every edit, resumable in parts) after the methods' runs, so that a long
run starts editing at once, unless the results folder's ``results.json`` holds one measured with the same
protocol (model, data, edits, evaluation options, suite size); ``--report-only`` prints the tables of whatever is
saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from pathlib import Path

from nse_hub import load_requests
from nse_hub.checkpoint import is_checkpoint, read_meta
from nse_hub.evaluation import EvalOptions, Evaluation, evaluate_session
from nse_hub.io import atomic_write_json
from nse_hub.models import cache_dir
from nse_hub.sequential import (
    RUN_FILE,
    SESSION_DIR,
    SequentialRun,
    ValueStore,
    plot_curves,
    precompute_values,
    resume_session,
    run_sequential,
    schedule_rounds,
    write_results,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COLUMNS = (("efficacy", "ES"), ("generalization", "PS"), ("specificity", "NS"), ("score", "S"),
           ("efficacy_generation", "ES gen"), ("generalization_generation", "PS gen"), ("fluency", "fluency"))


def _name(run: dict) -> str:
    return run.get("label") or run["method"]


def final_table(results: dict) -> str:
    rows = [("unedited", results["base"])] + [(_name(run), run["final"]) for run in results["runs"]
                                               if run.get("final")]
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


def curve_table(results: dict, metrics: tuple[str, ...] = ("efficacy", "generalization", "specificity",
                                                           "efficacy_generation")) -> str:
    """The running protocol at each measured point: method × edits so far (perplexity where the point has it)."""
    lines = ["| method | edits | " + " | ".join(metrics) + " | perplexity |", "|---|---|" + "---|" * (len(metrics) + 1)]
    for run in results["runs"]:
        for point in run["curve"]:
            cells = [f"{point['metrics'][m]:.1f}" if m in point["metrics"] else "–" for m in metrics]
            cells.append(f"{point['general']['perplexity']:.2f}" if "perplexity" in point.get("general", {}) else "–")
            edits = f"{point['edits']} (sample of {point['sample']})" if point.get("sample") else point["edits"]
            lines.append(f"| {_name(run)} | {edits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(results: dict) -> str:
    """Seconds per round by phase: medians, which a round paused beside other work does not move."""
    # "values": the value optimisation (NSE, MEMIT, AlphaEdit) or UltraEdit's feature pass ("features").
    lines = ["| method | rounds | median s/round | values / features | keys | solve | scoring |",
             "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        seconds = run["round_seconds"]
        if not seconds:
            continue

        def median(key: str, seconds: list = seconds) -> float:
            return statistics.median(s.get(key, 0.0) for s in seconds)

        work = median("values") + median("features")
        lines.append(f"| {_name(run)} | {len(seconds)} | {median('total'):.1f} | {work:.1f} | "
                     f"{median('keys'):.1f} | {median('solve'):.2f} | {median('scoring'):.1f} |")
    return "\n".join(lines)


def keep_earlier_results(path: Path, base: Evaluation | None, runs: list[SequentialRun],
                         settings: dict) -> tuple[Evaluation | None, list[SequentialRun]]:
    """What an earlier ``results.json`` at ``path`` holds that the saved state no longer does.

    Runs whose saved state is gone (``~/.cache`` does not survive every change of machine) stay in the results:
    they are returned, and their settings are copied into ``settings``. The unedited evaluation is kept where
    the state has none and it was measured with this run's protocol (:func:`earlier_base`).
    """
    if not path.is_file():
        return base, []
    earlier = json.loads(path.read_text())
    names = {run.name for run in runs}
    kept = [run for run in map(SequentialRun.from_dict, earlier["runs"]) if run.name not in names]
    for run in kept:
        key = f"config_{run.name}"
        if key in earlier["settings"]:
            settings[key] = earlier["settings"][key]
    if kept:
        print(f"kept from {path}: {', '.join(run.name for run in kept)} (their saved state is gone)")
    if base is None and (reused := _same_protocol_base(earlier, settings)):
        base = Evaluation(**reused)
    return base, kept


#: The settings an unedited evaluation depends on: an earlier results.json's base is reused when they match.
BASE_SETTINGS = ("model", "data", "edits", "options", "suite_examples")


def earlier_base(path: Path, settings: dict) -> dict | None:
    """The unedited evaluation an earlier ``results.json`` at ``path`` holds, if it was measured as this run's
    would be (the same :data:`BASE_SETTINGS`): a run whose saved state is gone need not make it again (on a CPU
    it takes as long as several rounds)."""
    if not path.is_file():
        return None
    return _same_protocol_base(json.loads(path.read_text()), settings)


def _same_protocol_base(earlier: dict, settings: dict) -> dict | None:
    """The unedited evaluation of the results ``earlier``, if measured with the protocol of ``settings``."""
    return earlier.get("base") if _protocol(earlier["settings"]) == _protocol(settings) else None


def _protocol(settings: dict) -> dict:
    """The :data:`BASE_SETTINGS` of ``settings``, the data file by name (its folder differs between checkouts)."""
    return {key: Path(settings[key]).name if key == "data" else settings.get(key) for key in BASE_SETTINGS}


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
    parser.add_argument("--methods", nargs="+", default=["nse", "memit_seq"])
    parser.add_argument("--running-every", type=int, default=1, help="rounds between running evaluations")
    parser.add_argument("--running-sample", type=int,
                        help="evaluate the running protocol on a fixed random sample of this many edits so far")
    parser.add_argument("--probes", choices=("all", "rewrite"), default="all",
                        help="what each round's own report scores (rewrite: efficacy only, for long runs)")
    parser.add_argument("--suite", type=Path, default=SHARED / "glue_eval" / "dataset")
    parser.add_argument("--suite-examples", type=int, default=100)
    parser.add_argument("--fluency-records", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                        help="a hyperparameter on top of the preset, for every method (value read as JSON)")
    parser.add_argument("--device")
    parser.add_argument("--name", help="results folder name (default sequential-<edits>x<batch>)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<name>)")
    parser.add_argument("--state", type=Path, help="where sessions are saved after every round (resumable)")
    parser.add_argument("--values", type=Path,
                        help="the value store (default <state>/values): a folder that outlives the machine, e.g. in "
                             "the repository, lets a run whose --state was lost replay its rounds from it")
    parser.add_argument("--label", help="one method with other settings (--set): the run's folder and name "
                                        "(default: the method)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="UltraEdit (StableEdit's warm-up): feed the running statistics with this many "
                             "counterfact-train records before the first round")
    parser.add_argument("--values-ahead", nargs="?", const="first-last", choices=("first-last", "last-first"),
                        help="only compute and store the NSE-family value targets of the run's rounds that are "
                             "missing and not claimed by another process, from the first on (default) or from the "
                             "last back, editing nothing")
    parser.add_argument("--compare", type=Path, nargs="+", default=[], metavar="RESULTS_JSON",
                        help="also draw the runs of other results.json files in curves.png (e.g. shorter runs)")
    parser.add_argument("--report-only", action="store_true",
                        help="write results.json, curves.png and the tables from the saved state, editing nothing")
    args = parser.parse_args()
    # A run takes hours: its log shows each round as it ends (and the value helpers' rounds).
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nse_hub.sequential").setLevel(logging.INFO)
    if args.label and len(args.methods) != 1:
        parser.error("--label names the run of one method: give one --methods")
    name = args.name or f"sequential-{args.edits}x{args.batch}"
    out = args.out or Path(__file__).parent / "results" / name
    state = args.state or cache_dir() / "runs" / name
    requests = load_requests(args.data, limit=args.edits)
    options = EvalOptions(fluency_records=args.fluency_records)
    suite = args.suite if args.suite.is_dir() else None
    settings = {"model": args.model, "data": str(args.data), "edits": args.edits, "batch": args.batch,
                "running_every": args.running_every, "running_sample": args.running_sample,
                "probes": args.probes, "suite_examples": args.suite_examples,
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
                "hparams": dict(args.set)}

    base_file = state / "base.json"
    values = ValueStore(args.values or state / "values")
    if args.values_ahead:
        session = resume_session(args.model, None, method=args.methods[0], device=args.device, **dict(args.set))
        run_file = state / (args.label or args.methods[0]) / RUN_FILE  # the run's rounds so far need no values
        made = len(json.loads(run_file.read_text())["round_seconds"]) if run_file.is_file() else 0
        order = range(made, len(schedule_rounds(requests, args.batch)))
        computed = precompute_values(session, requests, args.batch, values,
                                     rounds=reversed(order) if args.values_ahead == "last-first" else order)
        print(f"computed the value targets of {computed} rounds")
        return
    if not args.report_only:
        for method in args.methods:
            folder = state / (args.label or method)
            session = resume_session(args.model, folder, method=method, device=args.device, **dict(args.set))
            if args.warmup and not session.rounds:
                held_out = load_requests(args.data.with_name("counterfact-train.json"), limit=args.warmup)
                print(f"warm-up: {session.warm_up(held_out)} features", flush=True)
            run = run_sequential(session, requests, args.batch, running_every=args.running_every,
                                 running_sample_size=args.running_sample, options=options, suite=suite,
                                 suite_examples=args.suite_examples, probes=args.probes, state_dir=folder,
                                 values=values, label=args.label)
            print(f"{run.name}: final {run.final.metrics if run.final else None}", flush=True)
            del session
        if not base_file.is_file() and (reused := earlier_base(out / "results.json", settings)):
            atomic_write_json(base_file, reused)
            print(f"the unedited evaluation of {out / 'results.json'} was measured with the same settings: reused")
        if not base_file.is_file():
            session = resume_session(args.model, None, device=args.device)
            parts = state / "base-parts"  # hours for 10,000 edits on a CPU: continues where it stopped
            atomic_write_json(base_file, evaluate_session(session, requests, options=options, suite=suite,
                                                          suite_examples=args.suite_examples, parts=parts).to_dict())
            shutil.rmtree(parts, ignore_errors=True)
            del session

    runs = []
    for folder in sorted(p.parent for p in state.glob(f"*/{RUN_FILE}")):  # every run, whichever process made it
        runs.append(SequentialRun.from_dict(json.loads((folder / RUN_FILE).read_text())))
        if is_checkpoint(folder / SESSION_DIR):
            settings[f"config_{folder.name}"] = read_meta(folder / SESSION_DIR).config.to_dict()
    base = Evaluation(**json.loads(base_file.read_text())) if base_file.is_file() else None
    base, kept = keep_earlier_results(out / "results.json", base, runs, settings)
    runs += kept
    write_results(out / "results.json", base, runs, settings)
    labels = [run.name.upper() for run in runs]
    for path in args.compare:
        for data in json.loads(path.read_text())["runs"]:
            runs.append(SequentialRun.from_dict(data))
            labels.append(f"{runs[-1].name.upper()} ({path.parent.name})")
    if any(run.curve for run in runs):
        plot_curves(runs, out / "curves.png", base, labels=labels)
    results = json.loads((out / "results.json").read_text())
    if results["base"]:
        print(final_table(results))
    print()
    print(curve_table(results))
    print()
    print(speed_table(results))


if __name__ == "__main__":
    main()
