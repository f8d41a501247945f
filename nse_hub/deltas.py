"""Weight changes as exact low-rank factors, and the key memory of earlier rounds.

Every update NSE or MEMIT writes is ``ΔW = B @ A`` (``B``: ``d_model × r``, ``A``: ``r × d_ff``).
:class:`WeightDeltas` keeps the original weight of each edited projection and the factors of every
round. How the edit reaches the model depends on the weights' precision:

* float32 (and float64) models: the module's weight is recomputed as ``W0 + B_all @ A_all`` from
  them, so the same factors give bit-identical weights in any process (resume, rollback, PEFT merge);
* bfloat16 and float16 models: ``W0 + ΔW`` rounded back to the weights' precision would drop every
  update entry below half a step of the weight it lands on, so the weights stay ``W0`` and a forward
  hook adds ``B_all (A_all x)`` computed in float32 to the projection's output, then rounds the sum
  once, as stock ``peft`` does with LoRA factors kept in float32 (so a saved adapter loaded by
  ``peft`` on the same base computes the same outputs).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nse_hub.architectures import ModelLayout
from nse_hub.errors import ConfigError
from nse_hub.fingerprint import tensor_sha256
from nse_hub.offload import read_tensor, write_tensor


@dataclass(frozen=True)
class Factors:
    """``ΔW = B @ A`` in the ``d_model × d_ff`` orientation; float32."""

    B: torch.Tensor  # d_model × r
    A: torch.Tensor  # r × d_ff

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def to(self, device: torch.device | str) -> Factors:
        return Factors(self.B.to(device), self.A.to(device))

    @staticmethod
    def stack(parts: Sequence[Factors]) -> Factors:
        """One factor pair whose product is the sum of the parts' products."""
        return Factors(torch.cat([p.B for p in parts], dim=1), torch.cat([p.A for p in parts], dim=0))


# Weight precisions whose rounding would swallow small updates: edits to them are applied unmerged.
LOW_PRECISION = (torch.bfloat16, torch.float16)
# On an unmerged projection: (weak reference to the WeightDeltas that hooks it, the hook's id).
_OWNER = "_nse_hub_deltas"


