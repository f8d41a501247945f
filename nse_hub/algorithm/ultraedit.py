r"""UltraEdit: a closed-form update from hidden states and their gradients, with lifelong normalization.

UltraEdit (Gu et al., arXiv 2505.14679) is training-free (no value optimisation), subject-free (no
subject position: it reads every position that predicts a target token) and memory-free (no
covariance of a corpus, no key memory). For a round of requests and each edited projection
``W`` (``d_model × d_ff``, here the MLP output projection of every edit layer):

1. **Features.** Teacher-force ``prompt + target`` on the current weights; at every position ``i``
   that predicts a target token read the projection's input ``k_i ∈ ℝ^{d_ff}`` and the gradient
   ``g_i = ∂L/∂y_i ∈ ℝ^{d_model}`` of the loss at its output ``y_i = W k_i``, where
   ``L = Σ_requests mean_{target tokens} −log p(token)``. All layers' features come from one forward
   and backward pass, before any layer is changed. ``z_i = [k_i ; g_i]``.
2. **Lifelong normalization.** Running statistics of ``z`` over every round so far, this round
   included: with ``N`` features seen before (mean ``μ``, squared deviations ``S``) and this round's
   ``n`` (mean ``z̄``, squared deviations ``S_t``), ``δ = z̄ − μ``,

   .. math::
       μ ← μ + δ\,n/(N+n), \qquad S ← S + S_t + δ^2\,Nn/(N+n), \qquad N ← N + n,
       \qquad σ = \sqrt{S/(N−1)},

   (Chan et al.'s exact combination; see :mod:`nse_hub.algorithm.lifelong`) and
   ``ẑ_i = (z_i − μ) / (σ + ε) = [k̂_i ; ĝ_i]``.
3. **Pseudo-values.** ``v_i = −η ‖k̂_i‖² ĝ_i`` (``η``: ``ultraedit_lr``), one step against the
   normalised gradient, scaled as a gradient step on ``W`` would move ``y_i`` in normalised space.
4. **Closed form.** Ridge regression of the pseudo-values on the raw keys
   (``λ``: ``ultraedit_ridge``; rows of ``K`` are ``k_iᵀ``, rows of ``V`` are ``v_iᵀ``):

   .. math::
       ΔWᵀ = \arg\min_X ‖K X − V‖² + λ‖X‖² = (KᵀK + λI)^{-1} Kᵀ V,

   i.e. ``ΔW = Vᵀ (KKᵀ + λI_n)^{-1} K`` by the push-through identity: a product ``B A`` with
   ``B = Vᵀ`` (``d_model × n``) and ``A = (KKᵀ + λI)^{-1} K`` (``n × d_ff``), of rank at most ``n``
   (the round's target tokens), so each round is an exact LoRA increment.

Differences from the reference code (XiaojieGu/UltraEdit), each deliberate:

* statistics are kept per edited projection, not shared by every module of the same shape;
* the round's squared deviations are exact (the reference adds ``n·Var_unbiased``, i.e. ``S_t·n/(n−1)``);
* the loss is a sum of per-request means (the reference averages over the tokens of mini-batches of
  10 requests), so a request's features do not depend on how a round is batched;
* the solve is the ``n × n`` form above in float64 (the reference solves ``d_ff × d_ff`` in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.algorithm.batches import ValueBatch, build_value_batch
from nse_hub.algorithm.lifelong import FeatureStats
from nse_hub.algorithm.update import solve_spd
from nse_hub.architectures import ModelLayout
from nse_hub.deltas import Factors
from nse_hub.requests import EditRequest
from nse_hub.tokens import pad_right
from nse_hub.tracing import model_device


@dataclass
class EditingFeatures:
    """What one teacher-forced forward and backward pass read for UltraEdit.

    Attributes:
        keys: per layer, ``N × d_ff`` projection inputs at the target-predicting positions (float32).
        grads: per layer, ``N × d_model`` loss gradients at the projection outputs there (float32).
        owner: per feature row, the request it belongs to.
        nll: per request, the mean NLL of its target on the weights the features were read on.
    """

    keys: dict[int, torch.Tensor]
    grads: dict[int, torch.Tensor]
    owner: list[int]
    nll: list[float]

    def stacked(self, layer: int) -> torch.Tensor:
        """``z = [k ; g]`` per row, ``N × (d_ff + d_model)``, float64."""
        return torch.cat([self.keys[layer].double(), self.grads[layer].double()], dim=1)


def editing_features(model: PreTrainedModel, layout: ModelLayout, tokenizer: PreTrainedTokenizerBase,
                     requests: Sequence[EditRequest], layers: Sequence[int], pad: int,
                     batch_size: int) -> EditingFeatures:
    """Keys and output gradients of the projections at ``layers`` for every target-predicting position.

    The gradient at a projection's output is read through a zero tensor added to it (``y + 0``), so it is
    the full derivative of the loss, through every later layer, edited ones included.
    """
    batch = build_value_batch(tokenizer, requests, ["{}"])
    rows = batch.plain_row
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    owner: list[int] = []
    nll: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = _chunk_features(model, layout, batch, rows[start:start + batch_size], layers, pad)
        for layer in layers:
            keys[layer].append(chunk.keys[layer])
            grads[layer].append(chunk.grads[layer])
        owner += [start + k for k in chunk.owner]
        nll += chunk.nll
    return EditingFeatures({layer: torch.cat(parts) for layer, parts in keys.items()},
                           {layer: torch.cat(parts) for layer, parts in grads.items()}, owner, nll)


def _chunk_features(model: PreTrainedModel, layout: ModelLayout, batch: ValueBatch, rows: Sequence[int],
                    layers: Sequence[int], pad: int) -> EditingFeatures:
    """:func:`editing_features` of the requests whose rows are ``rows``, in one padded forward and backward."""
    device = model_device(model)
    ids, mask = pad_right([batch.sequences[r] for r in rows], pad, device)
    at_row = torch.tensor([k for k, r in enumerate(rows) for _ in batch.target_positions[r]], device=device)
    at_col = torch.tensor([p for r in rows for p in batch.target_positions[r]], device=device)
    labels = torch.tensor([t for r in rows for t in batch.labels[r]], device=device)
    weight = torch.tensor([1.0 / len(batch.labels[r]) for r in rows for _ in batch.labels[r]], device=device)
    inputs: dict[int, torch.Tensor] = {}
    zeros: dict[int, torch.Tensor] = {}

    def hook(args: tuple, output: torch.Tensor, layer: int) -> torch.Tensor:
        inputs[layer] = args[0][at_row, at_col].detach()
        zeros[layer] = torch.zeros_like(output, requires_grad=True)
        return output + zeros[layer]

    with ExitStack() as hooks, torch.enable_grad():
        for layer in layers:
            hooks.enter_context(layout.projection(model, layer).register_forward_hook(
                lambda _m, args, out, layer=layer: hook(args, out, layer)))
        hidden = layout.decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logprobs = torch.log_softmax(layout.logits(model, hidden[at_row, at_col]).float(), dim=-1)
        token_nll = -logprobs.gather(1, labels[:, None]).squeeze(1) * weight
        found = torch.autograd.grad(token_nll.sum(), [zeros[layer] for layer in layers])
    per_request = torch.zeros(len(rows), device=device).index_add(0, at_row, token_nll.detach())
    return EditingFeatures({layer: inputs[layer].float() for layer in layers},
                           {layer: grad[at_row, at_col].float() for layer, grad in zip(layers, found)},
                           at_row.tolist(), per_request.tolist())


def feature_statistics(features: EditingFeatures, layers: Sequence[int], comoment_dims: int = 0
                       ) -> dict[int, FeatureStats]:
    """Per layer, the statistics of ``z = [k ; g]`` (with the co-moment of the last ``comoment_dims``)."""
    return {layer: FeatureStats.of(features.stacked(layer), comoment_dims) for layer in layers}


def pseudo_values(features: torch.Tensor, statistics: FeatureStats, d_ff: int, lr: float,
                  whitening: str = "diagonal") -> torch.Tensor:
    """``v_i = −η ‖k̂_i‖² ĝ_i`` for each row ``z_i = [k_i ; g_i]`` of ``features``, normalised by ``statistics``.

    With ``whitening="full"`` (StableEdit) the gradient part is whitened by the running covariance,
    ``ĝ_i = Σ_g^{-1/2} (g_i − μ_g)``, once ``statistics`` hold more than ``d_model + 1`` features
    (before that, and always for the keys, per coordinate as UltraEdit does).
    """
    normalized = statistics.normalize(features)
    k_hat, g_hat = normalized[:, :d_ff], normalized[:, d_ff:]
    inverse_sqrt = statistics.whitening() if whitening == "full" else None
    if inverse_sqrt is not None:
        g_hat = (features.double()[:, d_ff:] - statistics.mean[d_ff:]) @ inverse_sqrt
    return -lr * k_hat.square().sum(dim=1, keepdim=True) * g_hat


def bound_norm(factors: Factors, weight_norm: float, cap: float) -> Factors:
    """``ΔW`` scaled down, if needed, so that ``‖ΔW‖_F ≤ cap · ‖W‖_F`` (StableEdit's bounded norms; 0: off).

    Scaling ``B`` keeps the factors' rank, so a bounded round is still an exact LoRA increment.
    """
    if cap <= 0:
        return factors
    norm = float(factors.dense().double().norm())
    limit = cap * weight_norm
    return factors if norm <= limit else Factors(factors.B * (limit / norm), factors.A)


def ultraedit_update(keys: torch.Tensor, values: torch.Tensor, ridge: float, layer: int | None = None) -> Factors:
    """``ΔW = Vᵀ (K Kᵀ + λI)⁻¹ K``, the ridge solution ``ΔWᵀ = (KᵀK + λI)⁻¹ Kᵀ V``, as factors ``B @ A``.

    Args:
        keys: ``K``, ``N × d_ff`` (one row per feature).
        values: ``V``, ``N × d_model`` pseudo-values.
        ridge: ``λ > 0``.
        layer: named in the error when the system is not positive definite.

    Raises:
        SingularSystemError: ``K Kᵀ + λI`` is not positive definite (non-finite keys).
    """
    k = keys.double()
    gram = k @ k.T
    gram.diagonal().add_(ridge)
    a = solve_spd(gram, k, layer)  # N × d_ff
    return Factors(values.double().T.float(), a.float())
