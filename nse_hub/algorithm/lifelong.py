"""Lifelong normalization: running mean and variance of editing features across rounds (UltraEdit).

Each round contributes the statistics of its own features (count, mean, sum of squared deviations);
the running statistics are those contributions combined in round order (Chan et al.'s parallel
update). Combining is exact: the result equals the mean and variance of every feature seen so far,
and replaying the same contributions in the same order reproduces it bit for bit, so rollback,
resume and merges never need the features themselves.

For StableEdit's full whitening, the statistics may also carry the co-moment matrix (the sum of
outer products of deviations) of the features' last ``d`` coordinates, combined the same way:
``M ← M + M_t + δδᵀ Nn/(N+n)`` over those coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# The reference normalises by (σ + ε) with ε float32's machine epsilon; kept so that a feature
# coordinate that never varied maps to 0 instead of dividing by zero.
EPSILON = float(torch.finfo(torch.float32).eps)
# StableEdit floors the covariance's eigenvalues at an absolute 1e-6; relative to the largest here, since
# the gradients' scale depends on the model and the loss.
WHITENING_FLOOR = 1e-6


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of a set of feature vectors (float64).

    Attributes:
        count: how many vectors.
        mean: their mean, ``d``.
        m2: the sum of squared deviations from the mean per coordinate, ``d``.
        comoment: ``None``, or the sum of outer products of deviations over the last
            ``comoment.shape[0]`` coordinates (StableEdit's full whitening of the gradients).
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    comoment: torch.Tensor | None = None

    @classmethod
    def of(cls, features: torch.Tensor, comoment_dims: int = 0) -> FeatureStats:
        """The statistics of the rows of ``features`` (``n × d``), with the co-moment of the last ``comoment_dims``."""
        x = features.double()
        mean = x.mean(dim=0)
        centred = x - mean
        tail = centred[:, x.shape[1] - comoment_dims:] if comoment_dims else None
        return cls(x.shape[0], mean, centred.square().sum(dim=0), None if tail is None else tail.T @ tail)

    @classmethod
    def empty(cls, size: int, device: torch.device | str = "cpu") -> FeatureStats:
        zeros = torch.zeros(size, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone())

    def combine(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets together (this one first)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + delta.square() * (self.count * other.count / n)
        comoment = None
        if self.comoment is not None and other.comoment is not None:
            tail = delta[delta.shape[0] - self.comoment.shape[0]:]
            comoment = (self.comoment + other.comoment.to(self.comoment.device)
                        + torch.outer(tail, tail) * (self.count * other.count / n))
        return FeatureStats(n, mean, m2, comoment)

    @property
    def variance(self) -> torch.Tensor:
        """The unbiased variance per coordinate (``m2 / (count − 1)``; 0 with a single vector)."""
        return self.m2 / max(self.count - 1, 1)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """``(z − μ) / (σ + ε)`` for each row of ``features``, float64."""
        return (features.double() - self.mean) / (self.variance.sqrt() + EPSILON)

    def whitening(self) -> torch.Tensor | None:
        """``Σ^{-1/2}`` of the co-moment's coordinates (``Σ = M / (count − 1)``), or ``None`` when not estimable.

        ``None`` without a co-moment or with at most ``d + 1`` vectors (``Σ`` would be singular).
        Eigenvalues are floored at :data:`WHITENING_FLOOR` × the largest, so that directions the
        features never spanned are not amplified without bound.
        """
        if self.comoment is None or self.count <= self.comoment.shape[0] + 1:
            return None
        sigma = self.comoment / (self.count - 1)
        eigenvalues, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
        floor = WHITENING_FLOOR * float(eigenvalues.max().clamp_min(torch.finfo(torch.float64).tiny))
        return (vectors * eigenvalues.clamp_min(floor).rsqrt()) @ vectors.T

    def to(self, device: torch.device | str) -> FeatureStats:
        return FeatureStats(self.count, self.mean.to(device), self.m2.to(device),
                            None if self.comoment is None else self.comoment.to(device))


def combine_all(parts: Iterable[FeatureStats]) -> FeatureStats | None:
    """All ``parts`` combined in order (``None`` when there are none)."""
    total = None
    for part in parts:
        total = part if total is None else total.combine(part)
    return total


def stats_to_tensors(stats: Mapping[int, FeatureStats]) -> dict[str, torch.Tensor]:
    """Per-layer statistics as named tensors (``layer_<l>_count``, ``_mean``, ``_m2``, ``_comoment``)."""
    out = {}
    for layer, s in stats.items():
        out[f"layer_{layer}_count"] = torch.tensor([s.count], dtype=torch.int64)
        out[f"layer_{layer}_mean"] = s.mean.detach().cpu().contiguous()
        out[f"layer_{layer}_m2"] = s.m2.detach().cpu().contiguous()
        if s.comoment is not None:
            out[f"layer_{layer}_comoment"] = s.comoment.detach().cpu().contiguous()
    return out


def stats_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[int, FeatureStats]:
    """The inverse of :func:`stats_to_tensors`.

    Raises:
        KeyError: a layer misses one of its three tensors.
    """
    layers = sorted({int(name.split("_")[1]) for name in tensors})
    return {layer: FeatureStats(int(tensors[f"layer_{layer}_count"][0]), tensors[f"layer_{layer}_mean"].double(),
                                tensors[f"layer_{layer}_m2"].double(),
                                tensors[f"layer_{layer}_comoment"].double()
                                if f"layer_{layer}_comoment" in tensors else None) for layer in layers}
