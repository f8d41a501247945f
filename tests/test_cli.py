"""The command line on a tiny model: edit in rounds, save, continue."""

import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from nse_hub.checkpoint import read_meta
from nse_hub.cli import _demo_folder, main
from nse_hub.errors import MemoryPlanWarning


def test_edit_in_rounds_saves_and_continues(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "edited"
    common = ["--set", "mom2_n_samples=16", "--set", "v_num_grad_steps=4", "--set", "layers=[1,2]",
              "--set", "context_length=6", "--device", "cpu"]
    assert main(["edit", str(tiny_dir), "--requests", str(FIXTURES / "requests.json"), "--batch-size", "2",
                 "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "Round 1" in printed and "Round 2" in printed and "Danielle Darrieux" in printed
    assert read_meta(out).rounds == 2
    lines = (out / "edits.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 1, 2, 2]
    # Continuing a saved edit adds rounds (its hyperparameters are fixed); the memory it plans for is not.
    with pytest.warns(MemoryPlanWarning, match=r"will not fit.*1 MiB"):
        assert main(["edit", str(out), "--requests", str(FIXTURES / "requests.jsonl"), "--batch-size", "2",
                     "--out", str(out), "--device", "cpu", "--device-memory", "1MB"]) == 0
    assert read_meta(out).rounds == 3


def test_bad_request_file_is_a_clear_error(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "no subject here", "subject": "x", "target_new": "y"}]))
    assert main(["edit", str(tiny_dir), "--requests", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "record 0" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_export_and_merge(tiny_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nse_hub import EditSession

    out = tmp_path / "edited"
    assert main(["edit", str(tiny_dir), "--requests", str(FIXTURES / "requests.json"), "--batch-size", "2",
                 "--out", str(out), "--set", "mom2_n_samples=16", "--set", "layers=[1,2]", "--device", "cpu"]) == 0
    assert main(["export", str(out), "--round", "1", "--out", str(tmp_path / "v1")]) == 0
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "v1" / "rounds").exists()
    session = EditSession.from_pretrained(str(out), device="cpu")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        v1 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "v1"))
        assert torch.allclose(v1(input_ids=ids).logits, session.merge(round=1)(input_ids=ids).logits, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert torch.equal(merged(input_ids=ids).logits, session.model(input_ids=ids).logits)
    assert main(["export", str(out), "--round", "7", "--out", str(tmp_path / "v7")]) == 2


def test_only_nse_hub_errors_are_exit_code_2(monkeypatch, capsys) -> None:
    import nse_hub.cli as cli
    from nse_hub.errors import ConfigError

    def bad_input(_args):
        raise ConfigError("layer 40 does not exist")

    def bug(_args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_models", bad_input)
    assert main(["models", "list"]) == 2
    assert capsys.readouterr().out.strip() == "error: layer 40 does not exist"
    monkeypatch.setattr(cli, "cmd_models", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["models", "list"])


def test_eval_record_rewrites_only_the_card_and_the_state(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "edited"
    assert main(["edit", str(tiny_dir), "--requests", str(FIXTURES / "requests.json"), "--batch-size", "2",
                 "--out", str(out), "--set", "mom2_n_samples=16", "--set", "layers=[1,2]", "--device", "cpu"]) == 0
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert main(["eval", str(out), "--record", "--no-generation", "--device", "cpu"]) == 0
    changed = {p.relative_to(out).as_posix() for p, (data, mtime) in files.items()
               if p.read_bytes() != data or p.stat().st_mtime_ns != mtime}
    assert changed == {"README.md", "nse_session/session.json"}
    assert "Efficacy" in (out / "README.md").read_text()


def test_demo_measures_the_statistics_its_layers_need_and_shows_the_sampling(tiny_dir: Path, tmp_path: Path,
                                                                             capsys, monkeypatch) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    config = read_meta(out).config
    # d_ff 64: 10 samples of 64 tokens give the 10 tokens per neuron (the presets' floor would be 320 samples).
    assert config.mom2_n_samples == 10 and "First run" in captured.out
    assert "sampling text" in captured.err and "second moments" in captured.err
    # Again: into the same folder it stops before any work and keeps the edit; by default it takes the next folder.
    saved = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out), "--device", "cpu"]) != 0
    refusal = capsys.readouterr().out
    assert "holds a saved edit" in refusal and "Nothing was written" in refusal
    assert "Round 1" in captured.out and "Round 1" not in refusal  # refused before the edit, not after it
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nse-hub-demo").symlink_to(out)
    assert _demo_folder(None) == Path("nse-hub-demo-2")
