"""Edit metrics on CounterFact/zsRE-style requests, sequential-editing runs, and general ability.

The formulas live in the ``evaluate`` module :mod:`nse_hub.metrics` (``edit_metrics``); this module
measures what they need — teacher-forced per-token scores, greedy generations — in batches, and
labels every figure with its protocol:

* **final**: every edit evaluated once, after the last round (the NSE/AlphaEdit papers' protocol);
* **running**: after each round, the edits made so far;
* **base**: the unedited model on the same requests.

Teacher-forced and generation-based figures are always reported side by side. With
``EvalOptions(portability=cases)`` the MQuAKE cases' multi-hop questions are asked too (:mod:`nse_hub.multihop`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.ability import perplexity, perplexity_texts, suite_accuracy
from nse_hub.architectures import ModelLayout
from nse_hub.card import Metric
from nse_hub.errors import MissingFileError
from nse_hub.io import atomic_write_json, sha256_bytes
from nse_hub.metrics import compute_edit_metrics
from nse_hub.metrics.edit_metrics.edit_metrics import idf_from_vocab
from nse_hub.multihop import MultiHopCase, question_prompt
from nse_hub.probes import drop_unmeasured, mean_nlls, measure_probes, nll_inputs, token_inputs
from nse_hub.requests import EditRequest
from nse_hub.scoring import generate_greedy, score_targets

if TYPE_CHECKING:
    from nse_hub.session import EditSession

# The names and the order in which reports and cards show the metric module's outputs.
METRIC_NAMES = {
    "efficacy": "Efficacy", "generalization": "Generalization", "specificity": "Specificity", "score": "Score",
    "efficacy_generation": "Efficacy (generation)", "generalization_generation": "Generalization (generation)",
    "efficacy_token_accuracy": "Efficacy (token accuracy)",
    "generalization_token_accuracy": "Generalization (token accuracy)",
    "specificity_token_accuracy": "Specificity (token accuracy)",
    "efficacy_magnitude": "Efficacy magnitude", "generalization_magnitude": "Generalization magnitude",
    "specificity_magnitude": "Specificity magnitude", "fluency": "Fluency", "consistency": "Consistency",
    "portability": "Portability (multi-hop, new answer)",
    "portability_generation": "Portability (multi-hop, new answer, generation)",
    "portability_true": "Multi-hop accuracy (original answer)",
    "portability_true_generation": "Multi-hop accuracy (original answer, generation)",
}
PORTABILITY_METRICS = ("portability", "portability_generation", "portability_true", "portability_true_generation")
# An edited session's evaluation (final protocol) also measures the unedited model on the multi-hop questions: the
# "before" beside the "after", in the same results and card.
UNEDITED = "unedited_"
METRIC_NAMES.update({UNEDITED + key: f"{METRIC_NAMES[key]}, unedited model" for key in PORTABILITY_METRICS})
FLUENCY_METRICS = ("fluency", "consistency")  # what ``EvalOptions.fluency_records`` adds to the edit metrics
PART_RECORDS = 500  # records per saved part of a resumable evaluation (measure_requests(parts=...))


@dataclass
class EvalOptions:
    """What to measure besides the teacher-forced comparisons.

    Attributes:
        generation: greedy-generate after rewrite and paraphrase prompts and count an edit only when the
            continuation starts with the new answer ("The Mirage of Model Editing").
        generation_tokens: tokens generated for that test.
        fluency_records: how many records (the first ones) get ~100-token generations for fluency;
            their ``generation_prompts``, or their rewrite and paraphrase prompts when they have none.
        fluency_tokens: tokens per fluency generation.
            The same generations give consistency for records with ``reference_snippets``.
        idf: folder with ROME's ``idf.npy`` and ``tfidf_vocab.json`` for consistency (comparable
            with the papers); without it, the IDF comes from the texts being compared.
        batch_size: sequences per forward pass.
        generator: greedy generation at serving speed: ``generator(prompts, max_new_tokens) -> texts`` for
            the model being evaluated, e.g. ``VersionedLLM.generator("round-3")`` of :mod:`nse_hub.serving`
            in the serving environment (vLLM). Default: ``transformers`` ``generate`` on the session's model.
        portability: MQuAKE cases (:func:`nse_hub.multihop.load_multihop_cases`) whose multi-hop questions are
            asked, for the ``portability`` figures; in every protocol, always all of these cases. An edited
            session's final evaluation also measures its unedited model on them (``unedited_*`` figures).
        portability_tokens: tokens generated per multi-hop question.
    """

    generation: bool = True
    generation_tokens: int = 8
    fluency_records: int = 0
    fluency_tokens: int = 100
    idf: str | Path | None = None
    batch_size: int = 32
    generator: Callable[[Sequence[str], int], list[str]] | None = field(default=None, repr=False)
    portability: Sequence[MultiHopCase] | None = field(default=None, repr=False)
    portability_tokens: int = 10


@dataclass
class Evaluation:
    """Figures with their protocol, for JSON results, plots and model cards.

    ``portability_cases`` is the number of MQuAKE cases behind the ``portability*`` figures (0: none asked).
    """

    protocol: str
    model: str
    method: str | None
    edits: int
    rounds: int
    metrics: dict[str, float]
    general: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sample: int | None = None  # the figures cover a fixed random sample of this many of the ``edits``
    portability_cases: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def card_metrics(self, dataset_name: str = "edit requests") -> list[Metric]:
        kind = {"final": "final protocol: every edit evaluated after the last round",
                "running": "running protocol: edits so far, after this round",
                "base": "unedited model"}.get(self.protocol, self.protocol)
        if self.sample is not None:
            kind += f" (a fixed random sample of {self.sample} of the {self.edits} edits)"
        out = []
        for key, name in METRIC_NAMES.items():
            if key in self.metrics and not math.isnan(self.metrics[key]):
                measured = key.removeprefix(UNEDITED)
                style = MEASUREMENT_STYLES.get(measured,
                                               "generation-based" if "generation" in key else "teacher-forced")
                dataset = (f"MQuAKE multi-hop questions ({self.portability_cases} cases)", "mquake") \
                    if measured in PORTABILITY_METRICS else (dataset_name, "nse-hub-edits")
                where = "unedited model" if key.startswith(UNEDITED) else kind
                out.append(Metric(key, name, round(self.metrics[key], 1), f"{where}; {style}", *dataset))
        if "perplexity" in self.general:
            out.append(Metric("perplexity", "Perplexity (held-out text)", round(self.general["perplexity"], 2),
                              kind, "held-out text", "text"))
        return out


MEASUREMENT_STYLES = {
    "fluency": "generation-based: n-gram entropy of ~100-token greedy generations",
    "consistency": "generation-based: TF-IDF similarity with reference texts about the new answer",
    **{key: ("teacher-forced: a case counts when, after any of its questions, the "
             + ("new answer is more likely than the original" if key == "portability"
                else "original answer is more likely than the new"))
       for key in ("portability", "portability_true")},
    **{key: ("generation-based: a case counts when the greedy answer to any of its questions is the "
             + ("new" if key == "portability_generation" else "original") + " answer or an alias")
       for key in ("portability_generation", "portability_true_generation")},
}


def measure_requests(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                     requests: Sequence[EditRequest], options: EvalOptions | None = None,
                     parts: str | Path | None = None) -> dict[str, float]:
    """The edit metrics of ``requests`` on the model as it is now.

    Records with a ``target_true`` (CounterFact) are judged by comparing the new and the true
    target; records without one (zsRE) by token-level accuracy of the new answer.

    ``parts``: a folder where the per-record measurements are kept :data:`PART_RECORDS` records at a time, so
    that an interrupted evaluation of many records continues where it stopped (the caller keeps one folder per
    model version: the parts are named by the requests and options, not by the weights).
    """
    options = options or EvalOptions()
    inputs: dict[str, list] = {}
    size = PART_RECORDS if parts else max(1, len(requests))
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        chunk_options = replace(options, fluency_records=max(0, min(len(chunk), options.fluency_records - start)))
        path = Path(parts) / f"{_part_key(chunk, chunk_options)}.json" if parts else None
        if path is not None and path.is_file():
            measured = json.loads(path.read_text())
        else:
            measured = _record_inputs(model, tokenizer, layout, chunk, chunk_options)
            if path is not None:
                atomic_write_json(path, measured)
        for name, column in measured.items():
            inputs.setdefault(name, [None] * start).extend(column)
        for column in inputs.values():  # a kind this part lacks (e.g. fluency after the first records)
            column.extend([None] * (start + len(chunk) - len(column)))
    inputs = drop_unmeasured(inputs)
    extra = {"idf": read_idf(options.idf)} if options.idf and "consistency_generations" in inputs else {}
    return compute_edit_metrics(**inputs, **extra)


def _part_key(requests: Sequence[EditRequest], options: EvalOptions) -> str:
    described = {k: v for k, v in asdict(options).items() if k not in ("generator", "portability", "batch_size")}
    identity = json.dumps({"requests": [r.to_dict() for r in requests], "options": described}, sort_keys=True,
                          default=str)
    return sha256_bytes(identity.encode())[:32]


def _record_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                   requests: Sequence[EditRequest], options: EvalOptions) -> dict[str, list]:
    """The metric module's per-record inputs for ``requests`` (one list entry per record)."""
    found = measure_probes(model, tokenizer, layout, requests, options.batch_size)
    counterfact = [r.target_true is not None for r in requests]
    inputs = {**nll_inputs([mean_nlls(f) for f in found], counterfact), **token_inputs(found, counterfact)}
    if options.generation:
        _add_generations(inputs, model, tokenizer, requests, options)
    if options.fluency_records:
        _add_fluency(inputs, model, tokenizer, requests, options)
    return inputs


