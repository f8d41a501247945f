"""The lean engine (``EditConfig.lean``) against the float64 path: the same updates within float64 rounding.

Tolerances: both paths solve the same float64 system; they differ only in the order of float64 sums (K Kᵀ of
the stored keys in one product instead of per round, in-place accumulation, triangular solves instead of
``cholesky_solve``), which moves the solution by about cond(system) × 1e-16, far below the float32 rounding
(6e-8 relative) of the factors both return. Once the key memory holds d_ff keys it is stored in float32, a
relative change of at most 6e-8 per entry, which the solve amplifies by the system's condition number: the
tests' systems keep the factors within 2e-5 (relative, in norm; measured 5e-6 at most).
"""

import warnings

import pytest
import torch
from conftest import TINY_HPARAMS, tiny_model, tiny_tokenizer
from test_methods import REQUESTS, TEMPLATES, corpus_second_moment, random_psd

from nse_hub.algorithm.rounds import RoundInputs, run_round
from nse_hub.algorithm.update import alphaedit_update, neuron_update, null_space, null_space_lean
from nse_hub.architectures import ModelLayout
from nse_hub.config import EditConfig
from nse_hub.deltas import KeyMemory, WeightDeltas
from nse_hub.errors import MemoryPlanWarning
from nse_hub.plan import EngineSettings

# Relative difference in norm of float32 factors computed from the same float64 system in another order.
SAME_SYSTEM = 1e-6
# After the key memory is stored in float32: one float32 rounding of P (6e-8) times the system's condition
# (measured 5e-6 for NSE on the tiny model's layers, 2.5e-7 for AlphaEdit).
FLOAT32_MEMORY = 2e-5


# Value targets optimised in chunks of other sizes: the same per-request problems in float32 batches of other
# shapes, whose rounding Adam's steps carry on (measured 2e-6 on the tiny model).
VALUE_CHUNKS = 2e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def memories(rounds: list[torch.Tensor], size: int) -> tuple[KeyMemory, KeyMemory]:
    """The same key rounds in a float64 memory and a lean one."""
    old, lean = KeyMemory((0,), size, "cpu", lean=False), KeyMemory((0,), size, "cpu", lean=True)
    for keys in rounds:
        old.add_round({0: keys})
        lean.add_round({0: keys})
    return old, lean


def key_rounds(size: int, per_round: int, rounds: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, per_round, generator=g) for _ in range(rounds)]


def test_a_memory_kept_as_a_matrix_from_the_start_solves_the_same() -> None:
    size, n = 24, 4
    rounds = key_rounds(size, 8, 2)
    early = KeyMemory((0,), size, "cpu", matrix_after=0)
    assert early.layer(0).matrix is not None and float(early.layer(0).matrix.abs().max()) == 0.0
    _, keys_kept = memories(rounds, size)
    for keys in rounds:
        early.add_round({0: keys})
    assert early.layer(0).keys is None and keys_kept.layer(0).matrix is None  # 16 keys < 24: kept as keys by default
    second_moment = random_psd(size, 3 * size, 1).float()
    keys, residual = torch.randn(size, n, generator=torch.Generator().manual_seed(2)), torch.randn(6, n)
    one = neuron_update(keys, residual, second_moment, early.layer(0), 2.0, torch.arange(size), device="cpu")
    two = neuron_update(keys, residual, second_moment, keys_kept.layer(0), 2.0, torch.arange(size), device="cpu")
    assert relative(one.A, two.A) < FLOAT32_MEMORY
    early.truncate(0)
    assert early.layer(0).matrix is not None and float(early.layer(0).matrix.abs().max()) == 0.0


@pytest.mark.parametrize("rounds", [0, 2, 5])  # no memory, keys (16 < 24), a matrix (40 ≥ 24)
@pytest.mark.parametrize("everything", [True, False])
def test_neuron_update_lean_matches_float64(rounds: int, everything: bool) -> None:
    size, n = 24, 4
    old, lean = memories(key_rounds(size, 8, rounds), size)
    assert (lean.layer(0).matrix is not None) == (rounds * 8 >= size)
    assert lean._sums == {} and (rounds * 8 >= size or lean.layer(0).keys.shape == (size, rounds * 8))
    second_moment = random_psd(size, 3 * size, 1).float()
    keys, residual = torch.randn(size, n, generator=torch.Generator().manual_seed(2)), torch.randn(6, n)
    selected = torch.arange(size) if everything else torch.tensor([0, 3, 4, 9, 17, 23])
    reference = neuron_update(keys, residual, second_moment, old.P(0), 2.0, selected)
    ours = neuron_update(keys, residual, second_moment, lean.layer(0), 2.0, selected, device="cpu")
    tolerance = FLOAT32_MEMORY if rounds * 8 >= size else SAME_SYSTEM
    assert relative(ours.A, reference.A) < tolerance
    assert torch.equal(ours.B, reference.B)
    assert torch.count_nonzero(ours.A[:, [1, 2]]) == (0 if not everything else 2 * n)


