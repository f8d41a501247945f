"""One edit round of NSE, MEMIT, sequential MEMIT, AlphaEdit, UltraEdit or NSE-null (NSE.md, "One round").

NSE: values on the original weights; up to ``max_iterations - 1`` passes over the edit layers, each
keeping only requests whose residual lies between ``alpha`` and ``upper_bound`` and updating only the
selected neurons. MEMIT, sequential MEMIT and AlphaEdit: values on the current weights, one pass,
every request, every neuron. All spread the residual over the remaining layers. The solve per layer:

* NSE, ``memit_seq``: ``ΔW = R Kᵀ (λC + P + K Kᵀ)⁻¹`` with the key memory ``P`` of earlier rounds;
* ``memit`` (kmeng01/memit): the same without ``P``;
* ``alphaedit``: ``Δᵀ = (Π (K Kᵀ + P) + L2·I)⁻¹ Π K Rᵀ`` with ``Π`` the projector onto the null space
  of ``C`` (see :func:`~nse_hub.algorithm.update.alphaedit_update`);
* ``nse_null`` (nse-hub's lifelong method, NSE-null): NSE's round (values on the original weights, neuron
  selection, residual-filtered passes) with AlphaEdit's solve on the selected neurons ``S`` only:
  ``ΔW[:, S]ᵀ = (Π (Kₛ Kₛᵀ + Pₛₛ) + L2·I)⁻¹ Π Kₛ Rᵀ``, ``Π`` the projector onto the null space of ``C_SS``
  (eigenvectors below ``nullspace_threshold`` × its median eigenvalue), ``ΔW[:, S̄] = 0``
  (:func:`~nse_hub.algorithm.update.projected_neuron_update`). NSE's fixed targets stop the drift of
  values computed on edited weights and its filter leaves written edits alone; the projection keeps
  each update off the directions the corpus' keys use, which NSE's ``λC`` only penalises. With
  ``neuron_threshold`` 1 every active neuron is selected and the null space of ``C`` is cached.

UltraEdit (:mod:`nse_hub.algorithm.ultraedit`) has no value targets and no residual: one forward and
backward pass reads every edit layer's keys and output gradients at the target-predicting positions, and
each layer gets ``ΔW = Vᵀ (KKᵀ + λI)⁻¹ K`` with pseudo-values normalised by the lifelong statistics.

The session adds each round's keys to ``P`` afterwards (classic MEMIT keeps them too, unused, so
that a saved session has the same state whatever its method). UltraEdit reads them, and the z-layer
output its report compares, on the plain prompts only: no UltraEdit round uses ``P`` (a session keeps
its method, and merges need the same one), and the context templates made these reads two thirds of its
round. With ``norm_anchor`` (NAS), each value's
MLP-output part is rescaled to the anchor norm before any update (:func:`anchor_values`). With
``retry_failed``, up to that many more passes write again the requests whose new target does not yet win on
their rewrite prompt (``retry_criterion`` "greedy": is not yet what greedy decoding writes there), the round's other
requests' keys guarded in the solve as if an earlier round wrote them. With ``leak_decay``, the round ends by
taking that fraction of each layer's cumulative update off along its top leak directions
(:func:`~nse_hub.algorithm.update.leak_decay_update`), as a rank-``leak_directions`` part of its own adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.algorithm.batches import build_key_batch, build_value_batch
from nse_hub.algorithm.keys import KeyProbe
from nse_hub.algorithm.lifelong import FeatureStats, combine_all
from nse_hub.algorithm.ultraedit import bound_norm, editing_features, pseudo_values, ultraedit_update
from nse_hub.algorithm.update import (
    NullSpace,
    alphaedit_update,
    leak_decay_update,
    neuron_update,
    null_space,
    null_space_lean,
    projected_neuron_update,
    select_neurons,
    through_post_norm,
)
from nse_hub.algorithm.values import ValueResult, optimize_values, sequence_bytes
from nse_hub.architectures import ModelLayout
from nse_hub.config import EditConfig
from nse_hub.deltas import KeyMemory, LayerMemory, WeightDeltas
from nse_hub.errors import NonFiniteError
from nse_hub.metrics.edit_metrics.edit_metrics import comparison_record
from nse_hub.probes import mean_nlls, measure_probes
from nse_hub.requests import EditRequest
from nse_hub.tokens import pad_id

logger = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What a round wrote and how it went.

    Attributes:
        values: the value targets (with ``norm_anchor``: after rescaling).
        keys: per layer, the requests' keys on the final weights (``d_ff × n``), for the key memory.
        residual_before, residual_after: per request, ‖z − h‖ at the z-layer on the weights before
            and after the round.
        kept: per pass, which requests the residual filter kept (then, per retry, which ones still failed).
        selected_neurons: per layer, how many neurons each pass updated.
        seconds: time per phase (values, keys, solve).
        nullspace_dims: AlphaEdit: per layer, how many directions of ``C``'s null space the update
            could use (of ``d_ff``); empty for the other methods.
        norm_anchor: with ``norm_anchor``: the anchor norm the values were rescaled to.
        value_norms: with ``norm_anchor``: per request, ``‖v₀ + δ‖`` before rescaling.
        norm_skipped: with ``norm_anchor``: per request, whether it was skipped (norm above
            ``norm_anchor_max_ratio ×`` the anchor) and so not written.
        optimized: the value targets as the optimiser returned them (before NAS rescaling), or as
            given to :func:`run_round`: what a later round may reuse.
        lifelong: UltraEdit: per layer, the statistics of this round's editing features (what the
            session adds to the lifelong normalization when it commits the round); empty otherwise.

    UltraEdit has no value targets: ``values.targets`` and ``values.hidden`` are the z-layer outputs at
    the subjects' last tokens before the round, ``values.loss``/``nll`` each request's target NLL before it,
    ``residual_before`` is 0 and ``residual_after`` how far the round moved that output.
    """

    values: ValueResult
    keys: dict[int, torch.Tensor]
    residual_before: list[float]
    residual_after: list[float]
    kept: list[list[bool]]
    selected_neurons: dict[int, list[int]]
    seconds: dict[str, float] = field(default_factory=dict)
    nullspace_dims: dict[int, int] = field(default_factory=dict)
    norm_anchor: float | None = None
    value_norms: list[float] = field(default_factory=list)
    norm_skipped: list[bool] = field(default_factory=list)
    optimized: ValueResult | None = None
    lifelong: dict[int, FeatureStats] = field(default_factory=dict)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class EngineState:
    """What the engine keeps between rounds besides the deltas and the key memory (the session owns it).

    Attributes:
        null_spaces: AlphaEdit's null space of ``C`` per ``(layer, nullspace_threshold)``; derived
            from the second moments, so recomputed (one eigendecomposition per layer) when lost.
        norm_anchor: the NAS anchor norm, measured on the first round's values (original weights).
            The session saves it in ``session.json`` (``engine``), so a resumed session keeps it.
        lifelong_rounds: UltraEdit's lifelong normalization: per committed round, the statistics of
            its editing features per layer (``{}`` for rounds of other methods). The session saves each
            round's in its round folder; the running statistics are their combination in round order.
        lifelong_warmup: StableEdit's warm-up: statistics of features read but not written, used from
            the next round on and committed with it (part of that round's saved statistics).
    """

    null_spaces: dict[tuple[int, float], NullSpace] = field(default_factory=dict)
    norm_anchor: float | None = None
    lifelong_rounds: list[dict[int, FeatureStats]] = field(default_factory=list)
    lifelong_warmup: dict[int, FeatureStats] = field(default_factory=dict)

    def lifelong(self, layer: int) -> FeatureStats | None:
        """The running statistics of ``layer``'s editing features over the committed rounds and any warm-up."""
        return combine_all([*(r[layer] for r in self.lifelong_rounds if layer in r),
                            *([self.lifelong_warmup[layer]] if layer in self.lifelong_warmup else [])])

    def warm_up(self, stats: dict[int, FeatureStats]) -> None:
        """Add statistics of features that are not written (StableEdit's warm-up) before the next round."""
        for layer, part in stats.items():
            earlier = self.lifelong_warmup.get(layer)
            self.lifelong_warmup[layer] = part if earlier is None else earlier.combine(part)

    def commit_lifelong(self, stats: dict[int, FeatureStats]) -> None:
        """Record a committed round's feature statistics (``{}`` for a round without any).

        Pending warm-up statistics go into the round's own (warm-up first), so that they are saved
        and restored with it.
        """
        if stats and self.lifelong_warmup:
            stats = {layer: self.lifelong_warmup[layer].combine(s) if layer in self.lifelong_warmup else s
                     for layer, s in stats.items()}
            self.lifelong_warmup = {}
        self.lifelong_rounds.append(stats)

    def truncate_lifelong(self, rounds: int) -> None:
        """Keep the statistics of the first ``rounds`` rounds (rollback)."""
        del self.lifelong_rounds[rounds:]


