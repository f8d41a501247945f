"""Exact edits in bfloat16 and float16 models: deltas applied unmerged in float32, saved adapters, versions."""

from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, tiny_model, tiny_tokenizer
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nse_hub import EditSession, load_requests
from nse_hub.adapters import ADAPTER_WEIGHTS
from nse_hub.architectures import ModelLayout
from nse_hub.checkpoint import read_meta
from nse_hub.cli import main
from nse_hub.deltas import Factors, WeightDeltas
from nse_hub.errors import ConfigError

REQUESTS = load_requests(FIXTURES / "requests.json")
# An edited prompt of each round: where the edit shows.
IDS = tiny_tokenizer()([REQUESTS[0].text, REQUESTS[2].text], padding=True, return_tensors="pt").input_ids
LAYERS = (1, 2)


def bf16_session(folder: Path, dtype: str = "bfloat16") -> EditSession:
    return EditSession.from_pretrained(str(folder), device="cpu", dtype=dtype, **TINY_HPARAMS, layers=LAYERS,
                                      mom2_update_weight=10.0)  # a strong edit: it shows in the logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def float32_reference(session: EditSession, upto: int | None = None) -> torch.Tensor:
    """The session's model with ``W0 + ΔW`` of rounds ``1..upto``, everything computed in float32."""
    model = tiny_model()
    model.load_state_dict({k: v.float() for k, v in session.model.state_dict().items()})
    for layer in LAYERS:
        total = session.deltas.cumulative(layer, upto)
        projection = session.layout.projection(model, layer)
        projection.weight.data = projection.weight.data + session.layout.to_stored_layout(total.dense())
    return logits(model)


