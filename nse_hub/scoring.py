"""Teacher-forced scores of target continuations and batched greedy generation.

Scores run the decoder once per batch and apply the output head only at the positions that predict
target tokens, which on small models with large vocabularies is most of the saving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.tokens import continuation_ids, encode, pad_id, pad_left, pad_right
from nse_hub.tracing import model_device


def target_text(target: str) -> str:
    """Targets are scored with a leading space, as the field does (``" English"``)."""
    return target if target.startswith(" ") else " " + target


@dataclass(frozen=True)
class TargetScore:
    """Per-token results of feeding ``prompt + target`` and reading the target's tokens."""

    token_logprobs: tuple[float, ...]
    token_correct: tuple[bool, ...]  # the argmax at each position is the target token

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per target token (the field's comparison of two targets)."""
        return -sum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def prob(self) -> float:
        """Joint probability of the whole target."""
        return math.exp(sum(self.token_logprobs))

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_correct) / len(self.token_correct)


def logprobs_at(model: PreTrainedModel, layout: ModelLayout, sequences: Sequence[Sequence[int]], pad: int,
                rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
    """Next-token log-probabilities at positions ``(rows[i], cols[i])`` of right-padded ``sequences``.

    The decoder runs once; the output head runs only at those positions, which on small models with large
    vocabularies is most of the cost of a forward pass.
    """
    ids, mask = pad_right(sequences, pad, model_device(model))
    hidden = layout.decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return torch.log_softmax(layout.logits(model, hidden[list(rows), list(cols)]).float(), dim=-1)


@torch.no_grad()
def score_targets(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                  prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[TargetScore]:
    """Teacher-forced log-probabilities of each ``target`` after its ``prompt``."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = model_device(model)
    items = []
    for prompt, target in zip(prompts, targets):
        prompt_ids = encode(tokenizer, prompt)
        target_ids = continuation_ids(tokenizer, prompt, target_text(target))
        items.append((prompt_ids + target_ids[:-1], len(prompt_ids) - 1, target_ids))
    # Longest first keeps padding low within each batch.
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    scores: dict[int, TargetScore] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows, cols, labels = [], [], []
        for row, i in enumerate(chunk):
            _, first, target_ids = items[i]
            rows += [row] * len(target_ids)
            cols += range(first, first + len(target_ids))
            labels += target_ids
        logprobs = logprobs_at(model, layout, [items[i][0] for i in chunk], pad_id(tokenizer), rows, cols)
        labels_t = torch.tensor(labels, device=device)
        picked = logprobs.gather(1, labels_t[:, None]).squeeze(1).tolist()
        correct = (logprobs.argmax(-1) == labels_t).tolist()
        offset = 0
        for i in chunk:
            n = len(items[i][2])
            scores[i] = TargetScore(tuple(picked[offset:offset + n]), tuple(correct[offset:offset + n]))
            offset += n
    return [scores[i] for i in range(len(items))]


@torch.no_grad()
def next_token_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                        prompts: Sequence[str], candidates: Sequence[Sequence[int]],
                        batch_size: int = 32) -> list[list[float]]:
    """Log-probabilities of candidate next tokens after each prompt: one forward pass per prompt."""
    encoded = [encode(tokenizer, p) for p in prompts]
    out: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        logprobs = logprobs_at(model, layout, chunk, pad_id(tokenizer), range(len(chunk)), [len(c) - 1 for c in chunk])
        for row, options in enumerate(candidates[start:start + batch_size]):
            out.append(logprobs[row, list(options)].tolist())
    return out


@torch.no_grad()
def generate_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of each prompt (the continuation only, decoded)."""
    pad = pad_id(tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_left([encoded[i] for i in chunk], pad, model_device(model))
        width = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, top_p=None, top_k=None, temperature=None)
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return [outputs[i] for i in range(len(prompts))]
