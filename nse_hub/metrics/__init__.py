"""The project's `evaluate` metrics, shipped as local metric scripts so that they load offline.

``evaluate.load(EDIT_METRICS_PATH)`` loads ``edit_metrics/edit_metrics.py`` from this package: a local directory is
resolved to ``<dir>/<dirname>.py`` and never looked up on the Hub. This module stays light: it does not import
``evaluate`` (which pulls in torch and transformers) until a metric is actually loaded.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

EDIT_METRICS_PATH: str = str(Path(__file__).resolve().parent / "edit_metrics")
"""Absolute path of the ``edit_metrics`` metric directory (efficacy, generalization, specificity, fluency, ...)."""


def load_edit_metrics(**kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load(EDIT_METRICS_PATH, **kwargs)``: the model-editing metrics, loaded from this package.

    ``kwargs`` go to ``evaluate.load`` (``keep_in_memory=True`` avoids the Arrow cache files, for example).
    """
    import evaluate

    return evaluate.load(EDIT_METRICS_PATH, **kwargs)


@cache
def _shared_edit_metrics() -> evaluate.EvaluationModule:
    return load_edit_metrics(keep_in_memory=True)


def compute_edit_metrics(**inputs: Any) -> dict[str, float]:
    """The edit metrics of per-record ``inputs`` (the module's argument names), through one loaded module.

    Every figure nse-hub reports — round tables, model cards, evaluations — is computed here, so the
    formulas live in the metric module alone.
    """
    return _shared_edit_metrics().compute(**inputs) or {}


__all__ = ["EDIT_METRICS_PATH", "compute_edit_metrics", "load_edit_metrics"]
