"""Second moments ``C = E[k kᵀ]`` of the MLP output projection's inputs, cached on disk.

All requested layers are measured in one forward pass over the corpus, which stops at the last
of them. Each layer's matrix is stored as float32 safetensors under
``<cache>/stats/<model fingerprint>/<corpus>/<samples>x<length>-seed<seed>/<module>.safetensors``;
sessions read it back from there, so a resumed session uses bit-identical statistics.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.corpus import Corpus, token_sequences
from nse_hub.io import atomic_path
from nse_hub.models import cache_dir
from nse_hub.tokens import pad_id, pad_right
from nse_hub.tracing import read_input, run_forward, stop_after

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics: the model they belong to and the corpus sample they are measured on."""

    model_fingerprint: str
    corpus: str
    n_samples: int
    sample_length: int
    seed: int

    def folder(self, root: Path | None = None) -> Path:
        corpus_key = Corpus.parse(self.corpus).key
        root = root or cache_dir() / "stats"
        return (root / self.model_fingerprint[:16] / corpus_key
                / f"{self.n_samples}x{self.sample_length}-seed{self.seed}")

    def path(self, layout: ModelLayout, layer: int, root: Path | None = None) -> Path:
        return self.folder(root) / f"{layout.projection_name(layer)}.safetensors"


def matrix_sha256(matrix: torch.Tensor) -> str:
    return hashlib.sha256(matrix.contiguous().cpu().numpy().tobytes()).hexdigest()


def second_moments(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                   layers: Sequence[int], spec: StatsSpec, batch_size: int = 32,
                   root: Path | None = None, progress: bool = True) -> dict[int, torch.Tensor]:
    """``E[k kᵀ]`` (``d_ff × d_ff``, float32, on CPU) for each layer, from the cache or one corpus pass.

    The model must hold its original (unedited) weights while this runs.
    """
    found = {}
    for layer in layers:
        path = spec.path(layout, layer, root)
        if path.is_file():
            found[layer] = load_file(path)["second_moment"]
    missing = [layer for layer in layers if layer not in found]
    if missing:
        computed, tokens = _measure(model, tokenizer, layout, missing, spec, batch_size, progress)
        for layer, matrix in computed.items():
            metadata = {"corpus": spec.corpus, "tokens": str(tokens), "n_samples": str(spec.n_samples),
                        "sample_length": str(spec.sample_length), "seed": str(spec.seed),
                        "model_fingerprint": spec.model_fingerprint, "module": layout.projection_name(layer)}
            with atomic_path(spec.path(layout, layer, root)) as tmp:
                save_file({"second_moment": matrix}, str(tmp), metadata=metadata)
            found[layer] = matrix
    return {layer: found[layer] for layer in layers}


@torch.no_grad()
def _measure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
             layers: Sequence[int], spec: StatsSpec, batch_size: int,
             progress: bool) -> tuple[dict[int, torch.Tensor], int]:
    device = next(model.parameters()).device
    corpus = Corpus.parse(spec.corpus)
    logger.info("Measuring E[kkᵀ] at layers %s over %d samples of %s", list(layers), spec.n_samples,
                corpus.describe())
    sums = {layer: torch.zeros(layout.intermediate_size, layout.intermediate_size, dtype=torch.float64,
                               device=device) for layer in layers}
    state = {"mask": None, "tokens": 0}

    def accumulate(layer: int):
        def fn(keys: torch.Tensor) -> None:
            flat = keys[state["mask"]].float()
            sums[layer].add_((flat.mT @ flat).double())
        return fn

    sequences = token_sequences(corpus, tokenizer, spec.n_samples, spec.sample_length, model=model, seed=spec.seed)
    bar = tqdm(total=spec.n_samples, desc="second moments", unit="sample", disable=not progress)
    last = layout.projection(model, max(layers))
    batch: list[list[int]] = []

    def flush() -> None:
        ids, mask = pad_right(batch, pad_id(tokenizer), device)
        state["mask"] = mask.bool()
        state["tokens"] += int(mask.sum())
        # Hooks only around this forward: a model-sampled corpus runs generate() between batches.
        with ExitStack() as hooks:
            for layer in layers:
                hooks.enter_context(read_input(layout.projection(model, layer), accumulate(layer)))
            hooks.enter_context(stop_after(last))
            run_forward(model, input_ids=ids, attention_mask=mask, use_cache=False)
        bar.update(len(batch))
        batch.clear()

    for sequence in sequences:
        batch.append(sequence)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if state["tokens"] == 0:
        raise ValueError(f"corpus {spec.corpus!r} produced no text")
    return {layer: (total / state["tokens"]).float().cpu() for layer, total in sums.items()}, state["tokens"]
