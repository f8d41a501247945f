"""Exact edits in low precision: NSE edits on SmolLM2 in float32 and in bfloat16, merged or not.

One session per process (run them one after the other): N CounterFact edits in rounds of B made in ``--dtype``,
saved after every round under ``--state`` (default ``~/.cache/nse-hub/runs/bf16-<dtype>-<N>x<B>``: the same command
continues an interrupted run),
then the final-protocol edit metrics (teacher-forced ES/PS/NS) of the session as it runs (in bfloat16: deltas
applied unmerged, in float32). ``--apply-in bfloat16`` also loads the base in bfloat16, applies the session's
deltas to it unmerged (as the session and peft do) and naively merged (``round(W0 + ΔW)``), and measures both:
the difference between the two is what rounding the edit into bf16 weights costs. Also what that rounding loses
of the deltas, per edit layer and in all (see :func:`rounding_loss`). Writes ``<out>/<dtype>-<N>x<B>.json`` and
prints the table of benchmarks/README.md from every result in ``<out>``.

    OMP_NUM_THREADS=1 python benchmarks/bf16.py --dtype float32 --apply-in bfloat16
    OMP_NUM_THREADS=1 python benchmarks/bf16.py --dtype bfloat16      # where bf16 is fast (a GPU; see README)
    OMP_NUM_THREADS=1 python benchmarks/bf16.py --dtype bfloat16 --values-ahead   # a helper beside it (NSE's values)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nse_hub import EditSession, load_requests
from nse_hub.base import dtype_name
from nse_hub.checkpoint import is_checkpoint
from nse_hub.deltas import WeightDeltas
from nse_hub.evaluation import EvalOptions, measure_requests
from nse_hub.io import atomic_write_json
from nse_hub.loading import load_base_model
from nse_hub.models import cache_dir
from nse_hub.plan import plan_dtype
from nse_hub.requests import EditRequest
from nse_hub.sequential import ValueStore

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METRICS = (("efficacy", "ES"), ("generalization", "PS"), ("specificity", "NS"), ("score", "S"))


def rounding_loss(deltas: WeightDeltas, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """What rounding ``W0 + ΔW`` to ``dtype`` would lose of the deltas.

    Per edit layer ``l`` (and over all of them, norms summed in squares): ``lost = ‖round(W0 + ΔW) − W0 − ΔW‖_F /
    ‖ΔW‖_F``, everything but the rounding in float64, with ``W0`` the weights as loaded (in ``dtype`` they are
    exact), and ``vanished``: the fraction of ΔW's entries that rounding drops entirely
    (``round(W0 + ΔW) == W0``). ``lost_each_round``: the same loss when every round is merged as it is made,
    ``W_r = round(W_{r-1} + ΔW_r)`` (what a session that merges into bf16 weights does), against ``Σ_r ΔW_r``.
    """
    out: dict[str, float] = {}
    lost_sq = delta_sq = vanished = entries = each_sq = 0.0
    for layer in deltas.layers:
        total = deltas.cumulative(layer)
        if total is None:  # a layer no round changed
            continue
        w0 = deltas.originals[layer].to(dtype).double()
        delta = deltas.layout.to_stored_layout(total.dense()).double()
        merged = (w0 + delta).to(dtype).double()
        lost, norm = float((merged - w0 - delta).square().sum()), float(delta.square().sum())
        gone = float(((merged == w0) & (delta != 0)).sum())
        weight = w0
        for factors in (r[layer] for r in deltas.rounds if layer in r):
            weight = (weight + deltas.layout.to_stored_layout(factors.dense()).double()).to(dtype).double()
        each = float((weight - w0 - delta).square().sum())
        out[f"lost_layer_{layer}"] = (lost / norm) ** 0.5 if norm else 0.0
        out[f"lost_each_round_layer_{layer}"] = (each / norm) ** 0.5 if norm else 0.0
        out[f"vanished_layer_{layer}"] = gone / max(1.0, float((delta != 0).sum()))
        lost_sq, delta_sq, each_sq = lost_sq + lost, delta_sq + norm, each_sq + each
        vanished, entries = vanished + gone, entries + float((delta != 0).sum())
    out["lost"] = (lost_sq / delta_sq) ** 0.5 if delta_sq else 0.0
    out["lost_each_round"] = (each_sq / delta_sq) ** 0.5 if delta_sq else 0.0
    out["vanished"] = vanished / max(1.0, entries)
    return out


def saved_rounding_loss(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """:func:`rounding_loss` of a saved edit (any method, any number of rounds), loading nothing but its deltas."""
    session = EditSession.from_pretrained(str(folder), device="cpu")
    return {"saved": str(folder), "method": session.config.method, "rounds": len(session.rounds),
            "edits": sum(len(r.requests) for r in session.rounds), "dtype": dtype_name(dtype),
            "rounding_loss": rounding_loss(session.deltas, dtype)}


def apply_in(session: EditSession, dtype: torch.dtype, requests: list[EditRequest], options: EvalOptions
             ) -> dict[str, Any]:
    """The session's deltas on its base loaded in ``dtype``: edit metrics unmerged (float32 deltas, as the session
    and peft apply them there) and naively merged (``round(W0 + ΔW)``), and what that rounding loses."""
    model, _ = load_base_model(session.base.name_or_path, device=session.device, dtype=dtype)
    deltas = WeightDeltas(model, session.layout, session.config.layers)
    for factors in session.deltas.rounds:
        deltas.append_round(factors)
    out: dict[str, Any] = {"rounding_loss": rounding_loss(deltas, dtype)}
    out["metrics_unmerged"] = measure_requests(model, session.tokenizer, session.layout, requests, options)
    with deltas.original():  # hooks off; the weights merged and rounded
        for layer in session.config.layers:
            session.layout.projection(model, layer).weight.data = deltas.edited_weight(layer)
        out["metrics_naive_merge"] = measure_requests(model, session.tokenizer, session.layout, requests, options)
    return out


def table(out: Path) -> str:
    lines = ["| edits made in | applied in | how | " + " | ".join(label for _, label in METRICS)
             + " | ‖ΔW‖ lost to rounding into the weights |", "|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for file in sorted(out.glob("*.json")):
        result = json.loads(file.read_text())
        made = result["dtype"]

        def row(applied: str, how: str, metrics: dict, lost: str, made: str = made) -> str:
            return (f"| {made} | {applied} | {how} | " + " | ".join(f"{metrics[key]:.1f}" if key in metrics else "–"
                                                                    for key, _ in METRICS) + f" | {lost} |")

        lines.append(row(made, "session", result["metrics"], "–" if made == "float32" else
                         f"{result['rounding_loss']['lost']:.1%}"))
        for applied, part in result.get("applied", {}).items():
            lost = f"{part['rounding_loss']['lost']:.1%}"
            lines.append(row(applied, "unmerged, float32 deltas", part["metrics_unmerged"], lost))
            lines.append(row(applied, "naive merge round(W0 + ΔW)", part["metrics_naive_merge"], lost))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", help="precision of the edit session: float32, bfloat16 (bf16) "
                                                          "or float16 (fp16)")
    parser.add_argument("--apply-in", nargs="*", default=[], metavar="DTYPE",
                        help="also apply the session's deltas to the base loaded in these precisions")
    parser.add_argument("--apply-probes", choices=("all", "rewrite"), default="all",
                        help="prompts measured when applying: all (ES/PS/NS) or the rewrite prompts only (ES)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=SHARED / "counterfact_easyedit" / "counterfact-edit.json")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--state", type=Path, help="where the session is saved after every round (resumable)")
    parser.add_argument("--values-ahead", action="store_true",
                        help="only compute and store the rounds' value targets, last round first (a helper process "
                             "beside the run: NSE's targets do not depend on earlier rounds)")
    parser.add_argument("--saved", type=Path, nargs="+", metavar="FOLDER",
                        help="only report what rounding into --dtype weights would lose of these saved edits' deltas")
    args = parser.parse_args()
    if args.saved:
        dtype = plan_dtype(args.dtype if args.dtype != "float32" else "bfloat16")
        for folder in args.saved:
            print(json.dumps(saved_rounding_loss(folder, dtype)), flush=True)
        return
    dtype = plan_dtype(args.dtype) or torch.float32
    name = dtype_name(dtype)
    requests = load_requests(args.data, limit=args.edits)
    options = EvalOptions(generation=False)

    state = args.state or cache_dir() / "runs" / f"bf16-{name}-{len(requests)}x{args.batch}"
    values = ValueStore(state.with_name(state.name + "-values"))
    batches = [requests[start:start + args.batch] for start in range(0, len(requests), args.batch)]
    if is_checkpoint(state) and not args.values_ahead:
        session = EditSession.from_pretrained(str(state), device=args.device)
        print(f"{name}: continuing after round {len(session.rounds)} from {state}", flush=True)
    else:
        session = EditSession.from_pretrained(args.model, "nse", device=args.device, dtype=dtype)
    if args.values_ahead:
        for index in reversed(range(len(batches))):
            if values.compute_unclaimed(session, batches[index]):  # neither stored nor being computed
                print(f"{name}: values of round {index + 1} stored", flush=True)
        return
    for batch in batches[len(session.rounds):]:
        tic = time.perf_counter()
        given = values.compute(session, batch)  # computed here, or read: a helper computed them ahead
        report = session.edit(batch, progress=False, values=given)
        report.seconds.update(values=round(time.perf_counter() - tic - report.seconds["total"], 3),
                              total=round(time.perf_counter() - tic, 3))
        session.save_pretrained(state)
        print(f"{name}: round {report.round} {report.seconds['total']:.0f} s", flush=True)
    rounds = [report.seconds for report in session.rounds]
    result: dict[str, Any] = {
        "dtype": name, "model": args.model, "edits": len(requests), "batch": args.batch,
        "unmerged": session.deltas.unmerged, "seconds_edit": round(sum(r["total"] for r in rounds), 1),
        "round_seconds": rounds, "torch": torch.__version__,
        "machine": (torch.cuda.get_device_name() if session.device.type == "cuda" else
                    f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), measured beside other work"),
        "metrics": measure_requests(session.model, session.tokenizer, session.layout, requests, options)}
    if dtype != torch.float32:
        result["rounding_loss"] = rounding_loss(session.deltas, dtype)
    probes = requests if args.apply_probes == "all" else \
        [dataclasses.replace(r, paraphrases=(), neighbors=()) for r in requests]
    result["applied"] = {}
    for other in args.apply_in:
        other_dtype = plan_dtype(other) or torch.float32
        tic = time.perf_counter()
        result["applied"][dtype_name(other_dtype)] = {**apply_in(session, other_dtype, probes, options),
                                                      "probes": args.apply_probes,
                                                      "seconds": round(time.perf_counter() - tic, 1)}
        print(f"applied in {other}: {time.perf_counter() - tic:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{name}-{len(requests)}x{args.batch}.json", result)
    print(table(args.out))


if __name__ == "__main__":
    main()
