"""nse-hub studio: versions switched exactly, the /compare API through gradio_client, the Edit and Diff logic,
the Space writer, and (marked ``studio``, `make test-studio`) the page driven in headless Chromium on SmolLM2."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the test machine

import pytest
from conftest import FIXTURES, TINY_HPARAMS, save_tiny

gradio = pytest.importorskip("gradio", reason='the studio extra is not installed (pip install "nse-hub[studio]")')

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from huggingface_hub import SpaceCard  # noqa: E402

from nse_hub import EditSession, load_requests  # noqa: E402
from nse_hub.cli import main  # noqa: E402
from nse_hub.errors import RequestError, VersionNotFoundError  # noqa: E402
from nse_hub.scoring import generate_greedy  # noqa: E402
from nse_hub.studio import SPACE_GRADIO, Studio, build_app, read_new_facts, write_space  # noqa: E402
from nse_hub.studio.app import compare_html  # noqa: E402

REQUESTS = load_requests(FIXTURES / "requests.json")
PROMPT = REQUESTS[1].text  # "The official religion of Edwin of Northumbria is": each version answers it differently
TOKENS = 12  # the studio's continuation length


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(blocks) -> Iterator[str]:
    """The page on 127.0.0.1 (a free port) for the duration of the block; yields its URL."""
    port = _free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory) -> Path:
    """A saved edit of two rounds on a tiny random Llama."""
    root = tmp_path_factory.mktemp("studio")
    base = save_tiny(root / "tiny-llama")
    # A lighter preservation weight than the preset's: on a random model the rounds then change the continuations.
    session = EditSession.from_pretrained(str(base), device="cpu", **TINY_HPARAMS, layers=(1, 2),
                                          mom2_update_weight=100)
    session.edit(REQUESTS[:2], progress=False)
    session.edit(REQUESTS[2], progress=False)
    session.save_pretrained(root / "edit")
    return root / "edit"


@pytest.fixture(scope="module")
def studio(tiny_edit: Path) -> Studio:
    return Studio.load(str(tiny_edit), device="cpu")


def expected(folder: Path, round: int, prompt: str = PROMPT) -> str:
    """What version ``round`` answers, from the saved edit merged into a fresh copy of the base (no studio)."""
    session = EditSession.from_pretrained(str(folder), device="cpu")
    return generate_greedy(session.merge(round=round), session.tokenizer, [prompt], TOKENS)[0]


def test_versions_answer_as_their_merged_models(studio: Studio, tiny_edit: Path) -> None:
    assert studio.versions == ["base", "round-1", "round-2"]
    answers = studio.compare(PROMPT, ["round-2", "base", "round-1"])
    assert list(answers) == ["round-2", "base", "round-1"]
    for round in (0, 1, 2):
        assert answers["base" if round == 0 else f"round-{round}"] == expected(tiny_edit, round)
    assert len(set(answers.values())) == 3  # each round changes what the tiny model says
    latest = {layer: m.weight.detach().clone() for layer, m in studio.session.deltas.modules.items()}
    studio.compare(PROMPT, ["base"])
    for layer, module in studio.session.deltas.modules.items():  # the latest version is back afterwards
        assert module.weight.equal(latest[layer])


def test_edited_prompts_get_p_new_and_p_old(studio: Studio) -> None:
    fact = studio.probabilities(PROMPT, ["base", "round-1"])
    assert (fact.new, fact.old) == ("Islam", "Christianity")
    assert fact.p_new["round-1"] > fact.p_new["base"]  # round 1 wrote it
    assert studio.probabilities(REQUESTS[0].paraphrases[0], ["base"]).new == "English"  # paraphrases count too
    assert studio.probabilities("Nothing edited here", ["base"]) is None
    page = compare_html(PROMPT, {"base": " a", "round-1": " b"}, fact)
    assert 'data-version="round-1" class="continuation"' in page and "p(new) <code>Islam</code>" in page


@pytest.mark.parametrize(("prompt", "versions", "message"), [
    (PROMPT, ["round-9"], "version 'round-9' does not exist: this edit has base, round-1, round-2"),
    (PROMPT, ["latest"], "unknown version 'latest'"),
    ("  ", ["base"], "the prompt is empty"),
    (PROMPT, [], "no version chosen"),
])
def test_bad_comparisons_say_what_to_do(studio: Studio, prompt: str, versions: list[str], message: str) -> None:
    with pytest.raises((VersionNotFoundError, RequestError), match=re.escape(message)):
        studio.compare(prompt, versions)


def test_compare_api_through_gradio_client(studio: Studio, tiny_edit: Path) -> None:
    with served(build_app(studio)) as url:
        client = Client(url, verbose=False)
        answers = client.predict(PROMPT, ["base", "round-2"], api_name="/compare")
        assert answers == {"base": expected(tiny_edit, 0), "round-2": expected(tiny_edit, 2)}
        with pytest.raises(AppError, match=re.escape("version 'round-7' does not exist: this edit has base")):
            client.predict(PROMPT, ["round-7"], api_name="/compare")
        with pytest.raises(AppError, match="the prompt is empty"):
            client.predict("", ["base"], api_name="/compare")
        assert "/compare" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_new_round_diff_discard_and_save(tiny_edit: Path, tmp_path: Path) -> None:
    folder = tmp_path / "edit"
    shutil.copytree(tiny_edit, folder)
    studio = Studio.load(str(folder), device="cpu")
    facts = read_new_facts([["{} can be found in", "Inner Circle railway line", "Singapore", "Melbourne"],
                            ["", "", "", ""]], None)
    report = studio.run_round(facts, progress=False)
    assert report.round == 3 and studio.versions[-1] == "round-3"
    diff = studio.diff("round-2", "round-3", probe=True)
    assert [(c.kind, c.target_b) for c in diff.changes] == [("added", "Singapore")]
    probe, written = diff.changes[0].probe, report.requests[0]  # each side answers as its version did
    assert probe["a"]["p_new"] == pytest.approx(written.p_new_before, rel=1e-4)
    assert probe["b"]["p_new"] == pytest.approx(written.p_new_after, rel=1e-4)
    assert probe["b"]["p_old"] == pytest.approx(written.p_true_after, rel=1e-4)
    assert [c.kind for c in studio.diff("base", "round-3").changes] == ["added"] * 4
    assert studio.discard_round() == 2 and studio.versions[-1] == "round-2"
    with pytest.raises(VersionNotFoundError, match="round-2 is saved"):
        studio.discard_round()
    studio.run_round(facts, progress=False)
    studio.save(folder)
    assert len(EditSession.from_pretrained(str(folder), device="cpu").rounds) == 3
    assert studio.saved_rounds == 3


def test_new_facts_are_validated_like_request_files(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="no new facts"):
        read_new_facts([["", None, "", ""]], None)
    with pytest.raises(RequestError, match=r"the table: record 0: .*target_new"):
        read_new_facts([["The capital of {} is", "Japan", "", ""]], None)
    (tmp_path / "facts.jsonl").write_text((FIXTURES / "requests.jsonl").read_text())
    assert read_new_facts([], tmp_path / "facts.jsonl") == load_requests(FIXTURES / "requests.jsonl")


def test_space_writer_and_its_app(hub, hub_base: str, tiny_edit: Path, tmp_path: Path, capsys) -> None:
    # A Space runs elsewhere: the edit is made on a base that is on the Hub too.
    session = EditSession.from_pretrained(hub_base, device="cpu", **TINY_HPARAMS, layers=(1, 2),
                                          mom2_update_weight=100)
    session.edit(REQUESTS[:2], progress=False)
    session.push_to_hub("tester/studio")
    space = tmp_path / "space"
    assert main(["studio", "tester/studio@round-1", "--space-dir", str(space)]) == 0
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "requirements.txt"]
    card = SpaceCard.load(space / "README.md")
    assert (card.data.sdk, card.data.sdk_version, card.data.app_file) == ("gradio", SPACE_GRADIO, "app.py")
    assert card.data.license == "apache-2.0" and "tester/studio" in card.data.models
    assert 'api_name="/compare"' in card.text
    assert (space / "requirements.txt").read_text().startswith("nse-hub[studio]==")
    constraints = (Path(__file__).parents[1] / "constraints.txt").read_text()
    assert f"gradio=={SPACE_GRADIO}\n" in constraints  # the Space runs the Gradio the tests run
    demo = runpy.run_path(str(space / "app.py"))["demo"]  # the Space's own app, as the Space starts it
    assert demo.studio.versions == ["base", "round-1"]
    with served(demo) as url:
        answers = Client(url, verbose=False).predict(PROMPT, ["base", "round-1"], api_name="/compare")
    assert answers == {version: generate_greedy(session.merge(round=k), session.tokenizer, [PROMPT], TOKENS)[0]
                       for k, version in enumerate(["base", "round-1"])}

    assert main(["studio", str(tiny_edit), "--space-dir", str(tmp_path / "other")]) == 2
    assert "push it first" in capsys.readouterr().out and not (tmp_path / "other").exists()
    written = write_space("tester/studio", tmp_path / "pinned", requirement="nse-hub[studio] @ git+https://x/y")
    assert written[1].read_text() == "nse-hub[studio] @ git+https://x/y\n"


def test_studio_refuses_what_is_not_a_saved_edit(tmp_path: Path, capsys) -> None:
    base = save_tiny(tmp_path / "plain[1]")
    with pytest.raises(VersionNotFoundError, match="is not a saved edit"):
        Studio.load(str(base), device="cpu")
    assert main(["studio", str(base)]) == 2
    assert "plain[1] is not a saved edit" in capsys.readouterr().out  # the CLI prints brackets as they are


# --- the page in a real browser (make test-studio) ---------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EIFFEL = "The Eiffel Tower is located in the city of"


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make test-studio installs it)"
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def smollm2_edit(smollm2_path: Path, tmp_path_factory) -> Path:
    """SmolLM2 with one fact written by NSE (the README's demo fact): the Eiffel Tower is in Rome."""
    folder = tmp_path_factory.mktemp("smollm2-studio") / "edit"
    session = EditSession.from_pretrained("smollm2-135m", device="cpu", mom2_n_samples=96)
    session.edit(load_requests(Path(__file__).parents[1] / "nse_hub" / "data" / "demo_requests.jsonl")[:1],
                 progress=False)
    session.save_pretrained(folder)
    return folder


@pytest.mark.studio
@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_the_page_in_headless_chromium(smollm2_edit: Path, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    studio = Studio.load(str(smollm2_edit), device="cpu")
    with served(build_app(studio)) as url:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 300)
            box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#compare-prompt textarea")))
            box.send_keys(EIFFEL)
            checked = [c for c in driver.find_elements(By.CSS_SELECTOR, "#compare-versions input[type=checkbox]")
                       if c.is_selected()]
            assert len(checked) == 2  # base and round-1, chosen by default
            driver.find_element(By.CSS_SELECTOR, "#compare-button").click()
            cells = {}
            for version in ("base", "round-1"):
                selector = f'#compare-results td.continuation[data-version="{version}"]'
                cells[version] = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, selector))).text
            driver.save_screenshot(str(tmp_path / "studio-compare.png"))
            print(f"\nscreenshot: {tmp_path / 'studio-compare.png'}")
            p_new = {v: float(driver.find_element(
                By.CSS_SELECTOR, f'#compare-results td.p-new[data-version="{v}"]').text) for v in ("base", "round-1")}
        finally:
            driver.quit()
    assert cells["round-1"].startswith(EIFFEL) and "Rome" in cells["round-1"].removeprefix(EIFFEL)
    assert "Rome" not in cells["base"] and "Paris" in cells["base"]
    assert p_new["round-1"] > 0.5 > p_new["base"]
