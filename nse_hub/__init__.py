"""nse-hub: edit facts inside Hugging Face language models with NSE and ship the edits as PEFT adapters.

The public names below load on first use, so that light submodules (``nse_hub.metrics``) can be
imported without torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nse_hub import errors as _errors
from nse_hub._version import __version__

_EXPORTS = {
    "EditConfig": "nse_hub.config",
    "EditRequest": "nse_hub.requests",
    "EditSession": "nse_hub.session",
    "Probe": "nse_hub.requests",
    "RoundReport": "nse_hub.report",
    "evaluate_session": "nse_hub.evaluation",
    "load_requests": "nse_hub.requests",
    "run_sequential": "nse_hub.sequential",
    **{name: "nse_hub.errors" for name in _errors.__all__},
}

if TYPE_CHECKING:
    from nse_hub.config import EditConfig
    from nse_hub.errors import *  # noqa: F403
    from nse_hub.evaluation import evaluate_session
    from nse_hub.report import RoundReport
    from nse_hub.requests import EditRequest, Probe, load_requests
    from nse_hub.sequential import run_sequential
    from nse_hub.session import EditSession


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nse_hub' has no attribute {name!r}")


__all__ = ["EditConfig", "EditRequest", "EditSession", "Probe", "RoundReport", "__version__", "evaluate_session",
           "load_requests", "run_sequential", *_errors.__all__]
