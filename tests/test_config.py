"""EditConfig: per-field help, saving and loading itself, reading the reference implementations' hparams."""

import dataclasses
import json
from pathlib import Path

import pytest

from nse_hub.config import EditConfig
from nse_hub.errors import ConfigError, MissingFileError

# Shaped like the NSE/AlphaEdit repositories' hparams/*/Llama3-8B.json (module templates, dtypes and all).
REFERENCE = {
    "layers": [4, 5, 6, 7, 8], "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": 25,
    "v_lr": 0.1, "v_loss_layer": 31, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75, "kl_factor": 0.0625,
    "mom2_adjustment": True, "mom2_update_weight": 15000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp", "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000, "mom2_dtype": "float32", "nullspace_threshold": 2e-2, "L2": 10, "alpha": 2.5,
    "upper_bound": 50, "neuron_threshold": 0.8, "max_iterations": 3,
}


def test_every_field_has_help() -> None:
    for f in dataclasses.fields(EditConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name
    assert EditConfig.help("mom2_update_weight").startswith("λ")
    assert EditConfig.help().count("\n") == len(dataclasses.fields(EditConfig)) - 1
    with pytest.raises(ConfigError, match=r"did you mean 'v_lr' \(Adam's learning rate"):
        EditConfig.from_dict({"v_lrr": 1.0})


def test_saves_and_loads_itself(tmp_path: Path) -> None:
    config = EditConfig(method="alphaedit", layers=(2, 3, 4), v_lr=0.25, context_prefixes=("A", "B"))
    path = config.save_pretrained(tmp_path)
    assert json.loads(path.read_text())["layers"] == [2, 3, 4]
    assert EditConfig.from_pretrained(tmp_path) == config
    assert EditConfig.from_pretrained(path, v_lr=1.0) == config.replace(v_lr=1.0)
    with pytest.raises(MissingFileError, match="save_pretrained"):
        EditConfig.from_pretrained(tmp_path / "nowhere")


def test_changed_settings_name_what_an_edit_follows_from_not_how_it_is_computed() -> None:
    config = EditConfig(method="alphaedit", layers=(2, 3, 4), L2=30.0, batch_size=4, lean=True, preset="x")
    assert config.changed_settings() == {"method": "alphaedit", "layers": [2, 3, 4], "L2": 30.0}
    assert EditConfig(method="alphaedit", layers=(2, 3, 4), L2=30.0).changed_settings() == config.changed_settings()
    assert EditConfig().changed_settings() == {}


def test_reads_a_reference_hparams_file(tmp_path: Path) -> None:
    (tmp_path / "Llama3-8B.json").write_text(json.dumps(REFERENCE))
    config = EditConfig.from_reference(tmp_path / "Llama3-8B.json", method="nse")
    assert config.layers == (4, 5, 6, 7, 8) and config.mom2_update_weight == 15000
    assert (config.alpha, config.upper_bound, config.thresholds) == (2.5, 50, "absolute")
    assert config.neuron_threshold == 0.8 and config.mom2_n_samples == 100000
    # Its absolute null-space cutoff does not carry over: the relative default stays.
    assert config.nullspace_threshold == EditConfig().nullspace_threshold and config.L2 == 10
