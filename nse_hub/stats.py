"""Second moments ``C = E[k kᵀ]`` of the MLP output projection's inputs, cached on disk.

All requested layers are measured in one forward pass over the corpus, which stops at the last
of them. Each layer's matrix is stored as float32 safetensors under
``<cache>/stats/<model fingerprint>/<corpus>/<samples>x<length>-seed<seed>/<module>.safetensors``;
sessions read it back from there, so a resumed session uses bit-identical statistics.

How much text: ``C`` is ``d_ff × d_ff``, so it needs many more tokens than ``d_ff`` to be well
determined (with fewer it is singular). :func:`default_stat_samples` is the rule for the default
sample: at least :data:`TOKENS_PER_NEURON` tokens per neuron, and never fewer than the
:data:`MIN_STAT_TOKENS` the presets were measured with.

The pass is resumable: its running sums are saved beside the cache entry (``partial-*.safetensors``)
every ``checkpoint_seconds`` and when it is interrupted (Ctrl-C, an error), and a later call with the
same specification continues from there instead of starting again; the result is bit-identical to an
uninterrupted pass.

Data-parallel: when a ``torch.distributed`` process group is initialised (``torchrun``, ``accelerate launch``),
each of its N processes reads its own contiguous 1/N of the corpus samples, and the processes add up their
float64 sums and token counts (``all_reduce``) at the end: every process gets the same ``C``, equal to the
one-process result up to the order of float32 summation. Each process keeps its own partial sums
(``partial-*-rank<r>of<N>.safetensors``), so an interrupted pass resumes with the same number of processes;
only rank 0 writes the cached matrices.

Every matrix is checked when it is built and when it is read: fewer tokens than dimensions, a neuron
that never fired, or a matrix that is not numerically positive definite raise :class:`StatisticsError`
naming the module and the fix, rather than leaving a singular system to the solve.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.corpus import Corpus, token_sequences
from nse_hub.errors import StatisticsError
from nse_hub.io import atomic_path
from nse_hub.models import cache_dir
from nse_hub.tokens import pad_id, pad_right
from nse_hub.tracing import model_device, read_input, run_forward, stop_after

logger = logging.getLogger(__name__)

__all__ = ["StatisticsError", "StatsSpec", "check_second_moment", "default_stat_samples", "matrix_sha256",
           "recommended_tokens", "second_moments", "sufficient_stat_samples", "warn_sample_size"]

# At least this many corpus tokens per neuron of the projection input (d_ff) by default.
TOKENS_PER_NEURON = 10
# The default sample never shrinks below the 320 × 64 tokens the presets were measured with.
MIN_STAT_TOKENS = 320 * 64
# A pivot of C's Cholesky factorisation below this share of its diagonal entry means that neuron's
# input is, to float32 rounding, a linear combination of the others': C is numerically singular.
# (The share is 1 − R² of that neuron's input regressed on the earlier neurons'.)
MIN_RELATIVE_PIVOT = 1e-6
CHECK_VERSION = "cholesky-v1"
# Seconds between saves of a running pass's partial sums (it is also saved when interrupted).
CHECKPOINT_SECONDS = 300.0


def recommended_tokens(d_ff: int) -> int:
    """Corpus tokens the statistics of a projection with ``d_ff`` inputs should be measured on."""
    return TOKENS_PER_NEURON * d_ff


def default_stat_samples(d_ff: int, sample_length: int) -> int:
    """Default ``mom2_n_samples``: enough samples of ``sample_length`` tokens for ``max(10·d_ff, 20,480)`` tokens.

    SmolLM2 (d_ff 1,536) and Gemma 3 270M (2,048) get the measured 320 × 64; a model with d_ff 8,192
    gets 1,280 × 64 = 81,920 tokens, Llama-3-8B (14,336) 2,240 × 64 = 143,360.
    """
    if d_ff < 1 or sample_length < 1:
        raise ValueError(f"need d_ff >= 1 and sample_length >= 1, got {d_ff} and {sample_length}")
    return math.ceil(max(recommended_tokens(d_ff), MIN_STAT_TOKENS) / sample_length)


def sufficient_stat_samples(d_ff: int, sample_length: int) -> int:
    """The fewest samples of ``sample_length`` tokens that give :func:`recommended_tokens` (``10·d_ff``).

    Unlike :func:`default_stat_samples`, no floor at the presets' 20,480 tokens: for a quick first edit
    (``nse-hub demo``), where the statistics pass is most of the wait. SmolLM2: 240 × 64 = 15,360 tokens.
    """
    if d_ff < 1 or sample_length < 1:
        raise ValueError(f"need d_ff >= 1 and sample_length >= 1, got {d_ff} and {sample_length}")
    return math.ceil(recommended_tokens(d_ff) / sample_length)


def sample_size_warning(d_ff: int, n_samples: int, sample_length: int) -> str | None:
    """Why ``n_samples × sample_length`` tokens are too few for ``d_ff`` (None when they are enough)."""
    tokens = n_samples * sample_length
    if tokens >= recommended_tokens(d_ff):
        return None
    need = math.ceil(recommended_tokens(d_ff) / sample_length)
    singular = " — fewer than d_ff, so C will be singular" if tokens < d_ff else ""
    return (f"mom2_n_samples={n_samples} × mom2_sample_length={sample_length} = {tokens:,} tokens is below "
            f"{TOKENS_PER_NEURON} × d_ff = {recommended_tokens(d_ff):,} for this model{singular}; "
            f"the second moments C will be poorly determined. Use mom2_n_samples >= {need} "
            "(or leave it unset for the automatic default).")


def warn_sample_size(d_ff: int, n_samples: int, sample_length: int, stacklevel: int = 2) -> None:
    message = sample_size_warning(d_ff, n_samples, sample_length)
    if message:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


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

    def partial_path(self, layout: ModelLayout, layers: Sequence[int], root: Path | None = None,
                     shard: Shard | None = None) -> Path:
        """Where an unfinished pass over ``layers`` keeps its running sums (one file per process of a
        data-parallel pass)."""
        names = ",".join(layout.projection_name(layer) for layer in sorted(layers))
        rank = f"-rank{shard.rank}of{shard.world_size}" if shard and shard.world_size > 1 else ""
        return self.folder(root) / f"partial-{hashlib.sha256(names.encode()).hexdigest()[:12]}{rank}.safetensors"


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel statistics pass: process ``rank`` of ``world_size`` reads the
    contiguous slice of the corpus that :meth:`bounds` gives."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The shard of this process: its rank in the initialised ``torch.distributed`` group, else the whole."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    def bounds(self, n_samples: int) -> tuple[int, int]:
        """Contiguous, as even as possible: rank r reads samples ``[r·n/N, (r+1)·n/N)``."""
        return self.rank * n_samples // self.world_size, (self.rank + 1) * n_samples // self.world_size

    @property
    def writes(self) -> bool:
        """Whether this process writes the cached matrices (rank 0 only)."""
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"{self.rank}/{self.world_size}"


def matrix_sha256(matrix: torch.Tensor) -> str:
    return hashlib.sha256(matrix.contiguous().cpu().numpy().tobytes()).hexdigest()


def check_second_moment(matrix: torch.Tensor, module: str, tokens: int | None = None,
                        factorise: bool = True) -> float | None:
    """Raise :class:`StatisticsError` unless ``matrix`` is a usable (positive definite) ``C`` for ``module``.

    Checks, cheapest first: finite entries; at least ``d_ff`` tokens behind it (else its rank is
    below its size); every diagonal entry positive (each neuron fired); and, with ``factorise``, a
    float64 Cholesky factorisation whose every pivot keeps at least :data:`MIN_RELATIVE_PIVOT` of its
    diagonal entry. Returns the smallest such share (None without ``factorise``).
    """
    d_ff = matrix.shape[0]
    fix = (f"measure C on more text: mom2_n_samples × mom2_sample_length should be at least "
           f"{recommended_tokens(d_ff):,} tokens ({TOKENS_PER_NEURON} × d_ff) — leave mom2_n_samples unset for "
           "that default, or use a larger corpus (mom2_dataset)")
    if matrix.ndim != 2 or matrix.shape[1] != d_ff:
        raise StatisticsError(f"the second moment C of {module} has shape {tuple(matrix.shape)}, not square")
    if not bool(torch.isfinite(matrix).all()):
        raise StatisticsError(f"the second moment C of {module} has non-finite entries; delete its cache file "
                              "and measure it again")
    if tokens is not None and tokens < d_ff:
        raise StatisticsError(f"the second moment C of {module} is singular: it was measured on {tokens:,} tokens, "
                              f"fewer than its {d_ff:,} dimensions (d_ff), so its rank is at most {tokens:,}; {fix}")
    work = matrix.double()
    diagonal = work.diagonal()
    dead = torch.nonzero(diagonal <= 0).squeeze(1)
    if len(dead):
        raise StatisticsError(f"the second moment C of {module} is singular: {len(dead)} neuron(s) (first: "
                              f"{int(dead[0])}) never fired on the corpus; {fix}")
    if not factorise:
        return None
    factor, info = torch.linalg.cholesky_ex(work)
    if int(info) > 0:
        raise StatisticsError(f"the second moment C of {module} is not positive definite (its Cholesky "
                              f"factorisation fails at row {int(info) - 1} of {d_ff:,}); {fix}")
    share = factor.diagonal() ** 2 / diagonal
    worst = int(share.argmin())
    if float(share[worst]) < MIN_RELATIVE_PIVOT:
        raise StatisticsError(f"the second moment C of {module} is numerically singular: neuron {worst}'s input is "
                              f"a linear combination of the others' to within {float(share[worst]):.1e} of its "
                              f"variance (need {MIN_RELATIVE_PIVOT:.0e}); {fix}")
    return float(share.min())


def _read(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(path)["second_moment"], metadata


def second_moments(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                   layers: Sequence[int], spec: StatsSpec, batch_size: int = 32,
                   root: Path | None = None, progress: bool = True,
                   checkpoint_seconds: float = CHECKPOINT_SECONDS) -> dict[int, torch.Tensor]:
    """``E[k kᵀ]`` (``d_ff × d_ff``, float32, on CPU) for each layer, from the cache or one corpus pass.

    The model must hold its original (unedited) weights while this runs. An unfinished pass with the
    same ``spec`` and layers is resumed; its running sums are saved every ``checkpoint_seconds`` (0:
    after every batch) and when the pass is interrupted. Raises :class:`StatisticsError` when a
    matrix is singular or not positive definite (see :func:`check_second_moment`).
    """
    device = model_device(model)
    shard = Shard.current()
    cached = _agreed([spec.path(layout, layer, root).is_file() for layer in layers], shard, device)
    found = {}
    for layer, is_cached in zip(layers, cached):
        path = spec.path(layout, layer, root)
        if is_cached:
            matrix, metadata = _read(path)
            tokens = int(metadata["tokens"]) if metadata.get("tokens", "").isdigit() else None
            # Files written by this version were factorised before they were written.
            check_second_moment(matrix.to(device), f"{layout.projection_name(layer)} (cached at {path})", tokens,
                                factorise=metadata.get("check") != CHECK_VERSION)
            found[layer] = matrix
    missing = [layer for layer in layers if layer not in found]
    if missing:
        warning = sample_size_warning(layout.intermediate_size, spec.n_samples, spec.sample_length)
        if warning:
            logger.warning("%s", warning)
        partial = spec.partial_path(layout, missing, root, shard)
        computed, tokens = _measure(model, tokenizer, layout, missing, spec, batch_size, progress and shard.writes,
                                    partial, checkpoint_seconds, shard)
        if tokens < recommended_tokens(layout.intermediate_size):
            logger.warning("The corpus gave %s tokens, below %d × d_ff = %s: C is poorly determined.",
                           f"{tokens:,}", TOKENS_PER_NEURON, f"{recommended_tokens(layout.intermediate_size):,}")
        problems: list[StatisticsError] = []
        for layer, matrix in computed.items():
            try:
                pivot = check_second_moment(matrix.to(device), layout.projection_name(layer), tokens)
            except StatisticsError as error:
                problems.append(error)
                continue
            metadata = {"corpus": spec.corpus, "tokens": str(tokens), "n_samples": str(spec.n_samples),
                        "sample_length": str(spec.sample_length), "seed": str(spec.seed),
                        "model_fingerprint": spec.model_fingerprint, "module": layout.projection_name(layer),
                        "check": CHECK_VERSION, "min_relative_pivot": f"{pivot:.3e}"}
            if shard.writes:
                with atomic_path(spec.path(layout, layer, root)) as tmp:
                    save_file({"second_moment": matrix}, str(tmp), metadata=metadata)
            found[layer] = matrix
        partial.unlink(missing_ok=True)
        if shard.world_size > 1:  # the cached files exist for every process once it returns
            torch.distributed.barrier()
        if problems:
            raise problems[0]
    return {layer: found[layer] for layer in layers}


def _agreed(flags: list[bool], shard: Shard, device: torch.device) -> list[bool]:
    """``flags`` where every process of a data-parallel pass has them true (each must take the same path)."""
    if shard.world_size == 1 or not flags:
        return flags
    votes = torch.tensor(flags, dtype=torch.int32, device=_reduce_device(device))
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MIN)
    return [bool(v) for v in votes.tolist()]


def _reduce_device(device: torch.device) -> torch.device:
    """Where the collectives run: the accelerator for NCCL, the CPU for gloo."""
    return device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def _reduce_sums(sums: dict[int, torch.Tensor], tokens: int, shard: Shard) -> int:
    """Add every process's float64 sums (in place) and token counts; returns the total tokens."""
    if shard.world_size == 1:
        return tokens
    for layer in sorted(sums):
        reduce_device = _reduce_device(sums[layer].device)
        total = sums[layer].to(reduce_device)
        torch.distributed.all_reduce(total)
        sums[layer] = total.to(sums[layer].device)
    count = torch.tensor([tokens], dtype=torch.int64, device=_reduce_device(next(iter(sums.values())).device))
    torch.distributed.all_reduce(count)
    return int(count.item())


