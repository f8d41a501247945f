"""UltraEdit: the lifelong normalization, the closed-form update, its place in the engine, saving and resuming."""

import json
from pathlib import Path

import pytest
import torch
from conftest import COUNTERFACT, FIXTURES, TINY_HPARAMS, needs_shared_data
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nse_hub import EditSession, load_requests
from nse_hub.algorithm.batches import build_value_batch
from nse_hub.algorithm.lifelong import EPSILON, FeatureStats, combine_all, stats_from_tensors, stats_to_tensors
from nse_hub.algorithm.ultraedit import editing_features, pseudo_values, ultraedit_update
from nse_hub.checkpoint import LIFELONG_FILE, round_dir
from nse_hub.config import EditConfig
from nse_hub.errors import CheckpointError
from nse_hub.tokens import SubjectText, subject_last_token

REQUESTS = load_requests(FIXTURES / "requests.json")
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def session_for(folder: Path, **hparams) -> EditSession:
    return EditSession.from_pretrained(str(folder), method="ultraedit", device="cpu",
                                       **{"context_length": TINY_HPARAMS["context_length"], "layers": (1, 2),
                                          "ultraedit_lr": 1e-2, **hparams})


def test_combined_statistics_are_those_of_every_feature_seen() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 7, generator=g, dtype=torch.float64) * (k + 1) + k for k, n in enumerate((1, 5, 12, 3))]
    combined = combine_all(FeatureStats.of(p) for p in parts)
    everything = torch.cat(parts)
    assert combined.count == len(everything)
    torch.testing.assert_close(combined.mean, everything.mean(dim=0), rtol=0, atol=1e-12)
    torch.testing.assert_close(combined.variance, everything.var(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(combined.normalize(everything),
                               (everything - everything.mean(0)) / (everything.var(0).sqrt() + EPSILON))
    assert combine_all([]) is None
    assert FeatureStats.empty(7).combine(FeatureStats.of(parts[0])).count == 1
    restored = stats_from_tensors(stats_to_tensors({3: combined}))[3]
    assert restored.count == combined.count
    assert torch.equal(restored.mean, combined.mean) and torch.equal(restored.m2, combined.m2)


def test_the_update_solves_the_ridge_normal_equations_with_the_round_rank() -> None:
    g = torch.Generator().manual_seed(1)
    n, d_ff, d_model, ridge = 4, 12, 5, 0.7
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    values = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    factors = ultraedit_update(keys, values, ridge)
    assert factors.rank == n
    delta_t = factors.dense().double().T  # d_ff × d_model, the reference's orientation
    lhs = (keys.T @ keys + ridge * torch.eye(d_ff, dtype=torch.float64)) @ delta_t
    torch.testing.assert_close(lhs, keys.T @ values, rtol=1e-5, atol=1e-5)
    assert int(torch.linalg.matrix_rank(factors.dense())) == n


def test_pseudo_values_step_against_the_normalised_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    features = torch.randn(6, 9, generator=g, dtype=torch.float64)
    stats = FeatureStats.of(features)
    values = pseudo_values(features, stats, d_ff=4, lr=0.3)
    normalized = (features - features.mean(0)) / (features.var(0).sqrt() + EPSILON)
    expected = -0.3 * normalized[:, :4].square().sum(1, keepdim=True) * normalized[:, 4:]
    torch.testing.assert_close(values, expected)


def test_editing_features_are_the_keys_and_gradients_at_the_target_positions(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    model, layout, tokenizer = session.model, session.layout, session.tokenizer
    features = editing_features(model, layout, tokenizer, REQUESTS, (1, 2), 0, 3)  # padded chunks of 3
    batch = build_value_batch(tokenizer, REQUESTS, ["{}"])
    owner = torch.tensor(features.owner)
    for index, row in enumerate(batch.plain_row):  # each request alone, plain autograd
        seen = {}

        def keep(module, args, output, seen=seen):
            seen["k"] = args[0][0]
            output.retain_grad()
            seen["y"] = output

        with torch.enable_grad(), layout.projection(model, 1).register_forward_hook(keep):
            embeds = model.get_input_embeddings()(torch.tensor([batch.sequences[row]])).requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits[0]
            positions, labels = batch.target_positions[row], batch.labels[row]
            loss = -torch.log_softmax(logits[positions], dim=-1)[range(len(labels)), labels].mean()
            loss.backward()
        mine = owner == index
        torch.testing.assert_close(features.keys[1][mine], seen["k"][positions].detach())
        torch.testing.assert_close(features.grads[1][mine], seen["y"].grad[0, positions], rtol=1e-4, atol=1e-7)
        assert features.nll[index] == pytest.approx(loss.item(), rel=1e-5)


def test_an_ultraedit_round_is_an_exact_low_rank_update_and_the_statistics_grow(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    report = session.edit(REQUESTS[:2], progress=False)
    assert report.method == "ultraedit" and session._second_moments is None  # no corpus statistics
    assert report.requests[0].p_new_after > report.requests[0].p_new_before
    first = session.engine.lifelong_rounds[0]
    tokens = first[1].count
    for layer in (1, 2):
        assert session.deltas.rounds[0][layer].rank == tokens  # one rank per target token
    # The key memory holds each request's key on the edited weights, read from its plain prompt alone.
    inputs = []
    handle = session.layout.projection(session.model, 2).register_forward_pre_hook(
        lambda _, args: inputs.append(args[0][0]))
    for index, request in enumerate(REQUESTS[:2]):
        ids, last = subject_last_token(session.tokenizer, SubjectText.fill(request.prompt, request.subject, "{}"))
        with torch.no_grad():
            session.model(input_ids=torch.tensor([ids]))
        torch.testing.assert_close(session.memory.rounds[0][2][:, index].float(), inputs[-1][last].float(),
                                   rtol=1e-4, atol=1e-5)
    handle.remove()
    session.edit(REQUESTS[2:], progress=False)
    second = session.engine.lifelong_rounds[1]
    running = session.engine.lifelong(1)
    assert running.count == tokens + second[1].count
    torch.testing.assert_close(running.mean, (first[1].mean * first[1].count + second[1].mean * second[1].count)
                               / running.count)
    session.rollback(1)
    assert len(session.engine.lifelong_rounds) == 1 and session.engine.lifelong(1).count == tokens


def test_a_resumed_session_continues_exactly_and_loads_with_stock_peft(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / round_dir(1) / LIFELONG_FILE).is_file()
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert resumed.config.method == "ultraedit" and resumed.config.ultraedit_lr == 1e-2
    restored, kept = resumed.engine.lifelong(2), session.engine.lifelong(2)
    assert restored.count == kept.count and torch.equal(restored.m2, kept.m2)
    session.edit(REQUESTS[2:], progress=False)
    resumed.edit(REQUESTS[2:], progress=False)
    for layer in (1, 2):
        a, b = session.deltas.rounds[1][layer], resumed.deltas.rounds[1][layer]
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    resumed.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        expected = resumed.model(input_ids=IDS).logits
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "saved"))
        torch.testing.assert_close(stock(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-5)
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "UltraEdit" in card and "η = 0.01" in card
    (tmp_path / "saved" / round_dir(2) / LIFELONG_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"lifelong\.safetensors is missing"):
        EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    state = tmp_path / "saved" / "nse_session" / "session.json"  # and not listed either: UltraEdit itself refuses
    saved = json.loads(state.read_text())
    del saved["files"][f"{round_dir(2)}/{LIFELONG_FILE}"]
    state.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="lifelong statistics"):
        EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")


def test_merged_rounds_continue_the_receiving_normalization(tiny_dir: Path, tmp_path: Path) -> None:
    ours = session_for(tiny_dir)
    ours.edit(REQUESTS[:1], progress=False)
    ours.save_pretrained(tmp_path / "trunk")
    theirs = EditSession.from_pretrained(str(tmp_path / "trunk"), device="cpu")  # a branch from round 1
    theirs.edit(REQUESTS[1:3], progress=False)
    ours.edit(REQUESTS[3:], progress=False)
    before = ours.engine.lifelong(1).count
    plan = ours.merge_history(theirs)
    assert [r.source_round for r in plan.rounds] == [2]
    assert ours.lineage["merges"][0]["rounds"][0]["values"] == "recomputed"
    merged_round = ours.engine.lifelong_rounds[-1][1]
    assert ours.engine.lifelong(1).count == before + merged_round.count
    assert merged_round.count == theirs.engine.lifelong_rounds[1][1].count  # the same target tokens


@pytest.mark.parametrize("bad", [{"ultraedit_lr": 0.0}, {"ultraedit_lr": float("nan")},
                                 {"ultraedit_ridge": -1.0}, {"ultraedit_ridge": float("inf")}])
def test_ultraedit_settings_are_validated(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be a (positive )?finite number"):
        EditConfig(method="ultraedit", **bad)


@pytest.mark.slow
@needs_shared_data()
def test_smollm2_counterfact_edits_improve_efficacy() -> None:
    records = load_requests(COUNTERFACT, limit=10)
    session = EditSession.from_pretrained("smollm2-135m", method="ultraedit", device="cpu")
    report = session.edit(records, progress=False)
    before, after = report.metrics(after=False), report.metrics(after=True)
    assert after["efficacy"] > before["efficacy"] + 30
    json.dumps(report.to_dict())  # the report saves
