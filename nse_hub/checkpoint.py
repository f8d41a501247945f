"""The folder layout of a saved edit (identical locally and on the Hub).

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
                                                      statistics reference, number of rounds, and
                                                      the evaluations recorded for each version, and
                                                      the lineage (branch point, merged rounds)

Saving writes the new round folders first, then the root files, ``session.json`` last, and removes
round folders beyond the saved version only after that; every file is replaced atomically. A save
that stops half-way leaves the previous one readable through ``session.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from nse_hub.adapters import ADAPTER_WEIGHTS, no_update, read_adapter, save_adapter
from nse_hub.algorithm.lifelong import FeatureStats, stats_from_tensors, stats_to_tensors
from nse_hub.architectures import ModelLayout
from nse_hub.base import BaseModelInfo
from nse_hub.config import EditConfig
from nse_hub.deltas import Factors
from nse_hub.errors import AdapterError, CheckpointError
from nse_hub.io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text
from nse_hub.report import RoundReport

# 2: methods memit (classic) and memit_seq; lossy-adapter record. Later additions are optional (older readers
# ignore them, this one reads files without them): "lineage" in session.json, rounds/NNN/values.safetensors,
# rounds/NNN/lifelong.safetensors (UltraEdit).
FORMAT_VERSION = 2
LEGACY_MEMIT = "memit_seq"
SESSION_FILE = "nse_session/session.json"
MANIFEST_FILE = "edits.jsonl"
CARD_FILE = "README.md"
ROUNDS_DIR = "rounds"
KEYS_FILE = "keys.safetensors"
REPORT_FILE = "report.json"
VALUES_FILE = "values.safetensors"
LIFELONG_FILE = "lifelong.safetensors"


def round_dir(index: int) -> str:
    return f"{ROUNDS_DIR}/{index:03d}"


@dataclass
class SessionMeta:
    """Everything in ``session.json``."""

    base: BaseModelInfo
    config: EditConfig
    context_templates: list[list[str]]
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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "nse_hub_version": self.nse_hub_version, "rounds": self.rounds,
                "base": asdict(self.base), "config": self.config.to_dict(),
                "context_templates": self.context_templates, "stats": self.stats,
                "evaluations": self.evaluations, "adapter": self.adapter,
                **({"lineage": self.lineage} if self.lineage else {}),
                **({"engine": self.engine} if self.engine else {}), **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionMeta:
        known = {"format", "nse_hub_version", "rounds", "base", "config", "context_templates", "stats",
                 "evaluations", "adapter", "lineage", "engine"}
        saved_format = int(data.get("format", 1))
        if saved_format > FORMAT_VERSION:
            raise CheckpointError(f"this edit was saved in format {saved_format} by nse-hub "
                                  f"{data.get('nse_hub_version', '?')}, newer than this nse-hub reads "
                                  f"({FORMAT_VERSION}): upgrade with `pip install -U nse-hub`")
        config = dict(data["config"])
        if saved_format < 2 and config.get("method") == "memit":
            config["method"] = LEGACY_MEMIT  # format 1's "memit" added the key memory: sequential MEMIT
        return cls(base=BaseModelInfo(**data["base"]), config=EditConfig.from_dict(config),
                   context_templates=data["context_templates"], stats=data["stats"], rounds=int(data["rounds"]),
                   nse_hub_version=data.get("nse_hub_version", ""), format=FORMAT_VERSION,
                   evaluations=dict(data.get("evaluations", {})), adapter=dict(data.get("adapter", {})),
                   lineage=dict(data.get("lineage") or {}), engine=dict(data.get("engine") or {}),
                   extra={k: v for k, v in data.items() if k not in known})


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


def write_checkpoint(folder: str | Path, layout: ModelLayout, meta: SessionMeta, rounds: list[RoundData],
                     cumulative: dict[int, Factors], card: str | None = None,
                     adapter_metadata: dict[str, Any] | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Write (or update) a saved edit at version ``len(rounds)``.

    Args:
        folder: the target folder; an earlier save in it is updated in place, crash-safely.
        layout: the model's layout (for module names).
        meta: ``session.json``'s content; ``meta.rounds`` must equal ``len(rounds)``.
        rounds: every round up to the saved version.
        cumulative: the stored form of the cumulative delta (see :func:`nse_hub.adapters.pack`).
        card: the model card text.
        adapter_metadata: extra entries for the adapters' safetensors headers.
        tokenizer: saved beside the adapter, so that ``AutoTokenizer.from_pretrained(folder)`` works.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = meta.base
    header = {"base_model": base.portable_id, "module_sha256": base.module_sha256, **(adapter_metadata or {})}
    first_layer = meta.config.layers[0]
    for index, data in enumerate(rounds, start=1):
        target = folder / round_dir(index)
        if _round_is_current(target, data):
            continue
        with atomic_directory(target) as tmp:
            save_adapter(tmp, layout, data.factors or no_update(layout, first_layer), base.portable_id,
                         base.revision, {**header, "round": index, "increment": True})
            save_file({f"layer_{layer}": k.contiguous() for layer, k in data.keys.items()}, str(tmp / KEYS_FILE))
            atomic_write_json(tmp / REPORT_FILE, data.report.to_dict())
            if data.values is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in data.values.items()}, str(tmp / VALUES_FILE))
            if data.lifelong is not None:
                save_file(stats_to_tensors(data.lifelong), str(tmp / LIFELONG_FILE))
    save_adapter(folder, layout, cumulative or no_update(layout, first_layer), base.portable_id, base.revision,
                 {**header, "round": len(rounds), "increment": False})
    if tokenizer is not None:
        save_tokenizer(folder, tokenizer)
    atomic_write_text(folder / MANIFEST_FILE, manifest_lines([d.report for d in rounds]))
    write_metadata(folder, meta, card)
    rounds_root = folder / ROUNDS_DIR
    for stale in sorted(rounds_root.iterdir()) if rounds_root.is_dir() else []:
        if stale.name.isdigit() and int(stale.name) > len(rounds):
            shutil.rmtree(stale)


def write_metadata(folder: str | Path, meta: SessionMeta, card: str | None = None) -> None:
    """Write the card and ``session.json`` of a saved edit, and nothing else (recording new figures)."""
    folder = Path(folder)
    if card is not None:
        atomic_write_text(folder / CARD_FILE, card)
    atomic_write_json(folder / SESSION_FILE, meta.to_dict())


def save_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer's files in ``folder``, each replaced atomically and only when its content changed."""
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=folder) as tmp:
        tokenizer.save_pretrained(tmp)
        for written in sorted(Path(tmp).iterdir()):
            if written.is_file():
                atomic_write_bytes(folder / written.name, written.read_bytes())


