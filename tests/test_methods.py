"""The four methods of the engine (NSE, MEMIT, sequential MEMIT, AlphaEdit), NAS anchoring, and the solves'
failure modes, against dense formulas and on a tiny model."""

import dataclasses

import pytest
import torch
from conftest import FIXTURES, tiny_model, tiny_tokenizer
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from nse_hub.algorithm.rounds import (
    EngineState,
    RoundInputs,
    RoundOutcome,
    _failing,
    _memory,
    anchor_values,
    round_values,
    run_round,
)
from nse_hub.algorithm.update import (
    SingularSystemError,
    alphaedit_update,
    leak_decay_update,
    leak_directions,
    neuron_update,
    null_space,
    solve_general,
    solve_spd,
    through_post_norm,
)
from nse_hub.algorithm.values import ValueResult
from nse_hub.architectures import ModelLayout
from nse_hub.config import METHODS, EditConfig
from nse_hub.deltas import Factors, KeyMemory, WeightDeltas
from nse_hub.requests import load_requests
from nse_hub.scoring import target_text
from nse_hub.tokens import continuation_ids, encode, pad_id

REQUESTS = load_requests(FIXTURES / "requests.json")


def random_psd(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return x @ x.T / rank


TEMPLATES = [["{}"], ["Once upon a time. {}", "I think. {}"]]


def corpus_second_moment(model: torch.nn.Module, layout: ModelLayout, layer: int) -> torch.Tensor:
    """``E[k kᵀ]`` of the projection's inputs over random token sequences."""
    seen = []
    hook = layout.projection(model, layer).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=torch.randint(5, 200, (16, 24), generator=torch.Generator().manual_seed(layer)))
    hook.remove()
    keys = torch.cat(seen).reshape(-1, layout.intermediate_size).double()
    return (keys.T @ keys / len(keys)).float()


def engine(method: str, **hparams) -> RoundInputs:
    """A tiny Llama with everything a round needs (what a session would hold)."""
    model = tiny_model("llama").requires_grad_(False)
    layout = ModelLayout.detect(model)
    config = EditConfig(method=method, layers=(1, 2), v_lr=0.5, v_num_grad_steps=8, **hparams)
    moments = {layer: corpus_second_moment(model, layout, layer) for layer in config.layers}
    return RoundInputs(model, tiny_tokenizer(), layout, config, WeightDeltas(model, layout, config.layers),
                       KeyMemory(config.layers, layout.intermediate_size, "cpu"), moments, TEMPLATES)


def engine_round(inputs: RoundInputs, requests=REQUESTS[:2], commit: bool = True) -> RoundOutcome:
    outcome = run_round(inputs, requests)
    if commit:
        inputs.deltas.commit_round()
        inputs.memory.add_round(outcome.keys)
    return outcome


def test_methods_and_their_settings_are_validated() -> None:
    assert METHODS == ("nse", "memit", "memit_seq", "alphaedit", "ultraedit", "nse_null")
    assert [EditConfig(method=m).uses_key_memory for m in METHODS] == [True, False, True, True, False, True]
    assert [EditConfig(method=m).uses_second_moments for m in METHODS] == [True, True, True, True, False, True]
    assert [EditConfig(method=m).update_passes for m in METHODS] == [2, 1, 1, 1, 1, 2]
    for bad, message in [({"method": "rome"}, "method must be one of"),
                         ({"nullspace_threshold": 0.0}, "nullspace_threshold must be positive"),
                         ({"L2": 0.0}, "L2 must be positive"),
                         ({"nullspace_mom2_weight": -1.0}, "nullspace_mom2_weight must be zero or positive"),
                         ({"key_memory_weight": -1.0}, "key_memory_weight must be zero or positive"),
                         ({"norm_anchor_max_ratio": 1.0}, "norm_anchor_max_ratio must be above 1"),
                         ({"v_stop_most_probable": "yes"}, "v_stop_most_probable must be true or false"),
                         ({"retry_failed": -1}, "retry_failed must be zero or positive"),
                         ({"method": "ultraedit", "retry_failed": 1}, "UltraEdit has none"),
                         ({"retry_criterion": "argmax"}, "retry_criterion must be one of"),
                         ({"leak_decay": 1.0}, "leak_decay must be in"),
                         ({"method": "ultraedit", "leak_decay": 0.1}, "UltraEdit has none"),
                         ({"leak_directions": 0}, "leak_directions must be at least 1")]:
        with pytest.raises(ValueError, match=message):
            EditConfig(**bad)


