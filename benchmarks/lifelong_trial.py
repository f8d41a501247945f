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
those of ``benchmarks/sequential.py`` (``schedule_rounds``), so the stores are interchangeable.

    OMP_NUM_THREADS=1 python benchmarks/lifelong_trial.py ue-preset-200 --edits 200
    OMP_NUM_THREADS=1 python benchmarks/lifelong_trial.py ue-stable-200 --edits 200 --warmup 300 \\
        --hp '{"ultraedit_ridge": 10, "ultraedit_whitening": "full"}'
    OMP_NUM_THREADS=1 python benchmarks/lifelong_trial.py nn-l2-1-1000 --edits 1000 --method nse_null \\
        --hp '{"L2": 1}' --values ~/.cache/nse-hub/runs/counterfact-10000x100/values
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from nse_hub import EditSession, RoundReport, load_requests
from nse_hub.ability import perplexity, perplexity_texts
from nse_hub.algorithm.batches import build_key_batch
from nse_hub.algorithm.keys import KeyProbe
from nse_hub.algorithm.rounds import PLAIN_PROMPTS, _mlp_outputs, anchor_values
from nse_hub.algorithm.values import ValueResult
from nse_hub.evaluation import evaluate_session
from nse_hub.requests import EditRequest, fact_key
from nse_hub.sequential import ValueStore, schedule_rounds
from nse_hub.tokens import pad_id

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HERE = Path(__file__).resolve().parent


def z_layer_reach(report: RoundReport) -> dict[str, float]:
    """Whether a round's misses are edits the solve did not write or edits written that do not take.

    ``residual``: the mean share of the z-layer residual left after the round (``missed_residual``,
    ``hit_residual``: the same over the requests that fail and that succeed right after it); ``missed_written``: of
    the requests that fail, the share whose residual fell below a quarter of its start (the z-layer output reached
    its target, the answer did not follow); ``residual_before``: the mean residual norm before the round.
    """
    requests = [r for r in report.requests if r.residual_before > 0]
    share = [r.residual_after / r.residual_before for r in requests]
    missed = [s for r, s in zip(requests, share) if r.success() is False]
    hit = [s for r, s in zip(requests, share) if r.success() is True]

    def mean(values: list[float]) -> float:
        return round(sum(values) / max(1, len(values)), 3)

    return {"residual": mean(share), "missed": len(missed), "missed_residual": mean(missed),
            "hit_residual": mean(hit), "missed_written": mean([float(s < 0.25) for s in missed]),
            "residual_before": mean([r.residual_before for r in requests])}


