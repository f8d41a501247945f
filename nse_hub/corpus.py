"""Text corpora, as token sequences, for second-moment statistics and perplexity.

A corpus is named by a string:

* ``"model"`` — text sampled from the (unedited) model itself: works offline, for any model;
* a local file, folder or glob of ``.txt``/``.jsonl``/``.json`` files (a ``text`` field per record);
* a folder written by ``datasets``' ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its
  ``train`` split, or its only one), read with ``load_from_disk``;
* a local dataset folder of ``.parquet``/``.arrow``/``.csv`` files (e.g. a downloaded Hub dataset
  repository), read with ``datasets.load_dataset(folder)``;
* anything else is a Hub dataset id, optionally ``id:config`` (``"wikitext:wikitext-103-raw-v1"``),
  streamed with ``datasets`` (offline it works only where ``datasets`` has it cached).

Every kind but ``"model"`` reads the ``text`` field of each record. Sequences can be skipped from the
start (``token_sequences(..., skip=k)``) without producing them again where that is cheap, so that an
interrupted statistics pass resumes where it stopped.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from nse_hub.errors import ConfigError
from nse_hub.tokens import encode, pad_id
from nse_hub.tracing import model_device

# Short openings for model-sampled text: varied enough to cover ordinary prose.
SAMPLE_STARTS = (
    "The", "In", "A", "It", "This", "He", "She", "We", "They", "When", "After", "One", "There", "Many",
    "According to", "During", "Although", "Since", "His", "Her", "Its", "Our", "If", "As",
)

CorpusKind = Literal["model", "files", "disk", "folder", "hub"]

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
DATA_SUFFIXES = (".parquet", ".arrow", ".csv")

# Sampling batch size is fixed (not a setting): it decides which random numbers each sample gets, so
# changing it would change the corpus behind a cached statistics file.
SAMPLING_BATCH = 64


@dataclass(frozen=True)
class Corpus:
    """A parsed corpus name."""

    kind: CorpusKind
    source: str = ""

    @classmethod
    def parse(cls, name: str) -> Corpus:
        if name == "model":
            return cls("model")
        if _saved_dataset(Path(name).expanduser()):
            return cls("disk", name)
        if _local_files(name):
            return cls("files", name)
        if _local_files(name, DATA_SUFFIXES):
            return cls("folder", name)
        if Path(name).expanduser().exists():
            raise ConfigError(f"corpus {name!r} holds no .txt, .json, .jsonl, .parquet, .arrow or .csv files "
                             "and is no dataset saved with save_to_disk")
        return cls("hub", name)

    @property
    def key(self) -> str:
        """A stable name for caches: local data is identified by its content, not its path."""
        if self.kind == "model":
            return "model-samples-v1"  # bump when the sampling procedure changes
        if self.kind == "files":
            return f"files-{_content_digest(_stat_signature(_local_files(self.source)))}"
        if self.kind == "folder":
            return f"folder-{_content_digest(_stat_signature(_local_files(self.source, DATA_SUFFIXES)))}"
        if self.kind == "disk":
            return f"disk-{_saved_fingerprint(Path(self.source).expanduser())}"
        return "hub-" + self.source.replace("/", "--").replace(":", "--")

    def describe(self) -> str:
        return {"model": "text sampled from the unedited model", "files": f"local text files {self.source}",
                "disk": f"dataset saved with save_to_disk at {self.source}",
                "folder": f"local dataset folder {self.source}",
                "hub": f"Hub dataset {self.source}"}[self.kind]


def _stat_signature(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


@functools.lru_cache(maxsize=32)
def _content_digest(signature: tuple[tuple[str, int, int], ...]) -> str:
    """SHA-256 of the files' bytes, in order; computed once per process while the files stay unchanged."""
    digest = hashlib.sha256()
    for name, _size, _mtime in signature:
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
                              or (path / "dataset_dict.json").is_file())


def _saved_split(path: Path) -> Path:
    """The folder of the split that is read: the dataset itself, or a DatasetDict's ``train`` (or only) split."""
    if (path / "state.json").is_file():
        return path
    splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    if "train" not in splits and len(splits) != 1:
        raise ValueError(f"the saved DatasetDict at {path} has splits {splits} and none is called 'train'")
    return path / ("train" if "train" in splits else splits[0])


def _saved_fingerprint(path: Path) -> str:
    """``datasets``' own fingerprint of the saved split: it changes whenever its content does."""
    state = json.loads((_saved_split(path) / "state.json").read_text())
    return str(state.get("_fingerprint") or _content_digest(_stat_signature(
        sorted(p for p in _saved_split(path).iterdir() if p.suffix == ".arrow"))))


def _local_files(name: str, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        pattern = str(path / "**" / "*")
    elif any(c in name for c in "*?["):
        pattern = str(path)
    else:
        return []
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                  if Path(p).is_file() and Path(p).suffix in suffixes)