def test_alphaedit_update_matches_the_dense_formula() -> None:
    d_model, d_ff, n, l2, threshold = 5, 12, 3, 0.5, 0.3
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(d_ff, n, generator=g)
    residual = torch.randn(d_model, n, generator=g, dtype=torch.float64)
    # C with a spread of eigenvalues, some far below the mean
    basis, _ = torch.linalg.qr(torch.randn(d_ff, d_ff, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(-4, 1, d_ff, dtype=torch.float64)
    second_moment = (basis * eigenvalues) @ basis.T
    memory = random_psd(d_ff, 4, seed=1)

    space = null_space(second_moment.float(), threshold)
    small = basis[:, eigenvalues < threshold * eigenvalues.median()]
    assert space.dims == small.shape[1] and 0 < space.dims < d_ff
    projector = small @ small.T
    assert torch.allclose(space.projector, projector, atol=1e-5)

    factors = alphaedit_update(keys, residual, space, memory, l2, layer=3)
    k = keys.double()
    lhs = space.projector @ (k @ k.T + memory) + l2 * torch.eye(d_ff, dtype=torch.float64)
    expected = (torch.linalg.inv(lhs) @ space.projector @ k @ residual.T).T  # ΔW, d_model × d_ff
    assert factors.rank == n and factors.B.shape == (d_model, n) and factors.A.shape == (n, d_ff)
    assert torch.allclose(factors.dense().double(), expected, atol=1e-5)
    # every row of ΔW lies in the null space: directions C uses are left alone
    delta = factors.dense().double()
    assert float((delta - delta @ space.projector).norm()) < 1e-5 * float(delta.norm())


def test_alphaedit_round_writes_an_exact_low_rank_delta_in_the_null_space() -> None:
    inputs = engine("alphaedit", nullspace_threshold=0.5)
    outcome = engine_round(inputs)
    assert set(outcome.nullspace_dims) == {1, 2}
    assert all(0 < dims < 64 for dims in outcome.nullspace_dims.values())
    assert outcome.selected_neurons == {1: [64], 2: [64]} and outcome.kept == [[True, True]]
    assert sum(outcome.residual_after) < sum(outcome.residual_before)
    for layer in (1, 2):
        factors = inputs.deltas.cumulative(layer)
        assert factors.rank == 2
        weight = inputs.layout.projection(inputs.model, layer).weight
        assert torch.equal(weight, inputs.deltas.originals[layer] + factors.dense())
        space = null_space(inputs.second_moments[layer], 0.5)
        assert space.dims == outcome.nullspace_dims[layer]
        delta = factors.dense().double()
        assert float((delta - delta @ space.projector).norm()) < 1e-4 * float(delta.norm())
        # keys along C's largest directions are mapped as before
        top = torch.linalg.eigh(inputs.second_moments[layer].double()).eigenvectors[:, -8:]
        assert float((delta @ top).norm()) < 1e-4 * float(delta.norm())
    # the null space is computed once per session (kept in the engine state the session owns)
    cached = dict(inputs.state.null_spaces)
    again = engine_round(RoundInputs(**vars(inputs)), REQUESTS[2:3])
    assert again.nullspace_dims == outcome.nullspace_dims
    assert all(inputs.state.null_spaces[key] is space for key, space in cached.items())


def test_retries_write_again_only_the_failing_edits_and_guard_the_others() -> None:
    requests = REQUESTS[:4]
    plain = engine("alphaedit", L2=0.01)
    values = round_values(plain, requests)  # round 1: the same targets for both sessions
    once = run_round(plain, requests, values=values)
    failing = _failing(plain, requests).tolist()
    assert once.kept == [[True] * 4] and failing == [True, False, False, False]  # this tiny model's one miss
    retried = engine("alphaedit", L2=0.01, retry_failed=3)
    outcome = run_round(retried, requests, values=values)
    assert outcome.kept == [[True] * 4] + [failing] * 3  # it keeps missing: every retry writes it alone
    assert outcome.residual_after[0] < 0.5 * once.residual_after[0]
    for i in (1, 2, 3):  # guarded like earlier rounds' keys: their outputs barely move
        assert abs(outcome.residual_after[i] - once.residual_after[i]) < 0.05 * once.residual_after[i]
    for layer in (1, 2):  # still one exact low-rank delta: one rank per request and pass
        factors = retried.deltas.cumulative(layer)
        assert factors.rank == 4 + 3
        weight = retried.layout.projection(retried.model, layer).weight
        assert torch.equal(weight, retried.deltas.originals[layer] + factors.dense())


def test_greedy_retries_write_again_the_edits_greedy_decoding_does_not_write() -> None:
    requests = REQUESTS[:4]
    plain = engine("alphaedit", L2=0.01)
    values = round_values(plain, requests)
    run_round(plain, requests, values=values)
    greedy = dataclasses.replace(plain, config=dataclasses.replace(plain.config, retry_criterion="greedy"))
    missed = _failing(greedy, requests).tolist()
    # the criterion is greedy decoding itself: generate as many tokens as the target has and compare
    tokenizer = plain.tokenizer
    for request, miss in zip(requests, missed):
        target = continuation_ids(tokenizer, request.text, target_text(request.target_new))
        prompt = torch.tensor([encode(tokenizer, request.text)])
        out = plain.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=len(target), min_new_tokens=len(target),
                                   pad_token_id=pad_id(tokenizer), top_p=None, top_k=None, temperature=None)
        assert (out[0, prompt.shape[1]:].tolist() != target) == miss
    wins = _failing(plain, requests).tolist()
    assert missed != wins and all(m for m, w in zip(missed, wins) if w)  # a stricter test on this tiny model
    retried = engine("alphaedit", L2=0.01, retry_failed=1, retry_criterion="greedy")
    outcome = run_round(retried, requests, values=values)
    assert outcome.kept == [[True] * 4, missed]


def test_leak_decay_shrinks_the_top_leak_directions_and_nothing_else() -> None:
    d_model, d_ff, rank, fraction = 6, 14, 4, 0.25
    g = torch.Generator().manual_seed(0)
    total = Factors(torch.randn(d_model, rank, generator=g), torch.randn(rank, d_ff, generator=g))
    second_moment = random_psd(d_ff, 3 * d_ff, seed=2).float()
    delta = total.dense().double()
    leak = delta @ second_moment.double() @ delta.T
    for count in (1, 2):
        directions = leak_directions(delta, second_moment, count)
        assert torch.allclose(directions.T @ directions, torch.eye(count, dtype=torch.float64), atol=1e-10)
        # the largest Rayleigh quotients of ΔW C ΔWᵀ: the output directions the corpus' outputs move along most
        expected = torch.linalg.eigvalsh(leak).flip(0)[:count]
        assert torch.allclose(torch.diag(directions.T @ leak @ directions), expected, rtol=1e-8)
        update = leak_decay_update(total, second_moment, fraction, count)
        assert update.rank == count
        after = delta + update.dense().double()
        assert torch.allclose(directions.T @ after, (1 - fraction) * directions.T @ delta, atol=1e-5)
        rest = torch.eye(d_model, dtype=torch.float64) - directions @ directions.T
        assert torch.allclose(rest @ after, rest @ delta, atol=1e-5)


def test_a_round_with_leak_decay_ends_shrinking_the_cumulative_update() -> None:
    requests = REQUESTS[:4]
    plain = engine("alphaedit", L2=0.01)
    values = round_values(plain, requests)
    run_round(plain, requests, values=values)
    decayed = engine("alphaedit", L2=0.01, leak_decay=0.5)
    run_round(decayed, requests, values=values)
    for layer in (1, 2):
        written = plain.deltas.cumulative(layer)
        directions = leak_directions(written.dense(), plain.second_moments[layer], 1)
        factors = decayed.deltas.cumulative(layer)
        assert factors.rank == 4 + 1  # still one exact low-rank delta: the decay adds one rank per direction
        assert torch.allclose(directions.T @ factors.dense().double(),
                              0.5 * directions.T @ written.dense().double(), atol=1e-4)
        weight = decayed.layout.projection(decayed.model, layer).weight
        assert torch.equal(weight, decayed.deltas.originals[layer] + factors.dense())


def test_leak_decay_leaves_a_round_that_wrote_nothing_alone() -> None:
    inputs = engine("nse", alpha=2.9, upper_bound=3.0, leak_decay=0.5)  # NSE's filter keeps no request
    outcome = run_round(inputs, REQUESTS[:2])
    assert outcome.kept == [[False, False]]
    assert all(inputs.deltas.cumulative(layer) is None for layer in (1, 2))


@pytest.mark.parametrize("lean", [True, False])
def test_guarded_keys_join_the_weighted_key_memory(lean: bool) -> None:
    inputs = engine("alphaedit", key_memory_weight=2.0, lean=lean)
    g = torch.Generator().manual_seed(0)
    earlier, extra = torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)

    def dense(extra_keys: torch.Tensor | None = None) -> torch.Tensor:  # ωP as one matrix, whatever the engine keeps
        memory = _memory(inputs, 1, extra_keys)
        return memory if isinstance(memory, torch.Tensor) else memory.add_to(torch.zeros(64, 64, dtype=torch.float64))

    inputs.memory.add_round({layer: earlier for layer in (1, 2)})
    expected = 2.0 * (earlier.double() @ earlier.double().T + extra.double() @ extra.double().T)
    assert torch.allclose(dense(extra), expected, atol=1e-9)
    inputs.memory.add_round({layer: torch.randn(64, 80, generator=g) for layer in (1, 2)})  # now a matrix
    if lean:
        assert _memory(inputs, 1).matrix is not None
    assert torch.allclose(dense(extra) - dense(), 2.0 * extra.double() @ extra.double().T, atol=1e-4)


