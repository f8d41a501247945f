"""Weight changes as exact low-rank factors, and the key memory of earlier rounds.

Every update NSE or MEMIT writes is ``ΔW = B @ A`` (``B``: ``d_model × r``, ``A``: ``r × d_ff``).
:class:`WeightDeltas` keeps the original weight of each edited projection and the factors of every
round; the module's weight is always recomputed as ``W0 + B_all @ A_all`` from them, so the same
factors give bit-identical weights in any process (resume, rollback, PEFT merge).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nse_hub.architectures import ModelLayout
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


class WeightDeltas:
    """The edited projections of a model: original weights plus per-round factors.

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
        self.originals = {layer: read_tensor(model, name).detach().clone() for layer, name in self._names.items()}
        self.original_sha256 = {layer: tensor_sha256(w) for layer, w in self.originals.items()}
        self.rounds: list[dict[int, Factors]] = []
        self._pending: dict[int, list[Factors]] = {}

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
        """``W0 + ΔW`` in the module's own layout and dtype."""
        original = self.originals[layer]
        total = self.cumulative(layer, upto)
        if total is None:
            return original
        delta = self.layout.to_stored_layout(total.to(original.device).dense())
        return (original.float() + delta).to(original.dtype)

    # --- applying ---------------------------------------------------------------------------------

    def _apply(self, layer: int) -> None:
        write_tensor(self.model, self._names[layer], self.edited_weight(layer))

    def apply_all(self) -> None:
        for layer in self.layers:
            self._apply(layer)

    @contextmanager
    def original(self) -> Iterator[None]:
        """Run the model on its original weights ("deltas off"); no weight is copied."""
        with self._weights({layer: self.originals[layer] for layer in self.layers}):
            yield

    @contextmanager
    def at_round(self, upto: int) -> Iterator[None]:
        """Run the model as the version after round ``upto`` (0: the original weights), then restore it.

        The weights are ``W0 + B_all @ A_all`` of rounds ``1..upto``, the same as :meth:`edited_weight` and so
        as a merge or the saved adapter of that version.
        """
        with self._weights({layer: self.edited_weight(layer, upto) for layer in self.layers}):
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


class KeyMemory:
    """Keys written in earlier rounds per layer, and ``P = Σ K Kᵀ`` over them (float64).

    Only the keys are state (``d_ff × n`` per round and layer); ``P`` is re-summed from them in
    round order, so rollback and resume reproduce it exactly.
    """

    def __init__(self, layers: Sequence[int], size: int, device: torch.device | str) -> None:
        self.layers = tuple(layers)
        self.device = device
        self.rounds: list[dict[int, torch.Tensor]] = []
        self._sums = {layer: torch.zeros(size, size, dtype=torch.float64, device=device) for layer in self.layers}

    def add_round(self, keys: dict[int, torch.Tensor]) -> None:
        stored = {layer: k.detach().float().cpu() for layer, k in keys.items()}
        self.rounds.append(stored)
        for layer, k in stored.items():
            k64 = k.to(self.device, torch.float64)
            self._sums[layer] += k64 @ k64.T

    def truncate(self, rounds: int) -> None:
        kept = self.rounds[:rounds]
        self.rounds = []
        self._sums = {layer: torch.zeros_like(s) for layer, s in self._sums.items()}
        for keys in kept:
            self.add_round(keys)

    def P(self, layer: int) -> torch.Tensor:
        return self._sums[layer]
