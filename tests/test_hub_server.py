"""The loopback Hub server, checked through the real huggingface_hub client (and peft in a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TOKEN = "hf_test_token"
USER = "tester"
REPO = f"{USER}/demo"
BIG = 2 * 1024 * 1024 + 17  # over the 1 MiB LFS threshold


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    # transformers imported huggingface_hub before this module, so HF_HUB_DISABLE_XET in os.environ would come too
    # late; is_xet_available() reads this constant on every call. Without it "lfs" files would go through Xet.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(token=TOKEN, user=USER) as server:
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def download(hub: HubServer, cache: Path, filename: str, revision: str, repo_id: str = REPO) -> bytes:
    path = hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.endpoint, token=TOKEN, cache_dir=cache)
    return Path(path).read_bytes()


def test_whoami_accepts_only_the_server_token(api: HfApi, hub: HubServer) -> None:
    assert api.whoami()["name"] == USER
    with pytest.raises(HfHubHTTPError) as caught:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").whoami()
    assert caught.value.response.status_code == 401
    assert caught.value.response.json() == {"error": "Invalid credentials in Authorization header"}


def test_upload_folder_makes_one_commit_and_sends_binaries_through_lfs(api: HfApi, hub: HubServer,
                                                                        tmp_path: Path) -> None:
    url = api.create_repo(REPO)
    assert api.create_repo(REPO, exist_ok=True) == url == f"{hub.endpoint}/{REPO}"
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    weights = os.urandom(BIG)
    (folder / "model.safetensors").write_bytes(weights)

    hub.clear_requests()
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="first upload")

    uploads = [path for method, path in hub.requests if method == "PUT"]
    assert len(uploads) == 1 and ("POST", f"/{REPO}.git/info/lfs/objects/batch") in hub.requests
    commits = hub.commits(REPO)
    assert [c.title for c in commits] == ["first upload", "initial commit"] and commits[0].id == info.oid
    assert hub.file(REPO, "main", "model.safetensors") == weights
    assert hub.lfs_files(REPO) == ["model.safetensors"]
    expected = [".gitattributes", "model.safetensors", "notes.txt"]
    assert api.list_repo_files(REPO) == hub.files(REPO) == expected
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", info.oid)] and refs.tags == []
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [c.id for c in commits]
    model = api.model_info(REPO, revision=info.oid)
    assert model.sha == info.oid and model.id == REPO and model.private is False
    assert sorted(s.rfilename for s in model.siblings) == expected


def test_private_repos_need_the_token(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO, private=True)
    assert hub.is_private(REPO) and api.model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)


def test_a_tag_keeps_serving_its_commit_after_later_commits(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    api.create_repo(REPO)
    first = api.create_commit(REPO, [CommitOperationAdd("a.txt", b"round 1"), CommitOperationAdd("b.txt", b"b")],
                              commit_message="round 1", parent_commit=hub.head(REPO))
    api.create_tag(REPO, tag="round-1", revision=first.oid)
    second = api.create_commit(REPO, [CommitOperationAdd("a.txt", b"round 2"), CommitOperationDelete("b.txt")],
                               commit_message="round 2", commit_description="details", parent_commit=first.oid)

    assert hub.tags(REPO) == {"round-1": first.oid} and hub.head(REPO) == second.oid
    assert hub.files(REPO) == [".gitattributes", "a.txt"] and hub.commits(REPO)[0].message == "details"
    assert download(hub, tmp_path, "a.txt", "round-1") == b"round 1"
    assert download(hub, tmp_path, "a.txt", "main") == b"round 2"
    snapshot = Path(snapshot_download(REPO, revision="round-1", endpoint=hub.endpoint, token=TOKEN,
                                      cache_dir=tmp_path))
    assert snapshot.name == first.oid and (snapshot / "b.txt").read_bytes() == b"b"
    assert [t.name for t in api.list_repo_refs(REPO).tags] == ["round-1"]
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_tag(REPO, tag="round-1", revision=second.oid)
    assert caught.value.response.status_code == 409
    api.delete_tag(REPO, tag="round-1")
    assert hub.tags(REPO) == {}


def test_branches_and_quoted_revisions(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.create_branch(REPO, branch="edits/round-1")
    commit = api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="on a branch",
                               revision="edits/round-1")
    assert hub.branches(REPO)["edits/round-1"] == commit.oid and "x.txt" not in hub.files(REPO)
    assert download(hub, tmp_path, "x.txt", "edits/round-1") == b"x"
    api.delete_branch(REPO, branch="edits/round-1")
    assert list(hub.branches(REPO)) == ["main"]


def test_missing_repo_revision_and_file_raise_the_client_errors(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    api.create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        download(hub, tmp_path, "nothing.txt", "main")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-tag")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER}/missing")


def test_a_commit_failing_after_the_uploads_leaves_the_repo_unchanged(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    before = hub.head(REPO)
    weights = os.urandom(BIG)
    hub.fail_next("commit", status=500)
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit(REPO, [CommitOperationAdd("model.safetensors", weights)], commit_message="push")
    assert caught.value.response.status_code == 500
    assert hub.head(REPO) == before and hub.files(REPO) == [".gitattributes"]
    assert len(hub.lfs_objects(REPO)) == 1  # uploaded, but not committed

    hub.clear_requests()
    retry = api.create_commit(REPO, [CommitOperationAdd("model.safetensors", weights)], commit_message="push")
    assert hub.head(REPO) == retry.oid and hub.file(REPO, "main", "model.safetensors") == weights
    assert not [request for request in hub.requests if request[0] == "PUT"]  # the stored object is reused


def test_a_failing_tag_request_creates_no_tag(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    hub.fail_next("tag", status=503)
    with pytest.raises(HfHubHTTPError):
        api.create_tag(REPO, tag="round-1")
    assert hub.tags(REPO) == {}


def test_a_stale_parent_commit_is_rejected(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    stale = hub.head(REPO)
    api.create_commit(REPO, [CommitOperationAdd("a.txt", b"1")], commit_message="someone else")
    head = hub.head(REPO)
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit(REPO, [CommitOperationAdd("a.txt", b"2")], commit_message="mine", parent_commit=stale)
    assert caught.value.response.status_code == 409
    assert hub.head(REPO) == head and hub.file(REPO, "main", "a.txt") == b"1"


# Runs in a fresh interpreter so that HF_ENDPOINT is read at import: stock peft, no endpoint argument.
PEFT_LOADER = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, repo_id, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), repo_id, revision="round-1").eval()
with torch.no_grad():
    torch.save(model(torch.tensor([[1, 2, 3, 4, 5]])).logits, out)
"""