@dataclass
class RoundInputs:
    """What a round needs besides its requests (the session owns all of it, ``state`` included)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: ModelLayout
    config: EditConfig
    deltas: WeightDeltas
    memory: KeyMemory
    second_moments: dict[int, torch.Tensor]
    context_templates: list[list[str]]
    state: EngineState = field(default_factory=EngineState)
    value_chunk_bytes: int | None = None  # the memory one chunk of the value step may use (None: the default)
    null_space_on_host: bool = False  # AlphaEdit, NSE-null: the eigendecomposition on the host (it does not fit)


def _keep_mask(config: EditConfig, residual: torch.Tensor, hidden_norm: torch.Tensor) -> torch.Tensor:
    if not config.nse_family:
        return torch.ones_like(residual, dtype=torch.bool)
    scale = hidden_norm if config.thresholds == "relative" else torch.ones_like(hidden_norm)
    return (residual > config.alpha * scale) & (residual < config.upper_bound * scale)


# (model, layout, batch, config, pad token, *, progress=…) -> value targets
ValueOptimizer = Callable[..., ValueResult]

# NAS measures its anchor as a mean with the largest 5 % of norms left out.
_ANCHOR_TRIM = 0.05


def anchor_values(values: ValueResult, mlp_outputs: torch.Tensor, anchor: float | None,
                  max_ratio: float) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """NAS: rescale each value's MLP-output part ``v* = v₀ + δ`` to the anchor norm.

    With ``z = h + δ`` and ``v₀`` the MLP output inside ``h``, the new target is
    ``h − v₀ + v* · anchor / ‖v*‖``; a request whose ``‖v*‖`` exceeds ``max_ratio × anchor`` keeps
    ``z = h`` (skipped). Without an ``anchor``, it is measured here: the mean ``‖v*‖`` with the
    largest 5 % left out.

    Returns:
        the new targets, the anchor, ``‖v*‖`` per request and the skipped mask.
    """
    hidden, v0 = values.hidden.double(), mlp_outputs.to(values.hidden.device).double()
    v_star = v0 + (values.targets.double() - hidden)
    norms = v_star.norm(dim=1)
    if anchor is None:
        ordered = torch.sort(norms).values
        kept = len(ordered) - math.floor(_ANCHOR_TRIM * len(ordered))
        anchor = float(ordered[:kept].mean())
    skipped = norms > max_ratio * anchor
    scaled = v_star * (anchor / norms.clamp_min(torch.finfo(torch.float64).tiny))[:, None]
    new_v = torch.where(skipped[:, None], v0, scaled)
    return (hidden - v0 + new_v).to(values.targets.dtype), anchor, norms, skipped


def _mlp_outputs(model: PreTrainedModel, layout: ModelLayout, probe: KeyProbe, layer: int) -> torch.Tensor:
    """What the MLP of ``layer`` adds to the residual stream at each request's subject (``n × d_model``)."""
    out = probe.read([], output_layers=[layer]).outputs[layer]
    norm = layout.post_mlp_norm(model, layer)
    if norm is not None:
        with torch.no_grad():
            out = norm(out.to(model.dtype)).float()
    return out


