"""How much room the earlier edits' keys leave a new edit, per edit layer and over the layers stacked.

The keys of the first N CounterFact records (rounds of 100, the subject's last token averaged over the context
templates, on the original weights) at SmolLM2's NSE-null edit layers, in the null space of each layer's ``C``
(``nullspace_threshold`` 2, the preset). For each layer: the effective rank of the N keys (participation ratio of
the singular values), and the share of each next round's key left free by the keys before it,
``L2 · kᵀ (O Oᵀ + L2·I)⁻¹ k / ‖k‖²`` (1: orthogonal to every earlier key; 0: inside their span), the same for the
layers' keys stacked into one vector. Behind benchmarks/README.md, "Lifelong methods: tuning trials".

    OMP_NUM_THREADS=1 python benchmarks/key_room.py --edits 2000 --l2 30
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nse_hub import EditSession, load_requests
from nse_hub.algorithm.batches import build_key_batch
from nse_hub.algorithm.keys import KeyProbe
from nse_hub.algorithm.update import null_space
from nse_hub.sequential import schedule_rounds
from nse_hub.tokens import pad_id

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def free_share(earlier: torch.Tensor, new: torch.Tensor, l2: float) -> float:
    """Mean over ``new``'s columns of the share of ``‖k‖²`` outside the ridge span of ``earlier`` (Woodbury)."""
    gram = earlier.T @ earlier
    gram.diagonal().add_(l2)
    inside = (new * (earlier @ torch.linalg.solve(gram, earlier.T @ new))).sum(0)
    return float((1 - inside / (new * new).sum(0)).mean())


def effective_rank(keys: torch.Tensor) -> float:
    s = torch.linalg.svdvals(keys)
    return float(s.sum() ** 2 / (s ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=2000)
    parser.add_argument("--l2", type=float, default=30.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    requests = load_requests(SHARED / "counterfact_easyedit" / "counterfact-edit.json", limit=args.edits)
    session = EditSession.from_pretrained("smollm2-135m", method="nse_null")
    session.prepare(progress=False)
    config, layers = session.config, session.config.layers
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in schedule_rounds(requests, 100):
        probe = KeyProbe(session.model, session.layout, build_key_batch(session.tokenizer, batch,
                                                                        session.context_templates),
                         layers[0], config.z_layer, pad_id(session.tokenizer), config.batch_size)
        for layer, keys in probe.read(layers).keys.items():
            parts[layer].append(keys.double())
    projected = {}
    for layer in layers:
        basis = null_space(session._second_moments[layer], config.nullspace_threshold).basis.double()
        projected[layer] = basis.T @ torch.cat(parts[layer], dim=1)
        print(f"layer {layer}: {basis.shape[1]} null-space dims, effective rank of {args.edits} keys "
              f"{effective_rank(projected[layer]):.0f}")
    stacked = torch.cat([projected[layer] for layer in layers])
    print(f"stacked: {stacked.shape[0]} dims, effective rank {effective_rank(stacked):.0f}")
    for before in range(200, args.edits, 100 * max(1, args.edits // 500)):
        per_layer = [free_share(p[:, :before], p[:, before:before + 100], args.l2) for p in projected.values()]
        print(f"after {before} edits, free share of the next 100 keys at L2 {args.l2:g}: per layer "
              + " ".join(f"{x:.2f}" for x in per_layer)
              + f"; stacked {free_share(stacked[:, :before], stacked[:, before:before + 100], args.l2):.2f}")


if __name__ == "__main__":
    main()
