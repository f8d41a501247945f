"""Faults while saving: a kill -9 at every step, concurrent writers and readers, tampered folders.

How faults are injected is described in tests/README.md ("Fault injection").
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nse_hub import EditSession, load_requests
from nse_hub.adapters import ADAPTER_WEIGHTS, read_adapter
from nse_hub.checkpoint import SESSION_FILE, read_meta, read_reports, round_dir, same_history, verify_files
from nse_hub.errors import CheckpointError, ConcurrentWriteError
from nse_hub.io import TXN_DIR, file_sha256, folder_lock

REQUESTS = load_requests(FIXTURES / "requests.json")
IDS = torch.tensor([[5, 6, 7, 8, 9]])

# The calls through which a save replaces or removes what is there; a kill lands just before one of them.
# (Creating the staging folders is left out: a kill there leaves the same state as one before the next step.)
MUTATIONS = (("os", "replace"), ("os", "rename"), ("os", "unlink"), ("os", "rmdir"), ("shutil", "rmtree"))


def _run_killed_at(step: int | None, save: Callable[[], None]) -> int:
    """Run ``save`` in a forked child that SIGKILLs itself before its ``step``-th file-system change (never, with
    ``None``); returns how many changes the child made (for ``None``) or -9."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count the mutations, die at the chosen one
        os.close(read)
        count = [0]
        modules = {"os": os, "shutil": shutil}

        def wrap(original):
            def mutation(*args, **kwargs):
                count[0] += 1
                if count[0] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(*args, **kwargs)
            return mutation

        for module, name in MUTATIONS:
            setattr(modules[module], name, wrap(getattr(modules[module], name)))
        try:
            save()
            os.write(write, str(count[0]).encode())
        except BaseException as error:
            os.write(write, f"the save failed: {error!r}"[:4000].encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    data = os.read(read, 4096).decode()
    os.close(read)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    assert data.isdigit(), data
    return int(data)


def _history(folder: Path) -> list:
    meta = read_meta(folder)
    verify_files(folder, meta)  # the root adapter, the rounds and the manifest are the ones session.json names
    return read_reports(folder, meta, meta.rounds)


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import save_tiny

    root = tmp_path_factory.mktemp("faults")
    base = save_tiny(root / "tiny-llama")
    session = EditSession.from_pretrained(str(base), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    for request in REQUESTS[:3]:
        session.edit(request, progress=False)
    session.save_pretrained(root / "saved")
    return base, root / "saved"


@pytest.fixture
def tiny_dir(saved_once) -> Path:
    return saved_once[0]


@pytest.fixture
def three_rounds(saved_once, tmp_path: Path) -> tuple[EditSession, Path]:
    """A saved edit of three rounds (a fresh copy) and the session resumed from it."""
    folder = shutil.copytree(saved_once[1], tmp_path / "saved")
    return EditSession.from_pretrained(str(folder), device="cpu"), folder


def _copy_for(session: EditSession, original: Path, target: Path) -> Path:
    """A copy of a folder the session saved, which the session may save into as into the original."""
    shutil.copytree(original, target)
    session._known_digests[target.resolve()] = session._known_digests[original.resolve()]
    return target


def _kill_at_every_step(session: EditSession, original: Path, work: Path, old: list, new: list) -> int:
    """Kill a save at each of its steps; every folder left must load as the old or the new version."""
    _copy_for(session, original, work / "probe")
    steps = _run_killed_at(None, lambda: session.save_pretrained(work / "probe"))
    assert steps > 3
    assert same_history(_history(work / "probe"), new)
    for step in range(1, steps + 1):
        target = _copy_for(session, original, work / f"killed-{step}")
        assert _run_killed_at(step, lambda target=target: session.save_pretrained(target)) == -signal.SIGKILL
        history = _history(target)  # the next open finishes or discards the interrupted save
        assert same_history(history, old) or same_history(history, new), f"killed at step {step}: a mix"
        assert not (target / TXN_DIR).exists()
        leftovers = [p.name for p in (target / "rounds").iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"killed at step {step}: {leftovers}"
    return steps


def test_a_kill_at_any_step_of_rewriting_history_leaves_the_old_or_the_new_version(three_rounds, tmp_path) -> None:
    session, folder = three_rounds
    old = list(session.rounds)
    session.rollback(1)
    session.edit(REQUESTS[3], progress=False)
    session.edit(REQUESTS[0], progress=False)
    new = list(session.rounds)
    steps = _kill_at_every_step(session, folder, tmp_path, old, new)
    assert steps >= 5  # two round folders replaced, one removed, the root files, session.json


def test_a_kill_at_any_step_of_appending_a_round_leaves_round_n_or_n_plus_1(three_rounds, tmp_path, tiny_dir):
    session, folder = three_rounds
    old = list(session.rounds)
    session.edit(REQUESTS[3], progress=False)
    _kill_at_every_step(session, folder, tmp_path, old, list(session.rounds))
    for killed in sorted(tmp_path.glob("killed-*")):  # stock PEFT loads the version session.json names
        version = read_meta(killed).rounds
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(killed))
        with torch.no_grad():
            expected = session.merge(round=version)(input_ids=IDS).logits
            assert torch.allclose(stock(input_ids=IDS).logits, expected, atol=1e-5), killed.name


def test_a_second_writer_cannot_silently_replace_another_history(three_rounds) -> None:
    _, folder = three_rounds
    first = EditSession.from_pretrained(str(folder), device="cpu")
    second = EditSession.from_pretrained(str(folder), device="cpu")
    first.edit(REQUESTS[3], progress=False)
    first.save_pretrained(folder)
    first.check_can_save(folder)  # its own history: no refusal
    with pytest.raises(ConcurrentWriteError, match="not this session's history"):
        second.check_can_save(folder)  # refused before its edit, as its save is after it
    second.edit(REQUESTS[0], progress=False)
    with pytest.raises(ConcurrentWriteError, match="not this session's history"):
        second.save_pretrained(folder)
    assert same_history(_history(folder), first.rounds)
    first.edit(REQUESTS[1], progress=False)  # the writer that owns the folder goes on saving
    first.save_pretrained(folder)
    assert len(_history(folder)) == 5


def test_an_unrelated_session_cannot_overwrite_a_saved_edit(three_rounds, tiny_dir: Path) -> None:
    _, folder = three_rounds
    other = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    other.edit(REQUESTS[2], progress=False)
    with pytest.raises(ConcurrentWriteError, match="Nothing was written"):
        other.save_pretrained(folder)
    assert len(_history(folder)) == 3


def _hold_the_lock(folder: str, seconds: float, ready) -> None:
    with folder_lock(folder):
        ready.set()
        time.sleep(seconds)


def test_a_writer_waits_for_the_lock_and_then_gives_a_clear_error(three_rounds, monkeypatch) -> None:
    session, folder = three_rounds
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_the_lock, args=(str(folder), 5.0, ready))
    holder.start()
    try:
        assert ready.wait(30)
        monkeypatch.setenv("NSE_HUB_LOCK_TIMEOUT", "0.5")
        with pytest.raises(CheckpointError, match="another process"):
            session.save_pretrained(folder)
        monkeypatch.setenv("NSE_HUB_LOCK_TIMEOUT", "60")
        session.edit(REQUESTS[3], progress=False)
        session.save_pretrained(folder)  # waits until the holder lets go
    finally:
        holder.join()
    assert len(_history(folder)) == 4


def _save_back_and_forth(session: EditSession, folder: str, times: int) -> None:
    for i in range(times):
        session.save_pretrained(folder, round=1 + i % 3)


def test_readers_never_see_a_partial_save(three_rounds) -> None:
    session, folder = three_rounds
    versions = [session.rounds[:k] for k in (1, 2, 3)]
    context = multiprocessing.get_context("fork")
    writer = context.Process(target=_save_back_and_forth, args=(session, str(folder), 30))
    writer.start()
    seen = set()
    try:
        while writer.is_alive():
            history = _history(folder)
            assert any(same_history(history, v) for v in versions)
            seen.add(len(history))
    finally:
        writer.join()
    assert writer.exitcode == 0
    assert len(seen) >= 2  # the reader really ran beside the writer


def test_saving_twice_gives_byte_identical_files(three_rounds, tmp_path: Path) -> None:
    _, folder = three_rounds
    copy = shutil.copytree(folder, tmp_path / "copy")
    context = multiprocessing.get_context("spawn")  # a new process: another hash seed, another safetensors map
    process = context.Process(target=_resave, args=(str(copy),))
    process.start()
    process.join()
    assert process.exitcode == 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(folder)
        assert (copy / relative).read_bytes() == path.read_bytes(), relative


def _resave(folder: str) -> None:
    EditSession.from_pretrained(folder, device="cpu").save_pretrained(folder)


# --- tampering -------------------------------------------------------------------------------------------------


def _session_json(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / SESSION_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "foreign"])
def test_a_damaged_root_adapter_is_named(three_rounds, tmp_path: Path, damage: str) -> None:
    _, folder = three_rounds
    weights = folder / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:-16]))
    elif damage == "missing":
        weights.unlink()
    else:
        shutil.copy(folder / round_dir(1) / ADAPTER_WEIGHTS, weights)  # another version's adapter
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors (does not match|is missing)"):
        EditSession.from_pretrained(str(folder), device="cpu")


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d["config"].update(method="alphaedit"), "mixes two saved edits"),
    (lambda d: d["base"].update(module_sha256={}), "wrong-base guard"),
    (lambda d: d.update(rounds=2), "beyond the 2 it records"),
    (lambda d: d.update(rounds="3"), "'rounds' must be a int"),
    (lambda d: d.update(context_templates="x"), "'context_templates' must be a list"),
    (lambda d: d["base"].update(model_sha256="/tmp/elsewhere"), "model_sha256 must be a sha256"),
    (lambda d: d["files"].update({"../../outside": "0" * 64}), "not a path inside the folder"),
    (lambda d: d.pop("files"), "checksums of the adapters are missing"),
])
def test_an_inconsistent_session_json_is_refused_with_the_reason(three_rounds, change, reason: str) -> None:
    _, folder = three_rounds
    _session_json(folder, change)
    with pytest.raises(CheckpointError, match=reason):
        EditSession.from_pretrained(str(folder), device="cpu")


