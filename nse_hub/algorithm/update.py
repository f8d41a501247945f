"""Neuron selection and the neuron-level least-squares update, solved in float64."""

from __future__ import annotations

import logging

import torch

from nse_hub.deltas import Factors

logger = logging.getLogger(__name__)


def select_neurons(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (ascending) of the neurons NSE updates.

    Neurons are scored by ``s = Σ_i |K[:, i]|`` over the requests' keys and sorted by score; the
    smallest prefix whose cumulative score reaches ``threshold · Σ s`` is kept. ``threshold = 1``
    keeps every neuron with a non-zero score.
    """
    scores = keys.double().abs().sum(dim=1)
    if threshold >= 1.0:
        return torch.nonzero(scores > 0).squeeze(1)
    ordered, order = torch.sort(scores, descending=True)
    cumulative = torch.cumsum(ordered, dim=0)
    count = int(torch.searchsorted(cumulative, threshold * scores.sum())) + 1
    return torch.sort(order[: min(count, len(order))]).values


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix⁻¹ @ rhs`` for a symmetric positive definite ``matrix`` (Cholesky; LU if it is not PD)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    logger.warning("update matrix is not positive definite (leading minor %d); solving with LU", int(info))
    return torch.linalg.solve(matrix, rhs)


def neuron_update(keys: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor,
                  memory: torch.Tensor, mom2_update_weight: float, selected: torch.Tensor,
                  spread: int) -> Factors:
    """``ΔW[:, S] = (R / spread) Kₛᵀ (λ Cₛₛ + Pₛₛ + Kₛ Kₛᵀ)⁻¹`` as factors ``B @ A``.

    Args:
        keys: ``d_ff × n`` keys of the requests being written.
        residual: ``d_model × n`` what the z-layer output still lacks.
        second_moment: ``C``, ``d_ff × d_ff``.
        memory: ``P``, ``d_ff × d_ff`` float64 sum of earlier rounds' ``k kᵀ``.
        mom2_update_weight: λ.
        selected: neuron indices ``S``.
        spread: how many layers (this one included) still share the residual.
    """
    device = memory.device
    index = selected.to(device)
    keys_s = keys.to(device, torch.float64)[index]
    lhs = (mom2_update_weight * second_moment.to(device)[index][:, index].double()
           + memory[index][:, index] + keys_s @ keys_s.T)
    solved = solve_spd(lhs, keys_s)  # |S| × n
    a = torch.zeros(keys.shape[1], keys.shape[0], dtype=torch.float64, device=device)
    a[:, index] = solved.T
    b = residual.to(device, torch.float64) / spread
    return Factors(b.float(), a.float())
