"""NSE-null (method "nse_null"): NSE's values, selection and passes with AlphaEdit's projected solve."""

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_model
from test_methods import REQUESTS, engine, engine_round, random_psd

from nse_hub import EditSession
from nse_hub.algorithm.update import joint_update, null_space, projected_neuron_update, select_neurons
from nse_hub.architectures import ModelLayout
from nse_hub.card import METHODS as CARD_METHODS
from nse_hub.config import EditConfig, make_config
from nse_hub.errors import ConfigError


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


@pytest.mark.parametrize(("mu", "omega"), [(0.0, 1.0), (50.0, 3.0)])
def test_an_nse_null_session_names_the_method_and_its_settings_in_its_card(tiny_dir, tmp_path, mu, omega) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), method="nse_null", device="cpu",
                                          nullspace_mom2_weight=mu, key_memory_weight=omega, **TINY_HPARAMS)
    session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "NSE-null" in card and "the selected neurons' null space" in card and "L2 = 10.0" in card
    assert ("inside the null space μ = 50.0" in card) == bool(mu)  # μ = 0 is AlphaEdit's solve: not named
    assert ("Earlier rounds' keys weighted ω = 3.0" in card) == (omega != 1)  # ω = 1: the reference solve
    config = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu").config
    assert (config.method, config.nullspace_mom2_weight, config.key_memory_weight) == ("nse_null", mu, omega)


def _joint_problem(n_old: int, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    d_ff, d_model, n, layers = 16, 5, 3, (1, 2)
    keys = {layer: torch.randn(d_ff, n, generator=g, dtype=torch.float64) for layer in layers}
    earlier = {layer: torch.randn(d_ff, n_old, generator=g, dtype=torch.float64) for layer in layers}
    selected = {1: torch.arange(d_ff), 2: torch.tensor([0, 2, 3, 5, 8, 9, 11, 12, 13, 15])}
    spaces = {layer: null_space(random_psd(len(selected[layer]), 20, seed=seed + layer), 1.5)
              for layer in layers}
    residual = torch.randn(d_model, n, generator=g, dtype=torch.float64)
    return keys, earlier, selected, spaces, residual


@pytest.mark.parametrize("mu", [0.0, 3.0])
def test_the_joint_update_is_the_least_squares_solution_over_all_layers_at_once(mu) -> None:
    keys, earlier, selected, spaces, residual = _joint_problem(7)
    l2 = 0.7
    memories = {layer: old @ old.T for layer, old in earlier.items()}
    updates = joint_update(keys, residual, spaces, memories, l2, selected, mu)
    deltas = {layer: f.dense().double() for layer, f in updates.items()}
    for layer, delta in deltas.items():  # only the selected neurons, rows in their null space
        index = selected[layer]
        outside = torch.ones(delta.shape[1], dtype=torch.bool)
        outside[index] = False
        assert not delta[:, outside].any()
        torch.testing.assert_close(delta[:, index], delta[:, index] @ spaces[layer].projector, rtol=0, atol=1e-6)
    # the same objective as one augmented least-squares problem over X = [X_1, X_2] (ΔW_l[:, S_l] = X_l U_lᵀ):
    # the new keys' rows couple the layers, each layer's earlier keys and ridge rows are its own
    bases = [spaces[layer].basis for layer in keys]
    new = torch.cat([u.T @ keys[layer][selected[layer]] for u, layer in zip(bases, keys)])
    old = torch.block_diag(*[(u.T @ earlier[layer][selected[layer]]).T for u, layer in zip(bases, keys)])
    ridge = torch.cat([l2 + mu * spaces[layer].eigenvalues for layer in keys])
    design = torch.cat([new.T, old, torch.diag(ridge.sqrt())])
    target = torch.cat([residual.T, torch.zeros(old.shape[0] + len(ridge), residual.shape[0], dtype=torch.float64)])
    x = torch.linalg.lstsq(design, target).solution.T  # d_model × D
    start = 0
    for u, layer in zip(bases, keys):
        expected = x[:, start:start + u.shape[1]] @ u.T
        torch.testing.assert_close(deltas[layer][:, selected[layer]], expected, rtol=1e-4, atol=1e-5)
        start += u.shape[1]


def test_one_layer_solved_jointly_is_the_per_layer_projected_update_with_the_whole_residual() -> None:
    keys, earlier, selected, spaces, residual = _joint_problem(6)
    layer = 2
    memory = earlier[layer] @ earlier[layer].T
    joint = joint_update({layer: keys[layer]}, residual, {layer: spaces[layer]}, {layer: memory}, 0.7,
                         {layer: selected[layer]})[layer].dense().double()
    alone = projected_neuron_update(keys[layer], residual, spaces[layer], memory, 0.7, selected[layer])
    torch.testing.assert_close(joint, alone.dense().double(), rtol=1e-4, atol=1e-5)


def test_a_joint_nse_null_round_writes_every_layer_and_its_card_says_so(tiny_dir, tmp_path) -> None:
    inputs = engine("nse_null", nullspace_threshold=1.0, joint_solve=True, L2=1e-3)  # the tiny keys are short
    first = engine_round(inputs)
    second = engine_round(inputs, REQUESTS[2:3])  # with the first round's keys in the memory
    for outcome in (first, second):
        assert sum(outcome.residual_after) < 0.5 * sum(outcome.residual_before)
        assert set(outcome.nullspace_dims) == {1, 2}
    for layer in (1, 2):
        assert float(inputs.deltas.cumulative(layer).dense().abs().max()) > 0
    session = EditSession.from_pretrained(str(tiny_dir), method="nse_null", device="cpu", joint_solve=True,
                                          **TINY_HPARAMS)
    session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    assert "Joint solve: the edit layers share out the residual" in (tmp_path / "saved" / "README.md").read_text()
    assert EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu").config.joint_solve


def test_the_joint_solve_is_refused_outside_nse_null_and_on_normalised_mlp_outputs() -> None:
    with pytest.raises(ValueError, match="joint_solve is a setting of method 'nse_null'"):
        EditConfig(method="nse", joint_solve=True)
    gemma = ModelLayout.detect(tiny_model("gemma3"))
    with pytest.raises(ConfigError, match="joint_solve needs the MLP output to join the residual unnormalised"):
        make_config(gemma, method="nse_null", joint_solve=True)
