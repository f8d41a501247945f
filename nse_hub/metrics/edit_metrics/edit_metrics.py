"""Model-editing metrics with the MEMIT / AlphaEdit / NSE definitions, as an `evaluate` metric.

This file is the one place where the formulas live. The evaluation harness measures, per edit record, teacher-forced
mean NLLs, per-token argmax hits and greedy generations, and this metric turns them into the reported numbers.
It is a self-contained `evaluate` script (``evaluate.load`` copies it into its modules cache), so it imports nothing
from ``nse_hub``. The plain functions below (``n_gram_entropy``, ``generation_success``, ``tfidf_cosine``, ...) are the
building blocks of ``EditMetrics._compute`` and can be used on their own.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

_CITATION = """\
@article{meng2022locating,
  title={Locating and Editing Factual Associations in {GPT}},
  author={Kevin Meng and David Bau and Alex Andonian and Yonatan Belinkov},
  journal={Advances in Neural Information Processing Systems},
  volume={35},
  year={2022}
}
@inproceedings{meng2023memit,
  title={Mass-Editing Memory in a Transformer},
  author={Kevin Meng and Arnab Sen Sharma and Alex Andonian and Yonatan Belinkov and David Bau},
  booktitle={The Eleventh International Conference on Learning Representations},
  year={2023}
}
@inproceedings{fang2025alphaedit,
  title={AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models},
  author={Junfeng Fang and Houcheng Jiang and Kun Wang and Yunshan Ma and Xiang Wang and Xiangnan He and Tat-Seng Chua},
  booktitle={The Thirteenth International Conference on Learning Representations},
  year={2025}
}
@article{jiang2024nse,
  title={Neuron-Level Sequential Editing for Large Language Models},
  author={Houcheng Jiang and Junfeng Fang and Tianyu Zhang and An Zhang and Ruipeng Wang and Tao Liang
          and Xiang Wang},
  journal={arXiv preprint arXiv:2410.04045},
  year={2024}
}
@inproceedings{zhong2023mquake,
  title={{MQuAKE}: Assessing Knowledge Editing in Language Models via Multi-Hop Questions},
  author={Zexuan Zhong and Zhengxuan Wu and Christopher D. Manning and Christopher Potts and Danqi Chen},
  booktitle={Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing},
  year={2023}
}
@article{yang2025mirage,
  title={The Mirage of Model Editing: Revisiting Evaluation in the Wild},
  author={Wanli Yang and Fei Sun and Jiajun Tan and Xinyu Ma and Qi Cao and Dawei Yin and Huawei Shen
          and Xueqi Cheng},
  journal={arXiv preprint arXiv:2502.11177},
  year={2025}
}
"""

_DESCRIPTION = """\
Knowledge-editing metrics as defined by ROME/MEMIT and used by AlphaEdit and NSE, so that numbers are comparable
with those papers. Every value is reported x100.

CounterFact (teacher forced; each prompt scores a target by its mean per-token NLL):
- efficacy: share of records whose target_new is strictly more likely than target_true on the rewrite prompt
  (new_nll < true_nll).
- generalization: the same test, averaged over the record's paraphrase prompts.
- specificity: share of the record's neighbourhood prompts where target_true stays strictly more likely than
  target_new (true_nll < new_nll).
- *_magnitude: MEMIT's probability margins, p(new) - p(true) (efficacy, generalization) and p(true) - p(new)
  (specificity), with p = exp(-mean NLL).
- score: harmonic mean of efficacy, generalization and specificity.
zsRE: token-level teacher-forced top-1 accuracy (tokens, then prompts, then records).
Generation-based success ("The Mirage of Model Editing"): the greedy continuation starts with target_new.
Fluency: ROME's weighted bigram/trigram entropy of greedy generations. Consistency: TF-IDF cosine similarity between
the generations and reference snippets about target_new.
Multi-hop portability (MQuAKE): a case counts when ANY of its multi-hop questions is answered with the new answer
(portability, portability_generation) or the original one (portability_true, portability_true_generation).
Averages are always taken per record first, then over records.
"""

_KWARGS_DESCRIPTION = """\
Every input is a list with one entry per edit record; all inputs are optional, and an output is reported only when
at least one record has everything it needs. Missing values (None, or NaN for numbers) are skipped: a missing prompt
is left out of its record's average, and a record with nothing left is left out of that metric only.

