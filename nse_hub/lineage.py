"""The history of a model's knowledge: what changed between two versions, their common ancestor, merge plans.

A *version* is a base model plus rounds of edits (:class:`Version`: the saved requests, reports and, where
stored, value targets; no model needed). Facts are keyed by subject and prompt template
(:func:`fact_key`): two versions that write the same key with different targets *changed* it, and two
branches that do so after their common ancestor *conflict*.

Everything here works on saved data only; :mod:`nse_hub.session` applies merge plans and
:mod:`nse_hub.history` loads versions from folders and ``repo@revision`` specs.

Example::

    diff = diff_versions(version_a, version_b)
    print(diff.added, diff.removed, diff.changed)
    plan = plan_merge(ours, theirs, prefer="theirs")   # HistoryConflictError when a conflict is unresolved
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.base import BaseModelInfo
from nse_hub.config import EditConfig
from nse_hub.errors import BaseModelMismatchError, ConfigError, HistoryConflictError
from nse_hub.report import RoundReport
from nse_hub.requests import EditRequest, fact_key
from nse_hub.scoring import generate_greedy, score_targets

FactKey = tuple[str, str]  # (subject, prompt template)
Side = Literal["ours", "theirs"]
SIDES = ("ours", "theirs")


def report_digest(report: RoundReport) -> str:
    """A round's identity: sha256 of its saved report (requests, scores, creation time)."""
    return hashlib.sha256(json.dumps(report.to_dict(), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def base_fingerprint(base: BaseModelInfo) -> str:
    """The base model's fingerprint: all its weights' sha256, or (when not measured) its edited modules'."""
    if base.model_sha256:
        return base.model_sha256
    return hashlib.sha256(json.dumps(base.module_sha256, sort_keys=True).encode()).hexdigest()


def same_base(a: BaseModelInfo, b: BaseModelInfo) -> bool:
    if a.model_sha256 and b.model_sha256:
        return a.model_sha256 == b.model_sha256
    common = set(a.module_sha256) & set(b.module_sha256)
    if common:
        return all(a.module_sha256[m] == b.module_sha256[m] for m in common)
    return a.portable_id == b.portable_id


@dataclass
class Version:
    """One version of an edit history, as saved (no model loaded).

    Attributes:
        label: how to name it (a folder, ``repo@revision``, ``"this session"``).
        base: the base model's identity.
        config: the hyperparameters the rounds were made with.
        reports: the rounds, in order (their requests are the edits).
        lineage: the history's branch point and merges (``session.json``'s ``lineage``).
        values: per round, its stored value targets (tensors of :class:`~nse_hub.checkpoint.RoundData`), or
            ``None`` per round where none were stored; empty when not loaded.
    """

    label: str
    base: BaseModelInfo
    config: EditConfig
    reports: list[RoundReport]
    lineage: dict[str, Any] = field(default_factory=dict)
    values: list[dict[str, torch.Tensor] | None] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return base_fingerprint(self.base)

    def edits(self, start: int = 0) -> list[tuple[int, EditRequest]]:
        """(round, request) of every edit after round ``start``, in order."""
        return [(report.round, r.request) for report in self.reports[start:] for r in report.requests]

    def facts(self, start: int = 0) -> dict[FactKey, tuple[int, EditRequest]]:
        """The last write of each fact after round ``start``: what the version holds."""
        return {fact_key(request): (number, request) for number, request in self.edits(start)}

    def effective_requests(self) -> list[EditRequest]:
        """One request per fact, the last one written (what an evaluation of this version should measure)."""
        return [request for _, request in self.facts().values()]

    def digests(self) -> list[str]:
        return [report_digest(r) for r in self.reports]


def check_same_base(a: Version, b: Version, action: str) -> None:
    """Refuse comparing or merging versions of different base models, naming both fingerprints."""
    if not same_base(a.base, b.base):
        raise BaseModelMismatchError(
            f"cannot {action} versions of different base models: {a.label} is on {a.base.portable_id} "
            f"(fingerprint {a.fingerprint[:16]}…), {b.label} on {b.base.portable_id} "
            f"(fingerprint {b.fingerprint[:16]}…)")


def common_rounds(a: Version, b: Version) -> int:
    """How many leading rounds the two histories share (their common ancestor's version)."""
    shared = 0
    for x, y in zip(a.digests(), b.digests()):
        if x != y:
            break
        shared += 1
    return shared


# --- diff ----------------------------------------------------------------------------------------------


@dataclass
class FactChange:
    """One fact that differs between versions A and B.

    ``kind``: ``added`` (only B holds an edit of it), ``removed`` (only A), ``changed`` (both, other targets).
    ``probe``, after :func:`probe_diff`: per version (``"a"``, ``"b"``), its greedy continuation of the prompt
    and ``p_new``/``p_old``, the probabilities of B's and A's answers.
    """

    kind: Literal["added", "removed", "changed"]
    a: EditRequest | None
    b: EditRequest | None
    round_a: int | None
    round_b: int | None
    probe: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def request(self) -> EditRequest:
        return self.b or self.a  # type: ignore[return-value]

    @property
    def target_a(self) -> str | None:
        """What version A should answer: its edit's target, or the original answer where it has no edit."""
        return self.a.target_new if self.a else self.request.target_true

    @property
    def target_b(self) -> str | None:
        return self.b.target_new if self.b else self.request.target_true

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {"kind": self.kind, "subject": r.subject, "prompt": r.prompt, "text": r.text,
                "target_a": self.target_a, "target_b": self.target_b, "round_a": self.round_a,
                "round_b": self.round_b, **({"probe": self.probe} if self.probe else {})}


@dataclass
class HistoryDiff:
    """What changed from version A to version B (see :func:`diff_versions`)."""

    a: str
    b: str
    fingerprint: str
    rounds_a: int
    rounds_b: int
    common_rounds: int
    changes: list[FactChange]

    def of_kind(self, kind: str) -> list[FactChange]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def added(self) -> list[FactChange]:
        return self.of_kind("added")

    @property
    def removed(self) -> list[FactChange]:
        return self.of_kind("removed")

    @property
    def changed(self) -> list[FactChange]:
        return self.of_kind("changed")

    def summary(self) -> str:
        return (f"{self.a} ({self.rounds_a} rounds) → {self.b} ({self.rounds_b} rounds), {self.common_rounds} "
                f"shared: {len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed")

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "base_fingerprint": self.fingerprint, "rounds_a": self.rounds_a,
                "rounds_b": self.rounds_b, "common_rounds": self.common_rounds,
                "counts": {k: len(self.of_kind(k)) for k in ("added", "removed", "changed")},
                "changes": [c.to_dict() for c in self.changes]}

    def table(self) -> Any:
        """A ``rich`` table: one row per changed fact (with what each version answers, when probed)."""
        from rich.table import Table

        table = Table(title=self.summary())
        probed = any(c.probe for c in self.changes)
        for column in ("", "prompt", "A → B", *(("A answers", "B answers") if probed else ())):
            table.add_column(column, overflow="fold")
        marks = {"added": "[green]+[/green]", "removed": "[red]−[/red]", "changed": "[yellow]~[/yellow]"}
        for c in self.changes:
            row = [marks[c.kind], c.request.text, f"{c.target_a or '?'} → {c.target_b or '?'}"]
            for side in ("a", "b") if probed else ():
                p = c.probe.get(side, {})
                row.append(f"{p.get('continuation', '').strip()!r} (p new {_p(p.get('p_new'))}, "
                           f"old {_p(p.get('p_old'))})")
            table.add_row(*row)
        return table


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def diff_versions(a: Version, b: Version) -> HistoryDiff:
    """The facts added, removed and changed from ``a`` to ``b`` (same base, else BaseModelMismatchError)."""
    check_same_base(a, b, "compare")
    facts_a, facts_b = a.facts(), b.facts()
    changes = []
    for key, (number_b, request_b) in facts_b.items():
        if key not in facts_a:
            changes.append(FactChange("added", None, request_b, None, number_b))
        elif facts_a[key][1].target_new.strip() != request_b.target_new.strip():
            changes.append(FactChange("changed", facts_a[key][1], request_b, facts_a[key][0], number_b))
    for key, (number_a, request_a) in facts_a.items():
        if key not in facts_b:
            changes.append(FactChange("removed", request_a, None, number_a, None))
    return HistoryDiff(a.label, b.label, a.fingerprint, len(a.reports), len(b.reports), common_rounds(a, b),
                       changes)


def probe_diff(diff: HistoryDiff, a: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelLayout],
               b: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelLayout], max_new_tokens: int = 8,
               batch_size: int = 32) -> HistoryDiff:
    """Fill each change's ``probe``: what versions ``a`` and ``b`` (model, tokenizer, layout) answer on its prompt."""
    for side, (model, tokenizer, layout) in (("a", a), ("b", b)):
        probe_side(diff, side, model, tokenizer, layout, max_new_tokens, batch_size)
    return diff


