"""Keys (projection inputs at the subject's last token) and z-layer outputs on the current weights."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from nse_hub.algorithm.batches import KeyBatch
from nse_hub.architectures import ModelLayout
from nse_hub.tokens import pad_right
from nse_hub.tracing import StopForward, model_device, read_input, read_output, run_forward, start_at, stop_after


class Reading(NamedTuple):
    """What one probe pass read, for the requests asked about (in that order).

    Attributes:
        keys: per layer, keys averaged over context templates, ``d_ff × n'`` float32.
        z_out: z-layer outputs at the subject's last token of the bare prompt, ``n' × d_model``.
        outputs: per layer asked for, the projection's output there, ``n' × d_model``.
    """

    keys: dict[int, torch.Tensor]
    z_out: torch.Tensor
    outputs: dict[int, torch.Tensor]


class KeyProbe:
    """Reads keys and z-layer outputs for a round's requests, running only the edit layers.

    Layers below the first edit layer are never edited, so their output (the first edit layer's
    input) is computed once and every later read starts from it.

    Args:
        model, layout: the model.
        batch: the requests' prompts in every context template.
        first_layer: the first edit layer.
        z_layer: the layer whose output holds the value targets.
        pad: padding token id.
        batch_size: rows per forward pass.
    """

    def __init__(self, model: PreTrainedModel, layout: ModelLayout, batch: KeyBatch, first_layer: int,
                 z_layer: int, pad: int, batch_size: int) -> None:
        self.model, self.layout, self.batch = model, layout, batch
        self.first_layer, self.z_layer = first_layer, z_layer
        self.device = model_device(model)
        self.averaging = batch.averaging(self.device)
        self.chunks = [list(range(s, min(s + batch_size, len(batch.sequences))))
                       for s in range(0, len(batch.sequences), batch_size)]
        self.inputs = []
        for rows in self.chunks:
            ids, mask = pad_right([batch.sequences[r] for r in rows], pad, self.device)
            self.inputs.append((ids, mask, self._first_layer_input(ids, mask)))

    @torch.no_grad()
    def _first_layer_input(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen = {}

        def grab(hidden: torch.Tensor) -> None:
            seen["h"] = hidden.detach().clone()
            raise StopForward

        with read_input(self.layout.layer(self.model, self.first_layer), grab):
            run_forward(self.layout.decoder(self.model), input_ids=ids, attention_mask=mask, use_cache=False)
        return seen["h"]

    @torch.no_grad()
    def read(self, key_layers: Sequence[int], requests: Sequence[int] | None = None,
             output_layers: Sequence[int] = ()) -> Reading:
        """Keys at ``key_layers``, z-layer outputs, and projection outputs at ``output_layers`` of ``requests``."""
        requests = list(range(self.batch.num_requests)) if requests is None else list(requests)
        wanted = set(requests)
        rows_keys = {layer: [] for layer in key_layers}
        rows_out = {layer: [] for layer in output_layers}
        rows_z = []
        layers = self.layout.layers(self.model)
        for rows, (ids, mask, first_input) in zip(self.chunks, self.inputs):
            picked = [k for k, r in enumerate(rows) if self.batch.request_of[r] in wanted]
            if not picked:
                continue
            lookup = torch.tensor([self.batch.lookup[rows[k]] for k in picked], device=self.device)
            local = torch.tensor(picked, device=self.device)
            at = (torch.arange(len(picked), device=self.device), lookup)  # row in this forward, token
            with ExitStack() as hooks:
                for layer in key_layers:
                    hooks.enter_context(read_input(
                        self.layout.projection(self.model, layer),
                        lambda k, layer=layer, at=at: rows_keys[layer].append(k[at].float())))
                for layer in output_layers:
                    hooks.enter_context(read_output(
                        self.layout.projection(self.model, layer),
                        lambda x, layer=layer, at=at: rows_out[layer].append(x[at].float())))
                hooks.enter_context(read_output(layers[self.z_layer],
                                                lambda h, at=at: rows_z.append(h[at].float())))
                hooks.enter_context(stop_after(layers[self.z_layer]))
                hooks.enter_context(start_at(layers, self.first_layer, first_input[local],
                                             self.layout.layer_returns_tuple))
                run_forward(self.layout.decoder(self.model), input_ids=ids[local], attention_mask=mask[local],
                            use_cache=False)
        all_rows = [r for rows in self.chunks for r in rows if self.batch.request_of[r] in wanted]
        averaging = self.averaging[requests][:, all_rows]
        keys = {layer: (averaging @ torch.cat(parts)).T.contiguous() for layer, parts in rows_keys.items()}
        row_at = {row: k for k, row in enumerate(all_rows)}
        plain = [row_at[self.batch.plain_row[r]] for r in requests]
        outputs = {layer: torch.cat(parts)[plain] for layer, parts in rows_out.items()}
        return Reading(keys, torch.cat(rows_z)[plain], outputs)
