"""The one-round experiment behind benchmarks/README.md, "Value targets in directions held-out text is insensitive
to": not part of nse-hub. Apply ``value-penalty.patch`` (the value step's loss gains w · δᵀF̂δ / ‖h‖² in its
gradient) to a checkout of commit f16e1ce, then, from its root:

    OMP_NUM_THREADS=1 python benchmarks/results/fisher-values/experiment.py fisher     # F, once
    OMP_NUM_THREADS=1 python benchmarks/results/fisher-values/experiment.py round 3    # w = 3
    OMP_NUM_THREADS=1 python benchmarks/results/fisher-values/experiment.py round 0 '{"clamp_norm_factor": 0.5}' clamp05
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from nse_hub import EditSession, load_requests
from nse_hub.ability import load_task, perplexity, perplexity_texts, suite_folder
from nse_hub.evaluation import evaluate_session

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[3] / "shared" / "data"
FISHER = HERE / "fisher.pt"  # not committed: 5 × 576 × 576 float64
SETTINGS = {"method": "alphaedit", "norm_anchor": True, "L2": 50}


def fisher(session: EditSession) -> dict[int, torch.Tensor]:
    """E[g gᵀ] of the NLL gradient g at each edit layer's output, over suite sentences the perplexity skips."""
    texts = [e["sentence1"] for name in ("mrpc", "rte") for e in load_task(suite_folder(SHARED / "glue_eval" /
                                                                                            "dataset"), name)[:50]]
    layers, decoder = list(session.config.layers), session.layout.layers(session.model)
    moments = {layer: torch.zeros(576, 576, dtype=torch.float64) for layer in layers}
    grads: dict[int, torch.Tensor] = {}

    def keep_grad(layer: int):
        def hook(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden.register_hook(lambda g: grads.__setitem__(layer, g.detach()))
        return hook

    handles = [decoder[layer].register_forward_hook(keep_grad(layer)) for layer in layers]
    tokens = 0
    for text in texts:
        ids = session.tokenizer(text, return_tensors="pt").input_ids
        embeds = session.model.get_input_embeddings()(ids).detach().requires_grad_()
        (session.model(inputs_embeds=embeds, labels=ids).loss * (ids.shape[1] - 1)).backward()
        for layer in layers:
            moments[layer] += grads[layer][0].double().T @ grads[layer][0].double()
        tokens += ids.shape[1]
    for handle in handles:
        handle.remove()
    return {layer: m / tokens for layer, m in moments.items()}


def one_round(weight: str, settings: dict, tag: str) -> None:
    os.environ["NSE_FISHER_W"], os.environ["NSE_FISHER"] = weight, str(FISHER)
    requests = load_requests(SHARED / "counterfact_easyedit" / "counterfact-edit.json", limit=100)
    session = EditSession.from_pretrained("smollm2-135m", **{**SETTINGS, **settings})
    tic = time.perf_counter()
    session.edit(requests, progress=False)
    seconds = time.perf_counter() - tic
    moment = torch.load(FISHER)[session.config.z_layer].float()
    moment = moment / (moment.trace() / moment.shape[0])
    values = session.value_targets(1)
    delta = values.targets - values.hidden
    cost = ((delta @ moment) * delta).sum(1)
    result = {"w": float(weight), "hp": settings, "seconds": seconds,
              "ppl": perplexity(session.model, session.tokenizer, session.layout,
                                perplexity_texts(SHARED / "glue_eval" / "dataset")),
              "delta": {"delta_over_h": float((delta.norm(dim=1) / values.hidden.norm(dim=1)).mean()),
                        "fisher_ratio": float((cost / delta.pow(2).sum(1)).mean()), "fisher_cost": float(cost.mean())},
              "metrics": evaluate_session(session, requests, protocol="running", record=False).metrics}
    (HERE / f"fisher_round_w{tag}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "fisher":
        torch.save(fisher(EditSession.from_pretrained("smollm2-135m", **SETTINGS)), FISHER)
    else:
        weight = sys.argv[2]
        one_round(weight, json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}, weight + "".join(sys.argv[4:]))