def probe_side(diff: HistoryDiff, side: Literal["a", "b"], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               layout: ModelLayout, max_new_tokens: int = 8, batch_size: int = 32) -> HistoryDiff:
    """Fill one side of each change's ``probe`` (see :func:`probe_diff`) with what ``model`` answers now."""
    if not diff.changes:
        return diff
    prompts = [c.request.text for c in diff.changes]
    continuations = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    pairs = [(i, which, target) for i, c in enumerate(diff.changes)
             for which, target in (("p_new", c.target_b), ("p_old", c.target_a)) if target]
    scores = score_targets(model, tokenizer, layout, [prompts[i] for i, _, _ in pairs],
                           [t for _, _, t in pairs], batch_size) if pairs else []
    found: dict[tuple[int, str], float] = {(i, which): s.prob for (i, which, _), s in zip(pairs, scores)}
    for i, c in enumerate(diff.changes):
        c.probe[side] = {"continuation": continuations[i], "p_new": found.get((i, "p_new")),
                         "p_old": found.get((i, "p_old"))}
    return diff


# --- merge ---------------------------------------------------------------------------------------------


@dataclass
class Conflict:
    """One fact the two branches wrote differently after their common ancestor.

    ``kind``: ``divergent`` (different targets), or ``undo`` (one branch's later round writes back the
    answer that the other branch's edit replaced). ``resolution`` is the side that wins, once chosen.
    """

    subject: str
    prompt: str
    kind: Literal["divergent", "undo"]
    ours: EditRequest
    ours_round: int
    theirs: EditRequest
    theirs_round: int
    resolution: Side | None = None

    @property
    def key(self) -> FactKey:
        return self.subject, self.prompt

    def describe(self) -> str:
        what = (f"ours (round {self.ours_round}) → {self.ours.target_new!r}, theirs (round {self.theirs_round}) "
                f"→ {self.theirs.target_new!r}")
        if self.kind == "undo":
            what += " (one side undoes the other's edit)"
        return f"{self.ours.text!r} [{self.subject} | {self.prompt}]: {what}"

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "prompt": self.prompt, "kind": self.kind,
                "ours": self.ours.target_new, "ours_round": self.ours_round, "theirs": self.theirs.target_new,
                "theirs_round": self.theirs_round, "resolution": self.resolution}