def _save_partial(path: Path, sums: dict[int, torch.Tensor], samples: int, tokens: int, spec: StatsSpec,
                  shard: Shard = Shard()) -> None:
    metadata = {"samples": str(samples), "tokens": str(tokens), "layers": ",".join(map(str, sorted(sums))),
                "shard": shard.label,
                "corpus": spec.corpus, "n_samples": str(spec.n_samples), "sample_length": str(spec.sample_length),
                "seed": str(spec.seed), "model_fingerprint": spec.model_fingerprint}
    with atomic_path(path) as tmp:
        save_file({f"layer.{layer}": total.cpu() for layer, total in sums.items()}, str(tmp), metadata=metadata)


def _load_partial(path: Path, layers: Sequence[int], device: torch.device,
                  shard: Shard = Shard()) -> tuple[dict[int, torch.Tensor], int, int]:
    """Running sums, samples done and tokens counted of an unfinished pass (empty when there is none)."""
    if not path.is_file():
        return {}, 0, 0
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("layers") != ",".join(map(str, sorted(layers))):
            raise ValueError("other layers")
        if metadata.get("shard", "0/1") != shard.label:
            raise ValueError(f"another process's share ({metadata.get('shard')}, this is {shard.label})")
        tensors = load_file(path)
        sums = {layer: tensors[f"layer.{layer}"].to(device) for layer in layers}
        return sums, int(metadata["samples"]), int(metadata["tokens"])
    except Exception as error:  # an unreadable partial file only costs the work it held
        logger.warning("Ignoring the unfinished statistics pass in %s (%s); starting again.", path, error)
        return {}, 0, 0