def _texts_from_files(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        if path.suffix == ".txt":
            for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
                if paragraph.strip():
                    yield paragraph.strip()
            continue
        text = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
        for record in records if isinstance(records, list) else [records]:
            if isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip():
                yield record["text"]
            elif isinstance(record, str) and record.strip():
                yield record


def _texts_from_records(records) -> Iterator[str]:
    if "text" not in (getattr(records, "column_names", None) or ["text"]):
        raise ValueError(f"the dataset has no 'text' column (columns: {records.column_names})")
    for record in records:
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            yield text


def _texts_from_hub(name: str) -> Iterator[str]:
    from datasets import load_dataset

    dataset_id, _, config = name.partition(":")
    yield from _texts_from_records(load_dataset(dataset_id, config or None, split="train", streaming=True))


def _texts_from_folder(name: str) -> Iterator[str]:
    from datasets import load_dataset

    yield from _texts_from_records(load_dataset(str(Path(name).expanduser()), split="train", streaming=True))


def _texts_from_disk(name: str) -> Iterator[str]:
    from datasets import load_from_disk

    yield from _texts_from_records(load_from_disk(str(_saved_split(Path(name).expanduser()))))


def _texts(corpus: Corpus) -> Iterator[str]:
    if corpus.kind == "files":
        return _texts_from_files(_local_files(corpus.source))
    return {"disk": _texts_from_disk, "folder": _texts_from_folder, "hub": _texts_from_hub}[corpus.kind](corpus.source)


def token_sequences(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, n_samples: int, length: int,
                    model: PreTrainedModel | None = None, seed: int = 0, skip: int = 0,
                    progress: bool = False) -> Iterator[list[int]]:
    """Yield up to ``n_samples`` token sequences of at most ``length`` tokens from ``corpus``.

    ``skip``: leave out the first ``skip`` of them (the same sequences as a full run's, from there on);
    model-sampled text is not generated for them, except for the rest of a sampling batch.
    ``progress``: show a bar of the tokens sampled from the model (the slow part of a model corpus).
    """
    if corpus.kind == "model":
        if model is None:
            raise ValueError("a model-sampled corpus needs the model")
        yield from sample_from_model(model, tokenizer, n_samples, length, seed, skip=skip, progress=progress)
        return
    yield from itertools.islice(_text_windows(_texts(corpus), tokenizer, length), skip, n_samples)


def _text_windows(texts: Iterator[str], tokenizer: PreTrainedTokenizerBase, length: int) -> Iterator[list[int]]:
    for text in texts:
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), length):
            window = ids[start:start + length]
            if len(window) < 8 and start > 0:
                break
            yield window


class _TokenBar(BaseStreamer):
    """Advances a progress bar by a batch's rows at every generated token (``generate(streamer=...)``)."""

    def __init__(self, bar: tqdm, rows: int) -> None:
        self.bar, self.rows, self.prompt_seen = bar, rows, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # the first call carries the prompt
            self.bar.update(self.rows)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _sampling_batches(tokenizer: PreTrainedTokenizerBase, n_samples: int, length: int,
                      first: int) -> list[tuple[list[list[int]], int]]:
    """Per sampling batch from sample ``first`` (a batch start) on: its start tokens and the tokens to generate."""
    batches = []
    for made in range(first, n_samples, SAMPLING_BATCH):
        count = min(SAMPLING_BATCH, n_samples - made)
        starts = [encode(tokenizer, SAMPLE_STARTS[(made + i) % len(SAMPLE_STARTS)]) for i in range(count)]
        batches.append((starts, max(1, length - min(len(s) for s in starts))))  # every sample reaches ``length``
    return batches


@torch.no_grad()
def sample_from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_samples: int, length: int,
                      seed: int = 0, skip: int = 0, progress: bool = False) -> Iterator[list[int]]:
    """Sample ``n_samples`` continuations of ``length`` tokens from the model (top-k 50), reproducibly.

    Each sampling batch has its own seed, so ``skip`` starts at the batch holding sample ``skip``.
    ``progress`` shows a bar of the tokens generated.
    """
    device = model_device(model)
    pad = pad_id(tokenizer)
    batch_index = skip // SAMPLING_BATCH
    drop = skip - batch_index * SAMPLING_BATCH
    batches = _sampling_batches(tokenizer, n_samples, length, batch_index * SAMPLING_BATCH)
    with tqdm(total=sum(len(starts) * new for starts, new in batches), desc="sampling text", unit="token",
              disable=not progress, leave=False) as bar:
        for starts, new_tokens in batches:
            yield from _sample_batch(model, starts, new_tokens, length, pad, seed * 100_003 + batch_index, device,
                                     _TokenBar(bar, len(starts)), drop)
            drop = 0
            batch_index += 1


def _sample_batch(model: PreTrainedModel, starts: list[list[int]], new_tokens: int, length: int, pad: int, seed: int,
                  device: torch.device, streamer: BaseStreamer, drop: int) -> Iterator[list[int]]:
    """One sampling batch: left-padded starts, ``new_tokens`` sampled under ``seed``; rows from ``drop`` on."""
    width = max(len(s) for s in starts)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in starts], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in starts], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=50, temperature=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=pad, eos_token_id=None, streamer=streamer,
        )
    for row, start in enumerate(starts):
        if row >= drop:
            yield out[row, width - len(start):].tolist()[:length]