def test_key_memory_switches_to_a_float32_matrix_and_back_on_rollback() -> None:
    size = 24
    rounds = key_rounds(size, 10, 4)
    old, lean = memories(rounds, size)
    assert lean.layer(0).matrix.dtype == torch.float32 and lean.count(0) == 40
    assert relative(lean.P(0), old.P(0)) < 1e-7  # one float32 rounding
    lean.truncate(2)
    old.truncate(2)
    view = lean.layer(0)
    assert view.matrix is None and view.keys.shape == (size, 20)  # below d_ff again: keys
    assert relative(lean.P(0), old.P(0)) < 1e-15


def test_null_space_lean_is_the_same_basis() -> None:
    size = 40
    second_moment = random_psd(size, 30, 3).float()  # rank 30: ten exact null directions and a spread
    reference = null_space(second_moment, 1.0)
    ours = null_space_lean(second_moment, 1.0, "cpu")
    assert ours.basis.device.type == "cpu" and ours.basis.dtype == torch.float64
    assert ours.dims == reference.dims and ours.threshold == reference.threshold
    assert torch.equal(ours.basis, reference.basis)  # the same eigh input entry for entry
    assert torch.equal(ours.eigenvalues, reference.eigenvalues) and len(ours.eigenvalues) == ours.dims


def test_null_space_lean_symmetrises_like_the_float64_path() -> None:
    size = 600  # more than one block of the in-place symmetrisation (512)
    second_moment = random_psd(size, 700, 4).float()
    second_moment += 1e-3 * torch.randn(size, size, generator=torch.Generator().manual_seed(5))  # not symmetric
    reference, ours = null_space(second_moment, 1.0), null_space_lean(second_moment, 1.0, "cpu")
    assert torch.equal(ours.basis, reference.basis)


@pytest.mark.parametrize(("rounds", "mu"), [(0, 0.0), (2, 0.0), (5, 0.0), (2, 30.0)])
def test_alphaedit_update_lean_matches_float64(rounds: int, mu: float) -> None:
    size, n = 24, 4
    old, lean = memories(key_rounds(size, 8, rounds), size)
    space = null_space(random_psd(size, 18, 6).float(), 2.0)
    keys, residual = torch.randn(size, n, generator=torch.Generator().manual_seed(7)), torch.randn(6, n)
    reference = alphaedit_update(keys, residual, space, old.P(0), 0.5, mom2_weight=mu)
    ours = alphaedit_update(keys, residual, space, lean.layer(0), 0.5, mom2_weight=mu)
    assert relative(ours.A, reference.A) < (FLOAT32_MEMORY if rounds * 8 >= size else SAME_SYSTEM)
    assert torch.equal(ours.B, reference.B)
    # Every row of ΔW stays in the null space, as on the float64 path.
    delta = ours.dense().double()
    assert float((delta - space.project(delta.T).T).norm() / delta.norm()) < 1e-6


@pytest.mark.parametrize("rounds", [2, 5])  # 16 keys (kept as keys) and 40 (a float32 matrix) of d_ff 24
def test_the_key_memory_weight_scales_p_in_every_solve(rounds: int) -> None:
    size, n, omega = 24, 4, 3.0
    old, lean = memories(key_rounds(size, 8, rounds), size)
    space = null_space(random_psd(size, 18, 6).float(), 2.0)
    second_moment = random_psd(size, 40, 8)
    keys, residual = torch.randn(size, n, generator=torch.Generator().manual_seed(7)), torch.randn(6, n)
    everything = torch.arange(size)
    tolerance = FLOAT32_MEMORY if rounds * 8 >= size else SAME_SYSTEM
    stored = old.P(0).clone()
    assert torch.equal(old.P(0, omega), stored * omega) and torch.equal(old.P(0), stored)  # a copy, not in place
    for solve in (lambda memory: alphaedit_update(keys, residual, space, memory, 0.5),
                  lambda memory: neuron_update(keys, residual, second_moment, memory, 2.0, everything)):
        reference = solve(old.P(0) * omega)
        assert relative(solve(lean.layer(0, omega)).A, reference.A) < tolerance
        assert relative(solve(lean.layer(0)).A, reference.A) > 1e-3  # ω = 1 is another solve
    # ω = 0 forgets the earlier rounds: NSE's solve without the key memory.
    alone = neuron_update(keys, residual, second_moment, None, 2.0, everything)
    assert relative(neuron_update(keys, residual, second_moment, lean.layer(0, 0.0), 2.0, everything).A,
                    alone.A) < SAME_SYSTEM


