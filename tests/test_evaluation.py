"""The evaluation harness on tiny models: metrics through the evaluate module, protocols, suite, plots."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, tiny_model, tiny_tokenizer
from huggingface_hub import ModelCard

from nse_hub import EditSession, load_requests
from nse_hub import card as card_module
from nse_hub.ability import TASKS, perplexity, perplexity_texts, suite_accuracy
from nse_hub.architectures import ModelLayout
from nse_hub.cli import main
from nse_hub.errors import CheckpointError
from nse_hub.evaluation import EvalOptions, evaluate_session, measure_requests
from nse_hub.scoring import score_targets
from nse_hub.sequential import curve_figure, plot_curves, run_sequential

REQUESTS = load_requests(FIXTURES / "requests.json")

SUITE = {
    "sst2": [{"sentence": "a gorgeous , witty film", "label": "1"}, {"sentence": "dull and long", "label": "0"}],
    "mrpc": [{"sentence1": "He left.", "sentence2": "He went away.", "label": "1"}],
    "cola": [{"sentence": "The cat sat.", "label": "1"}, {"sentence": "Sat cat the.", "label": "0"}],
    "rte": [{"sentence1": "Paris is in France.", "sentence2": "Paris is in Spain.", "label": "1"},
            {"sentence1": "A dog barked loudly.", "sentence2": "A dog barked.", "label": "0"}],
    "mmlu": [{"question": "2 + 2 =", "choices": "['3', '4', '5', '6']", "answer": "1"}],
    "nli": [{"sentence1": "It rains.", "sentence2": "It is wet.", "label": "entailment"}],
}


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    folder = tmp_path / "suite"
    folder.mkdir()
    for task, examples in SUITE.items():
        # perplexity texts come from MRPC and RTE examples after the evaluated ones
        (folder / f"{task}.json").write_text(json.dumps(examples * 3))
    return folder


def test_counterfact_metrics_match_direct_comparisons() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    metrics = measure_requests(model, tokenizer, layout, REQUESTS, EvalOptions(generation_tokens=3))
    assert {"efficacy", "generalization", "specificity", "score", "efficacy_magnitude",
            "efficacy_generation", "generalization_generation"} <= set(metrics)
    assert "efficacy_token_accuracy" not in metrics
    new = score_targets(model, tokenizer, layout, [r.text for r in REQUESTS], [r.target_new for r in REQUESTS])
    true = score_targets(model, tokenizer, layout, [r.text for r in REQUESTS], [r.target_true for r in REQUESTS])
    expected = 100 * sum(n.mean_nll < t.mean_nll for n, t in zip(new, true)) / len(REQUESTS)
    assert metrics["efficacy"] == pytest.approx(expected)


def test_zsre_records_use_token_accuracy() -> None:
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    requests = load_requests(FIXTURES / "zsre.json")
    metrics = measure_requests(model, tokenizer, ModelLayout.detect(model), requests, EvalOptions(generation=False))
    assert set(metrics) == {"efficacy_token_accuracy", "generalization_token_accuracy",
                            "specificity_token_accuracy"}

    def accuracy(prompts: list[str], answers: list[str]) -> float:  # tokens, then records (one prompt each)
        scores = score_targets(model, tokenizer, ModelLayout.detect(model), prompts, answers)
        return 100 * sum(s.token_accuracy for s in scores) / len(scores)

    assert metrics["efficacy_token_accuracy"] == pytest.approx(
        accuracy([r.text for r in requests], [r.target_new for r in requests]))
    assert metrics["generalization_token_accuracy"] == pytest.approx(
        accuracy([r.paraphrases[0] for r in requests], [r.target_new for r in requests]))
    assert metrics["specificity_token_accuracy"] == pytest.approx(
        accuracy([r.neighbors[0].prompt for r in requests], [r.neighbors[0].answer for r in requests]))


def test_fluency_is_bounded_to_the_chosen_records() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    options = EvalOptions(generation=False, fluency_records=2, fluency_tokens=12)
    metrics = measure_requests(model, tokenizer, ModelLayout.detect(model), REQUESTS, options)
    # By hand: the first two records' prompts (rewrite + paraphrases) generated, n-gram entropy, records averaged.
    from nse_hub.metrics.edit_metrics.edit_metrics import n_gram_entropy
    from nse_hub.scoring import generate_greedy

    per_record = []
    for r in REQUESTS[:2]:
        texts = generate_greedy(model, tokenizer, [r.text, *r.paraphrases], 12)
        per_record.append(sum(n_gram_entropy(t) for t in texts) / len(texts))
    assert metrics["fluency"] == pytest.approx(100 * sum(per_record) / 2)


def test_an_evaluation_in_parts_continues_and_equals_one_pass(tmp_path: Path, monkeypatch) -> None:
    import nse_hub.evaluation as evaluation

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    zsre = load_requests(FIXTURES / "zsre.json")  # a zsRE record among CounterFact ones: token-accuracy inputs too
    requests = [*REQUESTS[:2], zsre[0], *REQUESTS[2:]]
    options = EvalOptions(generation_tokens=3, fluency_records=3, fluency_tokens=8)
    whole = measure_requests(model, tokenizer, layout, requests, options)
    monkeypatch.setattr(evaluation, "PART_RECORDS", 2)  # fluency records straddle the first two parts
    measure = evaluation._record_inputs
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # stops after the first part
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_record_inputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        measure_requests(model, tokenizer, layout, requests, options, parts=tmp_path / "parts")
    assert len(list((tmp_path / "parts").iterdir())) == 1
    monkeypatch.setattr(evaluation, "_record_inputs", measure)
    resumed = measure_requests(model, tokenizer, layout, requests, options, parts=tmp_path / "parts")
    assert len(list((tmp_path / "parts").iterdir())) == 3
    # abs: float noise, since the parts batch other sequences together
    assert resumed == pytest.approx(whole, abs=1e-6) and set(resumed) == set(whole) and "fluency" in whole


def test_consistency_compares_generations_with_the_attribute_snippets(tmp_path: Path) -> None:
    import numpy

    from nse_hub.metrics.edit_metrics.edit_metrics import idf_from_vocab, tfidf_cosine, tfidf_tokens
    from nse_hub.scoring import generate_greedy

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    (plain,) = load_requests(FIXTURES / "counterfact_rome.json")
    generations = generate_greedy(model, tokenizer, list(plain.generation_prompts), 12)
    # Snippets share part of the first generation's words, so the similarity is neither 0 nor 100.
    texts = [" ".join(generations[0].split()[:4]) + " spoken in England", "English is a language"]
    snippets = [{"relation_id": "P103", "target_id": "Q1860", "samples": [{"name": "A", "text": t} for t in texts]},
                {"relation_id": "P103", "target_id": "Q150", "samples": [{"name": "B", "text": "French"}]}]
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    words = sorted(set(tfidf_tokens(" ".join([*generations, *texts]))))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    numpy.save(tmp_path / "idf.npy", numpy.linspace(1.0, 3.0, len(words)))

    (request,) = load_requests(FIXTURES / "counterfact_rome.json", attribute_snippets=tmp_path / "snippets.json")
    assert request.reference_snippets == tuple(texts)
    options = EvalOptions(generation=False, fluency_records=1, fluency_tokens=12, idf=tmp_path)
    metrics = measure_requests(model, tokenizer, ModelLayout.detect(model), [request], options)

    idf = idf_from_vocab(json.loads((tmp_path / "tfidf_vocab.json").read_text()), numpy.load(tmp_path / "idf.npy"))
    expected = 100 * tfidf_cosine(" ".join(generations), " ".join(texts), idf)
    assert 0 < expected < 100
    assert metrics["consistency"] == pytest.approx(expected)


def test_attribute_snippets_need_the_rome_schema(tmp_path: Path) -> None:
    (tmp_path / "snippets.json").write_text("[]")
    with pytest.raises(ValueError, match="record 1: attribute snippets need CounterFact records in the ROME schema"):
        load_requests(FIXTURES / "counterfact_easyedit.json", attribute_snippets=tmp_path / "snippets.json")


def test_recorded_evaluations_survive_save_and_resume(tiny_dir: Path, tmp_path: Path) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:2], progress=False)
    evaluate_session(session, options=EvalOptions(generation_tokens=3))
    session.edit(REQUESTS[2:3], progress=False)
    session.save_pretrained(tmp_path / "saved")

    resumed = EditSession.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert resumed.evaluations == session.evaluations and set(resumed.evaluations) == {1}
    assert str(resumed.card(round=1)) == str(session.card(round=1))  # a later push writes the same card
    resumed.rollback(0)
    assert resumed.evaluations == {}


def test_final_evaluation_flows_into_the_card(tiny_dir: Path) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:2], progress=False)
    result = evaluate_session(session, options=EvalOptions(generation_tokens=3))
    assert result.protocol == "final" and result.edits == 2 and result.rounds == 1
    card = ModelCard(str(session.card()))
    assert {r.metric_type for r in card.data.eval_results} >= {"efficacy", "efficacy_generation"}
    efficacy = next(r for r in card.data.eval_results if r.metric_type == "efficacy")
    assert efficacy.metric_value == round(result.metrics["efficacy"], 1)
    assert "final protocol" in card.text and "generation-based" in card.text


def test_cards_render_with_the_template_this_process_imported(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:1], progress=False)
    before = str(session.card())
    edited = tmp_path / "model_card.md"  # the checkout's template changed under a long run
    edited.write_text("{{ hparams.a_setting_this_code_does_not_have }}")
    monkeypatch.setattr(card_module, "template_path", lambda: edited)
    assert str(session.card()) == before


def test_sequential_run_and_plot(tiny_dir: Path, tmp_path: Path) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    options = EvalOptions(generation_tokens=3, fluency_records=1, fluency_tokens=4)
    run = run_sequential(session, REQUESTS, batch=2, options=options)
    assert [e.edits for e in run.curve] == [2, 4] and {e.protocol for e in run.curve} == {"running"}
    assert "fluency" in run.final.metrics and "fluency" not in run.curve[-1].metrics
    assert run.curve[-1].metrics == {k: v for k, v in run.final.metrics.items() if k != "fluency"}
    assert run.final.protocol == "final" and run.final.edits == 4 and len(run.round_seconds) == 2
    threads = torch.get_num_threads()
    assert run.devices == [f"cpu, {threads} threads of {os.cpu_count()} cores (torch {torch.__version__})"]
    path = plot_curves([run], tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = curve_figure([run])
    panels = {axis.get_title(): axis for axis in figure.axes}
    assert set(panels) == {"Efficacy", "Generalization", "Specificity", "Efficacy (generation)"}
    (line,) = panels["Efficacy"].get_lines()
    assert list(line.get_xdata()) == [2, 4]
    assert list(line.get_ydata()) == [e.metrics["efficacy"] for e in run.curve]
    labelled = curve_figure([run, run], labels=["NSE", "NSE + NAS"])
    assert [line.get_label() for line in labelled.axes[0].get_lines()] == ["NSE", "NSE + NAS"]
    with pytest.raises(ValueError, match="one label per run"):
        curve_figure([run], labels=["a", "b"])


def test_running_points_measure_perplexity_on_the_final_protocols_texts(tiny_dir: Path, suite: Path) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    options = EvalOptions(generation=False)
    run = run_sequential(session, REQUESTS, batch=2, options=options, suite=suite, suite_examples=1)
    texts = perplexity_texts(suite, skip=1)
    mid, last = run.curve
    assert mid.edits == 2 and mid.general["perplexity_texts"] == len(texts) > 0
    assert last.general["perplexity"] == run.final.general["perplexity"]  # read off the final evaluation
    assert last.general["perplexity"] == pytest.approx(perplexity(session.model, session.tokenizer,
                                                                  session.layout, texts))
    assert mid.general["perplexity"] != last.general["perplexity"]  # measured after round 1, not copied
    base = dataclasses.replace(run.final, protocol="base", general={"perplexity": 2 * last.general["perplexity"]})
    panels = {axis.get_title(): axis for axis in curve_figure([run], base).axes}
    (line, unedited) = panels["Perplexity (× unedited)"].get_lines()
    assert list(line.get_xdata()) == [2, 4] and line.get_ydata()[-1] == pytest.approx(0.5)
    assert list(unedited.get_ydata()) == [1.0, 1.0]
    without = run_sequential(EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS,
                                                         layers=(1, 2)), REQUESTS, batch=2, options=options)
    assert all(point.general == {} for point in without.curve)
    assert not any("Perplexity" in axis.get_title() for axis in curve_figure([without]).axes)


def test_an_interrupted_run_resumes_from_its_state(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from nse_hub.sequential import resume_session

    options = EvalOptions(generation=False)
    state = tmp_path / "state"
    whole = run_sequential(EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2)),
                           REQUESTS, batch=1, options=options)

    session = resume_session(str(tiny_dir), state, device="cpu", **TINY_HPARAMS, layers=(1, 2))
    edit = EditSession.edit
    calls = []

    def crash_on_round_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return edit(self, *args, **kwargs)

    monkeypatch.setattr(EditSession, "edit", crash_on_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(session, REQUESTS, batch=1, options=options, state_dir=state)
    monkeypatch.undo()
    resumed = resume_session(str(tiny_dir), state, device="cpu", **TINY_HPARAMS, layers=(1, 2))
    assert len(resumed.rounds) == 2
    run = run_sequential(resumed, REQUESTS, batch=1, options=options, state_dir=state)
    assert [e.edits for e in run.curve] == [1, 2, 3, 4] and len(run.round_seconds) == 4
    assert run.final.metrics == pytest.approx(whole.final.metrics)
    with pytest.raises(CheckpointError, match="other edits or another batch"):
        run_sequential(resume_session(str(tiny_dir), state, device="cpu"), REQUESTS[::-1], batch=1, state_dir=state)

    # Interrupted while measuring the running point after round 2: the round is kept, the point measured on resume.
    import nse_hub.sequential as sequential

    state = tmp_path / "state-2"
    measure = sequential._running_point
    points = []

    def crash_on_point_2(*args, **kwargs):
        points.append(1)
        if len(points) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(sequential, "_running_point", crash_on_point_2)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(resume_session(str(tiny_dir), state, device="cpu", **TINY_HPARAMS, layers=(1, 2)),
                       REQUESTS, batch=1, options=options, state_dir=state)
    monkeypatch.undo()
    resumed = resume_session(str(tiny_dir), state, device="cpu")
    assert len(resumed.rounds) == 2
    run = run_sequential(resumed, REQUESTS, batch=1, options=options, state_dir=state)
    assert [e.edits for e in run.curve] == [1, 2, 3, 4] and len(run.round_seconds) == 4
    assert run.curve[1].metrics == pytest.approx(whole.curve[1].metrics)


def test_suite_accuracy_and_labels(suite: Path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    results = suite_accuracy(model, tokenizer, ModelLayout.detect(model), suite, examples_per_task=2)
    assert set(results) == set(TASKS)
    assert all(0 <= r["accuracy"] <= 100 for r in results.values()) and "mcc" in results["cola"]
    # GLUE RTE: label 0 is entailment, answered "True".
    assert TASKS["rte"].gold({"label": "0"}) == 0 and TASKS["rte"].gold({"label": "1"}) == 1
    assert TASKS["mmlu"].prompt(SUITE["mmlu"][0]).endswith("(B) 4\n(C) 5\n(D) 6\nAnswer:")


def test_perplexity_is_exp_of_the_mean_token_nll() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    text = "The mother tongue of Danielle Darrieux is French"
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert perplexity(model, tokenizer, ModelLayout.detect(model), [text]) == pytest.approx(math.exp(nll), rel=1e-4)


def test_cli_eval_of_a_base_model(tiny_dir: Path, tmp_path: Path, suite: Path) -> None:
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_dir), "--data", str(FIXTURES / "requests.json"), "--methods", "nse", "memit",
                 "--batch-size", "2", "--suite", str(suite), "--suite-examples", "2", "--out", str(out),
                 "--device", "cpu", "--set", "mom2_n_samples=16", "--set", "layers=[1,2]"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["protocol"] == "base" and "perplexity" in results["base"]["general"]
    assert [r["method"] for r in results["runs"]] == ["nse", "memit"]
    assert results["runs"][0]["final"]["edits"] == 4 and len(results["runs"][1]["curve"]) == 2
    assert (out / "curves.png").is_file() and (out / "nse-session" / "nse_session" / "session.json").is_file()

    saved = out / "nse-session"  # its card reports the final evaluation; --record replaces it by a new one
    assert "efficacy_generation" in {r.metric_type for r in ModelCard.load(saved / "README.md").data.eval_results}
    assert main(["eval", str(saved), "--no-generation", "--record", "--device", "cpu"]) == 0
    card = ModelCard.load(saved / "README.md")
    assert "final protocol" in card.text
    recorded = {r.metric_type for r in card.data.eval_results}
    assert "efficacy" in recorded and not any("generation" in metric for metric in recorded)


def test_generations_can_come_from_another_engine(tiny_dir: Path, tmp_path: Path) -> None:
    """EvalOptions(generator=…): here stock PEFT on the saved version, as VersionedLLM does with vLLM."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nse_hub.scoring import generate_greedy

    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:2], progress=False)
    session.save_pretrained(tmp_path / "saved")
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "saved")).eval()
    calls = []

    def peft_generator(prompts, max_new_tokens):
        calls.append(len(prompts))
        return generate_greedy(stock, session.tokenizer, prompts, max_new_tokens)

    options = EvalOptions(generation_tokens=3, fluency_records=1, fluency_tokens=6)
    default = evaluate_session(session, options=options, record=False)
    served = evaluate_session(session, options=dataclasses.replace(options, generator=peft_generator), record=False)
    assert calls == [4, 2]  # rewrite + paraphrase of both records, then the first record's fluency prompts
    assert served.metrics == pytest.approx(default.metrics)
