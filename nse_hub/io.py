"""Crash-safe writes: a reader sees the old file or the new one, never half of either.

Single files are replaced in one rename (:func:`atomic_path`). A saved edit, which is many files, is changed
through a :class:`FolderTransaction`: every new file is staged inside the folder, a journal naming them is written
in one rename (the commit point), then the staged files are moved into place. Whoever opens the folder next under
its lock (:func:`folder_lock`) finishes a committed transaction or throws away an uncommitted one
(:func:`recover_folder`), so a kill at any step leaves the previous version or the new one, never a mix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from nse_hub.errors import CheckpointError

LOCK_FILE = ".nse-hub.lock"
TXN_DIR = ".nse-hub-txn"
#: What a saved edit's folder holds besides the edit itself (never uploaded).
WORK_FILES = (LOCK_FILE, f"{TXN_DIR}/*")
_JOURNAL = "journal.json"
_STAGE = "stage"
_TRASH = "trash"
LOCK_TIMEOUT_ENV = "NSE_HUB_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> bool:
    """Replace ``path`` with ``data`` atomically; a file that already holds ``data`` is left untouched.

    Returns whether the file was written.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def atomic_write_text(path: str | Path, text: str) -> bool:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data: Any) -> str:
    """How nse-hub writes JSON files: indented, UTF-8, keys in the order given, one final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def atomic_write_json(path: str | Path, data: Any) -> bool:
    return atomic_write_text(path, json_text(data))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    ``safetensors`` writes the ``__metadata__`` entries from a hash map, in an order that changes from one
    process to the next; sorting them makes saving the same tensors give the same bytes (pushes then commit
    only what really changed).
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__")
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data that follows stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


# --- the folder lock -----------------------------------------------------------------------------------------

_locks: dict[tuple[int, Path], FileLock] = {}  # per process: a forked child needs its own
_locks_guard = threading.Lock()


def lock_timeout() -> float:
    """Seconds a save waits for another process's save of the same folder (``NSE_HUB_LOCK_TIMEOUT``, default 60)."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        raise CheckpointError(f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds; set it to e.g. 60") from None


@contextmanager
def folder_lock(folder: str | Path, timeout: float | None = None) -> Iterator[bool]:
    """Hold ``folder``'s lock (a ``.nse-hub.lock`` file in it): one process at a time reads or writes it.

    Re-entrant within a process. A folder nobody may write to (a read-only copy) is read without the lock:
    no one can be changing it. Yields whether the lock is held.

    Raises:
        CheckpointError: another process held the lock for longer than ``timeout`` seconds.
    """
    folder = Path(folder).resolve()
    timeout = lock_timeout() if timeout is None else timeout
    with _locks_guard:
        lock = _locks.setdefault((os.getpid(), folder), FileLock(folder / LOCK_FILE, timeout=timeout))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise CheckpointError(f"{folder} is being saved or read by another process (its lock {LOCK_FILE} was held "
                              f"for over {timeout:g} s): wait for that process, save to another folder, or raise "
                              f"{LOCK_TIMEOUT_ENV}") from None
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ELOOP):
            raise  # ELOOP: a Hub cache snapshot, whose files are links into the blob store
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


# --- transactions ---------------------------------------------------------------------------------------------


class FolderTransaction:
    """A set of file and folder replacements in one folder that take effect together or not at all.

    Stage new content with :meth:`write` (a file) and :meth:`folder_path` (a whole subfolder, filled by the
    caller), schedule removals with :meth:`delete`, then :meth:`commit` (or use it as a context manager: commit at
    the end of the block, :meth:`abort` on an exception). Until the journal is written nothing in the folder
    changes; after it, :func:`recover_folder` completes the moves if the process dies. Hold :func:`folder_lock`.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.root = self.folder / TXN_DIR
        recover_folder(self.folder)
        self.stage = self.root / _STAGE
        self.stage.mkdir(parents=True)
        self.puts: list[str] = []
        self.deletes: list[str] = []

    def write(self, relpath: str, data: bytes) -> None:
        """Stage ``data`` as the new content of ``relpath``."""
        staged = self.stage / relpath
        staged.parent.mkdir(parents=True, exist_ok=True)
        with open(staged, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.puts.append(relpath)

    def folder_path(self, relpath: str) -> Path:
        """An empty staged folder that replaces ``relpath`` as a whole; fill it before :meth:`commit`."""
        staged = self.stage / relpath
        staged.mkdir(parents=True)
        self.puts.append(relpath)
        return staged

    def delete(self, relpath: str) -> None:
        self.deletes.append(relpath)

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes

    def commit(self) -> None:
        """Write the journal (the commit point), move everything into place, clean up."""
        if self.empty:  # nothing changed: nothing to commit
            self.abort()
            return
        journal = self.root / _JOURNAL
        with atomic_path(journal) as tmp:
            tmp.write_text(json.dumps({"put": self.puts, "delete": self.deletes}))
        _apply(self.folder, json.loads(journal.read_text()))

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FolderTransaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Commit when the block ends normally; throw the staged files away when it raises."""
        if kind is None:
            self.commit()
        else:
            self.abort()


def _apply(folder: Path, journal: dict[str, list[str]]) -> None:
    root = folder / TXN_DIR
    for relpath in journal["put"]:
        staged, live = root / _STAGE / relpath, folder / relpath
        if not staged.exists() and not staged.is_symlink():
            continue  # moved before an interruption
        live.parent.mkdir(parents=True, exist_ok=True)
        if live.is_dir() and not live.is_symlink():
            _to_trash(folder, relpath)
        os.replace(staged, live)
    for relpath in journal["delete"]:
        if (folder / relpath).exists():
            _to_trash(folder, relpath)
    (root / _JOURNAL).unlink()  # done: from here on, a leftover is only trash
    shutil.rmtree(root)


def _to_trash(folder: Path, relpath: str) -> None:
    trash = folder / TXN_DIR / _TRASH / relpath
    if trash.exists():
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder / relpath, trash)


def recover_folder(folder: str | Path) -> str | None:
    """Finish or undo a transaction that a killed process left in ``folder`` (hold its lock).

    Returns ``"completed"``, ``"discarded"`` or ``None`` (nothing was left).
    """
    root = Path(folder) / TXN_DIR
    if not root.is_dir():
        return None
    journal = root / _JOURNAL
    if journal.is_file():
        _apply(Path(folder), json.loads(journal.read_text()))
        return "completed"
    shutil.rmtree(root)
    return "discarded"
