"""Multi-hop portability (MQuAKE): loading cases, the metric's arithmetic, the harness, the card and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES, SHARED_DATA, TINY_HPARAMS, tiny_model, tiny_tokenizer
from huggingface_hub import ModelCard

from nse_hub import EditSession, load_requests
from nse_hub.architectures import ModelLayout
from nse_hub.cli import main
from nse_hub.errors import MissingFileError, RequestError
from nse_hub.evaluation import EvalOptions, evaluate_session, measure_portability
from nse_hub.metrics.edit_metrics.edit_metrics import answer_match
from nse_hub.multihop import case_requests, load_multihop_cases, question_prompt
from nse_hub.requests import parse_request
from nse_hub.scoring import score_targets

MQUAKE = FIXTURES / "mquake.json"
MQUAKE_HARD = SHARED_DATA / "mquake" / "MQuAKE-hard.json"


@pytest.fixture(scope="module")
def metric():
    from nse_hub.metrics import load_edit_metrics

    return load_edit_metrics(keep_in_memory=True)


# --- loading ------------------------------------------------------------------------------------------------------


def test_cases_load_with_their_edits_and_answers() -> None:
    cases = load_multihop_cases(MQUAKE)
    assert [c.case_id for c in cases] == [1, 2, 3] and [len(c.requests) for c in cases] == [2, 2, 1]
    first = cases[0]
    assert first.requests[0].text == "The Silent Harbour was written by"
    assert (first.requests[0].target_new, first.requests[0].target_true) == ("Ada Brook", "Tom Vale")
    assert len(first.questions) == 3
    assert first.answers == ("Ireland", "Eire", "Republic of Ireland")
    assert first.new_answers == ("Norway", "Kingdom of Norway", "NO")
    assert [c.case_id for c in load_multihop_cases(MQUAKE, limit=1, offset=1)] == [2]


def test_case_requests_write_each_shared_fact_once() -> None:
    requests = case_requests(load_multihop_cases(MQUAKE))  # cases 1 and 2 share "Ada Brook is a citizen of"
    assert [r.text for r in requests] == ["The Silent Harbour was written by", "Ada Brook is a citizen of",
                                          "The capital of Norway is", "The head coach of Riverside Rovers is"]


def test_cases_that_rewrite_a_fact_differently_are_refused(tmp_path: Path) -> None:
    records = json.loads(MQUAKE.read_text())
    records[1]["requested_rewrite"][0]["target_new"] = {"str": "Peru"}
    (tmp_path / "conflict.json").write_text(json.dumps(records))
    with pytest.raises(RequestError, match=r"'Ada Brook is a citizen of' is 'Norway' in case 1 but 'Peru' in "
                                           r"case 2.*separate runs"):
        case_requests(load_multihop_cases(tmp_path / "conflict.json"))


def test_load_requests_reads_one_request_per_rewrite() -> None:
    assert len(load_requests(MQUAKE)) == 5
    assert [r.case_id for r in load_requests(MQUAKE, limit=2)] == [1, 1, 2, 2]  # limit counts cases
    with pytest.raises(RequestError, match=r"holds 2 rewrites.*parse_requests or load_requests"):
        parse_request(json.loads(MQUAKE.read_text())[0])


@pytest.mark.parametrize(("change", "reason"), [
    (lambda r: r.pop("questions"), "case 0: not an MQuAKE case"),
    (lambda r: r.update(questions=[]), "case 0: 'questions' is empty"),
    (lambda r: r.update(new_answer=""), "case 0: 'new_answer' must be a non-empty string"),
    (lambda r: r.update(answer_alias="Eire"), "case 0: 'answer_alias' must be a list of non-empty strings"),
    (lambda r: r.update(requested_rewrite=[]), "case 0: 'requested_rewrite' is an empty list"),
    (lambda r: r["requested_rewrite"][1].update(prompt="is a citizen of"),
     r"case 0: requested_rewrite\[1\]: 'prompt' has no '\{\}'"),
])
def test_malformed_cases_name_the_case_and_field(tmp_path: Path, change, reason: str) -> None:
    records = json.loads(MQUAKE.read_text())
    change(records[0])
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(RequestError, match=reason):
        load_multihop_cases(tmp_path / "bad.json")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="check the path"):
        load_multihop_cases(tmp_path / "absent.json")
    (tmp_path / "cf.json").write_text(json.dumps([{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}]))
    with pytest.raises(RequestError, match="not an MQuAKE case"):
        load_multihop_cases(tmp_path / "cf.json")
    with pytest.raises(RequestError, match=r"no MQuAKE cases.*lower the offset"):
        load_multihop_cases(MQUAKE, offset=3)
    with pytest.raises(RequestError, match="limit must be a whole number"):
        load_multihop_cases(MQUAKE, limit=0)


@pytest.mark.skipif(not MQUAKE_HARD.is_file(), reason=f"the shared MQuAKE data is not beside this checkout "
                                                        f"({MQUAKE_HARD})")
def test_real_mquake_hard_file() -> None:
    cases = load_multihop_cases(MQUAKE_HARD)
    assert len(cases) == 429 and all(len(c.requests) == 4 and len(c.questions) == 3 for c in cases)
    assert len(case_requests(cases[:100])) == 259  # shared facts written once, and no conflicts


# --- the metric's arithmetic --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("continuation", "answers", "expected"), [
    (" Arabic\nQ: next", ["Arabic"], True),
    (" arabic language.", ["Arabic language"], True),
    ("Arabic.", ["Arabic"], True),
    (" Argentina", ["ar", "Arabic"], False),  # a 2-letter alias is a whole word or nothing
    (" AR is spoken", ["ar"], True),
    ("\n\nArabic", ["Arabic"], True),  # leading blank lines are stripped before the first line is read
    (" The answer is Arabic", ["Arabic"], False),
    ("", ["Arabic"], False),
    (" Arabic", ["", "Arabic"], True),
])
def test_answer_match(continuation: str, answers: list[str], expected: bool) -> None:
    assert answer_match(continuation, answers) is expected


def test_portability_counts_a_case_when_any_question_is_answered(metric) -> None:
    out = metric.compute(
        # case 1: question 2 prefers the new answer; case 2: none does (a tie fails); case 3: only the original
        portability_new_nll=[[3.0, 1.0, 3.0], [2.0, 2.0, 5.0], [4.0]],
        portability_true_nll=[[2.0, 2.0, 2.0], [2.0, 1.0, 1.0], [1.0]],
    )
    assert out == {"portability": pytest.approx(100 / 3), "portability_true": pytest.approx(100.0)}


def test_portability_skips_missing_questions_and_cases(metric) -> None:
    out = metric.compute(portability_new_nll=[[float("nan"), 1.0], None], portability_true_nll=[[0.0, 2.0], None])
    assert out == {"portability": 100.0, "portability_true": 0.0}


def test_generation_portability(metric) -> None:
    out = metric.compute(
        portability_generations=[[" Paris", " Oslo\nQ:", " Rome"], [" Lima", " Lima"], [" x"], None],
        portability_new_answers=[["Oslo"], ["Quito"], ["x"], ["y"]],
        portability_true_answers=[["Paris", "Paname"], ["Lima"], [], ["z"]],
    )
    # new: cases 1 and 3 of 3 measured; original: cases 1 and 2 of 2 (case 3 has no original answer to judge)
    assert out == {"portability_generation": pytest.approx(200 / 3), "portability_true_generation": 100.0}


def test_portability_and_edit_inputs_are_independent(metric) -> None:
    out = metric.compute(rewrite_new_nll=[0.5, None], rewrite_true_nll=[1.0, None],
                         portability_new_nll=[None, [1.0]], portability_true_nll=[None, [2.0]])
    assert out["efficacy"] == 100.0 and out["portability"] == 100.0


# --- the harness, the card, the CLI -------------------------------------------------------------------------------


def test_measure_portability_matches_direct_scores() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    cases = load_multihop_cases(MQUAKE)
    figures = measure_portability(model, tokenizer, layout, cases, EvalOptions(portability_tokens=3))
    assert set(figures) == {"portability", "portability_generation", "portability_true",
                            "portability_true_generation"}
    wins = []
    for case in cases:
        prompts = [question_prompt(q) for q in case.questions]
        new = score_targets(model, tokenizer, layout, prompts, [case.new_answer] * len(prompts))
        true = score_targets(model, tokenizer, layout, prompts, [case.answer] * len(prompts))
        wins.append(any(n.mean_nll < t.mean_nll for n, t in zip(new, true)))
    assert figures["portability"] == pytest.approx(100 * sum(wins) / len(cases))
    quiet = measure_portability(model, tokenizer, layout, cases, EvalOptions(generation=False))
    assert set(quiet) == {"portability", "portability_true"}


def test_question_prompt_is_few_shot() -> None:
    prompt = question_prompt("  Who wrote it? ")
    assert prompt.endswith("\nQ: Who wrote it?\nA:") and prompt.count("Q: ") == 4


def test_edited_session_reports_before_and_after_in_the_card(tiny_dir: Path) -> None:
    cases = load_multihop_cases(MQUAKE)
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    options = EvalOptions(generation_tokens=3, portability_tokens=3, portability=cases)
    before = evaluate_session(session, options=options, record=False)
    assert before.protocol == "base" and before.portability_cases == 3
    assert not any(key.startswith("unedited_") for key in before.metrics)
    session.edit(case_requests(cases), progress=False)
    after = evaluate_session(session, options=options)
    for key in ("portability", "portability_true", "portability_generation", "portability_true_generation"):
        assert after.metrics[f"unedited_{key}"] == pytest.approx(before.metrics[key])  # deltas off = unedited
    assert {"portability", "efficacy"} <= set(after.metrics)
    running = evaluate_session(session, options=options, protocol="running", record=False)
    assert "portability" in running.metrics and not any(k.startswith("unedited_") for k in running.metrics)

    card = ModelCard(str(session.card()))
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["portability"].metric_value == round(after.metrics["portability"], 1)
    assert results["portability"].dataset_type == "mquake"
    assert results["portability"].dataset_name == "MQuAKE multi-hop questions (3 cases)"
    assert results["unedited_portability_true"].metric_name == "Multi-hop accuracy (original answer), unedited model"
    assert results["efficacy"].dataset_type == "nse-hub-edits"
    assert "*Portability* asks MQuAKE's multi-hop questions" in card.text
    assert "| Portability (multi-hop, new answer) |" in card.text


def test_card_without_portability_has_no_portability_note(tiny_dir: Path) -> None:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(case_requests(load_multihop_cases(MQUAKE))[:1], progress=False)
    evaluate_session(session, options=EvalOptions(generation=False))
    assert "Portability" not in str(session.card())


def test_cli_eval_edits_the_cases_and_asks_their_questions(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_dir), "--portability", str(MQUAKE), "--portability-cases", "2", "--batch-size",
                 "3", "--protocol", "final", "--no-generation", "--out", str(out), "--device", "cpu",
                 "--set", "mom2_n_samples=16", "--set", "layers=[1,2]", "--set", "v_num_grad_steps=4"]) == 0
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["portability_cases"] == 2 and settings["options"]["portability"] == str(MQUAKE)
    assert {"portability", "portability_true"} <= set(results["base"]["metrics"])
    final = results["runs"][0]["final"]
    assert final["edits"] == 3 and final["portability_cases"] == 2  # case 2 repeats one of case 1's facts
    assert {"portability", "unedited_portability", "efficacy"} <= set(final["metrics"])

    saved = out / "nse-session"
    assert main(["eval", str(saved), "--portability", str(MQUAKE), "--no-generation", "--record",
                 "--device", "cpu"]) == 0
    recorded = {r.metric_type: r for r in ModelCard.load(saved / "README.md").data.eval_results}
    assert recorded["portability"].dataset_name == "MQuAKE multi-hop questions (3 cases)"


def test_cli_refuses_a_malformed_portability_file(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.json").write_text(json.dumps([{"requested_rewrite": [], "questions": ["Q?"]}]))
    assert main(["eval", str(tiny_dir), "--portability", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2
    assert "case 0: 'requested_rewrite' is an empty list" in capsys.readouterr().out