def _add_generations(inputs: dict[str, list], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     requests: Sequence[EditRequest], options: EvalOptions) -> None:
    prompts = [p for r in requests for p in (r.text, *r.paraphrases)]
    outputs = iter(_generate(model, tokenizer, prompts, options.generation_tokens, options))
    rewrite, paraphrase = [], []
    for r in requests:
        rewrite.append([next(outputs)])
        paraphrase.append([next(outputs) for _ in r.paraphrases])
    inputs.update(rewrite_generations=rewrite, paraphrase_generations=paraphrase,
                  targets_new=[r.target_new for r in requests])


def _add_fluency(inputs: dict[str, list], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 requests: Sequence[EditRequest], options: EvalOptions) -> None:
    chosen = requests[: options.fluency_records]
    prompt_lists = [list(r.generation_prompts or (r.text, *r.paraphrases)) for r in chosen]
    flat = [p for prompts in prompt_lists for p in prompts]
    outputs = iter(_generate(model, tokenizer, flat, options.fluency_tokens, options))
    generations: list[list[str] | None] = [[next(outputs) for _ in prompts] for prompts in prompt_lists]
    generations += [None] * (len(requests) - len(chosen))
    inputs["fluency_generations"] = generations
    if any(r.reference_snippets for r in chosen):
        inputs["consistency_generations"] = [g if r.reference_snippets else None
                                             for g, r in zip(generations, requests)]
        inputs["reference_snippets"] = [list(r.reference_snippets) or None for r in requests]


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int,
              options: EvalOptions) -> list[str]:
    if options.generator is not None:
        return list(options.generator(prompts, max_new_tokens))
    return generate_greedy(model, tokenizer, prompts, max_new_tokens, options.batch_size)


