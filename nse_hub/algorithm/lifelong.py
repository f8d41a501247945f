"""Lifelong normalization: running mean and variance of editing features across rounds (UltraEdit).

Each round contributes the statistics of its own features (count, mean, sum of squared deviations);
the running statistics are those contributions combined in round order (Chan et al.'s parallel
update). Combining is exact: the result equals the mean and variance of every feature seen so far,
and replaying the same contributions in the same order reproduces it bit for bit, so rollback,
resume and merges never need the features themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# The reference normalises by (σ + ε) with ε float32's machine epsilon; kept so that a feature
# coordinate that never varied maps to 0 instead of dividing by zero.
EPSILON = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of a set of feature vectors (float64).

    Attributes:
        count: how many vectors.
        mean: their mean, ``d``.
        m2: the sum of squared deviations from the mean per coordinate, ``d``.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        """The statistics of the rows of ``features`` (``n × d``)."""
        x = features.double()
        mean = x.mean(dim=0)
        return cls(x.shape[0], mean, (x - mean).square().sum(dim=0))

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
        return FeatureStats(n, mean, m2)

    @property
    def variance(self) -> torch.Tensor:
        """The unbiased variance per coordinate (``m2 / (count − 1)``; 0 with a single vector)."""
        return self.m2 / max(self.count - 1, 1)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """``(z − μ) / (σ + ε)`` for each row of ``features``, float64."""
        return (features.double() - self.mean) / (self.variance.sqrt() + EPSILON)

    def to(self, device: torch.device | str) -> FeatureStats:
        return FeatureStats(self.count, self.mean.to(device), self.m2.to(device))


def combine_all(parts: Iterable[FeatureStats]) -> FeatureStats | None:
    """All ``parts`` combined in order (``None`` when there are none)."""
    total = None
    for part in parts:
        total = part if total is None else total.combine(part)
    return total


def stats_to_tensors(stats: Mapping[int, FeatureStats]) -> dict[str, torch.Tensor]:
    """Per-layer statistics as named tensors (``layer_<l>_count``, ``_mean``, ``_m2``) for safetensors."""
    out = {}
    for layer, s in stats.items():
        out[f"layer_{layer}_count"] = torch.tensor([s.count], dtype=torch.int64)
        out[f"layer_{layer}_mean"] = s.mean.detach().cpu().contiguous()
        out[f"layer_{layer}_m2"] = s.m2.detach().cpu().contiguous()
    return out


def stats_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[int, FeatureStats]:
    """The inverse of :func:`stats_to_tensors`.

    Raises:
        KeyError: a layer misses one of its three tensors.
    """
    layers = sorted({int(name.split("_")[1]) for name in tensors})
    return {layer: FeatureStats(int(tensors[f"layer_{layer}_count"][0]), tensors[f"layer_{layer}_mean"].double(),
                                tensors[f"layer_{layer}_m2"].double()) for layer in layers}