def test_nan_in_a_saved_round_is_refused(three_rounds) -> None:
    _, folder = three_rounds
    keys = folder / round_dir(2) / "keys.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(keys))
    for tensor in tensors.values():
        tensor.view(-1)[0] = float("nan")
    save_file(tensors, str(keys))
    # NaN saved with a matching checksum (as nse-hub before 0.2 could): the values themselves are checked.
    _session_json(folder, lambda d: d["files"].update({f"{round_dir(2)}/keys.safetensors": file_sha256(keys)}))
    with pytest.raises(CheckpointError, match=r"keys\.safetensors layer \d holds NaN or infinite values"):
        EditSession.from_pretrained(str(folder), device="cpu")


def test_a_downloaded_edit_may_not_name_local_files(three_rounds) -> None:
    _, folder = three_rounds
    meta = read_meta(folder)
    meta.config.mom2_dataset = str(folder)
    from nse_hub.checkpoint import meta_problems

    assert any("local path" in p for p in meta_problems(meta, downloaded=True))
    assert not any("local path" in p for p in meta_problems(meta, downloaded=False))


def test_legacy_leftovers_of_an_interrupted_save_are_put_back(three_rounds) -> None:
    _, folder = three_rounds
    os.replace(folder / round_dir(2), folder / "rounds" / f".002.old-{os.getpid()}")  # nse-hub 0.1 died here
    (folder / ".adapter_model.safetensors.abc.tmp").write_bytes(b"half")
    assert len(_history(folder)) == 3
    assert sorted(p.name for p in (folder / "rounds").iterdir()) == ["001", "002", "003"]
    assert not (folder / ".adapter_model.safetensors.abc.tmp").exists()


def test_a_full_disk_or_read_only_folder_is_a_clear_error(three_rounds, monkeypatch) -> None:
    session, folder = three_rounds
    session.edit(REQUESTS[3], progress=False)
    import errno

    from nse_hub import io

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.FolderTransaction, "write", full)
    with pytest.raises(CheckpointError, match=r"disk is full.*previous version there is intact"):
        session.save_pretrained(folder)
    monkeypatch.undo()
    assert len(_history(folder)) == 3 and not (folder / TXN_DIR).exists()
    if os.geteuid() != 0:  # root writes anywhere
        folder.chmod(0o500)
        try:
            with pytest.raises(CheckpointError, match="permission denied"):
                session.save_pretrained(folder)
        finally:
            folder.chmod(0o700)


def test_read_adapter_refuses_nan_factors(three_rounds) -> None:
    session, folder = three_rounds
    from safetensors.torch import load_file, save_file

    path = folder / round_dir(1) / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    next(iter(tensors.values())).view(-1)[0] = float("inf")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(Exception, match="NaN or infinite"):
        read_adapter(folder / round_dir(1), session.layout)
