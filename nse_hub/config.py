"""Hyperparameters of an edit session, presets measured on the embedded models, and automatic defaults.

Field names follow the NSE/MEMIT reference configurations (``v_lr``, ``mom2_update_weight``, …) so
that a reference ``hparams/*.json`` reads with :meth:`EditConfig.from_reference`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nse_hub.architectures import ModelLayout
from nse_hub.errors import ConfigError, MissingFileError
from nse_hub.io import atomic_write_json
from nse_hub.stats import default_stat_samples, warn_sample_size

CONFIG_FILE = "edit_config.json"
Method = Literal["nse", "memit", "memit_seq", "alphaedit", "ultraedit", "nse_null"]
#: The editing methods, in the order the CLI offers them. All share one engine (``nse_hub.algorithm.rounds``).
METHODS: tuple[str, ...] = ("nse", "memit", "memit_seq", "alphaedit", "ultraedit", "nse_null")
#: Methods with NSE's values on the original weights, neuron selection and residual-filtered passes.
NSE_FAMILY: tuple[str, ...] = ("nse", "nse_null")
#: Methods whose solve adds the key memory ``P`` of earlier rounds (classic MEMIT does not).
USES_KEY_MEMORY: tuple[str, ...] = ("nse", "memit_seq", "alphaedit", "nse_null")
#: Methods whose solve uses the corpus second moments ``C`` (UltraEdit needs no corpus).
USES_SECOND_MOMENTS: tuple[str, ...] = ("nse", "memit", "memit_seq", "alphaedit", "nse_null")
#: The settings of the value step and of its context templates (EditConfig.value_settings).
VALUE_SETTINGS: tuple[str, ...] = ("v_lr", "v_num_grad_steps", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                                   "v_early_stop_loss", "context_prefixes", "context_length", "seed")
#: Value settings added later: part of a value store's identity only when set off their default, so that the
#: targets stored before they existed stay valid.
LATER_VALUE_SETTINGS: tuple[str, ...] = ("v_stop_most_probable",)
#: How ``retry_failed`` judges an edit missed (see ``EditConfig.retry_criterion``).
RETRY_CRITERIA: tuple[str, ...] = ("wins", "greedy")
#: Methods whose solve is projected on the null space of ``C`` (AlphaEdit's whole one, NSE-null's on the neurons).
USES_NULL_SPACE: tuple[str, ...] = ("alphaedit", "nse_null")


def _setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (read by :meth:`EditConfig.help` and error messages), as PEFT does."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(**factory, metadata={"help": help}, **kwargs)


@dataclass
class EditConfig:
    """Everything that determines what an edit round writes.

    Every field carries its help text (``EditConfig.help()`` lists them all; ``dataclasses.fields`` gives each
    one's ``metadata["help"]``). A config saves and loads itself with :meth:`save_pretrained` and
    :meth:`from_pretrained`, and reads the reference implementations' ``hparams/*.json`` with
    :meth:`from_reference`.
    """

    method: Method = _setting(
        "nse", '"nse" (values on the original weights, neuron selection, iterative passes with the residual '
        'filter); "memit" (kmeng01/memit: values on the current weights, all neurons, one pass, '
        "ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ without earlier rounds' keys); \"memit_seq\" (the same plus the key memory of "
        'earlier rounds, as the NSE repository\'s sequential MEMIT); "alphaedit" (MEMIT\'s values and passes, the '
        "update projected onto the null space of C and solved with the key memory and an L2 term); \"ultraedit\" "
        "(UltraEdit, arXiv 2505.14679: no value optimisation, no corpus statistics; one closed-form ridge update "
        "from the projections' inputs and loss gradients at the target-predicting positions, normalised by "
        "running statistics kept across rounds); \"nse_null\" (nse-hub's: NSE's values on the original weights, "
        "neuron selection and residual-filtered passes, with AlphaEdit's null-space-projected solve on the "
        "selected neurons: nullspace_threshold and L2 apply).")
    layers: tuple[int, ...] = _setting(
        (), "The consecutive decoder layers whose MLP output projection is rewritten; the last one is the "
        "z-layer where value targets live.")
    v_lr: float = _setting(0.5, "Adam's learning rate for each value target's shift δ (z = h + δ).")
    v_num_grad_steps: int = _setting(25, "Adam steps of the value optimisation (fewer when the loss falls below "
                                         "v_early_stop_loss).")
    v_weight_decay: float = _setting(0.5, "Weight of ‖δ‖ / ‖h‖² in the value loss.")
    clamp_norm_factor: float = _setting(0.75, "‖δ‖ is clamped to this multiple of ‖h‖ after each step.")
    kl_factor: float = _setting(0.0625, "Weight of the KL term that keeps '{subject} is a' predictions as they "
                                        "were.")
    v_early_stop_loss: float = _setting(0.05, "A request's value optimisation stops once its loss is below this.")
    v_stop_most_probable: bool = _setting(
        False, "ENCORE's most-probable early stopping (arXiv 2502.01636): a request's value optimisation also "
        "stops once each of its target tokens is the most probable one at its position in every rewrite prompt "
        "(smaller shifts δ, fewer steps).")
    mom2_update_weight: float = _setting(1e4, "λ, the weight of the corpus second moment C in the solve: larger "
                                              "preserves more, edits less strongly.")
    neuron_threshold: float = _setting(1.0, "NSE: the share p of the summed key magnitude that the selected "
                                            "neurons cover (1: every neuron a key activates).")
    alpha: float = _setting(0.1, "NSE: requests whose residual norm is at most this (× ‖h‖ with relative "
                                 "thresholds) are left out of an update pass: already written.")
    upper_bound: float = _setting(3.0, "NSE: requests whose residual norm is at least this (× ‖h‖ with relative "
                                       "thresholds) are left out of an update pass: outliers.")
    thresholds: Literal["relative", "absolute"] = _setting(
        "relative", '"relative" reads alpha/upper_bound as multiples of each request\'s hidden-state norm ‖h‖ at '
        'the z-layer (scale-free); "absolute" as plain norms, as the reference configurations do.')
    max_iterations: int = _setting(3, "NSE: the reference's loop bound; its loop exits at the top of the last "
                                      "iteration, so at most max_iterations - 1 update passes run.")
    context_prefixes: tuple[str, ...] = _setting(
        ("The", "Therefore", "Because", "I", "You"), "The context templates are \"{}\" plus one generation "
        "from each of these prefixes, made by the unedited model.")
    context_length: int = _setting(10, "Tokens of each context template's generation.")
    mom2_dataset: str = _setting(
        "model", 'The corpus for C = E[k kᵀ]: "model" (text sampled from the model itself), local text files, a '
        "datasets folder (save_to_disk or data files), or a Hub dataset id.")
    mom2_n_samples: int = _setting(
        320, "Corpus samples for C. Without a preset, make_config sets it to at least 10·d_ff tokens "
        "(nse_hub.stats.default_stat_samples) and warns when the caller sets fewer.")
    mom2_sample_length: int = _setting(64, "Tokens per corpus sample.")
    seed: int = _setting(0, "Seeds the context templates and model-sampled corpora.")
    batch_size: int = _setting(64, "Sequences per forward pass outside the value optimisation.")
    nullspace_threshold: float = _setting(
        2.0, "AlphaEdit: the null space is spanned by the eigenvectors of C whose eigenvalue is below this "
        "multiple of C's median eigenvalue (1 keeps about half of the directions, 2 about three quarters on "
        "SmolLM2). Relative, so it carries over between models and layers; the reference's absolute cutoff 2e-2 "
        "does not (on SmolLM2 it keeps 75–87 % of the directions). On SmolLM2, 3 rounds of 10 CounterFact edits, "
        "final ES/PS/NS: 100/93/73 at 2, 97/90/63 at 1, 87/83/67 at 0.5 (unedited 33/33/67).")
    L2: float = _setting(10.0, "AlphaEdit: the weight of ‖ΔW‖² in its objective (reference: 10).")
    nullspace_mom2_weight: float = _setting(
        0.0, "AlphaEdit, NSE-null: μ, the weight of C inside the null space. The solve becomes "
        "(Π(KKᵀ + M + μC) + L2·I)⁻¹ΠKRᵀ: each kept direction costs L2 + μ·(its eigenvalue of C), so updates lean "
        "on the directions the corpus uses least. 0: AlphaEdit's solve (every kept direction costs L2). NSE-null on "
        "SmolLM2, 1000 CounterFact edits: μ 3e3 with L2 10 gave ES 94.3 at perplexity 1.48×, μ 1e4 87.9 at 1.21×, "
        "the same trade as raising L2 (benchmarks/README.md).")
    key_memory_weight: float = _setting(
        1.0, "NSE, sequential MEMIT, AlphaEdit, NSE-null: ω, the weight of the earlier rounds' keys P in the solve "
        "(NSE: λC + ωP + KKᵀ; AlphaEdit, NSE-null: Π(KKᵀ + ωP)). Above 1 earlier edits are guarded more and new "
        "ones get less room; 0 forgets them (sequential MEMIT becomes MEMIT). 1: the reference solves. NSE-null on "
        "SmolLM2, 2000 CounterFact edits: ω 3 (L2 50) gave ES 84.7 at perplexity 1.48× (ω 1: 85.0 at 1.56×); with ω 10 "
        "(L2 30) late rounds could not write their own edits and ES fell to 82.4 (benchmarks/README.md).")
    retry_failed: int = _setting(
        0, "Every method with value targets: after a round's update, up to this many more passes over the edit "
        "layers write again, toward their same targets, the requests whose new target does not yet beat the true "
        "one on their rewrite prompt (teacher-forced: the efficacy test); the round's other requests are guarded "
        "in those passes like earlier rounds' keys. 0: off. A strong L2 with retries spends the update on the "
        "edits that need it: AlphaEdit with NAS's anchor on SmolLM2, 1000 CounterFact edits in rounds of 100, L2 50 "
        "with 2 retries gave ES 95.8 at perplexity 1.37× (L2 30 without: ES 95.0 at 1.47×; benchmarks/README.md).")
    retry_criterion: Literal["wins", "greedy"] = _setting(
        "wins", "With retry_failed, which edits count as missed. 'wins': the new target does not beat the true one "
        "on the rewrite prompt (teacher-forced: the efficacy test). 'greedy': some token of the new target is not "
        "the model's most probable one after the rewrite prompt and the target's earlier tokens, so greedy decoding "
        "would not produce it (the generation test, without generating); it asks for a margin the teacher-forced "
        "win does not, and edits without a true target are judged too. AlphaEdit with NAS's anchor, L2 100 and 3 "
        "retries on SmolLM2, 1000 CounterFact edits: 'greedy' gave generation-based ES 66.3 at perplexity 1.49×, "
        "'wins' 45.3 at 1.24× (benchmarks/README.md).")
    leak_decay: float = _setting(
        0.0, "Every method with C (not UltraEdit): after each round, take this fraction of every edit layer's "
        "cumulative update off along its top leak directions, the output directions u maximising uᵀΔW C ΔWᵀu "
        "(where the update moves the corpus' outputs most): a rank-leak_directions part of the round's own "
        "adapter. The edits share a small common part of their value shifts that the rounds write coherently; "
        "held-out text reads it. 0: off. Taking a quarter off once, after 2000 AlphaEdit edits on SmolLM2 (NAS's "
        "anchor, L2 50, 2 retries), cut perplexity from 1.86× to 1.51× the unedited model's with ES 93.0 → 96.0 "
        "on a sample of 300 edits (benchmarks/README.md).")
    leak_directions: int = _setting(1, "With leak_decay: how many top leak directions per layer it shrinks.")
    norm_anchor: bool = _setting(
        False, "NAS norm anchoring (arXiv 2602.02543), any method: each value's MLP-output part is rescaled to "
        "the anchor norm, the mean ‖v*‖ of the session's first round (computed on the original weights).")
    norm_anchor_max_ratio: float = _setting(2.0, "With norm_anchor: requests whose ‖v*‖ exceeds this multiple of "
                                                 "the anchor are skipped (not written) and reported.")
    ultraedit_lr: float = _setting(
        1e-6, "UltraEdit: η, the step of the pseudo-values v = −η ‖k̂‖² ĝ (k̂, ĝ: the key and the output gradient "
        "normalised by the lifelong running statistics). Larger writes more strongly (reference: 1e-6).")
    ultraedit_ridge: float = _setting(
        1.0, "UltraEdit: λ of the ridge solve ΔWᵀ = (KᵀK + λI)⁻¹KᵀV on the raw keys (reference: 1). Larger keeps "
        "the update smaller where the keys are weak.")
    lean: bool = _setting(
        True, "The lean engine (nse_hub.algorithm.lean): the d_ff × d_ff matrices (C, the key memory once it holds "
        "d_ff keys or more) are stored in float32 on the host and promoted to float64 on the session's device one "
        "layer at a time for each solve; the key memory is kept as its keys while they are fewer than d_ff; "
        "AlphaEdit's null-space bases stay on the host. Same updates as false within float64 rounding (float32 "
        "rounding of the key memory after the switch). false: every layer's C and float64 key memory stay on the "
        "device (needs 1.5·d_ff² bytes more per edit layer there).", compare=False)
    ultraedit_whitening: Literal["diagonal", "full"] = _setting(
        "diagonal", 'UltraEdit: how the output gradients are normalised. "diagonal" (UltraEdit): per coordinate by the '
        'running standard deviation; "full" (StableEdit, arXiv 2605.11836): whitened by the running covariance '
        "Σ^{-1/2} once more than d_model + 1 features were seen (per coordinate before). The keys are normalised "
        "per coordinate either way. Full whitening keeps a d_model × d_model co-moment per layer and round.")
    ultraedit_norm_cap: float = _setting(
        0.0, "UltraEdit: StableEdit's bounded norms: each round's ΔW of a layer is scaled down to at most this "
        "multiple of the original weight's Frobenius norm (0: no bound).")
    preset: str | None = _setting(None, "The measured preset these settings started from (informational).",
                                  compare=False)

    @classmethod
    def help(cls, name: str | None = None) -> str:
        """The help text of one field, or of every field (one per line) when ``name`` is ``None``."""
        fields = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
        if name is not None:
            check_names({name: None})
            return fields[name]
        return "\n".join(f"{key}: {text}" for key, text in fields.items())

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``edit_config.json`` into ``save_directory`` (atomically); returns its path."""
        path = Path(save_directory) / CONFIG_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_pretrained(cls, directory_or_file: str | Path, **overrides: Any) -> EditConfig:
        """Read a config written by :meth:`save_pretrained` (a folder or the JSON file), with ``overrides``."""
        path = Path(directory_or_file)
        path = path / CONFIG_FILE if path.is_dir() else path
        if not path.is_file():
            raise MissingFileError(f"no edit configuration at {path}: write one with EditConfig.save_pretrained")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error})") from error
        return cls.from_dict({**data, **overrides})

    def __post_init__(self) -> None:
        # JSON and --set give lists and whole floats (1e4); keep what cannot be read for problems() to name.
        if _is_sequence(self.layers):
            self.layers = tuple(int(x) if _is_whole(x) else x for x in self.layers)
        if _is_sequence(self.context_prefixes):
            self.context_prefixes = tuple(self.context_prefixes)
        for name in _INT_FIELDS:
            if _is_whole(getattr(self, name)):
                setattr(self, name, int(getattr(self, name)))
        problems = self.problems()
        if problems:
            raise ConfigError("invalid edit configuration: " + "; ".join(problems))

    def problems(self, num_layers: int | None = None) -> list[str]:
        """Everything wrong with these settings (empty when they are usable)."""
        out = self._type_problems()
        if out:  # the range checks below compare numbers
            return out
        if num_layers is not None and not self.layers:
            out.append("layers is empty: name the consecutive decoder layers to edit, e.g. layers=[3, 4, 5] "
                       "(or leave layers unset for the preset or automatic choice)")
        if self.method not in METHODS:
            out.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.layers and list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            out.append(f"layers must be consecutive and increasing, got {list(self.layers)}")
        if self.layers and min(self.layers) < 0:
            out.append("layers must be non-negative")
        if num_layers is not None and self.layers and max(self.layers) >= num_layers:
            out.append(f"layer {max(self.layers)} does not exist: "
                       f"the model has {num_layers} layers (0–{num_layers - 1})")
        if not 0 < self.neuron_threshold <= 1:
            out.append(f"neuron_threshold must be in (0, 1], got {self.neuron_threshold}")
        if self.thresholds not in ("relative", "absolute"):
            out.append("thresholds must be 'relative' or 'absolute'")
        if not 0 <= self.alpha < self.upper_bound:
            out.append(f"need 0 <= alpha < upper_bound, got {self.alpha} and {self.upper_bound}")
        if self.retry_failed < 0:
            out.append(f"retry_failed must be zero or positive (extra passes per round), got {self.retry_failed}")
        elif self.retry_failed and not self.computes_values:
            out.append("retry_failed needs value targets to write again; UltraEdit has none: leave it at 0")
        if not 0 <= self.leak_decay < 1:
            out.append(f"leak_decay must be in [0, 1) (the fraction taken off per round), got {self.leak_decay}")
        elif self.leak_decay and not self.uses_second_moments:
            out.append("leak_decay finds its directions with the corpus statistics C; UltraEdit has none: "
                       "leave it at 0")
        if self.leak_directions < 1:
            out.append(f"leak_directions must be at least 1, got {self.leak_directions}")
        if self.retry_criterion not in RETRY_CRITERIA:
            out.append(f"retry_criterion must be one of {RETRY_CRITERIA}, got {self.retry_criterion!r}")
        for name in ("v_num_grad_steps", "max_iterations", "mom2_n_samples", "mom2_sample_length", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}{_default_hint(name)}")
        for name in ("v_lr", "mom2_update_weight", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive, got {getattr(self, name)}{_default_hint(name)}")
        for name in ("v_weight_decay", "kl_factor", "v_early_stop_loss", "nullspace_mom2_weight",
                     "key_memory_weight"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be zero or positive, got {getattr(self, name)}{_default_hint(name)}")
        if self.context_length < 1:
            out.append(f"context_length must be at least 1, got {self.context_length}{_default_hint('context_length')}")
        if self.nullspace_threshold <= 0:
            out.append(f"nullspace_threshold must be positive (a multiple of C's median eigenvalue), "
                       f"got {self.nullspace_threshold}")
        if self.L2 <= 0:
            out.append(f"L2 must be positive (without it AlphaEdit's system is singular), got {self.L2}")
        for name in ("ultraedit_lr", "ultraedit_ridge"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                out.append(f"{name} must be a positive finite number, got {value!r}")
        if self.ultraedit_whitening not in ("diagonal", "full"):
            out.append(f"ultraedit_whitening must be 'diagonal' or 'full', got {self.ultraedit_whitening!r}")
        if self.ultraedit_norm_cap < 0:
            out.append(f"ultraedit_norm_cap must be zero (no bound) or positive, got {self.ultraedit_norm_cap}")
        if self.norm_anchor_max_ratio <= 1:
            out.append(f"norm_anchor_max_ratio must be above 1, got {self.norm_anchor_max_ratio}")
        return out

    def _type_problems(self) -> list[str]:
        """Settings of the wrong type, or numbers that are NaN or infinite (they would edit nothing, silently)."""
        out = []
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                out.append(f"{name} must be a finite number, got {value!r}{_default_hint(name)}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not _is_whole(value):
                out.append(f"{name} must be a whole number, got {value!r}{_default_hint(name)}")
        if not _is_sequence(self.layers) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                    for x in self.layers):
            out.append(f"layers must be a list of decoder layer indices such as [3, 4, 5], got {self.layers!r}")
        if not _is_sequence(self.context_prefixes) or not all(isinstance(x, str) for x in self.context_prefixes):
            out.append(f"context_prefixes must be a list of strings, got {self.context_prefixes!r}"
                       f"{_default_hint('context_prefixes')}")
        for name in ("method", "thresholds", "mom2_dataset", "ultraedit_whitening", "retry_criterion"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                out.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}{_default_hint(name)}")
        if self.preset is not None and not isinstance(self.preset, str):
            out.append(f"preset must be a string or null, got {self.preset!r}")
        for name in ("norm_anchor", "lean", "v_stop_most_probable"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        return out

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def value_settings(self) -> dict[str, Any]:
        """What determines a round's value targets besides the model and the requests (and, outside the NSE
        family, the earlier rounds)."""
        later = {name: getattr(self, name) for name in LATER_VALUE_SETTINGS if getattr(self, name) != _default(name)}
        return {**{name: getattr(self, name) for name in VALUE_SETTINGS}, **later, "z_layer": self.z_layer,
                "original_weights": self.nse_family}

    def changed_settings(self) -> dict[str, Any]:
        """The settings that differ from their defaults and bear on what an edit writes (not ``batch_size``,
        ``lean`` or ``preset``, which change how it is computed or named): with the model and the edits, what a
        round's result follows from. A setting added later with a default leaves it unchanged."""
        return {name: value for name, value in self.to_dict().items()
                if name not in BOOKKEEPING_SETTINGS and value != _plain(_default(name))}

    @property
    def update_passes(self) -> int:
        """How many update passes a round may run (only NSE runs more than one)."""
        return max(1, self.max_iterations - 1) if self.nse_family else 1

    @property
    def nse_family(self) -> bool:
        """Whether values come from the original weights, with neuron selection and the residual filter."""
        return self.method in NSE_FAMILY

    @property
    def computes_values(self) -> bool:
        """Whether a round optimises value targets (every method but UltraEdit, whose update is one gradient step)."""
        return self.method != "ultraedit"

    @property
    def uses_key_memory(self) -> bool:
        """Whether the solve includes the keys of earlier rounds (all methods but classic MEMIT)."""
        return self.method in USES_KEY_MEMORY

    @property
    def uses_second_moments(self) -> bool:
        """Whether the solve needs the corpus second moments ``C`` (every method but UltraEdit)."""
        return self.method in USES_SECOND_MOMENTS

    def replace(self, **changes: Any) -> EditConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["context_prefixes"] = list(self.context_prefixes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditConfig:
        check_names(data)
        return cls(**data)

    @classmethod
    def from_reference(cls, path: str | Path, **overrides: Any) -> EditConfig:
        """Read an NSE/MEMIT/AlphaEdit reference ``hparams`` JSON (module templates and unknown keys are ignored).

        The reference's ``nullspace_threshold`` is an absolute eigenvalue cutoff and is not read: here
        the field is relative to ``C``'s median eigenvalue (the default applies unless overridden).
        """
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)} - {"nullspace_threshold"}
        kept = {k: v for k, v in data.items() if k in names}
        kept.setdefault("thresholds", "absolute")
        return cls(**{**kept, **overrides})


_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(EditConfig) if f.type == "float")
_INT_FIELDS = tuple(f.name for f in dataclasses.fields(EditConfig) if f.type == "int")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and float(value).is_integer()


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


#: Settings that change how an edit is computed (memory, batching) or named, not what it writes.
BOOKKEEPING_SETTINGS: tuple[str, ...] = ("batch_size", "lean", "preset")


def _plain(value: Any) -> Any:
    """``value`` as :meth:`EditConfig.to_dict` writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _default(name: str) -> Any:
    """The default value of the setting ``name``."""
    setting = next(f for f in dataclasses.fields(EditConfig) if f.name == name)
    return setting.default if setting.default is not dataclasses.MISSING else setting.default_factory()


def _default_hint(name: str) -> str:
    """`` (default X)``: the value that works unless there is a reason for another."""
    value = _default(name)
    return f" (default {list(value) if isinstance(value, tuple) else value!r})"


def check_names(hparams: Mapping[str, Any]) -> None:
    """Refuse unknown hyperparameter names, suggesting the closest known one."""
    names = [f.name for f in dataclasses.fields(EditConfig)]
    for name in hparams:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = (f"did you mean '{close[0]}' ({EditConfig.help(close[0])})?" if close
                    else f"known: {', '.join(names)}")
            raise ConfigError(f"unknown hyperparameter '{name}'; {hint}")


# Measured on the embedded models; see README "Presets" for the numbers behind each choice.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layers": (2, 3, 4, 5, 6), "v_lr": 0.5, "mom2_update_weight": 1e4},
    "gemma3-270m": {"layers": (3, 4, 5, 6, 7), "v_lr": 5.0, "mom2_update_weight": 3e3},
}

# Per-method overrides of a model's preset. UltraEdit writes from gradients at the answer positions and needs
# later layers than the locate-then-edit methods (its reference edits 60–95 % of the depth). SmolLM2: chosen on
# the first 10 CounterFact records, one round (ES/PS/NS ×100, unedited 20/20/70; see the README's Presets):
# layers 2–6 wrote nothing useful at any η (η 1e-2: 60/50/60), 18–24 at η 3e-4 gave 90/40/50, at 1e-3 100/50/40.
# Gemma 3 270M: the same relative depth and η, not measured.
METHOD_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("smollm2-135m", "ultraedit"): {"layers": (18, 19, 20, 21, 22, 23, 24), "ultraedit_lr": 3e-4},
    ("gemma3-270m", "ultraedit"): {"layers": (11, 12, 13, 14), "ultraedit_lr": 3e-4},
    # NSE-null: NSE's SmolLM2 layers and values (the model's preset) with AlphaEdit's SmolLM2 null space (threshold 2,
    # README "Methods"), NAS's norm anchor and L2 30, chosen on 1000 edits in rounds of 100 (benchmarks/README.md
    # "Lifelong methods: tuning trials"): against L2 10 without the anchor, ES 94.8 vs 94.4, ES gen 64.6 vs 54.5,
    # NS 62.6 vs 58.5; perplexity 1.53x the unedited model's (L2 10 with the anchor: 2.12x; L2 100: 1.16x, ES 85.2).
    ("smollm2-135m", "nse_null"): {"nullspace_threshold": 2.0, "L2": 30.0, "neuron_threshold": 1.0,
                                   "norm_anchor": True},
}

# Adam's step for δ as a share of the hidden states' per-coordinate RMS at the z-layer (0.5 ≈ 0.1 × 4.6 on
# SmolLM2, where it was tuned). Models without a preset get v_lr from this and a measured RMS.
V_LR_PER_HIDDEN_RMS = 0.1


def preset_for(layout: ModelLayout, embedded_name: str | None) -> str | None:
    """The preset that applies to a model: the embedded model's own, else one matching its shape."""
    if embedded_name in PRESETS:
        return embedded_name
    shapes = {
        ("llama", 30, 576, 1536): "smollm2-135m",
        ("gemma3_text", 18, 640, 2048): "gemma3-270m",
    }
    return shapes.get((layout.model_type, layout.num_layers, layout.hidden_size, layout.intermediate_size))


def automatic_layers(num_layers: int) -> tuple[int, ...]:
    """Five consecutive layers ending a quarter of the way up (Llama3-8B: 4–8 of 32; SmolLM2: 3–7 of 30)."""
    z = min(num_layers - 1, max(0, num_layers // 4))
    first = max(0 if num_layers < 8 else 1, z - 4)
    return tuple(range(first, z + 1))


def ultraedit_layers(num_layers: int) -> tuple[int, ...]:
    """UltraEdit's automatic layers: from 60 % to 80 % of the depth (SmolLM2: 18–24 of 30, its preset)."""
    first, last = round(0.6 * num_layers), min(num_layers - 1, round(0.8 * num_layers))
    return tuple(range(min(first, last), last + 1))


def make_config(layout: ModelLayout, embedded_name: str | None = None, method: str = "nse",
                hidden_rms: Callable[[int], float] | None = None, **hparams: Any) -> EditConfig:
    """Preset or automatic settings for ``layout``, overridden by ``hparams``; checked against the model.

    ``hidden_rms(layer)`` measures the per-coordinate RMS of the hidden states after ``layer``; without a
    preset it sets ``v_lr`` (step sizes must follow the scale of the hidden states they move).
    """
    check_names(hparams)
    preset = preset_for(layout, embedded_name)
    base: dict[str, Any] = dict(PRESETS[preset]) if preset else {"layers": automatic_layers(layout.num_layers)}
    base.update(METHOD_PRESETS.get((preset or "", method), {}))
    if not preset and method == "ultraedit":
        base["layers"] = ultraedit_layers(layout.num_layers)
    config = EditConfig(**{**base, "method": method, "preset": preset, **hparams})  # checks the types
    problems = config.problems(num_layers=layout.num_layers)
    if problems:
        raise ConfigError("invalid edit configuration: " + "; ".join(problems))
    if "mom2_n_samples" in hparams:
        warn_sample_size(layout.intermediate_size, config.mom2_n_samples, config.mom2_sample_length)
    elif "mom2_n_samples" not in base:
        config = config.replace(mom2_n_samples=default_stat_samples(layout.intermediate_size,
                                                                    config.mom2_sample_length))
    if not preset and "v_lr" not in hparams and hidden_rms is not None:
        config = config.replace(v_lr=float(f"{V_LR_PER_HIDDEN_RMS * hidden_rms(config.z_layer):.2g}"))
    return config
