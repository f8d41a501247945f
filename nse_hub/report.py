"""What an edit round did: per request before/after scores, residuals, neurons and timings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nse_hub.io import json_text
from nse_hub.metrics import compute_edit_metrics
from nse_hub.metrics.edit_metrics.edit_metrics import comparison_record
from nse_hub.probes import ProbeScores
from nse_hub.requests import EditRequest, parse_request
from nse_hub.scoring import TargetScore


def _wins(new_nll: float | None, other_nll: float | None, new_should_win: bool) -> bool | None:
    """One prompt's success by the metric module's rule (``None`` when a score is missing)."""
    record = comparison_record([new_nll], [other_nll], new_should_win=new_should_win)
    return None if record is None else record[0] == 1.0


@dataclass
class ProbeResult:
    """A paraphrase or neighbourhood prompt scored before and after the round.

    ``nll_*`` are mean per-token NLLs (what the metric module judges by), ``p_*`` joint probabilities
    (what tables show). A paraphrase succeeds when the new target is more likely than the old answer;
    a neighbour when its own answer stays more likely than the new target.
    """

    kind: Literal["paraphrase", "neighborhood"]
    prompt: str
    answer: str
    p_answer_before: float | None
    p_answer_after: float | None
    p_new_before: float
    p_new_after: float
    nll_answer_before: float | None = None
    nll_answer_after: float | None = None
    nll_new_before: float | None = None
    nll_new_after: float | None = None

    def success(self, after: bool = True) -> bool | None:
        new, answer = ((self.nll_new_after, self.nll_answer_after) if after
                       else (self.nll_new_before, self.nll_answer_before))
        return _wins(new, answer, new_should_win=self.kind == "paraphrase")


@dataclass
class RequestReport:
    """One request of a round: teacher-forced scores of its targets before and after the round.

    ``p_*`` are joint probabilities of the whole target after the rewrite prompt, ``nll_*`` mean per-token NLLs.
    """

    request: EditRequest
    p_new_before: float
    p_new_after: float
    p_true_before: float | None
    p_true_after: float | None
    residual_before: float
    residual_after: float
    value_loss: float
    value_steps: int
    edited_in_passes: list[bool]
    paraphrases: list[ProbeResult] = field(default_factory=list)
    neighbors: list[ProbeResult] = field(default_factory=list)
    nll_new_before: float | None = None
    nll_new_after: float | None = None
    nll_true_before: float | None = None
    nll_true_after: float | None = None
    norm_skipped: bool = False  # NAS norm anchoring left this request unwritten (its value norm was too large)

    def success(self, after: bool = True) -> bool | None:
        """Whether the new target beats the true one on the rewrite prompt (``None`` without a true target)."""
        new, true = (self.nll_new_after, self.nll_true_after) if after else (self.nll_new_before, self.nll_true_before)
        return _wins(new, true, new_should_win=True)

    @property
    def success_after(self) -> bool | None:
        return self.success(after=True)

    def metric_inputs(self, after: bool = True) -> dict[str, Any]:
        """This request's inputs of the metric module (one record)."""
        when = "after" if after else "before"
        paraphrases, neighbors = self.paraphrases, self.neighbors
        return {
            "rewrite_new_nll": getattr(self, f"nll_new_{when}"),
            "rewrite_true_nll": getattr(self, f"nll_true_{when}"),
            "paraphrase_new_nll": [getattr(p, f"nll_new_{when}") for p in paraphrases],
            "paraphrase_true_nll": [getattr(p, f"nll_answer_{when}") for p in paraphrases],
            "neighborhood_true_nll": [getattr(n, f"nll_answer_{when}") for n in neighbors],
            "neighborhood_new_nll": [getattr(n, f"nll_new_{when}") for n in neighbors],
        }


# The metrics a round's before/after scores give, in the order tables show them.
ROUND_METRICS = ("efficacy", "generalization", "specificity")


