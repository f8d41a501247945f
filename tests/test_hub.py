"""Pushing sessions to the (loopback) Hub and pulling them back, through the real clients."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, save_tiny
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nse_hub import EditSession, load_requests
from nse_hub.checkpoint import same_history
from nse_hub.errors import ConfigError, HubError, LicenseRequiredError

REQUESTS = load_requests(FIXTURES / "requests.json")
IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture
def session(hub_base: str) -> EditSession:
    session = EditSession.from_pretrained(hub_base, device="cpu", **TINY_HPARAMS, layers=(1, 2))
    for chunk in (REQUESTS[:2], REQUESTS[2:3], REQUESTS[3:]):
        session.edit(chunk, progress=False)
    return session


def logits_after(session: EditSession, version: int) -> torch.Tensor:
    with torch.no_grad():
        return session.merge(round=version)(input_ids=IDS).logits


def test_push_three_rounds_then_pull_each_version(hub, session: EditSession, tiny_dir: Path) -> None:
    pushed = session.push_to_hub("tester/three-rounds")
    assert [p.round for p in pushed] == [1, 2, 3]
    commits = hub.commits("tester/three-rounds")
    assert [c.title for c in commits] == ["nse-hub: round 3", "nse-hub: round 2", "nse-hub: round 1",
                                          "initial commit"]
    tags = hub.tags("tester/three-rounds")
    assert tags == {f"round-{p.round}": p.commit for p in pushed}
    assert [c.id for c in commits[:3]] == [tags["round-3"], tags["round-2"], tags["round-1"]]
    for version in (1, 2, 3):
        files = hub.files("tester/three-rounds", f"round-{version}")
        assert sorted(f for f in files if f.startswith("rounds/") and f.endswith("report.json")) == \
            [f"rounds/{k:03d}/report.json" for k in range(1, version + 1)]
        assert {"adapter_config.json", "adapter_model.safetensors", "edits.jsonl", "README.md",
                "nse_session/session.json"} <= set(files)
        card = ModelCard(hub.file("tester/three-rounds", f"round-{version}", "README.md").decode())
        edited = [r.request.subject for report in session.rounds[:version] for r in report.requests]
        table = card.text.split("## Edits in this version")[1].split("## Metrics")[0]
        assert [s for s in (r.request.subject for report in session.rounds for r in report.requests)
                if f"| {s} |" in table] == edited
        assert f'revision="round-{version}"' in card.text and "tester/three-rounds" in card.text

        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), "tester/three-rounds",
                                          revision=f"round-{version}")
        with torch.no_grad():
            assert torch.allclose(stock(input_ids=IDS).logits, logits_after(session, version), atol=1e-5)
        resumed = EditSession.from_pretrained("tester/three-rounds", revision=f"round-{version}", device="cpu")
        assert len(resumed.rounds) == version
        with torch.no_grad():
            assert torch.equal(resumed.model(input_ids=IDS).logits, logits_after(session, version))
    # The adapter's revision goes in adapter_kwargs: a top-level revision= would also pick the base's revision.
    auto = AutoModelForCausalLM.from_pretrained("tester/three-rounds", adapter_kwargs={"revision": "round-2"})
    with torch.no_grad():
        assert torch.allclose(auto(input_ids=IDS).logits, logits_after(session, 2), atol=1e-5)


def test_pushing_again_changes_nothing(hub, session: EditSession) -> None:
    session.push_to_hub("tester/idempotent")
    before = hub.commits("tester/idempotent")
    hub.clear_requests()
    assert session.push_to_hub("tester/idempotent") == []
    assert hub.commits("tester/idempotent") == before
    assert not [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]


def test_failed_commit_leaves_the_last_round_and_a_retry_completes(hub, session: EditSession,
                                                                   tiny_dir: Path) -> None:
    session.rollback(1)
    session.push_to_hub("tester/interrupted")
    session.edit(REQUESTS[2:3], progress=False)
    session.edit(REQUESTS[3:], progress=False)
    weights = logits_after(session, 3)
    hub.fail_next("commit", status=500)
    with pytest.raises(HubError):
        session.push_to_hub("tester/interrupted")
    assert set(hub.tags("tester/interrupted")) == {"round-1"}
    assert hub.commits("tester/interrupted")[0].title == "nse-hub: round 1"
    assert len(session.rounds) == 3 and torch.equal(logits_after(session, 3), weights)  # untouched
    assert [p.round for p in session.push_to_hub("tester/interrupted")] == [2, 3]
    assert set(hub.tags("tester/interrupted")) == {"round-1", "round-2", "round-3"}


def test_a_missing_tag_is_added_on_the_next_push(hub, session: EditSession) -> None:
    session.rollback(1)
    hub.fail_next("tag", status=500)
    with pytest.raises(HubError):
        session.push_to_hub("tester/untagged")
    assert hub.tags("tester/untagged") == {}
    commits = len(hub.commits("tester/untagged"))
    pushed = session.push_to_hub("tester/untagged")
    assert [p.round for p in pushed] == [1]
    assert len(hub.commits("tester/untagged")) == commits  # the commit was not made twice
    assert hub.tags("tester/untagged")["round-1"] == hub.head("tester/untagged")


def test_bad_token_is_a_clear_error_without_the_token(hub, session: EditSession) -> None:
    secret = "hf_wrong_secret_123456"
    with pytest.raises(HubError) as error:
        session.push_to_hub("tester/bad-token", token=secret)
    assert "token" in str(error.value) and secret not in str(error.value)
    # The Hub's own answer stays reachable (chained, and its message quoted), and shows no token either.
    assert isinstance(error.value.__cause__, HfHubHTTPError) and secret not in str(error.value.__cause__)
    assert "Invalid credentials" in str(error.value)


@pytest.mark.parametrize("repo_id", ["no spaces allowed/x", "a/b/c", "", "tester/--bad--"])
def test_invalid_repo_id_fails_before_any_request(hub, session: EditSession, repo_id: str) -> None:
    hub.clear_requests()
    with pytest.raises(ValueError, match=r"repository id|repo_id"):
        session.push_to_hub(repo_id)
    assert hub.requests == []


def test_push_to_a_branch(hub, session: EditSession) -> None:
    session.push_to_hub("tester/branched", branch="edits")
    assert set(hub.branches("tester/branched")) == {"main", "edits"}
    assert hub.files("tester/branched", "main") == [".gitattributes"]
    assert hub.tags("tester/branched") == {f"edits/round-{k}": hub.commits("tester/branched", "edits")[3 - k].id
                                           for k in (1, 2, 3)}  # main keeps round-N; a branch names its tags


def test_a_different_session_cannot_push_over_another(hub, session: EditSession, tiny_dir: Path) -> None:
    session.push_to_hub("tester/taken")
    other = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    other.edit(REQUESTS[3:], progress=False)
    with pytest.raises(HubError, match="already holds 3 rounds, more than this session's 1"):
        other.push_to_hub("tester/taken")
    other.edit(REQUESTS[2:3], progress=False)
    other.edit(REQUESTS[:2], progress=False)
    with pytest.raises(HubError, match="round 3 on tester/taken differs"):
        other.push_to_hub("tester/taken")


def test_session_state_on_the_hub_names_the_rounds(hub, session: EditSession) -> None:
    session.push_to_hub("tester/state")
    path = hf_hub_download("tester/state", "nse_session/session.json", revision="round-2")
    assert json.loads(Path(path).read_text())["rounds"] == 2


def test_cli_push(hub, session: EditSession, tmp_path: Path, capsys) -> None:
    from nse_hub.cli import main

    session.save_pretrained(tmp_path / "saved")
    assert main(["push", str(tmp_path / "saved"), "tester/from-cli", "--private", "--device", "cpu"]) == 0
    assert set(hub.tags("tester/from-cli")) == {"round-1", "round-2", "round-3"}
    assert hub.is_private("tester/from-cli")
    assert main(["push", str(tmp_path / "saved"), "tester/from-cli", "--device", "cpu"]) == 0
    assert "nothing to push" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "saved"), "not a repo id"]) == 2


def test_a_local_base_path_is_not_published(hub, tiny_dir: Path) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:2], progress=False)
    session.push_to_hub("tester/local-base")
    for path in ("nse_session/session.json", "README.md", "adapter_config.json", "adapter_model.safetensors",
                 "rounds/001/adapter_config.json", "rounds/001/adapter_model.safetensors"):
        assert str(tiny_dir.parent).encode() not in hub.file("tester/local-base", "round-1", path), path
    config = json.loads(hub.file("tester/local-base", "round-1", "adapter_config.json"))
    assert config["base_model_name_or_path"] == "tiny-llama"
    with pytest.raises(ConfigError, match=r"local model folder named 'tiny-llama'.*base_model="):
        EditSession.from_pretrained("tester/local-base", device="cpu")
    pulled = EditSession.from_pretrained("tester/local-base", device="cpu", base_model=str(tiny_dir))
    assert same_history(pulled.rounds, session.rounds)
    assert session.push_to_hub("tester/local-base") == []  # the published state is what a push writes again
    assert session.base.name_or_path == str(tiny_dir)  # the local save still names the folder


def test_a_saved_edit_of_a_hub_base_loads_anywhere(hub, tmp_path: Path) -> None:
    import os
    import shutil

    from huggingface_hub import constants
    from transformers import AutoTokenizer

    base = save_tiny(tmp_path / "upload", license="mit")
    hub.seed_repo("tester/tiny-base", {p.name: p.read_bytes() for p in base.iterdir()})
    session = EditSession.from_pretrained("tester/tiny-base", device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:2], progress=False)
    assert session.base.license == "mit"  # read from the base model's card on the Hub
    session.save_pretrained(tmp_path / "made-here")
    config = json.loads((tmp_path / "made-here" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tester/tiny-base"
    card = ModelCard.load(tmp_path / "made-here" / "README.md")
    assert card.data.base_model == "tester/tiny-base" and card.data.base_model_relation == "adapter"
    assert card.data.license == "mit"

    # Elsewhere: a copy of the saved edit, and no base model in any local cache.
    copy = shutil.copytree(tmp_path / "made-here", tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "made-here")
    shutil.rmtree(os.path.join(constants.HF_HUB_CACHE, "models--tester--tiny-base"))
    model = AutoModelForCausalLM.from_pretrained(copy)  # the base comes from the Hub by its id
    tokenizer = AutoTokenizer.from_pretrained(copy)
    ids = torch.tensor([tokenizer("The mother tongue of Danielle Darrieux is").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, session.model(input_ids=ids).logits, atol=1e-5)


def test_no_push_without_a_license(hub, tmp_path: Path) -> None:
    session = EditSession.from_pretrained(str(save_tiny(tmp_path / "unlicensed", license=None)), device="cpu",
                                          **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:1], progress=False)
    assert session.base.license is None
    hub.clear_requests()
    with pytest.raises(LicenseRequiredError, match="license='…'"):
        session.push_to_hub("tester/unlicensed")
    assert hub.requests == []
    session.push_to_hub("tester/unlicensed", license="cc-by-4.0")
    card = ModelCard(hub.file("tester/unlicensed", "round-1", "README.md").decode())
    assert card.data.license == "cc-by-4.0"


def test_push_verbs_as_transformers_has_them(hub, session: EditSession) -> None:
    pushed = session.push_to_hub("bare-name", commit_message="edits {round}", commit_description="round {round}")
    assert [p.tag for p in pushed] == ["round-1", "round-2", "round-3"]
    assert "tester/bare-name" in hub.repo_ids()  # a bare name goes to the token's own namespace
    assert [c.title for c in hub.commits("tester/bare-name")[:3]] == ["edits 3", "edits 2", "edits 1"]

    session.rollback(1)
    session.push_to_hub("tester/reviewed")
    session.edit(REQUESTS[3:], progress=False)
    proposed = session.push_to_hub("tester/reviewed", create_pr=True)
    assert [(p.round, p.tag, p.pr_revision) for p in proposed] == [(2, "", "refs/pr/1")]
    assert hub.tags("tester/reviewed") == {"round-1": hub.head("tester/reviewed")}
    assert hub.pull_requests("tester/reviewed") == {1: proposed[0].commit}
    assert "rounds/002/report.json" in hub.files("tester/reviewed", "refs/pr/1")