def _null_space(inputs: RoundInputs, layer: int, neurons: torch.Tensor | None = None) -> NullSpace:
    """The null space of ``C`` at ``layer`` (cached), or of ``C_SS`` for a subset ``neurons`` of them (not cached)."""
    second_moment = inputs.second_moments[layer]
    if neurons is not None and len(neurons) < second_moment.shape[0]:
        index = neurons.to(second_moment.device)
        device = "cpu" if inputs.null_space_on_host else inputs.memory.device
        return null_space(second_moment[index][:, index].to(device), inputs.config.nullspace_threshold)
    key = (layer, inputs.config.nullspace_threshold)
    cache = inputs.state.null_spaces
    if key not in cache:
        if inputs.config.lean:
            device = "cpu" if inputs.null_space_on_host else inputs.memory.device
            cache[key] = null_space_lean(inputs.second_moments[layer], key[1], device)
        else:
            cache[key] = null_space(inputs.second_moments[layer].to(inputs.memory.device), key[1])
        if cache[key].dims == 0:
            logger.warning("The null space of C at layer %d is empty with nullspace_threshold=%g: AlphaEdit "
                           "cannot change this layer. Raise nullspace_threshold.", layer, key[1])
    return cache[key]


def _memory(inputs: RoundInputs, layer: int, extra: torch.Tensor | None = None) -> torch.Tensor | LayerMemory:
    """``ωP``, the key memory of ``layer`` weighted by ``key_memory_weight``, as the configured engine reads it
    (lean: keys or a float32 host matrix); ``extra``: ``d_ff × n`` keys to guard as if an earlier round wrote
    them."""
    weight = inputs.config.key_memory_weight
    if not inputs.config.lean:
        memory = inputs.memory.P(layer, weight)
        return memory if extra is None else memory + weight * (extra.double() @ extra.double().T).to(memory.device)
    memory = inputs.memory.layer(layer, weight)
    if extra is None:
        return memory
    extra = extra.float().cpu()
    if memory.matrix is not None:
        return dataclasses.replace(memory, matrix=memory.matrix + extra @ extra.T)
    keys = extra if memory.keys is None else torch.cat([memory.keys, extra], dim=1)
    return dataclasses.replace(memory, keys=keys)


