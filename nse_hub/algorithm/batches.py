"""Token-level layouts of a round's requests: the sequences the value optimisation and the key reads run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from nse_hub.requests import EditRequest
from nse_hub.scoring import target_text
from nse_hub.tokens import SubjectText, continuation_ids, subject_last_token

KL_TEMPLATE = "{} is a"


@dataclass
class ValueBatch:
    """For each request: one sequence per context template ending in the target's first tokens, plus
    one ``"{subject} is a"`` sequence whose next-token distribution the KL term keeps.

    Attributes:
        sequences: token ids per row.
        lookup: index of the subject's last token per row (where δ is added).
        request_of: request index per row.
        target_positions: per row, the positions whose next token is a target token (empty for KL rows).
        labels: per row, those target tokens.
        plain_row: per request, the row of its bare ``"{}"`` template (where ‖h‖ is read).
        kl_row: per request, its KL row.
    """

    sequences: list[list[int]]
    lookup: list[int]
    request_of: list[int]
    target_positions: list[list[int]]
    labels: list[list[int]]
    plain_row: list[int]
    kl_row: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.plain_row)

    def subset(self, requests: Sequence[int]) -> ValueBatch:
        """The rows of ``requests`` only, renumbered ``0..len(requests)-1`` in the order given."""
        number = {request: k for k, request in enumerate(requests)}
        rows = [row for row, owner in enumerate(self.request_of) if owner in number]
        new_row = {row: k for k, row in enumerate(rows)}
        return ValueBatch([self.sequences[r] for r in rows], [self.lookup[r] for r in rows],
                          [number[self.request_of[r]] for r in rows], [self.target_positions[r] for r in rows],
                          [self.labels[r] for r in rows], [new_row[self.plain_row[q]] for q in requests],
                          [new_row[self.kl_row[q]] for q in requests])


def build_value_batch(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                      templates: Sequence[str]) -> ValueBatch:
    batch = ValueBatch([], [], [], [], [], [], [])
    for index, request in enumerate(requests):
        target = continuation_ids(tokenizer, request.text, target_text(request.target_new))
        for template in templates:
            ids, last = subject_last_token(tokenizer, SubjectText.fill(request.prompt, request.subject, template))
            if template == "{}":
                batch.plain_row.append(len(batch.sequences))
            batch.sequences.append(ids + target[:-1])
            batch.lookup.append(last)
            batch.request_of.append(index)
            batch.target_positions.append(list(range(len(ids) - 1, len(ids) - 1 + len(target))))
            batch.labels.append(target)
        ids, last = subject_last_token(tokenizer, SubjectText.fill(KL_TEMPLATE, request.subject))
        batch.kl_row.append(len(batch.sequences))
        batch.sequences.append(ids[: last + 1])  # only the subject's last position is read
        batch.lookup.append(last)
        batch.request_of.append(index)
        batch.target_positions.append([])
        batch.labels.append([])
    return batch


@dataclass
class KeyBatch:
    """For each request, its prompt in every context template (no target).

    Attributes:
        sequences, lookup, request_of: as in :class:`ValueBatch`.
        weight: per row, its share in the request's key: groups weigh equally, templates equally
            within a group (the reference's average of group means).
        plain_row: per request, the row of its bare prompt (where the z-layer output is read).
    """

    sequences: list[list[int]]
    lookup: list[int]
    request_of: list[int]
    weight: list[float]
    plain_row: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.plain_row)

    def averaging(self, device: torch.device | str) -> torch.Tensor:
        """``n × rows`` matrix turning per-row keys into per-request keys."""
        matrix = torch.zeros(self.num_requests, len(self.sequences))
        matrix[self.request_of, list(range(len(self.sequences)))] = torch.tensor(self.weight)
        return matrix.to(device)


def build_key_batch(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                    template_groups: Sequence[Sequence[str]]) -> KeyBatch:
    batch = KeyBatch([], [], [], [], [])
    for index, request in enumerate(requests):
        for group in template_groups:
            for template in group:
                ids, last = subject_last_token(tokenizer, SubjectText.fill(request.prompt, request.subject, template))
                if template == "{}":
                    batch.plain_row.append(len(batch.sequences))
                batch.sequences.append(ids)
                batch.lookup.append(last)
                batch.request_of.append(index)
                batch.weight.append(1.0 / (len(template_groups) * len(group)))
    return batch