@pytest.mark.parametrize("method", ["memit", "memit_seq"])
def test_classic_memit_ignores_the_key_memory_and_memit_seq_uses_it(method: str) -> None:
    inputs = engine(method)
    engine_round(inputs, commit=False)
    without = {layer: inputs.deltas.cumulative(layer).dense() for layer in (1, 2)}
    inputs.deltas.discard_round()
    g = torch.Generator().manual_seed(0)
    inputs.memory.add_round({layer: 3 * torch.randn(64, 8, generator=g) for layer in (1, 2)})
    engine_round(inputs, commit=False)
    with_memory = {layer: inputs.deltas.cumulative(layer).dense() for layer in (1, 2)}
    same = all(torch.equal(without[layer], with_memory[layer]) for layer in (1, 2))
    assert same == (method == "memit")


def test_anchor_values_rescales_the_mlp_part_and_skips_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 6, generator=g) * 10
    v0 = torch.randn(4, 6, generator=g)
    delta = torch.randn(4, 6, generator=g) * torch.tensor([[1.0], [2.0], [3.0], [30.0]])
    values = ValueResult(hidden + delta, hidden, [0.0] * 4, [0.0] * 4, [1] * 4)
    norms = (v0 + delta).norm(dim=1)
    targets, anchor, measured, skipped = anchor_values(values, v0, None, 2.0)
    assert anchor == pytest.approx(float(norms.mean()))  # four norms: none trimmed
    assert torch.allclose(measured.float(), norms)
    assert skipped.tolist() == (norms > 2 * anchor).tolist() and skipped.tolist() == [False, False, False, True]
    new_v = targets - hidden + v0
    assert torch.allclose(new_v[~skipped].norm(dim=1), torch.full((3,), anchor), rtol=1e-5)
    assert torch.allclose(targets[skipped], hidden[skipped])  # skipped: nothing to write
    # the direction of v* is kept; a given anchor is used as is
    cosine = torch.nn.functional.cosine_similarity(new_v[:3], (v0 + delta)[:3])
    assert torch.allclose(cosine, torch.ones(3), atol=1e-5)
    _, reused, _, _ = anchor_values(values, v0, 7.5, 2.0)
    assert reused == 7.5