@dataclass(frozen=True)
class _Unmerged:
    """A delta added to a projection's output in float32: ``B (A x)``, or ``ΔW x`` when that is cheaper."""

    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # d_model × d_ff

    @staticmethod
    def of(factors: Factors) -> _Unmerged:
        d_model, d_ff = factors.B.shape[0], factors.A.shape[1]
        if factors.rank * (d_model + d_ff) >= d_model * d_ff:
            return _Unmerged(dense=factors.dense().float())
        return _Unmerged(factors.B.float().contiguous(), factors.A.float().contiguous())

    def add_to(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + ΔW x`` summed in float32 and rounded once to ``result``'s dtype (as peft's LoRA layer)."""
        x = x.to(torch.float32)
        # An offloaded projection runs where accelerate moves it; its factors stay where the originals are read.
        dense, A, B = (None if t is None else t.to(x.device) for t in (self.dense, self.A, self.B))
        change = F.linear(x, dense) if dense is not None else F.linear(F.linear(x, A), B)
        return (result + change).to(result.dtype)


class WeightDeltas:
    """The edited projections of a model: original weights plus per-round factors.

    In a float32 model the edits are merged into the weights (``W0 + ΔW``); in a bfloat16 or float16
    model (:data:`LOW_PRECISION`) the weights stay ``W0`` and a forward hook on each edited projection
    adds ``ΔW x`` in float32 (see the module docstring): :attr:`unmerged` says which.

    Args:
        model: the model whose projections are edited in place.
        layout: where the projections are.
        layers: the edit layers.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, layers: Sequence[int]) -> None:
        self.layout = layout
        self.layers = tuple(layers)
        self.model = model
        self.modules = {layer: layout.projection(model, layer) for layer in self.layers}
        # Read and written through accelerate's offload hooks where a projection is offloaded (nse_hub.offload).
        self._names = {layer: f"{layout.projection_name(layer)}.weight" for layer in self.layers}
        weights = {layer: read_tensor(model, name).detach() for layer, name in self._names.items()}
        self.unmerged = any(w.dtype in LOW_PRECISION for w in weights.values())
        # Unmerged, the weights never change: they are the originals (no copy).
        self.originals = {layer: w if self.unmerged else w.clone() for layer, w in weights.items()}
        self.original_sha256 = {layer: tensor_sha256(w) for layer, w in self.originals.items()}
        self.rounds: list[dict[int, Factors]] = []
        self._pending: dict[int, list[Factors]] = {}
        self._applied: dict[int, _Unmerged | None] = dict.fromkeys(self.layers)
        if self.unmerged:
            for layer in self.layers:
                self._claim(layer)

    # --- building a round ------------------------------------------------------------------------

    def add(self, layer: int, factors: Factors) -> None:
        """Add an update to the round in progress and apply it to the model at once."""
        self._pending.setdefault(layer, []).append(factors)
        self._apply(layer)

    def commit_round(self) -> dict[int, Factors]:
        """Close the round in progress; returns its factors per layer."""
        round_factors = {layer: Factors.stack(parts) for layer, parts in sorted(self._pending.items())}
        self.rounds.append(round_factors)
        self._pending = {}
        self.apply_all()
        return round_factors

    def discard_round(self) -> None:
        """Drop the round in progress (after an error) and restore the weights of the last round."""
        self._pending = {}
        self.apply_all()

    def truncate(self, rounds: int) -> None:
        """Keep only the first ``rounds`` rounds."""
        del self.rounds[rounds:]
        self._pending = {}
        self.apply_all()

    def append_round(self, factors: dict[int, Factors]) -> None:
        """Add a finished round (when restoring a saved session)."""
        self.rounds.append({layer: f.to(self.originals[layer].device) for layer, f in factors.items()})
        self.apply_all()

    # --- reading ----------------------------------------------------------------------------------

    def cumulative(self, layer: int, upto: int | None = None) -> Factors | None:
        """Factors of all updates to ``layer`` in rounds ``1..upto`` (all rounds by default)."""
        parts = [r[layer] for r in self.rounds[:upto] if layer in r]
        if upto is None:
            parts += self._pending.get(layer, [])
        return Factors.stack(parts) if parts else None

    def edited_weight(self, layer: int, upto: int | None = None) -> torch.Tensor:
        """``W0 + ΔW`` in the module's own layout and dtype (what a merge writes).

        In a bfloat16/float16 model this rounds ``ΔW`` away where it is below half a step of the weight; the
        session itself applies the deltas unmerged there (see :class:`WeightDeltas`).
        """
        original = self.originals[layer]
        total = self.cumulative(layer, upto)
        if total is None:
            return original
        delta = self.layout.to_stored_layout(total.to(original.device).dense())
        return (original.float() + delta).to(original.dtype)

    # --- applying ---------------------------------------------------------------------------------

    def _claim(self, layer: int) -> None:
        """Hook the projection of ``layer``, refusing one whose deltas another live WeightDeltas applies."""
        module = self.modules[layer]
        earlier = getattr(module, _OWNER, None)
        if earlier is not None:
            owner, hook_id = earlier[0](), earlier[1]
            if owner is not None and any(m is module for m in owner.modules.values()):
                raise ConfigError(f"{self.layout.projection_name(layer)} is already edited by another session (in "
                                  f"{module.weight.dtype} its deltas are added by a forward hook): continue that "
                                  "session, or load the model again for a new one")
            module._forward_hooks.pop(hook_id, None)  # a dropped session's, or a copy's: it edits nothing
        handle = module.register_forward_hook(self._hook(layer))
        setattr(module, _OWNER, (weakref.ref(self), handle.id))

    def _hook(self, layer: int) -> Any:
        module, owner = self.modules[layer], weakref.ref(self)  # a dropped session stops editing

        def add_delta(hooked: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            deltas = owner()
            # A deep copy of the model (a merge) carries this hook along: it must not edit the copy.
            if deltas is None or hooked is not module or deltas._applied[layer] is None:
                return None
            return deltas._applied[layer].add_to(args[0], output)

        return add_delta

    def _unmerged_delta(self, layer: int, upto: int | None = None) -> _Unmerged | None:
        total = self.cumulative(layer, upto)
        return None if total is None else _Unmerged.of(total.to(self.originals[layer].device))

    def _apply(self, layer: int) -> None:
        if self.unmerged:
            self._applied[layer] = self._unmerged_delta(layer)
        else:
            write_tensor(self.model, self._names[layer], self.edited_weight(layer))

    def apply_all(self) -> None:
        for layer in self.layers:
            self._apply(layer)

    @contextmanager
    def original(self) -> Iterator[None]:
        """Run the model on its original weights ("deltas off"); no weight is copied."""
        with self.at_round(0):
            yield

    @contextmanager
    def at_round(self, upto: int) -> Iterator[None]:
        """Run the model as the version after round ``upto`` (0: the original weights), then restore it.

        The weights are ``W0 + B_all @ A_all`` of rounds ``1..upto``, the same as :meth:`edited_weight` and so
        as a merge or the saved adapter of that version; unmerged (bfloat16/float16 models), the projections
        add that version's ``ΔW x`` in float32, as the saved adapter of that version does under ``peft``.
        """
        with self._version(self.layers, upto):
            yield

    @contextmanager
    def only(self, layers: Iterable[int], upto: int | None = None) -> Iterator[None]:
        """Run the model with the edits of ``layers`` alone, the other edit layers on their original weights.

        Which layer's update does what (an ablation): ``only([])`` is :meth:`original`, ``only(deltas.layers)``
        the edited model. ``upto`` limits the edits to rounds ``1..upto`` as in :meth:`at_round`. The model is
        restored after, merged or unmerged.
        """
        kept = set(layers)
        if not kept <= set(self.layers):
            raise ConfigError(f"layers {sorted(kept - set(self.layers))} are not edit layers of this session "
                              f"(its edit layers are {list(self.layers)}): name some of those")
        with self._version(kept, upto):
            yield

    @contextmanager
    def _version(self, kept: Iterable[int], upto: int | None) -> Iterator[None]:
        """The edits of rounds ``1..upto`` on the layers ``kept``; the other edit layers unedited."""
        kept = set(kept)
        if self.unmerged:
            current = dict(self._applied)
            self._applied.update({layer: self._unmerged_delta(layer, upto) if layer in kept else None
                                  for layer in self.layers})
            try:
                yield
            finally:
                self._applied = current
            return
        with self._weights({layer: self.edited_weight(layer, upto) if layer in kept else self.originals[layer]
                            for layer in self.layers}):
            yield

    @contextmanager
    def _weights(self, weights: dict[int, torch.Tensor]) -> Iterator[None]:
        current = {layer: read_tensor(self.model, name) for layer, name in self._names.items()}
        try:
            for layer, name in self._names.items():
                write_tensor(self.model, name, weights[layer])
            yield
        finally:
            for layer, name in self._names.items():
                write_tensor(self.model, name, current[layer])


# Rows of a float32 host matrix (or keys of the key memory) promoted to float64 on the device at a time: bounds
# the transient copies there to 8 · d_ff · 1024 bytes.
PROMOTE_ROWS = 1024


def promote_into(target: torch.Tensor, source: torch.Tensor, index: torch.Tensor | None = None,
                 scale: float = 1.0) -> torch.Tensor:
    """``target += scale · source[index][:, index]`` in ``target``'s dtype and device, a block of rows at a time.

    ``source`` (float32, usually on the host) is never copied whole to ``target``'s device: each block is
    promoted there exactly (float32 → float64 is exact) and added in place.
    """
    if index is not None:
        source = source[index.cpu()][:, index.cpu()] if source.device.type == "cpu" else source[index][:, index]
    for start in range(0, source.shape[0], PROMOTE_ROWS):
        stop = start + PROMOTE_ROWS
        target[start:stop].add_(source[start:stop].to(target.device, target.dtype), alpha=scale)
    return target


@dataclass(frozen=True)
class LayerMemory:
    """One layer's key memory ``P = Σ K Kᵀ`` as the lean engine reads it (see :class:`KeyMemory`).

    Attributes:
        keys: ``d_ff × N`` float32 keys of every earlier round (host), while ``N < d_ff``; else ``None``.
        matrix: ``P`` as a float32 ``d_ff × d_ff`` matrix (host), once ``N ≥ d_ff``; else ``None``.
        device: where the solve runs (``P`` is promoted to float64 there, never formed as a whole matrix
            while it is kept as keys).
        weight: ``ω``, what the solve reads is ``ωP`` (the setting ``key_memory_weight``).
    """

    keys: torch.Tensor | None
    matrix: torch.Tensor | None
    device: torch.device
    weight: float = 1.0

    def add_to(self, lhs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``lhs += ωP[index][:, index]`` in place (float64, on ``lhs``'s device)."""
        if self.matrix is not None:
            return promote_into(lhs, self.matrix, index, self.weight)
        if self.keys is not None:
            keys = self.keys if index is None else self.keys[index.cpu()]
            for block in self.key_blocks(lhs.device, keys):
                lhs.addmm_(block, block.T)
        return lhs

    def key_blocks(self, device: torch.device | str, keys: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """The stored keys (or ``keys``) times ``√ω``, :data:`PROMOTE_ROWS` at a time, in float64 on ``device``:
        the sum of ``block @ block.T`` over them is ``ωP``."""
        keys = self.keys if keys is None else keys
        root = math.sqrt(self.weight)
        for start in range(0, 0 if keys is None else keys.shape[1], PROMOTE_ROWS):
            block = keys[:, start:start + PROMOTE_ROWS].to(device, torch.float64)
            yield block if root == 1.0 else block * root  # not in place: float64 keys are not copied by .to()


class KeyMemory:
    """Keys written in earlier rounds per layer, and ``P = Σ K Kᵀ`` over them.

    Only the keys are state (``d_ff × n`` per round and layer, float32 on the host); ``P`` is derived from
    them in round order, so rollback and resume reproduce it exactly. Without ``lean``, ``P`` is a float64
    ``d_ff × d_ff`` matrix per layer on ``device``. With ``lean`` (the default), ``P`` is not formed while a
    layer holds fewer than ``d_ff`` keys (the solve adds ``K Kᵀ`` from the keys); from ``d_ff`` keys on, it
    is summed in float64 and stored as float32 on the host (:class:`LayerMemory`). ``matrix_after`` moves that
    point (``0``: ``P`` is a matrix from the start, the memory profile of a session that already holds ``d_ff``
    keys, which ``benchmarks/memory_plan.py`` measures); the solves are the same either way.
    """

    def __init__(self, layers: Sequence[int], size: int, device: torch.device | str, lean: bool = True,
                 matrix_after: int | None = None) -> None:
        self.layers = tuple(layers)
        self.size = size
        self.device = torch.device(device)
        self.lean = lean
        self.matrix_after = size if matrix_after is None else matrix_after
        self.rounds: list[dict[int, torch.Tensor]] = []
        self._sums: dict[int, torch.Tensor] = {} if lean else {
            layer: torch.zeros(size, size, dtype=torch.float64, device=device) for layer in self.layers}
        self._matrices: dict[int, torch.Tensor] = self._initial_matrices()  # lean: P in float32

    def _initial_matrices(self) -> dict[int, torch.Tensor]:
        if not self.lean or self.matrix_after > 0:
            return {}
        return {layer: torch.zeros(self.size, self.size) for layer in self.layers}

    def add_round(self, keys: dict[int, torch.Tensor]) -> None:
        stored = {layer: k.detach().float().cpu() for layer, k in keys.items()}
        self.rounds.append(stored)
        for layer, k in stored.items():
            if not self.lean:
                k64 = k.to(self.device, torch.float64)
                self._sums[layer] += k64 @ k64.T
            elif layer in self._matrices:  # in place: one float64 d_ff² besides the stored float32 P
                k64 = k.double()
                self._matrices[layer].copy_(self._matrices[layer].double().addmm_(k64, k64.T))
            elif self.count(layer) >= self.matrix_after:
                self._matrices[layer] = self._sum(layer).float()

    def count(self, layer: int) -> int:
        """Keys stored for ``layer`` over all rounds."""
        return sum(r[layer].shape[1] for r in self.rounds if layer in r)

    def _sum(self, layer: int) -> torch.Tensor:
        """``Σ K Kᵀ`` in float64 on the host, in round order."""
        total = torch.zeros(self.size, self.size, dtype=torch.float64)
        for r in self.rounds:
            if layer in r:
                k64 = r[layer].double()
                total.addmm_(k64, k64.T)
        return total

    def truncate(self, rounds: int) -> None:
        kept = self.rounds[:rounds]
        self.rounds = []
        self._sums = {layer: torch.zeros_like(s) for layer, s in self._sums.items()}
        self._matrices = self._initial_matrices()
        for keys in kept:
            self.add_round(keys)

    def layer(self, layer: int, weight: float = 1.0) -> LayerMemory:
        """The lean view of ``layer``'s memory, weighted by ``weight``: its keys, or its float32 matrix once it
        holds ``d_ff`` keys."""
        if layer in self._matrices:
            return LayerMemory(None, self._matrices[layer], self.device, weight)
        parts = [r[layer] for r in self.rounds if layer in r]
        keys = torch.cat(parts, dim=1) if parts else torch.zeros(self.size, 0)
        return LayerMemory(keys, None, self.device, weight)

    def P(self, layer: int, weight: float = 1.0) -> torch.Tensor:
        """``P`` of ``layer``, times ``weight``, as a float64 ``d_ff × d_ff`` matrix on ``device`` (formed on demand
        when lean; a weighted copy, never the stored sum scaled in place)."""
        if not self.lean:
            matrix = self._sums[layer]
        elif layer in self._matrices:
            matrix = self._matrices[layer].to(self.device, torch.float64)
        else:
            matrix = self._sum(layer).to(self.device)
        return matrix if weight == 1.0 else matrix * weight
