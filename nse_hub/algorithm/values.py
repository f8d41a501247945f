"""Value targets ``z = h + δ``: where the z-layer's output must go for each request to say its new target.

:func:`optimize_values` optimises every request of a round together. Its losses are independent
per request (each δ only touches its own sequences, the total is their sum, Adam is elementwise),
so it computes what the reference's one-request-at-a-time loop computes, with less work:

* only the layers above the z-layer run inside the loop, fed from the z-layer outputs cached by
  one forward pass before it;
* positions before the subject's last token cannot see δ (attention is causal), so their keys and
  values are cached too and each step runs only the suffix from the subject's last token on;
* the output head runs only at positions that predict a target token and at the KL positions;
* a request whose loss falls below ``v_early_stop_loss`` leaves the batch;
* the reference's last forward pass, whose only use is an early-stop test that cannot change δ
  any more, is not run.

:func:`optimize_values_reference` is the straightforward per-request loop of the reference, kept
for tests (the two must agree) and for benchmarks (to measure the difference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from nse_hub.algorithm.batches import ValueBatch
from nse_hub.architectures import ModelLayout
from nse_hub.config import EditConfig
from nse_hub.tokens import pad_right
from nse_hub.tracing import edit_output, read_output, start_at


@dataclass
class ValueResult:
    """Value targets of a round's requests.

    Attributes:
        targets: ``n × d_model``, ``z = h + δ``.
        hidden: ``n × d_model``, ``h``: the z-layer output at the subject's last token of the bare prompt.
        loss: per request, the last loss measured (NLL + KL + weight decay).
        nll: per request, the NLL part of it.
        steps: per request, the optimiser steps taken.
    """

    targets: torch.Tensor
    hidden: torch.Tensor
    loss: list[float]
    nll: list[float]
    steps: list[int]


@dataclass
class _LossIndex:
    """Where each active request's loss terms sit in a batch of active rows."""

    token_rows: torch.Tensor
    token_cols: torch.Tensor
    token_labels: torch.Tensor
    token_request: torch.Tensor  # position of the request in the active list
    token_weight: torch.Tensor  # 1 / (target length × rewrite rows of the request)
    kl_rows: torch.Tensor
    kl_cols: torch.Tensor
    kl_request: torch.Tensor  # request index (into all requests), for the initial distribution


