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
                  memory: torch.Tensor, mom2_update_weight: float, selected: torch.Tensor) -> Factors:
    """``ΔW[:, S] = R Kₛᵀ (λ Cₛₛ + Pₛₛ + Kₛ Kₛᵀ)⁻¹`` as factors ``B @ A``.

    Args:
        keys: ``d_ff × n`` keys of the requests being written.
        residual: ``d_model × n`` the change this layer's projection output should make (its share
            of what the z-layer output still lacks).
        second_moment: ``C``, ``d_ff × d_ff``.
        memory: ``P``, ``d_ff × d_ff`` float64 sum of earlier rounds' ``k kᵀ``.
        mom2_update_weight: λ.
        selected: neuron indices ``S``.
    """
    device = memory.device
    index = selected.to(device)
    keys_s = keys.to(device, torch.float64)[index]
    lhs = (mom2_update_weight * second_moment.to(device)[index][:, index].double()
           + memory[index][:, index] + keys_s @ keys_s.T)
    solved = solve_spd(lhs, keys_s)  # |S| × n
    a = torch.zeros(keys.shape[1], keys.shape[0], dtype=torch.float64, device=device)
    a[:, index] = solved.T
    b = residual.to(device, torch.float64)
    return Factors(b.float(), a.float())


def through_post_norm(norm: torch.nn.Module, outputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Map residual-stream targets back to a projection whose output is normalised before the residual add.

    With ``y = norm(x) = v · g`` where ``v = x / rms(x)`` (Gemma's ``post_feedforward_layernorm``), the
    wanted output is ``y* = norm(x) + r``. The reachable outputs are ``v · g`` with ``rms(v) = 1``; the
    closest one to ``y*`` is ``v_d = g_d y*_d / (g_d² + λ)`` with ``λ ≥ 0`` chosen so that ``rms(v) = 1``
    (dimensions with a tiny ``g`` are not chased with huge values). The new projection output is the
    multiple of ``v`` closest to the current ``x``; the returned change is that minus ``x``.

    Args:
        norm: the norm module.
        outputs: ``n × d_model`` current projection outputs ``x`` at the subjects' last tokens.
        residual: ``d_model × n`` residual-stream targets ``r``.
    """
    x = outputs.double()
    with torch.no_grad():
        g = norm(torch.ones(1, x.shape[1], dtype=outputs.dtype, device=outputs.device)).double()[0]
        wanted = norm(outputs).double() + residual.T.double()

    def unit(lam: torch.Tensor) -> torch.Tensor:
        return g * wanted / (g * g + lam)

    def rms(v: torch.Tensor) -> torch.Tensor:
        return v.square().mean(dim=1, keepdim=True).sqrt()

    # rms(v(λ)) falls as λ grows on (-min g², ∞); λ < 0 when y* lies inside the reachable surface.
    squares = (g * g)[g * g > 0]
    low = torch.full((x.shape[0], 1), -float(squares.min()) * (1 - 1e-9), dtype=torch.float64, device=x.device)
    high = rms(g * wanted) * 2 + squares.max() + 1.0  # here rms(v) < 1
    for _ in range(200):  # bisection
        middle = (low + high) / 2
        too_big = rms(unit(middle)) > 1
        low, high = torch.where(too_big, middle, low), torch.where(too_big, high, middle)
    v = unit(high)
    v = v / rms(v)  # exactly on the reachable set (also when even λ → 0 stays inside it)
    fit = (v * x).sum(dim=1, keepdim=True) / (v * v).sum(dim=1, keepdim=True)
    return (fit * v - x).T
