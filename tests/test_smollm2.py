"""The real thing on SmolLM2-135M-Instruct (CPU): edits, stock loading, resume, guard, Hub cycle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, save_tiny
from safetensors.torch import load_file

from nse_hub import EditSession, load_requests
from nse_hub.adapters import ADAPTER_WEIGHTS, factor_bytes, read_adapter
from nse_hub.errors import BaseModelMismatchError

pytestmark = pytest.mark.slow

ROUNDS = [load_requests(FIXTURES / "requests.json")[:2], load_requests(FIXTURES / "requests.json")[2:],
          load_requests(FIXTURES / "requests.jsonl")]
PROMPT = "The mother tongue of Danielle Darrieux is"
# Fewer statistics samples than the preset keep the suite fast; the edits below still succeed.
SETTINGS = {"mom2_n_samples": 96, "device": "cpu"}

STOCK_LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base_path, source, revision, out, prompt = sys.argv[1:6]
tokenizer = AutoTokenizer.from_pretrained(base_path)
ids = tokenizer(prompt, return_tensors="pt").input_ids
kwargs = {"revision": revision} if revision != "-" else {}
results = {}
with torch.no_grad():
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), source, **kwargs)
    results["unmerged"] = model(input_ids=ids).logits[0, -1].tolist()
    results["merged"] = model.merge_and_unload()(input_ids=ids).logits[0, -1].tolist()
    if revision == "-":
        stack = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), source + "/rounds/001",
                                          adapter_name="r1")
        stack.load_adapter(source + "/rounds/002", adapter_name="r2")
        stack.base_model.set_adapter(["r1", "r2"])
        results["stack_1_2"] = stack(input_ids=ids).logits[0, -1].tolist()
assert "nse_hub" not in sys.modules
json.dump(results, open(out, "w"))
"""

RESUME = """
import sys
from safetensors.torch import save_file
from nse_hub import EditSession, load_requests
folder, requests, out = sys.argv[1:4]
session = EditSession.from_pretrained(folder, device="cpu")
session.edit(load_requests(requests), progress=False)
factors = session.deltas.rounds[-1]
save_file({f"{k}.{name}": getattr(f, name).contiguous() for k, f in factors.items() for name in ("A", "B")}, out)
"""


@pytest.fixture(scope="module")
def session(smollm2_path: Path) -> EditSession:
    session = EditSession.from_pretrained("smollm2-135m", **SETTINGS)
    for requests in ROUNDS:
        session.edit(requests, progress=False)
    return session


def last_logits(session: EditSession, version: int | None = None) -> torch.Tensor:
    ids = session.tokenizer(PROMPT, return_tensors="pt").input_ids
    model = session.model if version is None else session.merge(round=version)
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def run_script(tmp_path: Path, name: str, code: str, *args: str, env: dict | None = None) -> None:
    script = tmp_path / name
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]


def test_rounds_write_the_facts(session: EditSession) -> None:
    assert session.config.preset == "smollm2-135m"
    for report in session.rounds:
        assert all(r.p_new_after > r.p_new_before for r in report.requests)
        assert report.metrics(after=True)["efficacy"] == 100.0
    first = session.rounds[0].requests[0]
    assert first.p_new_before < 0.1 < 0.5 < first.p_new_after  # Danielle Darrieux: French → English
    ids = session.tokenizer(PROMPT, return_tensors="pt")
    text = session.tokenizer.decode(session.model.generate(**ids, max_new_tokens=3, do_sample=False)[0])
    assert text.startswith(PROMPT + " English")


def test_stock_peft_in_a_fresh_process(session: EditSession, smollm2_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    session.save_pretrained(folder)
    out = tmp_path / "stock.json"
    run_script(tmp_path, "stock.py", STOCK_LOADER, str(smollm2_path), str(folder), "-", str(out), PROMPT)
    loaded = {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}
    expected = last_logits(session)
    assert torch.allclose(loaded["unmerged"], expected, atol=2e-4)  # fp32 rounding of the LoRA path
    assert torch.equal(loaded["merged"], expected)  # exactly W0 + ΔW
    assert torch.allclose(loaded["stack_1_2"], last_logits(session, 2), atol=2e-4)

    factors, _ = read_adapter(folder, session.layout)
    layout = session.layout
    factor_form = sum(factor_bytes(layout.hidden_size, layout.intermediate_size, f.rank) for f in factors.values())
    dense_form = len(factors) * layout.hidden_size * layout.intermediate_size * 4
    stored = (folder / ADAPTER_WEIGHTS).stat().st_size
    print(f"adapter {stored} B, factor form {factor_form} B, dense form {dense_form} B")
    assert stored <= min(factor_form, dense_form) + 8192  # plus the safetensors header


def test_resume_in_a_new_process_gives_identical_factors(session: EditSession, tmp_path: Path) -> None:
    folder = tmp_path / "after-two"
    session.save_pretrained(folder, round=2)
    requests = tmp_path / "round3.jsonl"
    requests.write_text((FIXTURES / "requests.jsonl").read_text())
    out = tmp_path / "round3.safetensors"
    run_script(tmp_path, "resume.py", RESUME, str(folder), str(requests), str(out))
    resumed = load_file(str(out))
    for layer, f in session.deltas.rounds[2].items():
        assert torch.equal(resumed[f"{layer}.A"], f.A) and torch.equal(resumed[f"{layer}.B"], f.B)


def test_wrong_base_is_refused(session: EditSession, tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    session.save_pretrained(folder)
    tiny = save_tiny(tmp_path / "tiny-llama")
    with pytest.raises(BaseModelMismatchError) as error:
        EditSession.from_pretrained(str(folder), base_model=str(tiny), device="cpu")
    assert session.layout.projection_name(session.config.layers[0]) in str(error.value)
    assert "fingerprint" in str(error.value)


def test_hub_cycle_with_stock_loading(session: EditSession, hub, smollm2_path: Path, tmp_path: Path) -> None:
    pushed = session.push_to_hub("tester/smollm2-edits")
    assert [p.round for p in pushed] == [1, 2, 3]
    env = {"HF_HOME": str(tmp_path / "fresh-hf-home")}  # a cold cache: everything comes from the loopback Hub
    for version in (1, 2):
        out = tmp_path / f"hub-{version}.json"
        run_script(tmp_path, "stock.py", STOCK_LOADER, str(smollm2_path), "tester/smollm2-edits",
                   f"round-{version}", str(out), PROMPT, env=env)
        loaded = {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}
        assert torch.allclose(loaded["unmerged"], last_logits(session, version), atol=2e-4)
        assert torch.equal(loaded["merged"], last_logits(session, version))
        card = hub.file("tester/smollm2-edits", f"round-{version}", "README.md").decode()
        subjects = [r.request.subject for report in session.rounds for r in report.requests]
        wanted = [r.request.subject for report in session.rounds[:version] for r in report.requests]
        assert [s for s in subjects if f"| {s} |" in card] == wanted

