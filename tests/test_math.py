"""The algorithm's math on small inputs and tiny models, against dense or straightforward references."""

import pytest
import torch
from conftest import FIXTURES, tiny_model, tiny_tokenizer

from nse_hub.adapters import compress
from nse_hub.algorithm.batches import build_key_batch, build_value_batch
from nse_hub.algorithm.keys import KeyProbe
from nse_hub.algorithm.update import SingularSystemError, neuron_update, select_neurons, solve_spd
from nse_hub.algorithm.values import optimize_values, optimize_values_reference
from nse_hub.architectures import ModelLayout
from nse_hub.config import EditConfig
from nse_hub.deltas import Factors, KeyMemory, WeightDeltas
from nse_hub.requests import load_requests, parse_requests
from nse_hub.tokens import pad_id
from nse_hub.tracing import edit_output

TEMPLATES = [["{}"], ["Once upon a time. {}", "I think. {}"]]


def random_spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return x @ x.T / (3 * n)


def test_select_neurons_takes_the_smallest_prefix_reaching_the_share() -> None:
    keys = torch.tensor([[4.0, -4.0], [1.0, 0.0], [0.0, -0.5], [2.0, 1.0], [0.0, 0.0]])
    # scores: 8, 1, 0.5, 3, 0 (total 12.5) → sorted: n0 (8), n3 (11), n1 (12), n2 (12.5)
    assert select_neurons(keys, 0.6).tolist() == [0]
    assert select_neurons(keys, 0.8).tolist() == [0, 3]
    assert select_neurons(keys, 0.9).tolist() == [0, 1, 3]
    assert select_neurons(keys, 0.999).tolist() == [0, 1, 2, 3]
    assert select_neurons(keys, 1.0).tolist() == [0, 1, 2, 3]  # the zero-score neuron is never selected


def test_solve_spd_matches_the_dense_inverse() -> None:
    matrix = random_spd(40)
    rhs = torch.randn(40, 5, dtype=torch.float64)
    assert torch.allclose(solve_spd(matrix, rhs), torch.linalg.inv(matrix) @ rhs, atol=1e-10)


def test_solve_spd_refuses_a_matrix_that_is_not_positive_definite() -> None:
    matrix = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    rhs = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(SingularSystemError, match="not positive definite"):
        solve_spd(matrix, rhs)


@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_neuron_update_matches_the_dense_formula(threshold: float) -> None:
    d_model, d_ff, n, lam = 6, 10, 3, 50.0
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(d_ff, n, generator=g)
    residual = torch.randn(d_model, n, generator=g)
    second_moment, memory = random_spd(d_ff, 2).float(), random_spd(d_ff, 3)
    selected = select_neurons(keys, threshold)
    factors = neuron_update(keys, residual / 2, second_moment, memory, lam, selected)  # a layer's share

    s = selected
    k_s = keys.double()[s]
    lhs = lam * second_moment.double()[s][:, s] + memory[s][:, s] + k_s @ k_s.T
    expected = torch.zeros(d_model, d_ff, dtype=torch.float64)
    expected[:, s] = (residual.double() / 2) @ k_s.T @ torch.linalg.inv(lhs)
    assert factors.rank == n
    assert torch.allclose(factors.dense().double(), expected, atol=1e-5)
    unselected = sorted(set(range(d_ff)) - set(s.tolist()))
    assert torch.count_nonzero(factors.dense()[:, unselected]) == 0