def _failing(inputs: RoundInputs, requests: Sequence[EditRequest]) -> torch.Tensor:
    """Which requests ``retry_failed`` writes again, by ``config.retry_criterion`` on their rewrite prompt (the one
    probe plan). ``wins``: the new target does not beat the true one, the round report's efficacy test (the metric
    module's rule; requests without a true target never fail it). ``greedy``: some new-target token is not the
    argmax after the prompt and the target's earlier tokens, so greedy decoding would not write the target."""
    found = measure_probes(inputs.model, inputs.tokenizer, inputs.layout, requests, inputs.config.batch_size,
                           rewrite_only=True)
    if inputs.config.retry_criterion == "greedy":
        return torch.tensor([not all(scores["rewrite_new"][0].token_correct) for scores in found])
    records = [comparison_record(nlls.get("rewrite_new"), nlls.get("rewrite_true"), new_should_win=True)
               for nlls in map(mean_nlls, found)]
    return torch.tensor([record is not None and record[0] != 1.0 for record in records])


def _check_values(values: ValueResult, what: str) -> None:
    """Refuse value targets with NaN or infinite entries (NaN residuals would make the round a silent no-op)."""
    bad = ~(torch.isfinite(values.targets).all(dim=1) & torch.isfinite(values.hidden).all(dim=1))
    if bool(bad.any()):
        numbers = ", ".join(str(i) for i in torch.nonzero(bad).squeeze(1).tolist()[:10])
        raise NonFiniteError(f"the {what} value targets of request(s) {numbers} are NaN or infinite: {_FIX[what]}; "
                             "the round was discarded, nothing was written")


_FIX = {"optimised": "the value optimisation diverged (lower v_lr or clamp_norm_factor)",
        "given": "the reused value targets are damaged (a broken or altered values.safetensors)",
        "rescaled": "norm anchoring divided by a zero norm (turn norm_anchor off)"}


def _check_finite(tensors: dict[str, torch.Tensor], layer: int, what: str) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"the {what} of layer {layer} ({name}) holds NaN or infinite numbers: the update "
                                 "overflowed (raise mom2_update_weight, or lower v_lr); the round was discarded, "
                                 "nothing was written")


def _value_weights(inputs: RoundInputs) -> AbstractContextManager[None]:
    """The weights value targets are computed on: NSE's original ones, or the current ones."""
    return inputs.deltas.original() if inputs.config.nse_family else nullcontext()


