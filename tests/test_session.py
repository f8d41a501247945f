"""EditSession on a tiny model: validation, reports, rollback, merge, save → load → continue."""

from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, save_tiny
from transformers import AutoTokenizer

from nse_hub import EditSession, load_requests
from nse_hub.errors import (
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    RequestError,
    VersionNotFoundError,
)

REQUESTS = load_requests(FIXTURES / "requests.json")


def session_for(folder: Path, **hparams) -> EditSession:
    return EditSession.from_pretrained(str(folder), device="cpu", **{**TINY_HPARAMS, "layers": (1, 2), **hparams})


def weights(session: EditSession) -> dict[int, torch.Tensor]:
    return {layer: session.layout.projection(session.model, layer).weight.detach().clone()
            for layer in session.config.layers}


def test_a_round_reports_and_changes_only_the_edit_layers(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    before = {name: p.detach().clone() for name, p in session.model.named_parameters()}
    report = session.edit(REQUESTS[:2], progress=False)
    assert report.round == 1 and len(session.rounds) == 1
    assert [r.request for r in report.requests] == REQUESTS[:2]
    for r in report.requests:
        assert 0 <= r.p_new_before <= 1 and 0 <= r.p_new_after <= 1
        assert r.residual_before > 0 and r.value_steps > 0
        assert len(r.paraphrases) == 1 and len(r.neighbors) == 1
    assert set(report.seconds) >= {"values", "keys", "solve", "scoring", "stats", "templates", "total"}
    assert set(report.selected_neurons) == {1, 2}
    edited = {session.layout.projection_name(layer) + ".weight" for layer in (1, 2)}
    for name, param in session.model.named_parameters():
        assert torch.equal(param, before[name]) != (name in edited), name


def test_nothing_is_edited_when_a_request_is_bad(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    start = weights(session)
    with pytest.raises(RequestError, match="record 1"):
        session.edit([REQUESTS[0], {"prompt": "no placeholder", "subject": "x", "target_new": "y"}])
    assert session.rounds == []
    assert all(torch.equal(w, start[layer]) for layer, w in weights(session).items())


def test_save_load_continue_equals_an_uninterrupted_session(tiny_dir: Path, tmp_path: Path) -> None:
    uninterrupted = session_for(tiny_dir)
    for chunk in (REQUESTS[:2], REQUESTS[2:3], REQUESTS[3:]):
        uninterrupted.edit(chunk, progress=False)

    first = session_for(tiny_dir)
    first.edit(REQUESTS[:2], progress=False)
    first.edit(REQUESTS[2:3], progress=False)
    first.save_pretrained(tmp_path / "saved")
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert len(resumed.rounds) == 2 and resumed.context_templates == first.context_templates
    resumed.edit(REQUESTS[3:], progress=False)

    for layer in (1, 2):
        a, b = uninterrupted.deltas.rounds[2][layer], resumed.deltas.rounds[2][layer]
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert all(torch.equal(w, weights(resumed)[layer]) for layer, w in weights(uninterrupted).items())
    assert torch.equal(uninterrupted.memory.P(2), resumed.memory.P(2))


def test_resume_at_an_earlier_round(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:2], progress=False)
    after_one = weights(session)
    session.edit(REQUESTS[2:], progress=False)
    session.save_pretrained(tmp_path / "saved")
    earlier = EditSession.from_pretrained(str(tmp_path / "saved"), round=1, device="cpu")
    assert len(earlier.rounds) == 1
    assert all(torch.equal(w, after_one[layer]) for layer, w in weights(earlier).items())
    with pytest.raises(ValueError, match="rounds 0–2"):
        EditSession.from_pretrained(str(tmp_path / "saved"), round=5, device="cpu")


def test_rollback_then_redo_gives_the_same_round(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    original = weights(session)
    session.edit(REQUESTS[:2], progress=False)
    after_one = weights(session)
    session.edit(REQUESTS[2:], progress=False)
    after_two = weights(session)
    session.rollback(1)
    assert len(session.rounds) == 1
    assert all(torch.equal(w, after_one[layer]) for layer, w in weights(session).items())
    session.edit(REQUESTS[2:], progress=False)
    assert all(torch.equal(w, after_two[layer]) for layer, w in weights(session).items())
    session.rollback(0)
    assert all(torch.equal(w, original[layer]) for layer, w in weights(session).items())
    with pytest.raises(ValueError, match="rounds 0–0"):
        session.rollback(3)


def test_values_computed_ahead_give_the_same_round(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    ahead = session.compute_values(REQUESTS[2:], progress=False)  # before round 1: NSE's values need no history
    session.edit(REQUESTS[:2], progress=False)
    report = session.edit(REQUESTS[2:], progress=False, values=ahead)
    assert all(r.value_steps == int(ahead.steps[i]) for i, r in enumerate(report.requests))
    uninterrupted = session_for(tiny_dir)
    uninterrupted.edit(REQUESTS[:2], progress=False)
    uninterrupted.edit(REQUESTS[2:], progress=False)
    assert all(torch.equal(w, weights(uninterrupted)[layer]) for layer, w in weights(session).items())
    with pytest.raises(ConfigError, match="compute_values"):
        session.edit(REQUESTS[:1], progress=False, values=ahead)
    assert len(session.rounds) == 2  # the refused round wrote nothing
    with pytest.raises(ConfigError, match="UltraEdit computes no value targets"):
        session_for(tiny_dir, method="ultraedit").compute_values(REQUESTS[:1], progress=False)


def test_merge_is_exactly_w0_plus_delta(tiny_dir: Path) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:2], progress=False)
    merged = session.merge()
    assert merged is not session.model
    for layer in (1, 2):
        w0 = session.deltas.originals[layer]
        delta = session.deltas.cumulative(layer).dense()
        assert torch.equal(session.layout.projection(merged, layer).weight, w0 + delta)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(merged(input_ids=ids).logits, session.model(input_ids=ids).logits)


def test_memit_runs_one_pass_over_all_neurons(tiny_dir: Path) -> None:
    session = session_for(tiny_dir, method="memit")
    report = session.edit(REQUESTS, progress=False)
    assert report.method == "memit"
    assert report.selected_neurons == {1: [64], 2: [64]}
    assert all(r.edited_in_passes == [True] for r in report.requests)


def test_residual_filter_can_leave_everything_alone(tiny_dir: Path) -> None:
    session = session_for(tiny_dir, alpha=0.0, upper_bound=1e-6)
    start = weights(session)
    report = session.edit(REQUESTS[:2], progress=False)
    assert all(r.edited_in_passes == [False] for r in report.requests)
    assert all(torch.equal(w, start[layer]) for layer, w in weights(session).items())


def test_invalid_settings_are_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        session_for(tiny_dir, layers=(8, 9))
    with pytest.raises(ValueError, match="consecutive"):
        session_for(tiny_dir, layers=(0, 2))
    with pytest.raises(ValueError, match="unknown hyperparameter 'v_lrr'; did you mean 'v_lr'"):
        session_for(tiny_dir, v_lrr=3)


def test_a_different_base_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:1], progress=False)
    session.save_pretrained(tmp_path / "saved")
    other = save_tiny(tmp_path / "other", seed=1)
    with pytest.raises(BaseModelMismatchError) as error:
        EditSession.from_pretrained(str(tmp_path / "saved"), base_model=str(other), device="cpu")
    assert "fingerprint" in str(error.value)