def measure_portability(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                        cases: Sequence[MultiHopCase], options: EvalOptions | None = None) -> dict[str, float]:
    """The multi-hop figures of MQuAKE ``cases`` on the model as it is now (``portability``, ``portability_true``
    and their generation-based forms; see the metric module).

    Every question is asked in :func:`nse_hub.multihop.question_prompt`'s few-shot format. Teacher forced, the
    new and the original answer (not their aliases, whose lengths differ wildly) are scored after it; with
    ``options.generation``, a greedy answer of ``options.portability_tokens`` tokens is judged against the answer
    and its aliases.
    """
    options = options or EvalOptions()
    prompts = [question_prompt(q) for case in cases for q in case.questions]
    targets = [t for case in cases for _ in case.questions for t in (case.new_answer, case.answer)]
    scores = iter(score_targets(model, tokenizer, layout, [p for p in prompts for _ in range(2)], targets,
                                options.batch_size))
    new_nll, true_nll = [], []
    for case in cases:
        pairs = [(next(scores).mean_nll, next(scores).mean_nll) for _ in case.questions]
        new_nll.append([new for new, _ in pairs])
        true_nll.append([true for _, true in pairs])
    inputs: dict[str, list] = {"portability_new_nll": new_nll, "portability_true_nll": true_nll}
    if options.generation:
        outputs = iter(_generate(model, tokenizer, prompts, options.portability_tokens, options))
        inputs.update(portability_generations=[[next(outputs) for _ in case.questions] for case in cases],
                      portability_new_answers=[list(case.new_answers) for case in cases],
                      portability_true_answers=[list(case.answers) for case in cases])
    return compute_edit_metrics(**inputs)


