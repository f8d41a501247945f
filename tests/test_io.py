"""Crash-safe writes: the old file survives a failed write; transactions apply whole or not at all."""

import os
from pathlib import Path

import pytest

from nse_hub.io import TXN_DIR, FolderTransaction, atomic_path, atomic_write_text, canonical_safetensors, recover_folder


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_files_and_folders_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "card.md", "text")
        transaction = FolderTransaction(tmp_path)
        (transaction.folder_path("adapter") / "weights").write_text("w")
        transaction.commit()
    finally:
        os.umask(previous)
    assert (tmp_path / "card.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    (tmp_path / "gone").mkdir()
    return tmp_path


def _stage(folder: Path) -> FolderTransaction:
    transaction = FolderTransaction(folder)
    (transaction.folder_path("sub") / "a").write_text("new a")
    transaction.write("b", b"new b")
    transaction.delete("gone")
    return transaction


def test_nothing_changes_before_the_commit_and_an_uncommitted_stage_is_discarded(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    _stage(folder)  # the process "dies" here: no journal
    assert (folder / "sub" / "a").read_text() == "old a" and (folder / "b").read_text() == "old b"
    assert recover_folder(folder) == "discarded"
    assert not (folder / TXN_DIR).exists() and (folder / "gone").is_dir()


def test_a_commit_interrupted_after_the_journal_is_finished_by_the_next_open(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    transaction = _stage(folder)
    real_replace, calls = os.replace, []

    def dies_on_the_second_move(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the journal's rename, the first move, then "killed"
            raise KeyboardInterrupt
        real_replace(src, dst)

    os.replace = dies_on_the_second_move
    try:
        with pytest.raises(KeyboardInterrupt):
            transaction.commit()
    finally:
        os.replace = real_replace
    assert recover_folder(folder) == "completed"
    assert (folder / "sub" / "a").read_text() == "new a" and (folder / "b").read_text() == "new b"
    assert not (folder / "gone").exists() and not (folder / TXN_DIR).exists()


def test_canonical_safetensors_sorts_the_metadata_and_keeps_the_tensors() -> None:
    import torch
    from safetensors.torch import load, save

    tensors = {"x": torch.arange(6.0).reshape(2, 3)}
    data = canonical_safetensors(save(tensors, metadata={"b": "2", "a": "1", "format": "pt"}))
    assert data == canonical_safetensors(save(tensors, metadata={"format": "pt", "a": "1", "b": "2"}))
    assert torch.equal(load(data)["x"], tensors["x"])
    assert int.from_bytes(data[:8], "little") % 8 == 0