class Replay:
    """Earlier edits to write again: each round, the ``count`` whose z-layer residual (against the target they were
    written with, NAS-rescaled as the round wrote it) has grown back the most, with their stored value targets.

    NSE's targets are computed on the original weights, so an earlier edit's are still valid; NSE's residual filter
    then leaves out any whose residual is below ``alpha``. A later write of the same fact replaces the earlier one.
    """

    def __init__(self, session: EditSession, count: int) -> None:
        self.session, self.count = session, count
        self.facts: dict[tuple[str, str], tuple[EditRequest, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _probe(self, requests: list[EditRequest]) -> KeyProbe:
        s = self.session
        return KeyProbe(s.model, s.layout, build_key_batch(s.tokenizer, requests, PLAIN_PROMPTS), s.config.layers[0],
                        s.config.z_layer, pad_id(s.tokenizer), s.config.batch_size)

    def add(self, requests: list[EditRequest], values: ValueResult) -> None:
        """Remember a round's new edits with the targets it wrote (call after the round: the NAS anchor is set)."""
        s = self.session
        targets = values.targets
        if s.config.norm_anchor:
            with s.deltas.original():
                mlp = _mlp_outputs(s.model, s.layout, self._probe(requests), s.config.z_layer)
            targets = anchor_values(values, mlp, s.engine.norm_anchor, s.config.norm_anchor_max_ratio)[0]
        saved = values.to_tensors()
        for i, request in enumerate(requests):
            row = {name: tensor[i:i + 1] for name, tensor in saved.items()}
            self.facts[fact_key(request)] = (request, row, targets[i] - values.hidden[i])

    def pick(self, batch: list[EditRequest]) -> tuple[list[EditRequest], list[dict[str, torch.Tensor]], list[float]]:
        """The earlier edits to write with ``batch``, their stored targets, and every candidate's residual share."""
        fresh = {fact_key(r) for r in batch}
        # NAS leaves a request whose value norm is too large unwritten (its target is its own output): never replayed.
        candidates = [item for key, item in self.facts.items() if key not in fresh and float(item[2].norm()) > 0]
        if not candidates or not self.count:
            return [], [], []
        requests = [request for request, _, _ in candidates]
        now = self._probe(requests).read([]).z_out
        shares = []
        for (_, row, wanted), current in zip(candidates, now):
            target = row["hidden"][0] + wanted
            shares.append(float((target - current).norm() / wanted.norm().clamp_min(1e-12)))
        order = sorted(range(len(candidates)), key=lambda i: -shares[i])[: self.count]
        return [requests[i] for i in order], [candidates[i][1] for i in order], shares


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
    parser.add_argument("--values", type=Path, help="NSE family: a value store folder to read and fill")
    parser.add_argument("--replay", type=int, default=0,
                        help="NSE family, with --values: also write again, each round, this many earlier edits whose "
                             "z-layer residual has grown back the most (see Replay)")
    parser.add_argument("--no-eval", action="store_true", help="only the perplexity after the edits")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lifelong-tuning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hparams = json.loads(args.hp)
    requests = load_requests(SHARED / "counterfact_easyedit" / "counterfact-edit.json", limit=args.edits)
    started = time.perf_counter()
    session = EditSession.from_pretrained("smollm2-135m", method=args.method, **hparams)
    if args.warmup:
        held_out = load_requests(SHARED / "counterfact_easyedit" / "counterfact-train.json", limit=args.warmup)
        print("warm-up features", session.warm_up(held_out), flush=True)
    store = ValueStore(args.values) if args.values else None
    if args.replay and not store:
        parser.error("--replay needs --values (the earlier edits' stored targets)")
    replay = Replay(session, args.replay)
    seconds, written, reached, replayed = [], [], [], []
    for batch in [] if args.base else schedule_rounds(requests, args.batch):
        tic = time.perf_counter()
        values = store.compute(session, batch) if store else None
        again, rows, shares = replay.pick(batch) if args.replay else ([], [], [])
        if again:
            joined = {name: torch.cat([values.to_tensors()[name], *[row[name] for row in rows]])
                      for name in rows[0]}
            report = session.edit(batch + again, progress=False, probes="rewrite",
                                  values=ValueResult.from_tensors(joined))
            own = dataclasses.replace(report, requests=report.requests[:len(batch)])
            replayed.append({"count": len(again), "share_max": round(max(shares), 3),
                             "share_cut": round(sorted(shares)[-len(again)], 3),
                             "written_again": sum(any(r.edited_in_passes) for r in report.requests[len(batch):]),
                             "right_after": sum(bool(r.success()) for r in report.requests[len(batch):])})
        else:
            report = own = session.edit(batch, progress=False, probes="rewrite", values=values)
        if args.replay:
            replay.add(batch, values)
        seconds.append(round(time.perf_counter() - tic, 1))
        written.append(round(own.metrics()["efficacy"], 1))  # the round's own edits, right after it
        reached.append(z_layer_reach(own))
        print("round", len(seconds), seconds[-1], "ES", written[-1], "reach", reached[-1],
              "replayed", replayed[-1] if again else None, flush=True)
    evaluation = None if args.no_eval else evaluate_session(session, requests, protocol="running", record=False)
    ppl = perplexity(session.model, session.tokenizer, session.layout,
                     perplexity_texts(SHARED / "glue_eval" / "dataset"))
    result = {"name": args.name, "method": args.method, "hparams": hparams, "config": session.config.to_dict(),
              "edits": args.edits, "batch": args.batch, "round_seconds": seconds,
              "round_efficacy": written, "round_reach": reached,
              "replayed": replayed,
              "metrics": evaluation.metrics if evaluation else {}, "perplexity": ppl,
              "eval_seconds": evaluation.seconds if evaluation else None,
              "total_seconds": round(time.perf_counter() - started, 1), "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("name", "metrics", "perplexity", "round_seconds")}))


if __name__ == "__main__":
    main()