@dataclass
class PlannedRound:
    """One round of the other branch, to be re-applied on top of ours.

    ``rows``: which of the source round's requests are kept (conflicts resolved for ours are dropped);
    ``values``: their stored value targets, when they may be reused (NSE); ``None``: optimise again.
    """

    source_round: int
    digest: str
    requests: list[EditRequest]
    rows: list[int]
    values: dict[str, torch.Tensor] | None
    dropped: list[EditRequest] = field(default_factory=list)


@dataclass
class MergePlan:
    """What :meth:`EditSession.merge_history` will do, decided before anything is written."""

    ours: str
    theirs: str
    ancestor: int
    rounds: list[PlannedRound]
    conflicts: list[Conflict]
    already_merged: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"ours": self.ours, "theirs": self.theirs, "ancestor": self.ancestor,
                "rounds": [{"source_round": r.source_round, "edits": len(r.requests), "dropped": len(r.dropped),
                            "values": "reused" if r.values is not None else "recomputed"} for r in self.rounds],
                "conflicts": [c.to_dict() for c in self.conflicts], "already_merged": self.already_merged}


def find_conflicts(ours: Version, theirs: Version, ancestor: int, theirs_rounds: Sequence[int] | None = None
                   ) -> list[Conflict]:
    """Facts written after round ``ancestor`` by both branches with different targets.

    ``theirs_rounds`` (0-based indices) restricts the other branch to the rounds that will be re-applied.
    """
    ours_facts = ours.facts(ancestor)
    indices = range(ancestor, len(theirs.reports)) if theirs_rounds is None else theirs_rounds
    theirs_facts: dict[FactKey, tuple[int, EditRequest]] = {}
    for i in indices:
        report = theirs.reports[i]
        for r in report.requests:
            theirs_facts[fact_key(r.request)] = (report.round, r.request)
    conflicts = []
    for key, (t_round, t_request) in theirs_facts.items():
        if key not in ours_facts:
            continue
        o_round, o_request = ours_facts[key]
        new_o, new_t = o_request.target_new.strip(), t_request.target_new.strip()
        if new_o == new_t:
            continue
        undo = (o_request.target_true or "").strip() == new_t or (t_request.target_true or "").strip() == new_o
        conflicts.append(Conflict(key[0], key[1], "undo" if undo else "divergent", o_request, o_round,
                                  t_request, t_round))
    return conflicts