@torch.no_grad()
def _measure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
             layers: Sequence[int], spec: StatsSpec, batch_size: int, progress: bool,
             partial: Path | None = None, checkpoint_seconds: float = CHECKPOINT_SECONDS,
             shard: Shard = Shard()) -> tuple[dict[int, torch.Tensor], int]:
    device = model_device(model)
    corpus = Corpus.parse(spec.corpus)
    start, stop = shard.bounds(spec.n_samples)
    share = f" (process {shard.label}: samples {start}–{stop})" if shard.world_size > 1 else ""
    sums, done, tokens = _load_partial(partial, layers, device, shard) if partial else ({}, 0, 0)
    if done:
        logger.info("Resuming the E[kkᵀ] pass at layers %s after %d of %d samples%s (%s)", list(layers), done,
                    stop - start, share, partial)
    else:
        logger.info("Measuring E[kkᵀ] at layers %s over %d samples of %s%s", list(layers), spec.n_samples,
                    corpus.describe(), share)
        sums = {layer: torch.zeros(layout.intermediate_size, layout.intermediate_size, dtype=torch.float64,
                                   device=device) for layer in layers}
    state = {"mask": None, "done": done, "tokens": tokens, "saved_at": time.monotonic()}
    # A batch's products are added to the sums only once its forward pass has finished, so that the
    # sums are consistent (every layer has seen the same samples) whenever they are saved.
    pending: dict[int, torch.Tensor] = {}

    def accumulate(layer: int):
        def fn(keys: torch.Tensor) -> None:
            flat = keys[state["mask"]].float()
            pending[layer] = flat.mT @ flat
        return fn

    def save() -> None:
        if partial is not None:
            _save_partial(partial, sums, state["done"], state["tokens"], spec, shard)
            state["saved_at"] = time.monotonic()

    # The whole pass's sequence stream, cut to this process's share: a model-sampled corpus draws each sampling
    # batch as the one-process pass does, whatever share it is cut to.
    sequences = itertools.islice(token_sequences(corpus, tokenizer, spec.n_samples, spec.sample_length, model=model,
                                                 seed=spec.seed, skip=start + done, progress=progress),
                                 stop - start - done)
    bar = tqdm(total=stop - start, initial=done, desc="second moments", unit="sample", disable=not progress)
    last = layout.projection(model, max(layers))
    batch: list[list[int]] = []

    def flush() -> None:
        if state["done"] > done and time.monotonic() - state["saved_at"] >= checkpoint_seconds:
            save()  # before, not after, a batch: the last batch is followed by the result, not a checkpoint
        ids, mask = pad_right(batch, pad_id(tokenizer), device)
        state["mask"] = mask.bool()
        pending.clear()
        # Hooks only around this forward: a model-sampled corpus runs generate() between batches.
        with ExitStack() as hooks:
            for layer in layers:
                hooks.enter_context(read_input(layout.projection(model, layer), accumulate(layer)))
            hooks.enter_context(stop_after(last))
            run_forward(model, input_ids=ids, attention_mask=mask, use_cache=False)
        for layer in layers:
            sums[layer].add_(pending.pop(layer).double())
        state["tokens"] += int(mask.sum())
        state["done"] += len(batch)
        bar.update(len(batch))
        batch.clear()

    try:
        for sequence in sequences:
            batch.append(sequence)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    except BaseException:
        pending.clear()
        if state["done"] > done:
            save()
            logger.warning("Statistics pass interrupted after %d of %d samples%s; the next run resumes from there.",
                           state["done"], stop - start, share)
        raise
    finally:
        bar.close()
    state["tokens"] = _reduce_sums(sums, state["tokens"], shard)
    if state["tokens"] == 0:
        raise ValueError(f"corpus {spec.corpus!r} produced no text")
    return {layer: (total / state["tokens"]).float().cpu() for layer, total in sums.items()}, state["tokens"]