def read_idf(folder: str | Path) -> dict[str, float]:
    """ROME's IDF table (``idf.npy`` + ``tfidf_vocab.json``) as word -> IDF."""
    import numpy

    folder = Path(folder)
    missing = [name for name in ("idf.npy", "tfidf_vocab.json") if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(f"{folder} lacks {', '.join(missing)}: give the folder holding ROME's idf.npy "
                                "and tfidf_vocab.json, or leave idf unset to use the IDF of the compared texts")
    return idf_from_vocab(json.loads((folder / "tfidf_vocab.json").read_text()), numpy.load(folder / "idf.npy"))


def general_ability(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                    suite: str | Path, examples_per_task: int = 100, perplexity_count: int = 200,
                    batch_size: int = 32) -> dict[str, Any]:
    """Zero-shot suite accuracy per task and perplexity on held-out text from the suite folder."""
    tasks = suite_accuracy(model, tokenizer, layout, suite, examples_per_task, batch_size=batch_size)
    texts = perplexity_texts(suite, perplexity_count, skip=examples_per_task)
    return {"tasks": tasks, "perplexity": perplexity(model, tokenizer, layout, texts, batch_size),
            "examples_per_task": examples_per_task, "perplexity_texts": len(texts)}


def _session_portability(session: EditSession, cases: Sequence[MultiHopCase], options: EvalOptions,
                         unedited: bool) -> dict[str, float]:
    figures = measure_portability(session.model, session.tokenizer, session.layout, cases, options)
    if unedited and session.rounds and options.generator is None:  # a generator serves one version only
        with session.deltas.original():
            before = measure_portability(session.model, session.tokenizer, session.layout, cases, options)
        figures.update({UNEDITED + key: value for key, value in before.items()})
    return figures


def _requests_of(session: EditSession) -> list[EditRequest]:
    return [r.request for report in session.rounds for r in report.requests]


def evaluate_session(session: EditSession, requests: Sequence[EditRequest] | None = None, *,
                     protocol: str = "final", options: EvalOptions | None = None, suite: str | Path | None = None,
                     suite_examples: int = 100, record: bool = True, parts: str | Path | None = None) -> Evaluation:
    """Evaluate the session's current model on ``requests`` (default: every edit it made).

    With ``record``, the figures are kept in ``session.evaluations`` for the current version, so that
    its model card (written by ``save_pretrained``/``push_to_hub``) reports them. ``parts``: keep the per-record
    measurements there, so that an interrupted evaluation continues (see :func:`measure_requests`).
    """
    started = time.perf_counter()
    requests = list(requests) if requests is not None else _requests_of(session)
    metrics = measure_requests(session.model, session.tokenizer, session.layout, requests, options, parts) \
        if requests else {}
    cases = list(options.portability or []) if options else []
    if cases:
        metrics.update(_session_portability(session, cases, options, unedited=protocol == "final"))
    general = (general_ability(session.model, session.tokenizer, session.layout, suite, suite_examples,
                               batch_size=session.config.batch_size) if suite else {})
    result = Evaluation(protocol=protocol if session.rounds else "base", model=session.base.name_or_path,
                        method=session.config.method if session.rounds else None, edits=len(requests),
                        rounds=len(session.rounds), metrics=metrics, general=general,
                        seconds=round(time.perf_counter() - started, 1), portability_cases=len(cases))
    if record and session.rounds:
        session.evaluations[len(session.rounds)] = result.card_metrics()
    return result