def _loss_index(batch: ValueBatch, rows: Sequence[int], active: Sequence[int], cut: Sequence[int],
                device: torch.device) -> _LossIndex:
    """``cut[row]``: how many leading tokens of the row are not in the batch (served from the cache)."""
    position = {request: k for k, request in enumerate(active)}
    rewrite_rows = {request: 0 for request in active}
    for row in rows:
        if batch.labels[row]:
            rewrite_rows[batch.request_of[row]] += 1
    t_rows, t_cols, t_labels, t_req, t_weight, kl_rows, kl_cols, kl_req = [], [], [], [], [], [], [], []
    for local, row in enumerate(rows):
        request = batch.request_of[row]
        if not batch.labels[row]:
            kl_rows.append(local)
            kl_cols.append(batch.lookup[row] - cut[row])
            kl_req.append(request)
            continue
        labels = batch.labels[row]
        for position_in_seq, label in zip(batch.target_positions[row], labels):
            t_rows.append(local)
            t_cols.append(position_in_seq - cut[row])
            t_labels.append(label)
            t_req.append(position[request])
            t_weight.append(1.0 / (len(labels) * rewrite_rows[request]))

    def tensor(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return _LossIndex(tensor(t_rows), tensor(t_cols), tensor(t_labels), tensor(t_req),
                      tensor(t_weight, torch.float32), tensor(kl_rows), tensor(kl_cols), tensor(kl_req))


def _request_losses(model: PreTrainedModel, layout: ModelLayout, hidden: torch.Tensor, index: _LossIndex,
                    kl_init: torch.Tensor, n_active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per active request: mean target NLL and KL(current ‖ initial) at its KL position."""
    logprobs = torch.log_softmax(layout.logits(model, hidden[index.token_rows, index.token_cols]).float(), dim=-1)
    picked = logprobs.gather(1, index.token_labels[:, None]).squeeze(1)
    nll = torch.zeros(n_active, device=hidden.device).index_add(0, index.token_request, -picked * index.token_weight)
    current = torch.log_softmax(layout.logits(model, hidden[index.kl_rows, index.kl_cols]).float(), dim=-1)
    initial = kl_init[index.kl_request]
    kl = (current.exp() * (current - initial)).sum(-1)
    return nll, kl


def _clamp_(delta: torch.Tensor, max_norm: float) -> None:
    norm = delta.norm()
    if norm > max_norm:
        delta.mul_(max_norm / norm)


def optimize_values(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, config: EditConfig,
                    pad: int) -> ValueResult:
    """Optimise all requests' value targets together (see the module docstring)."""
    device = next(model.parameters()).device
    layers = layout.layers(model)
    decoder = layout.decoder(model)
    z = config.z_layer
    n_rows, n = len(batch.sequences), batch.num_requests

    # Layout: [left-padded prefix | suffix from the subject's last token, right-padded]. The prefix is
    # served from a key/value cache, unless a sliding attention window shorter than the sequences
    # would see the left padding (then: whole sequences, right-padded, no cache; same result).
    longest = max(len(s) for s in batch.sequences)
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    cut = list(batch.lookup) if not window or longest <= window else [0] * n_rows
    prefix = max(cut)
    width = max(len(s) - c for s, c in zip(batch.sequences, cut))
    ids = torch.full((n_rows, prefix + width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (seq, c) in enumerate(zip(batch.sequences, cut)):
        ids[row, prefix - c: prefix + len(seq) - c] = torch.tensor(seq)
        mask[row, prefix - c: prefix + len(seq) - c] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inject_col = torch.tensor([p - c for p, c in zip(batch.lookup, cut)], device=device)

    with torch.no_grad():
        seen: dict[str, torch.Tensor] = {}
        cache = DynamicCache() if prefix else None  # plain layers: sliding-window layers would crop
        with read_output(layers[z], lambda h: seen.__setitem__("z", h)):
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=cache is not None)
        suffix_hidden = seen["z"][:, prefix:].clone()
        plain, kl = torch.tensor(batch.plain_row), torch.tensor(batch.kl_row)
        hidden = suffix_hidden[plain, inject_col[plain]].float()
        final_kl = out.last_hidden_state[kl, prefix + inject_col[kl]]
        kl_init = torch.log_softmax(layout.logits(model, final_kl).float(), -1)
        prefix_kv = ([(layer.keys[:, :, :prefix].clone(), layer.values[:, :, :prefix].clone())
                      for layer in cache.layers] if cache is not None else None)

    def run_suffix(rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        base = suffix_hidden[rows]
        added = torch.zeros(base.shape, dtype=delta_rows.dtype, device=device).index_put(
            (torch.arange(len(rows), device=device), inject_col[rows]), delta_rows)
        hidden_in = (base.float() + added).to(base.dtype)
        if z == len(layers) - 1:  # nothing above the z-layer but the final norm
            return layout.final_norm(model)(hidden_in)
        cache = DynamicCache([(k[rows], v[rows]) for k, v in prefix_kv]) if prefix_kv is not None else None
        with start_at(layers, z + 1, hidden_in, layout.layer_returns_tuple):
            result = decoder(input_ids=ids[rows, prefix:], attention_mask=mask[rows],
                             position_ids=positions[rows, prefix:], past_key_values=cache,
                             use_cache=cache is not None)
        return result.last_hidden_state

    deltas = [torch.zeros(layout.hidden_size, device=device, requires_grad=True) for _ in range(n)]
    optimizer = torch.optim.Adam(deltas, lr=config.v_lr)
    h_norm = hidden.norm(dim=1)
    max_norm = (config.clamp_norm_factor * h_norm).tolist()
    decay_scale = config.v_weight_decay / h_norm**2
    loss_seen, nll_seen, steps = [math.nan] * n, [math.nan] * n, [0] * n
    active = list(range(n))
    index = None
    for _ in range(config.v_num_grad_steps - 1):
        if index is None:  # rebuilt only when requests leave
            rows = [r for r in range(n_rows) if batch.request_of[r] in set(active)]
            index = _loss_index(batch, rows, active, cut, device)
            rows_t = torch.tensor(rows, device=device)
            row_request = torch.tensor([active.index(batch.request_of[r]) for r in rows], device=device)
        stacked = torch.stack([deltas[i] for i in active])
        final = run_suffix(rows_t, stacked[row_request])
        nll, kl = _request_losses(model, layout, final, index, kl_init, len(active))
        losses = nll + config.kl_factor * kl + decay_scale[active] * stacked.norm(dim=1)
        for k, request in enumerate(active):
            loss_seen[request], nll_seen[request] = float(losses[k].detach()), float(nll[k].detach())
        done = losses.detach() < config.v_early_stop_loss
        still = [request for request, d in zip(active, done.tolist()) if not d]
        if not still:
            break
        optimizer.zero_grad(set_to_none=True)
        losses[~done].sum().backward()
        for request, d in zip(active, done.tolist()):
            if d:
                deltas[request].grad = None  # leaves the batch with the δ its loss was measured at
        optimizer.step()
        with torch.no_grad():
            for request in still:
                _clamp_(deltas[request], max_norm[request])
                steps[request] += 1
        if len(still) != len(active):
            active, index = still, None
    delta = torch.stack([d.detach() for d in deltas])
    return ValueResult(hidden + delta, hidden, loss_seen, nll_seen, steps)


def optimize_values_reference(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, config: EditConfig,
                              pad: int) -> ValueResult:
    """The reference's way: each request alone, full forward passes and full logits at every step."""
    device = next(model.parameters()).device
    layers = layout.layers(model)
    targets, hiddens, loss_seen, nll_seen, steps = [], [], [], [], []
    for request in range(batch.num_requests):
        rows = [r for r in range(len(batch.sequences)) if batch.request_of[r] == request]
        ids, mask = pad_right([batch.sequences[r] for r in rows], pad, device)
        lookup = [batch.lookup[r] for r in rows]
        kl_local = rows.index(batch.kl_row[request])
        rewrite_local = [k for k, r in enumerate(rows) if batch.labels[r]]
        delta = torch.zeros(layout.hidden_size, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=config.v_lr)
        state: dict[str, torch.Tensor] = {}

        def add_delta(h: torch.Tensor, state: dict = state, lookup: list = lookup,
                      delta: torch.Tensor = delta) -> torch.Tensor:
            if "h" not in state:
                state["h"] = h[0, lookup[0]].detach().float().clone()
            h = h.clone()
            for k, position in enumerate(lookup):
                h[k, position] = h[k, position] + delta.to(h.dtype)
            return h

        taken = 0
        for step in range(config.v_num_grad_steps):
            optimizer.zero_grad()
            with edit_output(layers[config.z_layer], add_delta):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            kl_now = logprobs[kl_local, lookup[kl_local]]
            if "kl" not in state:
                state["kl"] = kl_now.detach().clone()
            nll = 0.0
            for k in rewrite_local:
                row = rows[k]
                token_lp = logprobs[k, batch.target_positions[row]].gather(
                    1, torch.tensor(batch.labels[row], device=device)[:, None])
                nll = nll - token_lp.sum() / len(batch.labels[row])
            nll = nll / len(rewrite_local)
            kl = (kl_now.exp() * (kl_now - state["kl"])).sum()
            loss = nll + config.kl_factor * kl + config.v_weight_decay * delta.norm() / state["h"].norm() ** 2
            if loss < config.v_early_stop_loss or step == config.v_num_grad_steps - 1:
                break
            loss.backward()
            optimizer.step()
            taken += 1
            with torch.no_grad():
                _clamp_(delta, config.clamp_norm_factor * float(state["h"].norm()))
        targets.append(state["h"] + delta.detach())
        hiddens.append(state["h"])
        loss_seen.append(float(loss.detach()))
        nll_seen.append(float(nll.detach()))
        steps.append(taken)
    return ValueResult(torch.stack(targets), torch.stack(hiddens), loss_seen, nll_seen, steps)
