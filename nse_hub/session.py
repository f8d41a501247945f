"""The edit session: a causal LM, the rounds of facts written into it, and everything needed to go on.

Example::

    from nse_hub import EditSession

    session = EditSession.from_pretrained("smollm2-135m")          # or any Hub id / local model
    report = session.edit([{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                            "target_new": "English", "target_true": "French"}])
    session.model.generate(...)                                       # the edited model
    session.save_pretrained("my-edit")                                # PEFT adapters + state
    session = EditSession.from_pretrained("my-edit")                  # resume later

The session owns the lifecycle (rounds, rollback, versions) and orchestrates the pieces that live in their own
modules: loading (:mod:`nse_hub.loading`), the base identity (:mod:`nse_hub.base`), the algorithm
(:mod:`nse_hub.algorithm`), reports (:mod:`nse_hub.report`), saved edits (:mod:`nse_hub.checkpoint`), cards
(:mod:`nse_hub.card`) and the Hub (:mod:`nse_hub.hub`). A *version* is the model after a round: version ``k`` is
the base plus rounds ``1..k``; every method that takes ``round=`` means that version.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import time
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nse_hub._version import __version__
from nse_hub.adapters import CompressionReport, no_update, pack, save_adapter
from nse_hub.algorithm import RoundInputs, generate_context_templates, optimize_values, round_values, run_round
from nse_hub.algorithm.rounds import EngineState, ValueOptimizer
from nse_hub.algorithm.ultraedit import editing_features, feature_statistics
from nse_hub.algorithm.values import ValueResult
from nse_hub.architectures import ModelLayout, max_positions
from nse_hub.base import BaseModelInfo, check_base, describe_base
from nse_hub.card import Metric, build_card
from nse_hub.checkpoint import (
    CARD_FILE,
    RoundData,
    SessionMeta,
    check_writable,
    read_meta,
    read_reports,
    read_round,
    round_dir,
    same_history,
    verify_files,
    write_checkpoint,
    write_metadata,
)
from nse_hub.config import EditConfig, make_config
from nse_hub.deltas import KeyMemory, WeightDeltas
from nse_hub.errors import (
    CheckpointError,
    ConcurrentWriteError,
    ConfigError,
    LicenseRequiredError,
    MemoryPlanWarning,
    RequestError,
    VersionNotFoundError,
)
from nse_hub.fingerprint import model_sha256, tensor_sha256
from nse_hub.hub import PushedRound, PushOptions, locate_saved_edit, push_versions, tag_name
from nse_hub.io import atomic_write_text, folder_lock
from nse_hub.lineage import HistoryDiff, MergePlan, Side, Version, diff_versions, plan_merge, probe_diff, report_digest
from nse_hub.loading import check_finite_weights, hidden_rms, load_base_model
from nse_hub.models import check_model_name, embedded_model_of, is_embedded
from nse_hub.offload import write_tensor
from nse_hub.plan import EngineSettings, MemoryPlan, Suggestion, gib, session_plan, session_suggestions
from nse_hub.probes import measure_probes
from nse_hub.report import RoundReport, request_report
from nse_hub.requests import EditRequest, RequestLike, one_round, parse_requests
from nse_hub.stats import StatsSpec, matrix_sha256, second_moments
from nse_hub.stats_hub import pull_statistics, push_statistics
from nse_hub.tokens import pad_id, request_lengths
from nse_hub.tracing import model_device

logger = logging.getLogger(__name__)

#: Edits per round that ``from_pretrained`` plans the memory for (the command line's default round).
PLANNED_EDITS = 10
# Tokens a context template adds before a prompt besides its generated words (the prefix, punctuation, BOS).
CONTEXT_TEMPLATE_MARGIN = 8


def resolve_round(round: int | None, latest: int, first: int = 0, owner: str = "the session") -> int:
    """The version a ``round=`` argument names: ``None`` is the latest; anything outside ``first..latest`` fails.

    Raises:
        VersionNotFoundError: ``round`` is not a version of ``owner``.
    """
    version = latest if round is None else round
    if isinstance(version, bool) or not isinstance(version, int) or not first <= version <= latest:
        raise VersionNotFoundError(f"round {round!r} does not exist: {owner} has rounds {first}–{latest}"
                                   if latest >= first else f"{owner} has no rounds yet")
    return version


class EditSession:
    """Applies edit rounds (NSE, MEMIT, …) to a causal LM and keeps every round as exact factors.

    Create sessions with :meth:`from_pretrained`. The attributes below are read-only views; change
    the session through :meth:`edit` and :meth:`rollback`.

    Attributes:
        model: the edited model (original weights plus all rounds), usable with ``generate``. In a bfloat16 or
            float16 model the weights stay the original ones and forward hooks add the rounds' deltas in
            float32 (exact where rounding them into the weights would lose them); :meth:`merge` writes them in.
        tokenizer: its tokenizer.
        config: the hyperparameters (fixed for the session's life).
        layout: where the model's edited modules are.
        base: the identity of the base model (names, license, fingerprints).
        rounds: one :class:`RoundReport` per round, in order.
        evaluations: figures recorded per version by :func:`nse_hub.evaluate_session`; cards report them.
        lineage: where this history comes from: ``parent`` (the version it was started from when that was
            chosen by ``revision``/``round``: the branch point) and ``merges`` (see :meth:`merge_history`).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EditConfig,
                 base: BaseModelInfo | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.layout = ModelLayout.detect(model)
        problems = config.problems(num_layers=self.layout.num_layers)
        if problems:
            raise ConfigError("invalid edit configuration: " + "; ".join(problems))
        self.config = config
        self.device = model_device(model)
        self.deltas = WeightDeltas(model, self.layout, config.layers)
        self.memory = KeyMemory(config.layers, self.layout.intermediate_size, self.device, lean=config.lean)
        self.rounds: list[RoundReport] = []
        self.context_templates: list[list[str]] | None = None
        self._second_moments: dict[int, torch.Tensor] | None = None
        self._stats_sha256: dict[str, str] = {}
        self.base = base or describe_base(model, self.layout, self.deltas.original_sha256)
        self.evaluations: dict[int, list[Metric]] = {}
        # What the engine derives once and keeps between rounds (AlphaEdit's null spaces, the NAS anchor).
        self.engine = EngineState()
        self.lineage: dict[str, Any] = {}
        self._values: list[dict[str, torch.Tensor] | None] = []  # per round, its value targets when known
        self.stats_repo: str | None = None  # a Hub dataset repo sharing the second moments (see stats_hub)
        self._stats_token: str | bool | None = None
        self._card_branch = "main"
        self._publishing = False  # while pushing: the base is named as it is published (BaseModelInfo.published)
        # session.json digest of each folder this session read or saved, as it left it (see write_checkpoint)
        self._known_digests: dict[Path, str] = {}
        # How value targets are optimised; benchmarks swap in optimize_values_reference to compare.
        self.value_optimizer: ValueOptimizer = optimize_values
        # The memory plan of a round on this device and the lean engine's sizes chosen from it (from_pretrained).
        self.memory_plan: MemoryPlan | None = None
        self.engine_settings = EngineSettings()

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_or_name: str | PreTrainedModel, method: str | None = None, *,
                        tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None,
                        round: int | None = None, base_model: str | PreTrainedModel | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        token: str | bool | None = None, stats_repo: str | None = None,
                        device_memory: str | int | None = None, **hparams: Any) -> EditSession:
        """Start a session on a model, or resume a saved one.

        Args:
            model_or_name: a loaded ``PreTrainedModel``; an embedded model name (``"smollm2-135m"``,
                ``"gemma3-270m"``); a Hub model id or local model folder; or a saved edit (a folder
                written by :meth:`save_pretrained`, or a Hub repo pushed by :meth:`push_to_hub`),
                which restores the base model and every round.
            method: the edit method (:data:`nse_hub.config.METHODS`; default ``"nse"``). A saved edit
                keeps its own: naming another one is refused.
            tokenizer: the tokenizer (default: the model's own, or the one saved with the edit's base).
            revision: Hub revision of the model, or of the saved edit (e.g. ``"round-2"``).
            round: resume a saved edit at this version instead of its latest.
            base_model: for a saved edit, use this base instead of the recorded one (it must be the
                same weights: the wrong-base guard compares fingerprints).
            device, dtype: where and in which precision to run (default: CUDA if available;
                float32, or bfloat16 on CUDA above 2B parameters; a saved edit: the precision it was made
                in). In bfloat16 and float16 the deltas are applied unmerged, in float32, so no update is
                lost to rounding.
            token: Hub token (default: ``HF_TOKEN`` or the stored login).
            stats_repo: a Hub dataset repo of second moments (:mod:`nse_hub.stats_hub`): statistics missing
                from the local cache are downloaded from it (checked by sha256) instead of measured.
            device_memory: the memory the session plans for (``"24GB"``; default: the ``NSE_HUB_DEVICE_MEMORY``
                environment variable, else the device's). The memory plan of a round of
                :data:`PLANNED_EDITS` edits (:func:`nse_hub.plan.session_plan`) chooses the lean engine's sizes
                (statistics layers per pass, value chunks; ``session.engine_settings``), and a warning naming the
                setting to change is given when it will not fit.
            **hparams: :class:`EditConfig` fields overriding the preset/automatic settings.

        A saved edit resumed at a chosen version (``revision=`` or ``round=``) records it as its parent in
        ``session.lineage`` (the branch point), which its cards and later merges use.

        Raises:
            ConfigError: unknown or invalid hyperparameters, or settings given for a saved edit.
            VersionNotFoundError: ``round`` is not a version of the saved edit.
            BaseModelMismatchError: ``base_model`` is not the model the edit was made on.
        """
        if isinstance(model_or_name, str):
            check_model_name(model_or_name)  # a typo fails here, before any download
            saved = locate_saved_edit(model_or_name, revision, token)
            if saved is not None:
                session = cls._resume(saved, method=method, tokenizer=tokenizer, round=round,
                                      base_model=base_model, device=device, dtype=dtype, token=token,
                                      hparams=hparams, downloaded=not Path(model_or_name).expanduser().is_dir())
                session._set_parent(model_or_name, saved, revision, round)
                session.stats_repo, session._stats_token = stats_repo, token
                session._plan_memory(device_memory)
                return session
            embedded = model_or_name if is_embedded(model_or_name) else None
            model, loaded_tokenizer = load_base_model(model_or_name, revision, device, dtype, token)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = model_or_name if device is None else model_or_name.to(device)
            check_finite_weights(model)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
            spec = embedded_model_of(model.name_or_path) if model.name_or_path else None
            embedded = spec.name if spec else None
        layout = ModelLayout.detect(model)
        config = make_config(layout, embedded, method or "nse",
                             hidden_rms=lambda layer: hidden_rms(model, tokenizer, layout, layer), **hparams)
        session = cls(model, tokenizer, config)
        session.base.revision = revision
        session.stats_repo, session._stats_token = stats_repo, token
        session._plan_memory(device_memory)
        return session

    def _plan_memory(self, device_memory: str | int | None) -> None:
        """Plan a round on this device: choose the lean engine's sizes, and warn when it will not fit."""
        plan = session_plan(self.model, self.config, self.device, device_memory, edits=PLANNED_EDITS)
        self.memory_plan, self.engine_settings = plan, plan.settings
        if plan.fits is False:
            fixes = session_suggestions(self.model, self.config, plan)
            fitting = [_setting_words(s) for s in fixes if s.fits]
            if fitting:
                fix = "change " + ", or ".join(fitting)
            elif fixes:
                fix = ("no single setting makes it fit; closest: " + ", or ".join(_setting_words(s) for s in fixes)
                       + "; or use a device with more memory")
            else:
                fix = "use a device with more memory"
            warnings.warn(
                f"this session will not fit the device's memory: a round of {plan.batch_size} edits peaks at "
                f"{_size(plan.peak_bytes)} ({plan.peak_phase}) + {_size(plan.reserve_bytes)} reserve on "
                f"{plan.device}, which has {_size(plan.device_memory)}. To fit, {fix} (`nse-hub plan` shows every "
                "phase; device_memory= or NSE_HUB_DEVICE_MEMORY sets the memory planned for).",
                MemoryPlanWarning, stacklevel=3)

    @classmethod
    def _resume(cls, folder: Path, *, method: str | None, tokenizer: PreTrainedTokenizerBase | None,
                round: int | None, base_model: str | PreTrainedModel | None, device: str | torch.device | None,
                dtype: str | torch.dtype | None, token: str | bool | None, hparams: dict[str, Any],
                downloaded: bool = False) -> EditSession:
        meta = read_meta(folder, downloaded=downloaded)
        if hparams:
            raise ConfigError(f"hyperparameters are fixed by the saved edit {folder}; got {sorted(hparams)}. "
                              "Start a new session on the base model to use other settings.")
        if method is not None and method != meta.config.method:
            raise ConfigError(f"the saved edit {folder} was made with method {meta.config.method!r}, not {method!r}; "
                              "leave method unset to continue it, or start a new session on the base model")
        version = resolve_round(round, meta.rounds, owner=f"the saved edit {folder}")
        if isinstance(base_model, PreTrainedModel):
            model = base_model
            check_finite_weights(model)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model.name_or_path)
        else:
            if base_model is None and downloaded and meta.base.is_local_folder \
                    and not Path(meta.base.name_or_path).expanduser().is_dir():
                raise ConfigError(f"the saved edit {folder} was made on a local model folder named "
                                  f"{meta.base.name_or_path!r}, which is not published with it: pass "
                                  "base_model='path/to/that/folder' (the same weights: their fingerprints are checked)")
            # An embedded base is fetched again by name: its folder may not exist on this machine.
            source = base_model or meta.base.embedded or meta.base.name_or_path
            # The base in the precision the edit was made in: its fingerprints (and a bf16 edit's outputs) need it.
            model, loaded_tokenizer = load_base_model(source, meta.base.revision, device, dtype or meta.base.dtype,
                                                      token)
            tokenizer = tokenizer or loaded_tokenizer
        check_base(model, meta.base)
        session = cls(model, tokenizer, meta.config, base=meta.base)
        with folder_lock(folder):  # the rounds as they were when session.json was read: no save in between
            if read_meta(folder, downloaded=downloaded).digest != meta.digest:
                raise ConcurrentWriteError(f"{folder} was saved by another process while this one loaded it; "
                                           "load it again")
            verify_files(folder, meta)
            rounds = [read_round(folder, session.layout, index, meta) for index in range(1, version + 1)]
        session.context_templates = meta.context_templates
        session._stats_sha256 = dict(meta.stats.get("sha256", {}))
        if version:  # NAS: the anchor measured on the first round stays the session's
            session.engine.norm_anchor = meta.engine.get("norm_anchor")
        try:
            session.evaluations = {int(v): [Metric(**m) for m in metrics]
                                   for v, metrics in meta.evaluations.items() if int(v) <= version}
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{folder}: the evaluations in session.json are damaged ({error}); restore it "
                                  "from a backup or the Hub") from None
        session.lineage = _lineage_upto(meta.lineage, version)
        session._saved_rounds = meta.rounds
        for index, data in enumerate(rounds, start=1):
            session.deltas.append_round(data.factors)
            session.memory.add_round(data.keys)
            if data.lifelong is None and meta.config.method == "ultraedit":
                raise CheckpointError(f"{folder}/{round_dir(index)} has no lifelong statistics, which UltraEdit "
                                      "needs to continue: restore the folder from a backup or the Hub")
            session.engine.commit_lifelong(data.lifelong or {})
            session.rounds.append(data.report)
            session._values.append(data.values)
        session._known_digests[folder.resolve()] = meta.digest
        return session

    def _set_parent(self, name: str, folder: Path, revision: str | None, round: int | None) -> None:
        """Record the version this session was started from as its branch point, when one was chosen.

        Resuming a saved edit at its head (no revision, or a branch such as ``main``) continues that history
        (its lineage is kept); pinning a version (``round=`` below the head, a ``round-N`` tag or a commit)
        starts a branch there, unless it is the head of a history that already records its own branch point.
        """
        saved = getattr(self, "_saved_rounds", len(self.rounds))
        pinned = revision is not None and bool(re.fullmatch(r"(.+/)?round-\d+|[0-9a-f]{40}", revision))
        if not pinned and (round is None or round == saved):
            return
        if self.lineage.get("parent") and len(self.rounds) == saved and round is None:
            return  # the head of a branch, by its name: continue it
        commit = folder.name if folder.parent.name == "snapshots" else None
        parent = {"source": name, "revision": revision, "commit": commit, "round": len(self.rounds)}
        if self.lineage.get("parent"):
            parent["parent"] = self.lineage["parent"]
        self.lineage = {**self.lineage, "parent": parent}

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, requests: RequestLike | Iterable[RequestLike], progress: bool = True,
             probes: Literal["all", "rewrite"] = "all", values: ValueResult | None = None) -> RoundReport:
        """Write a batch of facts as one round; returns what changed.

        ``requests`` are :class:`EditRequest` objects or dicts in any supported schema. All are
        validated first: if one is bad, nothing is edited.

        ``probes`` chooses what the round's report scores before and after the round: ``"all"`` (the rewrite
        prompt, paraphrases and neighbours: efficacy, generalization and specificity) or ``"rewrite"`` (the
        rewrite prompt only: efficacy), for long runs that evaluate apart — scoring every probe of a
        CounterFact record costs more than editing it with the training-free methods.

        ``values``: the requests' value targets from :meth:`compute_values`, in the same order, to skip the
        value step.

        Raises:
            RequestError: a request is invalid (its number and the reason are in the message).
            ConfigError: ``values`` do not fit the requests or the method.
        """
        if isinstance(requests, (EditRequest, dict)):
            requests = [requests]
        if probes not in ("all", "rewrite"):
            raise ConfigError(f"probes must be 'all' or 'rewrite', got {probes!r}")
        parsed = one_round(parse_requests(requests))
        if values is not None:
            self._check_values_fit(parsed, values)
        return self._apply(parsed, progress, values=values, rewrite_only=probes == "rewrite")

    def compute_values(self, requests: RequestLike | Iterable[RequestLike], progress: bool = True) -> ValueResult:
        """The value targets that :meth:`edit` would optimise for ``requests``, without editing.

        NSE and NSE-null optimise them on the original weights, so they do not depend on the rounds made
        before or after: compute them ahead (in another process, or on another machine with the same base model
        and settings) and pass them to ``edit(requests, values=...)``. MEMIT, sequential MEMIT and AlphaEdit
        optimise them on the current weights, so theirs are valid for the next round only.

        Raises:
            ConfigError: the method computes no value targets (UltraEdit).
            RequestError: a request is invalid.
        """
        if not self.config.computes_values:
            raise ConfigError("UltraEdit computes no value targets (its update is one gradient step); "
                              "call edit() directly")
        parsed = one_round(parse_requests([requests] if isinstance(requests, (EditRequest, dict)) else requests))
        self._check_lengths(parsed)
        self.prepare(progress, statistics=False)  # the value step needs the context templates only
        return round_values(self._round_inputs(), parsed, self.value_optimizer, progress)

    def value_targets(self, round: int) -> ValueResult | None:
        """The value targets round ``round`` (1-based) wrote toward, or ``None`` where they are not known (a
        round saved without them, or UltraEdit's)."""
        index = resolve_round(round, len(self.rounds), first=1) - 1
        saved = self._values[index] if index < len(self._values) else None
        return ValueResult.from_tensors(saved) if saved is not None else None

    def trajectory_sha256(self, rounds: int | None = None) -> str | None:
        """Fingerprint of what the edit layers' weights after the first ``rounds`` rounds (default: all) follow
        from besides the base model: the settings (:meth:`EditConfig.changed_settings`), the context templates
        and each round's requests and value targets. Unlike the weights' bits, it does not depend on the thread
        count or hardware that solved the rounds. ``None`` where a round's targets are not known."""
        rounds = resolve_round(rounds, len(self.rounds))
        digest = hashlib.sha256(json.dumps({"settings": self.config.changed_settings(),
                                            "templates": self.context_templates}, sort_keys=True).encode())
        for index in range(rounds):
            targets = self._values[index] if index < len(self._values) else None
            if targets is None:
                return None
            requests = [r.request.to_dict() for r in self.rounds[index].requests]
            digest.update(json.dumps(requests, sort_keys=True).encode())
            tensor_sha256(targets["targets"], digest)
        return digest.hexdigest()

    def _check_values_fit(self, parsed: list[EditRequest], values: ValueResult) -> None:
        if not self.config.computes_values:
            raise ConfigError("UltraEdit computes no value targets: call edit() without values=")
        if values.targets.shape != (len(parsed), self.layout.hidden_size):
            raise ConfigError(f"values hold targets of shape {tuple(values.targets.shape)}; {len(parsed)} requests "
                              f"of this model need ({len(parsed)}, {self.layout.hidden_size}): pass the result of "
                              "compute_values() for these same requests")

    def warm_up(self, requests: RequestLike | Iterable[RequestLike]) -> int:
        """StableEdit's warm-up: add the editing features of ``requests`` to UltraEdit's running statistics.

        The requests are read on the current weights and not written. Their statistics are used from the
        next round on and saved with it (a session saved before that round does not keep them; rolling back
        to the unedited model drops them). Use held-out records, not the ones to be edited.

        Returns:
            How many features (target-predicting positions) were added per layer.

        Raises:
            ConfigError: the session's method is not ``"ultraedit"``.
            RequestError: a request is invalid.
        """
        if self.config.method != "ultraedit":
            raise ConfigError(f"warm_up feeds UltraEdit's running statistics; this session's method is "
                              f"{self.config.method!r}: open it with method='ultraedit'")
        parsed = parse_requests([requests] if isinstance(requests, (EditRequest, dict)) else requests)
        self._check_lengths(parsed)
        dims = self.layout.hidden_size if self.config.ultraedit_whitening == "full" else 0
        features = editing_features(self.model, self.layout, self.tokenizer, parsed, self.config.layers,
                                    pad_id(self.tokenizer), self.config.batch_size)
        self.engine.warm_up(feature_statistics(features, self.config.layers, dims))
        return len(features.owner)

    def _apply(self, parsed: list[EditRequest], progress: bool, values: ValueResult | None = None,
               rewrite_only: bool = False) -> RoundReport:
        """One round of ``parsed``; ``values``: precomputed value targets to reuse (see :func:`run_round`)."""
        started = time.perf_counter()
        self._check_lengths(parsed)
        seconds = self.prepare(progress)
        tic = time.perf_counter()
        before = self._measure(parsed, rewrite_only)
        seconds["scoring"] = time.perf_counter() - tic
        try:
            outcome = run_round(self._round_inputs(), parsed, optimize=self.value_optimizer, values=values,
                                progress=progress)
        except BaseException:
            self.deltas.discard_round()
            raise
        self.deltas.commit_round()
        self.memory.add_round(outcome.keys)
        self.engine.commit_lifelong(outcome.lifelong)
        tic = time.perf_counter()
        after = self._measure(parsed, rewrite_only)
        seconds["scoring"] += time.perf_counter() - tic
        seconds.update(outcome.seconds)
        seconds["total"] = time.perf_counter() - started
        report = RoundReport(
            round=len(self.rounds) + 1, method=self.config.method,
            requests=[request_report(r, before[i], after[i], outcome, i) for i, r in enumerate(parsed)],
            selected_neurons=outcome.selected_neurons, seconds={k: round(v, 3) for k, v in seconds.items()},
            nullspace_dims=outcome.nullspace_dims, norm_anchor=outcome.norm_anchor,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        self.rounds.append(report)
        self._values.append(outcome.optimized.to_tensors() if outcome.optimized else None)
        return report

    def _round_inputs(self) -> RoundInputs:
        return RoundInputs(self.model, self.tokenizer, self.layout, self.config, self.deltas, self.memory,
                           self._second_moments or {}, self.context_templates, self.engine,
                           value_chunk_bytes=self.engine_settings.value_chunk_bytes,
                           null_space_on_host=self.engine_settings.null_space_on_host)

    def rollback(self, round: int) -> None:
        """Return to the version after ``round`` (0: the unedited model); later rounds are dropped."""
        version = resolve_round(round, len(self.rounds))
        self.deltas.truncate(version)
        self.memory.truncate(version)
        self.engine.truncate_lifelong(version)
        self.rounds = self.rounds[:version]
        self._values = self._values[:version]
        self.evaluations = {v: m for v, m in self.evaluations.items() if v <= version}
        self.lineage = _lineage_upto(self.lineage, version)
        if version == 0:
            self.engine.norm_anchor = None  # measured again on the next first round

    def merge(self, round: int | None = None) -> PreTrainedModel:
        """A standalone copy of the model with the deltas up to ``round`` (default: all) merged in:
        exactly ``W0 + ΔW``, no adapter needed.

        In a bfloat16/float16 model ``W0 + ΔW`` is rounded to that precision, which drops update entries below
        half a step of their weight: the session and its saved adapter keep the deltas in float32 instead."""
        version = resolve_round(round, len(self.rounds))
        merged = copy.deepcopy(self.model)
        for layer in self.config.layers:
            weight = self.deltas.edited_weight(layer, version)
            write_tensor(merged, f"{self.layout.projection_name(layer)}.weight", weight)
        return merged

    def _check_lengths(self, requests: list[EditRequest]) -> None:
        """Refuse requests whose sequences would not fit the model's context, before any work is done."""
        limit = max_positions(self.model.config)
        if limit is None:
            return
        # A context template (prefix and generated words) goes before the prompt in the value optimisation.
        room = limit - self.config.context_length - CONTEXT_TEMPLATE_MARGIN
        lengths = request_lengths(self.tokenizer, requests)
        too_long = [(number, length) for number, length in enumerate(lengths) if length > room]
        if too_long:
            listed = ", ".join(f"record {number} ({length} tokens)" for number, length in too_long[:5])
            raise RequestError(f"{len(too_long)} request(s) too long for the model's context of {limit} tokens "
                               f"({listed}{', …' if len(too_long) > 5 else ''}): a request's prompt with its target, "
                               f"paraphrases and neighbours must stay under {room} tokens; shorten them")

    def _measure(self, requests: list[EditRequest], rewrite_only: bool = False) -> list[Any]:
        return measure_probes(self.model, self.tokenizer, self.layout, requests, self.config.batch_size,
                              rewrite_only)

    # --- preparation --------------------------------------------------------------------------------

    def prepare(self, progress: bool = True, statistics: bool = True) -> dict[str, float]:
        """Make what editing needs, once, on the original weights: the context templates and (with
        ``statistics``) the second moments C (loaded from the cache or the Hub, or measured). Rounds call it;
        call it ahead to pay the statistics pass before the first round. Returns the seconds each part took.

        Raises:
            StatisticsError: the statistics cannot be loaded or measured.
        """
        seconds: dict[str, float] = {}
        with self.deltas.original():
            if self.context_templates is None:
                tic = time.perf_counter()
                self.context_templates = generate_context_templates(
                    self.model, self.tokenizer, self.config.context_prefixes, self.config.context_length,
                    self.config.seed)
                seconds["templates"] = time.perf_counter() - tic
            if statistics and self._second_moments is None and self.config.uses_second_moments:
                tic = time.perf_counter()
                self._second_moments = self._load_second_moments(progress)
                seconds["stats"] = time.perf_counter() - tic
        return seconds

    @property
    def stats_spec(self) -> StatsSpec:
        """Which second-moment statistics this session uses (the model fingerprint and the corpus sample)."""
        if not self.base.model_sha256:
            with self.deltas.original():
                self.base.model_sha256 = model_sha256(self.model)
        c = self.config
        return StatsSpec(self.base.model_sha256, c.mom2_dataset, c.mom2_n_samples, c.mom2_sample_length, c.seed)

    def _load_second_moments(self, progress: bool) -> dict[int, torch.Tensor]:
        if self.stats_repo:
            pull_statistics(self.stats_repo, self.stats_spec, self.layout, self.config.layers,
                            token=self._stats_token)
        layers = list(self.config.layers)
        group = self.engine_settings.stats_layers_per_pass or len(layers)
        matrices: dict[int, torch.Tensor] = {}
        for start in range(0, len(layers), group):  # the plan's layers per pass (each cached per layer)
            measured = second_moments(self.model, self.tokenizer, self.layout, layers[start:start + group],
                                      self.stats_spec, self.config.batch_size, progress=progress)
            matrices.update({layer: m.cpu() if self.config.lean else m for layer, m in measured.items()})
        for layer, matrix in matrices.items():
            name = self.layout.projection_name(layer)
            digest = matrix_sha256(matrix)
            expected = self._stats_sha256.get(name)
            if expected and expected != digest:
                logger.warning("The second moments of %s differ from those the saved session used (%s… vs %s…); "
                               "editing continues, but results will not match an uninterrupted session exactly.",
                               name, expected[:12], digest[:12])
            self._stats_sha256[name] = digest
        # Lean: C stays on the host in float32; each solve promotes its layer's to float64 on the device.
        return {layer: m.to("cpu" if self.config.lean else self.device) for layer, m in matrices.items()}

    # --- persistence ----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, round: int | None = None, max_rank: int | None = None,
                        repo_id: str | None = None, license: str | None = None) -> list[CompressionReport]:
        """Save the version after ``round`` (default: the latest): PEFT adapters, tokenizer, manifest, card and
        session state.

        The folder loads with stock ``peft``/``transformers`` and resumes with
        ``EditSession.from_pretrained(save_directory)``. Saving never runs the algorithm's preparation.

        Args:
            save_directory: the folder; an earlier save in it is updated in place, crash-safely.
            round: the version to save.
            max_rank: truncate the cumulative adapter to this rank (lossy: the returned reports, the card
                and ``session.json`` give the error per module); the per-round increments stay exact.
            repo_id: the Hub repository named in the card's loading code.
            license: the license to publish under (default: the base model's, when known).

        Returns:
            What packaging did to each module of the cumulative adapter.
        """
        version = resolve_round(round, len(self.rounds))
        if license:
            self.base.license = license
        rounds = [RoundData(self.deltas.rounds[i], self.memory.rounds[i], self.rounds[i],
                            self._values[i] if i < len(self._values) else None,
                            self.engine.lifelong_rounds[i] or None) for i in range(version)]
        stored, compression = self._packed(version, max_rank)
        meta = self._meta(version, compression)
        folder = Path(save_directory).resolve()
        self._known_digests[folder] = write_checkpoint(
            folder, self.layout, meta, rounds, stored, card=self._card_text(version, repo_id, compression),
            adapter_metadata={"layers": list(self.config.layers)}, tokenizer=self.tokenizer,
            known_digest=self._known_digests.get(folder))
        return compression

    def check_can_save(self, save_directory: str | Path) -> None:
        """Raise now, before any further edit, the error :meth:`save_pretrained` would raise there: the folder holds
        a saved edit that is not this session's history (another session's, or one this session has not read).

        Raises:
            ConcurrentWriteError: save to another folder, or load that one and continue from it.
        """
        folder = Path(save_directory).resolve()
        check_writable(folder, self.rounds, self._known_digests.get(folder))

    def save_card(self, save_directory: str | Path, repo_id: str | None = None) -> None:
        """Rewrite only the model card and session state of this session's saved edit (adapters untouched).

        Use it after :func:`nse_hub.evaluate_session` to record the figures, so that the next push
        commits the card and nothing else.
        """
        folder = Path(save_directory).resolve()
        with folder_lock(folder):
            saved = read_meta(folder)
            if saved.rounds != len(self.rounds):
                raise VersionNotFoundError(f"{folder} holds version {saved.rounds}, this session is at "
                                           f"{len(self.rounds)}: save the session there with save_pretrained")
            if not same_history(read_reports(folder, saved, saved.rounds), self.rounds):
                raise ConcurrentWriteError(f"{folder} holds another history than this session's: save the session "
                                           "there with save_pretrained, or record into the folder it came from")
            compression = [CompressionReport(**r) for r in saved.adapter.get("modules", [])]
            self._known_digests[folder] = write_metadata(folder, self._meta(len(self.rounds), compression),
                                                         card=self._card_text(len(self.rounds), repo_id, compression))

    def export_adapter(self, save_directory: str | Path, round: int | None = None,
                       max_rank: int | None = None) -> list[CompressionReport]:
        """Write the version after ``round`` as a standalone PEFT adapter with its card (no rounds, no state)."""
        version = resolve_round(round, len(self.rounds), first=1)
        stored, compression = self._packed(version, max_rank)
        header = {"base_model": self.base.portable_id, "module_sha256": self.base.module_sha256, "round": version,
                  "increment": False, "layers": list(self.config.layers)}
        save_adapter(save_directory, self.layout, stored, self.base.portable_id, self.base.revision, header)
        atomic_write_text(Path(save_directory) / CARD_FILE, self._card_text(version, None, compression))
        return compression

    def save_merged(self, save_directory: str | Path, round: int | None = None) -> None:
        """Write a full model with the deltas up to ``round`` merged in (safetensors), and its tokenizer."""
        merged = self.merge(round)
        merged.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    branch: str | None = None, create_pr: bool = False, max_rank: int | None = None,
                    license: str | None = None) -> list[PushedRound]:
        """Push every round not yet on the Hub as one commit (adapters, increment, manifest, state, card)
        followed by a tag ``round-N`` on it.

        Args:
            repo_id: ``namespace/name``, or ``name`` for the token's own namespace; created if missing.
            commit_message, commit_description: per commit; ``{round}`` is replaced by the round.
            private: visibility when the repository is created.
            token: Hub token (default: ``HF_TOKEN`` or the stored login).
            revision: the branch to push to (default ``main``; created if missing, from the branch point in
                ``lineage`` when this session was started from a version of the same repository). ``branch``
                is an alias. Rounds on a branch other than ``main`` are tagged ``<branch>/round-N``.
            create_pr: open a pull request with the new versions instead (no tags until merged).
            max_rank: truncate the cumulative adapters (lossy; the cards say so and by how much).
            license: the license to publish under; required when the base model's is unknown.

        A push that fails leaves the Hub at its last complete round and the session untouched; the next
        push resumes. Pushing again with nothing new is a no-op.

        Raises:
            LicenseRequiredError: the base model's license is unknown and ``license`` is not given.
            HubError: the Hub refused (the reason and request id are in the message).
        """
        if branch is not None and revision is not None and branch != revision:
            raise ConfigError(f"revision={revision!r} and branch={branch!r} name different branches; give one")
        if license:
            self.base.license = license
        if not self.base.license:
            raise LicenseRequiredError(
                f"the license of the base model {self.base.portable_id} is unknown, and an edit is published under "
                "its base's terms: pass license='…' (e.g. the base's license identifier, such as 'apache-2.0')")
        parent = self.lineage.get("parent") or {}
        start = (parent["source"], parent.get("commit") or parent.get("revision")) \
            if parent.get("commit") or parent.get("revision") else None
        options = PushOptions(commit_message=commit_message, commit_description=commit_description, private=private,
                              token=token, revision=revision or branch or "main", create_pr=create_pr,
                              branch_start=start, inherited=self._branch_point)
        self._card_branch, self._publishing = options.revision, True
        try:
            return push_versions(
                repo_id, len(self.rounds),
                write_version=lambda version, folder: self.save_pretrained(folder, round=version, max_rank=max_rank,
                                                                           repo_id=repo_id),
                report_of=lambda version: json.loads(json.dumps(self.rounds[version - 1].to_dict())),
                options=options)
        finally:
            self._card_branch, self._publishing = "main", False

    def card(self, round: int | None = None, repo_id: str | None = None) -> ModelCard:
        """The model card of the version after ``round`` (default: the latest), for an exact adapter."""
        version = resolve_round(round, len(self.rounds))
        return self._build_card(version, repo_id, self._packed(version, None)[1])

    def _packed(self, version: int, max_rank: int | None) -> tuple[dict, list[CompressionReport]]:
        cumulative = {layer: f for layer in self.config.layers if (f := self.deltas.cumulative(layer, version))}
        if not cumulative:
            return no_update(self.layout, self.config.layers[0]), []
        return pack(self.layout, cumulative, max_rank)

    def _build_card(self, version: int, repo_id: str | None, compression: list[CompressionReport]) -> ModelCard:
        return build_card(self._meta(version, compression), self.rounds[:version], repo_id=repo_id,
                          metrics=self.evaluations.get(version), compression=compression,
                          tags=[tag_name(self._card_branch if k > self._branch_point else "main", k)
                                for k in range(version + 1)])

    @property
    def _branch_point(self) -> int:
        return int((self.lineage.get("parent") or {}).get("round", 0))

    def _card_text(self, version: int, repo_id: str | None, compression: list[CompressionReport]) -> str:
        return str(self._build_card(version, repo_id, compression))

    def _meta(self, version: int, compression: list[CompressionReport]) -> SessionMeta:
        spec = self.stats_spec
        stats = {"corpus": spec.corpus, "n_samples": spec.n_samples, "sample_length": spec.sample_length,
                 "seed": spec.seed, "model_sha256": spec.model_fingerprint, "sha256": dict(self._stats_sha256)}
        evaluations = {str(v): [dataclasses.asdict(m) for m in metrics]
                       for v, metrics in sorted(self.evaluations.items()) if v <= version}
        adapter = {"lossy": any(r.lossy for r in compression),
                   "modules": [dataclasses.asdict(r) for r in compression]}
        base = self.base.published() if self._publishing else self.base
        return SessionMeta(base=base, config=self.config, context_templates=self.context_templates, stats=stats,
                           rounds=version, nse_hub_version=__version__, evaluations=evaluations,
                           adapter=adapter, lineage=_lineage_upto(self.lineage, version),
                           engine={"norm_anchor": self.engine.norm_anchor}
                           if self.engine.norm_anchor is not None and version else {})

    # --- history ----------------------------------------------------------------------------------------

    def as_version(self, label: str = "this session") -> Version:
        """This session's history as a :class:`~nse_hub.lineage.Version` (for diffs and merges)."""
        return Version(label, self.base, self.config, list(self.rounds), copy.deepcopy(self.lineage),
                       list(self._values))

    def diff(self, other: EditSession | Version, probe: bool = False, max_new_tokens: int = 8) -> HistoryDiff:
        """The facts added, removed and changed from this version to ``other`` (same base model).

        With ``probe`` (``other`` must be a session), each changed fact's prompt is answered by both versions:
        greedy continuation and the probabilities of the new and old answers.

        Raises:
            BaseModelMismatchError: ``other`` was made on another base model (both fingerprints named).
        """
        theirs = other.as_version("other") if isinstance(other, EditSession) else other
        result = diff_versions(self.as_version(), theirs)
        if probe:
            if not isinstance(other, EditSession):
                raise ConfigError("probing a diff needs both versions loaded: pass an EditSession")
            result = probe_diff(result, (self.model, self.tokenizer, self.layout),
                                (other.model, other.tokenizer, other.layout), max_new_tokens, self.config.batch_size)
        return result

    def merge_history(self, other: EditSession | Version, prefer: Side | None = None,
                      resolutions: dict[Any, Side] | None = None, progress: bool = False) -> MergePlan:
        """Merge another branch of this history into this session: its rounds after the common ancestor are
        re-applied on top of this version as new rounds.

        NSE rounds reuse their stored value targets (computed on the original weights, so valid on top of
        any history) and only solve again; the other methods, and rounds saved without values, optimise them
        again. Conflicts (a fact written with different targets on both branches) are found before anything
        is written and resolved per conflict (``resolutions``, keyed by ``(subject, prompt template)``, the
        subject, or the prompt) or by ``prefer``: ``"ours"`` drops the other branch's write, ``"theirs"``
        re-applies it on top. The merge is recorded in ``lineage`` (and so in cards).

        Returns:
            the plan that was carried out (rounds, conflicts with their resolutions).

        Raises:
            HistoryConflictError: conflicts left unresolved (all listed); nothing was written.
            BaseModelMismatchError: ``other`` was made on another base model.
            ConfigError: ``other`` used another method or other edit layers.
        """
        theirs = other.as_version("theirs") if isinstance(other, EditSession) else other
        plan = plan_merge(self.as_version("ours"), theirs, prefer, resolutions)
        record: dict[str, Any] = {"from": theirs.label, "ancestor": plan.ancestor, "rounds": [],
                                  "conflicts": [c.to_dict() for c in plan.conflicts]}
        for planned in plan.rounds:
            if not planned.requests:
                continue
            values = ValueResult.from_tensors(planned.values) if planned.values is not None else None
            report = self._apply(planned.requests, progress, values)
            record["rounds"].append({"round": report.round, "source_round": planned.source_round,
                                     "digest": planned.digest, "merged_digest": report_digest(report),
                                     "values": "reused" if values is not None else "recomputed",
                                     "dropped": len(planned.dropped)})
        self.lineage.setdefault("merges", []).append(record)
        return plan

    def compute_statistics(self, progress: bool = True) -> dict[str, Path]:
        """Measure this session's second moments now (or find them cached) and return where they are cached,
        per module.

        Run under ``torchrun`` / ``accelerate launch`` with a process group initialised, the pass is
        data-parallel: each process reads its share of the corpus and rank 0 writes the files (see
        :mod:`nse_hub.stats`); every process returns the same paths.
        """
        with self.deltas.original():
            if self._second_moments is None:
                self._second_moments = self._load_second_moments(progress)
        return {self.layout.projection_name(layer): self.stats_spec.path(self.layout, layer)
                for layer in self.config.layers}

    def push_statistics(self, repo_id: str, token: str | bool | None = None, private: bool | None = None) -> str:
        """Upload this session's second moments to a Hub dataset repo (measured first if needed); returns the
        folder in the repo. Sessions started with ``stats_repo=repo_id`` then download instead of measuring."""
        with self.deltas.original():
            if self._second_moments is None:
                self._second_moments = self._load_second_moments(progress=False)
        return push_statistics(repo_id, self.stats_spec, self.layout, self.config.layers, token=token,
                               private=private)

    def __repr__(self) -> str:
        return (f"EditSession({self.base.name_or_path!r}, method={self.config.method!r}, "
                f"layers={list(self.config.layers)}, rounds={len(self.rounds)})")