def _resolve(conflicts: list[Conflict], prefer: Side | None,
             resolutions: Mapping[Any, Side] | None) -> list[Conflict]:
    """Set each conflict's resolution (per conflict first, then the policy); return those left unresolved."""
    for side in [prefer, *(resolutions or {}).values()]:
        if side is not None and side not in SIDES:
            raise ConfigError(f"a conflict is resolved by 'ours' or 'theirs', not {side!r}")
    chosen = dict(resolutions or {})
    for c in conflicts:
        side = chosen.get(c.key, chosen.get(c.subject, chosen.get(c.ours.text)))
        c.resolution = side or prefer
    return [c for c in conflicts if c.resolution is None]


def plan_merge(ours: Version, theirs: Version, prefer: Side | None = None,
               resolutions: Mapping[Any, Side] | None = None) -> MergePlan:
    """Plan re-applying ``theirs``' rounds after the common ancestor on top of ``ours``.

    Args:
        ours, theirs: the two versions (same base, same method and edit layers).
        prefer: how conflicts not named in ``resolutions`` are resolved (``"ours"``/``"theirs"``).
        resolutions: per conflict, the side that wins, keyed by ``(subject, prompt template)``, by the
            subject, or by the filled-in prompt.

    Raises:
        BaseModelMismatchError: different base models (both fingerprints in the message).
        ConfigError: different methods or edit layers.
        HistoryConflictError: a conflict left unresolved (every one is listed; ``error.conflicts``).
    """
    check_same_base(ours, theirs, "merge")
    for name in ("method", "layers"):
        mine, other = getattr(ours.config, name), getattr(theirs.config, name)
        if name == "layers":
            mine, other = tuple(mine), tuple(other)
        if mine != other:
            raise ConfigError(f"cannot merge histories made with different {name}: {ours.label} uses {mine!r}, "
                              f"{theirs.label} uses {other!r}")
    ancestor = common_rounds(ours, theirs)
    known = set(ours.digests())
    for merge in ours.lineage.get("merges", []):
        known.update(r["digest"] for r in merge.get("rounds", []))
    # Rounds that theirs itself merged from a history ours already holds are ours' rounds again.
    theirs_sources = {r["merged_digest"]: r["digest"] for merge in theirs.lineage.get("merges", [])
                      for r in merge.get("rounds", []) if r.get("merged_digest")}
    digests = theirs.digests()
    pending = [i for i in range(ancestor, len(theirs.reports))
               if digests[i] not in known and theirs_sources.get(digests[i]) not in known]
    already = [theirs.reports[i].round for i in range(ancestor, len(theirs.reports)) if i not in pending]
    conflicts = find_conflicts(ours, theirs, ancestor, pending)
    unresolved = _resolve(conflicts, prefer, resolutions)
    if unresolved:
        raise HistoryConflictError(unresolved, ours.label, theirs.label)
    dropped_keys = {c.key for c in conflicts if c.resolution == "ours"}
    reuse = ours.config.nse_family  # values on the original weights: valid on top of any history
    rounds = []
    for i in pending:
        report = theirs.reports[i]
        rows = [j for j, r in enumerate(report.requests) if fact_key(r.request) not in dropped_keys]
        dropped = [r.request for j, r in enumerate(report.requests) if j not in rows]
        stored = theirs.values[i] if reuse and i < len(theirs.values) else None
        values = None
        if stored is not None and rows:
            index = torch.tensor(rows, dtype=torch.long)
            values = {k: v.index_select(0, index) for k, v in stored.items()}
        rounds.append(PlannedRound(report.round, digests[i], [report.requests[j].request for j in rows], rows,
                                   values, dropped))
    return MergePlan(ours.label, theirs.label, ancestor, rounds, conflicts, already)


def lineage_lines(lineage: Mapping[str, Any]) -> list[str]:
    """Human-readable lines of a lineage record (for cards and the command line)."""
    lines = []
    parent = lineage.get("parent")
    if parent:
        where = parent.get("source", "?")
        at = f"@{parent['revision']}" if parent.get("revision") else ""
        commit = f" (commit {parent['commit'][:10]})" if parent.get("commit") else ""
        lines.append(f"Branched from `{where}{at}`{commit} at round {parent.get('round', 0)} "
                     f"(the branch point: rounds 1–{parent.get('round', 0)} are shared).")
    for merge in lineage.get("merges", []):
        rounds = merge.get("rounds", [])
        pairs = ", ".join(f"{r['source_round']}→{r['round']}" for r in rounds) or "none"
        reused = sum(r.get("values") == "reused" for r in rounds)
        resolved = merge.get("conflicts", [])
        lines.append(f"Merged `{merge.get('from', '?')}` (common ancestor: round {merge.get('ancestor', 0)}): its "
                     f"rounds re-applied as {pairs}; stored values reused in {reused} of {len(rounds)}"
                     + (f"; {len(resolved)} conflict(s) resolved" if resolved else "") + ".")
    return lines
