"""The edit-metrics `evaluate` module: hand-computed values, the skipping and tie rules, offline loading."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nse_hub.metrics import EDIT_METRICS_PATH, load_edit_metrics
from nse_hub.metrics.edit_metrics.edit_metrics import (
    generation_success,
    harmonic_mean,
    idf_from_vocab,
    n_gram_entropy,
    ngram_entropy_bits,
    smooth_idf,
    tfidf_cosine,
    word_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
e = math.exp

# "a b a b": bigrams (a,b), (b,a), (a,b) -> p = 2/3, 1/3 -> H2 = log2(3) - 2/3 ≈ 0.918296;
# trigrams (a,b,a), (b,a,b) -> p = 1/2, 1/2 -> H3 = 1; fluency = (2/3 * H2 + 4/3 * H3) / 2 ≈ 0.972765.
ABAB_H2 = math.log2(3) - 2 / 3
ABAB_FLUENCY = (2 / 3 * ABAB_H2 + 4 / 3 * 1.0) / 2


@pytest.fixture(scope="module")
def metric():
    return load_edit_metrics(keep_in_memory=True)


# --- teacher-forced comparisons ---------------------------------------------------------------------------------


def test_efficacy_and_magnitude(metric) -> None:
    out = metric.compute(rewrite_new_nll=[0.5, 2.0], rewrite_true_nll=[1.0, 1.0])
    assert set(out) == {"efficacy", "efficacy_magnitude"}
    assert out["efficacy"] == pytest.approx(50.0)
    # p = exp(-NLL): record 1 gives e^-0.5 - e^-1, record 2 gives e^-2 - e^-1.
    assert out["efficacy_magnitude"] == pytest.approx(100 * ((e(-0.5) - e(-1)) + (e(-2) - e(-1))) / 2)


def test_generalization_averages_per_record_first(metric) -> None:
    out = metric.compute(paraphrase_new_nll=[[1.0], [1.0, 3.0, 3.0]], paraphrase_true_nll=[[2.0], [2.0, 2.0, 2.0]])
    # Record 1 wins 1/1, record 2 wins 1/3: (1 + 1/3) / 2 = 2/3, not the flat mean 2/4.
    assert out["generalization"] == pytest.approx(100 * 2 / 3)
    record_1 = e(-1) - e(-2)
    record_2 = ((e(-1) - e(-2)) + 2 * (e(-3) - e(-2))) / 3
    assert out["generalization_magnitude"] == pytest.approx(100 * (record_1 + record_2) / 2)


def test_specificity_wants_true_to_stay_ahead(metric) -> None:
    out = metric.compute(neighborhood_true_nll=[[1.0, 1.0], [2.0]], neighborhood_new_nll=[[3.0, 1.0], [1.0]])
    # Record 1: 1 < 3 wins, 1 == 1 is a tie and fails -> 1/2; record 2: 2 > 1 fails -> 0; mean 1/4.
    assert out["specificity"] == pytest.approx(25.0)
    record_1 = ((e(-1) - e(-3)) + 0.0) / 2
    record_2 = e(-2) - e(-1)
    assert out["specificity_magnitude"] == pytest.approx(100 * (record_1 + record_2) / 2)


def test_ties_fail_everywhere(metric) -> None:
    out = metric.compute(
        rewrite_new_nll=[1.5], rewrite_true_nll=[1.5],
        paraphrase_new_nll=[[0.7, 0.7]], paraphrase_true_nll=[[0.7, 0.7]],
        neighborhood_true_nll=[[2.0]], neighborhood_new_nll=[[2.0]],
    )
    assert out["efficacy"] == out["generalization"] == out["specificity"] == 0.0
    assert out["efficacy_magnitude"] == out["generalization_magnitude"] == out["specificity_magnitude"] == 0.0
    assert out["score"] == 0.0


def test_missing_values_are_skipped_for_that_metric_only(metric) -> None:
    nan = float("nan")
    out = metric.compute(
        # zsRE-style records without target_true (None, NaN) drop out of efficacy; only record 3 counts: it fails.
        rewrite_new_nll=[0.5, 0.5, 2.0], rewrite_true_nll=[None, nan, 1.0],
        # Record 1 has no paraphrases, record 2 a NaN one (skipped) and a win, record 3 a loss.
        paraphrase_new_nll=[None, [nan, 1.0], [3.0]], paraphrase_true_nll=[None, [2.0, 2.0], [2.0]],
        # The token accuracies still see all three records.
        rewrite_token_correct=[[[True]], [[True]], [[False]]],
    )
    assert out["efficacy"] == 0.0
    assert out["generalization"] == pytest.approx(50.0)
    assert out["efficacy_token_accuracy"] == pytest.approx(100 * 2 / 3)
    assert "score" not in out


def test_all_missing_means_no_key(metric) -> None:
    out = metric.compute(rewrite_new_nll=[0.5, 0.5], rewrite_true_nll=[None, float("nan")],
                         fluency_generations=[["a b a b"], ["a b a b"]])
    assert set(out) == {"fluency"}


def test_score_is_the_harmonic_mean(metric) -> None:
    assert harmonic_mean([100.0, 50.0, 25.0]) == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))  # 42.857...
    assert harmonic_mean([100.0, 0.0, 50.0]) == 0.0
    out = metric.compute(
        rewrite_new_nll=[1.0, 1.0], rewrite_true_nll=[2.0, 0.5],  # 50
        paraphrase_new_nll=[[1.0], [1.0]], paraphrase_true_nll=[[2.0], [2.0]],  # 100
        neighborhood_true_nll=[[1.0, 1.0], [1.0, 1.0]], neighborhood_new_nll=[[2.0, 0.5], [0.5, 0.5]],  # 25
    )
    assert (out["efficacy"], out["generalization"], out["specificity"]) == pytest.approx((50.0, 100.0, 25.0))
    assert out["score"] == pytest.approx(3 / (1 / 50 + 1 / 100 + 1 / 25))


def test_mismatched_prompt_counts_are_an_error(metric) -> None:
    with pytest.raises(ValueError, match="target_new NLLs"):
        metric.compute(paraphrase_new_nll=[[1.0, 2.0]], paraphrase_true_nll=[[1.0]])


# --- zsRE token accuracy ----------------------------------------------------------------------------------------


def test_token_accuracy_over_tokens_then_prompts_then_records(metric) -> None:
    out = metric.compute(
        # Record 1: one answer of 3 tokens, 2 correct -> 2/3. Record 2: prompts [1, 1] and [0] -> (1 + 0) / 2.
        rewrite_token_correct=[[[True, True, False]], [[True, True], [False]]],
        paraphrase_token_correct=[[[1, 0, 0]], [[1]]],  # 0/1 integers work too: (1/3 + 1) / 2
        neighborhood_token_correct=[[[True]], None],  # record 2 has no neighbourhood prompt: skipped
    )
    assert out["efficacy_token_accuracy"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert out["generalization_token_accuracy"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert out["specificity_token_accuracy"] == pytest.approx(100.0)


def test_token_accuracy_refuses_other_values(metric) -> None:
    with pytest.raises(ValueError, match="booleans or 0/1"):
        metric.compute(rewrite_token_correct=[[[2]]])


# --- generation-based success -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("continuation", "answer", "expected"), [
    (" Paris is lovely", "Paris", True),
    ("\n  PARIS", " paris", True),  # leading whitespace and case are normalised on both sides
    ("Straße", "STRASSE", True),  # casefold, not lower
    ("Parisian", "Paris", True),  # a plain prefix test
    ("", "Paris", False),  # an empty generation fails
    ("   ", "Paris", False),
    (None, "Paris", False),
    ("The city of Paris", "Paris", False),  # must start with the answer
    ("Pa", "Paris", False),
])
def test_generation_success(continuation: str | None, answer: str, expected: bool) -> None:
    assert generation_success(continuation, answer) is expected


def test_generation_success_needs_an_answer() -> None:
    with pytest.raises(ValueError, match="non-empty answer"):
        generation_success("Paris", "  ")


def test_generation_metrics(metric) -> None:
    out = metric.compute(
        targets_new=["Paris", "Rome", None],
        # Record 1: a hit and an empty generation -> 1/2; record 2: a hit -> 1; record 3 has no target: skipped.
        rewrite_generations=[[" paris, France", ""], ["rome"], ["anything"]],
        paraphrase_generations=[["London"], [" Rome", "Milan", " ROME."], None],  # 0 and 2/3
    )
    assert out == pytest.approx({"efficacy_generation": 100 * (1 / 2 + 1) / 2,
                                 "generalization_generation": 100 * (0 + 2 / 3) / 2})


# --- fluency ----------------------------------------------------------------------------------------------------


def test_word_tokens_split_punctuation() -> None:
    assert word_tokens("Hello, world! It's 3.5") == ["Hello", ",", "world", "!", "It", "'", "s", "3", ".", "5"]


def test_n_gram_entropy_by_hand() -> None:
    assert ngram_entropy_bits(["a", "b", "a", "b"], 2) == pytest.approx(ABAB_H2)
    assert ngram_entropy_bits(["a", "b", "a", "b"], 3) == pytest.approx(1.0)
    assert n_gram_entropy("a b a b") == pytest.approx(ABAB_FLUENCY)
    assert n_gram_entropy("") == 0.0  # no n-grams: entropy 0, as ROME's code gives
    assert n_gram_entropy("a b") == 0.0  # one bigram (H2 = 0), no trigram (H3 = 0)


def test_fluency_averages_per_record_and_scales_by_100(metric) -> None:
    # "a b c d": 3 distinct bigrams -> H2 = log2(3); 2 distinct trigrams -> H3 = 1.
    abcd = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    out = metric.compute(fluency_generations=[["a b a b", ""], ["a b c d"]])
    assert out == {"fluency": pytest.approx(100 * ((ABAB_FLUENCY + 0.0) / 2 + abcd) / 2)}


# --- consistency ------------------------------------------------------------------------------------------------


def test_tfidf_cosine_by_hand() -> None:
    idf = {"paris": 2.0, "france": 1.0, "city": 1.0}
    # "Paris paris city" -> paris 2 * 2 = 4, city 1 * 1 = 1. "Paris is in France" -> paris 2, france 1 (is, in:
    # not in the IDF, dropped). Cosine = (4 * 2) / (sqrt(17) * sqrt(5)) = 8 / sqrt(85) ≈ 0.867722.
    assert tfidf_cosine("Paris paris city", "Paris is in France", idf) == pytest.approx(8 / math.sqrt(85))
    assert tfidf_cosine("nothing known", "Paris", idf) == 0.0


def test_smooth_idf_and_vocab_mapping() -> None:
    # Two documents; one-letter words do not count. df: cat 2, the 1, sat 1 -> ln(3/3) + 1 and ln(3/2) + 1.
    assert smooth_idf(["a cat", "The cat sat"]) == pytest.approx(
        {"cat": 1.0, "the": math.log(1.5) + 1, "sat": math.log(1.5) + 1})
    assert idf_from_vocab({"paris": 1, "rome": 0}, [0.5, 2.0]) == {"paris": 2.0, "rome": 0.5}


def test_consistency(metric) -> None:
    out = metric.compute(consistency_generations=[["Paris paris city"], ["Rome"]],
                         reference_snippets=[["Paris is in France"], None],  # record 2 has no snippets: skipped
                         idf={"paris": 2.0, "france": 1.0, "city": 1.0})
    assert out == {"consistency": pytest.approx(100 * 8 / math.sqrt(85))}


def test_consistency_without_idf_uses_the_given_texts(metric) -> None:
    out = metric.compute(consistency_generations=[["the cat"]], reference_snippets=[["the cat sat"]])
    # Documents "the cat" and "the cat sat": idf(the) = idf(cat) = 1, idf(sat) = ln(3/2) + 1.
    # Cosine of (1, 1, 0) and (1, 1, s) = 2 / (sqrt(2) * sqrt(2 + s^2)).
    s = math.log(1.5) + 1
    assert out == {"consistency": pytest.approx(100 * 2 / (math.sqrt(2) * math.sqrt(2 + s * s)))}


# --- the evaluate API -------------------------------------------------------------------------------------------


def test_add_and_add_batch_accumulate_records(metric) -> None:
    metric.add(rewrite_new_nll=1.0, rewrite_true_nll=2.0)
    metric.add_batch(rewrite_new_nll=[3.0], paraphrase_new_nll=[[1.0]], paraphrase_true_nll=[[0.5]])
    out = metric.compute(rewrite_new_nll=[0.1], rewrite_true_nll=[0.2], targets_new=["x"],
                         rewrite_generations=[["x"]])
    # Three records: efficacy counts records 1 and 3 (record 2 has no true NLL), generalization only record 2.
    assert out["efficacy"] == pytest.approx(100.0)
    assert out["generalization"] == 0.0
    assert out["efficacy_generation"] == pytest.approx(100.0)


def test_api_errors(metric) -> None:
    with pytest.raises(ValueError, match="no records"):
        metric.compute()
    with pytest.raises(TypeError, match="unknown inputs"):
        metric.compute(rewrite_new_nl=[1.0])
    with pytest.raises(TypeError, match="predictions/references"):
        metric.compute(predictions=[1.0], references=[1.0])
    with pytest.raises(ValueError, match="different numbers of records"):
        metric.compute(rewrite_new_nll=[1.0], rewrite_true_nll=[1.0, 2.0])


def test_metric_info_documents_the_inputs(metric) -> None:
    assert set(metric.features) >= {"rewrite_new_nll", "neighborhood_true_nll", "fluency_generations"}
    assert "Ties are failures" in metric.inputs_description


# --- loading --------------------------------------------------------------------------------------------------


def test_edit_metrics_path_is_the_metric_directory() -> None:
    path = Path(EDIT_METRICS_PATH)
    assert path.is_absolute()
    assert (path / "edit_metrics.py").is_file()
    assert (path / "README.md").is_file()


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_loads_offline_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # read once at import; set it as well
    _forbid_network(monkeypatch)
    metric = evaluate.load(EDIT_METRICS_PATH, keep_in_memory=True)
    assert metric.compute(rewrite_new_nll=[0.5], rewrite_true_nll=[1.0])["efficacy"] == 100.0


_OFFLINE_SCRIPT = """
import json, socket, sys

