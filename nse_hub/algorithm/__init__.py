"""The NSE/MEMIT/AlphaEdit engine: context templates, value targets, keys, neuron selection, solves, rounds."""

from nse_hub.algorithm.context import generate_context_templates
from nse_hub.algorithm.rounds import EngineState, RoundInputs, RoundOutcome, round_values, run_round
from nse_hub.algorithm.update import (
    SingularSystemError,
    alphaedit_update,
    neuron_update,
    null_space,
    select_neurons,
    solve_spd,
)
from nse_hub.algorithm.values import ValueResult, optimize_values, optimize_values_reference

__all__ = [
    "EngineState",
    "RoundInputs",
    "RoundOutcome",
    "SingularSystemError",
    "ValueResult",
    "alphaedit_update",
    "generate_context_templates",
    "neuron_update",
    "null_space",
    "optimize_values",
    "optimize_values_reference",
    "round_values",
    "run_round",
    "select_neurons",
    "solve_spd",
]