def round_values(inputs: RoundInputs, requests: Sequence[EditRequest],
                 optimize: ValueOptimizer = optimize_values, progress: bool = False) -> ValueResult:
    """The value targets of ``requests``: optimised on the original weights for the NSE family (so valid after
    any rounds), on the current weights for the other methods (valid for the next round only).

    Raises:
        ValueError: the method computes no value targets (UltraEdit).
        NonFiniteError: the optimisation produced NaN or infinite targets.
    """
    model, layout, config = inputs.model, inputs.layout, inputs.config
    if config.method == "ultraedit":
        raise ValueError("UltraEdit computes no value targets (its update comes from one gradient step)")
    value_batch = build_value_batch(inputs.tokenizer, requests, [t for g in inputs.context_templates for t in g])
    sizing = {}
    if inputs.value_chunk_bytes:  # the lean engine's chunk, sized to the device by the memory plan
        one = sequence_bytes(model, layout, value_batch, config.z_layer)
        sizing["max_sequences"] = max(1, inputs.value_chunk_bytes // max(1, one))
    with _value_weights(inputs):
        values = optimize(model, layout, value_batch, config, pad_id(inputs.tokenizer), progress=progress, **sizing)
    _check_values(values, "optimised")
    return values


def run_round(inputs: RoundInputs, requests: Sequence[EditRequest],
              optimize: ValueOptimizer = optimize_values, values: ValueResult | None = None,
              progress: bool = False) -> RoundOutcome:
    """Write ``requests`` into the model as a pending round of ``inputs.deltas``.

    The caller commits the round (``deltas.commit_round()``, ``memory.add_round(outcome.keys)`` and
    ``state.commit_lifelong(outcome.lifelong)``) or discards it; nothing else changes (except the engine's
    derived state: null spaces, anchor).

    ``values`` are precomputed value targets of ``requests`` (a stored round's ``outcome.optimized``):
    they replace the optimisation. Only NSE's are valid on top of another history, since NSE
    computes them on the original weights; the other methods compute them on the current weights.

    Raises:
        SingularSystemError: a layer's system is singular or not positive definite.
        NonFiniteError: value targets, an update or the keys after it hold NaN or infinite numbers.
    """
    model, layout, config, state = inputs.model, inputs.layout, inputs.config, inputs.state
    layers = config.layers
    pad = pad_id(inputs.tokenizer)
    clock = _Clock()
    if config.method == "ultraedit":
        if values is not None:
            raise ValueError("UltraEdit computes no value targets: run its rounds without values=")
        return _ultraedit_round(inputs, requests, clock)

    with clock.phase("values"):
        if values is None:
            values = round_values(inputs, requests, optimize, progress)
        elif values.targets.shape[0] != len(requests):
            raise ValueError(f"{values.targets.shape[0]} precomputed value targets for {len(requests)} requests")
        else:
            _check_values(values, "given")
    optimized = values
    targets = values.targets.to(inputs.memory.device)
    hidden_norm = values.hidden.norm(dim=1).to(inputs.memory.device)

    with clock.phase("keys"):
        probe = KeyProbe(model, layout, build_key_batch(inputs.tokenizer, requests, inputs.context_templates),
                         layers[0], config.z_layer, pad, config.batch_size)
    skipped = torch.zeros(len(requests), dtype=torch.bool, device=targets.device)
    nas: dict = {}
    if config.norm_anchor:
        with clock.phase("values"), _value_weights(inputs):
            mlp_out = _mlp_outputs(model, layout, probe, config.z_layer)
        if state.norm_anchor is None and not config.nse_family and inputs.deltas.rounds:
            logger.warning("The NAS anchor is measured on edited weights: this session does not know the one "
                           "measured on its first round. Pass RoundInputs(state=EngineState(norm_anchor=…)).")
        anchored, state.norm_anchor, norms, skipped = anchor_values(values, mlp_out, state.norm_anchor,
                                                                    config.norm_anchor_max_ratio)
        targets, skipped = anchored.to(targets.device), skipped.to(targets.device)
        values = dataclasses.replace(values, targets=anchored.to(values.targets.device))  # what is written
        _check_values(values, "rescaled")
        nas = {"norm_anchor": state.norm_anchor, "value_norms": norms.tolist(), "norm_skipped": skipped.tolist()}

    residual_before: list[float] = []
    kept_per_pass: list[list[bool]] = []
    selected: dict[int, list[int]] = {layer: [] for layer in layers}
    nullspace_dims: dict[int, int] = {}
    normed = layout.post_mlp_norm_path is not None  # Gemma: MLP output is normalised before the residual add
    for _ in range(config.update_passes):
        with clock.phase("keys"):
            keys, current, outputs = probe.read([layers[0]], output_layers=[layers[0]] if normed else [])
        residual = (targets - current.to(targets.device)).norm(dim=1)
        if not residual_before:
            residual_before = residual.tolist()
        keep = _keep_mask(config, residual, hidden_norm) & ~skipped
        kept_per_pass.append(keep.tolist())
        if not bool(keep.any()):
            break
        kept = torch.nonzero(keep).squeeze(1).tolist()
        first = (keys, current, outputs)  # layer 0 was read on the same weights just above
        _write_layers(inputs, probe, targets, kept, [], clock, selected, nullspace_dims, first)
    for _ in range(config.retry_failed):
        with clock.phase("retries"):
            failing = _failing(inputs, requests).to(skipped.device) & ~skipped
        if not bool(failing.any()):
            break
        kept_per_pass.append(failing.tolist())
        kept = torch.nonzero(failing).squeeze(1).tolist()
        guarded = torch.nonzero(~failing).squeeze(1).tolist()
        _write_layers(inputs, probe, targets, kept, guarded, clock, selected, nullspace_dims)
    if config.leak_decay:
        with clock.phase("solve"):
            decay_leaks(inputs.deltas, inputs.second_moments, config.leak_decay, config.leak_directions)
    with clock.phase("keys"):
        final_keys, final, _ = probe.read(layers)
    for layer in layers:
        _check_finite({"keys": final_keys[layer]}, layer, "edited model's reading")
    _check_finite({"output": final}, config.z_layer, "edited model's reading")
    residual_after = (targets - final.to(targets.device)).norm(dim=1).tolist()
    if not residual_before:
        residual_before = residual_after
    return RoundOutcome(values, final_keys, residual_before, residual_after, kept_per_pass, selected,
                        dict(clock.seconds), nullspace_dims, **nas, optimized=optimized)


def decay_leaks(deltas: WeightDeltas, second_moments: dict[int, torch.Tensor], fraction: float, count: int) -> None:
    """``leak_decay``'s step: take ``fraction`` of every edit layer's cumulative update off along its ``count`` top
    leak directions (:func:`~nse_hub.algorithm.update.leak_decay_update`), added to the round in progress."""
    for layer in deltas.layers:
        total = deltas.cumulative(layer)
        if total is not None:  # nothing written to this layer yet (every request filtered or skipped)
            deltas.add(layer, leak_decay_update(total, second_moments[layer], fraction, count))


def _write_layers(inputs: RoundInputs, probe: KeyProbe, targets: torch.Tensor, kept: list[int],
                  guarded: list[int], clock: _Clock, selected: dict[int, list[int]],
                  nullspace_dims: dict[int, int], first: tuple | None = None) -> None:
    """One pass over the edit layers: each writes its share of what the z-layer output of the ``kept`` requests
    still lacks. ``guarded`` requests' keys join the key memory for this pass (a retry keeps the round's other
    writes); ``first``: layer 0's keys, z-layer output and projection outputs of every request, already read."""
    model, layout, config = inputs.model, inputs.layout, inputs.config
    layers = config.layers
    normed = layout.post_mlp_norm_path is not None  # Gemma: MLP output is normalised before the residual add
    for j, layer in enumerate(layers):
        with clock.phase("keys"):
            if j == 0 and first is not None:
                keys, current, outputs = first
                layer_keys, current_kept = keys[layer][:, kept], current[kept]
                output_kept = outputs[layer][kept] if normed else None
                guard_keys = keys[layer][:, guarded] if guarded else None
            else:
                reading = probe.read([layer], kept + guarded, output_layers=[layer] if normed else [])
                layer_keys, guard_keys = reading.keys[layer][:, :len(kept)], reading.keys[layer][:, len(kept):]
                current_kept = reading.z_out[:len(kept)]
                output_kept = reading.outputs[layer][:len(kept)] if normed else None
                guard_keys = guard_keys if guarded else None
        with clock.phase("solve"):
            memory = _memory(inputs, layer, guard_keys) if config.uses_key_memory else None
            neurons = (select_neurons(layer_keys, config.neuron_threshold) if config.nse_family
                       else torch.arange(layer_keys.shape[0]))
            selected[layer].append(len(neurons))
            # This layer's share of what the z-layer output still lacks (the rest is left to later layers).
            residual_kept = (targets[kept] - current_kept.to(targets.device)).T.double() / (len(layers) - j)
            if normed:
                residual_kept = through_post_norm(layout.post_mlp_norm(model, layer), output_kept.to(
                    model.dtype), residual_kept.to(output_kept.device)).to(targets.device, torch.float64)
            if config.method == "alphaedit":
                space = _null_space(inputs, layer)
                nullspace_dims[layer] = space.dims
                factors = alphaedit_update(layer_keys, residual_kept, space, memory, config.L2, layer,
                                           config.nullspace_mom2_weight)
            elif config.method == "nse_null":
                space = _null_space(inputs, layer, neurons)
                nullspace_dims[layer] = space.dims
                factors = projected_neuron_update(layer_keys, residual_kept, space, memory, config.L2, neurons,
                                                  layer, config.nullspace_mom2_weight)
            else:
                factors = neuron_update(layer_keys, residual_kept, inputs.second_moments[layer], memory,
                                        config.mom2_update_weight, neurons, layer,
                                        device=inputs.memory.device if config.lean else None)
            _check_finite({"B": factors.B, "A": factors.A}, layer, "update")
            inputs.deltas.add(layer, factors)


#: The template groups of UltraEdit's key reads: the prompt as it is (see the module docstring).
PLAIN_PROMPTS: tuple[tuple[str, ...], ...] = (("{}",),)


def _ultraedit_round(inputs: RoundInputs, requests: Sequence[EditRequest], clock: _Clock) -> RoundOutcome:
    """UltraEdit's round: features on the current weights, lifelong normalization, one ridge solve per layer.

    The lifelong statistics in ``inputs.state`` are only read: the round's own statistics are returned
    (``outcome.lifelong``) for the session to commit with the round.
    """
    model, layout, config = inputs.model, inputs.layout, inputs.config
    layers, n = config.layers, len(requests)
    pad = pad_id(inputs.tokenizer)
    with clock.phase("keys"):
        probe = KeyProbe(model, layout, build_key_batch(inputs.tokenizer, requests, PLAIN_PROMPTS), layers[0],
                         config.z_layer, pad, config.batch_size)
        hidden_before = probe.read([]).z_out
    with clock.phase("features"):
        features = editing_features(model, layout, inputs.tokenizer, requests, layers, pad, config.batch_size)
    round_stats: dict[int, FeatureStats] = {}
    updates = {}
    comoment_dims = layout.hidden_size if config.ultraedit_whitening == "full" else 0
    with clock.phase("solve"):
        device = inputs.memory.device
        for layer in layers:
            stacked = features.stacked(layer).to(device)
            round_stats[layer] = FeatureStats.of(stacked, comoment_dims)
            earlier = inputs.state.lifelong(layer)
            running = round_stats[layer] if earlier is None else earlier.to(device).combine(round_stats[layer])
            values = pseudo_values(stacked, running, layout.intermediate_size, config.ultraedit_lr,
                                   config.ultraedit_whitening)
            factors = ultraedit_update(stacked[:, :layout.intermediate_size], values, config.ultraedit_ridge, layer)
            weight_norm = float(inputs.deltas.originals[layer].double().norm())
            updates[layer] = bound_norm(factors, weight_norm, config.ultraedit_norm_cap)
    for layer, factors in updates.items():  # all from the gradients on the weights before the round
        inputs.deltas.add(layer, factors)
    with clock.phase("keys"):
        final_keys, final, _ = probe.read(layers)
    moved = (final - hidden_before).norm(dim=1).tolist()
    values = ValueResult(hidden_before, hidden_before, features.nll, features.nll, [0] * n)
    return RoundOutcome(values, final_keys, [0.0] * n, moved, [[True] * n],
                        {layer: [layout.intermediate_size] for layer in layers}, dict(clock.seconds),
                        lifelong={layer: s.to("cpu") for layer, s in round_stats.items()})
