"""Neuron selection and the least-squares updates of NSE, MEMIT and AlphaEdit, solved in float64.

Each solve has two engines with the same mathematics. The float64 path takes the key memory as a float64
``d_ff × d_ff`` tensor on the solve's device. The lean path (``EditConfig.lean``; the memory given as a
:class:`~nse_hub.deltas.LayerMemory`) keeps the d_ff² matrices on the host in float32 and promotes one layer's to
float64 on the device for its solve, builds each system in place, frees it once factorised, and solves by two
triangular solves (``cholesky_solve`` would copy the factor): two float64 d_ff² matrices on the device at most.
The two agree within float64 rounding (tests/test_lean.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nse_hub.deltas import PROMOTE_ROWS, Factors, LayerMemory, promote_into
from nse_hub.errors import SingularSystemError

__all__ = ["NullSpace", "SingularSystemError", "alphaedit_update", "leak_decay_update", "leak_directions",
           "neuron_update", "null_space", "null_space_lean", "projected_neuron_update", "select_neurons",
           "solve_general", "solve_spd", "through_post_norm"]

#: The key memory as a solve takes it: a float64 matrix (the float64 path) or a layer's lean view.
MemoryLike = torch.Tensor | LayerMemory
# Block edge of the lean null space's in-place symmetrisation (transients: three blocks of 512² float64).
SYMMETRISE_BLOCK = 512


def _where(layer: int | None) -> str:
    return "the update system" if layer is None else f"the update system of layer {layer}"


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


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """``matrix⁻¹ @ rhs`` for a symmetric positive definite ``matrix``, by Cholesky.

    Raises:
        SingularSystemError: ``matrix`` is not finite or not positive definite (no fallback: a
            singular system has no meaningful solution). The message names ``layer`` and the fix.
    """
    return torch.cholesky_solve(rhs, _cholesky(matrix, layer))


def _cholesky(matrix: torch.Tensor, layer: int | None, lean: bool = False) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    finite = _all_finite(factor) if lean else bool(torch.isfinite(factor).all())
    if int(info) != 0 or not finite:
        detail = (f"leading minor {int(info)} of {matrix.shape[0]} is not positive" if int(info) > 0
                  else "it has non-finite entries")
        raise SingularSystemError(
            f"{_where(layer)} is not positive definite ({detail}): the second moments C are too poorly "
            "estimated for this solve. Raise mom2_update_weight, or measure C on more tokens "
            "(mom2_n_samples × mom2_sample_length well above d_ff).")
    return factor


def _all_finite(matrix: torch.Tensor) -> bool:
    """``torch.isfinite(matrix).all()`` a block of rows at a time (isfinite allocates a copy of what it reads)."""
    rows = max(1, PROMOTE_ROWS // 16)
    return all(bool(torch.isfinite(matrix[start:start + rows]).all()) for start in range(0, matrix.shape[0], rows))


def _solve_spd_owned(system: list[torch.Tensor], rhs: torch.Tensor, layer: int | None) -> torch.Tensor:
    """:func:`solve_spd` that frees the system (the list's only element) once it is factorised, and solves by
    two triangular solves, which copy nothing (``cholesky_solve`` copies the factor)."""
    factor = _cholesky(system.pop(), layer, lean=True)
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def solve_general(matrix: torch.Tensor, rhs: torch.Tensor, layer: int | None = None,
                  fix: str = "raise L2") -> torch.Tensor:
    """``matrix⁻¹ @ rhs`` for a square, possibly non-symmetric ``matrix`` (LU), refusing singular systems.

    Raises:
        SingularSystemError: ``matrix`` is singular to working precision (LU failed, the solution is
            not finite, or it does not satisfy the system). The message names ``layer`` and ``fix``.
    """
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    if int(info) == 0 and bool(torch.isfinite(solution).all()):
        error = (matrix @ solution - rhs).norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)
        if float(error) < 1e-6:
            return solution
    raise SingularSystemError(f"{_where(layer)} is singular to working precision; {fix}.")


def neuron_update(keys: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor,
                  memory: MemoryLike | None, mom2_update_weight: float, selected: torch.Tensor,
                  layer: int | None = None, device: torch.device | str | None = None) -> Factors:
    """``ΔW[:, S] = R Kₛᵀ (λ Cₛₛ + Pₛₛ + Kₛ Kₛᵀ)⁻¹`` as factors ``B @ A`` (NSE, MEMIT, sequential MEMIT).

    Args:
        keys: ``d_ff × n`` keys of the requests being written.
        residual: ``d_model × n`` the change this layer's projection output should make (its share
            of what the z-layer output still lacks).
        second_moment: ``C``, ``d_ff × d_ff``.
        memory: ``P``, ``d_ff × d_ff`` float64 sum of earlier rounds' ``k kᵀ`` (the float64 path), or
            its :class:`~nse_hub.deltas.LayerMemory` (the lean path), or ``None`` to leave it out (classic MEMIT).
        mom2_update_weight: λ.
        selected: neuron indices ``S``.
        layer: named in the error when the system is not positive definite.
        device: where the lean path solves (default: the memory's device, else ``C``'s).

    Raises:
        SingularSystemError: the system is not positive definite.
    """
    if isinstance(memory, LayerMemory) or device is not None:
        return _neuron_update_lean(keys, residual, second_moment, memory, mom2_update_weight, selected, layer,
                                   torch.device(device or (memory.device if memory is not None else
                                                           second_moment.device)))
    device = second_moment.device if memory is None else memory.device
    index = selected.to(device)
    keys_s = keys.to(device, torch.float64)[index]
    lhs = mom2_update_weight * second_moment.to(device)[index][:, index].double() + keys_s @ keys_s.T
    if memory is not None:
        lhs = lhs + memory[index][:, index]
    solved = solve_spd(lhs, keys_s, layer)  # |S| × n
    a = torch.zeros(keys.shape[1], keys.shape[0], dtype=torch.float64, device=device)
    a[:, index] = solved.T
    b = residual.to(device, torch.float64)
    return Factors(b.float(), a.float())


def _neuron_update_lean(keys: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor,
                        memory: LayerMemory | None, mom2_update_weight: float, selected: torch.Tensor,
                        layer: int | None, device: torch.device) -> Factors:
    index = selected.to(device)
    everything = len(selected) == second_moment.shape[0]
    keys_s = keys.to(device, torch.float64)[index]
    lhs = torch.zeros(len(selected), len(selected), dtype=torch.float64, device=device)
    promote_into(lhs, second_moment, None if everything else selected)
    lhs.mul_(mom2_update_weight).addmm_(keys_s, keys_s.T)
    if memory is not None:
        memory.add_to(lhs, None if everything else selected)
    system = [lhs]
    del lhs
    solved = _solve_spd_owned(system, keys_s, layer)  # |S| × n
    a = torch.zeros(keys.shape[1], keys.shape[0], dtype=torch.float64, device=device)
    a[:, index] = solved.T
    return Factors(residual.to(device, torch.float64).float(), a.float())


@dataclass(frozen=True)
class NullSpace:
    """The directions AlphaEdit may change: eigenvectors of ``C`` with small eigenvalues.

    Attributes:
        basis: ``d_ff × k`` orthonormal float64 columns; the projector is ``basis @ basis.T``.
        threshold: the eigenvalue cutoff used (absolute).
        eigenvalues: the ``k`` eigenvalues of ``C`` along ``basis`` (float64, on the basis' device).
    """

    basis: torch.Tensor
    threshold: float
    eigenvalues: torch.Tensor | None = None

    @property
    def dims(self) -> int:
        """How many directions the null space kept."""
        return self.basis.shape[1]

    @property
    def projector(self) -> torch.Tensor:
        return self.basis @ self.basis.T

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        """``P @ matrix`` without forming ``P``."""
        return self.basis @ (self.basis.T @ matrix)

    def add_weighted_moment(self, matrix: torch.Tensor, weight: float) -> None:
        """Add ``weight · P C`` to ``matrix`` in place: ``C`` restricted to the null space, ``U diag(λ) Uᵀ``."""
        if weight == 0:
            return
        if self.eigenvalues is None:
            raise ValueError("this null space was built without its eigenvalues; build it with null_space()")
        basis = self.basis.to(matrix.device, matrix.dtype)
        scaled = basis * (weight * self.eigenvalues.to(matrix.device, matrix.dtype))
        matrix.addmm_(scaled, basis.T)


def null_space(second_moment: torch.Tensor, threshold: float) -> NullSpace:
    """The null space of ``C`` as AlphaEdit uses it, with a cutoff relative to ``C``'s median eigenvalue.

    Eigenvectors of ``C`` whose eigenvalue is below ``threshold × median eigenvalue`` span it: the
    directions that the corpus' keys hardly use, so that an update confined to them leaves the
    outputs for those keys nearly unchanged. ``threshold = 1`` keeps about half of the directions.
    The median is used because the mean (the trace) can be dominated by a few massive-activation
    directions (SmolLM2's layer 2: one eigenvalue is 88 % of the trace), and an absolute cutoff such
    as the reference's 2e-2 depends on the model's scale.
    """
    c = second_moment.double()
    eigenvalues, vectors = torch.linalg.eigh((c + c.T) / 2)
    cutoff = threshold * float(eigenvalues.median())
    kept = eigenvalues < cutoff
    return NullSpace(vectors[:, kept].contiguous(), cutoff, eigenvalues[kept].contiguous())


def null_space_lean(second_moment: torch.Tensor, threshold: float, device: torch.device | str) -> NullSpace:
    """:func:`null_space` with one float64 d_ff² matrix besides what ``eigh`` allocates, on ``device``.

    ``C`` (float32, e.g. on the host) is promoted on ``device`` a block at a time and symmetrised in place, block
    pair by block pair: the same ``(c + cᵀ) / 2`` entries as :func:`null_space`, so the same eigenvectors. The
    basis (``d_ff × k``, float64) is returned on the host: only the solve of its layer brings it to the device.
    """
    size = second_moment.shape[0]
    c = promote_into(torch.zeros(size, size, dtype=torch.float64, device=device), second_moment)
    step = SYMMETRISE_BLOCK
    for row in range(0, size, step):
        for col in range(0, row + 1, step):
            below, above = c[row:row + step, col:col + step], c[col:col + step, row:row + step]
            mean = (below + above.T) / 2
            below.copy_(mean)
            above.copy_(mean.T)
    eigenvalues, vectors = torch.linalg.eigh(c)
    del c
    cutoff = threshold * float(eigenvalues.median())
    kept = eigenvalues < cutoff
    return NullSpace(vectors[:, kept].cpu().contiguous(), cutoff, eigenvalues[kept].cpu().contiguous())


def alphaedit_update(keys: torch.Tensor, residual: torch.Tensor, space: NullSpace, memory: MemoryLike,
                     l2: float, layer: int | None = None, mom2_weight: float = 0.0) -> Factors:
    """AlphaEdit's update ``Δᵀ = (P (K Kᵀ + M + μC) + L2·I)⁻¹ P K Rᵀ`` as factors ``B @ A``.

    ``B = R`` and ``A = ((P (K Kᵀ + M + μC) + L2·I)⁻¹ P K)ᵀ``; every row of ``ΔW`` lies in the null space
    (``ΔW = ΔW P``), so keys outside it are mapped as before. The system is not symmetric and is
    solved by LU in float64. AlphaEdit's own solve has ``μ = 0``: every kept direction costs the same ``L2``.
    With ``μ > 0`` each also costs ``μ λ``, ``λ`` its eigenvalue of ``C``: MEMIT's preservation term inside the
    null space, so the update leans on the directions the corpus uses least.

    Args:
        keys: ``d_ff × n`` keys of the requests being written.
        residual: ``d_model × n`` this layer's share of the residual.
        space: the null space of ``C`` at this layer.
        memory: ``M``, ``d_ff × d_ff`` float64 sum of earlier rounds' ``k kᵀ`` (the float64 path), or its
            :class:`~nse_hub.deltas.LayerMemory` (the lean path: solved on its device, the basis brought there
            for this solve only).
        l2: the weight of ``‖ΔW‖²``.
        layer: named in the error when the system is singular.
        mom2_weight: ``μ``, the weight of ``C`` inside the null space (needs ``space.eigenvalues``).

    Raises:
        SingularSystemError: the system is singular to working precision.
    """
    if isinstance(memory, LayerMemory):
        return _alphaedit_update_lean(keys, residual, space, memory, l2, layer, mom2_weight)
    device = memory.device
    k = keys.to(device, torch.float64)
    space = NullSpace(space.basis.to(device), space.threshold, space.eigenvalues)
    lhs = space.project(k @ k.T + memory)
    space.add_weighted_moment(lhs, mom2_weight)
    lhs.diagonal().add_(l2)
    solved = solve_general(lhs, space.project(k), layer, fix="raise L2")  # d_ff × n
    return Factors(residual.to(device, torch.float64).float(), solved.T.float())


def _alphaedit_update_lean(keys: torch.Tensor, residual: torch.Tensor, space: NullSpace, memory: LayerMemory,
                           l2: float, layer: int | None, mom2_weight: float) -> Factors:
    device = memory.device
    k = keys.to(device, torch.float64)
    basis = space.basis.to(device, torch.float64)
    if memory.matrix is None:  # Π (K Kᵀ + M) = U Σ (Uᵀ B) Bᵀ over blocks B of [K, M's keys]: no d_ff² but the result
        reduced = (basis.T @ k) @ k.T
        for block in memory.key_blocks(device):
            reduced.addmm_(basis.T @ block, block.T)
    else:
        gram = memory.add_to(k @ k.T)
        reduced = basis.T @ gram
        del gram
    lhs = basis @ reduced
    del reduced
    NullSpace(basis, space.threshold, space.eigenvalues).add_weighted_moment(lhs, mom2_weight)  # basis already here
    lhs.diagonal().add_(l2)
    rhs = basis @ (basis.T @ k)
    del basis
    solved = solve_general(lhs, rhs, layer, fix="raise L2")  # d_ff × n
    return Factors(residual.to(device, torch.float64).float(), solved.T.float())


def projected_neuron_update(keys: torch.Tensor, residual: torch.Tensor, space: NullSpace, memory: MemoryLike,
                            l2: float, selected: torch.Tensor, layer: int | None = None,
                            mom2_weight: float = 0.0) -> Factors:
    """AlphaEdit's projected solve on NSE's selected neurons ``S`` (method ``"nse_null"``).

    ``ΔW[:, S]ᵀ = (Π (Kₛ Kₛᵀ + Mₛₛ + μCₛₛ) + L2·I)⁻¹ Π Kₛ Rᵀ`` and ``ΔW[:, S̄] = 0``, with ``Π`` the projector onto
    ``space``, the null space of ``C`` restricted to ``S`` (``C_SS``'s small eigenvectors, ``|S| × k``). Every
    row of ``ΔW`` lies in that null space and only the selected neurons change.

    Args:
        keys: ``d_ff × n`` keys of the requests being written.
        residual: ``d_model × n`` this layer's share of the residual.
        space: the null space of ``C_SS`` (basis in the coordinates of ``S``).
        memory: ``M``, the sum of earlier rounds' ``k kᵀ``: a ``d_ff × d_ff`` float64 matrix, or a layer's lean
            view (only ``M_SS`` is formed).
        l2: the weight of ``‖ΔW‖²``.
        selected: neuron indices ``S``.
        layer: named in the error when the system is singular.
        mom2_weight: ``μ`` (see :func:`alphaedit_update`).

    Raises:
        SingularSystemError: the system is singular to working precision.
    """
    device = memory.device
    index = selected.to(device)
    if isinstance(memory, LayerMemory):
        restricted = memory.add_to(torch.zeros(len(index), len(index), dtype=torch.float64, device=device), index)
    else:
        restricted = memory[index][:, index]
    sub = alphaedit_update(keys.to(device)[index], residual, space, restricted, l2, layer, mom2_weight)
    a = torch.zeros(keys.shape[1], keys.shape[0], dtype=sub.A.dtype, device=device)
    a[:, index] = sub.A
    return Factors(sub.B, a)


def leak_directions(delta: torch.Tensor, second_moment: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` output directions through which ``delta`` changes the corpus' outputs most.

    ``delta`` (``ΔW``, ``d_model × d_ff``) moves the projection's output for a key ``k`` by ``ΔW k``; over the
    corpus behind ``C = E[k kᵀ]`` that change has second moment ``ΔW C ΔWᵀ``. Its top eigenvectors (float64
    ``d_model × count`` orthonormal columns, largest first) are where the update leaks into text it was not
    written for the most.
    """
    d = delta.double()
    leak = d @ (second_moment.to(d.device, torch.float64) @ d.T)
    vectors = torch.linalg.eigh((leak + leak.T) / 2).eigenvectors
    return vectors[:, -count:].flip(1).contiguous()


def leak_decay_update(total: Factors, second_moment: torch.Tensor, fraction: float, count: int = 1) -> Factors:
    """The update that takes ``fraction`` of ``total`` (a layer's cumulative ``ΔW``) off along its ``count`` top
    leak directions ``U`` (:func:`leak_directions`): ``−fraction · U Uᵀ ΔW``, rank ``count``.

    After it, ``Uᵀ (ΔW + update) = (1 − fraction) Uᵀ ΔW`` and every output direction orthogonal to ``U`` is
    unchanged. Why: the edits of many rounds share a small common part of their value shifts, which the rounds add
    up coherently, so that on SmolLM2 the cumulative update's top leak direction carries most of its perplexity
    cost after 2000 edits and more of it than the edits need (benchmarks/README.md, "A common direction the
    rounds over-write").
    """
    delta = total.dense()
    directions = leak_directions(delta, second_moment, count)
    return Factors((-fraction * directions).to(delta.dtype), (directions.T.to(delta.dtype) @ delta))


def through_post_norm(norm: torch.nn.Module, outputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Map residual-stream targets back to a projection whose output is normalised before the residual add.

    With ``y = norm(x) = v · g`` where ``v = x / rms(x)`` (Gemma's ``post_feedforward_layernorm``), the
    wanted output is ``y* = norm(x) + r``. The reachable outputs are ``v · g`` with ``rms(v) = 1``; the
    closest one to ``y*`` is ``v_d = g_d y*_d / (g_d² + λ)`` with ``λ ≥ 0`` chosen so that ``rms(v) = 1``
    (dimensions with a tiny ``g`` are not chased with huge values). The new projection output is the
    multiple ``c · v`` closest to the current ``x`` with ``c ≥ rms(x) / 2`` (a positive scale: the norm
    maps ``c · v`` to ``sign(c) · v · g``); the returned change is that minus ``x``.

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
    # The norm maps c·v to sign(c)·v·g: a negative scale would send the output away from the target.
    # Keep it at least half of x's scale (costs at most ~12 % more change than c → 0⁺, and stays far
    # from the norm's epsilon).
    fit = torch.maximum(fit, _MIN_POST_NORM_SCALE * rms(x))
    return (fit * v - x).T


_MIN_POST_NORM_SCALE = 0.5
