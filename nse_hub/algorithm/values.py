"""Value targets ``z = h + δ``: where the z-layer's output must go for each request to say its new target.

:func:`optimize_values` optimises every request of a round together. Its losses are independent
per request (each δ only touches its own sequences, the total is their sum, Adam is elementwise),
so it computes what the reference's one-request-at-a-time loop computes, with less work:

* only the layers above the z-layer run inside the loop, fed from the z-layer outputs cached by
  one forward pass before it;
* positions before the subject's last token cannot see δ (attention is causal), so their keys and
  values are cached too and each step runs only the suffix from the subject's last token on;
* the output head runs only at positions that predict a target token and at the KL positions;
* a request whose loss falls below ``v_early_stop_loss`` (or, with ``v_stop_most_probable``, whose target
  tokens are all the most probable ones) leaves the batch;
* the reference's last forward pass, whose only use is an early-stop test that cannot change δ
  any more, is not run.

Memory stays bounded as rounds grow: a round with more than ``max_sequences`` sequences (default:
as many as :data:`CHUNK_BYTES` of the device holds) is split into chunks of whole requests, each optimised by
its own Adam loop; since the losses are independent per request this changes nothing but which
sequences share a forward pass. A round that fits in one chunk runs exactly as before.

:func:`optimize_values_reference` is the straightforward per-request loop of the reference, kept
for tests (the two must agree) and for benchmarks (to measure the difference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from nse_hub.algorithm.batches import ValueBatch
from nse_hub.architectures import ModelLayout, attention_kv_width
from nse_hub.config import EditConfig
from nse_hub.tokens import pad_right
from nse_hub.tracing import edit_output, model_device, read_output, start_at


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

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """As tensors to save (``safetensors``): float32 targets and hidden states on the host."""
        return {"targets": self.targets.detach().float().cpu(), "hidden": self.hidden.detach().float().cpu(),
                "loss": torch.tensor(self.loss, dtype=torch.float64),
                "nll": torch.tensor(self.nll, dtype=torch.float64),
                "steps": torch.tensor(self.steps, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, saved: dict[str, torch.Tensor]) -> ValueResult:
        """The inverse of :meth:`to_tensors`."""
        return cls(saved["targets"], saved["hidden"], saved["loss"].tolist(), saved["nll"].tolist(),
                   [int(x) for x in saved["steps"].tolist()])


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
    kl_position: torch.Tensor  # position of the request in the active list


def _loss_index(batch: ValueBatch, rows: Sequence[int], active: Sequence[int], cut: Sequence[int],
                device: torch.device) -> _LossIndex:
    """``cut[row]``: how many leading tokens of the row are not in the batch (served from the cache)."""
    position = {request: k for k, request in enumerate(active)}
    rewrite_rows = {request: 0 for request in active}
    for row, labels in enumerate(batch.labels):  # all of a request's rows, whichever group runs them
        if labels and batch.request_of[row] in rewrite_rows:
            rewrite_rows[batch.request_of[row]] += 1
    t_rows, t_cols, t_labels, t_req, t_weight = [], [], [], [], []
    kl_rows, kl_cols, kl_req, kl_pos = [], [], [], []
    for local, row in enumerate(rows):
        request = batch.request_of[row]
        if not batch.labels[row]:
            kl_rows.append(local)
            kl_cols.append(batch.lookup[row] - cut[row])
            kl_req.append(request)
            kl_pos.append(position[request])
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
                      tensor(t_weight, torch.float32), tensor(kl_rows), tensor(kl_cols), tensor(kl_req),
                      tensor(kl_pos))


def _request_losses(model: PreTrainedModel, layout: ModelLayout, hidden: torch.Tensor, index: _LossIndex,
                    kl_init: torch.Tensor, n_active: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per active request: mean target NLL, KL(current ‖ initial) at its KL position, and how many of its target
    tokens are not the most probable at their positions."""
    logprobs = torch.log_softmax(layout.logits(model, hidden[index.token_rows, index.token_cols]).float(), dim=-1)
    picked = logprobs.gather(1, index.token_labels[:, None]).squeeze(1)
    nll = torch.zeros(n_active, device=hidden.device).index_add(0, index.token_request, -picked * index.token_weight)
    outranked = (logprobs.argmax(-1) != index.token_labels).float()
    not_top = torch.zeros(n_active, device=hidden.device).index_add(0, index.token_request, outranked)
    current = torch.log_softmax(layout.logits(model, hidden[index.kl_rows, index.kl_cols]).float(), dim=-1)
    initial = kl_init[index.kl_request]
    per_row = (current.exp() * (current - initial)).sum(-1)
    kl = torch.zeros(n_active, device=hidden.device).index_add(0, index.kl_position, per_row)
    return nll, kl, not_top