Args:
    rewrite_new_nll (`list` of `float`): mean per-token NLL of target_new on the rewrite prompt.
    rewrite_true_nll (`list` of `float`): mean per-token NLL of target_true on the rewrite prompt
        (None or NaN for records without a target_true, e.g. zsRE).
    paraphrase_new_nll (`list` of `list` of `float`): per record, NLL of target_new on each paraphrase prompt.
    paraphrase_true_nll (`list` of `list` of `float`): per record, NLL of target_true on each paraphrase prompt
        (same length as paraphrase_new_nll's entry).
    neighborhood_true_nll (`list` of `list` of `float`): per record, NLL of the neighbourhood prompt's expected
        answer (CounterFact: the record's target_true) on each neighbourhood prompt.
    neighborhood_new_nll (`list` of `list` of `float`): per record, NLL of target_new on each neighbourhood prompt.
    rewrite_token_correct (`list` of `list` of `list` of `bool` or 0/1): per record, per rewrite prompt, per answer
        token: whether the argmax after prompt + answer[:i] is answer[i] (zsRE efficacy).
    paraphrase_token_correct (same shape): zsRE generalization (the `rephrase` prompt).
    neighborhood_token_correct (same shape): zsRE specificity (the `loc` prompt against `loc_ans`).
    targets_new (`list` of `str`): target_new of each record, for the generation-based metrics.
    rewrite_generations (`list` of `list` of `str`): per record, greedy continuations of its rewrite prompt(s).
    paraphrase_generations (`list` of `list` of `str`): per record, greedy continuations of its paraphrase prompts.
    fluency_generations (`list` of `list` of `str`): per record, the ~100-token greedy generations for its
        generation prompts.
    consistency_generations (`list` of `list` of `str`): per record, the generations compared with the snippets
        (usually the same texts as fluency_generations).
    reference_snippets (`list` of `list` of `str`): per record, reference texts about target_new (ROME's
        attribute_snippets for the record's relation and target_new).
    portability_new_nll (`list` of `list` of `float`): per MQuAKE case, per multi-hop question, mean per-token NLL
        of the case's new_answer after the question.
    portability_true_nll (`list` of `list` of `float`): the same for the case's original answer.
    portability_generations (`list` of `list` of `str`): per case, the greedy continuation of each question.
    portability_new_answers (`list` of `list` of `str`): per case, new_answer and its aliases.
    portability_true_answers (`list` of `list` of `str`): per case, the original answer and its aliases.
    idf (`dict` of `str` to `float`, optional, not per record): IDF weight of each word for consistency, e.g. ROME's
        idf.npy + tfidf_vocab.json via `idf_from_vocab`. Words outside it are ignored. Without it the IDF is
        computed from the given texts (each generation and each snippet is one document, sklearn's smooth IDF),
        so the value then depends on the batch.

Returns:
    `dict` of `float` (each x100), only the keys whose inputs were given:
    efficacy, efficacy_magnitude, generalization, generalization_magnitude, specificity, specificity_magnitude,
    score (needs efficacy, generalization and specificity), efficacy_token_accuracy,
    generalization_token_accuracy, specificity_token_accuracy, efficacy_generation, generalization_generation,
    fluency, consistency, portability, portability_true, portability_generation, portability_true_generation.

Rules:
    - Ties are failures: efficacy/generalization need new_nll < true_nll, specificity needs true_nll < new_nll.
    - Generation success: strip the continuation's leading whitespace, casefold it and the stripped target, and
      check that the continuation starts with the target. An empty continuation fails; a record whose target_new
      is missing or empty is skipped.
    - Fluency of one text: words by the regex \\w+|[^\\w\\s] (close to nltk's word_tokenize, no lowercasing);
      H2, H3 = entropies in bits of the bigram and trigram frequency distributions (0 when there are none);
      fluency = (2/3 * H2 + 4/3 * H3) / 2, exactly ROME's np.mean([2/3 * H2, 4/3 * H3]). Mean over a record's
      generations, then over records, x100 (about 620 for a healthy model).
    - Consistency of one record: cosine of the TF-IDF vectors (raw counts x IDF, words = lowercased
      \\b\\w\\w+\\b as sklearn's TfidfVectorizer) of the record's generations joined by spaces and of its snippets
      joined by spaces; 0 when either vector is empty.
    - Portability (MQuAKE: a case counts when any of its questions is answered): teacher forced, a question is
      answered with the new answer when new_nll < true_nll strictly (portability) and with the original one when
      true_nll < new_nll (portability_true); generation-based, when the first line of its continuation, stripped and
      casefolded, equals one of the answers or aliases or starts with one followed by a character that is not a
      letter or digit (so the alias "ar" does not count for "Argentina").

Examples:
    >>> metric = evaluate.load(nse_hub.metrics.EDIT_METRICS_PATH)
    >>> metric.compute(rewrite_new_nll=[0.5, 2.0], rewrite_true_nll=[1.0, 1.0])
    {'efficacy': 50.0, 'efficacy_magnitude': 0.3053530303180729}
    >>> metric.compute(paraphrase_new_nll=[[1.0], [1.0, 3.0, 3.0]], paraphrase_true_nll=[[2.0], [2.0, 2.0, 2.0]])
    {'generalization': 66.66666666666666, 'generalization_magnitude': 12.651336700030349}
"""

_NLL = datasets.Value("float64")
_NLLS = datasets.Sequence(datasets.Value("float64"))
# float32 so that both bools and 0/1 integers are accepted (an int8 column refuses bools and a bool column ints).
_TOKEN_HITS = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
_TEXTS = datasets.Sequence(datasets.Value("string"))

FEATURES = datasets.Features(
    {
        "rewrite_new_nll": _NLL,
        "rewrite_true_nll": _NLL,
        "paraphrase_new_nll": _NLLS,
        "paraphrase_true_nll": _NLLS,
        "neighborhood_true_nll": _NLLS,
        "neighborhood_new_nll": _NLLS,
        "rewrite_token_correct": _TOKEN_HITS,
        "paraphrase_token_correct": _TOKEN_HITS,
        "neighborhood_token_correct": _TOKEN_HITS,
        "targets_new": datasets.Value("string"),
        "rewrite_generations": _TEXTS,
        "paraphrase_generations": _TEXTS,
        "fluency_generations": _TEXTS,
        "consistency_generations": _TEXTS,
        "reference_snippets": _TEXTS,
        "portability_new_nll": _NLLS,
        "portability_true_nll": _NLLS,
        "portability_generations": _TEXTS,
        "portability_new_answers": _TEXTS,
        "portability_true_answers": _TEXTS,
    }
)

_WORD = re.compile(r"\w+|[^\w\s]")
_TFIDF_WORD = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern, as ROME's vectorizer uses
FLUENCY_NS = (2, 3)
FLUENCY_WEIGHTS = (2 / 3, 4 / 3)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """Whether a measured value is absent: ``None``, or NaN for numbers."""
    if value is None:
        return True
    try:
        return math.isnan(value)
    except TypeError:
        return False


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean of a non-empty iterable."""
    items = list(values)
    if not items:
        raise ValueError("mean of nothing")
    return math.fsum(items) / len(items)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 when any of them is 0 (as ``scipy.stats.hmean``)."""
    if not values:
        raise ValueError("harmonic mean of nothing")
    if any(value < 0 for value in values):
        raise ValueError(f"harmonic mean of negative values: {list(values)}")
    if any(value == 0 for value in values):
        return 0.0
    return len(values) / math.fsum(1.0 / value for value in values)


def probability(nll: float) -> float:
    """``exp(-nll)``: from a mean per-token NLL, the geometric-mean token probability MEMIT's margins use."""
    return math.exp(-nll)


def comparison_record(new_nlls: Sequence[float | None] | None, true_nlls: Sequence[float | None] | None, *,
                      new_should_win: bool) -> tuple[float, float] | None:
    """One record's (success rate, mean probability margin) over its prompts, or ``None`` if nothing was measured.

    With ``new_should_win`` (efficacy, generalization) a prompt succeeds when ``new_nll < true_nll`` and its margin
    is ``p(new) - p(true)``; otherwise (specificity) it succeeds when ``true_nll < new_nll`` and its margin is
    ``p(true) - p(new)``. Equal NLLs fail either way. Prompts with a missing NLL are skipped.
    """
    if new_nlls is None or true_nlls is None:
        return None
    if len(new_nlls) != len(true_nlls):
        raise ValueError(f"a record has {len(new_nlls)} target_new NLLs but {len(true_nlls)} target_true NLLs")
    wins: list[float] = []
    margins: list[float] = []
    for new, true in zip(new_nlls, true_nlls):
        if is_missing(new) or is_missing(true):
            continue
        wanted, other = (new, true) if new_should_win else (true, new)
        wins.append(float(wanted < other))
        margins.append(probability(wanted) - probability(other))
    if not wins:
        return None
    return mean(wins), mean(margins)


def token_accuracy_record(prompts: Sequence[Sequence[Any] | None] | None) -> float | None:
    """One record's token accuracy: mean over answer tokens, then over prompts; ``None`` if nothing was measured."""
    per_prompt = []
    for tokens in prompts or []:
        hits = [float(token) for token in tokens or [] if not is_missing(token)]
        if any(hit not in (0.0, 1.0) for hit in hits):
            raise ValueError(f"token correctness must be booleans or 0/1, got {list(tokens or [])}")
        if hits:
            per_prompt.append(mean(hits))
    return mean(per_prompt) if per_prompt else None


def generation_success(continuation: str | None, answer: str) -> bool:
    """Whether a greedy continuation starts with ``answer`` ("The Mirage of Model Editing").

    Leading whitespace of the continuation and surrounding whitespace of the answer are stripped, both are casefolded,
    and the continuation must start with the answer. An empty (or missing) continuation is a failure. The check is a
    plain prefix test, so ``"Parisian"`` counts for ``"Paris"``.
    """
    expected = answer.strip().casefold()
    if not expected:
        raise ValueError("generation success needs a non-empty answer")
    if not continuation:
        return False
    return continuation.lstrip().casefold().startswith(expected)


def generation_record(generations: Sequence[str | None] | None, answer: str | None) -> float | None:
    """Share of a record's continuations that start with ``answer``; ``None`` without an answer or continuations."""
    if answer is None or not answer.strip() or not generations:
        return None
    hits = [float(generation_success(text, answer)) for text in generations if text is not None]
    return mean(hits) if hits else None


def answer_match(continuation: str | None, answers: Sequence[str | None]) -> bool:
    """Whether a generated answer is one of ``answers`` (an answer and its aliases, MQuAKE's judgment).

    The continuation's first line, stripped and casefolded, must equal a stripped, casefolded answer or start with
    one followed by a character that is neither a letter nor a digit ("Arabic." counts for "Arabic"; "Argentina"
    does not count for the alias "ar"). An empty continuation fails; empty answers are ignored.
    """
    if not continuation:
        return False
    lines = continuation.strip().splitlines()
    text = lines[0].strip().casefold() if lines else ""
    for answer in answers:
        expected = (answer or "").strip().casefold()
        if expected and text.startswith(expected) and (len(text) == len(expected)
                                                       or not text[len(expected)].isalnum()):
            return True
    return False


def any_question_record(new_nlls: Sequence[float | None] | None, true_nlls: Sequence[float | None] | None, *,
                        new_should_win: bool) -> float | None:
    """1.0 when any question of a case prefers the wanted answer (strictly), else 0.0; ``None`` if none was measured.

    With ``new_should_win`` a question counts when ``new_nll < true_nll``, otherwise when ``true_nll < new_nll``.
    """
    found = comparison_record(new_nlls, true_nlls, new_should_win=new_should_win)
    if found is None:
        return None
    return float(found[0] > 0)  # the share of questions won is above 0 exactly when one was


def any_answer_record(generations: Sequence[str | None] | None, answers: Sequence[str | None] | None) -> float | None:
    """1.0 when any of a case's continuations is one of ``answers`` (:func:`answer_match`), else 0.0; ``None``
    without continuations or answers."""
    texts = [text for text in generations or [] if text is not None]
    if not texts or not any((answer or "").strip() for answer in answers or []):
        return None
    return float(any(answer_match(text, answers) for text in texts))


def word_tokens(text: str) -> list[str]:
    """Words and single punctuation marks (``\\w+|[^\\w\\s]``), a dependency-free stand-in for nltk's tokenizer."""
    return _WORD.findall(text)


def ngram_entropy_bits(words: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the ``n``-grams of ``words``; 0 when there are none."""
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0.0
    freqs = np.array(list(counts.values()), dtype=np.float64)
    freqs /= freqs.sum()
    return float(-(freqs * np.log2(freqs)).sum())


def n_gram_entropy(text: str) -> float:
    """ROME's fluency of one text, in bits (not x100): ``mean([2/3 * H2, 4/3 * H3]) = (2/3 H2 + 4/3 H3) / 2``."""
    words = word_tokens(text)
    return mean(weight * ngram_entropy_bits(words, n) for n, weight in zip(FLUENCY_NS, FLUENCY_WEIGHTS))


def fluency_record(generations: Sequence[str | None] | None) -> float | None:
    """Mean n-gram entropy of a record's generations (an empty text scores 0); ``None`` without generations."""
    texts = [text for text in generations or [] if text is not None]
    return mean(n_gram_entropy(text) for text in texts) if texts else None


def tfidf_tokens(text: str) -> list[str]:
    """The words TF-IDF counts: lowercased runs of two or more word characters (sklearn's defaults)."""
    return _TFIDF_WORD.findall(text.lower())


def smooth_idf(documents: Iterable[str]) -> dict[str, float]:
    """sklearn's smooth IDF over ``documents``: ``idf(w) = ln((1 + n) / (1 + df(w))) + 1``."""
    vocabularies = [set(tfidf_tokens(document)) for document in documents]
    frequencies = Counter(word for vocabulary in vocabularies for word in vocabulary)
    total = len(vocabularies)
    return {word: math.log((1 + total) / (1 + count)) + 1.0 for word, count in frequencies.items()}


def idf_from_vocab(vocab: Mapping[str, int], idf: Sequence[float]) -> dict[str, float]:
    """Word-to-IDF mapping from ROME's ``tfidf_vocab.json`` (word -> column) and ``idf.npy`` (IDF per column)."""
    return {word: float(idf[column]) for word, column in vocab.items()}


def tfidf_vector(text: str, idf: Mapping[str, float]) -> dict[str, float]:
    """Sparse TF-IDF vector of ``text``: raw word counts times IDF; words outside ``idf`` are dropped."""
    counts = Counter(word for word in tfidf_tokens(text) if word in idf)
    return {word: count * idf[word] for word, count in counts.items()}


def tfidf_cosine(text_a: str, text_b: str, idf: Mapping[str, float]) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts; 0 when either has no known word."""
    a, b = tfidf_vector(text_a, idf), tfidf_vector(text_b, idf)
    norm = math.sqrt(math.fsum(v * v for v in a.values())) * math.sqrt(math.fsum(v * v for v in b.values()))
    if norm == 0:
        return 0.0
    return math.fsum(value * b.get(word, 0.0) for word, value in a.items()) / norm


def consistency_record(generations: Sequence[str | None] | None, snippets: Sequence[str | None] | None,
                       idf: Mapping[str, float]) -> float | None:
    """TF-IDF cosine of a record's joined generations and joined snippets; ``None`` when either list is empty."""
    texts = [text for text in generations or [] if text is not None]
    references = [text for text in snippets or [] if text is not None]
    if not texts or not references:
        return None
    return tfidf_cosine(" ".join(texts), " ".join(references), idf)


def average_records(per_record: Iterable[float | None]) -> float | None:
    """Mean over the records that have a value, or ``None`` when none has."""
    values = [value for value in per_record if value is not None]
    return mean(values) if values else None


# ---------------------------------------------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------------------------------------------


def _column(values: Sequence[Any] | None, records: int) -> Sequence[Any]:
    """An input column, or ``records`` missing values when it was not given."""
    if values is None:
        return [None] * records
    if len(values) != records:
        raise ValueError(f"inputs have different lengths: {len(values)} and {records} records")
    return values


def _per_prompt(values: Sequence[Any]) -> list[list[Any] | None]:
    """Rewrite NLLs come one per record; wrap them so they go through the per-prompt comparison."""
    return [None if is_missing(value) else [value] for value in values]


class EditMetrics(evaluate.Metric):
    """Efficacy, generalization, specificity (score and magnitude), zsRE token accuracy, generation-based success,
    fluency and consistency of knowledge edits, averaged per record first, each x100.

    Inputs are optional: ``add_batch``, ``add`` and ``compute`` store the inputs that are left out as missing.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=FEATURES,
            codebase_urls=["https://github.com/kmeng01/memit", "https://github.com/jianghoucheng/NSE"],
            reference_urls=["https://arxiv.org/abs/2210.07229", "https://arxiv.org/abs/2410.04045",
                            "https://arxiv.org/abs/2502.11177"],
        )

    def compute(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> dict[str, float] | None:
        """Metrics over the records given here and those added before; see ``inputs_description``."""
        self._refuse_predictions(predictions, references)
        unknown = set(kwargs) - set(FEATURES) - {"idf"}
        if unknown:
            raise TypeError(f"unknown inputs {sorted(unknown)}; the inputs are {[*FEATURES, 'idf']}")
        if self.writer is None and all(kwargs.get(name) is None for name in FEATURES):
            raise ValueError("no records: pass inputs to compute() or add them first with add() or add_batch()")
        return super().compute(**kwargs)

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Add records; inputs that are left out (or passed as ``None``) are stored as missing."""
        self._refuse_predictions(predictions, references)
        given = {name: values for name, values in kwargs.items() if values is not None}
        if not given:
            raise ValueError(f"no inputs given; the inputs are {list(FEATURES)}")
        lengths = {name: len(values) for name, values in given.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"inputs have different numbers of records: {lengths}")
        records = next(iter(lengths.values()))
        missing = {name: [None] * records for name in self._feature_names()}
        super().add_batch(**{**missing, **given})

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Add one record; inputs that are left out are stored as missing."""
        self._refuse_predictions(prediction, reference)
        super().add(**{name: None for name in self._feature_names() if name not in kwargs}, **kwargs)

    def _enforce_nested_string_type(self, schema: Any, obj: Any) -> Any:
        # evaluate refuses None where it expects a string; here None is a missing value (a record without target).
        if obj is None:
            return None
        return super()._enforce_nested_string_type(schema, obj)

    @staticmethod
    def _refuse_predictions(predictions: Any, references: Any) -> None:
        if predictions is not None or references is not None:
            raise TypeError(f"edit metrics take named inputs, not predictions/references: {list(FEATURES)}")

    def _compute(
        self,
        rewrite_new_nll: Sequence[float | None] | None = None,
        rewrite_true_nll: Sequence[float | None] | None = None,
        paraphrase_new_nll: Sequence[Sequence[float | None] | None] | None = None,
        paraphrase_true_nll: Sequence[Sequence[float | None] | None] | None = None,
        neighborhood_true_nll: Sequence[Sequence[float | None] | None] | None = None,
        neighborhood_new_nll: Sequence[Sequence[float | None] | None] | None = None,
        rewrite_token_correct: Sequence[Any] | None = None,
        paraphrase_token_correct: Sequence[Any] | None = None,
        neighborhood_token_correct: Sequence[Any] | None = None,
        targets_new: Sequence[str | None] | None = None,
        rewrite_generations: Sequence[Sequence[str | None] | None] | None = None,
        paraphrase_generations: Sequence[Sequence[str | None] | None] | None = None,
        fluency_generations: Sequence[Sequence[str | None] | None] | None = None,
        consistency_generations: Sequence[Sequence[str | None] | None] | None = None,
        reference_snippets: Sequence[Sequence[str | None] | None] | None = None,
        portability_new_nll: Sequence[Sequence[float | None] | None] | None = None,
        portability_true_nll: Sequence[Sequence[float | None] | None] | None = None,
        portability_generations: Sequence[Sequence[str | None] | None] | None = None,
        portability_new_answers: Sequence[Sequence[str | None] | None] | None = None,
        portability_true_answers: Sequence[Sequence[str | None] | None] | None = None,
        idf: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        arguments = locals()  # taken first, so it holds exactly the parameters
        inputs = {name: arguments[name] for name in FEATURES}
        records = max((len(values) for values in inputs.values() if values is not None), default=0)
        col = {name: _column(values, records) for name, values in inputs.items()}
        results: dict[str, float | None] = {}

        comparisons = {
            "efficacy": (_per_prompt(col["rewrite_new_nll"]), _per_prompt(col["rewrite_true_nll"]), True),
            "generalization": (col["paraphrase_new_nll"], col["paraphrase_true_nll"], True),
            "specificity": (col["neighborhood_new_nll"], col["neighborhood_true_nll"], False),
        }
        for name, (new, true, new_should_win) in comparisons.items():
            per_record = [comparison_record(n, t, new_should_win=new_should_win) for n, t in zip(new, true)]
            results[name] = average_records(None if r is None else r[0] for r in per_record)
            results[f"{name}_magnitude"] = average_records(None if r is None else r[1] for r in per_record)

        for name, column in (("efficacy", "rewrite"), ("generalization", "paraphrase"),
                             ("specificity", "neighborhood")):
            per_record = (token_accuracy_record(prompts) for prompts in col[f"{column}_token_correct"])
            results[f"{name}_token_accuracy"] = average_records(per_record)

        for name, column in (("efficacy", "rewrite"), ("generalization", "paraphrase")):
            per_record = (generation_record(texts, answer)
                          for texts, answer in zip(col[f"{column}_generations"], col["targets_new"]))
            results[f"{name}_generation"] = average_records(per_record)

        results["fluency"] = average_records(fluency_record(texts) for texts in col["fluency_generations"])
        results["consistency"] = self._consistency(col["consistency_generations"], col["reference_snippets"], idf)

        new, true = col["portability_new_nll"], col["portability_true_nll"]
        for name, new_should_win, answers in (("portability", True, "portability_new_answers"),
                                              ("portability_true", False, "portability_true_answers")):
            results[name] = average_records(any_question_record(n, t, new_should_win=new_should_win)
                                            for n, t in zip(new, true))
            results[f"{name}_generation"] = average_records(
                any_answer_record(texts, found) for texts, found in zip(col["portability_generations"], col[answers]))

        scaled = {name: 100.0 * value for name, value in results.items() if value is not None}
        trio = [scaled.get(name) for name in ("efficacy", "generalization", "specificity")]
        if all(value is not None for value in trio):
            scaled["score"] = harmonic_mean(trio)
        return scaled

    @staticmethod
    def _consistency(generations: Sequence[Any], snippets: Sequence[Any],
                     idf: Mapping[str, float] | None) -> float | None:
        if idf is None:
            # Each generation and each snippet is a document (see inputs_description).
            documents = [text for texts in (*generations, *snippets) for text in texts or [] if text is not None]
            idf = smooth_idf(documents)
        return average_records(consistency_record(g, s, idf) for g, s in zip(generations, snippets))
