"""Forward hooks that read, replace, skip and stop parts of a model's forward pass.

The algorithm never re-implements a transformer: it runs the model's own ``forward`` and uses
these hooks to read a module's input or output, add a vector to a layer's output, start the
forward at a given decoder layer from cached hidden states, or stop it once the layer of
interest has run. Each hook lives for one ``with`` block (torch's hook handles remove
themselves on exit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from nse_hub.offload import input_device


def model_device(model: nn.Module) -> torch.device:
    """The device a model's inputs go to: its parameters', or its input embedding's execution device when
    accelerate dispatches or offloads it (see :mod:`nse_hub.offload`)."""
    return input_device(model)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG seeded to ``seed``, and give the caller's RNG state back afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; caught by :func:`run_forward`."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple whose first item they are)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def read_input(module: nn.Module, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn`` with the first positional input of ``module`` on every forward."""
    with module.register_forward_pre_hook(lambda _m, args: fn(args[0])):
        yield


@contextmanager
def read_output(module: nn.Module, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn`` with the hidden states ``module`` returns on every forward."""
    with module.register_forward_hook(lambda _m, _args, out: fn(hidden_of(out))):
        yield


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the hidden states ``module`` returns by ``fn(hidden)``."""

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        return _with_hidden(out, fn(hidden_of(out)))

    with module.register_forward_hook(hook):
        yield


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End the forward pass as soon as ``module`` has run (hooks registered earlier still fire)."""

    def hook(*_: Any) -> None:
        raise StopForward

    with module.register_forward_hook(hook):
        yield


@contextmanager
def start_at(layers: Sequence[nn.Module], index: int, hidden: torch.Tensor,
             layer_returns_tuple: bool) -> Iterator[None]:
    """Run the forward from decoder layer ``index`` on, feeding it ``hidden`` as its input.

    Layers before ``index`` are bypassed (they return their input without computing anything),
    which is exact because their output is replaced anyway. Embeddings, masks and position
    encodings are still computed by the model's own forward, so every architecture keeps its
    own conventions for them.
    """

    def bypass(hidden_states: torch.Tensor, *_: Any, **__: Any) -> Any:
        return (hidden_states, None) if layer_returns_tuple else hidden_states

    def feed(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with ExitStack() as stack:
        for layer in layers[:index]:
            stack.callback(_restore_forward, layer, layer.__dict__.get("forward"))
            layer.forward = bypass  # instance attribute shadows the class method (and accelerate's hooked forward)
        handle = layers[index].register_forward_pre_hook(feed, with_kwargs=True)
        stack.callback(handle.remove)
        yield


def _restore_forward(layer: nn.Module, previous: Any) -> None:
    """Undo ``layer.forward = bypass``: back to accelerate's hooked forward where it had one, else the class's."""
    if previous is None:
        del layer.forward
    else:
        layer.forward = previous


def run_forward(module: nn.Module, **inputs: Any) -> Any:
    """Call ``module(**inputs)``; return its output, or ``None`` when a hook stopped it early."""
    try:
        return module(**inputs)
    except StopForward:
        return None
