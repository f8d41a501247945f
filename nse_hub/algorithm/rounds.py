"""One edit round of NSE or MEMIT (NSE.md, "One round").

NSE: values on the original weights; up to ``max_iterations - 1`` passes over the edit layers, each
keeping only requests whose residual lies between ``alpha`` and ``upper_bound`` and updating only the
selected neurons. MEMIT: values on the current weights, one pass, every request, every neuron.
Both spread the residual over the remaining layers, include the key memory ``P`` of earlier rounds
in the solve, and add this round's keys to it afterwards.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.algorithm.batches import ValueBatch, build_key_batch, build_value_batch
from nse_hub.algorithm.keys import KeyProbe
from nse_hub.algorithm.update import neuron_update, select_neurons, through_post_norm
from nse_hub.algorithm.values import ValueResult, optimize_values
from nse_hub.architectures import ModelLayout
from nse_hub.config import EditConfig
from nse_hub.deltas import KeyMemory, WeightDeltas
from nse_hub.requests import EditRequest
from nse_hub.tokens import pad_id


@dataclass
class RoundOutcome:
    """What a round wrote and how it went.

    Attributes:
        values: the value targets.
        keys: per layer, the requests' keys on the final weights (``d_ff × n``), for the key memory.
        residual_before, residual_after: per request, ‖z − h‖ at the z-layer on the weights before
            and after the round.
        kept: per pass, which requests the residual filter kept.
        selected_neurons: per layer, how many neurons each pass updated.
        seconds: time per phase (values, keys, solve).
    """

    values: ValueResult
    keys: dict[int, torch.Tensor]
    residual_before: list[float]
    residual_after: list[float]
    kept: list[list[bool]]
    selected_neurons: dict[int, list[int]]
    seconds: dict[str, float] = field(default_factory=dict)


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
class RoundInputs:
    """What a round needs besides its requests (the session owns all of it)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: ModelLayout
    config: EditConfig
    deltas: WeightDeltas
    memory: KeyMemory
    second_moments: dict[int, torch.Tensor]
    context_templates: list[list[str]]


def _keep_mask(config: EditConfig, residual: torch.Tensor, hidden_norm: torch.Tensor) -> torch.Tensor:
    if config.method == "memit":
        return torch.ones_like(residual, dtype=torch.bool)
    scale = hidden_norm if config.thresholds == "relative" else torch.ones_like(hidden_norm)
    return (residual > config.alpha * scale) & (residual < config.upper_bound * scale)


ValueOptimizer = Callable[[PreTrainedModel, ModelLayout, ValueBatch, EditConfig, int], ValueResult]


def run_round(inputs: RoundInputs, requests: Sequence[EditRequest],
              optimize: ValueOptimizer = optimize_values) -> RoundOutcome:
    """Write ``requests`` into the model as a pending round of ``inputs.deltas``.

    The caller commits the round (``deltas.commit_round()`` and ``memory.add_round(outcome.keys)``)
    or discards it; nothing else changes.
    """
    model, layout, config = inputs.model, inputs.layout, inputs.config
    layers = config.layers
    pad = pad_id(inputs.tokenizer)
    clock = _Clock()

    with clock.phase("values"):
        value_batch = build_value_batch(inputs.tokenizer, requests, [t for g in inputs.context_templates for t in g])
        rewind = inputs.deltas.original() if config.method == "nse" else nullcontext()
        with rewind:
            values = optimize(model, layout, value_batch, config, pad)
    targets = values.targets.to(inputs.memory.device)
    hidden_norm = values.hidden.norm(dim=1).to(inputs.memory.device)

    with clock.phase("keys"):
        probe = KeyProbe(model, layout, build_key_batch(inputs.tokenizer, requests, inputs.context_templates),
                         layers[0], config.z_layer, pad, config.batch_size)
    residual_before: list[float] = []
    kept_per_pass: list[list[bool]] = []
    selected: dict[int, list[int]] = {layer: [] for layer in layers}
    normed = layout.post_mlp_norm_path is not None  # Gemma: MLP output is normalised before the residual add
    for _ in range(config.update_passes):
        with clock.phase("keys"):
            keys, current, outputs = probe.read([layers[0]], output_layers=[layers[0]] if normed else [])
        residual = (targets - current.to(targets.device)).norm(dim=1)
        if not residual_before:
            residual_before = residual.tolist()
        keep = _keep_mask(config, residual, hidden_norm)
        kept_per_pass.append(keep.tolist())
        if not bool(keep.any()):
            break
        kept = torch.nonzero(keep).squeeze(1).tolist()
        for j, layer in enumerate(layers):
            with clock.phase("keys"):
                if j == 0:  # read on the same weights just above
                    layer_keys, current_kept = keys[layer][:, kept], current[kept]
                    output_kept = outputs[layer][kept] if normed else None
                else:
                    reading = probe.read([layer], kept, output_layers=[layer] if normed else [])
                    layer_keys, current_kept = reading.keys[layer], reading.z_out
                    output_kept = reading.outputs.get(layer)
            with clock.phase("solve"):
                neurons = (select_neurons(layer_keys, config.neuron_threshold) if config.method == "nse"
                           else torch.arange(layer_keys.shape[0]))
                selected[layer].append(len(neurons))
                # This layer's share of what the z-layer output still lacks (the rest is left to later layers).
                residual_kept = (targets[kept] - current_kept.to(targets.device)).T.double() / (len(layers) - j)
                if normed:
                    residual_kept = through_post_norm(layout.post_mlp_norm(model, layer), output_kept.to(
                        model.dtype), residual_kept.to(output_kept.device)).to(targets.device, torch.float64)
                factors = neuron_update(layer_keys, residual_kept, inputs.second_moments[layer],
                                        inputs.memory.P(layer), config.mom2_update_weight, neurons)
                inputs.deltas.add(layer, factors)
    with clock.phase("keys"):
        final_keys, final, _ = probe.read(layers)
    residual_after = (targets - final.to(targets.device)).norm(dim=1).tolist()
    if not residual_before:
        residual_before = residual_after
    return RoundOutcome(values, final_keys, residual_before, residual_after, kept_per_pass, selected,
                        dict(clock.seconds))
