"""Where decoder layers, MLP output projections, final norms and output heads live in each model family.

This is the only module that knows module names and weight layouts. Everything else asks a
:class:`ModelLayout` for "the projection of layer 7" or "the weight of that projection as a
``d_model × d_ff`` matrix" and never spells a module path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from nse_hub.errors import UnsupportedArchitectureError
from nse_hub.tracing import model_device

WeightLayout = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class ArchitectureFamily:
    """Module paths shared by a family of transformer implementations."""

    name: str
    layers: str  # path of the ModuleList of decoder layers
    projection: str  # path of the MLP output projection inside one decoder layer
    final_norm: str
    model_types: tuple[str, ...]
    # A norm applied to the MLP output before it joins the residual stream (Gemma 2/3), if any.
    post_mlp_norm: str | None = None


FAMILIES: tuple[ArchitectureFamily, ...] = (
    ArchitectureFamily(
        name="gemma",
        layers="model.layers",
        projection="mlp.down_proj",
        final_norm="model.norm",
        model_types=("gemma2", "gemma3", "gemma3_text"),
        post_mlp_norm="post_feedforward_layernorm",
    ),
    ArchitectureFamily(
        name="llama",
        layers="model.layers",
        projection="mlp.down_proj",
        final_norm="model.norm",
        model_types=(
            "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
            "olmo", "olmo2", "phi3", "granite", "smollm3", "cohere", "stablelm",
        ),
    ),
    ArchitectureFamily(
        name="gpt2", layers="transformer.h", projection="mlp.c_proj", final_norm="transformer.ln_f",
        model_types=("gpt2",),
    ),
    ArchitectureFamily(
        name="gptj", layers="transformer.h", projection="mlp.fc_out", final_norm="transformer.ln_f",
        model_types=("gptj",),
    ),
    ArchitectureFamily(
        name="gpt_neox", layers="gpt_neox.layers", projection="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm", model_types=("gpt_neox",),
    ),
)


# Config attributes that name the longest sequence a model's positions cover, in the order families use them.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence (in tokens) the model's configuration declares, or ``None`` when it declares none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_causal_lm(config: PretrainedConfig) -> None:
    """Refuse, from its configuration alone (before the weights are loaded), a model nse-hub cannot edit.

    Known model types pass. Others must be causal LMs; their module layout is then checked on an empty
    (``meta``) copy of the model, so that an unknown layout fails in one line instead of after the download.

    Raises:
        UnsupportedArchitectureError: not a causal (decoder-only) LM, or no known place for its MLP projections.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if any(model_type in family.model_types for family in FAMILIES):
        return
    architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} ({architectures}) is not a causal language model: nse-hub edits "
            f"decoder-only models of the families {', '.join(f.name for f in FAMILIES)} (and their fine-tunes)")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # some models cannot be built empty: their full load will tell
        return
    ModelLayout.detect(skeleton, probe=False)


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@dataclass(frozen=True)
class ModelLayout:
    """Everything nse-hub needs to know about a loaded causal LM's structure.

    Weights of the MLP output projection are always exposed to the algorithm as ``d_model × d_ff``
    (the ``nn.Linear`` orientation); GPT-2's ``Conv1D`` stores the transpose, which
    :meth:`weight_view` and :meth:`set_weight` hide.
    """

    family: str
    model_type: str
    layers_path: str
    projection_path: str
    final_norm_path: str
    weight_layout: WeightLayout
    num_layers: int
    hidden_size: int
    intermediate_size: int
    logit_softcap: float | None = None
    layer_returns_tuple: bool = False
    post_mlp_norm_path: str | None = None

    @classmethod
    def detect(cls, model: nn.Module, probe: bool = True) -> ModelLayout:
        """Find the decoder layers, MLP output projection, final norm and output head of ``model``.

        ``probe=False`` skips the one-token forward pass that finds out whether decoder layers return
        tuples, so that a model built on the ``meta`` device works (``layer_returns_tuple`` is then
        ``False``): enough to read and write adapters, not to trace the model.

        Raises:
            UnsupportedArchitectureError: naming what was looked for and not found.
        """
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        # Known model types first, then every family in turn (fine-tunes with renamed model_type).
        ordered = sorted(FAMILIES, key=lambda f: model_type not in f.model_types)
        tried: list[str] = []
        for family in ordered:
            layers = _get_submodule(model, family.layers)
            if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
                tried.append(f"decoder layers at '{family.layers}'")
                continue
            projection = _get_submodule(layers[0], family.projection)
            if projection is None:
                tried.append(f"MLP output projection at '{family.layers}.0.{family.projection}'")
                continue
            if family.post_mlp_norm and _get_submodule(layers[0], family.post_mlp_norm) is None:
                tried.append(f"post-MLP norm at '{family.layers}.0.{family.post_mlp_norm}'")
                continue
            final_norm = _get_submodule(model, family.final_norm)
            if final_norm is None:
                tried.append(f"final norm at '{family.final_norm}'")
                continue
            if model.get_output_embeddings() is None:
                raise UnsupportedArchitectureError(
                    f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
                    "load the model with AutoModelForCausalLM."
                )
            layout, out_features, in_features = _projection_shape(projection)
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            return cls(
                family=family.name,
                model_type=model_type,
                layers_path=family.layers,
                projection_path=family.projection,
                final_norm_path=family.final_norm,
                weight_layout=layout,
                num_layers=len(layers),
                hidden_size=out_features,
                intermediate_size=in_features,
                logit_softcap=getattr(text_config, "final_logit_softcapping", None),
                layer_returns_tuple=_layer_returns_tuple(model, layers[0]) if probe else False,
                post_mlp_norm_path=family.post_mlp_norm,
            )
        raise UnsupportedArchitectureError(
            f"nse-hub does not know where to edit {type(model).__name__} (model_type '{model_type}'): "
            f"looked for {'; '.join(dict.fromkeys(tried))}. Supported families: "
            f"{', '.join(f.name for f in FAMILIES)}."
        )

    # --- module access -------------------------------------------------------------------------

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        return self.layers(model)[index]

    def projection_name(self, index: int) -> str:
        """Full module name of layer ``index``'s MLP output projection, as PEFT and state dicts spell it."""
        return f"{self.layers_path}.{index}.{self.projection_path}"

    def projection(self, model: nn.Module, index: int) -> nn.Module:
        return model.get_submodule(self.projection_name(index))

    def post_mlp_norm(self, model: nn.Module, index: int) -> nn.Module | None:
        """The norm between layer ``index``'s MLP output and the residual stream, if the family has one."""
        if self.post_mlp_norm_path is None:
            return None
        return self.layer(model, index).get_submodule(self.post_mlp_norm_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The base model whose forward runs embeddings, decoder layers and the final norm."""
        return model.get_submodule(self.layers_path.rsplit(".", 1)[0])

    # --- weights -------------------------------------------------------------------------------

    def weight_view(self, module: nn.Module) -> torch.Tensor:
        """The projection weight as ``d_model × d_ff`` (a view, no copy)."""
        return module.weight.T if self.weight_layout == "conv1d" else module.weight

    def to_stored_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """Turn a ``d_model × d_ff`` matrix into the orientation the module stores."""
        return matrix.T.contiguous() if self.weight_layout == "conv1d" else matrix

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Output-head logits for final hidden states (after the final norm), in float32.

        The head runs in the model's precision; its logits are upcast before the soft cap and any loss, so a
        bfloat16/float16 model's value step computes its loss in float32.
        """
        logits = model.get_output_embeddings()(hidden).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def attention_kv_width(config: object, hidden_size: int) -> int:
    """Width of one layer's key (or value) cache per token: key/value heads × head dimension (GQA-aware)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden_size // heads if heads else hidden_size)
    return (getattr(config, "num_key_value_heads", None) or heads or 1) * head_dim


def _layer_returns_tuple(model: nn.Module, layer: nn.Module) -> bool:
    """Run one token through the model to see whether decoder layers return a tuple (GPT-J) or a tensor."""
    seen: list[bool] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.append(isinstance(out, tuple)))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model_device(model)), use_cache=False)
    finally:
        handle.remove()
    return bool(seen and seen[0])


def _projection_shape(module: nn.Module) -> tuple[WeightLayout, int, int]:
    """Return (layout, out_features, in_features) of an MLP output projection."""
    if isinstance(module, nn.Linear):
        return "linear", module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        fan_in, fan_out = module.weight.shape
        return "conv1d", fan_out, fan_in
    raise UnsupportedArchitectureError(
        f"the MLP output projection is a {type(module).__name__}; nse-hub edits nn.Linear and GPT-2 Conv1D."
    )


@dataclass(frozen=True)
class ServingShape:
    """The sizes that decide how much memory serving a model takes (see :mod:`nse_hub.serve_memory`).

    Attributes:
        parameters: weights (tied ones once).
        linear_features: the sum of in + out features over the decoder layers' linear modules: the LoRA
            buffer elements a server allocates per adapter slot and unit of rank.
        kv_values_per_token: keys and values cached per token (2 × layers × KV heads × head size).
        max_positions: the context length the model was made for, if its config says.
        dtype: the weights' dtype its config names (``float32``, ``bfloat16`` …), if any.
    """

    parameters: int
    linear_features: int
    kv_values_per_token: int
    max_positions: int | None
    dtype: str | None

    @classmethod
    def of(cls, model: nn.Module, layout: ModelLayout) -> ServingShape:
        """Read the sizes off ``model`` (weights on the ``meta`` device are enough)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        features = 0
        for module in layout.layers(model).modules():
            if isinstance(module, nn.Linear):
                features += module.in_features + module.out_features
            elif type(module).__name__ == "Conv1D":
                features += sum(module.weight.shape)
        heads = getattr(config, "num_attention_heads", None) or 1
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or layout.hidden_size // heads
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return cls(parameters=sum(p.numel() for p in model.parameters()), linear_features=features,
                   kv_values_per_token=2 * layout.num_layers * kv_heads * head_dim,
                   max_positions=getattr(config, "max_position_embeddings", None),
                   dtype=str(dtype).removeprefix("torch.") if dtype is not None else None)