def _setting_words(suggestion: Suggestion) -> str:
    """A suggested change as ``from_pretrained`` arguments (and the command line's spelling)."""
    changes = suggestion.changes
    words = [f"{key}={value!r}" for key, value in changes.get("hparams", {}).items()]
    if "dtype" in changes:
        words.append(f"dtype={changes['dtype']!r}")
    if "batch_size" in changes:
        words.append(f"rounds of {changes['batch_size']} edits")
    return f"{', '.join(words)} ({suggestion.setting}: {_size(suggestion.peak_bytes)})"


def _size(count: int | None) -> str:
    return "unknown memory" if count is None else (f"{gib(count)} GiB" if count >= 2**30 else
                                                   f"{count / 2**20:.0f} MiB")


def _lineage_upto(lineage: dict[str, Any], version: int) -> dict[str, Any]:
    """The lineage of the version after ``version`` rounds: merges of later rounds are left out."""
    out = copy.deepcopy(lineage)
    if (out.get("parent") or {}).get("round", 0) > version:
        out.pop("parent")
    merges = []
    for merge in out.get("merges", []):
        merge["rounds"] = [r for r in merge.get("rounds", []) if r["round"] <= version]
        if merge["rounds"]:
            merges.append(merge)
    if merges:
        out["merges"] = merges
    else:
        out.pop("merges", None)
    return out