def _engine(method: str, lean: bool) -> RoundInputs:
    model = tiny_model("llama").requires_grad_(False)
    layout = ModelLayout.detect(model)
    config = EditConfig(method=method, layers=(1, 2), v_lr=0.5, v_num_grad_steps=6, lean=lean)
    moments = {layer: corpus_second_moment(model, layout, layer) for layer in config.layers}
    memory = KeyMemory(config.layers, layout.intermediate_size, "cpu", lean=lean)
    # Earlier rounds' keys: 60 of d_ff 64, so that the rounds below cross from keys to the matrix form.
    memory.add_round({layer: 2 * torch.randn(64, 60, generator=torch.Generator().manual_seed(layer))
                      for layer in config.layers})
    deltas = WeightDeltas(model, layout, config.layers)
    deltas.rounds.append({})
    return RoundInputs(model, tiny_tokenizer(), layout, config, deltas, memory, moments, TEMPLATES)


@pytest.mark.parametrize("method", ["nse", "alphaedit"])
def test_rounds_of_the_lean_engine_match_the_float64_path(method: str) -> None:
    old, lean = _engine(method, lean=False), _engine(method, lean=True)
    for number, requests in enumerate([REQUESTS[:2], REQUESTS[2:4], REQUESTS[:3]]):
        expected = run_round(old, requests)
        ours = run_round(lean, requests, values=expected.optimized)  # the same targets: compare the engines
        for inputs, outcome in ((old, expected), (lean, ours)):
            inputs.deltas.commit_round()
            inputs.memory.add_round(outcome.keys)
        # 60 + 2 keys, then 64: the third round's solve reads P in float32.
        assert (lean.memory.layer(2).matrix is not None) == (number >= 1)
        tolerance = SAME_SYSTEM if number < 2 else FLOAT32_MEMORY
        for layer in (1, 2):
            a, b = lean.deltas.rounds[-1][layer], old.deltas.rounds[-1][layer]
            assert a.rank == b.rank
            assert relative(a.dense(), b.dense()) < tolerance
        assert ours.selected_neurons == expected.selected_neurons
        assert ours.nullspace_dims == expected.nullspace_dims
    if method == "alphaedit":
        space = lean.state.null_spaces[(1, 2.0)]
        assert space.basis.device.type == "cpu"
        assert torch.equal(space.basis, old.state.null_spaces[(1, 2.0)].basis)


def _session(folder, **kwargs):
    from nse_hub import EditSession

    return EditSession.from_pretrained(str(folder), device="cpu", **{**TINY_HPARAMS, "layers": (1, 2), **kwargs})


def test_a_session_warns_before_a_run_that_will_not_fit(tiny_dir, monkeypatch) -> None:
    with pytest.warns(MemoryPlanWarning, match=r"will not fit.*1 MiB\. To fit, .*(layers=|dtype=|rounds of)"):
        session = _session(tiny_dir, device_memory="1MB")
    assert session.memory_plan.fits is False and session.memory_plan.device_memory == 2**20
    monkeypatch.setenv("NSE_HUB_DEVICE_MEMORY", "2MB")  # the same from the environment
    with pytest.warns(MemoryPlanWarning, match="will not fit"):
        assert _session(tiny_dir).memory_plan.device_memory == 2 * 2**20
    monkeypatch.delenv("NSE_HUB_DEVICE_MEMORY")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryPlanWarning)
        roomy = _session(tiny_dir, device_memory="64GB")
    assert roomy.memory_plan.fits is True and roomy.engine_settings == EngineSettings()
    float64 = _session(tiny_dir, device_memory="64GB", lean=False)
    assert float64.memory.P(1).dtype == torch.float64 and not float64.memory_plan.lean


def test_a_session_sized_to_a_small_device_writes_the_same_round(tiny_dir) -> None:
    """Statistics one layer per pass and value chunks of one request: the same update as one pass, one chunk."""
    whole = _session(tiny_dir, device_memory="64GB")
    sized = _session(tiny_dir, device_memory="64GB")
    sized.engine_settings = EngineSettings(stats_layers_per_pass=1, value_chunk_bytes=1)
    float64 = _session(tiny_dir, device_memory="64GB", lean=False)
    for session in (whole, sized, float64):
        session.edit(REQUESTS[:3], progress=False)
    assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in sized._second_moments.values())
    for layer in (1, 2):
        assert torch.equal(sized._second_moments[layer], whole._second_moments[layer])  # cached per layer
        reference = float64.deltas.rounds[0][layer].dense()
        assert relative(whole.deltas.rounds[0][layer].dense(), reference) < SAME_SYSTEM
        assert relative(sized.deltas.rounds[0][layer].dense(), reference) < VALUE_CHUNKS
