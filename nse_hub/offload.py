"""Weights that accelerate moves: models dispatched with a device map, or offloaded to the CPU or the disk.

A model loaded with ``device_map="auto"`` (or passed through ``accelerate.cpu_offload``, ``disk_offload`` or
``dispatch_model``) keeps some of its weights outside the module: the module's parameter is an empty tensor on
the ``meta`` device, and an accelerate hook copies the real one in from a weights map (CPU tensors, or files in
an offload folder) for each forward and drops it afterwards. Reading ``module.weight`` there gives no numbers,
and writing it is undone by the next forward. The helpers below read and write a module's tensors where they
really live, and find the device a model's inputs go to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn


def _align_hooks(module: nn.Module) -> Iterator[Any]:
    """accelerate's ``AlignDevicesHook`` objects on ``module`` (a ``SequentialHook`` may hold several)."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if hasattr(part, "execution_device"):
            yield part


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, or None when no accelerate hook places it."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            device = hook.execution_device
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def input_device(model: nn.Module) -> torch.device:
    """The device a model's input ids go to: where its input embedding runs.

    For a plain model that is the device of its parameters; for a dispatched or offloaded one, the execution
    device of the embedding's accelerate hook (its parameters may sit on ``meta``).
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in (embedding, model):
        if module is None:
            continue
        device = execution_device(module)
        if device is not None:
            return device
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return next(model.parameters()).device


def _offloaded_entry(owner: nn.Module, path: str) -> tuple[Mapping, str] | None:
    """The weights map of the accelerate hook that holds tensor ``path`` of ``owner``, and its key there."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = owner.get_submodule(".".join(parts[:cut])) if cut else owner
        for hook in _align_hooks(module):
            weights = getattr(hook, "weights_map", None)
            key = ".".join(parts[cut:])
            if getattr(hook, "offload", False) and weights is not None and key in weights:
                return weights, key
    return None


def read_tensor(owner: nn.Module, path: str) -> torch.Tensor:
    """Tensor ``path`` (e.g. ``"weight"``, ``"model.layers.3.mlp.down_proj.weight"``) of ``owner``, with its
    numbers: from the offload weights map when accelerate keeps it there, else the module's own."""
    module_path, _, name = path.rpartition(".")
    tensor = getattr(owner.get_submodule(module_path), name)
    if tensor.device.type != "meta":
        return tensor.data
    entry = _offloaded_entry(owner, path)
    if entry is None:
        raise ValueError(f"{path} is on the meta device and no accelerate offload hook holds its value")
    weights, key = entry
    return weights[key]


def write_tensor(owner: nn.Module, path: str, value: torch.Tensor) -> None:
    """Make ``value`` tensor ``path`` of ``owner``: in the offload weights map when accelerate keeps it there
    (the next forward loads it from there), else as the module's own data."""
    module_path, _, name = path.rpartition(".")
    module = owner.get_submodule(module_path)
    current = getattr(module, name)
    entry = _offloaded_entry(owner, path) if current.device.type == "meta" else None
    if entry is None:
        current.data = value
        return
    weights, key = entry
    while hasattr(weights, "dataset") and hasattr(weights, "prefix"):  # accelerate's PrefixedDataset
        weights, key = weights.dataset, weights.prefix + key
    # OffloadedWeightsLoader reads its in-memory state dict before its files on disk.
    store = getattr(weights, "state_dict", weights)
    if not isinstance(store, MutableMapping):
        raise TypeError(f"cannot write {path}: accelerate keeps it in a read-only {type(weights).__name__}")
    store[key] = value.to("cpu") if value.device.type != "cpu" else value


def is_offloaded(owner: nn.Module, path: str) -> bool:
    """Whether accelerate keeps tensor ``path`` of ``owner`` in an offload weights map (CPU or disk)."""
    module_path, _, name = path.rpartition(".")
    return getattr(owner.get_submodule(module_path), name).device.type == "meta" \
        and _offloaded_entry(owner, path) is not None
