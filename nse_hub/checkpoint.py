"""The folder layout of a saved edit (identical locally and on the Hub), and how it is written and read.

::

    adapter_config.json, adapter_model.safetensors   cumulative adapter of the latest round (stock PEFT)
    README.md                                         model card
    edits.jsonl                                       manifest: one line per edit request
    rounds/001/adapter_config.json, …safetensors      each round's increment as its own adapter
    rounds/001/keys.safetensors                       that round's key memory contribution
    rounds/001/report.json                            that round's RoundReport
    rounds/001/values.safetensors                     that round's value targets (optional; NSE's are
                                                      reused when the round is merged into another history)
    rounds/001/lifelong.safetensors                   UltraEdit: the statistics of that round's editing
                                                      features per layer (count, mean, squared deviations);
                                                      the lifelong normalization combines them in order
    nse_session/session.json                          base model, hyperparameters, context templates,
                                                      statistics reference, number of rounds, the
                                                      evaluations recorded for each version, the lineage
                                                      (branch point, merged rounds), and the sha256 of
                                                      every other file but the card

A save is one :class:`~nse_hub.io.FolderTransaction` under the folder's lock: only files whose bytes change are
staged, and a kill at any step leaves the previous version or the new one (the next open finishes or discards
what was left). Every read holds the same lock, so a reader never sees half a save, and checks each file it
uses against the sha256 in ``session.json``. A writer refuses to replace a history that another writer saved
since this session last read or wrote the folder (:class:`~nse_hub.errors.ConcurrentWriteError`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import PreTrainedTokenizerBase

from nse_hub.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_files, no_update, read_adapter
from nse_hub.algorithm.lifelong import FeatureStats, stats_from_tensors, stats_to_tensors
from nse_hub.architectures import ModelLayout
from nse_hub.base import BaseModelInfo
from nse_hub.config import EditConfig
from nse_hub.deltas import Factors
from nse_hub.errors import AdapterError, CheckpointError, ConcurrentWriteError
from nse_hub.io import (
    FolderTransaction,
    canonical_safetensors,
    file_sha256,
    folder_lock,
    json_text,
    recover_folder,
    sha256_bytes,
)
from nse_hub.report import RoundReport

logger = logging.getLogger(__name__)

# 2: methods memit (classic) and memit_seq; lossy-adapter record. 3: session.json lists the sha256 of every file
# (``files``), which readers check; saves are transactions. Later additions are optional (older readers ignore
# them): "lineage" and "engine" in session.json, rounds/NNN/values.safetensors, rounds/NNN/lifelong.safetensors
# (UltraEdit).
FORMAT_VERSION = 3
LEGACY_MEMIT = "memit_seq"
SESSION_FILE = "nse_session/session.json"
MANIFEST_FILE = "edits.jsonl"
CARD_FILE = "README.md"
ROUNDS_DIR = "rounds"
KEYS_FILE = "keys.safetensors"
REPORT_FILE = "report.json"
VALUES_FILE = "values.safetensors"
LIFELONG_FILE = "lifelong.safetensors"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_ROUND_FOLDER = re.compile(r"^\d{3,}$")


def round_dir(index: int) -> str:
    return f"{ROUNDS_DIR}/{index:03d}"


@dataclass
class SessionMeta:
    """Everything in ``session.json``."""

    base: BaseModelInfo
    config: EditConfig
    context_templates: list[list[str]] | None
    stats: dict[str, Any]
    rounds: int
    nse_hub_version: str = ""
    format: int = FORMAT_VERSION
    evaluations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)  # {"lossy": bool, "modules": [CompressionReport …]}
    # Where this history comes from: {"parent": {...}, "merges": [...]} (see nse_hub.lineage); {} for none.
    lineage: dict[str, Any] = field(default_factory=dict)
    # What the engine measured once and must keep: {"norm_anchor": float} with NAS norm anchoring.
    engine: dict[str, Any] = field(default_factory=dict)
    # sha256 of every file of the saved edit but session.json and the card, by path in the folder.
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # sha256 of session.json as read or written (which state of the folder this is); not saved.
    digest: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "nse_hub_version": self.nse_hub_version, "rounds": self.rounds,
                "base": asdict(self.base), "config": self.config.to_dict(),
                "context_templates": self.context_templates, "stats": self.stats,
                "evaluations": self.evaluations, "adapter": self.adapter,
                **({"lineage": self.lineage} if self.lineage else {}),
                **({"engine": self.engine} if self.engine else {}),
                "files": dict(sorted(self.files.items())), **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionMeta:
        """Parse ``session.json``'s content.

        Raises:
            CheckpointError: a newer format, a missing entry or an entry of the wrong type (named).
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"{SESSION_FILE} must hold a JSON object, not {type(data).__name__}")
        known = {"format", "nse_hub_version", "rounds", "base", "config", "context_templates", "stats",
                 "evaluations", "adapter", "lineage", "engine", "files"}
        saved_format = _typed(data, "format", int, default=1)
        if saved_format > FORMAT_VERSION:
            raise CheckpointError(f"this edit was saved in format {saved_format} by nse-hub "
                                  f"{data.get('nse_hub_version', '?')}, newer than this nse-hub reads "
                                  f"({FORMAT_VERSION}): upgrade with `pip install -U nse-hub`")
        config = dict(_typed(data, "config", dict))
        if saved_format < 2 and config.get("method") == "memit":
            config["method"] = LEGACY_MEMIT  # format 1's "memit" added the key memory: sequential MEMIT
        base = _typed(data, "base", dict)
        try:
            base_info = BaseModelInfo(**base)
            edit_config = EditConfig.from_dict(config)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{SESSION_FILE}: {error}") from None
        return cls(base=base_info, config=edit_config,
                   context_templates=_typed(data, "context_templates", list, default=None),
                   stats=_typed(data, "stats", dict), rounds=_typed(data, "rounds", int),
                   nse_hub_version=str(data.get("nse_hub_version", "")), format=saved_format,
                   evaluations=dict(_typed(data, "evaluations", dict, default={})),
                   adapter=dict(_typed(data, "adapter", dict, default={})),
                   lineage=dict(_typed(data, "lineage", dict, default={}) or {}),
                   engine=dict(_typed(data, "engine", dict, default={}) or {}),
                   files=dict(_typed(data, "files", dict, default={})),
                   extra={k: v for k, v in data.items() if k not in known})


