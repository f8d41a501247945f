"""A memory plan read before an edit starts: the peak of every phase of a round, from the model's config alone.

Example::

    from nse_hub.plan import memory_plan

    plan = memory_plan("meta-llama/Meta-Llama-3-8B", method="alphaedit", dtype="bfloat16", device="cuda",
                       device_memory="24GB", batch_size=100)
    plan.fits, plan.peak_bytes, plan.suggestions
    print(plan.to_dict())

No weights are read: the config builds the model on the ``meta`` device, which gives the exact parameter
count and, through :class:`~nse_hub.architectures.ModelLayout`, the edited projections' shapes. Each phase's
formula is one small function of those shapes and the edit settings (:class:`PlanShape`); they describe what
today's engine allocates (``nse_hub.algorithm``, ``nse_hub.stats``, ``nse_hub.deltas``), so that when the
engine changes, only the function of the phase it changed has to follow. Every phase reports the peak of the
whole process (CPU: resident memory including the Python process itself) or of the device (CUDA: what
``torch.cuda.max_memory_allocated`` counts) while it runs, so the plan's peak is the largest of them.

The plan describes a round of a session at its steady state: the key memory and the second moments are in
memory (and AlphaEdit's null spaces once the first round has made them). It leaves out what grows with the
session rather than the round: the keys of earlier rounds, kept on the host for rollback and resume (4·d_ff bytes
per edit and layer: 31 MB per 1000 edits on SmolLM2's five edit layers, 287 MB on Llama-3-8B's), which count
against the CPU's memory, not an accelerator's. Coefficients marked "measured" were
measured on the CPU with torch 2.13 (benchmarks/memory_plan.py checks the whole plan against measurement).

Two engines are planned, as ``EditConfig.lean`` selects. The lean engine (default) keeps C, the key memory and
the null-space bases on the host (float32 d_ff² at most) and brings one layer's to the device per solve; on
CUDA they do not count against the device. Its statistics pass and value step are sized to the device memory
(:class:`EngineSettings`, chosen by :func:`choose_settings`, which ``EditSession.from_pretrained`` applies).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nse_hub.algorithm.values import CHUNK_BYTES, sequence_bytes_for
from nse_hub.architectures import ModelLayout, attention_kv_width
from nse_hub.config import USES_NULL_SPACE, EditConfig, make_config
from nse_hub.corpus import SAMPLING_BATCH
from nse_hub.deltas import PROMOTE_ROWS
from nse_hub.errors import ConfigError, MissingFileError
from nse_hub.loading import as_dtype, default_dtype

__all__ = ["EngineSettings", "MemoryPlan", "PhaseMemory", "PlanShape", "Suggestion", "choose_settings", "memory_plan",
           "parse_bytes", "session_plan"]

GIB = 2**30
# Resident memory of a Python process that has imported torch, transformers and nse-hub, before any model
# (measured: 480–493 MiB with torch 2.13 CPU, transformers 5.23; benchmarks/memory_plan.py measures it again).
PROCESS_BYTES = 490 * 2**20
# What a CUDA device needs beyond the tensors max_memory_allocated counts: the CUDA context and the caching
# allocator's slack. Not measured here (no GPU was available); a conservative round figure.
CUDA_RESERVE_BYTES = GIB

# Token geometry of a round's sequences, measured on the first 100 CounterFact records with SmolLM2's
# tokenizer and its context templates (value rows: 4.2 tokens from the subject's last token on, prefixes
# up to 23 tokens, 1.2 positions read per row; key rows up to 26 tokens).
VALUE_SUFFIX_TOKENS = 4.2
VALUE_PREFIX_TOKENS = 24
VALUE_READ_PER_ROW = 1.2
KEY_TOKENS = 26

# Measured transients, in float64 d_ff × d_ff matrices (8·d_ff² bytes), at d_ff 2,048 and 3,072 on the CPU:
# NSE/MEMIT's solve holds λC + KKᵀ (+ P), its Cholesky factor and cholesky_solve's copy of it: 3.4;
# AlphaEdit's null space holds C in float64, its symmetrised copy, the eigenvectors and LAPACK's workspace: 5.2;
# AlphaEdit's solve holds K Kᵀ + P, its projection, and the LU copy: 2 plus the basis' share of d_ff.
NSE_SOLVE_MATRICES = 3.4
NULL_SPACE_MATRICES = 5.2
ALPHAEDIT_SOLVE_MATRICES = 2.0
# The lean engine (nse_hub.algorithm.update), in the same unit: NSE's solve holds the system and its Cholesky
# factor (the system is freed once factorised; the triangular solves copy nothing): 2. The null space holds the
# symmetrised C and what eigh allocates (the eigenvectors and LAPACK's workspace, measured: 3): 4. AlphaEdit's
# solve holds the projected system and its LU copy: 2 (while it is built: the system, Uᵀ(KKᵀ + P) and, on an
# accelerator, the basis' copy).
LEAN_NSE_SOLVE_MATRICES = 2.0
LEAN_NULL_SPACE_MATRICES = 4.0
LEAN_ALPHAEDIT_SOLVE_MATRICES = 2.0
# The lean value step's chunk takes this share of what the device has left beyond the steady state (the rest
# absorbs the estimate's error; sequence_bytes_for is within 5 % on SmolLM2).
CHUNK_SHARE = 0.9


@dataclass(frozen=True)
class EngineSettings:
    """How the lean engine sizes its passes to the device (not saved: a resumed session chooses again).

    Attributes:
        stats_layers_per_pass: edit layers measured per statistics pass (``None``: all in one pass); fewer
            layers per pass hold fewer float64 sums, at the cost of more passes over the corpus.
        value_chunk_bytes: the memory one chunk of the value optimisation may use (``None``: the device's
            :data:`~nse_hub.algorithm.values.CHUNK_BYTES`).
        null_space_on_host: AlphaEdit and NSE-null: compute the null space's eigendecomposition on the host, when
            it does not fit the accelerator (slower: a float64 ``eigh`` on the CPU, of ``d_ff × d_ff`` once per
            layer and session for AlphaEdit, of the selected neurons' block every round for NSE-null).
    """

    stats_layers_per_pass: int | None = None
    value_chunk_bytes: int | None = None
    null_space_on_host: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanShape:
    """Everything a phase's formula reads: the model's shapes and the edit settings.

    Attributes:
        layout: the model's structure (built on the ``meta`` device: no weights).
        num_parameters: the model's parameters (tied weights counted once).
        largest_tensor: elements of its largest tensor (the fingerprint copies one tensor at a time).
        vocab_size: rows of the output head.
        kv_width: key/value cache width per layer and token.
        dtype: the weights' precision.
        config: the edit settings (:func:`nse_hub.config.make_config`).
        edits: edits per round.
        device: ``"cpu"`` or ``"cuda"``.
        settings: the lean engine's sizes (``None``: chosen for the device memory by the plan).
    """

    layout: ModelLayout
    num_parameters: int
    largest_tensor: int
    vocab_size: int
    kv_width: int
    dtype: torch.dtype
    config: EditConfig
    edits: int
    device: str
    settings: EngineSettings | None = None

    @property
    def lean(self) -> bool:
        return self.config.lean

    @property
    def on_device(self) -> bool:
        """Whether the matrices the lean engine keeps on the host count against the planned memory."""
        return not self.lean or self.device == "cpu"

    @property
    def stats_group(self) -> int:
        """Edit layers per statistics pass."""
        group = self.settings.stats_layers_per_pass if self.settings else None
        return min(group or self.layers, self.layers)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def d_ff(self) -> int:
        return self.layout.intermediate_size

    @property
    def d_model(self) -> int:
        return self.layout.hidden_size

    @property
    def layers(self) -> int:
        return len(self.config.layers)

    @property
    def square64(self) -> int:
        """Bytes of one float64 ``d_ff × d_ff`` matrix."""
        return 8 * self.d_ff**2

    @property
    def null_space_dims(self) -> int:
        """Expected directions of AlphaEdit's null space: about half at threshold 1, three quarters at 2
        (measured on SmolLM2; nse_hub.config), all at 3 and above."""
        share = min(1.0, max(0.25, 0.25 + 0.25 * self.config.nullspace_threshold))
        return math.ceil(share * self.d_ff)


@dataclass(frozen=True)
class PhaseMemory:
    """One phase of a round: the peak while it runs and what dominates it.

    Attributes:
        name: the phase.
        bytes: the process' (CPU) or device's (CUDA) peak during it.
        dominant: the largest term and its size, in words.
    """

    name: str
    bytes: int
    dominant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Suggestion:
    """A change of settings and the peak it gives.

    Attributes:
        setting: the change as the command line spells it (``--dtype bfloat16``, ``--set layers=[8]``).
        changes: the same as ``memory_plan`` keyword arguments.
        peak_bytes: the plan's peak with the change.
        fits: whether that fits the device memory.
    """

    setting: str
    changes: dict[str, Any]
    peak_bytes: int
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryPlan:
    """The predicted memory of one edit round, phase by phase (see the module docstring).

    Attributes:
        model: what was planned for.
        method, dtype, device, batch_size, layers: the settings planned (``batch_size``: edits per round).
        num_parameters: the model's parameters.
        d_model, d_ff: the edited projections' shape.
        phases: per phase, its peak and what dominates it.
        peak_bytes: the largest phase peak (process overhead included on the CPU).
        peak_phase: the phase that reaches it.
        device_memory: the memory available (bytes), if known.
        reserve_bytes: memory kept free beyond the peak (CUDA context and allocator slack).
        fits: whether ``peak_bytes + reserve_bytes <= device_memory`` (None when the memory is unknown).
        suggestions: settings that make it fit (or, when none does, those that come closest).
        settings: the lean engine's sizes the plan assumes (what ``EditSession.from_pretrained`` chooses).
    """

    model: str
    method: str
    dtype: str
    device: str
    batch_size: int
    layers: list[int]
    num_parameters: int
    d_model: int
    d_ff: int
    phases: list[PhaseMemory]
    device_memory: int | None
    reserve_bytes: int
    suggestions: list[Suggestion] = field(default_factory=list)
    settings: EngineSettings = field(default_factory=EngineSettings)
    lean: bool = True

    @property
    def peak_bytes(self) -> int:
        return max(p.bytes for p in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p.bytes).name

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return self.peak_bytes + self.reserve_bytes <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able values (bytes as integers)."""
        return {"model": self.model, "method": self.method, "dtype": self.dtype, "device": self.device,
                "batch_size": self.batch_size, "layers": self.layers, "num_parameters": self.num_parameters,
                "d_model": self.d_model, "d_ff": self.d_ff, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak_phase, "device_memory": self.device_memory,
                "reserve_bytes": self.reserve_bytes, "fits": self.fits, "lean": self.lean,
                "settings": self.settings.to_dict(),
                "phases": [p.to_dict() for p in self.phases],
                "suggestions": [s.to_dict() for s in self.suggestions]}

    def table(self) -> Any:
        """The plan as a ``rich`` table (phases, peak, verdict, suggestions in the caption)."""
        from rich.table import Table

        memory = f"{gib(self.device_memory)} GiB" if self.device_memory else "unknown memory"
        table = Table(title=f"{self.model}: {self.method}, {self.dtype} on {self.device} ({memory}), "
                            f"{self.batch_size} edits per round, layers {self.layers}")
        table.add_column("phase")
        table.add_column("peak GiB", justify="right")
        table.add_column("dominated by")
        for phase in self.phases:
            style = "bold" if phase.name == self.peak_phase else None
            table.add_row(phase.name, gib(phase.bytes), phase.dominant, style=style)
        verdict = {True: "fits", False: "does not fit", None: "fit unknown (give --device-memory)"}[self.fits]
        lines = [f"peak {gib(self.peak_bytes)} GiB ({self.peak_phase}) + reserve {gib(self.reserve_bytes)} GiB: "
                 f"{verdict}", "engine: " + self.engine_line()]
        if self.fits is False:
            if any(s.fits for s in self.suggestions):
                lines.append("fits with: " + "; ".join(f"{s.setting} ({gib(s.peak_bytes)} GiB)"
                                                        for s in self.suggestions if s.fits))
            elif self.suggestions:
                lines.append("no setting alone makes it fit on today's engine; closest: " + "; ".join(
                    f"{s.setting} ({gib(s.peak_bytes)} GiB)" for s in self.suggestions))
        table.caption = "\n".join(lines)
        return table


    def engine_line(self) -> str:
        """The engine planned, in words."""
        if not self.lean:
            return "float64 path (lean=false): C, P and null spaces on the device"
        where = "on the host" if self.device == "cuda" else "in memory"
        group = self.settings.stats_layers_per_pass
        chunk = self.settings.value_chunk_bytes
        return (f"lean: d_ff² matrices in float32 {where}, one layer's in float64 per solve; statistics "
                f"{f'{group} layer(s) per pass' if group else 'all layers in one pass'}; value chunks of "
                f"{f'{gib(chunk)} GiB' if chunk else 'the default size'}"
                + ("; null space computed on the host (slower)" if self.settings.null_space_on_host else ""))


def gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


# --- the phases --------------------------------------------------------------------------------------------
# Each returns (peak bytes, what dominates); ``base`` is what stays resident through every phase from the start.


def _process(s: PlanShape) -> int:
    return PROCESS_BYTES if s.device == "cpu" else 0


def _weights_bytes(s: PlanShape) -> int:
    return s.num_parameters * s.element_size


def _base(s: PlanShape) -> int:
    """Process, weights, the copy of the edited projections' original weights, and the key memory."""
    originals = s.layers * s.d_model * s.d_ff * s.element_size
    return _process(s) + _weights_bytes(s) + originals + _key_memory(s)


def _key_memory(s: PlanShape) -> int:
    """The float64 P per layer (allocated for every method when the session starts); lean: at the steady state
    a float32 d_ff² per layer (its keys until there are d_ff of them, then P), on the host."""
    if not s.lean:
        return s.layers * s.square64
    return s.layers * s.square64 // 2 if s.on_device else 0


def _second_moments(s: PlanShape) -> int:
    """C, float32 d_ff² per edit layer, kept on the session's device (lean: on the host)."""
    return s.layers * s.square64 // 2 if s.on_device else 0


def _null_spaces(s: PlanShape, layers: int | None = None) -> int:
    """AlphaEdit's null-space bases (float64 d_ff × k per layer), kept between rounds (lean: on the host)."""
    if s.config.method not in USES_NULL_SPACE or not s.on_device:
        return 0
    return (s.layers if layers is None else layers) * 8 * s.d_ff * s.null_space_dims


def _steady(s: PlanShape) -> int:
    return _base(s) + _second_moments(s) + _null_spaces(s)


def phase_weights(s: PlanShape) -> tuple[int, str]:
    # Fingerprinting the model copies one tensor at a time to the host.
    fingerprint = s.largest_tensor * s.element_size if s.device == "cpu" else 0
    return (_base(s) + fingerprint,
            f"weights {gib(_weights_bytes(s))} GiB ({s.num_parameters / 1e9:.2f}B × {s.element_size} B), "
            f"key memory P {gib(_key_memory(s))} GiB")


def phase_statistics(s: PlanShape) -> tuple[int, str]:
    n2, layers = s.square64 // 8, s.stats_group
    # Lean, several passes: the earlier passes' results wait in float32 (on the host).
    held = 4 * n2 * (s.layers - layers) if s.on_device else 0
    tokens = s.config.batch_size * s.config.mom2_sample_length
    # Forward pass of a batch up to the last edit layer: the MLP's intermediates and the hook's copy of the keys.
    forward = tokens * (5 * s.d_ff + 8 * s.d_model) * s.element_size
    accumulate = 8 * n2 * layers + 4 * n2 * layers + forward  # float64 sums + one batch's float32 products
    sampling = 0
    if s.config.mom2_dataset == "model":  # text sampled between batches: the KV cache and float32 logits
        cache = SAMPLING_BATCH * s.config.mom2_sample_length * s.layout.num_layers * 2 * s.kv_width * s.element_size
        sampling = 8 * n2 * layers + cache + 2 * SAMPLING_BATCH * s.vocab_size * 4
    if s.device == "cpu":  # results gather on the host; then each is checked by a float64 Cholesky factorisation
        finish = 8 * n2 * layers + 4 * n2 * layers + 8 * n2
        check = 4 * n2 * layers + 16 * n2
    else:  # results go to the host one by one; each is checked on the device
        finish = 8 * n2 * layers + 12 * n2
        check = 20 * n2
    peak = max(accumulate, sampling, finish, check) + held
    return (_base(s) + peak,
            f"float64 sums {gib(8 * n2 * layers)} GiB + float32 batch products {gib(4 * n2 * layers)} GiB "
            f"({layers} layer{'s' if layers > 1 else ''} at once)")


def _value_rows(s: PlanShape) -> tuple[int, int, int]:
    """(sequences per request, sequences per chunk, bytes per sequence) of the value optimisation."""
    per_request = len(s.config.context_prefixes) + 2  # "{}", one per generated prefix, and the KL row
    one = sequence_bytes_for(s.layout, s.config.z_layer, s.kv_width, s.vocab_size, s.element_size,
                             suffix=VALUE_SUFFIX_TOKENS, prefix=VALUE_PREFIX_TOKENS, read=VALUE_READ_PER_ROW)
    budget = (s.settings.value_chunk_bytes if s.settings else None) or CHUNK_BYTES.get(s.device, CHUNK_BYTES["cuda"])
    limit = max(1, budget // max(1, one))
    requests = min(s.edits, max(1, limit // per_request))
    return per_request, requests * per_request, one


def phase_values(s: PlanShape) -> tuple[int, str]:
    per_request, rows, one = _value_rows(s)
    chunk = rows * one
    return (_steady(s) + chunk,
            f"{rows} sequences × {one / 2**20:.1f} MiB of activations per chunk "
            f"({rows // per_request} of {s.edits} requests)")


def phase_keys(s: PlanShape) -> tuple[int, str]:
    # UltraEdit reads its keys on the plain prompts (algorithm.rounds.PLAIN_PROMPTS), the others in every template.
    templates = 1 if s.config.method == "ultraedit" else len(s.config.context_prefixes) + 1
    rows = templates * s.edits
    first_inputs = rows * KEY_TOKENS * s.d_model * s.element_size  # the first edit layer's inputs, kept
    forward = s.config.batch_size * KEY_TOKENS * (5 * s.d_ff + 8 * s.d_model) * s.element_size
    keys = s.layers * s.d_ff * rows * 4
    return (_steady(s) + first_inputs + forward + keys,
            f"C {gib(_second_moments(s))} GiB and P {gib(_key_memory(s))} GiB held; first-layer inputs of {rows} "
            f"rows {gib(first_inputs)} GiB")


def phase_null_space(s: PlanShape) -> tuple[int, str]:
    if s.settings and s.settings.null_space_on_host and s.device != "cpu":
        return _steady(s), f"on the host: {gib(int(LEAN_NULL_SPACE_MATRICES * s.square64))} GiB there, nothing here"
    transient = int((LEAN_NULL_SPACE_MATRICES if s.lean else NULL_SPACE_MATRICES) * s.square64)
    return (_base(s) + _second_moments(s) + _null_spaces(s, s.layers - 1) + transient,
            f"eigendecomposition of C in float64: {gib(transient)} GiB for one layer")


def phase_solves(s: PlanShape) -> tuple[int, str]:
    if s.lean:
        transient, what = _lean_solve(s)
    elif s.config.method in USES_NULL_SPACE:
        transient = int(ALPHAEDIT_SOLVE_MATRICES * s.square64 + 8 * s.d_ff * s.null_space_dims)
        what = "projected system and its LU copy"
    else:
        transient = int(NSE_SOLVE_MATRICES * s.square64)
        what = "λC + P + KKᵀ, its Cholesky factor and a copy"
    # Applying the update: the dense ΔW in float32, the weight in float32, their sum, the cast.
    update = (12 + s.element_size) * s.d_model * s.d_ff
    return _steady(s) + transient + update, f"{what}: {gib(transient)} GiB (float64 d_ff², one layer at a time)"


def _lean_solve(s: PlanShape) -> tuple[int, str]:
    """The lean solve's transient on its device: one layer's float64 system and what it is built from."""
    block = 8 * s.d_ff * PROMOTE_ROWS  # a block of C's rows or of the stored keys, promoted to float64
    if s.config.method != "alphaedit":
        return int(LEAN_NSE_SOLVE_MATRICES * s.square64) + block, "λC + P + KKᵀ and its Cholesky factor"
    basis = 8 * s.d_ff * s.null_space_dims  # also the size of Uᵀ(KKᵀ + P)
    copy = basis if s.device != "cpu" else 0  # on an accelerator: the basis brought there for the solve
    building = copy + basis + max(2 * block, s.square64)
    return max(building, int(LEAN_ALPHAEDIT_SOLVE_MATRICES * s.square64)), "projected system and its LU copy"


def phase_key_memory(s: PlanShape) -> tuple[int, str]:
    if s.lean:  # on the host: P is re-summed in float64 in place (one float64 d_ff²), then stored in float32
        if not s.on_device:
            return _steady(s), "on the host: nothing here"
        return _steady(s) + s.square64, f"P {gib(_key_memory(s))} GiB + its float64 sum {gib(s.square64)} GiB"
    return _steady(s) + s.square64, f"P {gib(s.layers * s.square64)} GiB + one K Kᵀ {gib(s.square64)} GiB"


def phase_saving(s: PlanShape) -> tuple[int, str]:
    if s.device != "cpu":  # saving reads everything to the host
        return _steady(s), "nothing on the device beyond what it holds"
    decay_rank = s.config.leak_directions if s.config.leak_decay else 0
    rank = s.edits * (s.config.update_passes + s.config.retry_failed) + decay_rank
    written = 2 * s.layers * (rank * (s.d_model + s.d_ff) * 4 + s.d_ff * s.edits * 4)  # tensors + serialised
    return _steady(s) + written, f"adapter factors and keys {gib(written)} GiB (tensors and their bytes)"


PHASES: tuple[tuple[str, Callable[[PlanShape], tuple[int, str]]], ...] = (
    ("weights", phase_weights),
    ("statistics pass", phase_statistics),
    ("value step (per chunk)", phase_values),
    ("key reads", phase_keys),
    ("null space", phase_null_space),
    ("solves", phase_solves),
    ("key memory", phase_key_memory),
    ("saving", phase_saving),
)


def plan_phases(shape: PlanShape) -> list[PhaseMemory]:
    """Every phase of a round for ``shape`` (the null space only for AlphaEdit)."""
    return [PhaseMemory(name, *formula(shape)) for name, formula in PHASES
            if name != "null space" or shape.config.method in USES_NULL_SPACE]


# --- reading the model's config ----------------------------------------------------------------------------


def parse_bytes(value: str | int | float | None) -> int | None:
    """``"24GB"``, ``"24 GiB"``, ``"80G"``, ``"512MB"`` or a number of bytes → bytes.

    GB and GiB both mean 2³⁰ bytes, as GPU makers count ("24 GB" cards hold 24 GiB).

    Raises:
        ConfigError: the text is not a size.
    """
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", value)
    if not match:
        raise ConfigError(f"device memory {value!r} is not a size; write it like 24GB, 80GiB or 512MB")
    unit = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * unit)


def load_config(model: Any) -> tuple[Any, str, str | None]:
    """(transformers config, a name for it, embedded model name) for a Hub id, folder, embedded name or config."""
    from transformers import AutoConfig, PretrainedConfig

    from nse_hub.models import EMBEDDED_MODELS, is_embedded, model_dir

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "_name_or_path", "") or type(model).__name__, None
    name = str(model)
    embedded = name if is_embedded(name) else None
    source: str | Path = name
    if embedded:  # its converted folder when fetched, else the upstream config
        folder = model_dir(name)
        source = folder if (folder / "config.json").is_file() else EMBEDDED_MODELS[name].upstream_id
    elif Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise MissingFileError(f"{name} has no config.json; give a model folder, a Hub id or an embedded name")
    try:
        return AutoConfig.from_pretrained(source), name, embedded
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the config of {name!r} ({str(error).splitlines()[0]}); give a model "
                          "folder with config.json, a reachable Hub id or an embedded model name") from None


def build_shape(config: Any, method: str, dtype: torch.dtype, device: str, edits: int,
                embedded: str | None, hparams: Mapping[str, Any], edit_config: EditConfig | None = None) -> PlanShape:
    """The model on the ``meta`` device (no memory, no weights) and the edit settings for it (``edit_config``
    when given, else :func:`~nse_hub.config.make_config` with ``hparams``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layout = ModelLayout.detect(model, probe=False)
    edit_config = edit_config or make_config(layout, embedded, method, **hparams)
    head = model.get_output_embeddings().weight
    return PlanShape(layout=layout, num_parameters=model.num_parameters(),
                     largest_tensor=max(p.numel() for p in model.parameters()), vocab_size=head.shape[0],
                     kv_width=attention_kv_width(model.config, layout.hidden_size),
                     dtype=dtype, config=edit_config, edits=edits,
                     device=device)


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def plan_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A precision by name (``bf16``, ``bfloat16``, ``fp32`` …) or ``None`` for the default.

    Raises:
        ConfigError: not a floating-point precision.
    """
    if isinstance(dtype, str):
        dtype = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    try:
        wanted = as_dtype(dtype)
    except AttributeError:
        wanted = None
        dtype = f"{dtype} (unknown)"
    if dtype is not None and dtype != "auto" and not (isinstance(wanted, torch.dtype) and wanted.is_floating_point):
        raise ConfigError(f"dtype {dtype!r} is not a precision to load weights in; use bfloat16, float16 or float32")
    return wanted


def _available_memory(device: str) -> int | None:
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def memory_plan(model: Any, method: str = "nse", *, dtype: str | torch.dtype | None = None,
                device: str | None = None, device_memory: str | int | None = None, batch_size: int = 10,
                hparams: Mapping[str, Any] | None = None, suggest: bool = True, **more_hparams: Any) -> MemoryPlan:
    """The peak memory of every phase of an edit round, from the model's config alone.

    Args:
        model: a Hub id, a local folder with ``config.json``, an embedded model name, or a ``transformers``
            config object. No weights are read.
        method: the edit method (:data:`nse_hub.config.METHODS`).
        dtype: the weights' precision (default as ``EditSession.from_pretrained``: float32 on the CPU and up to
            2B parameters on CUDA, bfloat16 above).
        device: ``"cuda"`` or ``"cpu"`` (default: CUDA if available).
        device_memory: the memory to fit in, e.g. ``"24GB"`` (default: the machine's RAM on the CPU, the GPU's
            memory on CUDA when there is one).
        batch_size: edits per round (as ``nse-hub edit --batch-size``).
        hparams, **more_hparams: :class:`~nse_hub.config.EditConfig` fields (as ``--set``); EditConfig's own
            ``batch_size`` (sequences per forward pass) can only be given in ``hparams``.
        suggest: look for settings that make it fit when it does not.

    Raises:
        ConfigError: unknown settings, an unreadable config, or a device memory that is not a size.
    """
    config, name, embedded = load_config(model)
    settings = {**(hparams or {}), **more_hparams}
    device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not planned for; use cpu or cuda")
    if batch_size < 1:
        raise ConfigError(f"batch_size (edits per round) must be at least 1, got {batch_size}")
    memory = parse_bytes(device_memory) if device_memory is not None else _available_memory(device_type)
    wanted = plan_dtype(dtype)
    if wanted is None:
        shape = build_shape(config, method, torch.float32, device_type, batch_size, embedded, settings)
        wanted = default_dtype(torch.device(device_type), shape.num_parameters)
    shape = build_shape(config, method, wanted, device_type, batch_size, embedded, settings)
    plan = _plan(shape, name, memory)
    if suggest and plan.fits is False:
        plan.suggestions = _suggestions(config, shape, name, memory, embedded, settings)
    return plan


def choose_settings(shape: PlanShape, memory: int | None) -> EngineSettings:
    """The lean engine's sizes for ``memory``: the most layers per statistics pass that fit, and a value chunk
    of :data:`CHUNK_SHARE` of what the steady state leaves (never more than the device's default)."""
    if not shape.lean or memory is None:
        return EngineSettings()
    available = memory - (CUDA_RESERVE_BYTES if shape.device == "cuda" else 0)
    group = next((g for g in range(shape.layers, 0, -1)
                  if phase_statistics(replace(shape, settings=EngineSettings(g)))[0] <= available), 1)
    default = CHUNK_BYTES.get(shape.device, CHUNK_BYTES["cuda"])
    chunk = int(CHUNK_SHARE * (available - _steady(shape)))
    _, _, one = _value_rows(replace(shape, settings=EngineSettings()))
    on_host = (shape.config.method in USES_NULL_SPACE and shape.device != "cpu"
               and phase_null_space(replace(shape, settings=EngineSettings()))[0] > available)
    return EngineSettings(stats_layers_per_pass=group if group < shape.layers else None,
                          value_chunk_bytes=max(chunk, one) if chunk < default else None,
                          null_space_on_host=on_host)


def _plan(shape: PlanShape, name: str, memory: int | None) -> MemoryPlan:
    if shape.settings is None:
        shape = replace(shape, settings=choose_settings(shape, memory))
    return MemoryPlan(model=name, method=shape.config.method,
                      dtype=str(shape.dtype).removeprefix("torch."),
                      device=shape.device, batch_size=shape.edits, layers=list(shape.config.layers),
                      num_parameters=shape.num_parameters, d_model=shape.d_model, d_ff=shape.d_ff,
                      phases=plan_phases(shape), device_memory=memory,
                      reserve_bytes=CUDA_RESERVE_BYTES if shape.device == "cuda" else 0,
                      settings=shape.settings, lean=shape.lean)


def session_plan(model: Any, config: EditConfig, device: str | torch.device, device_memory: str | int | None = None,
                 edits: int = 10) -> MemoryPlan:
    """The plan of a session's round: its loaded model's config and dtype, its settings, ``edits`` per round.

    ``device_memory`` (default: the ``NSE_HUB_DEVICE_MEMORY`` environment variable, else the device's) is
    the memory to fit in. No suggestions are searched.
    """
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        device_type = "cuda"  # other accelerators: planned as a CUDA device
    given = device_memory if device_memory is not None else os.environ.get(DEVICE_MEMORY_ENV) or None
    memory = parse_bytes(given) if given is not None else _available_memory(device_type)
    dtype = next(model.parameters()).dtype
    shape = build_shape(model.config, config.method, dtype, device_type, edits, None, {}, edit_config=config)
    return _plan(shape, getattr(model, "name_or_path", "") or type(model).__name__, memory)


def session_suggestions(model: Any, config: EditConfig, plan: MemoryPlan) -> list[Suggestion]:
    """Settings that make a session's plan (:func:`session_plan`) fit, as :func:`memory_plan` suggests them."""
    device = plan.device
    dtype = next(model.parameters()).dtype
    hparams = {k: v for k, v in config.to_dict().items() if k not in ("method", "preset")}
    shape = build_shape(model.config, config.method, dtype, device, plan.batch_size, None, {}, edit_config=config)
    with warnings.catch_warnings():  # the session's own settings, checked when it was made
        warnings.simplefilter("ignore")
        return _suggestions(model.config, shape, plan.model, plan.device_memory, None, hparams)


#: The environment variable that sets the device memory sessions plan for (``24GB``), as ``device_memory=``.
DEVICE_MEMORY_ENV = "NSE_HUB_DEVICE_MEMORY"


def _suggestions(config: Any, shape: PlanShape, name: str, memory: int | None, embedded: str | None,
                 settings: Mapping[str, Any]) -> list[Suggestion]:
    """Single changes (then pairs) that make the plan fit; when none does, the three that come closest.

    A change is ``{"dtype": …}``, ``{"batch_size": …}`` (edits per round) or ``{"hparams": {…}}``.
    """
    z = shape.config.z_layer
    singles: list[tuple[str, dict[str, Any]]] = []
    if not shape.lean:
        singles.append(("--set lean=true", {"hparams": {"lean": True}}))
    if shape.element_size > 2:
        singles.append(("--dtype bfloat16", {"dtype": "bfloat16"}))
    for count in (3, 1):
        if shape.layers > count:
            layers = list(range(max(0, z - count + 1), z + 1))
            singles.append((f"--set layers={str(layers).replace(' ', '')}", {"hparams": {"layers": layers}}))
    if shape.edits > 10:
        singles.append(("--batch-size 10", {"batch_size": 10}))
    if shape.config.batch_size > 16:
        singles.append(("--set batch_size=16", {"hparams": {"batch_size": 16}}))

    def evaluate(label: str, changes: dict[str, Any]) -> Suggestion:
        hp = {**settings, **changes.get("hparams", {})}
        changed = replace(shape, config=make_config(shape.layout, embedded, shape.config.method, **hp),
                          edits=changes.get("batch_size", shape.edits),
                          dtype=plan_dtype(changes.get("dtype")) or shape.dtype, settings=None)
        peak = _plan(changed, name, memory).peak_bytes
        fits = memory is not None and peak + _plan(changed, name, memory).reserve_bytes <= memory
        return Suggestion(label, changes, peak, fits)

    found = [evaluate(label, changes) for label, changes in singles]
    if not any(s.fits for s in found):
        pairs = [(f"{a} {b}", _merge(ca, cb)) for i, (a, ca) in enumerate(singles) for b, cb in singles[i + 1:]
                 if "layers" not in a or "layers" not in b]
        found += [evaluate(label, changes) for label, changes in pairs]
    current = _plan(shape, name, memory).peak_bytes
    useful: dict[int, Suggestion] = {}  # per peak, the suggestion with the fewest changes
    for suggestion in sorted(found, key=lambda s: (s.peak_bytes, s.setting.count("--"))):
        if suggestion.peak_bytes < current:
            useful.setdefault(suggestion.peak_bytes, suggestion)
    fitting = [s for s in useful.values() if s.fits]
    if fitting:
        return sorted(fitting, key=lambda s: (s.setting.count("--"), s.peak_bytes))[:3]
    return list(useful.values())[:3]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {**a, **b}
    if "hparams" in a and "hparams" in b:
        merged["hparams"] = {**a["hparams"], **b["hparams"]}
    return merged
