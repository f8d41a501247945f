"""Tokenization of edit prompts: where the subject's last token is, and how a target continues a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from nse_hub.requests import EditRequest


@dataclass(frozen=True)
class SubjectText:
    """A text with the character span of the subject in it."""

    text: str
    subject_start: int
    subject_end: int

    @classmethod
    def fill(cls, template: str, subject: str, context: str = "{}") -> SubjectText:
        """Fill ``template``'s ``{}`` with ``subject``, then place the result at ``context``'s ``{}``."""
        outer = context.index("{}")
        inner = template.index("{}")
        start = outer + inner
        text = context[:outer] + template[:inner] + subject + template[inner + 2:] + context[outer + 2:]
        return cls(text, start, start + len(subject))


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt, with the special tokens (BOS) the model expects at the start."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def request_lengths(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]) -> list[int]:
    """Per request, the tokens of its longest sequence: the prompt, a paraphrase or a neighbour with its answer."""
    lengths = []
    for request in requests:
        texts = [f"{request.text} {request.target_new}", *(f"{p} {request.target_new}" for p in request.paraphrases),
                 *(f"{n.prompt} {n.answer}" for n in request.neighbors), *request.generation_prompts]
        lengths.append(max(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]))
    return lengths


def subject_last_token(tokenizer: PreTrainedTokenizerBase, item: SubjectText) -> tuple[list[int], int]:
    """Token ids of ``item.text`` and the index of the token holding the subject's last character."""
    if tokenizer.is_fast:
        encoded = tokenizer(item.text, add_special_tokens=True, return_offsets_mapping=True)
        candidates = [
            i for i, (start, end) in enumerate(encoded["offset_mapping"])
            if end > start and start < item.subject_end
        ]
        return encoded["input_ids"], candidates[-1]
    ids = encode(tokenizer, item.text)
    return ids, len(encode(tokenizer, item.text[: item.subject_end])) - 1


def continuation_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str) -> list[int]:
    """Token ids that ``continuation`` adds after ``prompt``, as joint tokenization would split them.

    Targets are written with a leading space (``" English"``); tokenising prompt and target together
    and removing the prompt's own tokens avoids the SentencePiece prefix-space artefacts of
    tokenising the target alone. Falls back to tokenising it alone if the prompt's tokens change
    when something follows them.
    """
    prefix = encode(tokenizer, prompt)
    full = encode(tokenizer, prompt + continuation)
    if len(full) > len(prefix) and full[: len(prefix)] == prefix:
        return full[len(prefix):]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _pad(sequences: Sequence[Sequence[int]], pad: int, device: torch.device | str,
         left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        where = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, where] = torch.tensor(seq, dtype=torch.long)
        mask[row, where] = 1
    return ids.to(device), mask.to(device)


def pad_left(sequences: Sequence[Sequence[int]], pad: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` tensors (for ``generate``)."""
    return _pad(sequences, pad, device, left=True)


def pad_right(sequences: Sequence[Sequence[int]], pad: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)`` tensors."""
    return _pad(sequences, pad, device, left=False)
