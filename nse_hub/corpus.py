"""Text corpora, as token sequences, for second-moment statistics and perplexity.

A corpus is named by a string:

* ``"model"`` — text sampled from the (unedited) model itself: works offline, for any model;
* a local file, folder or glob of ``.txt``/``.jsonl``/``.json`` files (a ``text`` field per record);
* anything else is a Hub dataset id, optionally ``id:config`` (``"wikitext:wikitext-103-raw-v1"``),
  streamed with ``datasets``.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.tokens import encode, pad_id

# Short openings for model-sampled text: varied enough to cover ordinary prose.
SAMPLE_STARTS = (
    "The", "In", "A", "It", "This", "He", "She", "We", "They", "When", "After", "One", "There", "Many",
    "According to", "During", "Although", "Since", "His", "Her", "Its", "Our", "If", "As",
)

CorpusKind = Literal["model", "files", "hub"]

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
        if _local_files(name):
            return cls("files", name)
        if Path(name).expanduser().exists():
            raise ValueError(f"corpus {name!r} holds no .txt, .json or .jsonl files")
        return cls("hub", name)

    @property
    def key(self) -> str:
        """A stable name for caches: files are identified by their content, not their path."""
        if self.kind == "model":
            return "model-samples-v1"  # bump when the sampling procedure changes
        if self.kind == "files":
            digest = hashlib.sha256()
            for path in _local_files(self.source):
                digest.update(path.read_bytes())
            return f"files-{digest.hexdigest()[:16]}"
        return "hub-" + self.source.replace("/", "--").replace(":", "--")

    def describe(self) -> str:
        return {"model": "text sampled from the unedited model", "files": f"local text files {self.source}",
                "hub": f"Hub dataset {self.source}"}[self.kind]


def _local_files(name: str) -> list[Path]:
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
                  if Path(p).is_file() and Path(p).suffix in (".txt", ".json", ".jsonl"))


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


def _texts_from_hub(name: str) -> Iterator[str]:
    from datasets import load_dataset

    dataset_id, _, config = name.partition(":")
    dataset = load_dataset(dataset_id, config or None, split="train", streaming=True)
    for record in dataset:
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            yield text


def token_sequences(corpus: Corpus, tokenizer: PreTrainedTokenizerBase, n_samples: int, length: int,
                    model: PreTrainedModel | None = None, seed: int = 0) -> Iterator[list[int]]:
    """Yield up to ``n_samples`` token sequences of at most ``length`` tokens from ``corpus``."""
    if corpus.kind == "model":
        if model is None:
            raise ValueError("a model-sampled corpus needs the model")
        yield from sample_from_model(model, tokenizer, n_samples, length, seed)
        return
    texts = _texts_from_files(_local_files(corpus.source)) if corpus.kind == "files" else _texts_from_hub(corpus.source)
    produced = 0
    for text in texts:
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), length):
            window = ids[start:start + length]
            if len(window) < 8 and start > 0:
                break
            yield window
            produced += 1
            if produced >= n_samples:
                return


@torch.no_grad()
def sample_from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_samples: int, length: int,
                      seed: int = 0) -> Iterator[list[int]]:
    """Sample ``n_samples`` continuations of ``length`` tokens from the model (top-k 50), reproducibly."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    made = 0
    batch_index = 0
    while made < n_samples:
        count = min(SAMPLING_BATCH, n_samples - made)
        starts = [encode(tokenizer, SAMPLE_STARTS[(made + i) % len(SAMPLE_STARTS)]) for i in range(count)]
        width = max(len(s) for s in starts)
        new_tokens = max(1, length - min(len(s) for s in starts))  # every sample reaches ``length``
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in starts], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in starts], device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 100_003 + batch_index)
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=50, temperature=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=pad, eos_token_id=None,
            )
        for row, start in enumerate(starts):
            yield out[row, width - len(start):].tolist()[:length]
        made += count
        batch_index += 1
