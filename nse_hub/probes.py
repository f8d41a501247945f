"""The one probe plan: which prompt is scored with which target for each edit request.

Both the before/after report of a round and the evaluation harness measure through :func:`measure_probes`,
and both turn the scores into figures through the ``evaluate`` metric module (:mod:`nse_hub.metrics`), whose
input names the probe kinds follow: ``rewrite_new`` is the new target after the rewrite prompt,
``paraphrase_true`` the true target after each paraphrase, ``neighborhood_true`` each neighbourhood prompt's
own answer, ``neighborhood_new`` the new target there, and so on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.requests import EditRequest
from nse_hub.scoring import TargetScore, score_targets

# Kinds whose per-record mean NLLs are inputs ``<kind>_nll`` of the metric module.
NLL_KINDS = ("rewrite_new", "rewrite_true", "paraphrase_new", "paraphrase_true", "neighborhood_true",
             "neighborhood_new")
# Kinds whose per-token argmax hits are inputs ``<prompt>_token_correct`` (records without a target_true: zsRE).
TOKEN_KINDS = {"rewrite_token_correct": "rewrite_new", "paraphrase_token_correct": "paraphrase_new",
               "neighborhood_token_correct": "neighborhood_true"}

ProbeScores = dict[str, list[TargetScore]]


@dataclass(frozen=True)
class ProbeItem:
    """One scored continuation: ``target`` after ``prompt``, for request ``record``."""

    record: int
    kind: str
    prompt: str
    target: str


def probe_plan(requests: Sequence[EditRequest], rewrite_only: bool = False) -> list[ProbeItem]:
    """Every (prompt, target) pair the edit metrics of ``requests`` need, in a fixed order.

    ``rewrite_only``: only the rewrite prompts (efficacy), none of the paraphrases and neighbours.
    """
    plan: list[ProbeItem] = []
    for i, r in enumerate(requests):
        plan.append(ProbeItem(i, "rewrite_new", r.text, r.target_new))
        if r.target_true:
            plan.append(ProbeItem(i, "rewrite_true", r.text, r.target_true))
        if rewrite_only:
            continue
        for p in r.paraphrases:
            plan.append(ProbeItem(i, "paraphrase_new", p, r.target_new))
            if r.target_true:
                plan.append(ProbeItem(i, "paraphrase_true", p, r.target_true))
        for n in r.neighbors:
            plan.append(ProbeItem(i, "neighborhood_true", n.prompt, n.answer))
            plan.append(ProbeItem(i, "neighborhood_new", n.prompt, r.target_new))
    return plan


def measure_probes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                   requests: Sequence[EditRequest], batch_size: int = 32,
                   rewrite_only: bool = False) -> list[ProbeScores]:
    """Per request, the teacher-forced scores of each probe kind (lists in prompt order); see :func:`probe_plan`."""
    plan = probe_plan(requests, rewrite_only)
    scores = score_targets(model, tokenizer, layout, [p.prompt for p in plan], [p.target for p in plan],
                           batch_size)
    found: list[ProbeScores] = [{} for _ in requests]
    for item, score in zip(plan, scores):
        found[item.record].setdefault(item.kind, []).append(score)
    return found


def mean_nlls(scores: ProbeScores) -> dict[str, list[float]]:
    """The mean per-token NLL of every probe of one request, by kind."""
    return {kind: [s.mean_nll for s in found] for kind, found in scores.items()}


def nll_inputs(records: Sequence[dict[str, list[float]] | None], counterfact: Sequence[bool]) -> dict[str, list]:
    """The metric module's ``*_nll`` inputs from per-record NLLs by kind.

    Records that are not ``counterfact`` (no ``target_true``) get ``None``: they are judged by token accuracy.
    """
    inputs: dict[str, list] = {}
    for kind in NLL_KINDS:
        column = []
        for nlls, judged in zip(records, counterfact):
            values = nlls.get(kind, []) if (nlls is not None and judged) else None
            if values is not None and kind.startswith("rewrite_"):
                values = values[0] if values else None
            column.append(values)
        inputs[f"{kind}_nll"] = column
    return inputs


def token_inputs(found: Sequence[ProbeScores], counterfact: Sequence[bool]) -> dict[str, list]:
    """The metric module's ``*_token_correct`` inputs for records without a ``target_true`` (zsRE)."""
    return {name: [None if judged else [[float(c) for c in s.token_correct] for s in scores.get(kind, [])]
                   for scores, judged in zip(found, counterfact)]
            for name, kind in TOKEN_KINDS.items()}


def drop_unmeasured(inputs: dict[str, list]) -> dict[str, list]:
    """Leave out inputs that no record has, so that the module reports only measured figures."""
    return {name: values for name, values in inputs.items() if not all(v is None or v == [] for v in values)}