def logits_with_adapter(base: Path, adapter: str | Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_stock_peft_loads_an_adapter_by_tag(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = LoraConfig(target_modules=["down_proj"], r=2, init_lora_weights=False)
        adapters.append(tmp_path / f"adapter-{seed}")
        get_peft_model(LlamaForCausalLM.from_pretrained(base), lora).save_pretrained(adapters[-1])
    api.create_repo(REPO)
    tagged = api.upload_folder(repo_id=REPO, folder_path=adapters[0], commit_message="round 1")
    api.create_tag(REPO, tag="round-1", revision=tagged.oid)
    api.upload_folder(repo_id=REPO, folder_path=adapters[1], commit_message="round 2")
    assert "adapter_model.safetensors" in hub.lfs_files(REPO)

    out = tmp_path / "logits.pt"
    env = {**os.environ, **hub.client_env(tmp_path / "hf-home")}
    subprocess.run([sys.executable, "-c", PEFT_LOADER, str(base), REPO, str(out)], env=env, check=True, timeout=120)

    from_hub = torch.load(out)
    assert torch.allclose(from_hub, logits_with_adapter(base, adapters[0]), atol=1e-6)
    assert not torch.allclose(from_hub, logits_with_adapter(base, adapters[1]), atol=1e-4)
    assert ("GET", f"/{REPO}/resolve/round-1/adapter_model.safetensors") in hub.requests