def test_norm_anchor_is_measured_once_and_skips_are_not_written() -> None:
    inputs = engine("memit_seq", norm_anchor=True)
    first = engine_round(inputs)
    assert first.norm_anchor is not None and len(first.value_norms) == 2
    assert first.norm_anchor == pytest.approx(sum(first.value_norms) / 2)
    written = first.values.targets - first.values.hidden  # v* rescaled to the anchor, v₀ taken out again
    assert bool((written.norm(dim=1) > 0).all())
    second = engine_round(RoundInputs(**vars(inputs)), REQUESTS[2:3])
    assert second.norm_anchor == first.norm_anchor  # anchored to the first round (original weights)
    resumed = engine_round(RoundInputs(**{**vars(inputs), "state": EngineState(norm_anchor=3.0)}), REQUESTS[:1])
    assert resumed.norm_anchor == 3.0

    strict = engine("memit", norm_anchor=True, norm_anchor_max_ratio=1.0001)
    outcome = engine_round(strict, commit=False)
    assert outcome.norm_skipped == [n > 1.0001 * outcome.norm_anchor for n in outcome.value_norms]
    assert any(outcome.norm_skipped)
    assert outcome.kept[0] == [not s for s in outcome.norm_skipped]


@pytest.mark.parametrize("share", [5.0, 20.0])
def test_gemma_post_norm_mapping_keeps_a_positive_scale(share: float) -> None:
    torch.manual_seed(0)
    norm = Gemma3RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32) * 0.5)
    x = torch.randn(64, 32) * 3
    with torch.no_grad():
        y = norm(x)
        direction = torch.randn(64, 32)
        r = (share * y.norm(dim=1, keepdim=True) * direction / direction.norm(dim=1, keepdim=True)).T
        change = through_post_norm(norm, x, r).float()
        reached, wanted = norm(x + change.T), y + r.T
    # without a positive scale, these rows would have flipped the normed output
    assert bool(((x * (x + change.T)).sum(dim=1) < 0).any())
    assert bool(((reached - wanted).norm(dim=1) < (y - wanted).norm(dim=1)).all())
    assert bool(((reached - y) * r.T).sum(dim=1).gt(0).all())


def test_a_singular_system_fails_with_the_layer_and_the_fix() -> None:
    indefinite = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    with pytest.raises(SingularSystemError, match=r"layer 4 is not positive definite.*mom2_update_weight"):
        solve_spd(indefinite, torch.ones(3, 1, dtype=torch.float64), layer=4)
    assert issubclass(SingularSystemError, ValueError)
    keys = torch.randn(6, 2)
    with pytest.raises(SingularSystemError, match=r"layer 2 .*mom2_n_samples"):  # a C that is not PSD
        neuron_update(keys, torch.randn(4, 2), -torch.eye(6), None, 1e4, torch.arange(6), layer=2)
    with pytest.raises(SingularSystemError, match=r"layer 7 is singular.*raise L2"):
        solve_general(torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64), layer=7)
