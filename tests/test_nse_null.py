"""NSE-null (method "nse_null"): NSE's values, selection and passes with AlphaEdit's projected solve."""

import pytest
import torch
from conftest import TINY_HPARAMS
from test_methods import REQUESTS, engine, engine_round, random_psd

from nse_hub import EditSession
from nse_hub.algorithm.update import null_space, projected_neuron_update, select_neurons
from nse_hub.card import METHODS as CARD_METHODS


def test_the_projected_update_solves_alphaedits_system_on_the_selected_neurons_only() -> None:
    g = torch.Generator().manual_seed(3)
    d_ff, d_model, n, l2 = 24, 6, 3, 2.0
    second_moment = random_psd(d_ff, 30, seed=4)
    memory = random_psd(d_ff, 5, seed=5)
    keys = torch.randn(d_ff, n, generator=g, dtype=torch.float64).abs()
    keys[[0, 5, 9]] = 0.0  # neurons no key touches
    residual = torch.randn(d_model, n, generator=g, dtype=torch.float64)
    selected = select_neurons(keys, 0.9)
    index = selected
    assert len(index) < d_ff - 3
    space = null_space(second_moment[index][:, index], 1.0)
    factors = projected_neuron_update(keys, residual, space, memory, l2, selected)
    delta = factors.dense().double()  # d_model × d_ff
    unselected = torch.ones(d_ff, dtype=torch.bool)
    unselected[index] = False
    assert float(delta[:, unselected].abs().max()) == 0.0  # only the selected neurons change
    sub = delta[:, index]
    projector = space.projector
    torch.testing.assert_close(sub, sub @ projector, rtol=0, atol=1e-6)  # rows in C_SS's null space
    k, m = keys[index], memory[index][:, index]
    lhs = projector @ (k @ k.T + m) + l2 * torch.eye(len(index), dtype=torch.float64)
    torch.testing.assert_close(lhs @ sub.T, projector @ k @ residual.T, rtol=1e-5, atol=1e-5)
    assert factors.rank == n


def test_the_null_space_moment_weight_adds_mu_c_inside_the_null_space() -> None:
    g = torch.Generator().manual_seed(8)
    d_ff, d_model, n, l2, mu = 20, 5, 3, 0.5, 40.0
    second_moment = random_psd(d_ff, 26, seed=9)
    memory = random_psd(d_ff, 4, seed=10)
    keys = torch.randn(d_ff, n, generator=g, dtype=torch.float64)
    residual = torch.randn(d_model, n, generator=g, dtype=torch.float64)
    everything = torch.arange(d_ff)
    space = null_space(second_moment, 1.5)
    plain = projected_neuron_update(keys, residual, space, memory, l2, everything).dense().double()
    soft = projected_neuron_update(keys, residual, space, memory, l2, everything, mom2_weight=mu).dense().double()
    projector = space.projector
    torch.testing.assert_close(soft, soft @ projector, rtol=0, atol=1e-6)  # still in the null space
    lhs = projector @ (keys @ keys.T + memory + mu * second_moment) + l2 * torch.eye(d_ff, dtype=torch.float64)
    torch.testing.assert_close(lhs @ soft.T, projector @ keys @ residual.T, rtol=1e-5, atol=1e-5)
    # the corpus' directions cost more, so the update puts less of its energy on them than AlphaEdit's does
    assert torch.trace(soft @ second_moment @ soft.T) < torch.trace(plain @ second_moment @ plain.T)


def test_an_nse_null_round_keeps_nses_values_and_filter_and_writes_in_the_null_space() -> None:
    inputs = engine("nse_null", nullspace_threshold=1.0, neuron_threshold=0.8)
    outcome = engine_round(inputs)
    assert len(outcome.kept) == 2  # NSE's passes with the residual filter
    assert set(outcome.nullspace_dims) == {1, 2}
    assert sum(outcome.residual_after) < sum(outcome.residual_before)
    for layer in (1, 2):
        assert all(0 < count < 64 for count in outcome.selected_neurons[layer])
        weight = inputs.layout.projection(inputs.model, layer).weight
        assert torch.equal(weight, inputs.deltas.originals[layer] + inputs.deltas.cumulative(layer).dense())
    # values are computed on the original weights, so a second round's match a fresh engine's
    fresh = engine("nse_null", nullspace_threshold=1.0, neuron_threshold=0.8)
    later = engine_round(inputs, REQUESTS[2:3])
    alone = engine_round(fresh, REQUESTS[2:3])
    torch.testing.assert_close(later.optimized.targets, alone.optimized.targets)
    assert CARD_METHODS["nse_null"][0] == "NSE-null"


@pytest.mark.parametrize(("mu", "omega", "mpes", "retries", "criterion", "decay"),
                         [(0.0, 1.0, False, 0, "wins", 0.0), (50.0, 3.0, True, 2, "greedy", 0.1),
                          (0.0, 1.0, False, 2, "wins", 0.0)])
def test_an_nse_null_session_names_the_method_and_its_settings_in_its_card(tiny_dir, tmp_path, mu, omega,
                                                                           mpes, retries, criterion, decay) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), method="nse_null", device="cpu",
                                          nullspace_mom2_weight=mu, key_memory_weight=omega,
                                          v_stop_most_probable=mpes, retry_failed=retries, retry_criterion=criterion,
                                          leak_decay=decay, **TINY_HPARAMS)
    session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    card = " ".join((tmp_path / "saved" / "README.md").read_text().split())
    assert "NSE-null" in card and "the selected neurons' null space" in card and "L2 = 10.0" in card
    assert ("inside the null space μ = 50.0" in card) == bool(mu)  # μ = 0 is AlphaEdit's solve: not named
    assert ("Earlier rounds' keys weighted ω = 3.0" in card) == (omega != 1)  # ω = 1: the reference solve
    assert ("most-probable early stopping" in card) == mpes
    retried = "Up to 2 more passes per round wrote again the edits whose new target"
    assert (f"{retried} did not yet win on their rewrite prompt" in card) == (bool(retries) and criterion == "wins")
    assert (f"{retried} greedy decoding did not yet write after their rewrite prompt" in card) == (
        bool(retries) and criterion == "greedy")
    assert ("Each round ended by taking 0.1 of every edit layer's cumulative update off along its 1 top leak "
            "direction" in card) == bool(decay)
    config = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu").config
    assert config.leak_decay == decay
    assert (config.method, config.nullspace_mom2_weight, config.key_memory_weight) == ("nse_null", mu, omega)
    assert config.retry_criterion == criterion
    assert config.v_stop_most_probable is mpes and config.retry_failed == retries
