"""Where a saved session's perplexity cost sits: per held-out token, and along the edit layers' top leak directions.

Two measurements on a saved sequential session (a trial's ``--state`` folder), against the same session with its
edits taken off (the original weights):

* ``tokens``: the change of each held-out token's NLL (the suite's 200 perplexity texts), how much of the total
  increase the worst 1 %, 5 %, 10 % of tokens carry, and the worst tokens with what the edited model predicts there.
* ``--value-log FOLDER``: how much the value shifts of a round share, over the rounds a replay log stores.
* ``--decay F [F ...]``: the session with each edit layer's cumulative update shrunk by ``F`` along its
  ``--directions`` top leak directions, exactly the step ``leak_decay`` takes after a round
  (:func:`nse_hub.algorithm.update.leak_decay_update`, on the session's own statistics ``C``), applied once to the
  whole history: perplexity, and the running protocol's ES/PS/NS and generation-based ES on a fixed random sample
  of ``--sample`` of the session's edits. Decay 0 is the session as saved.

Behind benchmarks/README.md, "A common direction the rounds over-write".

    S=~/.cache/nse-hub/runs/lifelong-trials
    OMP_NUM_THREADS=1 python benchmarks/leak_directions.py $S/ae-nas-l2-50-retry2-2000 --decay 0 0.25 0.4 0.5 1
    OMP_NUM_THREADS=1 python benchmarks/leak_directions.py $S/ae-nas-l2-100-greedy3-2000 --decay 0 0.25 --no-tokens
    python benchmarks/leak_directions.py --value-log benchmarks/results/lifelong-tuning/value-log
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from nse_hub import EditSession
from nse_hub.ability import perplexity, perplexity_texts
from nse_hub.algorithm.rounds import decay_leaks
from nse_hub.algorithm.values import ValueResult
from nse_hub.evaluation import EvalOptions, measure_requests
from nse_hub.io import atomic_write_json
from nse_hub.sequential import SESSION_DIR
from nse_hub.tokens import encode

SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_eval" / "dataset"
OUT = Path(__file__).resolve().parent / "results" / "leak-directions"
REPORTED = ("efficacy", "generalization", "specificity", "efficacy_generation")


@torch.no_grad()
def token_nll(session: EditSession, texts: list[str]) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per text: its token ids, each next token's NLL and the model's most probable next token."""
    out = []
    for text in texts:
        ids = torch.tensor([encode(session.tokenizer, text)])
        logits = session.model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        out.append((ids[0].tolist(), nll, logits.argmax(-1)))
    return out


def token_damage(session: EditSession, texts: list[str], worst: int = 20) -> dict:
    """How the NLL increase of the edits spreads over the held-out tokens."""
    edited = token_nll(session, texts)
    with session.deltas.only([]):
        original = token_nll(session, texts)
    change = torch.cat([e[1] - o[1] for e, o in zip(edited, original)])
    where = [(t, p) for t, (ids, _, _) in enumerate(edited) for p in range(len(ids) - 1)]
    total = float(change.sum())
    ordered = change.sort(descending=True)
    shares = {f"{q:g}": float(ordered.values[:max(1, int(len(change) * q))].sum()) / total
              for q in (0.001, 0.01, 0.05, 0.1, 0.25)}
    decode = session.tokenizer.decode
    examples = []
    for index in ordered.indices[:worst].tolist():
        text, position = where[index]
        ids, nll, top = edited[text]
        examples.append({"context": decode(ids[max(0, position - 8):position + 1]), "true": decode([ids[position + 1]]),
                         "edited_top": decode([int(top[position])]), "nll_original": float(original[text][1][position]),
                         "nll_edited": float(nll[position])})
    return {"tokens": len(change), "increase_share_of_worst": shares, "rising": float((change > 0).float().mean()),
            "worst": examples}


def value_coherence(folder: Path) -> dict:
    """How much the value shifts ``δ = z − h`` of a round share: per stored round, ``‖mean δ‖² / mean ‖δ‖²`` (about
    1/n for n unrelated shifts), and the cosines between different rounds' mean shifts."""
    means, shares = [], []
    for path in sorted(folder.glob("*.safetensors")):
        stored = ValueResult.from_tensors(load_file(path))
        shifts = (stored.targets - stored.hidden).double()
        mean = shifts.mean(0)
        shares.append(float(mean.pow(2).sum() / shifts.pow(2).sum(1).mean()))
        means.append(mean / mean.norm())
    cosines = torch.stack(means) @ torch.stack(means).T
    between = cosines[~torch.eye(len(means), dtype=torch.bool)]
    between = between[between < 0.9]  # the same round stored under two keys (a log's old and new key) is not two
    return {"rounds": len(shares), "mean_shift_share": [min(shares), statistics.median(shares), max(shares)],
            "cosine_between_rounds": [float(between.min()), float(between.median()), float(between.max())]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path, nargs="?", help="a trial's or run's --state folder (or a saved session)")
    parser.add_argument("--decay", type=float, nargs="*", default=[], help="fractions to take off (0: as saved)")
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--sample", type=int, default=300, help="edits evaluated per decay (a fixed random sample)")
    parser.add_argument("--no-tokens", action="store_true", help="skip the per-token measurement")
    parser.add_argument("--value-log", type=Path, help="only summarise the value shifts stored in this folder")
    args = parser.parse_args()
    if args.value_log:
        summary = value_coherence(args.value_log)
        print(summary)
        atomic_write_json(OUT / "value-log-coherence.json", summary)
        return
    if args.state is None:
        parser.error("name a saved session's folder (or --value-log FOLDER)")
    saved = args.state / SESSION_DIR if (args.state / SESSION_DIR).is_dir() else args.state
    session = EditSession.from_pretrained(str(saved), device="cpu")
    texts = perplexity_texts(SUITE)
    out = OUT / f"{args.state.name}.json"
    # a later call adds its rows to what an earlier one measured on the same session
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"session": str(args.state), "rounds": len(session.rounds), "texts": len(texts)})
    if not args.no_tokens:
        result["tokens"] = token_damage(session, texts)
        print({k: v for k, v in result["tokens"].items() if k != "worst"})
    requests = [r.request for report in session.rounds for r in report.requests]
    sample = random.Random(0).sample(requests, min(args.sample, len(requests)))
    paths = session.compute_statistics(progress=False)
    moments = {layer: load_file(paths[session.layout.projection_name(layer)])["second_moment"]
               for layer in session.config.layers}
    rows = {(row["decay"], row["directions"]): row for row in result.get("decay", [])}
    for fraction in args.decay:
        tic = time.perf_counter()
        if fraction:  # as leak_decay's step, a pending round, discarded below
            decay_leaks(session.deltas, moments, fraction, args.directions)
        metrics = measure_requests(session.model, session.tokenizer, session.layout, sample,
                                   EvalOptions(generation=True))
        row = {"decay": fraction, "directions": args.directions, "sample": len(sample),
               "perplexity": perplexity(session.model, session.tokenizer, session.layout, texts),
               **{key: metrics[key] for key in REPORTED}}
        session.deltas.discard_round()
        row["seconds"] = time.perf_counter() - tic
        print(row, flush=True)
        rows[fraction, args.directions] = row
        result["decay"] = sorted(rows.values(), key=lambda r: (r["directions"], r["decay"]))
        atomic_write_json(out, result)
    atomic_write_json(out, result)


if __name__ == "__main__":
    main()
