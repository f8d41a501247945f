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


def phase_root(args, work: Path, common: list) -> None:
    if (work / "root").is_dir():
        return
    print("round-1 (shared)", flush=True)
    session = EditSession.from_pretrained(args.model, device=args.device)
    session.edit(common, progress=False)  # includes the one-time statistics pass
    session.save_pretrained(work / "root")


def phase_linear(args, work: Path, edits_a: list, edits_b: list, options: EvalOptions) -> None:
    """Branch A from round-1, then B's rounds on top of it: the linear history."""
    session = EditSession.from_pretrained(str(work / "root"), device=args.device)
    print("branch A", flush=True)
    seconds_a = rounds(session, edits_a, args.batch)
    session.save_pretrained(work / "branch-a")
    part = {"branch_a": {"edits": figures(session, edits_a, options), "seconds": round(seconds_a, 1),
                         "rounds": len(session.rounds)}}
    print("B's rounds on top of A: the linear history", flush=True)
    seconds_b_on_a = rounds(session, edits_b, args.batch)
    session.save_pretrained(work / "linear")
    part["linear"] = {"edits": figures(session, edits_a + edits_b, options),
                      "seconds_b_rounds": round(seconds_b_on_a, 1), "rounds": len(session.rounds)}
    (work / "linear.json").write_text(json.dumps(part, indent=2))


def phase_branch_b(args, work: Path, edits_b: list, options: EvalOptions) -> None:
    print("branch B from round-1", flush=True)
    session = EditSession.from_pretrained(str(work / "root"), revision=None, round=1, device=args.device)
    seconds_b = rounds(session, edits_b, args.batch)
    session.save_pretrained(work / "branch-b")
    part = {"branch_b": {"edits": figures(session, edits_b, options), "seconds": round(seconds_b, 1),
                         "rounds": len(session.rounds)}}
    (work / "branch-b.json").write_text(json.dumps(part, indent=2))


def phase_merge(args, work: Path, requests: list, edits_a: list, edits_b: list, options: EvalOptions) -> dict:
    print("merge B into A", flush=True)
    merged = EditSession.from_pretrained(str(work / "branch-a"), device=args.device)
    merged.prepare(progress=False)  # statistics and templates load once per session, as in B's own run
    tic = time.perf_counter()
    plan = merged.merge_history(read_version(str(work / "branch-b"), values=True))
    merge_seconds = time.perf_counter() - tic
    merged.save_pretrained(work / "merged")
    linear = EditSession.from_pretrained(str(work / "linear"), device=args.device)
    gap = 0.0
    with torch.no_grad():
        for r in edits_b[:8]:
            ids = linear.tokenizer(r.text, return_tensors="pt").input_ids.to(linear.device)
            gap = max(gap, (merged.model(input_ids=ids).logits - linear.model(input_ids=ids).logits).abs().max().item())
    result = {**json.loads((work / "linear.json").read_text()), **json.loads((work / "branch-b.json").read_text())}
    result["linear"]["all_with_round_1"] = figures(linear, requests, options)
    result["merged"] = {"edits": figures(merged, edits_a + edits_b, options),
                        "all_with_round_1": figures(merged, requests, options),
                        "seconds": round(merge_seconds, 1), "plan": plan.to_dict(), "rounds": len(merged.rounds),
                        "max_logit_gap_vs_linear": gap}
    result["merge_speedup_vs_rerunning_b_on_a"] = round(result["linear"]["seconds_b_rounds"] / merge_seconds, 2)
    result["merge_speedup_vs_b_own_rounds"] = round(result["branch_b"]["seconds"] / merge_seconds, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--common", type=int, default=10, help="edits of the shared round-1")
    parser.add_argument("--branch", type=int, default=50, help="edits per branch")
    parser.add_argument("--batch", type=int, default=25, help="edits per round on the branches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--phase", choices=["all", "root", "linear", "branch-b", "merge"], default="all",
                        help="run one phase (root first; linear and branch-b may run in parallel; merge last)")
    parser.add_argument("--work", help="folder for the saved edits and partial results (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "history-merge.json"))
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="history-merge-"))
    requests = load_requests(args.data, limit=args.common + 2 * args.branch)
    common, edits_a, edits_b = (requests[:args.common], requests[args.common:args.common + args.branch],
                                requests[args.common + args.branch:])
    options = EvalOptions(generation=False)
    if args.phase in ("all", "root"):
        phase_root(args, work, common)
    if args.phase in ("all", "linear"):
        phase_linear(args, work, edits_a, edits_b, options)
    if args.phase in ("all", "branch-b"):
        phase_branch_b(args, work, edits_b, options)
    if args.phase not in ("all", "merge"):
        return
    result = phase_merge(args, work, requests, edits_a, edits_b, options)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "phase"},
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, shared with other jobs "
                         "(timings are indicative)", **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    m, lin, a, b = result["merged"], result["linear"], result["branch_a"], result["branch_b"]
    rows = [("merged (B merged into A)", 2 * args.branch, m["edits"], f"{m['seconds']:.0f} s (merge)"),
            ("linear (round-1, A, B)", 2 * args.branch, lin["edits"],
             f"{lin['seconds_b_rounds']:.0f} s (B's rounds on A)"),
            ("branch A alone", args.branch, a["edits"], f"{a['seconds']:.0f} s"),
            ("branch B alone", args.branch, b["edits"], f"{b['seconds']:.0f} s")]
    print("| version | edits | ES | PS | NS | time |\n|---|---|---|---|---|---|")
    for name, n, f, t in rows:
        print(f"| {name} | {n} | {f.get('efficacy')} | {f.get('generalization')} | {f.get('specificity')} | {t} |")
    print(f"wrote {args.out}; saved edits in {work}")


if __name__ == "__main__":
    main()
