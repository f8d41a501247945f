"""Edit requests: the typed record, the four input formats, and validation that names the record."""

import json
from pathlib import Path

import pytest
from conftest import COUNTERFACT, FIXTURES, needs_shared_data

from nse_hub.requests import EditRequest, Probe, RequestError, load_requests, parse_requests


def test_own_schema_json() -> None:
    requests = load_requests(FIXTURES / "requests.json")
    assert len(requests) == 4
    first = requests[0]
    assert first.prompt == "The mother tongue of {} is"
    assert first.text == "The mother tongue of Danielle Darrieux is"
    assert first.neighbors == (Probe("Michel Rocard is a native speaker of", "French"),)
    assert first.case_id == 0


def test_jsonl() -> None:
    requests = load_requests(FIXTURES / "requests.jsonl")
    assert [r.subject for r in requests] == ["Toni Kroos", "France"]


def test_counterfact_rome_schema() -> None:
    (request,) = load_requests(FIXTURES / "counterfact_rome.json")
    assert (request.prompt, request.target_new, request.target_true) == (
        "The mother tongue of {} is", "English", "French")
    assert len(request.paraphrases) == 2
    # ROME neighbourhood prompts are plain strings whose expected answer is the true target.
    assert request.neighbors[0] == Probe("The mother tongue of Léon Blum is", "French")
    assert len(request.generation_prompts) == 2


def test_counterfact_easyedit_schema_fills_the_template() -> None:
    requests = load_requests(FIXTURES / "counterfact_easyedit.json")
    assert requests[0].prompt == "What is the twin city of {}? It is"
    assert requests[0].target_true == "Beirut"
    assert requests[0].paraphrases == ("People in Lyon's twin city speak the language of",)
    assert requests[0].neighbors == (Probe("The twin city of Trieste is", "Beirut"),)


def test_zsre_schema_writes_the_answer() -> None:
    (request,) = load_requests(FIXTURES / "zsre.json")
    assert request.prompt == "What is the product made by {}?"
    assert request.target_new == "uniform" and request.target_true is None
    assert request.neighbors[0].answer == "Walter Sobchak"


@needs_shared_data()
def test_real_counterfact_file() -> None:
    requests = load_requests(COUNTERFACT, limit=50)
    assert len(requests) == 50
    assert requests[0].text == "The mother tongue of Danielle Darrieux is"
    assert all(r.target_true and r.paraphrases and r.neighbors for r in requests)


def test_constructor_accepts_lists_and_pairs() -> None:
    request = EditRequest("{} plays", "Kroos", "golf", neighbors=[("Messi plays", "football")], paraphrases=["x"])
    assert request.neighbors == (Probe("Messi plays", "football"),)
    assert request.paraphrases == ("x",)


@pytest.mark.parametrize(("record", "reason"), [
    ({"prompt": "The capital of France is", "subject": "Germany", "target_new": "Lyon"}, "does not occur"),
    ({"prompt": "{} and {}", "subject": "A", "target_new": "B"}, "exactly once"),
    ({"prompt": "{} is", "subject": "A", "target_new": "  "}, "'target_new' is empty"),
    ({"prompt": "{} is", "subject": 3, "target_new": "B"}, "'subject' must be a string"),
    ({"prompt": "{} is", "subject": "A", "target_new": "B", "target_true": "B"}, "nothing to edit"),
    ({"prompt": "{} is", "subject": "A", "target_new": "B", "colour": "red"}, "unknown field"),
    ({"prompt": "{} is", "subject": "A"}, "'target_new' must be a string"),
    ("just a string", "expected an object"),
])
def test_bad_records_name_the_record_and_reason(record: object, reason: str) -> None:
    good = {"prompt": "{} is", "subject": "A", "target_new": "B"}
    with pytest.raises(RequestError) as error:
        parse_requests([good, good, record])
    assert "record 2" in str(error.value)
    assert reason in str(error.value)


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("this is not json\n{also not}\n")
    with pytest.raises(RequestError, match="neither JSON nor JSONL"):
        load_requests(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(RequestError, match="no edit requests"):
        load_requests(path)


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    requests = load_requests(FIXTURES / "requests.json")
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in requests))
    assert load_requests(tmp_path / "out.jsonl") == requests
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["subject"] == "Danielle Darrieux"
