"""Edit requests: the typed record, validation, and loaders for the field's data formats.

Supported record formats (detected per record from its keys):

* **nse-hub** — ``{"prompt": "The mother tongue of {} is", "subject": ..., "target_new": ...,
  "target_true"?, "paraphrases"?, "neighbors"?: [{"prompt", "answer"}], "generation_prompts"?,
  "reference_snippets"?, "case_id"?}``
* **CounterFact (ROME schema)** — ``{"case_id", "requested_rewrite": {"prompt", "subject",
  "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts",
  "generation_prompts"}``
* **CounterFact (EasyEdit/MEND schema)** — ``{"case_id", "prompt" (subject filled in), "subject",
  "target_new", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}``
* **zsRE (ROME/MEND schema)** — ``{"subject", "src", "answers", "rephrase", "loc", "loc_ans"}``;
  as in ROME/MEMIT/NSE, the edit writes ``answers[0]`` and has no ``target_true``.
* **MQuAKE** — ``{"case_id", "requested_rewrite": [ROME-style rewrites], "questions", "new_answer", ...}``:
  one record holds several rewrites and gives one request per rewrite, in order (so ``limit``/``offset`` count
  cases). Its multi-hop questions are read by :mod:`nse_hub.multihop`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nse_hub.errors import MissingFileError, RequestError

logger = logging.getLogger(__name__)

PLACEHOLDER = "{}"
# EditRequest fields that hold a list of non-empty strings.
TEXT_LIST_FIELDS = ("paraphrases", "generation_prompts", "reference_snippets")


@dataclass(frozen=True)
class Probe:
    """A prompt with the answer the model is expected to give (paraphrase or neighbourhood check)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be continued by ``target_new``.

    Attributes:
        prompt: template containing ``{}`` exactly once, where the subject goes.
        subject: the entity whose fact changes (``"Danielle Darrieux"``).
        target_new: the new answer (``"English"``), written without a leading space.
        target_true: the answer being replaced, if known (used for efficacy and reports).
        paraphrases: other prompts (subject filled in) that should now give ``target_new``.
        neighbors: prompts about other subjects with the answers they must keep.
        generation_prompts: prompts for free generation (fluency, consistency).
        reference_snippets: texts about ``target_new`` for the same relation (ROME's attribute
            snippets), which the generations are compared with for consistency.
        case_id: the record's id in its dataset, carried into reports and manifests.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[Probe, ...] = ()
    generation_prompts: tuple[str, ...] = field(default=(), compare=False)
    reference_snippets: tuple[str, ...] = field(default=(), compare=False)
    case_id: int | str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Accept lists and plain pairs/dicts from callers; store immutable tuples of Probes.
        for name in TEXT_LIST_FIELDS:
            object.__setattr__(self, name, _strings(getattr(self, name), name))
        object.__setattr__(self, "neighbors", _probes(self.neighbors, self.target_true, "neighbors"))
        problem = _problem(self)
        if problem:
            raise RequestError(problem)

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace(PLACEHOLDER, self.subject)

    def to_dict(self) -> dict[str, Any]:
        """The request in nse-hub's own JSON schema (what :func:`parse_request` reads back)."""
        record = asdict(self)
        for name in TEXT_LIST_FIELDS:
            record[name] = list(getattr(self, name))
        record["neighbors"] = [asdict(n) for n in self.neighbors]
        return {k: v for k, v in record.items() if v not in (None, [], ())}


RequestLike = EditRequest | Mapping[str, Any]


def _problem(request: EditRequest) -> str | None:
    for name in ("prompt", "subject", "target_new"):
        value = getattr(request, name)
        if not isinstance(value, str):
            return f"'{name}' must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"'{name}' is empty"
    if request.target_true is not None and (not isinstance(request.target_true, str)
                                            or not request.target_true.strip()):
        return "'target_true' must be a non-empty string or absent"
    count = request.prompt.count(PLACEHOLDER)
    if count != 1:
        return (f"'prompt' must contain '{{}}' exactly once where the subject goes, found {count}: "
                f"{request.prompt!r}")
    if request.target_true is not None and request.target_true.strip() == request.target_new.strip():
        return f"'target_new' equals 'target_true' ({request.target_new!r}): nothing to edit"
    for name in TEXT_LIST_FIELDS:
        if not all(isinstance(p, str) and p.strip() for p in getattr(request, name)):
            return f"'{name}' must be a list of non-empty strings"
    for n in request.neighbors:
        if not (isinstance(n, Probe) and isinstance(n.prompt, str) and isinstance(n.answer, str)
                and n.prompt.strip() and n.answer.strip()):
            return "'neighbors' must be a list of {'prompt', 'answer'} with non-empty strings"
    return None


