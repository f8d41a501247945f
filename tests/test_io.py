"""Crash-safe writes: the old file survives a failed write; new files get the usual permissions."""

import os
from pathlib import Path

import pytest

from nse_hub.io import atomic_directory, atomic_path, atomic_write_text


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
        with atomic_directory(tmp_path / "adapter") as folder:
            (folder / "weights").write_text("w")
    finally:
        os.umask(previous)
    assert (tmp_path / "card.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