def edit_metrics(requests: Sequence[RequestReport], after: bool = True) -> dict[str, float]:
    """Efficacy, generalization and specificity (×100, with magnitudes) of ``requests`` by the metric module."""
    records = [r.metric_inputs(after) for r in requests]
    inputs = {name: [record[name] for record in records] for name in records[0]} if records else {}
    inputs = {name: [None if v == [] else v for v in values] for name, values in inputs.items()}
    inputs = {name: values for name, values in inputs.items() if any(v is not None for v in values)}
    return compute_edit_metrics(**inputs) if inputs else {}


@dataclass
class RoundReport:
    """The outcome of ``session.edit``: one round.

    Attributes:
        round: 1-based index of the round.
        method: the edit method (``nse``, ``memit``, …).
        requests: per-request results.
        selected_neurons: per edit layer, neurons updated in each pass.
        seconds: wall-clock seconds per phase (``stats``, ``templates``, ``values``, ``keys``, ``solve``,
            ``scoring``) and ``total``.
        created: when the round was made (ISO 8601, UTC).
        nullspace_dims: AlphaEdit: per edit layer, the dimensions of ``C``'s null space the update used.
        norm_anchor: with NAS norm anchoring: the anchor norm the values were rescaled to.
    """

    round: int
    method: str
    requests: list[RequestReport]
    selected_neurons: dict[int, list[int]]
    seconds: dict[str, float]
    created: str = ""
    nullspace_dims: dict[int, int] = field(default_factory=dict)
    norm_anchor: float | None = None

    def metrics(self, after: bool = True) -> dict[str, float]:
        """This round's edit metrics (×100) on its own requests, before or after it.

        Computed once per report (a round's results never change; every card of later versions shows them).
        """
        cache = self.__dict__.setdefault("_metrics", {})
        if after not in cache:
            cache[after] = edit_metrics(self.requests, after)
        return dict(cache[after])

    # --- display ---------------------------------------------------------------------------------

    def table(self) -> Any:
        """A ``rich`` table of the round (subject, prompt, old → new, probabilities before → after)."""
        from rich.table import Table

        table = Table(title=f"Round {self.round} ({self.method.upper()}, {len(self.requests)} edits, "
                            f"{self.seconds.get('total', 0):.1f} s)")
        for column in ("prompt", "old → new", "P(new) before → after", "P(old) before → after", "ok"):
            table.add_column(column, overflow="fold")
        for r in self.requests:
            old = r.request.target_true or "?"
            p_old = (f"{r.p_true_before:.3f} → {r.p_true_after:.3f}" if r.p_true_before is not None else "–")
            ok = {True: "✓", False: "✗", None: "–"}[r.success()]
            table.add_row(r.request.text, f"{old} → {r.request.target_new}",
                          f"{r.p_new_before:.3f} → {r.p_new_after:.3f}", p_old, ok)
        before, after = self.metrics(after=False), self.metrics(after=True)
        shown = [f"{name} {before[name]:.0f} → {after[name]:.0f}" for name in ROUND_METRICS if name in after]
        if shown:
            table.caption = " · ".join(shown)
        return table

    # --- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for r, raw in zip(self.requests, data["requests"]):
            raw["request"] = r.request.to_dict()
        data["selected_neurons"] = {str(k): v for k, v in self.selected_neurons.items()}
        data["nullspace_dims"] = {str(k): v for k, v in self.nullspace_dims.items()}
        return data

    def saved_json(self) -> bytes:
        """The report as ``report.json`` holds it.

        Made once per report and reused by every later save (a round's results never change; its timings may still
        be completed after ``session.edit`` returns, so they are part of the cache key).
        """
        key = json.dumps(self.seconds, sort_keys=True)
        cached = self.__dict__.get("_saved_json")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_saved_json"] = (key, json_text(self.to_dict()).encode("utf-8"))
        return cached[1]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundReport:
        requests = []
        for raw in data["requests"]:
            raw = dict(raw)
            raw["request"] = parse_request(raw["request"])
            raw["paraphrases"] = [_probe(p, "paraphrase") for p in raw.get("paraphrases", [])]
            raw["neighbors"] = [_probe(p, "neighborhood") for p in raw.get("neighbors", [])]
            requests.append(RequestReport(**_known(RequestReport, raw)))
        return cls(round=data["round"], method=data["method"], requests=requests,
                   selected_neurons={int(k): v for k, v in data["selected_neurons"].items()},
                   seconds=data["seconds"], created=data.get("created", ""),
                   nullspace_dims={int(k): v for k, v in data.get("nullspace_dims", {}).items()},
                   norm_anchor=data.get("norm_anchor"))


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``raw`` that are fields of ``cls`` (reports of nse-hub 0.1 also stored success flags)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _probe(raw: dict[str, Any], kind: str) -> ProbeResult:
    return ProbeResult(**_known(ProbeResult, {"kind": kind, **raw}))