def refuse(*args, **kwargs):
    raise OSError("network access in an offline test")

socket.socket.connect = refuse
socket.create_connection = refuse

import evaluate
from nse_hub.metrics import EDIT_METRICS_PATH, load_edit_metrics

results = [
    evaluate.load(EDIT_METRICS_PATH).compute(rewrite_new_nll=[0.5, 2.0], rewrite_true_nll=[1.0, 1.0]),
    load_edit_metrics().compute(fluency_generations=[["a b a b"]]),
]
json.dump({"results": results, "offline": evaluate.config.HF_EVALUATE_OFFLINE,
           "module": str(evaluate.config.HF_MODULES_CACHE)}, sys.stdout)
"""


def test_loads_offline_in_a_subprocess(tmp_path: Path) -> None:
    home = tmp_path / "hf-home"  # an empty cache: nothing can come from an earlier download
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(home)}
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_EVALUATE_CACHE", None)
    run = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["offline"] is True
    assert report["module"].startswith(str(home))
    assert report["results"][0]["efficacy"] == 50.0
    assert report["results"][1]["fluency"] == pytest.approx(100 * ABAB_FLUENCY)
    assert list((home / "modules").rglob("edit_metrics.py"))  # evaluate copied the script into the fresh cache


def test_metrics_package_does_not_import_torch() -> None:
    # Load nse_hub/metrics/__init__.py on its own: nse_hub/__init__.py imports torch for the editing engine.
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('metrics', {str(ROOT / 'nse_hub/metrics/__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert module.EDIT_METRICS_PATH.endswith('edit_metrics')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'evaluate') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
