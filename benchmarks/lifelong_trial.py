"""One tuning trial of a lifelong method: N CounterFact edits in rounds of B on SmolLM2, then the running protocol.

The trials of benchmarks/README.md, "Lifelong methods: tuning trials". Every edit so far is evaluated once at the
end (teacher-forced ES/PS/NS and generation-based ES/PS, as ``evaluate_session(protocol="running")``) and the
perplexity of the suite's held-out texts is measured; one JSON file per trial goes to ``--out``.

To keep trials short on a CPU, the per-round report inside ``session.edit`` scores only the rewrite prompts
(the session's own before/after scoring of paraphrases and neighbours is skipped; the final evaluation is the
full one). NSE's value targets are computed on the original weights, so NSE-family trials (``nse``, ``nse_null``)
can take them from a value store (``--values``: a folder, e.g. the 10,000-edit run's
``~/.cache/nse-hub/runs/counterfact-10000x100/values``), computing and storing only the missing rounds: trials of
solve settings (null space threshold, L2, neuron threshold) then time only the keys and the solves. The rounds are
those of ``benchmarks/sequential.py`` (``schedule_rounds``), so the stores are interchangeable. AlphaEdit and MEMIT
optimise their targets on the current weights: for them ``--values`` is a replay log (``ValueStore``), so that a
long trial whose ``--state`` did not survive a change of machine re-solves its rounds from their stored targets
(keys and solves only) and goes on from there.

    OMP_NUM_THREADS=1 python benchmarks/lifelong_trial.py ue-preset-200 --edits 200
    OMP_NUM_THREADS=1 python benchmarks/lifelong_trial.py ue-stable-200 --edits 200 --warmup 300 \\
        --hp '{"ultraedit_ridge": 10, "ultraedit_whitening": "full"}'
    OMP_NUM_THREADS=1 python benchmarks/lifelong_trial.py nn-l2-1-1000 --edits 1000 --method nse_null \\
        --hp '{"L2": 1}' --values ~/.cache/nse-hub/runs/counterfact-10000x100/values
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nse_hub import RoundReport, load_requests
from nse_hub.ability import perplexity, perplexity_texts
from nse_hub.evaluation import evaluate_session
from nse_hub.io import atomic_write_json
from nse_hub.sequential import SESSION_DIR, ValueStore, precompute_values, resume_session, schedule_rounds

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HERE = Path(__file__).resolve().parent
UNFINISHED = {"metrics": {}, "perplexity": None, "eval_seconds": None, "partial": True}  # a trial's JSON mid-way


def z_layer_reach(report: RoundReport) -> dict[str, float]:
    """Whether a round's misses are edits the solve did not write or edits written that do not take.

    ``residual``: the mean share of the z-layer residual left after the round (``missed_residual``,
    ``hit_residual``: the same over the requests that fail and that succeed right after it); ``missed_written``: of
    the requests that fail, the share whose residual fell below a quarter of its start (the z-layer output reached
    its target, the answer did not follow); ``residual_before``: the mean residual norm before the round;
    ``edited_per_pass``: how many requests each update pass wrote (``retry_failed``'s passes last).
    """
    requests = [r for r in report.requests if r.residual_before > 0]
    share = [r.residual_after / r.residual_before for r in requests]
    missed = [s for r, s in zip(requests, share) if r.success() is False]
    hit = [s for r, s in zip(requests, share) if r.success() is True]

    def mean(values: list[float]) -> float:
        return round(sum(values) / max(1, len(values)), 3)

    return {"residual": mean(share), "missed": len(missed), "missed_residual": mean(missed),
            "hit_residual": mean(hit), "missed_written": mean([float(s < 0.25) for s in missed]),
            "residual_before": mean([r.residual_before for r in requests]),
            "edited_per_pass": [sum(edited) for edited in zip(*(r.edited_in_passes for r in report.requests))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the trial's name (its JSON file)")
    parser.add_argument("--method", default="ultraedit")
    parser.add_argument("--hp", default="{}", help="hyperparameters as JSON, over the method's preset")
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--base", action="store_true", help="evaluate the unedited model")
    parser.add_argument("--warmup", type=int, default=0,
                        help="UltraEdit: warm up the running statistics on this many counterfact-train records")
    parser.add_argument("--values", type=Path,
                        help="a value store folder to read and fill (NSE family: shared targets; other methods: a "
                             "replay log, so a trial whose --state was lost re-solves its rounds from it)")
    parser.add_argument("--values-ahead", action="store_true",
                        help="with --values: only fill the store, last round first (a helper beside the trial)")
    parser.add_argument("--no-eval", action="store_true", help="only the perplexity after the edits")
    parser.add_argument("--eval-at", type=int, nargs="*", default=[],
                        help="also evaluate (running protocol on the edits so far, perplexity) after these many edits; "
                             "each point is saved as soon as it is measured")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lifelong-tuning")
    parser.add_argument("--state", type=Path,
                        help="save the session here after every round and continue from it (a trial in parts)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hparams = json.loads(args.hp)
    requests = load_requests(SHARED / "counterfact_easyedit" / "counterfact-edit.json", limit=args.edits)
    started = time.perf_counter()
    session = resume_session("smollm2-135m", args.state, method=args.method, **hparams)
    if args.warmup and not session.rounds:
        held_out = load_requests(SHARED / "counterfact_easyedit" / "counterfact-train.json", limit=args.warmup)
        print("warm-up features", session.warm_up(held_out), flush=True)
    store = ValueStore(args.values) if args.values else None
    if args.values_ahead:
        if store is None:
            parser.error("--values-ahead needs --values")
        last_first = reversed(range(len(schedule_rounds(requests, args.batch))))
        print("rounds computed", precompute_values(session, requests, args.batch, store, last_first))
        return
    seconds, written, reached, points, sources = [], [], [], [], []
    texts = perplexity_texts(SHARED / "glue_eval" / "dataset")

    def measure(edited: list, evaluate: bool = True) -> dict:
        evaluation = evaluate_session(session, edited, protocol="running", record=False) if evaluate else None
        return {"edits": len(edited), "metrics": evaluation.metrics if evaluation else {},
                "perplexity": perplexity(session.model, session.tokenizer, session.layout, texts),
                "eval_seconds": evaluation.seconds if evaluation else None}

    def save(final: dict) -> dict:
        result = {"name": args.name, "method": args.method, "hparams": hparams, "config": session.config.to_dict(),
                  "edits": args.edits, "batch": args.batch, "round_seconds": seconds,
                  "round_efficacy": written, "round_reach": reached, "round_values": sources, **final,
                  "points": points,
                  "total_seconds": round(time.perf_counter() - started, 1), "command": " ".join(sys.argv)}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / f"{args.name}.json", result)
        return result

    schedule = [] if args.base else schedule_rounds(requests, args.batch)
    edited = [request for batch in schedule[:len(session.rounds)] for request in batch]
    if session.rounds:  # resumed: the trial's JSON holds the rounds so far
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        seconds, written, reached = (saved[key][:len(session.rounds)] for key in
                                     ("round_seconds", "round_efficacy", "round_reach"))
        sources = saved.get("round_values", [None] * len(seconds))[:len(session.rounds)]  # None: not recorded
        points = [point for point in saved["points"] if point["edits"] <= len(edited)]
        started -= saved["total_seconds"]  # the earlier parts' time counts too
        if store:
            print("rounds added to the value log", store.record(session), flush=True)
    for batch in schedule[len(session.rounds):]:
        tic = time.perf_counter()
        # "stored": the targets were in --values (a replayed round, or NSE's computed ahead): no value step timed
        values = store.load(session, batch) if store else None
        sources.append("stored" if values is not None else "computed" if session.config.computes_values else "none")
        if values is None and store:
            values = store.compute(session, batch)
        report = session.edit(batch, progress=False, probes="rewrite", values=values)
        seconds.append(round(time.perf_counter() - tic, 1))
        written.append(round(report.metrics()["efficacy"], 1))  # the round's own edits, right after it
        reached.append(z_layer_reach(report))
        print("round", len(seconds), seconds[-1], "ES", written[-1], "reach", reached[-1], flush=True)
        edited.extend(batch)
        if args.state:
            session.save_pretrained(args.state / SESSION_DIR)
            save(UNFINISHED)
        if any(len(edited) >= at > len(edited) - len(batch) for at in args.eval_at) and len(edited) < len(requests):
            points.append(measure(edited))
            print("point", json.dumps(points[-1]), flush=True)
            save(UNFINISHED)
    final = measure(requests, evaluate=not args.no_eval)
    result = save({"metrics": final["metrics"], "perplexity": final["perplexity"],
                   "eval_seconds": final["eval_seconds"]})
    print(json.dumps({k: result[k] for k in ("name", "metrics", "perplexity", "round_seconds")}))


if __name__ == "__main__":
    main()
