"""What an edit round did: per request before/after scores, residuals, neurons and timings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nse_hub.requests import EditRequest, parse_request
from nse_hub.scoring import TargetScore


@dataclass
class ProbeResult:
    """A paraphrase or neighbourhood prompt scored before and after the round.

    ``success_*``: a paraphrase says the new target rather than the old one; a neighbour keeps its
    answer rather than taking the new target (mean per-token NLL comparison, as in METRICS.md).
    """

    prompt: str
    answer: str
    p_answer_before: float
    p_answer_after: float
    p_new_before: float
    p_new_after: float
    success_before: bool
    success_after: bool


@dataclass
class RequestReport:
    """One request of a round.

    Probabilities are teacher-forced joint probabilities of the whole target after the rewrite
    prompt; ``success_*`` compares mean per-token NLLs of the new and the true target.
    """

    request: EditRequest
    p_new_before: float
    p_new_after: float
    p_true_before: float | None
    p_true_after: float | None
    success_before: bool | None
    success_after: bool | None
    residual_before: float
    residual_after: float
    value_loss: float
    value_steps: int
    edited_in_passes: list[bool]
    paraphrases: list[ProbeResult] = field(default_factory=list)
    neighbors: list[ProbeResult] = field(default_factory=list)


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


@dataclass
class RoundReport:
    """The outcome of ``session.edit``: one round.

    Attributes:
        round: 1-based index of the round.
        method: ``nse`` or ``memit``.
        requests: per-request results.
        selected_neurons: per edit layer, neurons updated in each pass.
        seconds: wall-clock seconds per phase (``stats``, ``templates``, ``values``, ``keys``, ``solve``,
            ``scoring``) and ``total``.
    """

    round: int
    method: str
    requests: list[RequestReport]
    selected_neurons: dict[int, list[int]]
    seconds: dict[str, float]
    created: str = ""

    # --- summaries ---------------------------------------------------------------------------------

    def efficacy(self, after: bool = True) -> float | None:
        """Share of requests whose new target beats the true one on the rewrite prompt."""
        flags = [r.success_after if after else r.success_before for r in self.requests]
        return _share([f for f in flags if f is not None])

    def generalization(self, after: bool = True) -> float | None:
        """Per request share of paraphrases that prefer the new target, averaged over requests."""
        shares = [_share([p.success_after if after else p.success_before for p in r.paraphrases])
                  for r in self.requests if r.paraphrases]
        return sum(shares) / len(shares) if shares else None

    def specificity(self, after: bool = True) -> float | None:
        """Per request share of neighbours that keep their answer, averaged over requests."""
        shares = [_share([p.success_after if after else p.success_before for p in r.neighbors])
                  for r in self.requests if r.neighbors]
        return sum(shares) / len(shares) if shares else None

    def summary(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "method": self.method,
            "edits": len(self.requests),
            **{f"{name}_{when}": getattr(self, name)(after=when == "after")
               for name in ("efficacy", "generalization", "specificity") for when in ("before", "after")},
            "seconds": self.seconds,
        }

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
            ok = {True: "✓", False: "✗", None: "–"}[r.success_after]
            table.add_row(r.request.text, f"{old} → {r.request.target_new}",
                          f"{r.p_new_before:.3f} → {r.p_new_after:.3f}", p_old, ok)
        metrics = []
        for name in ("efficacy", "generalization", "specificity"):
            before, after = getattr(self, name)(after=False), getattr(self, name)(after=True)
            if after is not None:
                metrics.append(f"{name} {100 * before:.0f} → {100 * after:.0f}")
        if metrics:
            table.caption = " · ".join(metrics)
        return table

    # --- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for r, raw in zip(self.requests, data["requests"]):
            raw["request"] = r.request.to_dict()
        data["selected_neurons"] = {str(k): v for k, v in self.selected_neurons.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundReport:
        requests = []
        for raw in data["requests"]:
            raw = dict(raw)
            raw["request"] = parse_request(raw["request"])
            raw["paraphrases"] = [ProbeResult(**p) for p in raw.get("paraphrases", [])]
            raw["neighbors"] = [ProbeResult(**p) for p in raw.get("neighbors", [])]
            requests.append(RequestReport(**raw))
        return cls(round=data["round"], method=data["method"], requests=requests,
                   selected_neurons={int(k): v for k, v in data["selected_neurons"].items()},
                   seconds=data["seconds"], created=data.get("created", ""))


def compare(new: TargetScore, old: TargetScore) -> bool:
    """The field's test: the first target is more likely (lower mean per-token NLL) than the second."""
    return new.mean_nll < old.mean_nll