def test_one_round_resolver_for_every_version_argument(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:2], progress=False)
    session.edit(REQUESTS[2:3], progress=False)
    calls = {
        "merge": lambda: session.merge(round=7),
        "card": lambda: session.card(round=7),
        "save_pretrained": lambda: session.save_pretrained(tmp_path / "x", round=7),
        "export_adapter": lambda: session.export_adapter(tmp_path / "y", round=7),
        "rollback": lambda: session.rollback(7),
    }
    for name, call in calls.items():
        with pytest.raises(VersionNotFoundError, match=r"round 7 does not exist: the session has rounds [01]–2"):
            call()
        assert len(session.rounds) == 2, name
    with pytest.raises(VersionNotFoundError, match="rounds 1–2"):
        session.export_adapter(tmp_path / "z", round=0)  # version 0 has no adapter to export
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    session.save_pretrained(tmp_path / "saved")
    with pytest.raises(VersionNotFoundError, match="round 5 does not exist: the saved edit"):
        EditSession.from_pretrained(str(tmp_path / "saved"), round=5, device="cpu")


def test_saving_a_resumed_session_runs_no_preparation(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    monkeypatch.setenv("NSE_HUB_CACHE", str(tmp_path / "empty-cache"))  # another machine: no statistics cache

    import nse_hub.session as session_module

    def no_preparation(*_args, **_kwargs):
        raise AssertionError("the second-moment pass ran")

    monkeypatch.setattr(session_module, "second_moments", no_preparation)
    monkeypatch.setattr(session_module, "generate_context_templates", no_preparation)
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    resumed.save_pretrained(tmp_path / "again")
    resumed.export_adapter(tmp_path / "adapter")
    assert "round-1" in str(resumed.card())
    fresh = session_for(save_tiny(tmp_path / "other-base"))
    fresh.save_pretrained(tmp_path / "empty")  # a session saved before its first round
    assert EditSession.from_pretrained(str(tmp_path / "empty"), device="cpu").rounds == []


def test_a_saved_edit_keeps_its_method_and_takes_the_given_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    session.edit(REQUESTS[:1], progress=False)
    session.save_pretrained(tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"made with method .nse., not .memit."):
        EditSession.from_pretrained(str(tmp_path / "saved"), method="memit", device="cpu")
    with pytest.raises(ConfigError, match="fixed by the saved edit"):
        EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu", v_lr=1.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), method="nse", tokenizer=tokenizer, device="cpu")
    assert resumed.tokenizer is tokenizer
    # The saved edit carries the tokenizer, as adapter repositories do.
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved("Danielle Darrieux").input_ids == tokenizer("Danielle Darrieux").input_ids


def test_an_edit_from_a_newer_format_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    session.save_pretrained(tmp_path / "saved")
    state = tmp_path / "saved" / "nse_session" / "session.json"
    state.write_text(state.read_text().replace('"format": 3', '"format": 99'))
    with pytest.raises(CheckpointError, match=r"format 99.*upgrade"):
        EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")


def test_a_resumed_session_keeps_its_nas_anchor(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir, method="memit_seq", norm_anchor=True)
    session.edit(REQUESTS[:2], progress=False)
    anchor = session.engine.norm_anchor
    assert anchor is not None
    session.save_pretrained(tmp_path / "saved")
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert resumed.engine.norm_anchor == anchor  # not measured again on edited weights
    resumed.edit(REQUESTS[2:3], progress=False)
    session.edit(REQUESTS[2:3], progress=False)
    for layer in (1, 2):
        a, b = session.deltas.rounds[1][layer], resumed.deltas.rounds[1][layer]
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    resumed.rollback(0)
    assert resumed.engine.norm_anchor is None


def test_a_report_completed_after_a_save_is_saved_again_in_full(tiny_dir: Path, tmp_path: Path) -> None:
    session = session_for(tiny_dir)
    report = session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    report.seconds["values"] = 12.5  # timings a caller adds after the round (as run_sequential does)
    session.save_pretrained(tmp_path / "saved")
    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert resumed.rounds[0].seconds["values"] == 12.5 and resumed.rounds[0].to_dict() == report.to_dict()
