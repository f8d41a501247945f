"""StableEdit's changes to UltraEdit: full whitening, bounded norms, warm-up; saved and resumed."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_HPARAMS
from test_ultraedit import REQUESTS, session_for

from nse_hub import EditSession
from nse_hub.algorithm.lifelong import WHITENING_FLOOR, FeatureStats, combine_all, stats_from_tensors, stats_to_tensors
from nse_hub.algorithm.ultraedit import bound_norm, pseudo_values
from nse_hub.config import EditConfig
from nse_hub.deltas import Factors
from nse_hub.errors import ConfigError


def test_the_combined_comoment_is_the_covariance_of_every_feature_seen() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 6, generator=g, dtype=torch.float64) * (k + 1) + k for k, n in enumerate((3, 8, 20))]
    combined = combine_all(FeatureStats.of(p, comoment_dims=4) for p in parts)
    everything = torch.cat(parts)
    torch.testing.assert_close(combined.comoment / (combined.count - 1), torch.cov(everything[:, 2:].T),
                               rtol=1e-12, atol=1e-12)
    restored = stats_from_tensors(stats_to_tensors({5: combined}))[5]
    assert torch.equal(restored.comoment, combined.comoment)
    assert stats_from_tensors(stats_to_tensors({5: FeatureStats.of(parts[0])}))[5].comoment is None
    # whitening needs more vectors than coordinates (+1); mixing a round without a co-moment drops it
    assert FeatureStats.of(parts[0], comoment_dims=4).whitening() is None
    assert combined.combine(FeatureStats.of(parts[1])).comoment is None


def test_full_whitening_gives_gradients_an_identity_covariance() -> None:
    g = torch.Generator().manual_seed(1)
    mixing = torch.randn(5, 5, generator=g, dtype=torch.float64)
    keys = torch.randn(200, 3, generator=g, dtype=torch.float64)
    grads = torch.randn(200, 5, generator=g, dtype=torch.float64) @ mixing + 2.0  # correlated coordinates
    features = torch.cat([keys, grads], dim=1)
    stats = FeatureStats.of(features, comoment_dims=5)
    values = pseudo_values(features, stats, d_ff=3, lr=0.5, whitening="full")
    k_hat = stats.normalize(features)[:, :3]
    g_hat = values / (-0.5 * k_hat.square().sum(1, keepdim=True))
    torch.testing.assert_close(torch.cov(g_hat.T), torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-9)
    diagonal = pseudo_values(features, stats, d_ff=3, lr=0.5)  # UltraEdit's per-coordinate scaling
    torch.testing.assert_close(diagonal, -0.5 * k_hat.square().sum(1, keepdim=True) * stats.normalize(features)[:, 3:])
    # directions the gradients never spanned are floored, not amplified without bound
    flat = torch.cat([keys, grads[:, :1].expand(-1, 5)], dim=1)
    whitening = FeatureStats.of(flat, comoment_dims=5).whitening()
    eigenvalues = torch.linalg.eigvalsh(whitening)
    assert float(eigenvalues.max() / eigenvalues.min()) <= WHITENING_FLOOR ** -0.5 * (1 + 1e-6)


def test_bounded_norms_scale_an_update_down_to_the_cap_and_keep_its_rank() -> None:
    g = torch.Generator().manual_seed(2)
    factors = Factors(torch.randn(4, 2, generator=g), torch.randn(2, 7, generator=g))
    norm = float(factors.dense().norm())
    bounded = bound_norm(factors, weight_norm=10.0, cap=0.5 * norm / 10.0)
    assert bounded.rank == 2
    assert float(bounded.dense().norm()) == pytest.approx(0.5 * norm, rel=1e-5)
    torch.testing.assert_close(bounded.dense() * 2, factors.dense(), rtol=1e-5, atol=1e-6)
    assert bound_norm(factors, 10.0, 2 * norm / 10.0) is factors and bound_norm(factors, 10.0, 0.0) is factors


def test_warm_up_statistics_join_the_next_round_and_are_saved_with_it(tiny_dir: Path, tmp_path: Path) -> None:
    warmed = session_for(tiny_dir, ultraedit_whitening="full", ultraedit_norm_cap=0.05)
    plain = session_for(tiny_dir, ultraedit_whitening="full", ultraedit_norm_cap=0.05)
    added = warmed.warm_up(REQUESTS[3:])
    assert added > 0 and warmed.engine.lifelong(1).count == added and not warmed.deltas.rounds  # nothing written
    warmed.edit(REQUESTS[:2], progress=False)
    plain.edit(REQUESTS[:2], progress=False)
    assert warmed.engine.lifelong_rounds[0][1].count == plain.engine.lifelong_rounds[0][1].count + added
    assert not warmed.engine.lifelong_warmup and warmed.engine.lifelong_rounds[0][1].comoment is not None
    assert not torch.equal(warmed.deltas.rounds[0][1].B, plain.deltas.rounds[0][1].B)  # normalised differently
    for layer in (1, 2):
        weight = warmed.deltas.originals[layer].double().norm()
        assert float(warmed.deltas.rounds[0][layer].dense().double().norm()) <= 0.05 * float(weight) * (1 + 1e-5)
    warmed.save_pretrained(tmp_path / "saved")
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert resumed.config.ultraedit_whitening == "full" and resumed.engine.lifelong(1).count == \
        warmed.engine.lifelong(1).count
    warmed.edit(REQUESTS[2:3], progress=False)
    resumed.edit(REQUESTS[2:3], progress=False)
    for layer in (1, 2):
        assert torch.equal(warmed.deltas.rounds[1][layer].B, resumed.deltas.rounds[1][layer].B)
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "full whitening" in card and "bounded to 0.05" in card


def test_warm_up_and_the_new_settings_refuse_bad_use(tiny_dir: Path) -> None:
    nse = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS)
    with pytest.raises(ConfigError, match="method='ultraedit'"):
        nse.warm_up(REQUESTS[:1])
    with pytest.raises(ValueError, match="ultraedit_whitening must be 'diagonal' or 'full'"):
        EditConfig(method="ultraedit", ultraedit_whitening="pca")
    with pytest.raises(ValueError, match="ultraedit_norm_cap must be zero"):
        EditConfig(method="ultraedit", ultraedit_norm_cap=-1.0)