def _first(scores: ProbeScores, kind: str) -> TargetScore | None:
    found = scores.get(kind)
    return found[0] if found else None


def _probes(kind: str, prompts: Sequence[str], answers: Sequence[str], answer_kind: str, new_kind: str,
            before: ProbeScores, after: ProbeScores) -> list[ProbeResult]:
    results: list[ProbeResult] = []
    if new_kind not in before:  # not scored (a round with probes="rewrite")
        return results
    for k, (prompt, answer) in enumerate(zip(prompts, answers)):
        answer_b = before.get(answer_kind, [None] * (k + 1))[k]
        answer_a = after.get(answer_kind, [None] * (k + 1))[k]
        new_b, new_a = before[new_kind][k], after[new_kind][k]
        results.append(ProbeResult(
            kind=kind, prompt=prompt, answer=answer,
            p_answer_before=answer_b.prob if answer_b else None, p_answer_after=answer_a.prob if answer_a else None,
            p_new_before=new_b.prob, p_new_after=new_a.prob,
            nll_answer_before=answer_b.mean_nll if answer_b else None,
            nll_answer_after=answer_a.mean_nll if answer_a else None,
            nll_new_before=new_b.mean_nll, nll_new_after=new_a.mean_nll))
    return results


def request_report(request: EditRequest, before: ProbeScores, after: ProbeScores, outcome: Any,
                   i: int) -> RequestReport:
    """Request ``i`` of a round: its probe scores before and after, and what the algorithm did for it."""
    new_b, new_a = _first(before, "rewrite_new"), _first(after, "rewrite_new")
    true_b, true_a = _first(before, "rewrite_true"), _first(after, "rewrite_true")
    return RequestReport(
        request=request,
        p_new_before=new_b.prob, p_new_after=new_a.prob,
        p_true_before=true_b.prob if true_b else None, p_true_after=true_a.prob if true_a else None,
        nll_new_before=new_b.mean_nll, nll_new_after=new_a.mean_nll,
        nll_true_before=true_b.mean_nll if true_b else None, nll_true_after=true_a.mean_nll if true_a else None,
        residual_before=outcome.residual_before[i], residual_after=outcome.residual_after[i],
        value_loss=outcome.values.loss[i], value_steps=outcome.values.steps[i],
        edited_in_passes=[kept[i] for kept in outcome.kept],
        norm_skipped=bool(outcome.norm_skipped[i]) if outcome.norm_skipped else False,
        paraphrases=_probes("paraphrase", request.paraphrases, [request.target_true or ""] * len(request.paraphrases),
                            "paraphrase_true", "paraphrase_new", before, after),
        neighbors=_probes("neighborhood", [n.prompt for n in request.neighbors],
                          [n.answer for n in request.neighbors], "neighborhood_true", "neighborhood_new",
                          before, after))  # both empty where the round scored its rewrite prompts only
