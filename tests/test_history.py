"""A git-like history of edits: diff, branches on the Hub, merges with conflicts, shared statistics."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nse_hub import EditSession, load_requests
from nse_hub.algorithm import ValueResult
from nse_hub.checkpoint import SESSION_FILE, VALUES_FILE, round_dir
from nse_hub.cli import main
from nse_hub.errors import BaseModelMismatchError, HistoryConflictError, StatisticsError
from nse_hub.history import VersionSpec, diff, merge_history, read_version
from nse_hub.lineage import (
    Version,
    common_rounds,
    diff_versions,
    find_conflicts,
    plan_merge,
)
from nse_hub.report import RequestReport, RoundReport
from nse_hub.requests import EditRequest
from nse_hub.stats_hub import MANIFEST, repo_folder

REQUESTS = load_requests(FIXTURES / "requests.json")
DARRIEUX = REQUESTS[0]
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def _request(subject: str, target: str, true: str = "French", prompt: str = "The mother tongue of {} is"):
    return EditRequest(prompt, subject, target, true)


# --- conflict detection and diffs on saved data (no model) ------------------------------------------------


def _report(number: int, requests: list[EditRequest], stamp: str = "") -> RoundReport:
    rows = [RequestReport(r, 0.1, 0.9, 0.5, 0.05, 1.0, 0.1, 0.2, 5, [True]) for r in requests]
    return RoundReport(number, "nse", rows, {1: [3]}, {"total": 1.0}, created=stamp or f"2025-01-0{number}")


def _version(label: str, rounds: list[list[EditRequest]], shared: list[RoundReport] = (), session=None,
             values: bool = True) -> Version:
    reports = list(shared) + [_report(len(shared) + i + 1, reqs, f"{label}-{i}") for i, reqs in enumerate(rounds)]
    stored = [{"targets": torch.arange(len(r.requests) * 2, dtype=torch.float32).reshape(-1, 2),
               "hidden": torch.zeros(len(r.requests), 2), "loss": torch.zeros(len(r.requests)),
               "nll": torch.zeros(len(r.requests)), "steps": torch.ones(len(r.requests), dtype=torch.int64)}
              if values else None for r in reports]
    return Version(label, session.base, session.config, reports, {}, stored)


@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory) -> EditSession:
    from conftest import save_tiny

    folder = save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    return EditSession.from_pretrained(str(folder), device="cpu", **TINY_HPARAMS, layers=(1, 2))


def test_divergent_and_undo_conflicts_are_found(tiny_session) -> None:
    shared = [_report(1, [REQUESTS[3]], "root")]
    ours = _version("ours", [[_request("Danielle Darrieux", "English"), REQUESTS[1]]], shared, tiny_session)
    theirs = _version("theirs", [[_request("Danielle Darrieux", "German")],
                                 [_request("Edwin of Northumbria", "Christianity", None,
                                           "The official religion of {} is"), REQUESTS[2]]], shared, tiny_session)
    assert common_rounds(ours, theirs) == 1
    conflicts = find_conflicts(ours, theirs, 1)
    assert [(c.subject, c.kind, c.ours.target_new, c.theirs.target_new, c.theirs_round) for c in conflicts] == [
        ("Danielle Darrieux", "divergent", "English", "German", 2),
        ("Edwin of Northumbria", "undo", "Islam", "Christianity", 3)]
    with pytest.raises(HistoryConflictError) as error:
        plan_merge(ours, theirs)
    assert len(error.value.conflicts) == 2 and isinstance(error.value, ValueError)
    assert "Danielle Darrieux" in str(error.value) and "undoes" in str(error.value) and "prefer=" in str(error.value)


def test_same_target_on_both_branches_is_no_conflict(tiny_session) -> None:
    ours = _version("ours", [[DARRIEUX]], session=tiny_session)
    theirs = _version("theirs", [[DARRIEUX, REQUESTS[1]]], session=tiny_session)
    assert find_conflicts(ours, theirs, 0) == []
    assert [len(r.requests) for r in plan_merge(ours, theirs).rounds] == [2]


def test_conflicts_resolved_by_policy_and_per_conflict(tiny_session) -> None:
    ours = _version("ours", [[DARRIEUX, REQUESTS[1]]], session=tiny_session)
    theirs = _version("theirs", [[_request("Danielle Darrieux", "German"), REQUESTS[2],
                                  _request("Edwin of Northumbria", "Judaism", "Christianity",
                                           "The official religion of {} is")]], session=tiny_session)
    plan = plan_merge(ours, theirs, prefer="ours")
    (planned,) = plan.rounds
    assert [r.subject for r in planned.requests] == ["Ferrari F40"] and planned.rows == [1]
    assert [r.target_new for r in planned.dropped] == ["German", "Judaism"]
    assert torch.equal(planned.values["targets"], torch.tensor([[2.0, 3.0]]))  # row 1 of the stored values
    plan = plan_merge(ours, theirs, prefer="theirs")
    assert [r.target_new for r in plan.rounds[0].requests] == ["German", "Microsoft", "Judaism"]
    plan = plan_merge(ours, theirs, resolutions={("Danielle Darrieux", "The mother tongue of {} is"): "theirs",
                                                 "Edwin of Northumbria": "ours"})
    assert [r.target_new for r in plan.rounds[0].requests] == ["German", "Microsoft"]
    assert {c.subject: c.resolution for c in plan.conflicts} == {"Danielle Darrieux": "theirs",
                                                                 "Edwin of Northumbria": "ours"}
    with pytest.raises(HistoryConflictError) as error:  # one left open
        plan_merge(ours, theirs, resolutions={"Edwin of Northumbria": "ours"})
    assert [c.subject for c in error.value.conflicts] == ["Danielle Darrieux"]


def test_only_nse_reuses_stored_values(tiny_session) -> None:
    import dataclasses

    ours = _version("ours", [[DARRIEUX]], session=tiny_session)
    theirs = _version("theirs", [[REQUESTS[1]]], session=tiny_session)
    assert plan_merge(ours, theirs).rounds[0].values is not None
    for version in (ours, theirs):  # MEMIT and AlphaEdit compute values on the current weights
        version.config = dataclasses.replace(version.config, method="alphaedit")
    assert plan_merge(ours, theirs).rounds[0].values is None


def test_rounds_already_merged_are_not_applied_twice(tiny_session) -> None:
    ours = _version("ours", [[DARRIEUX]], session=tiny_session)
    theirs = _version("theirs", [[REQUESTS[1]]], session=tiny_session)
    ours.lineage = {"merges": [{"from": "theirs", "rounds": [{"round": 2, "source_round": 1,
                                                              "digest": theirs.digests()[0]}]}]}
    plan = plan_merge(ours, theirs)
    assert plan.rounds == [] and plan.already_merged == [1]


def test_merging_other_bases_is_refused_with_both_fingerprints(tiny_session) -> None:
    import dataclasses

    ours = _version("ours", [[DARRIEUX]], session=tiny_session)
    theirs = _version("theirs", [[REQUESTS[1]]], session=tiny_session)
    theirs.base = dataclasses.replace(theirs.base, module_sha256={k: "0" * 64 for k in theirs.base.module_sha256})
    with pytest.raises(BaseModelMismatchError, match="different base models") as error:
        plan_merge(ours, theirs)
    assert ours.fingerprint[:16] in str(error.value) and theirs.fingerprint[:16] in str(error.value)
    with pytest.raises(BaseModelMismatchError):
        diff_versions(ours, theirs)


def test_diff_of_saved_requests(tiny_session) -> None:
    a = _version("a", [[DARRIEUX, REQUESTS[1]]], session=tiny_session)
    b = _version("b", [[_request("Danielle Darrieux", "German"), REQUESTS[2]]], session=tiny_session)
    result = diff_versions(a, b)
    assert [(c.kind, c.request.subject, c.target_a, c.target_b) for c in result.changes] == [
        ("changed", "Danielle Darrieux", "English", "German"), ("added", "Ferrari F40", "Ferrari", "Microsoft"),
        ("removed", "Edwin of Northumbria", "Islam", "Christianity")]
    assert result.to_dict()["counts"] == {"added": 1, "removed": 1, "changed": 1}


def test_version_specs() -> None:
    assert VersionSpec.parse("me/facts@customer-a/round-4") == VersionSpec("me/facts", "customer-a/round-4")
    assert VersionSpec.parse("me/facts").revision is None


# --- with tiny models and the loopback Hub -----------------------------------------------------------------


@pytest.fixture
def main_line(tiny_dir: Path, tmp_path: Path) -> tuple[EditSession, Path]:
    """Three rounds (one edit each) saved in ``tmp_path/main``."""
    return _main_line(str(tiny_dir), tmp_path)


@pytest.fixture
def hub_main_line(hub_base: str, tmp_path: Path) -> tuple[EditSession, Path]:
    """The same on the Hub copy of the tiny base, for histories pushed and pulled back."""
    return _main_line(hub_base, tmp_path)


def _main_line(base: str, tmp_path: Path) -> tuple[EditSession, Path]:
    session = EditSession.from_pretrained(base, device="cpu", **TINY_HPARAMS, layers=(1, 2))
    for request in REQUESTS[:3]:
        session.edit(request, progress=False)
    session.save_pretrained(tmp_path / "main")
    return session, tmp_path / "main"


def test_a_reused_nse_round_writes_what_a_recomputed_one_does(main_line) -> None:
    session, folder = main_line
    reused = EditSession.from_pretrained(str(folder), round=1, device="cpu")
    recomputed = EditSession.from_pretrained(str(folder), round=1, device="cpu")
    assert (folder / round_dir(2) / VALUES_FILE).is_file()
    saved = read_version(str(folder), values=True).values[1]
    reused.edit(REQUESTS[1], progress=False, values=ValueResult.from_tensors(saved))
    recomputed.edit(REQUESTS[1], progress=False)
    assert reused.rounds[1].requests[0].value_steps == recomputed.rounds[1].requests[0].value_steps
    for layer in session.config.layers:
        written = reused.deltas.rounds[1][layer].dense()
        assert written.abs().max() > 0
        assert torch.allclose(written, recomputed.deltas.rounds[1][layer].dense(), atol=1e-6, rtol=1e-5)


def test_diff_cli_and_probe(main_line, tmp_path: Path, capsys) -> None:
    _, folder = main_line
    branch = EditSession.from_pretrained(str(folder), round=1, device="cpu")
    branch.edit(_request("Danielle Darrieux", "German"), progress=False)
    branch.save_pretrained(tmp_path / "branch")
    assert main(["diff", str(folder), str(tmp_path / "branch"), "--json", str(tmp_path / "diff.json")]) == 0
    data = json.loads((tmp_path / "diff.json").read_text())
    assert data["counts"] == {"added": 0, "removed": 2, "changed": 1} and data["common_rounds"] == 1
    assert "changed" in capsys.readouterr().out
    probed = diff(str(folder), str(tmp_path / "branch"), probe=True, device="cpu")
    change = probed.changed[0]
    assert (change.target_a, change.target_b) == ("English", "German")
    for side in ("a", "b"):
        assert isinstance(change.probe[side]["continuation"], str) and 0 < change.probe[side]["p_new"] < 1
    assert change.probe["b"]["p_new"] > change.probe["a"]["p_new"]  # B wrote German
    removed = probed.removed[0]
    assert removed.target_b == removed.request.target_true  # B answers what the base did


def test_branch_push_and_pull_by_revision(hub, hub_main_line, tiny_dir: Path) -> None:
    session, _ = hub_main_line
    session.push_to_hub("tester/history")
    branch = EditSession.from_pretrained("tester/history", revision="round-2", device="cpu")
    parent = branch.lineage["parent"]
    assert (parent["source"], parent["revision"], parent["round"]) == ("tester/history", "round-2", 2)
    assert parent["commit"] == hub.tags("tester/history")["round-2"]
    branch.edit(REQUESTS[3], progress=False)
    pushed = branch.push_to_hub("tester/history", revision="customer-a")
    assert [(p.round, p.tag) for p in pushed] == [(3, "customer-a/round-3")]
    tags = hub.tags("tester/history")
    assert {t for t in tags if t.startswith("round-")} == {"round-1", "round-2", "round-3"}  # main keeps its tags
    assert tags["customer-a/round-3"] == hub.head("tester/history", "customer-a")
    assert hub.commits("tester/history", "customer-a")[1].id == tags["round-2"]  # branched at round-2
    card = ModelCard(hub.file("tester/history", "customer-a/round-3", "README.md").decode()).text
    assert "Branched from `tester/history@round-2`" in card and "at round 2" in card
    assert 'revision="customer-a/round-3"' in card and "`customer-a/round-3`" in card
    for revision in ("customer-a", "customer-a/round-3"):
        pulled = EditSession.from_pretrained("tester/history", revision=revision, device="cpu")
        assert [r.requests[0].request.subject for r in pulled.rounds] == \
            ["Danielle Darrieux", "Edwin of Northumbria", "Inner Circle railway line"]
        assert pulled.lineage["parent"]["round"] == 2  # the branch point survives a pull of the branch head
        with torch.no_grad():
            assert torch.equal(pulled.model(input_ids=IDS).logits, branch.model(input_ids=IDS).logits)
    # Continuing the branch from its head pushes the next round with the branch's tags.
    pulled.edit(_request("Michel Rocard", "Spanish"), progress=False)
    assert [p.tag for p in pulled.push_to_hub("tester/history", revision="customer-a")] == ["customer-a/round-4"]
    main_pull = EditSession.from_pretrained("tester/history", device="cpu")
    assert len(main_pull.rounds) == 3 and main_pull.lineage == {}


def test_merge_with_a_conflict_resolved_by_policy_loads_with_stock_peft(hub, hub_main_line, tiny_dir: Path,
                                                                        tmp_path: Path) -> None:
    session, _ = hub_main_line
    session.push_to_hub("tester/merge")
    theirs = EditSession.from_pretrained("tester/merge", revision="round-1", device="cpu")
    theirs.edit([_request("Ferrari F40", "Apple", "Ferrari", "{}, developed by"), REQUESTS[3]], progress=False)
    theirs.push_to_hub("tester/merge", revision="customer-a")
    with pytest.raises(HistoryConflictError, match="Ferrari F40") as error:
        merge_history("tester/merge@main", "tester/merge@customer-a", tmp_path / "never")
    assert len(error.value.conflicts) == 1 and not (tmp_path / "never").exists()
    assert main(["merge-history", "tester/merge@main", "tester/merge@customer-a", "--out", str(tmp_path / "never"),
                 "--resolve", "Ferrari F40"]) == 2  # SUBJECT=ours|theirs

    assert main(["merge-history", "tester/merge@main", "tester/merge@customer-a", "--out", str(tmp_path / "merged"),
                 "--prefer", "theirs", "--evaluate", "--no-generation", "--device", "cpu"]) == 0
    merged = EditSession.from_pretrained(str(tmp_path / "merged"), device="cpu")
    assert len(merged.rounds) == 4
    assert [r.request.target_new for r in merged.rounds[3].requests] == ["Apple", "Singapore"]
    assert "parent" not in merged.lineage  # A was main's head: the merge continues main
    record = merged.lineage["merges"][0]
    assert record["ancestor"] == 1 and record["rounds"][0]["values"] == "reused"
    assert record["conflicts"][0]["resolution"] == "theirs"
    facts = {r.subject: r.target_new for r in merged.as_version().effective_requests()}
    assert facts == {"Danielle Darrieux": "English", "Edwin of Northumbria": "Islam", "Ferrari F40": "Apple",
                     "Inner Circle railway line": "Singapore"}
    assert merged.evaluations[4] and "Merged `tester/merge@customer-a`" in (tmp_path / "merged/README.md").read_text()

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=IDS).logits, merged.model(input_ids=IDS).logits, atol=1e-5)
    # Merging the same branch again changes nothing: its rounds are recorded as merged.
    assert merged.merge_history(read_version("tester/merge@customer-a", values=True), prefer="theirs").rounds == []
    # With ours preferred, the other branch's conflicting write is dropped.
    ours = EditSession.from_pretrained("tester/merge", device="cpu")
    plan = ours.merge_history(theirs, prefer="ours")
    assert [r.target_new for r in plan.rounds[0].requests] == ["Singapore"]
    assert {r.subject: r.target_new for r in ours.as_version().effective_requests()}["Ferrari F40"] == "Microsoft"


def test_rounds_saved_without_values_are_optimised_again(main_line, tmp_path: Path) -> None:
    _, folder = main_line
    (folder / round_dir(3) / VALUES_FILE).unlink()  # as saved before values were stored
    state = folder / SESSION_FILE
    saved = json.loads(state.read_text())
    del saved["files"][f"{round_dir(3)}/{VALUES_FILE}"]
    state.write_text(json.dumps(saved))
    ours = EditSession.from_pretrained(str(folder), round=1, device="cpu")
    ours.edit(REQUESTS[3], progress=False)
    ours.merge_history(read_version(str(folder), values=True))
    assert [r["values"] for r in ours.lineage["merges"][0]["rounds"]] == ["reused", "recomputed"]


def test_statistics_round_trip_through_a_hub_dataset(hub, tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    measured = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    folder = measured.push_statistics("tester/stats")
    spec = measured.stats_spec
    assert folder == repo_folder(spec)
    files = hub.files("tester/stats", repo_type="dataset")
    assert f"{folder}/{MANIFEST}" in files and f"{folder}/model.layers.1.mlp.down_proj.safetensors" in files

    monkeypatch.setenv("NSE_HUB_CACHE", str(tmp_path / "empty-cache"))  # a teammate's machine
    shared = EditSession.from_pretrained(str(tiny_dir), device="cpu", stats_repo="tester/stats", **TINY_HPARAMS,
                                         layers=(1, 2))
    shared.edit(DARRIEUX, progress=False)
    assert "stats" in shared.rounds[0].seconds
    for layer in (1, 2):
        assert spec.path(shared.layout, layer).is_file()
        assert torch.equal(shared._second_moments[layer].cpu(), measured._second_moments[layer].cpu())
    assert shared._stats_sha256 == measured._stats_sha256

    # A download that does not match the manifest's sha256 is refused.
    manifest = json.loads(hub.file("tester/stats", "main", f"{folder}/{MANIFEST}", repo_type="dataset"))
    manifest["files"]["model.layers.1.mlp.down_proj.safetensors"] = "0" * 64
    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=json.dumps(manifest).encode(), path_in_repo=f"{folder}/{MANIFEST}",
                        repo_id="tester/stats", repo_type="dataset")
    monkeypatch.setenv("NSE_HUB_CACHE", str(tmp_path / "another-cache"))
    other = EditSession.from_pretrained(str(tiny_dir), device="cpu", stats_repo="tester/stats", **TINY_HPARAMS,
                                        layers=(1, 2))
    with pytest.raises(StatisticsError, match="sha256"):
        other.edit(DARRIEUX, progress=False)