def _typed(data: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """``data[key]``, which must be a ``kind`` (``bool`` is no ``int``)."""
    if key not in data or (data[key] is None and default is not ...):
        if default is ...:
            raise CheckpointError(f"{SESSION_FILE} has no {key!r} entry")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{SESSION_FILE}: {key!r} must be a {kind.__name__}, not {type(value).__name__} "
                              f"({json.dumps(value)[:60]})")
    return value


@dataclass
class RoundData:
    """One round as saved: its increment, its keys, its report and (when known) its value targets.

    ``values`` holds tensors ``targets`` and ``hidden`` (``n × d_model``) and ``loss``, ``nll``, ``steps``
    (``n``): the round's :class:`~nse_hub.algorithm.ValueResult`; ``None`` for rounds saved without them.
    ``lifelong``: UltraEdit's statistics of the round's editing features per layer; ``None`` for other methods.
    """

    factors: dict[int, Factors]
    keys: dict[int, torch.Tensor]
    report: RoundReport
    values: dict[str, torch.Tensor] | None = None
    lifelong: dict[int, FeatureStats] | None = None


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / SESSION_FILE).is_file()


def manifest_lines(reports: list[RoundReport]) -> str:
    lines = []
    for report in reports:
        for r in report.requests:
            lines.append(json.dumps({
                "round": report.round, "method": report.method, **r.request.to_dict(),
                "p_new_before": r.p_new_before, "p_new_after": r.p_new_after,
                "p_true_before": r.p_true_before, "p_true_after": r.p_true_after,
                "success_after": r.success_after,
            }, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


# --- writing ------------------------------------------------------------------------------------------------


def write_checkpoint(folder: str | Path, layout: ModelLayout, meta: SessionMeta, rounds: list[RoundData],
                     cumulative: dict[int, Factors], card: str | None = None,
                     adapter_metadata: dict[str, Any] | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None, known_digest: str | None = None) -> str:
    """Write (or update) a saved edit at version ``len(rounds)``, as one transaction.

    Args:
        folder: the target folder; an earlier save in it is updated, writing only the files that change.
        layout: the model's layout (for module names).
        meta: ``session.json``'s content; ``meta.rounds`` must equal ``len(rounds)``. Its ``files`` are filled in.
        rounds: every round up to the saved version.
        cumulative: the stored form of the cumulative delta (see :func:`nse_hub.adapters.pack`).
        card: the model card text.
        adapter_metadata: extra entries for the adapters' safetensors headers.
        tokenizer: saved beside the adapter, so that ``AutoTokenizer.from_pretrained(folder)`` works.
        known_digest: the ``session.json`` digest of the folder as this writer last read or wrote it.

    Returns:
        the digest of the new ``session.json``.

    Raises:
        ConcurrentWriteError: the folder holds a history that is neither this one's past nor what this writer
            last saw there (another writer saved since).
        CheckpointError: the folder cannot be written (disk full, read-only, …); the previous version is intact.
    """
    folder = Path(folder)
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder):
            current = _open_current(folder)
            _check_not_overwriting(folder, current, [d.report for d in rounds], known_digest)
            with FolderTransaction(folder) as transaction:
                files: dict[str, str] = {}
                old = current.files if current is not None else {}
                for index, data in enumerate(rounds, start=1):
                    files.update(_stage_round(transaction, folder, layout, meta, index, data, old, adapter_metadata))
                header = _adapter_header(meta, adapter_metadata)
                root = adapter_files(layout, cumulative or no_update(layout, meta.config.layers[0]),
                                     meta.base.portable_id, meta.base.revision,
                                     {**header, "round": len(rounds), "increment": False})
                if tokenizer is not None:
                    root.update(tokenizer_files(tokenizer))
                root[MANIFEST_FILE] = manifest_lines([d.report for d in rounds]).encode("utf-8")
                for name, data in root.items():
                    files[name] = _stage_if_changed(transaction, folder, name, data)
                meta.files = files
                session = _stage_metadata(transaction, folder, meta, card)
                for stale in _round_folders(folder):
                    if int(stale.name) > len(rounds):
                        transaction.delete(f"{ROUNDS_DIR}/{stale.name}")
        meta.digest = sha256_bytes(session)
        return meta.digest


def write_metadata(folder: str | Path, meta: SessionMeta, card: str | None = None,
                   known_digest: str | None = None) -> str:
    """Rewrite only the card and ``session.json`` of a saved edit (recording new figures); returns the digest.

    ``meta.files`` is taken from the saved ``session.json``: the adapters and rounds stay as they are.
    """
    folder = Path(folder)
    with _writing(folder), folder_lock(folder):
        current = _open_current(folder)
        if current is None:
            raise CheckpointError(f"{folder} is not a saved nse-hub edit: {SESSION_FILE} is missing")
        if known_digest is not None and current.digest != known_digest:
            raise ConcurrentWriteError(f"{folder} was saved by another writer since this session read it; "
                                       "load it again before recording figures into it")
        meta.files = dict(current.files)
        with FolderTransaction(folder) as transaction:
            session = _stage_metadata(transaction, folder, meta, card)
    meta.digest = sha256_bytes(session)
    return meta.digest


@contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """Turn the operating system's refusals (disk full, read-only, no permission) into one clear error."""
    try:
        yield
    except OSError as error:
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(error.errno)
        if reason is None:
            raise
        where = f" ({error.filename})" if error.filename else ""
        raise CheckpointError(f"could not save to {folder}: {reason}{where}; the previous version there is intact. "
                              "Free space or fix the permissions and save again, or save to another folder") from None


def _adapter_header(meta: SessionMeta, adapter_metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {"base_model": meta.base.portable_id, "module_sha256": meta.base.module_sha256, **(adapter_metadata or {})}


def round_files(layout: ModelLayout, meta: SessionMeta, index: int, data: RoundData,
                adapter_metadata: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files of round ``index``'s folder, by name."""
    header = {**_adapter_header(meta, adapter_metadata), "round": index, "increment": True}
    files = adapter_files(layout, data.factors or no_update(layout, meta.config.layers[0]), meta.base.portable_id,
                          meta.base.revision, header)
    files[KEYS_FILE] = save_tensors({f"layer_{layer}": k for layer, k in data.keys.items()})
    files[REPORT_FILE] = data.report.saved_json()
    if data.values is not None:
        files[VALUES_FILE] = save_tensors(data.values)
    if data.lifelong is not None:
        files[LIFELONG_FILE] = save_tensors(stats_to_tensors(data.lifelong))
    return files


def save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return canonical_safetensors(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def _stage_round(transaction: FolderTransaction, folder: Path, layout: ModelLayout, meta: SessionMeta, index: int,
                 data: RoundData, old: dict[str, str], adapter_metadata: dict[str, Any] | None) -> dict[str, str]:
    """Stage round ``index``'s folder unless the saved one is this round already; returns its files' sha256."""
    prefix = round_dir(index) + "/"
    saved = {path: sha for path, sha in old.items() if path.startswith(prefix)}
    report = sha256_bytes(data.report.saved_json())
    names = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, KEYS_FILE, REPORT_FILE} | ({VALUES_FILE} if data.values else set()) \
        | ({LIFELONG_FILE} if data.lifelong is not None else set())
    if saved.get(prefix + REPORT_FILE) == report and set(saved) == {prefix + n for n in names} \
            and all((folder / path).is_file() for path in saved):
        return saved  # the same round, already complete (a report is unique to its round)
    files = round_files(layout, meta, index, data, adapter_metadata)
    staged = transaction.folder_path(round_dir(index))
    for name, content in files.items():
        (staged / name).write_bytes(content)
    return {prefix + name: sha256_bytes(content) for name, content in files.items()}


def _stage_metadata(transaction: FolderTransaction, folder: Path, meta: SessionMeta, card: str | None) -> bytes:
    """Stage the card (when given) and ``session.json``; returns ``session.json``'s bytes."""
    if card is not None:
        _stage_if_changed(transaction, folder, CARD_FILE, card.encode("utf-8"))
    session = json_text(meta.to_dict()).encode("utf-8")
    _stage_if_changed(transaction, folder, SESSION_FILE, session)
    return session


def _stage_if_changed(transaction: FolderTransaction, folder: Path, relpath: str, data: bytes) -> str:
    live = folder / relpath
    if not (live.is_file() and live.stat().st_size == len(data) and live.read_bytes() == data):
        transaction.write(relpath, data)
    return sha256_bytes(data)


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name."""
    with tempfile.TemporaryDirectory(prefix="nse-hub-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _round_folders(folder: Path) -> list[Path]:
    root = folder / ROUNDS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir() and _ROUND_FOLDER.match(p.name)) if root.is_dir() else []


def _open_current(folder: Path) -> SessionMeta | None:
    """The saved edit in ``folder`` as it stands (after finishing an interrupted save), or ``None``."""
    recover_checkpoint(folder)
    return read_meta(folder) if is_checkpoint(folder) else None


def check_writable(folder: str | Path, reports: list[RoundReport], known_digest: str | None = None) -> None:
    """Raise now the :class:`ConcurrentWriteError` that :func:`write_checkpoint` would raise for a writer with
    history ``reports`` (rounds it adds later continue it), so that a caller can refuse before its edits, not
    after them. Reads only ``session.json``."""
    folder = Path(folder)
    _check_not_overwriting(folder, _open_current(folder), reports, known_digest)


def _check_not_overwriting(folder: Path, current: SessionMeta | None, reports: list[RoundReport],
                           known_digest: str | None) -> None:
    """Refuse to replace a history this writer has not seen (another writer's save would be lost silently)."""
    if current is None or (known_digest is not None and current.digest == known_digest):
        return
    if current.rounds <= len(reports):
        saved = [_read_report(folder, current, i) for i in range(1, current.rounds + 1)]
        if same_history(saved, reports[:current.rounds]):
            return  # our history continues the saved one
    raise ConcurrentWriteError(
        f"{folder} holds a saved edit ({current.rounds} rounds) that is not this session's history and that it has "
        "not read: another session or process saved there. Nothing was written. Save to another folder, or load "
        f"{folder} and continue from it")


def same_history(a: list[RoundReport], b: list[RoundReport]) -> bool:
    """Whether two lists of rounds are the same rounds (reports are unique to their round)."""
    return len(a) == len(b) and all(json.dumps(x.to_dict()) == json.dumps(y.to_dict()) for x, y in zip(a, b))


def recover_checkpoint(folder: str | Path) -> None:
    """Finish or discard a save that a killed process left in ``folder`` (hold its lock).

    Also cleans what nse-hub before 0.2 could leave: a round folder moved aside as ``rounds/.NNN.old-PID`` is
    put back when its place is empty, and temporary ``.*.tmp`` files are removed.
    """
    folder = Path(folder)
    outcome = recover_folder(folder)
    if outcome:
        logger.warning("%s: an interrupted save was %s", folder, outcome)
    rounds = folder / ROUNDS_DIR
    for leftover in sorted(rounds.glob(".*.old-*")) if rounds.is_dir() else []:
        original = rounds / leftover.name[1:].split(".old-")[0]
        if not original.exists():
            os.replace(leftover, original)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for temporary in [*folder.glob(".*.tmp"), *(rounds.glob(".*.tmp") if rounds.is_dir() else [])]:
        shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)


# --- reading ------------------------------------------------------------------------------------------------


def read_meta(folder: str | Path, downloaded: bool = False) -> SessionMeta:
    """``session.json`` of a saved edit, checked: types, fingerprints, file names and the rounds on disk.

    Args:
        folder: the saved edit.
        downloaded: it came from the Hub (or anyone else): it may not name local files to read.

    Raises:
        CheckpointError: the folder is no saved edit, or ``session.json`` is damaged or inconsistent (the reason
            is named).
    """
    folder = Path(folder)
    path = folder / SESSION_FILE
    with folder_lock(folder) if folder.is_dir() else nullcontext(False) as locked:
        if locked:
            recover_checkpoint(folder)
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a saved nse-hub edit: {SESSION_FILE} is missing")
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is damaged ({error}); restore it from a backup or the Hub") from None
        try:
            meta = SessionMeta.from_dict(data)
        except CheckpointError as error:
            raise CheckpointError(f"{path} is invalid: {error}; restore it from a backup or the Hub") from None
        meta.digest = sha256_bytes(raw)
        problems = meta_problems(meta, downloaded) + _rounds_on_disk_problems(folder, meta)
        if problems:
            raise CheckpointError(f"{path} is invalid: " + "; ".join(problems) + ". Restore it from a backup or "
                                  "the Hub")
        return meta


def meta_problems(meta: SessionMeta, downloaded: bool = False) -> list[str]:
    """What is wrong with a parsed ``session.json`` (empty when nothing is)."""
    out = []
    if meta.rounds < 0:
        out.append(f"rounds must be 0 or more, got {meta.rounds}")
    base = meta.base
    if base.model_sha256 and not _HEX64.match(str(base.model_sha256)):
        out.append("base.model_sha256 must be a sha256 (64 hexadecimal digits)")
    modules = base.module_sha256 if isinstance(base.module_sha256, dict) else {}
    if len(modules) != len(meta.config.layers):
        out.append(f"base.module_sha256 must fingerprint each of the {len(meta.config.layers)} edited modules, has "
                   f"{len(modules)} (without it the wrong-base guard is off)")
    for name, sha in modules.items():
        if not _MODULE_NAME.match(str(name)) or not _HEX64.match(str(sha)):
            out.append(f"base.module_sha256 entry {str(name)[:60]!r} is not a module name with a sha256")
    for name, sha in (meta.stats.get("sha256") or {}).items():
        if not _HEX64.match(str(sha)):
            out.append(f"stats.sha256 entry {str(name)[:60]!r} is not a sha256")
    if meta.stats.get("model_sha256") and not _HEX64.match(str(meta.stats["model_sha256"])):
        out.append("stats.model_sha256 must be a sha256")
    for relpath, sha in meta.files.items():
        if not _safe_relpath(relpath) or not _HEX64.match(str(sha)):
            out.append(f"files entry {str(relpath)[:80]!r} is not a path inside the folder with a sha256")
    if meta.format >= 3 and meta.rounds and not meta.files:
        out.append("files is empty: the checksums of the adapters are missing")
    if not all(isinstance(t, list) and all(isinstance(x, str) for x in t) for t in meta.context_templates or []):
        out.append("context_templates must be lists of strings")
    if downloaded and _names_local_data(meta.config.mom2_dataset):
        out.append(f"config.mom2_dataset {meta.config.mom2_dataset!r} names a local path, which a downloaded edit may "
                   "not read; pass mom2_dataset yourself by starting a session on the base model")
    return out


def _safe_relpath(relpath: str) -> bool:
    parts = Path(relpath).parts
    return bool(parts) and not Path(relpath).is_absolute() and ".." not in parts and "\\" not in relpath \
        and parts[0] != ".nse-hub-txn"


def _names_local_data(name: str) -> bool:
    return name != "model" and (name.startswith(("/", "~", ".")) or ".." in Path(name).parts
                                or Path(name).expanduser().exists())


def _rounds_on_disk_problems(folder: Path, meta: SessionMeta) -> list[str]:
    if meta.format < 3:
        return []
    extra = [p.name for p in _round_folders(folder) if int(p.name) > meta.rounds or int(p.name) == 0]
    return [f"{ROUNDS_DIR}/ holds round(s) {', '.join(extra)} beyond the {meta.rounds} it records"] if extra else []


def verify_files(folder: str | Path, meta: SessionMeta, paths: Iterable[str] | None = None) -> None:
    """Check files of a saved edit against the sha256 in its ``session.json`` (all of them by default).

    Saved edits older than format 3 record no checksums and are not checked.

    Raises:
        CheckpointError: a file is missing, not listed, or differs from what was saved (named).
    """
    if meta.format < 3:
        return
    folder = Path(folder)
    for relpath in sorted(meta.files) if paths is None else paths:
        expected = meta.files.get(relpath)
        path = folder / relpath
        if expected is None:
            raise CheckpointError(f"{path} is not listed in {SESSION_FILE}: the saved edit is incomplete or was "
                                  "assembled by hand; restore it from a backup or the Hub")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; restore it from a backup or download that version again")
        actual = file_sha256(path)
        if actual != expected:
            raise CheckpointError(f"{path} does not match its checksum in {SESSION_FILE} (sha256 {actual[:12]}…, "
                                  f"saved {expected[:12]}…): it was changed, truncated or replaced after saving. "
                                  "Restore it from a backup or download that version again")


def round_paths(meta: SessionMeta, index: int) -> list[str]:
    """The files of round ``index`` that ``session.json`` lists."""
    prefix = round_dir(index) + "/"
    return sorted(p for p in meta.files if p.startswith(prefix))


def _read_report(folder: Path, meta: SessionMeta, index: int) -> RoundReport:
    relpath = f"{round_dir(index)}/{REPORT_FILE}"
    path = folder / relpath
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the saved edit {folder} is incomplete; restore it from a backup "
                              "or the Hub")
    verify_files(folder, meta, [relpath])
    try:
        report = RoundReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); restore it from a backup or the Hub") from None
    method = LEGACY_MEMIT if meta.format < 2 and report.method == "memit" else report.method
    if method != meta.config.method:
        raise CheckpointError(f"{path} is a {report.method!r} round, but {SESSION_FILE} says the edit uses "
                              f"{meta.config.method!r}: the folder mixes two saved edits; restore it from a backup")
    if report.round != index:
        raise CheckpointError(f"{path} reports round {report.round}, not {index}: the folder mixes two saved edits")
    return report


def read_reports(folder: str | Path, meta: SessionMeta, version: int) -> list[RoundReport]:
    """The reports of rounds ``1..version`` (checked against ``session.json``)."""
    return [_read_report(Path(folder), meta, index) for index in range(1, version + 1)]


def read_round(folder: str | Path, layout: ModelLayout, index: int, meta: SessionMeta) -> RoundData:
    folder = Path(folder)
    path = folder / round_dir(index)
    report = _read_report(folder, meta, index)
    if meta.format >= 3:
        names = {p.rsplit("/", 1)[1] for p in round_paths(meta, index)}
        missing = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, KEYS_FILE} - names
        if missing:
            raise CheckpointError(f"{SESSION_FILE} lists no {', '.join(sorted(missing))} for {path}: the saved edit is "
                                  "damaged; restore it from a backup or the Hub")
        verify_files(folder, meta, round_paths(meta, index))
    try:
        factors, _ = read_adapter(path, layout)
    except AdapterError as error:
        raise CheckpointError(str(error)) from None
    keys_path = path / KEYS_FILE
    if not keys_path.is_file():
        raise CheckpointError(f"{path} is incomplete: {KEYS_FILE} is missing; restore it from a backup or the Hub")
    try:
        keys = {int(name.split("_")[1]): k for name, k in load_file(str(keys_path)).items()}
    except (SafetensorError, OSError, IndexError, ValueError) as error:
        raise CheckpointError(f"{keys_path} is damaged ({error}); restore it from a backup or the Hub") from None
    values = read_values(path)
    lifelong = read_lifelong(path)
    for name, tensor in [*((f"{KEYS_FILE} layer {k}", v) for k, v in keys.items()),
                         *((f"{VALUES_FILE} {k}", v) for k, v in (values or {}).items())]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values; the file is damaged: restore it "
                                  "from a backup or the Hub")
    return RoundData(factors, keys, report, values, lifelong)


def read_values(round_folder: str | Path) -> dict[str, torch.Tensor] | None:
    """A round folder's stored value targets, or ``None`` when it has none (saved before they were stored)."""
    path = Path(round_folder) / VALUES_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); restore it from a backup or the Hub") from None


def read_lifelong(round_folder: str | Path) -> dict[int, FeatureStats] | None:
    """A round folder's UltraEdit feature statistics, or ``None`` when it has none (other methods)."""
    path = Path(round_folder) / LIFELONG_FILE
    if not path.is_file():
        return None
    try:
        return stats_from_tensors(load_file(str(path)))
    except (SafetensorError, OSError, KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); restore it from a backup or the Hub") from None
