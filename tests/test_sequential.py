"""Long sequential runs: rounds that write each fact once, the running protocol on a fixed sample, lean rounds."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS
from filelock import FileLock
from safetensors.torch import save_file

from nse_hub import EditSession, load_requests
from nse_hub.errors import ConfigError
from nse_hub.evaluation import EvalOptions
from nse_hub.requests import EditRequest, fact_key
from nse_hub.sequential import (
    SequentialRun,
    ValueStore,
    precompute_values,
    resume_session,
    run_sequential,
    running_sample,
    schedule_rounds,
)

REQUESTS = load_requests(FIXTURES / "requests.json")
SHARED_COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_easyedit" / \
    "counterfact-edit.json"


def rewrite(request: EditRequest, target: str) -> EditRequest:
    return EditRequest(**{**request.to_dict(), "target_new": target, "neighbors": ()})


def test_rounds_are_the_consecutive_slices_without_repeats() -> None:
    rounds = schedule_rounds(REQUESTS, 3)
    assert rounds == [list(REQUESTS[:3]), list(REQUESTS[3:])]


def test_a_second_write_of_a_fact_waits_for_the_next_round_and_keeps_its_order() -> None:
    a, b, c, d = REQUESTS[:4]
    again = rewrite(a, "Klingon")
    rounds = schedule_rounds([a, b, again, c, d], 3)
    # `again` cannot join a's round: it waits, goes first in round 2, and the later write still comes later.
    assert rounds == [[a, b, c], [again, d]]
    assert all(len({fact_key(r) for r in batch}) == len(batch) for batch in rounds)
    thrice = [a, rewrite(a, "Klingon"), rewrite(a, "Elvish"), b]
    assert schedule_rounds(thrice, 4) == [[a, b], [thrice[1]], [thrice[2]]]


def test_the_running_sample_is_fixed_uniform_and_only_of_edits_made() -> None:
    first = running_sample(500, 100, 1000)
    assert first == running_sample(500, 100, 1000) and len(first) == 100 and max(first) < 500
    assert first == sorted(set(first))
    assert running_sample(50, 100, 1000) == list(range(50))
    later = running_sample(1000, 100, 1000)
    assert later != first and len(later) == 100
    assert running_sample(500, 100, 1000, seed=1) != first


@pytest.mark.skipif(not SHARED_COUNTERFACT.is_file(), reason="../shared/data/counterfact_easyedit is absent")
def test_counterfacts_first_10000_records_schedule_into_rounds_of_100() -> None:
    records = load_requests(SHARED_COUNTERFACT, limit=10_000)
    rounds = schedule_rounds(records, 100)
    flat = [r for batch in rounds for r in batch]
    assert sorted(map(id, flat)) == sorted(map(id, records)) and max(map(len, rounds)) == 100
    assert all(len({fact_key(r) for r in batch}) == len(batch) for batch in rounds)
    assert flat != list(records)  # the stream does write some fact twice within a round of 100


def test_a_run_with_repeats_a_sample_and_lean_rounds_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    requests = [REQUESTS[0], rewrite(REQUESTS[0], "Klingon"), *REQUESTS[1:3]]
    options = EvalOptions(generation=False)
    state = tmp_path / "state"
    session = resume_session(str(tiny_dir), state, device="cpu", **TINY_HPARAMS, layers=(1, 2))
    run = run_sequential(session, requests, 2, running_sample_size=2, options=options, probes="rewrite",
                         state_dir=state)
    assert [[r.request for r in report.requests] for report in session.rounds] == [
        [requests[0], requests[2]], [requests[1], requests[3]]]
    point = run.curve[0]
    assert (point.edits, point.sample) == (2, None)  # two edits so far: all of them, no sample
    assert run.final.edits == 4
    report = session.rounds[0].requests[0]
    assert report.paraphrases == [] and report.neighbors == [] and report.p_new_after is not None
    saved = json.loads((state / "run.json").read_text())
    assert saved["curve"][0]["sample"] is None
    resumed = resume_session(str(tiny_dir), state, device="cpu")
    again = run_sequential(resumed, requests, 2, running_sample_size=2, options=options, state_dir=state)
    assert again.final.metrics == pytest.approx(run.final.metrics) and len(resumed.rounds) == 2


def test_a_sampled_point_says_so(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    with caplog.at_level(logging.INFO, logger="nse_hub.sequential"):
        run = run_sequential(session, REQUESTS, 2, running_sample_size=1, options=EvalOptions(generation=False),
                             probes="rewrite", label="nse-tiny")
    done = [re.fullmatch(r"round (\d/2) done \((\d) edits, \d+ s\)", r.getMessage()) for r in caplog.records]
    assert [m.groups() for m in done if m] == [("1/2", "2"), ("2/2", "4")]  # a long run's log shows where it is
    assert [(e.edits, e.sample) for e in run.curve] == [(2, 1), (4, None)]
    assert (run.method, run.name) == ("nse", "nse-tiny") and SequentialRun.from_dict(run.to_dict()).name == "nse-tiny"
    assert "sample of 1 of the 2 edits" in run.curve[0].card_metrics()[0].protocol
    with pytest.raises(ConfigError, match="probes must be 'all' or 'rewrite'"):
        session.edit(REQUESTS[:1], probes="some")


def test_a_run_that_lost_its_session_replays_alphaedit_rounds_from_the_store(tiny_dir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = ValueStore(tmp_path / "log")

    def run(values: ValueStore | None, **settings: float) -> EditSession:
        session = EditSession.from_pretrained(str(tiny_dir), device="cpu", method="alphaedit",
                                              **{**TINY_HPARAMS, **settings}, layers=(1, 2))
        run_sequential(session, REQUESTS, 2, running=False, options=EvalOptions(generation=False), probes="rewrite",
                       values=values)
        return session

    first = run(store)
    assert len(list(store.folder.glob("*.safetensors"))) == 2
    optimise = EditSession.compute_values
    calls: list[int] = []
    monkeypatch.setattr(EditSession, "compute_values",
                        lambda self, *a, **k: calls.append(1) or optimise(self, *a, **k))
    replayed = run(store)  # the same run on a machine that kept only the store: no value step at all
    assert calls == []
    inline = run(None)  # stored targets are the ones the round would optimise
    for layer in (1, 2):
        expected = first.deltas.cumulative(layer).dense()
        assert torch.equal(replayed.deltas.cumulative(layer).dense(), expected)
        assert torch.equal(inline.deltas.cumulative(layer).dense(), expected)
    other_solve = run(store, L2=3.0)  # round 1 starts from the same weights, round 2 from other ones
    assert calls == [1] and len(list(store.folder.glob("*.safetensors"))) == 3
    assert store.load(other_solve, REQUESTS[:2]) is None  # the weights moved: round 1's targets no longer apply


def test_a_replay_log_does_not_depend_on_the_bits_of_the_weights_and_older_logs_still_replay(
        tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(values: ValueStore | None) -> EditSession:
        session = EditSession.from_pretrained(str(tiny_dir), device="cpu", method="alphaedit", **TINY_HPARAMS,
                                              layers=(1, 2))
        run_sequential(session, REQUESTS, 2, running=False, options=EvalOptions(generation=False), probes="rewrite",
                       values=values)
        return session

    unlogged = run(None)
    log = ValueStore(tmp_path / "log")
    assert log.record(unlogged) == 2 and log.record(unlogged) == 0  # a session edited without a log seeds one
    first, second = schedule_rounds(REQUESTS, 2)

    # The same run's log as nse-hub kept it before: later rounds keyed by the bits of the weights before them.
    older = ValueStore(tmp_path / "older")
    writer = EditSession.from_pretrained(str(tiny_dir), device="cpu", method="alphaedit", **TINY_HPARAMS,
                                         layers=(1, 2))
    for requests in (first, second):
        targets = log.load(writer, requests)
        older.folder.mkdir(exist_ok=True)
        save_file(targets.to_tensors(), older._weights_keyed_path(writer, requests))
        writer.edit(requests, values=targets, probes="rewrite")
    assert log.path(writer, first) != older._weights_keyed_path(writer, first)

    optimise = EditSession.compute_values
    calls: list[int] = []
    monkeypatch.setattr(EditSession, "compute_values", lambda self, *a, **k: calls.append(1) or optimise(self, *a, **k))
    replayed = run(older)  # found by the weights' bits, and kept under the current keys as well
    assert calls == [] and len(list(older.folder.glob("*.safetensors"))) == 4
    # Other bits (another thread count or machine): the current keys still find every round.
    monkeypatch.setattr("nse_hub.sequential.edited_weights_sha256", lambda session: os.urandom(16).hex())
    for store in (log, older):
        again = run(store)
        assert calls == []
        for layer in (1, 2):
            assert torch.equal(again.deltas.cumulative(layer).dense(), unlogged.deltas.cumulative(layer).dense())
            assert torch.equal(replayed.deltas.cumulative(layer).dense(), unlogged.deltas.cumulative(layer).dense())
    assert unlogged.trajectory_sha256(1) != unlogged.trajectory_sha256() == replayed.trajectory_sha256()
    assert unlogged.value_targets(2) is not None


def test_value_targets_computed_ahead_are_shared_by_the_nse_family_and_change_nothing(tiny_dir: Path,
                                                                                      tmp_path: Path) -> None:
    options = EvalOptions(generation=False)
    store = ValueStore(tmp_path / "values")
    helper = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    assert precompute_values(helper, REQUESTS, 2, store) == 2  # every round, in a "helper process"
    assert precompute_values(helper, REQUESTS, 2, store) == 0  # already stored
    assert len(list(store.folder.iterdir())) == 2

    def run(method: str, values: ValueStore | None) -> EditSession:
        session = EditSession.from_pretrained(str(tiny_dir), device="cpu", method=method,
                                              **TINY_HPARAMS, layers=(1, 2))
        run_sequential(session, REQUESTS, 2, running=False, options=options, probes="rewrite", values=values)
        return session

    for method in ("nse", "nse_null"):  # NSE-null's value settings are NSE's: it reads the same files
        ahead, inline = run(method, store), run(method, None)
        assert len(list(store.folder.iterdir())) == 2
        for layer in (1, 2):
            assert torch.equal(ahead.deltas.cumulative(layer).dense(), inline.deltas.cumulative(layer).dense())
    memit = EditSession.from_pretrained(str(tiny_dir), device="cpu", method="memit", **TINY_HPARAMS, layers=(1, 2))
    assert store.load(memit, REQUESTS[:2]) is None  # its targets depend on the weights earlier rounds left
    with pytest.raises(ConfigError, match="only NSE-family methods"):
        precompute_values(memit, REQUESTS, 2, store)
    other = EditSession.from_pretrained(str(tiny_dir), device="cpu", **{**TINY_HPARAMS, "v_lr": 0.25},
                                        layers=(1, 2))
    assert store.load(other, REQUESTS[:2]) is None  # other value settings: other targets


def test_processes_sharing_a_value_store_claim_rounds_and_compute_none_twice(
        tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = ValueStore(tmp_path / "values")
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    first, second = schedule_rounds(REQUESTS, 2)
    path = store.path(session, first)
    elsewhere = ValueStore(tmp_path / "elsewhere")
    expected = elsewhere.compute(session, first)
    other_process = FileLock(path.with_suffix(".lock"))  # another process is computing the first round
    other_process.acquire()
    assert precompute_values(session, REQUESTS, 2, store) == 1  # a helper leaves it to that process
    assert not path.is_file() and store.load(session, second) is not None

    calls: list[int] = []
    compute_values = session.compute_values
    monkeypatch.setattr(session, "compute_values", lambda *a, **k: calls.append(1) or compute_values(*a, **k))
    got: dict = {}
    caplog.set_level(logging.INFO, logger="nse_hub.sequential")
    run = threading.Thread(target=lambda: got.setdefault("values", store.compute(session, first)))
    run.start()
    deadline = time.monotonic() + 60
    while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "waiting for another process" in caplog.text  # the run waits instead of computing the round again
    shutil.copy(elsewhere.path(session, first), path)  # the other process stores its targets and ends
    other_process.release()
    run.join()
    assert calls == [] and torch.equal(got["values"].targets, expected.targets)
    assert sorted(p.suffix for p in store.folder.iterdir()) == [".safetensors", ".safetensors"]

    path.unlink()
    other_process.acquire()
    run = threading.Thread(target=lambda: got.update(values=store.compute(session, first)))
    run.start()
    other_process.release()  # a process that claimed the round and died without storing it
    run.join()
    assert calls == [1] and torch.equal(got["values"].targets, expected.targets)
