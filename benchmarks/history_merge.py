"""Merging two branches of an edit history vs the same edits in one linear history (issue 11, "Measure").

From a shared round-1 (``--common`` edits), branch A and branch B each write ``--branch`` CounterFact edits
in rounds of ``--batch``. Measured, final protocol (teacher-forced ES/PS/NS ×100, every edit once after the
last round):

* **merged**: branch B merged into branch A with :meth:`EditSession.merge_history` (NSE: B's stored value
  targets reused, only the solves run again), on all ``2 × --branch`` branch edits;
* **linear**: round-1, A's rounds, then B's rounds in one history (what re-running B on top of A costs);
* **A alone**, **B alone**: each branch on its own edits.

Timings: the merge (re-applying B's rounds with stored values) against re-running B's rounds from their
requests (values optimised again) on top of A, and B's own rounds. Run::

    python benchmarks/history_merge.py --out benchmarks/results/history-merge.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from nse_hub import EditSession, load_requests
from nse_hub.evaluation import EvalOptions, evaluate_session
from nse_hub.history import read_version

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"


def rounds(session: EditSession, requests: list, batch: int) -> float:
    """Edit ``requests`` in rounds of ``batch``; returns the seconds taken."""
    tic = time.perf_counter()
    for start in range(0, len(requests), batch):
        report = session.edit(requests[start:start + batch], progress=False)
        print(f"  round {report.round}: {len(report.requests)} edits, {report.seconds['total']:.1f} s", flush=True)
    return time.perf_counter() - tic


def figures(session: EditSession, requests: list, options: EvalOptions) -> dict[str, float]:
    metrics = evaluate_session(session, requests, options=options, record=False).metrics
    return {key: round(metrics[key], 1) for key in ("efficacy", "generalization", "specificity") if key in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--common", type=int, default=10, help="edits of the shared round-1")
    parser.add_argument("--branch", type=int, default=50, help="edits per branch")
    parser.add_argument("--batch", type=int, default=25, help="edits per round on the branches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="folder for the saved edits (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "history-merge.json"))
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="history-merge-"))
    requests = load_requests(args.data, limit=args.common + 2 * args.branch)
    common, edits_a, edits_b = (requests[:args.common], requests[args.common:args.common + args.branch],
                                requests[args.common + args.branch:])
    options = EvalOptions(generation=False)
    result: dict = {"settings": vars(args), "machine": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads, shared with other jobs (timings are indicative)"}

    print("round-1 (shared)", flush=True)
    session = EditSession.from_pretrained(args.model, device=args.device)
    session.edit(common, progress=False)  # includes the one-time statistics pass
    session.save_pretrained(work / "root")

    print("branch A, then B on top of it: the linear history", flush=True)
    seconds_a = rounds(session, edits_a, args.batch)
    session.save_pretrained(work / "linear")  # rounds 1..k of A: branch A is its version k
    branch_a = len(session.rounds)
    result["branch_a"] = {"edits": figures(session, edits_a, options), "seconds": round(seconds_a, 1)}
    seconds_b_on_a = rounds(session, edits_b, args.batch)
    session.save_pretrained(work / "linear")
    result["linear"] = {"edits": figures(session, edits_a + edits_b, options),
                        "all_with_round_1": figures(session, requests, options),
                        "seconds_b_rounds": round(seconds_b_on_a, 1), "rounds": len(session.rounds)}
    linear = session

    print("branch B from round-1", flush=True)
    session_b = EditSession.from_pretrained(str(work / "root"), revision=None, round=1, device=args.device)
    seconds_b = rounds(session_b, edits_b, args.batch)
    session_b.save_pretrained(work / "branch-b")
    result["branch_b"] = {"edits": figures(session_b, edits_b, options), "seconds": round(seconds_b, 1)}
    del session_b

    print("merge B into A", flush=True)
    merged = EditSession.from_pretrained(str(work / "linear"), round=branch_a, device=args.device)
    merged._prepare(progress=False)  # statistics and templates are loaded once per session, as for B's run
    tic = time.perf_counter()
    theirs = read_version(str(work / "branch-b"), values=True)
    plan = merged.merge_history(theirs)
    merge_seconds = time.perf_counter() - tic
    merged.save_pretrained(work / "merged")
    gap = 0.0
    with torch.no_grad():
        for r in edits_b[:8]:
            ids = linear.tokenizer(r.text, return_tensors="pt").input_ids.to(linear.device)
            gap = max(gap, (merged.model(input_ids=ids).logits - linear.model(input_ids=ids).logits).abs().max().item())
    result["merged"] = {"edits": figures(merged, edits_a + edits_b, options),
                        "all_with_round_1": figures(merged, requests, options),
                        "seconds": round(merge_seconds, 1), "plan": plan.to_dict(), "rounds": len(merged.rounds),
                        "max_logit_gap_vs_linear": gap}
    result["speedup_vs_rerun_on_a"] = round(seconds_b_on_a / merge_seconds, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    rows = [("merged (B merged into A)", result["merged"]["edits"], f"{merge_seconds:.0f} s (merge)"),
            ("linear (round-1, A, B)", result["linear"]["edits"], f"{seconds_b_on_a:.0f} s (B's rounds on A)"),
            ("branch A alone (its 50)", result["branch_a"]["edits"], f"{seconds_a:.0f} s"),
            ("branch B alone (its 50)", result["branch_b"]["edits"], f"{seconds_b:.0f} s")]
    print("| version | edits | ES | PS | NS | time |\n|---|---|---|---|---|---|")
    for name, f, t in rows:
        n = 2 * args.branch if not name.startswith("branch") else args.branch
        print(f"| {name} | {n} | {f.get('efficacy')} | {f.get('generalization')} | {f.get('specificity')} | {t} |")
    print(f"wrote {args.out}; saved edits in {work}")


if __name__ == "__main__":
    main()
