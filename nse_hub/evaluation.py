"""Edit metrics on CounterFact/zsRE-style requests, sequential-editing runs, and general ability.

The formulas live in the ``evaluate`` module :mod:`nse_hub.metrics` (``edit_metrics``); this module
measures what they need — teacher-forced per-token scores, greedy generations — in batches, and
labels every figure with its protocol:

* **final**: every edit evaluated once, after the last round (the NSE/AlphaEdit papers' protocol);
* **running**: after each round, the edits made so far;
* **base**: the unedited model on the same requests.

Teacher-forced and generation-based figures are always reported side by side.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.ability import perplexity, perplexity_texts, suite_accuracy
from nse_hub.architectures import ModelLayout
from nse_hub.card import Metric
from nse_hub.errors import MissingFileError
from nse_hub.metrics import compute_edit_metrics
from nse_hub.metrics.edit_metrics.edit_metrics import idf_from_vocab
from nse_hub.probes import drop_unmeasured, mean_nlls, measure_probes, nll_inputs, token_inputs
from nse_hub.requests import EditRequest
from nse_hub.scoring import generate_greedy

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
}
FLUENCY_METRICS = ("fluency", "consistency")  # what ``EvalOptions.fluency_records`` adds to the edit metrics


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
    """

    generation: bool = True
    generation_tokens: int = 8
    fluency_records: int = 0
    fluency_tokens: int = 100
    idf: str | Path | None = None
    batch_size: int = 32
    generator: Callable[[Sequence[str], int], list[str]] | None = field(default=None, repr=False)


@dataclass
class Evaluation:
    """Figures with their protocol, for JSON results, plots and model cards."""

    protocol: str
    model: str
    method: str | None
    edits: int
    rounds: int
    metrics: dict[str, float]
    general: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sample: int | None = None  # the figures cover a fixed random sample of this many of the ``edits``

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
                style = MEASUREMENT_STYLES.get(key, "generation-based" if "generation" in key else "teacher-forced")
                out.append(Metric(key, name, round(self.metrics[key], 1), f"{kind}; {style}", dataset_name,
                                  "nse-hub-edits"))
        if "perplexity" in self.general:
            out.append(Metric("perplexity", "Perplexity (held-out text)", round(self.general["perplexity"], 2),
                              kind, "held-out text", "text"))
        return out


MEASUREMENT_STYLES = {
    "fluency": "generation-based: n-gram entropy of ~100-token greedy generations",
    "consistency": "generation-based: TF-IDF similarity with reference texts about the new answer",
}


def measure_requests(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                     requests: Sequence[EditRequest], options: EvalOptions | None = None) -> dict[str, float]:
    """The edit metrics of ``requests`` on the model as it is now.

    Records with a ``target_true`` (CounterFact) are judged by comparing the new and the true
    target; records without one (zsRE) by token-level accuracy of the new answer.
    """
    options = options or EvalOptions()
    found = measure_probes(model, tokenizer, layout, requests, options.batch_size)
    counterfact = [r.target_true is not None for r in requests]
    inputs = {**nll_inputs([mean_nlls(f) for f in found], counterfact), **token_inputs(found, counterfact)}
    if options.generation:
        _add_generations(inputs, model, tokenizer, requests, options)
    if options.fluency_records:
        _add_fluency(inputs, model, tokenizer, requests, options)
    inputs = drop_unmeasured(inputs)
    extra = {"idf": read_idf(options.idf)} if options.idf and "consistency_generations" in inputs else {}
    return compute_edit_metrics(**inputs, **extra)


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


def _requests_of(session: EditSession) -> list[EditRequest]:
    return [r.request for report in session.rounds for r in report.requests]


def evaluate_session(session: EditSession, requests: Sequence[EditRequest] | None = None, *,
                     protocol: str = "final", options: EvalOptions | None = None, suite: str | Path | None = None,
                     suite_examples: int = 100, record: bool = True) -> Evaluation:
    """Evaluate the session's current model on ``requests`` (default: every edit it made).

    With ``record``, the figures are kept in ``session.evaluations`` for the current version, so that
    its model card (written by ``save_pretrained``/``push_to_hub``) reports them.
    """
    started = time.perf_counter()
    requests = list(requests) if requests is not None else _requests_of(session)
    metrics = measure_requests(session.model, session.tokenizer, session.layout, requests, options) \
        if requests else {}
    general = (general_ability(session.model, session.tokenizer, session.layout, suite, suite_examples,
                               batch_size=session.config.batch_size) if suite else {})
    result = Evaluation(protocol=protocol if session.rounds else "base", model=session.base.name_or_path,
                        method=session.config.method if session.rounds else None, edits=len(requests),
                        rounds=len(session.rounds), metrics=metrics, general=general,
                        seconds=round(time.perf_counter() - started, 1))
    if record and session.rounds:
        session.evaluations[len(session.rounds)] = result.card_metrics()
    return result
