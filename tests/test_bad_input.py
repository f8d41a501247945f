"""Bad input and faults: every one a one-line nse-hub error (exit code 2 in the CLI), nothing edited or saved.

Settings that cannot work, non-finite numbers (in settings, base weights, value targets), request files and
batches that cannot be edited as given, model names that lead nowhere, architectures nse-hub cannot edit, and Hub
connections that close or go quiet (injected with ``HubServer.drop_next`` on the loopback server).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, save_tiny, tiny_model, tiny_tokenizer
from huggingface_hub import constants
from huggingface_hub.utils import get_session
from transformers import BloomConfig, T5Config, T5ForConditionalGeneration

from nse_hub import EditSession, load_requests
from nse_hub.cli import main
from nse_hub.config import EditConfig
from nse_hub.errors import (
    ConfigError,
    HubError,
    MissingFileError,
    NonFiniteError,
    RequestError,
    UnknownModelError,
    UnsupportedArchitectureError,
)

REQUESTS = load_requests(FIXTURES / "requests.json")
FLOAT_SETTINGS = [f.name for f in EditConfig.__dataclass_fields__.values() if f.type == "float"]
FAST = {**TINY_HPARAMS, "layers": (1, 2), "v_num_grad_steps": 4}


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 600, text
    return text


def edit_args(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["edit", str(model), "--requests", str(FIXTURES / "requests.json"), "--out", str(out), "--device", "cpu",
            "--set", "mom2_n_samples=16", "--set", "v_num_grad_steps=4", "--set", "layers=[1,2]", *extra]


@pytest.fixture
def session(tiny_dir: Path) -> EditSession:
    return EditSession.from_pretrained(str(tiny_dir), device="cpu", **FAST)


def weights(session: EditSession) -> dict[int, torch.Tensor]:
    return {layer: session.layout.projection(session.model, layer).weight.detach().clone()
            for layer in session.config.layers}


# --- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_setting_must_be_finite(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"{name} must be a finite number, got -?(inf|nan) \(default "):
        EditConfig(**{name: value})


@pytest.mark.parametrize(("settings", "message"), [
    ({"v_lr": "fast"}, r"v_lr must be a finite number, got 'fast' \(default 0.5\)"),
    ({"v_lr": True}, "v_lr must be a finite number, got True"),
    ({"batch_size": 2.5}, "batch_size must be a whole number, got 2.5"),
    ({"mom2_n_samples": "many"}, "mom2_n_samples must be a whole number, got 'many'"),
    ({"layers": "3,4"}, r"layers must be a list of decoder layer indices such as \[3, 4, 5\], got '3,4'"),
    ({"layers": [1, "x"]}, "layers must be a list of decoder layer indices"),
    ({"kl_factor": -1.0}, "kl_factor must be zero or positive, got -1.0"),
    ({"context_length": 0}, "context_length must be at least 1, got 0"),
    ({"context_prefixes": "The"}, "context_prefixes must be a list of strings"),
    ({"mom2_dataset": ""}, "mom2_dataset must be a non-empty string"),
])
def test_settings_of_the_wrong_type_or_range_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        EditConfig(**settings)
    one_line(caught.value)


def test_whole_floats_from_json_are_counts() -> None:
    assert EditConfig(mom2_n_samples=1e4, layers=[2.0, 3]).mom2_n_samples == 10000
    assert EditConfig(layers=[2.0, 3]).layers == (2, 3)


def test_an_empty_layer_list_is_refused_for_a_model(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"layers is empty: name the consecutive decoder layers"):
        EditSession.from_pretrained(str(tiny_dir), device="cpu", **{**FAST, "layers": []})


def test_cli_set_nan_is_exit_code_2(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(edit_args(tiny_dir, tmp_path / "out", "--set", "v_lr=NaN")) == 2
    printed = capsys.readouterr().out
    assert "v_lr must be a finite number, got nan" in printed and "Saved" not in printed
    assert not (tmp_path / "out").exists()


# --- non-finite numbers in a round and in the base -----------------------------------------------------------------


def test_non_finite_reused_values_discard_the_round(tiny_dir: Path) -> None:
    ours = EditSession.from_pretrained(str(tiny_dir), device="cpu", **FAST)
    ours.edit(REQUESTS[:1], progress=False)
    theirs = EditSession.from_pretrained(str(tiny_dir), device="cpu", **FAST)
    theirs.edit(REQUESTS[1:2], progress=False)
    version = theirs.as_version("theirs")
    version.values[0]["targets"][0, 0] = float("nan")  # a damaged values.safetensors, reused by a merge
    before, keys = weights(ours), {layer: ours.memory.P(layer).clone() for layer in ours.config.layers}
    with pytest.raises(NonFiniteError, match=r"value targets of request\(s\) 0 are NaN or infinite.*discarded"):
        ours.merge_history(version)
    assert len(ours.rounds) == 1 and len(ours.deltas.rounds) == 1
    assert all(torch.equal(before[layer], weights(ours)[layer]) for layer in before)
    assert all(torch.equal(keys[layer], ours.memory.P(layer)) for layer in keys)


def test_nan_in_the_base_weights_is_refused_at_session_start(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "tiny")
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    with pytest.raises(NonFiniteError, match=r"NaN or infinite numbers in model\.layers\.0\.self_attn\.q_proj\.weight"):
        EditSession.from_pretrained(str(folder), device="cpu", **FAST)
    with torch.no_grad():
        model.lm_head.weight[1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"q_proj\.weight and 1 other tensor"):
        EditSession.from_pretrained(model, tokenizer=tiny_tokenizer(), device="cpu", **FAST)


# --- command line counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--batch-size", "-1", "argument --batch-size: must be at least 1, got -1"),
    ("--limit", "-1", "argument --limit: must be at least 1, got -1"),
    ("--offset", "-2", "argument --offset: must be at least 0, got -2"),
    ("--batch-size", "two", "argument --batch-size: expected a whole number, got 'two'"),
])
def test_edit_counts_below_range_are_exit_code_2(tiny_dir: Path, tmp_path: Path, capsys, option: str, value: str,
                                                 message: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(edit_args(tiny_dir, tmp_path / "out", f"{option}={value}"))
    assert caught.value.code == 2
    printed = capsys.readouterr()
    assert message in printed.err and "Saved" not in printed.out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--batch-size=0", "--offset=-1", "--suite-examples=0", "--fluency-records=-1"])
def test_eval_counts_below_range_are_exit_code_2(tiny_dir: Path, option: str, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["eval", str(tiny_dir), "--data", str(FIXTURES / "requests.json"), option])
    assert caught.value.code == 2 and option.split("=")[0] in capsys.readouterr().err


def test_load_requests_and_run_sequential_refuse_bad_counts(session: EditSession) -> None:
    from nse_hub.sequential import run_sequential

    for kwargs, message in [({"offset": -1}, "offset must be a whole number of at least 0, got -1"),
                            ({"limit": 0}, "limit must be a whole number of at least 1, got 0")]:
        with pytest.raises(RequestError, match=message):
            load_requests(FIXTURES / "requests.json", **kwargs)
    with pytest.raises(ConfigError, match=r"batch size .* at least 1, got 0"):
        run_sequential(session, REQUESTS, 0)
    assert not session.rounds and session.context_templates is None


# --- request files and batches ------------------------------------------------------------------------------------


def test_a_request_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    record = {"prompt": "The mother tongue of {} is", "subject": "Léa Seydoux", "target_new": "English"}
    path.write_bytes(json.dumps([record], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(RequestError, match=r"latin1\.json is not UTF-8 text \(byte \d+ is 0xe9\): save it as UTF-8"):
        load_requests(path)
    path.write_bytes(json.dumps([record], ensure_ascii=False).encode("utf-16"))
    with pytest.raises(RequestError, match="is not UTF-8 text"):
        load_requests(path)


def test_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes((FIXTURES / "requests.jsonl").read_text().encode("utf-8-sig"))
    assert load_requests(path) == load_requests(FIXTURES / "requests.jsonl")


def test_one_fact_with_two_targets_in_a_round_is_refused_before_any_work(session: EditSession) -> None:
    first = REQUESTS[0].to_dict()
    other = {**first, "target_new": "German"}
    with pytest.raises(RequestError, match=r"records 0, 2 write 'The mother tongue of Danielle Darrieux is' as "
                                           r"'English' / 'German'") as caught:
        session.edit([first, REQUESTS[1], other], progress=False)
    one_line(caught.value)
    assert not session.rounds and session.context_templates is None


def test_exact_duplicates_are_written_once_with_a_warning(session: EditSession, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nse_hub.requests"):
        report = session.edit([REQUESTS[0], REQUESTS[1], REQUESTS[0]], progress=False)
    assert [r.request for r in report.requests] == [REQUESTS[0], REQUESTS[1]]
    assert "record 2 repeats record 0" in caplog.text


def test_cli_checks_every_round_before_the_first_is_written(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    records = [r.to_dict() for r in REQUESTS] + [{**REQUESTS[-1].to_dict(), "target_new": "Klingon"}]
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(records))
    args = edit_args(tiny_dir, tmp_path / "out", "--batch-size", str(len(REQUESTS) - 1))
    args[args.index("--requests") + 1] = str(path)
    assert main(args) == 2
    printed = capsys.readouterr().out
    n = len(REQUESTS)
    assert f"round 2: 1 fact(s) written with different targets in one round (records {n - 1}, {n} write" in printed
    assert "Saved" not in printed
    assert not (tmp_path / "out").exists()


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(session: EditSession) -> None:
    limit = session.model.config.max_position_embeddings
    long = {**REQUESTS[0].to_dict(), "prompt": "The mother tongue of {} is, " + "as everyone knows, " * limit}
    with pytest.raises(RequestError, match=rf"1 request\(s\) too long for the model's context of {limit} tokens "
                                           r"\(record 1 \(\d+ tokens\)\)") as caught:
        session.edit([REQUESTS[1], long], progress=False)
    one_line(caught.value)
    assert not session.rounds and session.context_templates is None


# --- models -------------------------------------------------------------------------------------------------------


def test_an_encoder_decoder_folder_is_one_line(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
                               ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 't5' \(T5ForConditionalGeneration\) is "
                                                           "not a causal language model") as caught:
        EditSession.from_pretrained(str(folder), device="cpu")
    one_line(caught.value)
    capsys.readouterr()
    assert main(edit_args(folder, tmp_path / "out")) == 2
    printed = capsys.readouterr().out
    assert printed.startswith("error: model_type 't5'") and printed.count("\n") == 1


def test_a_causal_lm_of_an_unknown_layout_fails_before_its_weights_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "bloom"  # a config and a tokenizer, no weights: only the layout can be checked
    BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match="does not know where to edit BloomForCausalLM") as caught:
        EditSession.from_pretrained(str(folder), device="cpu")
    one_line(caught.value)


@pytest.mark.parametrize("name", ["./no-such-model", "../models/no-such-model", "~/no-such-model",
                                  "models/llama/no-such-model"])
def test_a_mistyped_local_path_is_no_such_folder(name: str, capsys, tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=f"no such folder '{name}': check the path"):
        EditSession.from_pretrained(name, device="cpu")
    assert main(edit_args(name, tmp_path / "out")) == 2
    assert "no such folder" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["smollm2-135", "smolm2-135m", "SmolLM2-135M", "gemma3-270"])
def test_a_mistyped_embedded_name_suggests_the_right_one(name: str) -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model '.*': did you mean (smollm2-135m|gemma3-270m)\?"):
        EditSession.from_pretrained(name, device="cpu")


def test_a_hub_id_that_does_not_exist_is_one_line(hub) -> None:
    with pytest.raises(HubError, match=r"no model 'tester/no-such-model': not a local folder") as caught:
        EditSession.from_pretrained("tester/no-such-model", device="cpu")
    one_line(caught.value)


def test_a_model_not_cached_while_offline_is_one_line(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"cannot reach the Hub to download 'tester/never-downloaded'") as caught:
        EditSession.from_pretrained("tester/never-downloaded", device="cpu")
    one_line(caught.value)


def test_a_model_folder_without_weights_is_named(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "tiny")
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="is not a complete model folder"):
        EditSession.from_pretrained(str(folder), device="cpu")


# --- the Hub: connections closed or silent ------------------------------------------------------------------------


@pytest.fixture
def edited(tiny_dir: Path) -> EditSession:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **FAST)
    session.edit(REQUESTS[:2], progress=False)
    return session


def test_a_connection_closed_during_a_commit_is_a_hub_error_and_the_push_resumes(hub, edited: EditSession) -> None:
    hub.drop_next("commit")
    with pytest.raises(HubError, match=r"connection to the Hub failed or was closed .*RemoteProtocolError") as caught:
        edited.push_to_hub("tester/dropped-commit")
    one_line(caught.value)
    assert [c.title for c in hub.commits("tester/dropped-commit")] == ["initial commit"]
    assert [p.round for p in edited.push_to_hub("tester/dropped-commit")] == [1]
    assert hub.tags("tester/dropped-commit") == {"round-1": hub.head("tester/dropped-commit")}


def test_a_commit_whose_answer_is_lost_is_tagged_on_the_next_push(hub, edited: EditSession) -> None:
    hub.drop_next("commit", after=True)  # the commit is made, the client never hears of it
    with pytest.raises(HubError, match="RemoteProtocolError"):
        edited.push_to_hub("tester/lost-answer")
    assert len(hub.commits("tester/lost-answer")) == 2 and not hub.tags("tester/lost-answer")
    edited.push_to_hub("tester/lost-answer")
    assert len(hub.commits("tester/lost-answer")) == 2  # no second commit of the same round
    assert hub.tags("tester/lost-answer") == {"round-1": hub.head("tester/lost-answer")}


def test_a_hub_that_never_answers_times_out(hub, edited: EditSession, monkeypatch: pytest.MonkeyPatch) -> None:
    client = get_session()
    monkeypatch.setattr(client, "timeout", client.timeout)  # restored after the test
    monkeypatch.setenv("NSE_HUB_HTTP_TIMEOUT", "1")
    hub.drop_next("commit", silence=30)
    with pytest.raises(HubError, match=r"the Hub did not answer within 1 s \(ReadTimeout.*raise NSE_HUB_HTTP_TIMEOUT"):
        edited.push_to_hub("tester/silent")
    assert get_session().timeout.read == 1


def test_the_hub_timeout_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from nse_hub.hub_http import hub_timeout

    assert hub_timeout() == 60
    for bad in ("soon", "0", "-5", "inf"):
        monkeypatch.setenv("NSE_HUB_HTTP_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="NSE_HUB_HTTP_TIMEOUT must be a positive number of seconds"):
            hub_timeout()