def _clamp_(delta: torch.Tensor, max_norm: float) -> None:
    norm = delta.norm()
    if norm > max_norm:
        delta.mul_(max_norm / norm)


class _SuffixGroup:
    """Rows whose suffixes run through the upper layers together (similar widths, little padding).

    Layout per row: [left-padded prefix | suffix from the subject's last token, right-padded]; the
    prefix is served from a key/value cache computed once, the suffix re-runs at every step.
    """

    def __init__(self, model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, rows: list[int],
                 cut: list[int], pad: int, z: int) -> None:
        self.model, self.layout, self.z = model, layout, z
        self.rows = rows
        device = model_device(model)
        cuts = [cut[r] for r in rows]
        self.prefix = max(cuts)
        width = max(len(batch.sequences[r]) - c for r, c in zip(rows, cuts))
        ids = torch.full((len(rows), self.prefix + width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for local, (r, c) in enumerate(zip(rows, cuts)):
            seq = batch.sequences[r]
            ids[local, self.prefix - c: self.prefix + len(seq) - c] = torch.tensor(seq)
            mask[local, self.prefix - c: self.prefix + len(seq) - c] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.inject_col = torch.tensor([batch.lookup[r] - c for r, c in zip(rows, cuts)], device=device)
        with torch.no_grad():
            seen: dict[str, torch.Tensor] = {}
            cache = DynamicCache() if self.prefix else None  # plain layers: sliding-window layers would crop
            with read_output(layout.layer(model, z), lambda h: seen.__setitem__("z", h)):
                out = layout.decoder(model)(input_ids=self.ids, attention_mask=self.mask,
                                            position_ids=self.positions, past_key_values=cache,
                                            use_cache=cache is not None)
            self.suffix_hidden = seen["z"][:, self.prefix:].clone()
            at = (torch.arange(len(rows), device=device), self.inject_col)
            self.z_at_subject = self.suffix_hidden[at].float()  # h, per row
            self.final_at_subject = out.last_hidden_state[:, self.prefix:][at]  # for the initial KL distribution
            self.prefix_kv = ([(layer.keys[:, :, :self.prefix].clone(), layer.values[:, :, :self.prefix].clone())
                               for layer in cache.layers] if cache is not None else None)

    def run(self, local: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """Final hidden states of rows ``local`` with ``delta_rows`` added at their subject's last token."""
        base = self.suffix_hidden[local]
        added = torch.zeros(base.shape, dtype=delta_rows.dtype, device=base.device).index_put(
            (torch.arange(len(local), device=base.device), self.inject_col[local]), delta_rows)
        hidden_in = (base.float() + added).to(base.dtype)
        layers = self.layout.layers(self.model)
        if self.z == len(layers) - 1:  # nothing above the z-layer but the final norm
            return self.layout.final_norm(self.model)(hidden_in)
        cache = (DynamicCache([(k[local], v[local]) for k, v in self.prefix_kv])
                 if self.prefix_kv is not None else None)
        with start_at(layers, self.z + 1, hidden_in, self.layout.layer_returns_tuple):
            result = self.layout.decoder(self.model)(
                input_ids=self.ids[local, self.prefix:], attention_mask=self.mask[local],
                position_ids=self.positions[local, self.prefix:], past_key_values=cache,
                use_cache=cache is not None)
        return result.last_hidden_state


# What one more forward pass costs, in padded tokens: on a CPU the tokens dominate, on a GPU kernel
# launches do and extra padding is nearly free.
GROUP_OVERHEAD_TOKENS = {"cpu": 24, "cuda": 2048}
_MAX_GROUPS = 4


def _group_rows(widths: list[int], overhead: int = GROUP_OVERHEAD_TOKENS["cpu"]) -> list[list[int]]:
    """Split rows into at most ``_MAX_GROUPS`` groups of similar width, minimising padded tokens + overhead."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    sizes = [widths[i] for i in order]
    n = len(order)
    best = {(0, 0): (0, [])}  # (rows placed, groups used) -> (cost, cut points)
    for used in range(1, _MAX_GROUPS + 1):
        for end in range(1, n + 1):
            options = [(best[(start, used - 1)][0] + (end - start) * sizes[end - 1] + overhead,
                        [*best[(start, used - 1)][1], end])
                       for start in range(end) if (start, used - 1) in best
                       and (end == n or sizes[end - 1] != sizes[end])]  # never split equal widths
            if options:
                best[(end, used)] = min(options, key=lambda option: option[0])
    _, cuts = min((best[(n, g)] for g in range(1, _MAX_GROUPS + 1) if (n, g) in best), key=lambda b: b[0])
    bounds = [0, *cuts]
    return [sorted(order[a:b]) for a, b in itertools.pairwise(bounds)]


# Memory one chunk of the value optimisation may use, by device type; a round that needs more is split
# into chunks of whole requests (see chunk_sequences). Measured on SmolLM2 on the CPU: 100 requests
# (700 sequences) reached 1.6 GiB RSS in chunks of 70 sequences and 5.0 GiB in chunks of 512 (process
# RSS seen by ps during the runs; the model alone is about 1 GiB), about 8 MiB per sequence, which
# sequence_bytes estimates as 7.5 MiB for those requests. With 2 GiB a CPU chunk holds about 270 SmolLM2
# sequences, still hundreds of rows for its matrix multiplies; a round of 10 (70 sequences) stays one chunk.
CHUNK_BYTES = {"cpu": 2 * 2**30, "cuda": 16 * 2**30}


def sequence_bytes(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, z: int) -> int:
    """Estimated memory one sequence of ``batch`` takes in the value optimisation (:func:`sequence_bytes_for`)."""
    rows = len(batch.sequences)
    suffix = sum(len(s) - c for s, c in zip(batch.sequences, batch.lookup)) / rows
    read = (sum(len(labels) for labels in batch.labels) + batch.num_requests) / rows
    return sequence_bytes_for(layout, z, attention_kv_width(model.config, layout.hidden_size),
                              model.get_output_embeddings().weight.shape[0], next(model.parameters()).element_size(),
                              suffix=suffix, prefix=max(batch.lookup), read=read)


def sequence_bytes_for(layout: ModelLayout, z: int, kv_width: int, vocab: int, element_size: int, *,
                       suffix: float, prefix: int, read: float) -> int:
    """Estimated memory of one value-optimisation sequence, from shapes alone (``nse_hub.plan`` uses it too).

    Activations the backward pass keeps in every layer above the z-layer (about 6·d_model + 4·d_ff
    values per suffix token), three copies of the prefix key/value cache per step, and four
    vocabulary-sized float32 rows per position whose logits are read. ``suffix``: mean tokens from the
    subject's last token on; ``prefix``: the longest prefix before it; ``read``: mean positions read per row.
    """
    activations = ((layout.num_layers - z - 1) * (6 * layout.hidden_size + 4 * layout.intermediate_size)
                   * suffix * element_size)
    cache = 3 * layout.num_layers * 2 * kv_width * prefix * element_size
    return int(activations + cache + 4 * 4 * vocab * read)


def chunk_sequences(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, z: int) -> int:
    """Default bound on the sequences of one chunk: :data:`CHUNK_BYTES` for the device over :func:`sequence_bytes`."""
    device = model_device(model)
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // max(1, sequence_bytes(model, layout, batch, z)))


def value_chunks(batch: ValueBatch, max_sequences: int) -> list[list[int]]:
    """Consecutive runs of whole requests with at most ``max_sequences`` rows each (a bigger request: alone)."""
    rows = [0] * batch.num_requests
    for request in batch.request_of:
        rows[request] += 1
    chunks: list[list[int]] = []
    size = 0
    for request, count in enumerate(rows):
        if not chunks or size + count > max_sequences:
            chunks.append([])
            size = 0
        chunks[-1].append(request)
        size += count
    return chunks


def optimize_values(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, config: EditConfig,
                    pad: int, *, progress: bool = False, max_sequences: int | None = None) -> ValueResult:
    """Optimise all requests' value targets together (see the module docstring).

    ``progress`` shows a bar over optimiser steps × chunks; ``max_sequences`` bounds the sequences
    of one chunk (default: :func:`chunk_sequences`, from the device's :data:`CHUNK_BYTES`).
    """
    limit = max_sequences or chunk_sequences(model, layout, batch, config.z_layer)
    chunks = value_chunks(batch, limit)
    per_chunk = max(config.v_num_grad_steps - 1, 0)
    with tqdm(total=per_chunk * len(chunks), desc=f"values ({batch.num_requests} requests)", unit="step",
              disable=not progress, leave=False) as bar:
        if len(chunks) == 1:
            return _optimize_chunk(model, layout, batch, config, pad, bar)
        parts = [_optimize_chunk(model, layout, batch.subset(chunk), config, pad, bar) for chunk in chunks]
    return ValueResult(torch.cat([p.targets for p in parts]), torch.cat([p.hidden for p in parts]),
                       [x for p in parts for x in p.loss], [x for p in parts for x in p.nll],
                       [x for p in parts for x in p.steps])


def _optimize_chunk(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, config: EditConfig,
                    pad: int, bar: tqdm) -> ValueResult:
    """One Adam loop over all requests of ``batch``; advances ``bar`` by ``v_num_grad_steps - 1``."""
    device = model_device(model)
    n_rows, n = len(batch.sequences), batch.num_requests
    # Prefixes come from a cache unless a sliding attention window shorter than the sequences would
    # see the left padding; then whole sequences run, right-padded (same result, more work).
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    use_cache = not window or max(len(s) for s in batch.sequences) <= window
    cut = list(batch.lookup) if use_cache else [0] * n_rows
    groups = [_SuffixGroup(model, layout, batch, rows, cut, pad, config.z_layer)
              for rows in _group_rows([len(s) - c for s, c in zip(batch.sequences, cut)],
                                      GROUP_OVERHEAD_TOKENS.get(device.type, GROUP_OVERHEAD_TOKENS["cuda"]))]
    where = {row: (g, local) for g, group in enumerate(groups) for local, row in enumerate(group.rows)}

    def at_row(row: int, field: str) -> torch.Tensor:
        g, local = where[row]
        return getattr(groups[g], field)[local]

    hidden = torch.stack([at_row(r, "z_at_subject") for r in batch.plain_row])
    kl_init = torch.log_softmax(layout.logits(model, torch.stack([at_row(r, "final_at_subject")
                                                                  for r in batch.kl_row])).float(), -1)

    deltas = [torch.zeros(layout.hidden_size, device=device, requires_grad=True) for _ in range(n)]
    optimizer = torch.optim.Adam(deltas, lr=config.v_lr)
    h_norm = hidden.norm(dim=1)
    max_norm = (config.clamp_norm_factor * h_norm).tolist()
    decay_scale = config.v_weight_decay / h_norm**2
    loss_seen, nll_seen, steps = [math.nan] * n, [math.nan] * n, [0] * n
    active = list(range(n))
    plans = None
    remaining = max(config.v_num_grad_steps - 1, 0)
    for _ in range(config.v_num_grad_steps - 1):
        bar.update(1)
        remaining -= 1
        if plans is None:  # rebuilt only when requests leave
            plans = _plan(batch, groups, active, cut, device)
        stacked = torch.stack([deltas[i] for i in active])
        nll = torch.zeros(len(active), device=device)
        kl = torch.zeros(len(active), device=device)
        not_top = torch.zeros(len(active), device=device)
        for group, (local, row_request, index) in zip(groups, plans):
            if local is None:
                continue
            final = group.run(local, stacked[row_request])
            group_nll, group_kl, group_not_top = _request_losses(model, layout, final, index, kl_init, len(active))
            nll, kl, not_top = nll + group_nll, kl + group_kl, not_top + group_not_top
        losses = nll + config.kl_factor * kl + decay_scale[active] * stacked.norm(dim=1)
        for k, request in enumerate(active):
            loss_seen[request], nll_seen[request] = float(losses[k].detach()), float(nll[k].detach())
        done = losses.detach() < config.v_early_stop_loss
        if config.v_stop_most_probable:
            done |= not_top == 0
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
            active, plans = still, None
    bar.update(remaining)  # steps not needed once every request has converged
    delta = torch.stack([d.detach() for d in deltas])
    return ValueResult(hidden + delta, hidden, loss_seen, nll_seen, steps)


def _plan(batch: ValueBatch, groups: list[_SuffixGroup], active: list[int], cut: list[int],
          device: torch.device) -> list[tuple[torch.Tensor | None, torch.Tensor | None, _LossIndex | None]]:
    """Per group: its rows of active requests, their request positions, and where their losses sit."""
    wanted = set(active)
    position = {request: k for k, request in enumerate(active)}
    plans = []
    for group in groups:
        local = [k for k, row in enumerate(group.rows) if batch.request_of[row] in wanted]
        if not local:
            plans.append((None, None, None))
            continue
        rows = [group.rows[k] for k in local]
        plans.append((torch.tensor(local, device=device),
                      torch.tensor([position[batch.request_of[r]] for r in rows], device=device),
                      _loss_index(batch, rows, active, cut, device)))
    return plans


def optimize_values_reference(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, config: EditConfig,
                              pad: int, *, progress: bool = False) -> ValueResult:
    """The reference's way: each request alone, full forward passes and full logits at every step.

    ``progress`` shows a bar over requests.
    """
    device = model_device(model)
    layers = layout.layers(model)
    targets, hiddens, loss_seen, nll_seen, steps = [], [], [], [], []
    for request in tqdm(range(batch.num_requests), desc="values (reference)", unit="request", disable=not progress,
                        leave=False):
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
            on_top = config.v_stop_most_probable and all(
                logprobs[k, batch.target_positions[rows[k]]].argmax(-1).tolist() == batch.labels[rows[k]]
                for k in rewrite_local)
            if loss < config.v_early_stop_loss or on_top or step == config.v_num_grad_steps - 1:
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
