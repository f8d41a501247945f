"""Multi-hop portability cases (MQuAKE): the single-hop facts to edit and the multi-hop questions that depend on them.

An MQuAKE case (Zhong et al., EMNLP 2023, `arXiv:2305.14795 <https://arxiv.org/abs/2305.14795>`_) chains
single-hop facts ("Hey Jude was performed by The Beatles", "The director of The Beatles is Brian Epstein", ...)
into a question that needs all of them ("What is the official language of the country of citizenship of the
manager of Hey Jude's performer?"). Its ``requested_rewrite`` list changes some of those facts; an edit
*propagates* when the edited model answers the questions with the case's ``new_answer`` instead of the original
``answer``. :func:`load_multihop_cases` reads the original MQuAKE schema::

    {"case_id", "requested_rewrite": [{"prompt": "{} was performed by", "subject", "target_new": {"str"},
     "target_true": {"str"}, "question"?}, ...], "questions": [3 paraphrases], "answer", "answer_alias",
     "new_answer", "new_answer_alias", "single_hops"?, "new_single_hops"?, "orig"?}

The evaluation harness (:mod:`nse_hub.evaluation`) asks every question in :func:`question_prompt`'s few-shot
format; the ``evaluate`` metric module turns the answers into the ``portability`` figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nse_hub.errors import RequestError
from nse_hub.requests import EditRequest, fact_key, parse_record, read_records

# A base model continues a bare question with another question; a few solved multi-hop questions (written for
# nse-hub, not taken from MQuAKE) make its next words an answer, for the teacher-forced and the generated judgment
# alike. MQuAKE prompts its models few-shot too.
FEW_SHOT = (
    "Q: What is the capital of the country where the Eiffel Tower stands?\nA: Paris\n"
    "Q: Which continent is the country whose capital is Nairobi in?\nA: Africa\n"
    "Q: What is the official language of the country where Mount Fuji is?\nA: Japanese\n"
)
QUESTION_TEMPLATE = "Q: {question}\nA:"


def question_prompt(question: str) -> str:
    """The prompt a multi-hop question is asked with: :data:`FEW_SHOT` examples, then ``Q: question\\nA:``."""
    return FEW_SHOT + QUESTION_TEMPLATE.format(question=question.strip())


@dataclass(frozen=True)
class MultiHopCase:
    """One MQuAKE case: the facts it rewrites and the multi-hop questions that should follow them.

    Attributes:
        case_id: the case's id in its file.
        requests: one edit per ``requested_rewrite`` entry, in order.
        questions: paraphrases of the multi-hop question (MQuAKE: 3); a case counts when any is answered.
        answer: the answer before the edits (the original chain's), with ``answer_aliases``.
        new_answer: the answer once every rewrite is in, with ``new_answer_aliases``.
    """

    case_id: int | str | None
    requests: tuple[EditRequest, ...]
    questions: tuple[str, ...]
    answer: str
    answer_aliases: tuple[str, ...]
    new_answer: str
    new_answer_aliases: tuple[str, ...]

    @property
    def answers(self) -> tuple[str, ...]:
        """The original answer and its aliases."""
        return (self.answer, *self.answer_aliases)

    @property
    def new_answers(self) -> tuple[str, ...]:
        """The new answer and its aliases."""
        return (self.new_answer, *self.new_answer_aliases)


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"'{name}' must be a non-empty string, got {value!r}")
    return value


def _texts(record: Mapping[str, Any], name: str, least: int = 0) -> tuple[str, ...]:
    value = record.get(name, [])
    if isinstance(value, str) or not isinstance(value, Sequence) \
            or not all(isinstance(v, str) and v.strip() for v in value):
        raise RequestError(f"'{name}' must be a list of non-empty strings, got {value!r}")
    if len(value) < least:
        raise RequestError(f"'{name}' is empty: an MQuAKE case needs at least {least} question")
    return tuple(value)


def parse_case(record: Any) -> MultiHopCase:
    """One raw MQuAKE record as a validated :class:`MultiHopCase`."""
    if not isinstance(record, Mapping) or not isinstance(record.get("requested_rewrite"), list) \
            or "questions" not in record:
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise RequestError(f"not an MQuAKE case (it needs a 'requested_rewrite' list and 'questions'; got {keys})")
    return MultiHopCase(
        case_id=record.get("case_id"),
        requests=tuple(parse_record(record)),
        questions=_texts(record, "questions", least=1),
        answer=_text(record, "answer"),
        answer_aliases=_texts(record, "answer_alias"),
        new_answer=_text(record, "new_answer"),
        new_answer_aliases=_texts(record, "new_answer_alias"),
    )


def load_multihop_cases(path: str | Path, limit: int | None = None, offset: int = 0) -> list[MultiHopCase]:
    """Load and validate MQuAKE cases from a JSON or JSONL file in MQuAKE's schema.

    Args:
        path: the file (``MQuAKE-CF-3k.json``, ``MQuAKE-T.json``, ``MQuAKE-hard.json``, ...).
        limit: keep at most this many cases (after ``offset``).
        offset: skip this many cases first.

    Raises:
        MissingFileError: there is no file at ``path``.
        RequestError: the file is not JSON/JSONL, holds no case, or a case lacks a field; the message names the
            case (0-based, in the file) and the field.
    """
    for name, value, least in (("offset", offset, 0), ("limit", limit, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise RequestError(f"{name} must be a whole number of at least {least}, got {value!r}"
                               + (": leave it unset to use every case" if name == "limit" else ""))
    records = read_records(path)
    cases = []
    for number, record in enumerate(records[offset:None if limit is None else offset + limit], start=offset):
        try:
            cases.append(parse_case(record))
        except RequestError as error:
            raise RequestError(f"{path}: case {number}: {error}; MQuAKE cases look like {{'requested_rewrite': "
                               "[...], 'questions': [...], 'answer', 'answer_alias', 'new_answer', "
                               "'new_answer_alias'}") from None
    if not cases:
        raise RequestError(f"{path}: no MQuAKE cases (the file holds {len(records)} records, offset {offset}): "
                           "lower the offset or check the file")
    return cases


def case_requests(cases: Sequence[MultiHopCase]) -> list[EditRequest]:
    """The edits of ``cases``, each fact once (MQuAKE cases share facts), in the order they first appear.

    Raises:
        RequestError: two cases rewrite the same fact (subject and prompt template) to different answers; they
            cannot hold in one model, so they are named and nothing is returned.
    """
    first: dict[tuple[str, str], tuple[EditRequest, MultiHopCase]] = {}
    conflicts = []
    for case in cases:
        for request in case.requests:
            seen = first.setdefault(fact_key(request), (request, case))
            if seen[0].target_new.strip() != request.target_new.strip():
                conflicts.append(f"{request.text!r} is {seen[0].target_new!r} in case {seen[1].case_id} but "
                                 f"{request.target_new!r} in case {case.case_id}")
    if conflicts:
        more = f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise RequestError(f"{len(conflicts)} fact(s) rewritten differently by two cases ({'; '.join(conflicts[:3])}"
                           f"{more}): evaluate such cases in separate runs (limit/offset)")
    return [request for request, _ in first.values()]