@pytest.mark.parametrize(("stacked", "true_rank"), [(20, 8), (6, 4)])  # past min(d) (via the product); below it
def test_compress_is_exact_and_truncation_reports_its_error(stacked: int, true_rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(8, true_rank, generator=g) @ torch.randn(true_rank, stacked, generator=g)
    factors = Factors(b, torch.randn(stacked, 12, generator=g))  # rank true_rank stored as stacked
    exact, error = compress(factors)
    assert exact.rank == true_rank and error < 1e-6
    assert torch.allclose(exact.dense(), factors.dense(), atol=1e-4)
    truncated, error = compress(factors, max_rank=3)
    measured = torch.linalg.norm(truncated.dense() - factors.dense()) / torch.linalg.norm(factors.dense())
    assert truncated.rank == 3 and error == pytest.approx(float(measured), rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weights_are_w0_plus_the_factors_and_original_restores_w0(family: str) -> None:
    model = tiny_model(family)
    layout = ModelLayout.detect(model)
    deltas = WeightDeltas(model, layout, (1, 2))
    module = layout.projection(model, 1)
    w0 = module.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    updates = [Factors(torch.randn(32, 2, generator=g), torch.randn(2, layout.intermediate_size, generator=g))
               for _ in range(3)]
    deltas.add(1, updates[0])
    deltas.commit_round()
    deltas.add(1, updates[1])
    deltas.add(1, updates[2])
    deltas.commit_round()
    total = Factors.stack(updates).dense()
    assert torch.equal(module.weight, w0 + layout.to_stored_layout(total))
    with deltas.original():
        assert torch.equal(module.weight, w0)
    assert torch.equal(module.weight, w0 + layout.to_stored_layout(total))
    deltas.truncate(1)
    assert torch.equal(module.weight, w0 + layout.to_stored_layout(updates[0].dense()))


def test_key_memory_rolls_back_exactly() -> None:
    memory = KeyMemory((0,), 5, "cpu")
    keys = [torch.randn(5, 2) for _ in range(3)]
    for k in keys:
        memory.add_round({0: k})
    after_two = KeyMemory((0,), 5, "cpu")
    for k in keys[:2]:
        after_two.add_round({0: k})
    memory.truncate(2)
    assert torch.equal(memory.P(0), after_two.P(0))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma3", "gpt_neox"])
def test_batched_values_equal_the_per_request_reference(family: str) -> None:
    model = tiny_model(family).requires_grad_(False)
    tokenizer = tiny_tokenizer()
    layout = ModelLayout.detect(model)
    requests = load_requests(FIXTURES / "requests.json")
    batch = build_value_batch(tokenizer, requests, [t for group in TEMPLATES for t in group])
    config = EditConfig(layers=(0, 1), v_num_grad_steps=6, v_lr=0.3)
    fast = optimize_values(model, layout, batch, config, pad_id(tokenizer))
    reference = optimize_values_reference(model, layout, batch, config, pad_id(tokenizer))
    assert torch.allclose(fast.hidden, reference.hidden, atol=1e-5)
    moved = (reference.targets - reference.hidden).norm(dim=1)
    assert bool((moved > 0).all())
    assert torch.allclose(fast.targets, reference.targets, atol=1e-4 * float(moved.max()) + 1e-6)
    assert fast.steps == reference.steps


def test_requests_below_the_early_stop_loss_leave_the_batch() -> None:
    model = tiny_model("llama").requires_grad_(False)
    tokenizer = tiny_tokenizer()
    layout = ModelLayout.detect(model)
    requests = load_requests(FIXTURES / "requests.json")
    batch = build_value_batch(tokenizer, requests, ["{}"])
    # With two steps the only loss measured is the one at δ = 0.
    first = optimize_values(model, layout, batch, EditConfig(layers=(0, 1), v_num_grad_steps=2), pad_id(tokenizer))
    # A threshold between those losses: requests below it stop at once, the others keep going.
    initial = sorted(first.loss)
    threshold = (initial[1] + initial[2]) / 2
    config = EditConfig(layers=(0, 1), v_num_grad_steps=4, v_early_stop_loss=threshold)
    result = optimize_values(model, layout, batch, config, pad_id(tokenizer))
    reference = optimize_values_reference(model, layout, batch, config, pad_id(tokenizer))
    assert 0 in result.steps and max(result.steps) > 0
    assert result.steps == reference.steps
    assert torch.allclose(result.targets, reference.targets, atol=1e-4)


def _target_tokens_on_top(model, layout: ModelLayout, batch, request: int, shift: torch.Tensor) -> bool:
    """Whether, with ``shift`` added at the subject's last token, every target token of ``request`` is the argmax."""
    for row, owner in enumerate(batch.request_of):
        if owner != request or not batch.labels[row]:
            continue
        position = batch.lookup[row]

        def add(h: torch.Tensor, position: int = position) -> torch.Tensor:
            h = h.clone()
            h[0, position] += shift.to(h.dtype)
            return h

        with torch.no_grad(), edit_output(layout.layer(model, 1), add):
            logits = model(input_ids=torch.tensor([batch.sequences[row]])).logits[0]
        if logits[batch.target_positions[row]].argmax(-1).tolist() != batch.labels[row]:
            return False
    return True


def test_most_probable_early_stopping_stops_each_request_at_the_first_step_its_targets_are_on_top() -> None:
    model = tiny_model("llama").requires_grad_(False)
    tokenizer = tiny_tokenizer()
    layout = ModelLayout.detect(model)
    # Subjects at the end of the prompt: δ sits where the first target token is predicted, so a tiny random model
    # can put it on top within a few steps.
    requests = parse_requests([{"prompt": "{}", "subject": subject, "target_new": target} for subject, target in [
        ("The mother tongue of Danielle Darrieux is", "English"), ("The official religion of Edwin is", "Islam"),
        ("Paris is the capital of", "Italy")]])
    batch = build_value_batch(tokenizer, requests, [t for group in TEMPLATES for t in group])
    settings = {"layers": (0, 1), "v_lr": 0.05, "v_early_stop_loss": 0.0, "clamp_norm_factor": 20.0,
                "v_weight_decay": 0.0}
    full = optimize_values(model, layout, batch, EditConfig(**settings, v_num_grad_steps=25), pad_id(tokenizer))
    mpes = EditConfig(**settings, v_num_grad_steps=25, v_stop_most_probable=True)
    early = optimize_values(model, layout, batch, mpes, pad_id(tokenizer))
    reference = optimize_values_reference(model, layout, batch, mpes, pad_id(tokenizer))
    assert early.steps == reference.steps
    assert torch.allclose(early.targets, reference.targets, atol=1e-5)
    assert max(early.steps) < 24 and full.steps == [24] * len(requests)
    for request, taken in enumerate(early.steps):
        assert taken >= 1  # none is on top before its first step
        shift = early.targets[request] - early.hidden[request]
        assert _target_tokens_on_top(model, layout, batch, request, shift)
        assert shift.norm() < (full.targets[request] - full.hidden[request]).norm()
        # One step fewer (v_num_grad_steps counts the last measurement too) was not enough.
        before = optimize_values(model, layout, batch, EditConfig(**settings, v_num_grad_steps=taken),
                                 pad_id(tokenizer))
        assert not _target_tokens_on_top(model, layout, batch, request,
                                         before.targets[request] - before.hidden[request])


def test_most_probable_early_stopping_joins_the_value_store_identity_only_when_set() -> None:
    plain = EditConfig(layers=(0, 1)).value_settings()
    assert "v_stop_most_probable" not in plain  # stores made before the setting existed stay valid
    assert EditConfig(layers=(0, 1), v_stop_most_probable=True).value_settings()["v_stop_most_probable"] is True


@pytest.mark.parametrize("family", ["llama", "gptj", "gpt2"])
def test_key_probe_matches_a_plain_forward(family: str) -> None:
    model = tiny_model(family)
    tokenizer = tiny_tokenizer()
    layout = ModelLayout.detect(model)
    requests = load_requests(FIXTURES / "requests.json")
    batch = build_key_batch(tokenizer, requests, TEMPLATES)
    probe = KeyProbe(model, layout, batch, first_layer=1, z_layer=2, pad=pad_id(tokenizer), batch_size=5)
    keys, z_out, _ = probe.read([1, 2], requests=[0, 2])

    expected_keys = {1: [], 2: []}
    expected_z = []
    for request in (0, 2):
        per_row = {1: [], 2: []}
        for row, owner in enumerate(batch.request_of):
            if owner != request:
                continue
            seen = {}
            hooks = [layout.projection(model, layer).register_forward_pre_hook(
                lambda _m, args, layer=layer, seen=seen: seen.__setitem__(layer, args[0])) for layer in (1, 2)]
            hooks.append(layout.layer(model, 2).register_forward_hook(
                lambda _m, _a, out, seen=seen: seen.__setitem__("z", out[0] if isinstance(out, tuple) else out)))
            with torch.no_grad():
                model(input_ids=torch.tensor([batch.sequences[row]]))
            for h in hooks:
                h.remove()
            position = batch.lookup[row]
            for layer in (1, 2):
                per_row[layer].append(batch.weight[row] * seen[layer][0, position])
            if row == batch.plain_row[request]:
                expected_z.append(seen["z"][0, position])
        for layer in (1, 2):
            expected_keys[layer].append(torch.stack(per_row[layer]).sum(0))
    for layer in (1, 2):
        assert torch.allclose(keys[layer], torch.stack(expected_keys[layer]).T, atol=1e-5)
    assert torch.allclose(z_out, torch.stack(expected_z), atol=1e-5)


def test_rows_are_grouped_by_suffix_width_to_cut_padding() -> None:
    from nse_hub.algorithm.values import _group_rows

    widths = [6, 1, 2, 5] * 15  # a round of 10 requests has about 70 rows of widths 1–6
    groups = _group_rows(widths)
    assert len(groups) > 1
    assert sorted(r for g in groups for r in g) == list(range(len(widths)))
    for group in groups:  # rows of equal width stay together
        assert all(widths[r] in {widths[x] for x in group} for r in group)
    padded = sum(len(g) * max(widths[r] for r in g) for g in groups)
    assert padded < len(widths) * max(widths)
    assert _group_rows([3, 3, 3]) == [[0, 1, 2]]
    assert _group_rows(widths, overhead=10_000) == [list(range(len(widths)))]  # launches dominate: one group


def test_targets_through_a_post_mlp_norm_come_as_close_as_the_norm_allows() -> None:
    from nse_hub.algorithm.update import through_post_norm

    model = tiny_model("gemma3")
    layout = ModelLayout.detect(model)
    assert layout.family == "gemma" and layout.post_mlp_norm_path == "post_feedforward_layernorm"
    norm = layout.post_mlp_norm(model, 1)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.9, 2.0, 32))
        norm.weight[5] = -1.0  # Gemma scales by (1 + weight): this dimension is always zero
        norm.weight[6] = -0.999  # and this one almost
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        y = norm(x)
        for share in (0.05, 0.5):
            r = share * torch.randn(32, 3, generator=g) * y.norm(dim=1)
            change = through_post_norm(norm, x, r)
            assert bool(torch.isfinite(change).all())
            reached, wanted = norm(x + change.T.float()), y + r.T
            # closer to the target than doing nothing, and than a random reachable point of the same scale
            assert bool(((reached - wanted).norm(dim=1) < (y - wanted).norm(dim=1)).all())
            # As close as any reachable output: brute force over {v · g : rms(v) = 1} by projected gradient.
            scale = norm(torch.ones(1, 32))[0].double()
            for row in range(3):
                v = x[row].double() / x[row].double().square().mean().sqrt()
                for _ in range(5000):
                    v = v - 0.01 * 2 * scale * (v * scale - wanted[row].double())
                    v = v / v.square().mean().sqrt()
                best = (v * scale - wanted[row].double()).norm()
                assert float((reached[row].double() - wanted[row].double()).norm()) <= float(best) * 1.001 + 1e-5
    assert ModelLayout.detect(tiny_model("llama")).post_mlp_norm_path is None
