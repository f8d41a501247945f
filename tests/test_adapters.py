"""Saved edits as PEFT adapters: stock loading, stacking rounds, sizes, compression, damaged files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, save_tiny
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nse_hub import EditSession, load_requests
from nse_hub.adapters import ADAPTER_WEIGHTS, factor_bytes, pack, read_adapter
from nse_hub.deltas import Factors
from nse_hub.errors import CheckpointError

REQUESTS = load_requests(FIXTURES / "requests.json")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])

# Runs in a fresh interpreter: only transformers and peft, never nse_hub.
STOCK_LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_path, folder, out = sys.argv[1:4]
ids = torch.tensor(json.loads(sys.argv[4]))
results = {}
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder)
results["unmerged"] = model(input_ids=ids).logits.tolist()
results["merged"] = model.merge_and_unload()(input_ids=ids).logits.tolist()
results["auto"] = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits.tolist()
stack = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder + "/rounds/001",
                                  adapter_name="r1")
stack.load_adapter(folder + "/rounds/002", adapter_name="r2")
stack.base_model.set_adapter(["r1", "r2"])
results["stack_1_2"] = stack(input_ids=ids).logits.tolist()
assert "nse_hub" not in sys.modules
json.dump(results, open(out, "w"))
"""


def stock_logits(base: Path, folder: Path, tmp_path: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    script, out = tmp_path / "stock_loader.py", tmp_path / "stock.json"
    script.write_text(STOCK_LOADER)
    subprocess.run([sys.executable, str(script), str(base), str(folder), str(out), json.dumps(ids.tolist())],
                   check=True, capture_output=True)
    return {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}


@pytest.fixture
def three_rounds(tiny_dir: Path, tmp_path: Path) -> tuple[EditSession, Path]:
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(REQUESTS[:2], progress=False)
    session.edit(REQUESTS[2:3], progress=False)
    session.edit(REQUESTS[3:], progress=False)
    session.save_pretrained(tmp_path / "edit")
    return session, tmp_path / "edit"


def test_stock_peft_loads_every_version(three_rounds, tiny_dir: Path, tmp_path: Path) -> None:
    session, folder = three_rounds
    with torch.no_grad():
        expected = session.model(input_ids=IDS).logits
        after_two = session.merge(round=2)(input_ids=IDS).logits
    loaded = stock_logits(tiny_dir, folder, tmp_path, IDS)
    assert torch.allclose(loaded["unmerged"], expected, atol=1e-5)
    assert torch.equal(loaded["merged"], expected)  # W0 + B @ A, the same arithmetic as the session
    assert torch.allclose(loaded["auto"], expected, atol=1e-5)
    assert torch.allclose(loaded["stack_1_2"], after_two, atol=1e-5)


def test_layout_manifest_and_sizes(three_rounds) -> None:
    session, folder = three_rounds
    assert sorted(p.name for p in (folder / "rounds").iterdir()) == ["001", "002", "003"]
    manifest = [json.loads(line) for line in (folder / "edits.jsonl").read_text().splitlines()]
    assert [m["round"] for m in manifest] == [1, 1, 2, 3]
    assert manifest[0]["subject"] == "Danielle Darrieux" and "p_new_after" in manifest[0]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == config["alpha_pattern"]
    layout = session.layout
    factors, header = read_adapter(folder, layout)
    assert json.loads(header["round"]) == 3
    for layer, f in factors.items():
        stacked = session.deltas.cumulative(layer)
        assert torch.equal(f.B, stacked.B) and torch.equal(f.A, stacked.A)  # stored as written: exact
    stored = (folder / ADAPTER_WEIGHTS).stat().st_size
    ranks = [f.rank for f in factors.values()]
    factor_form = sum(factor_bytes(layout.hidden_size, layout.intermediate_size, r) for r in ranks)
    dense_form = len(ranks) * layout.hidden_size * layout.intermediate_size * 4
    assert stored <= min(factor_form, dense_form) + 4096  # plus the safetensors header


def test_large_ranks_are_compressed_exactly(three_rounds) -> None:
    session, _ = three_rounds
    layout = session.layout
    g = torch.Generator().manual_seed(0)
    big = Factors(torch.randn(32, 80, generator=g), torch.randn(80, layout.intermediate_size, generator=g))
    (stored,), (report,) = pack(layout, {1: big})[0].values(), pack(layout, {1: big})[1]
    assert stored.rank <= 32 and report.stacked_rank == 80 and report.relative_error < 1e-6
    assert torch.allclose(stored.dense(), big.dense(), atol=1e-3)
    (truncated,), (lossy,) = pack(layout, {1: big}, max_rank=4)[0].values(), pack(layout, {1: big}, max_rank=4)[1]
    assert truncated.rank == 4 and 0 < lossy.relative_error < 1


def test_max_rank_is_reported_by_save(three_rounds, tmp_path: Path) -> None:
    session, _ = three_rounds
    reports = session.save_pretrained(tmp_path / "small", max_rank=1)
    assert {r.stored_rank for r in reports} == {1}
    assert all(0 < r.relative_error < 1 and r.lossy for r in reports)
    worst = max(r.relative_error for r in reports)
    # The card, the session state and the adapter all say that this version approximates the edit.
    card = (tmp_path / "small" / "README.md").read_text()
    assert "is an approximation" in card and f"{worst:.1%}" in card and "not an approximation" not in card
    state = json.loads((tmp_path / "small" / "nse_session" / "session.json").read_text())
    assert state["adapter"]["lossy"] is True
    assert [m["relative_error"] for m in state["adapter"]["modules"]] == [r.relative_error for r in reports]
    exact = session.save_pretrained(tmp_path / "exact")
    assert not any(r.lossy for r in exact)
    assert "not an approximation" in (tmp_path / "exact" / "README.md").read_text()
    assert json.loads((tmp_path / "exact" / "nse_session" / "session.json").read_text())["adapter"]["lossy"] is False


def test_damaged_files_give_clear_errors(three_rounds, tmp_path: Path) -> None:
    _, folder = three_rounds
    weights = folder / "rounds" / "002" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"rounds/002/adapter_model.safetensors does not match its checksum"):
        EditSession.from_pretrained(str(folder), device="cpu")
    (folder / "rounds" / "002" / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        EditSession.from_pretrained(str(folder), device="cpu")
    (folder / "nse_session" / "session.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"session\.json is damaged"):
        EditSession.from_pretrained(str(folder), device="cpu")


def test_saving_an_earlier_round_removes_later_ones_last(three_rounds) -> None:
    session, folder = three_rounds
    session.save_pretrained(folder, round=1)
    assert sorted(p.name for p in (folder / "rounds").iterdir()) == ["001"]
    resumed = EditSession.from_pretrained(str(folder), device="cpu")
    assert len(resumed.rounds) == 1


def test_wrong_base_for_an_adapter(three_rounds, tmp_path: Path) -> None:
    _, folder = three_rounds
    other = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "other", seed=7))
    with pytest.raises(ValueError, match="wrong base model"):
        EditSession.from_pretrained(str(folder), base_model=other)
    # Stock PEFT is not affected by the guard.
    PeftModel.from_pretrained(other, str(folder))
