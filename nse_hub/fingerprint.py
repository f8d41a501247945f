"""sha256 fingerprints of weights: cache keys for statistics and the wrong-base guard of adapters."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from nse_hub.offload import read_tensor


def tensor_sha256(tensor: torch.Tensor, digest: hashlib._Hash | None = None) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (as stored, in C order)."""
    digest = digest or hashlib.sha256()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    data = tensor.detach().contiguous().cpu().reshape(-1)
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """Fingerprint of a module's own parameters (a projection's weight and bias)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(recurse=False)):
        digest.update(name.encode())
        tensor_sha256(param, digest)
    return digest.hexdigest()


def model_sha256(model: nn.Module, skip: Iterable[str] = ()) -> str:
    """Fingerprint of every parameter and buffer of a model (tied weights counted once).

    ``skip`` names parameters to leave out, e.g. edited projections whose current value is not the original.
    """
    skipped = set(skip)
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda item: item[0]):
        # Offloaded tensors all sit at address 0 on the meta device: tell them apart by object instead.
        identity = id(tensor) if tensor.device.type == "meta" else tensor.data_ptr()
        if name in skipped or identity in seen:
            continue
        seen.add(identity)
        digest.update(name.encode())
        tensor_sha256(read_tensor(model, name) if tensor.device.type == "meta" else tensor, digest)
    return digest.hexdigest()
