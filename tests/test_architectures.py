"""Architecture detection: where the edited modules are, for every supported family."""

import pytest
import torch
from conftest import TINY_FAMILIES, tiny_model
from transformers import OPTConfig, OPTForCausalLM

from nse_hub.architectures import ModelLayout, UnsupportedArchitectureError

EXPECTED = {
    "llama": ("model.layers.2.mlp.down_proj", "linear", 64),
    "qwen2": ("model.layers.2.mlp.down_proj", "linear", 64),
    "mistral": ("model.layers.2.mlp.down_proj", "linear", 64),
    "gemma3": ("model.layers.2.mlp.down_proj", "linear", 64),
    "gpt2": ("transformer.h.2.mlp.c_proj", "conv1d", 128),
    "gptj": ("transformer.h.2.mlp.fc_out", "linear", 128),
    "gpt_neox": ("gpt_neox.layers.2.mlp.dense_4h_to_h", "linear", 64),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_detects_layout(family: str) -> None:
    model = tiny_model(family)
    layout = ModelLayout.detect(model)
    name, weight_layout, d_ff = EXPECTED[family]
    assert layout.projection_name(2) == name
    assert layout.weight_layout == weight_layout
    assert (layout.hidden_size, layout.intermediate_size, layout.num_layers) == (32, d_ff, 4)
    assert layout.layer_returns_tuple == (family == "gptj")
    # The weight view is always d_model × d_ff, whatever the module stores.
    assert tuple(layout.weight_view(layout.projection(model, 2)).shape) == (32, d_ff)
    final_norms = {"gpt2": "transformer.ln_f", "gptj": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
    assert layout.final_norm(model) is model.get_submodule(final_norms.get(family, "model.norm"))


def test_stored_layout_round_trips_for_conv1d() -> None:
    layout = ModelLayout.detect(tiny_model("gpt2"))
    matrix = torch.randn(32, 128)
    assert torch.equal(layout.to_stored_layout(matrix), matrix.T)


def test_unsupported_model_names_what_is_missing() -> None:
    vocab = 100
    model = OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitectureError) as error:
        ModelLayout.detect(model)
    message = str(error.value)
    assert "OPTForCausalLM" in message and "model.layers" in message and "transformer.h" in message
