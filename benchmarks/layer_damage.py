"""Which edit layer's update costs the perplexity: a saved session measured with each layer's cumulative delta alone,
and with each taken out.

The perplexity of the suite's 200 held-out texts (the lifelong benchmarks' ratio) of a saved sequential session,
with the edit layers' weights set to the edited ones for some layers and the original ones for the rest: every
layer edited, none, each layer alone, and all but each layer. With ``--key-shift``, also how much the other
layers' updates change what a layer's update does to those texts: ``‖ΔW k‖²`` summed over their tokens, with the
layer's keys ``k`` read on the original model and on the model with every other layer edited. Behind
benchmarks/README.md, "Lifelong methods: tuning trials".

    OMP_NUM_THREADS=1 python benchmarks/layer_damage.py ~/.cache/nse-hub/runs/lifelong-trials/ae-nas-l2-50-retry2-2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nse_hub import EditSession
from nse_hub.ability import perplexity, perplexity_texts
from nse_hub.io import atomic_write_json
from nse_hub.sequential import SESSION_DIR
from nse_hub.tracing import read_input

SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_eval" / "dataset"
OUT = Path(__file__).resolve().parent / "results" / "layer-damage"


def perplexity_with(session: EditSession, edited_layers: set[int], texts: list[str]) -> float:
    """The perplexity of ``texts`` with only ``edited_layers`` edited; the session's weights are restored after."""
    with session.deltas.only(edited_layers):
        return perplexity(session.model, session.tokenizer, session.layout, texts)


@torch.no_grad()
def layer_keys(session: EditSession, layer: int, texts: list[str]) -> torch.Tensor:
    """The inputs of ``layer``'s edited projection at every token of ``texts``, one row each."""
    rows: list[torch.Tensor] = []
    with read_input(session.layout.projection(session.model, layer), lambda x: rows.append(x.reshape(-1, x.shape[-1]))):
        for text in texts:
            session.model(session.tokenizer(text, return_tensors="pt").input_ids)
    return torch.cat(rows).float()


def key_shift(session: EditSession, layer: int, texts: list[str]) -> dict[str, float]:
    """What ``layer``'s update does to ``texts`` on the original model's keys and on the keys the other layers'
    updates leave; the session's weights are restored after."""
    delta = session.deltas.cumulative(layer).dense()  # d_model × d_ff, as the keys are d_ff wide
    with session.deltas.only([]):
        original = layer_keys(session, layer, texts)
    with session.deltas.only(set(session.config.layers) - {layer}):
        shifted = layer_keys(session, layer, texts)
    on_original, on_shifted = (float((keys @ delta.T).pow(2).sum()) for keys in (original, shifted))
    return {"update_on_original_keys": on_original, "update_on_shifted_keys": on_shifted,
            "ratio": on_shifted / on_original,
            "key_shift": float((shifted - original).norm() / original.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path, help="a trial's or run's --state folder (or a saved session)")
    parser.add_argument("--key-shift", type=int, nargs="*", default=None, metavar="LAYER",
                        help="measure the key shift at these layers (only that, with the perplexities measured before)")
    args = parser.parse_args()
    saved = args.state / SESSION_DIR if (args.state / SESSION_DIR).is_dir() else args.state
    session = EditSession.from_pretrained(str(saved), device="cpu")
    layers = list(session.config.layers)
    texts = perplexity_texts(SUITE)
    out = OUT / f"{args.state.name}.json"
    if args.key_shift is not None:
        result = json.loads(out.read_text())
        result["key_shift"] = {str(layer): key_shift(session, layer, texts) for layer in args.key_shift}
        print(json.dumps(result["key_shift"], indent=1))
        atomic_write_json(out, result)
        return
    settings = {"all": set(layers), "none": set()}
    settings |= {f"only {layer}": {layer} for layer in layers}
    settings |= {f"all but {layer}": set(layers) - {layer} for layer in layers}
    results = {}
    for name, kept in settings.items():
        tic = time.perf_counter()
        results[name] = round(perplexity_with(session, kept, texts), 3)
        print(f"{name:>10}: {results[name]:9.3f}  ({time.perf_counter() - tic:.0f} s)", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out,
                      {"session": str(saved), "method": session.config.method, "rounds": len(session.rounds),
                       "edits": sum(len(r.requests) for r in session.rounds), "layers": layers,
                       "texts": len(texts), "perplexity": results})


if __name__ == "__main__":
    main()