def _template(prompt: Any, subject: Any) -> Any:
    """Turn a prompt with the subject written out into a template with ``{}`` (EasyEdit, zsRE)."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or PLACEHOLDER in prompt:
        return prompt
    if subject and subject in prompt:
        return prompt.replace(subject, PLACEHOLDER, 1)
    raise RequestError(
        f"'prompt' has no '{{}}' and the subject {subject!r} does not occur in it: {prompt!r}; "
        "write the prompt as a template with '{}' where the subject goes"
    )


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence):
        raise RequestError(f"'{name}' must be a list of strings, got {type(value).__name__}")
    return tuple(value)


def _probes(value: Any, default_answer: str | None, name: str) -> tuple[Probe, ...]:
    probes = []
    for item in [value] if isinstance(value, (str, Mapping)) else list(value or ()):
        if isinstance(item, Probe):
            probes.append(item)
        elif isinstance(item, Mapping):
            answer = item.get("answer", item.get("target", default_answer))
            probes.append(Probe(item.get("prompt"), _text_of(answer)))
        elif isinstance(item, str):
            if default_answer is None:
                raise RequestError(f"'{name}' entries without an answer need 'target_true'")
            probes.append(Probe(item, default_answer))
        elif isinstance(item, Sequence) and len(item) == 2:
            probes.append(Probe(item[0], item[1]))
        else:
            raise RequestError(f"'{name}' entries must be {{'prompt', 'answer'}} objects")
    return tuple(probes)


def _text_of(value: Any) -> Any:
    """CounterFact targets are ``{"str": ..., "id": ...}``; ours are plain strings."""
    return value.get("str") if isinstance(value, Mapping) else value


def _from_counterfact(record: Mapping[str, Any]) -> EditRequest:
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        raise RequestError("'requested_rewrite' must be an object")
    target_true = _text_of(rewrite.get("target_true"))
    return EditRequest(
        prompt=_template(rewrite.get("prompt"), rewrite.get("subject")),
        subject=rewrite.get("subject"),
        target_new=_text_of(rewrite.get("target_new")),
        target_true=target_true,
        paraphrases=_strings(record.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighbors=_probes(record.get("neighborhood_prompts"), target_true, "neighborhood_prompts"),
        generation_prompts=_strings(record.get("generation_prompts"), "generation_prompts"),
        case_id=record.get("case_id"),
    )


def _from_mquake(record: Mapping[str, Any]) -> list[EditRequest]:
    rewrites = record["requested_rewrite"]
    if not rewrites:
        raise RequestError("'requested_rewrite' is an empty list: an MQuAKE case needs at least one rewrite")
    requests = []
    for number, rewrite in enumerate(rewrites):
        try:
            requests.append(_from_counterfact({"requested_rewrite": rewrite, "case_id": record.get("case_id")}))
        except RequestError as error:
            raise RequestError(f"requested_rewrite[{number}]: {error}") from None
    return requests


def _from_easyedit(record: Mapping[str, Any]) -> EditRequest:
    neighbors = []
    if record.get("locality_prompt"):
        neighbors.append({"prompt": record["locality_prompt"], "answer": record.get("locality_ground_truth")})
    return EditRequest(
        prompt=_template(record.get("prompt"), record.get("subject")),
        subject=record.get("subject"),
        target_new=record.get("target_new"),
        target_true=record.get("ground_truth"),
        paraphrases=_strings(record.get("rephrase_prompt"), "rephrase_prompt"),
        neighbors=_probes(neighbors, None, "locality_prompt"),
        case_id=record.get("case_id"),
    )


def _from_zsre(record: Mapping[str, Any]) -> EditRequest:
    answers = record.get("answers")
    if not isinstance(answers, Sequence) or isinstance(answers, str) or not answers:
        raise RequestError("'answers' must be a non-empty list of strings")
    neighbors = [{"prompt": record["loc"], "answer": record.get("loc_ans")}] if record.get("loc") else []
    return EditRequest(
        prompt=_template(record.get("src"), record.get("subject")),
        subject=record.get("subject"),
        target_new=answers[0],
        paraphrases=_strings(record.get("rephrase"), "rephrase"),
        neighbors=_probes(neighbors, None, "loc"),
        case_id=record.get("case_id"),
    )


def _from_own(record: Mapping[str, Any]) -> EditRequest:
    known = {"prompt", "subject", "target_new", "target_true", "paraphrases", "neighbors",
             "generation_prompts", "reference_snippets", "case_id"}
    unknown = sorted(set(record) - known)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; an nse-hub request has {sorted(known)}")
    return EditRequest(
        prompt=_template(record.get("prompt"), record.get("subject")),
        subject=record.get("subject"),
        target_new=_text_of(record.get("target_new")),
        target_true=_text_of(record.get("target_true")),
        paraphrases=_strings(record.get("paraphrases"), "paraphrases"),
        neighbors=_probes(record.get("neighbors"), _text_of(record.get("target_true")), "neighbors"),
        generation_prompts=_strings(record.get("generation_prompts"), "generation_prompts"),
        reference_snippets=_strings(record.get("reference_snippets"), "reference_snippets"),
        case_id=record.get("case_id"),
    )


def record_format(record: Mapping[str, Any]) -> str:
    """Name the schema of a raw record: ``counterfact``, ``mquake``, ``counterfact-easyedit``, ``zsre`` or
    ``nse-hub``."""
    if isinstance(record.get("requested_rewrite"), list):
        return "mquake"
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and "answers" in record:
        return "zsre"
    if "ground_truth" in record or "rephrase_prompt" in record or "locality_prompt" in record:
        return "counterfact-easyedit"
    return "nse-hub"


_PARSERS = {
    "counterfact": _from_counterfact,
    "counterfact-easyedit": _from_easyedit,
    "zsre": _from_zsre,
    "nse-hub": _from_own,
}


def parse_request(record: RequestLike) -> EditRequest:
    """One raw record (any supported schema) or an :class:`EditRequest` as a validated request."""
    parsed = parse_record(record)
    if len(parsed) != 1:
        raise RequestError(f"the record holds {len(parsed)} rewrites (an MQuAKE case), not one request: read it "
                           "with parse_requests or load_requests, which give one request per rewrite")
    return parsed[0]


def parse_record(record: RequestLike) -> list[EditRequest]:
    """The validated requests of one raw record: one, or one per rewrite of an MQuAKE case."""
    if isinstance(record, EditRequest):
        return [record]
    if not isinstance(record, Mapping):
        raise RequestError(f"expected an object with 'prompt', 'subject' and 'target_new', "
                           f"got {type(record).__name__}")
    try:
        if record_format(record) == "mquake":
            return _from_mquake(record)
        return [_PARSERS[record_format(record)](record)]
    except KeyError as missing:
        raise RequestError(f"missing field {missing}") from None
    except TypeError as wrong:
        raise RequestError(f"wrong field type ({wrong})") from None


def parse_requests(records: Iterable[RequestLike], source: str = "requests") -> list[EditRequest]:
    """Validate every record before any is used; the first bad one raises with its number (0-based)."""
    parsed = []
    for number, record in enumerate(records):
        try:
            parsed.extend(parse_record(record))
        except RequestError as error:
            raise RequestError(f"{source}: record {number}: {error}") from None
    if not parsed:
        raise RequestError(f"{source}: no edit requests")
    return parsed


def fact_key(request: EditRequest) -> tuple[str, str]:
    """The fact a request writes: its subject and its prompt template (the relation)."""
    return request.subject.strip(), request.prompt.strip()


def one_round(requests: Sequence[EditRequest], source: str = "requests", warn: bool = True,
              start: int = 0) -> list[EditRequest]:
    """The requests of one round, each fact once: exact repeats are dropped (with a warning unless ``warn`` is off).

    Messages number the requests from ``start`` (their place in a longer list that was cut into rounds).

    Raises:
        RequestError: two requests write the same fact (subject and prompt template) with different targets;
            every such fact is listed, and nothing is edited.
    """
    first: dict[tuple[str, str], int] = {}
    kept, conflicts = [], {}
    for number, request in enumerate(requests):
        key = fact_key(request)
        if key not in first:
            first[key] = number
            kept.append(request)
        elif requests[first[key]].target_new.strip() == request.target_new.strip():
            if warn:
                logger.warning("%s: record %d repeats record %d (%r → %r); it is written once", source,
                               start + number, start + first[key], request.text, request.target_new)
        else:
            conflicts.setdefault(key, [first[key]]).append(number)
    if conflicts:
        listed = "; ".join(
            f"records {', '.join(str(start + n) for n in numbers)} write {requests[numbers[0]].text!r} as "
            + " / ".join(repr(requests[n].target_new) for n in numbers) for numbers in list(conflicts.values())[:5])
        more = f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        raise RequestError(f"{source}: {len(conflicts)} fact(s) written with different targets in one round "
                           f"({listed}{more}); keep one target per fact, or put the rewrites in separate rounds")
    return kept


def read_records(path: str | Path) -> list[Any]:
    """Raw records of a JSON file (a list, or an object with a ``requests``/``data`` list) or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no request file at {path}: check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as error:
        raise RequestError(f"{path} is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x}): "
                           "save it as UTF-8, e.g. iconv -f latin1 -t utf-8 (or -f utf-16) FILE > FILE.utf8"
                           ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_error:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    if line_number == 1:
                        raise RequestError(f"{path} is neither JSON nor JSONL: {whole_error}") from None
                    raise RequestError(f"{path}: line {line_number} is not valid JSON: {error}") from None
        return records
    if isinstance(data, Mapping):
        for key in ("requests", "data"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise RequestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_requests(path: str | Path, limit: int | None = None, offset: int = 0,
                  attribute_snippets: str | Path | None = None) -> list[EditRequest]:
    """Load and validate edit requests from a JSON or JSONL file in any supported format.

    Args:
        path: the file.
        limit: keep at most this many records (after ``offset``).
        offset: skip this many records first.
        attribute_snippets: ROME's ``attribute_snippets.json``; each CounterFact (ROME schema)
            request gets the snippets of its relation and new target, for the consistency metric.
    """
    for name, value, least in (("offset", offset, 0), ("limit", limit, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise RequestError(f"{name} must be a whole number of at least {least}, got {value!r}"
                               + (": leave it unset to use every request" if name == "limit" else ""))
    records = read_records(path)[offset:None if limit is None else offset + limit]
    requests = parse_requests(records, source=str(path))
    if attribute_snippets is not None:
        requests = with_attribute_snippets(records, requests, attribute_snippets, source=str(path))
    return requests


def with_attribute_snippets(records: Sequence[Mapping[str, Any]], requests: Sequence[EditRequest],
                            snippets_path: str | Path, source: str = "requests") -> list[EditRequest]:
    """Attach ROME's attribute snippets (by relation id and new target id) to CounterFact requests."""
    table: dict[tuple[str, str], list[str]] = {}
    for entry in read_records(snippets_path):
        texts = [sample["text"] for sample in entry.get("samples", []) if sample.get("text")]
        table.setdefault((entry["relation_id"], entry["target_id"]), []).extend(texts)
    out = []
    for number, (record, request) in enumerate(zip(records, requests), start=1):
        rewrite = record.get("requested_rewrite")
        target = rewrite.get("target_new") if isinstance(rewrite, Mapping) else None
        if not isinstance(target, Mapping) or "relation_id" not in rewrite or "id" not in target:
            raise RequestError(f"{source}, record {number}: attribute snippets need CounterFact records in the "
                               "ROME schema (requested_rewrite.relation_id and target_new.id); this record "
                               f"is in the {record_format(record)} format")
        snippets = table.get((rewrite["relation_id"], target["id"]), [])
        out.append(replace(request, reference_snippets=tuple(snippets)))
    return out
