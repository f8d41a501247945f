"""The studio's model side: one saved edit loaded once, its versions answered by switching the edit's rounds.

A version is the base plus rounds ``1..k``. The session keeps every round's exact factors (:mod:`nse_hub.deltas`),
so running the model as version ``k`` only sets each edited projection to ``W0 + B_all @ A_all`` of rounds
``1..k`` (:meth:`~nse_hub.deltas.WeightDeltas.at_round`): the weights of that version's PEFT adapter merged, with
no second copy of the model and no PEFT wrapper in the way of the Edit tab's new rounds. Nothing here imports
Gradio; :mod:`nse_hub.studio.app` draws the page.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nse_hub.card import method_name
from nse_hub.errors import RequestError, VersionNotFoundError
from nse_hub.hub import PushedRound, locate_saved_edit
from nse_hub.lineage import HistoryDiff, Version, diff_versions, probe_side
from nse_hub.report import ROUND_METRICS, RoundReport
from nse_hub.requests import EditRequest, RequestLike, load_requests, parse_requests
from nse_hub.scoring import generate_greedy, score_targets
from nse_hub.session import EditSession, resolve_round

BASE = "base"
CURVE_METRICS = ("efficacy", "generalization", "specificity", "efficacy_generation")


def probability(value: float | None) -> str:
    """A probability for tables: three decimals, or two significant digits below 0.001 (``–`` when unknown)."""
    if value is None:
        return "–"
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.1e}"


def version_name(round: int) -> str:
    """``base`` for the unedited model, ``round-k`` for the version after round ``k`` (as ``nse-hub serve``)."""
    return BASE if round == 0 else f"round-{round}"


@dataclasses.dataclass(frozen=True)
class FactProbabilities:
    """What a version gives the answers of an edited fact whose prompt was asked: joint probabilities."""

    new: str
    old: str | None
    p_new: dict[str, float]
    p_old: dict[str, float]


class Studio:
    """A saved edit with its base model loaded once, for comparing, reviewing and extending its versions.

    Every method that runs the model holds one lock: the page's events run in threads, and a comparison must
    not see the weights of another version or of a round being written.

    Args:
        session: the loaded edit (its model carries every round).
        source: how the edit was named (a folder, ``repo`` or ``repo@revision``).
        max_new_tokens: tokens of each greedy continuation.
    """

    def __init__(self, session: EditSession, source: str, max_new_tokens: int = 12) -> None:
        self.session = session
        self.source = source
        self.max_new_tokens = max_new_tokens
        self.saved_rounds = len(session.rounds)  # rounds that exist outside this process
        self._lock = threading.RLock()

    @classmethod
    def load(cls, edit: str, device: str | None = None, token: str | bool | None = None,
             max_new_tokens: int = 12) -> Studio:
        """Load a saved edit: a folder, or a Hub repo pushed by nse-hub (``repo`` or ``repo@revision``).

        Raises:
            VersionNotFoundError: ``edit`` is neither a saved edit folder nor a Hub revision.
        """
        from nse_hub.history import VersionSpec, open_version

        spec = VersionSpec.parse(edit)
        if locate_saved_edit(spec.source, spec.revision, token) is None:
            raise VersionNotFoundError(f"{edit} is not a saved edit: give a folder written by `nse-hub edit` or "
                                       "save_pretrained, or a Hub repo pushed by nse-hub (repo or repo@revision)")
        return cls(open_version(spec, device, token), edit, max_new_tokens)

    # --- versions -------------------------------------------------------------------------------------

    @property
    def versions(self) -> list[str]:
        """``base``, ``round-1``, … ``round-N``."""
        return [version_name(k) for k in range(len(self.session.rounds) + 1)]

    @property
    def latest(self) -> str:
        return version_name(len(self.session.rounds))

    def round_of(self, name: str) -> int:
        """The round behind a version name (``base`` → 0, ``round-3`` → 3).

        Raises:
            VersionNotFoundError: no such version in this edit.
        """
        known = f"this edit has {', '.join(self.versions)}"
        if name == BASE:
            return 0
        number = name.removeprefix("round-") if isinstance(name, str) else ""
        if not number.isdigit():
            raise VersionNotFoundError(f"unknown version {name!r}: {known}")
        try:
            return resolve_round(int(number), len(self.session.rounds), owner=f"the edit {self.source}")
        except VersionNotFoundError:
            raise VersionNotFoundError(f"version {name!r} does not exist: {known}") from None

    @contextmanager
    def at(self, name: str) -> Iterator[EditSession]:
        """The session's model run as version ``name`` (under the lock); the latest weights come back after."""
        round = self.round_of(name)
        with self._lock, self.session.deltas.at_round(round):
            yield self.session

    def describe(self) -> str:
        """One line: the edit, its base model, method, layers and versions."""
        s = self.session
        return (f"{self.source}: {len(s.rounds)} round(s) of {method_name(s.config.method)} on "
                f"{s.base.portable_id}, layers {list(s.config.layers)}")

    def version_rows(self) -> list[list[Any]]:
        """Per version: name, date, edits, method, its round's own metrics after it, the card's recorded figures."""
        rows: list[list[Any]] = [[BASE, "", 0, "", "", "", "", self._recorded(0)]]
        for report in self.session.rounds:
            figures = report.metrics()
            rows.append([version_name(report.round), report.created.replace("T", " ").replace("+00:00", " UTC"),
                         len(report.requests), method_name(report.method),
                         *(_rate(figures.get(key)) for key in ROUND_METRICS), self._recorded(report.round)])
        return rows

    def _recorded(self, round: int) -> str:
        metrics = self.session.evaluations.get(round) or []
        return ", ".join(f"{m.name} {m.value:g}" for m in metrics)

    def edit_rows(self, name: str) -> list[list[str]]:
        """The edits of the round that made version ``name``: prompt, old → new, p(new) and p(old) before → after."""
        round = self.round_of(name)
        if round == 0:
            return []
        return [[r.request.text, f"{r.request.target_true or '?'} → {r.request.target_new}",
                 f"{probability(r.p_new_before)} → {probability(r.p_new_after)}",
                 f"{probability(r.p_true_before)} → {probability(r.p_true_after)}" if r.p_true_before is not None
                 else "–",
                 {True: "✓", False: "✗", None: "–"}[r.success()]] for r in self.session.rounds[round - 1].requests]

    def edited_prompts(self) -> list[str]:
        """The rewrite prompts of every edit, latest first, once each."""
        seen: dict[str, None] = {}
        for report in reversed(self.session.rounds):
            for r in report.requests:
                seen.setdefault(r.request.text, None)
        return list(seen)

    def curves(self) -> Any:
        """A matplotlib figure: per metric, each round's own edits right after it, and the recorded evaluations."""
        from matplotlib.figure import Figure

        rounds = [(r.round, r.metrics()) for r in self.session.rounds]
        recorded = {v: {m.key: m.value for m in metrics} for v, metrics in sorted(self.session.evaluations.items())}
        shown = [m for m in CURVE_METRICS if any(m in f for _, f in rounds) or any(m in f for f in recorded.values())]
        figure = Figure(figsize=(3.2 * max(1, len(shown)), 3.0))
        axes = figure.subplots(1, max(1, len(shown)), squeeze=False)[0]
        for axis, metric in zip(axes, shown):
            own = [(k, f[metric]) for k, f in rounds if metric in f]
            if own:
                axis.plot(*zip(*own), marker="o", label="its round's edits, after the round")
            evaluated = [(v, f[metric]) for v, f in recorded.items() if metric in f]
            if evaluated:
                axis.plot(*zip(*evaluated), marker="s", linestyle="--", label="recorded evaluation (card)")
            axis.set_title(metric.replace("_", " ").capitalize(), fontsize=10)
            axis.set_xlabel("version (round)")
            axis.set_ylim(-5, 105)
            axis.set_xticks(range(1, len(rounds) + 1))
            axis.grid(alpha=0.3)
        if shown:
            handles, labels = axes[-1].get_legend_handles_labels()
            figure.legend(handles, labels, loc="lower center", ncol=2, frameon=False, fontsize=8)
        figure.tight_layout(rect=(0, 0.12, 1, 1))
        return figure

    # --- compare ----------------------------------------------------------------------------------------

    def compare(self, prompt: str, versions: Sequence[str]) -> dict[str, str]:
        """The greedy continuation of ``prompt`` by each version, in the order given.

        Raises:
            RequestError: the prompt is empty or no version is chosen.
            VersionNotFoundError: a version that this edit does not have.
        """
        prompt, versions = self._check(prompt, versions)
        out = {}
        for name in versions:
            with self.at(name) as session:
                out[name] = generate_greedy(session.model, session.tokenizer, [prompt], self.max_new_tokens)[0]
        return out

    def probabilities(self, prompt: str, versions: Sequence[str]) -> FactProbabilities | None:
        """p(new) and p(old) per version when ``prompt`` is an edit's prompt or paraphrase (its latest edit)."""
        prompt, versions = self._check(prompt, versions)
        request = self.fact_of(prompt)
        if request is None:
            return None
        p_new, p_old = {}, {}
        for name in versions:
            with self.at(name) as session:
                targets = [request.target_new, *([request.target_true] if request.target_true else [])]
                scores = score_targets(session.model, session.tokenizer, session.layout, [prompt] * len(targets),
                                       targets)
            p_new[name] = scores[0].prob
            if request.target_true:
                p_old[name] = scores[1].prob
        return FactProbabilities(request.target_new, request.target_true, p_new, p_old)

    def fact_of(self, prompt: str) -> EditRequest | None:
        """The latest edit whose rewrite prompt or a paraphrase is ``prompt``."""
        for report in reversed(self.session.rounds):
            for r in reversed(report.requests):
                if prompt.strip() in (r.request.text.strip(), *(p.strip() for p in r.request.paraphrases)):
                    return r.request
        return None

    def _check(self, prompt: str, versions: Sequence[str]) -> tuple[str, list[str]]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("the prompt is empty: type the start of a sentence for the versions to continue")
        if isinstance(versions, str) or not versions:
            raise RequestError(f"no version chosen: pass a list of versions, from {', '.join(self.versions)}")
        for name in versions:
            self.round_of(name)
        return prompt.rstrip(), list(dict.fromkeys(versions))

    # --- diff -------------------------------------------------------------------------------------------

    def version(self, name: str) -> Version:
        """Version ``name``'s history (for :func:`~nse_hub.lineage.diff_versions`)."""
        round = self.round_of(name)
        whole = self.session.as_version(name)
        return dataclasses.replace(whole, reports=whole.reports[:round], values=whole.values[:round])

    def diff(self, a: str, b: str, probe: bool = False) -> HistoryDiff:
        """The facts added, removed and changed from version ``a`` to ``b``; ``probe``: what each answers."""
        result = diff_versions(self.version(a), self.version(b))
        if probe:
            for side, name in (("a", a), ("b", b)):
                with self.at(name) as session:
                    probe_side(result, side, session.model, session.tokenizer, session.layout, self.max_new_tokens,
                               session.config.batch_size)
        return result

    # --- edit -------------------------------------------------------------------------------------------

    def run_round(self, requests: Sequence[RequestLike], progress: bool = True) -> RoundReport:
        """Write ``requests`` as the next round (a new version, not saved yet)."""
        parsed = parse_requests(requests, source="the new facts")
        with self._lock:
            return self.session.edit(parsed, progress=progress)

    def discard_round(self) -> int:
        """Drop the latest round if it was made here and not saved; returns the rounds left.

        Raises:
            VersionNotFoundError: the latest round is saved (it belongs to the edit that was loaded).
        """
        with self._lock:
            if len(self.session.rounds) <= self.saved_rounds:
                raise VersionNotFoundError(f"{self.latest} is saved: only a round made here and not saved yet can "
                                           "be discarded (roll back saved rounds with EditSession.rollback)")
            self.session.rollback(len(self.session.rounds) - 1)
            return len(self.session.rounds)

    def save(self, folder: str | Path) -> Path:
        """Save every version (the new rounds too) to ``folder`` as a saved edit."""
        with self._lock:
            self.session.save_pretrained(folder)
            self.saved_rounds = len(self.session.rounds)
        return Path(folder)

    def push(self, repo_id: str, branch: str | None = None, token: str | bool | None = None) -> list[PushedRound]:
        """Push the rounds the repo lacks (a commit and a tag each); the token comes from ``HF_TOKEN`` by default."""
        with self._lock:
            pushed = self.session.push_to_hub(repo_id, revision=branch or None, token=token)
            self.saved_rounds = len(self.session.rounds)
        return pushed


def read_new_facts(rows: Sequence[Sequence[Any]] | None, upload: str | Path | None) -> list[EditRequest]:
    """The facts of the Edit tab: an uploaded JSON/JSONL/CounterFact file, else the table's filled rows.

    Table rows are ``prompt`` (``{}`` where the subject goes), ``subject``, ``new answer``, ``old answer``.

    Raises:
        RequestError: no facts, or a row that is not a valid edit (its number and the reason).
    """
    if upload:
        return load_requests(upload)
    records = []
    for row in rows or []:
        cells = [str(c).strip() if c is not None else "" for c in row][:4]
        cells += [""] * (4 - len(cells))
        if any(cells):
            prompt, subject, new, old = cells
            records.append({"prompt": prompt, "subject": subject, "target_new": new, "target_true": old or None})
    if not records:
        raise RequestError("no new facts: fill a row of the table (prompt with {} for the subject, subject, new "
                           "answer) or upload a JSON/JSONL file of requests")
    return parse_requests(records, source="the table")


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"