def bf16_noise(session: EditSession) -> float:
    """How far bfloat16 arithmetic alone takes the unedited model's logits from float32's."""
    with session.deltas.original():
        low = logits(session.model)
    model = tiny_model()
    model.load_state_dict({k: v.float() for k, v in session.model.state_dict().items()})
    return float((low - logits(model)).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_update_below_half_a_step_survives(dtype: torch.dtype) -> None:
    model = tiny_model().to(dtype)
    layout = ModelLayout.detect(model)
    projection = layout.projection(model, 1)
    d_model, d_ff = projection.weight.shape
    # Weights of magnitude 0.5–1 in ± pairs: a constant input gives W0 x = 0, so ΔW x shows in the output.
    magnitude = 0.5 + 0.5 * torch.rand(d_model, d_ff // 2, generator=torch.Generator().manual_seed(0))
    w0 = torch.stack([magnitude, -magnitude], dim=2).reshape(d_model, d_ff).to(dtype)
    projection.weight.data = w0.clone()
    deltas = WeightDeltas(model, layout, [1])
    # Every entry of ΔW (5e-5) is below half a step of its weight (bf16: 2e-3, fp16: 2.4e-4 at 0.5).
    b, a = torch.full((d_model, 1), 5e-5), torch.ones(1, d_ff)
    deltas.add(1, Factors(b, a))
    assert torch.equal(deltas.edited_weight(1), w0)  # rounded into the weights, the update vanishes
    x = torch.full((3, d_ff), 4.0, dtype=dtype)
    assert not bool(torch.nn.functional.linear(x, w0).any())
    torch.testing.assert_close(projection(x), (x.float() @ (b @ a).T).to(dtype))  # 0.0128 survives
    assert torch.equal(projection.weight, w0)  # the weights themselves never change
    with deltas.original():
        assert not bool(projection(x).any())
    assert bool(projection(x).all())


def test_a_float32_model_keeps_merged_weights() -> None:
    model = tiny_model()
    layout = ModelLayout.detect(model)
    deltas = WeightDeltas(model, layout, [1])
    factors = Factors(torch.randn(32, 2), torch.randn(2, 64))
    deltas.add(1, factors)
    assert not deltas.unmerged
    assert torch.equal(layout.projection(model, 1).weight, deltas.originals[1] + factors.dense())


def test_the_value_step_loss_is_float32() -> None:
    model = tiny_model().to(torch.bfloat16)
    layout = ModelLayout.detect(model)
    assert layout.logits(model, torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.fixture
def two_rounds(tiny_dir: Path) -> tuple[EditSession, list[torch.Tensor]]:
    session = bf16_session(tiny_dir)
    seen = [logits(session.model)]
    for chunk in (REQUESTS[:2], REQUESTS[2:]):
        session.edit(chunk, progress=False)
        seen.append(logits(session.model))
    return session, seen


def test_the_session_computes_w0_plus_delta_in_float32(two_rounds) -> None:
    session, seen = two_rounds
    assert session.deltas.unmerged and session.model.dtype == torch.bfloat16
    noise = bf16_noise(session)
    for version in (1, 2):
        reference = float32_reference(session, version)
        assert float((seen[version] - reference).abs().max()) <= 2 * noise
        assert float((seen[version] - seen[0]).abs().max()) > 10 * noise  # the edit is far above the rounding


def test_versions_and_rollback_are_exact(two_rounds) -> None:
    session, seen = two_rounds
    w0 = {layer: session.layout.projection(session.model, layer).weight.detach().clone() for layer in LAYERS}
    for version in (0, 1, 2):
        with session.deltas.at_round(version):
            assert torch.equal(logits(session.model), seen[version])
    with session.deltas.original():
        assert torch.equal(logits(session.model), seen[0])
    assert torch.equal(logits(session.model), seen[2])
    session.rollback(1)
    assert torch.equal(logits(session.model), seen[1])
    session.rollback(0)
    assert torch.equal(logits(session.model), seen[0])
    assert all(torch.equal(session.layout.projection(session.model, layer).weight, w) for layer, w in w0.items())


def test_a_merge_rounds_into_the_weights_and_leaves_the_session_alone(two_rounds, tiny_dir: Path) -> None:
    session, seen = two_rounds
    merged = session.merge()
    for layer in LAYERS:
        assert torch.equal(session.layout.projection(merged, layer).weight, session.deltas.edited_weight(layer))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    plain.load_state_dict(merged.state_dict())
    assert torch.equal(logits(merged), logits(plain))  # the copy carries no deltas of its own
    assert torch.equal(logits(session.model), seen[2])


def test_stock_peft_on_a_bf16_base_gives_the_sessions_logits(two_rounds, tiny_dir: Path, tmp_path: Path) -> None:
    session, seen = two_rounds
    session.save_pretrained(tmp_path / "edit")
    with safe_open(str(tmp_path / "edit" / ADAPTER_WEIGHTS), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}  # noqa: SIM118
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path / "edit")
    factors = [p for name, p in loaded.named_parameters() if "lora_" in name]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    assert all(p.dtype == torch.bfloat16 for name, p in loaded.named_parameters() if "lora_" not in name)
    assert torch.allclose(logits(loaded), seen[2], rtol=0, atol=2 * bf16_noise(session))
    assert torch.equal(logits(loaded), seen[2])  # the same arithmetic as peft's LoRA layer


def test_a_saved_bf16_edit_resumes_in_bf16(two_rounds, tmp_path: Path) -> None:
    session, seen = two_rounds
    session.save_pretrained(tmp_path / "edit")
    resumed = EditSession.from_pretrained(str(tmp_path / "edit"), device="cpu")
    assert resumed.model.dtype == torch.bfloat16 and resumed.deltas.unmerged
    assert torch.equal(logits(resumed.model), seen[2])


def test_nse_hub_edit_takes_a_dtype(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "edited"
    common = ["--requests", str(FIXTURES / "requests.json"), "--batch-size", "4", "--out", str(out), "--device", "cpu",
              "--set", "mom2_n_samples=16", "--set", "v_num_grad_steps=2", "--set", "layers=[1]"]
    assert main(["edit", str(tiny_dir), "--dtype", "bf16", *common]) == 0
    assert read_meta(out).base.dtype == "bfloat16"
    assert "bfloat16" in (out / "README.md").read_text()
    assert main(["edit", str(tiny_dir), "--dtype", "int8", *common]) == 2
    assert "dtype 'int8'" in capsys.readouterr().out


def test_one_live_session_per_bf16_model() -> None:
    model = tiny_model().to(torch.bfloat16)
    layout = ModelLayout.detect(model)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    first = WeightDeltas(model, layout, [1])
    first.add(1, Factors(torch.randn(32, 1), torch.randn(1, 64)))
    with pytest.raises(ConfigError, match="already edited by another session"):
        WeightDeltas(model, layout, [1])
    del first  # a dropped session stops editing: a new one starts from W0 alone
    second = WeightDeltas(model, layout, [1])
    assert torch.equal(layout.projection(model, 1)(x), torch.nn.functional.linear(x, second.originals[1]))
    assert len(layout.projection(model, 1)._forward_hooks) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_some_layers_edited_merged_and_unmerged(dtype: torch.dtype) -> None:
    model = tiny_model().to(dtype)
    layout = ModelLayout.detect(model)
    deltas = WeightDeltas(model, layout, [1, 2])
    for layer in (1, 2):
        deltas.add(layer, Factors(torch.randn(32, 2), torch.randn(2, 64)))
    deltas.commit_round()
    x = torch.randn(3, 64, dtype=dtype)
    outputs = {layer: layout.projection(model, layer)(x) for layer in (1, 2)}
    with deltas.original():
        unedited = {layer: layout.projection(model, layer)(x) for layer in (1, 2)}
    assert not torch.equal(outputs[1], unedited[1]) and not torch.equal(outputs[2], unedited[2])
    with deltas.only([1]):
        assert torch.equal(layout.projection(model, 1)(x), outputs[1])
        assert torch.equal(layout.projection(model, 2)(x), unedited[2])
    with deltas.only([]):
        assert all(torch.equal(layout.projection(model, layer)(x), unedited[layer]) for layer in (1, 2))
    assert all(torch.equal(layout.projection(model, layer)(x), outputs[layer]) for layer in (1, 2))  # restored
    with pytest.raises(ConfigError, match=r"layers \[3\] are not edit layers"), deltas.only([1, 3]):
        pass
