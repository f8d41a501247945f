"""How much of held-out text's key energy lies inside the null space that the edits are confined to.

An update confined to the null space ``P`` of a corpus' second moments ``C`` changes a key ``k`` only through
``Pᵀk``, so ``tr(Pᵀ C_h P) / tr(C_h)`` (the "leak", ``C_h`` the held-out text's second moments) is the share of
held-out key energy that the edits can reach. Measured at SmolLM2's NSE-null edit layers (threshold 2, the
preset) for null spaces from several corpora, on the suite's perplexity texts (the texts behind the
perplexity ratio of the lifelong benchmarks) split in two halves: ``C`` from half A (text of the same
distribution), and each null space scored on half B. Behind benchmarks/README.md, "Lifelong methods: tuning
trials".

    OMP_NUM_THREADS=1 python benchmarks/null_space_leak.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nse_hub import EditSession
from nse_hub.ability import perplexity_texts
from nse_hub.algorithm.update import null_space
from nse_hub.io import atomic_write_json
from nse_hub.models import cache_dir
from nse_hub.stats import StatsSpec, second_moments

SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_eval" / "dataset"
OUT = Path(__file__).resolve().parent / "results" / "null-space-leak"
EVALUATED = 100  # the suite's examples per task: kept out of the suite corpus
HELD_OUT = "held-out half B (in-sample, optimistic)"


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def suite_text() -> list[str]:
    """The suite's text outside MRPC and RTE (the perplexity texts' source) and outside the evaluated examples."""
    def task(name: str) -> list[dict]:
        return json.loads((SUITE / f"{name}.json").read_text())
    texts = [e["article"] for e in task("dialogue")]
    texts += [e[k] for e in task("nli")[EVALUATED:] for k in ("sentence1", "sentence2")]
    texts += [e["question"] for e in task("mmlu")[EVALUATED:]]
    texts += [e["sentence"] for name in ("sst2", "cola") for e in task(name)[EVALUATED:]]
    return texts


def leak(null_basis: torch.Tensor, held_out: torch.Tensor) -> float:
    p, c = null_basis.double(), held_out.double()
    return float(torch.trace(p.T @ c @ p) / torch.trace(c))


def lowest_directions(second_moment: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` eigenvectors of ``C`` with the smallest eigenvalues: a null space of a fixed size."""
    c = second_moment.double()
    return torch.linalg.eigh((c + c.T) / 2).eigenvectors[:, :count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[320, 1600],
                        help="corpus samples (of 64 tokens) for the model-text and suite-text null spaces")
    parser.add_argument("--threshold", type=float, default=None, help="null space threshold (default: the preset)")
    parser.add_argument("--room", type=int, default=1150,
                        help="also score null spaces of this fixed size (the preset's, about 1150 directions)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    session = EditSession.from_pretrained("smollm2-135m", method="nse_null")
    session.prepare(progress=False, statistics=False)
    config, layers = session.config, list(session.config.layers)
    threshold = args.threshold or config.nullspace_threshold
    folder = cache_dir() / "corpora"
    texts = perplexity_texts(SUITE)
    half = len(texts) // 2
    corpora = {"held-out half A (same distribution)": (write_jsonl(folder / "perplexity-half-a.jsonl", texts[:half]),
                                                       half),
               HELD_OUT: (write_jsonl(folder / "perplexity-half-b.jsonl", texts[half:]), half)}
    suite = write_jsonl(folder / "suite-text.jsonl", suite_text())
    for n in args.samples:
        corpora[f"model-sampled text, {n} × 64"] = ("model", n)
        corpora[f"suite text, {n} × 64"] = (suite, n)

    def moments(corpus: str, n: int) -> dict[int, torch.Tensor]:
        spec = StatsSpec(session.stats_spec.model_fingerprint, corpus, n, config.mom2_sample_length, config.seed)
        return second_moments(session.model, session.tokenizer, session.layout, layers, spec, config.batch_size,
                              progress=False)

    measured = {name: moments(corpus, n) for name, (corpus, n) in corpora.items()}
    held_out = measured[HELD_OUT]
    rows = []
    for name, second_moment in measured.items():
        cells = {}
        for layer in layers:
            space = null_space(second_moment[layer], threshold)
            cells[layer] = {"null_dims": space.basis.shape[1], "leak": leak(space.basis, held_out[layer]),
                            "leak_at_room": leak(lowest_directions(second_moment[layer], args.room), held_out[layer])}
        rows.append({"corpus": name, "layers": cells})
        print(f"{name}: " + " | ".join(f"layer {layer}: {c['null_dims']} dims, {100 * c['leak']:.1f} % "
                                       f"({100 * c['leak_at_room']:.1f} % in {args.room})"
                                       for layer, c in cells.items()), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "results.json", {"model": "smollm2-135m", "threshold": threshold, "room": args.room,
                                             "rows": rows})


if __name__ == "__main__":
    main()