def _round_is_current(target: Path, data: RoundData) -> bool:
    """A round folder already holding this round (same report) is left as it is."""
    report = target / REPORT_FILE
    if not (report.is_file() and (target / ADAPTER_WEIGHTS).is_file() and (target / KEYS_FILE).is_file()):
        return False
    if data.values is not None and not (target / VALUES_FILE).is_file():
        return False  # values known now but not saved then: write the round again
    if data.lifelong is not None and not (target / LIFELONG_FILE).is_file():
        return False
    try:
        return json.loads(report.read_text()) == json.loads(json.dumps(data.report.to_dict()))
    except json.JSONDecodeError:
        return False


def read_meta(folder: str | Path) -> SessionMeta:
    path = Path(folder) / SESSION_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a saved nse-hub edit: {SESSION_FILE} is missing")
    try:
        return SessionMeta.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); restore it from a backup or the Hub") from None


def read_round(folder: str | Path, layout: ModelLayout, index: int) -> RoundData:
    path = Path(folder) / round_dir(index)
    try:
        factors, _ = read_adapter(path, layout)
    except AdapterError as error:
        raise CheckpointError(str(error)) from None
    try:
        keys = {int(name.split("_")[1]): k for name, k in load_file(str(path / KEYS_FILE)).items()}
        report = RoundReport.from_dict(json.loads((path / REPORT_FILE).read_text()))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is incomplete: {Path(error.filename).name} is missing") from None
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); restore it from a backup or the Hub") from None
    return RoundData(factors, keys, report, read_values(path), read_lifelong(path))


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
