"""The NSE/MEMIT algorithm: context templates, value targets, keys, neuron selection, solves, rounds."""

from nse_hub.algorithm.context import generate_context_templates
from nse_hub.algorithm.rounds import RoundInputs, RoundOutcome, run_round
from nse_hub.algorithm.update import neuron_update, select_neurons, solve_spd
from nse_hub.algorithm.values import ValueResult, optimize_values, optimize_values_reference

__all__ = [
    "RoundInputs",
    "RoundOutcome",
    "ValueResult",
    "generate_context_templates",
    "neuron_update",
    "optimize_values",
    "optimize_values_reference",
    "run_round",
    "select_neurons",
    "solve_spd",
]
