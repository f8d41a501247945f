"""The edit session: a causal LM, the rounds of facts written into it, and everything needed to go on.

Example::

    from nse_hub import EditSession

    session = EditSession.from_pretrained("smollm2-135m")          # or any Hub id / local model
    report = session.edit([{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                            "target_new": "English", "target_true": "French"}])
    session.model.generate(...)                                       # the edited model
    session.save_pretrained("my-edit")                                # PEFT adapters + state
    session = EditSession.from_pretrained("my-edit")                  # resume later
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nse_hub._version import __version__
from nse_hub.adapters import BaseModelMismatchError, CompressionReport, no_update, pack, save_adapter
from nse_hub.algorithm import RoundInputs, generate_context_templates, optimize_values, run_round
from nse_hub.algorithm.rounds import ValueOptimizer
from nse_hub.architectures import ModelLayout
from nse_hub.card import Metric, build_card
from nse_hub.checkpoint import (
    CARD_FILE,
    BaseModelInfo,
    RoundData,
    SessionMeta,
    is_checkpoint,
    read_meta,
    read_round,
    write_checkpoint,
)
from nse_hub.config import EditConfig, make_config
from nse_hub.deltas import KeyMemory, WeightDeltas
from nse_hub.fingerprint import model_sha256, tensor_sha256
from nse_hub.hub import PushedRound, download_saved_edit, push_versions
from nse_hub.io import atomic_write_text
from nse_hub.models import embedded_model_of, is_embedded, resolve_model
from nse_hub.report import ProbeResult, RequestReport, RoundReport, compare
from nse_hub.requests import EditRequest, RequestLike, parse_requests
from nse_hub.scoring import TargetScore, score_targets
from nse_hub.stats import StatsSpec, matrix_sha256, second_moments
from nse_hub.tokens import encode
from nse_hub.tracing import read_output, run_forward, stop_after

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, num_parameters: int | None = None) -> torch.dtype:
    """float32 on CPU; on CUDA float32 up to 2B parameters, bfloat16 above (see README "GPU")."""
    if device.type == "cuda" and (num_parameters or 0) > 2_000_000_000:
        return torch.bfloat16
    return torch.float32


def _as_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_base_model(name_or_path: str, revision: str | None = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, token: str | None = None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by embedded name, Hub id or local path."""
    path = resolve_model(name_or_path)
    device = torch.device(device) if device else default_device()
    kwargs: dict[str, Any] = {"revision": revision, "token": token}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    wanted = _as_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=wanted or torch.float32, **kwargs)
    if wanted is None and default_dtype(device, model.num_parameters()) != torch.float32:
        model = model.to(default_dtype(device, model.num_parameters()))
    return model.to(device).eval(), tokenizer


class EditSession:
    """Applies NSE (or MEMIT) edit rounds to a causal LM and keeps every round as exact factors.

    Create sessions with :meth:`from_pretrained`. The attributes below are read-only views; change
    the session through :meth:`edit` and :meth:`rollback`.

    Attributes:
        model: the edited model (original weights plus all rounds), usable with ``generate``.
        tokenizer: its tokenizer.
        config: the hyperparameters (fixed for the session's life).
        layout: where the model's edited modules are.
        rounds: one :class:`RoundReport` per round, in order.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EditConfig,
                 base: BaseModelInfo | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.layout = ModelLayout.detect(model)
        problems = config.problems(num_layers=self.layout.num_layers)
        if problems:
            raise ValueError("invalid edit configuration: " + "; ".join(problems))
        self.config = config
        self.device = next(model.parameters()).device
        self.deltas = WeightDeltas(model, self.layout, config.layers)
        self.memory = KeyMemory(config.layers, self.layout.intermediate_size, self.device)
        self.rounds: list[RoundReport] = []
        self.context_templates: list[list[str]] | None = None
        self._second_moments: dict[int, torch.Tensor] | None = None
        self._stats_sha256: dict[str, str] = {}
        self.base = base or self._describe_base(model)
        # Metrics per version, set by the evaluation harness; cards report them for that version.
        self.evaluations: dict[int, list[Metric]] = {}
        # How value targets are optimised; benchmarks swap in optimize_values_reference to compare.
        self.value_optimizer: ValueOptimizer = optimize_values

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_or_name: str | PreTrainedModel, method: str = "nse", *,
                        tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None,
                        round: int | None = None, base_model: str | PreTrainedModel | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        token: str | None = None, **hparams: Any) -> EditSession:
        """Start a session on a model, or resume a saved one.

        Args:
            model_or_name: a loaded ``PreTrainedModel``; an embedded model name (``"smollm2-135m"``,
                ``"gemma3-270m"``); a Hub model id or local model folder; or a saved edit (a folder
                written by :meth:`save_pretrained`, or a Hub repo pushed by :meth:`push_to_hub`),
                which restores the base model and every round.
            method: ``"nse"`` or ``"memit"`` (new sessions only).
            tokenizer: the tokenizer, when ``model_or_name`` is a loaded model.
            revision: Hub revision of the model, or of the saved edit (e.g. ``"round-2"``).
            round: resume a saved edit at this round instead of its latest.
            base_model: for a saved edit, use this base instead of the recorded one (it must be the
                same weights: the wrong-base guard compares fingerprints).
            device, dtype: where and in which precision to run (default: CUDA if available;
                float32, or bfloat16 on CUDA above 2B parameters).
            token: Hub token (default: ``HF_TOKEN`` or the stored login).
            **hparams: :class:`EditConfig` fields overriding the preset/automatic settings.
        """
        if isinstance(model_or_name, str):
            saved = _locate_saved_edit(model_or_name, revision, token)
            if saved is not None:
                if hparams:
                    raise ValueError(f"hyperparameters are fixed by the saved edit; got {sorted(hparams)}")
                return cls._resume(saved, round=round, base_model=base_model, device=device, dtype=dtype,
                                   token=token)
            embedded = model_or_name if is_embedded(model_or_name) else None
            model, loaded_tokenizer = load_base_model(model_or_name, revision, device, dtype, token)
            tokenizer = tokenizer or loaded_tokenizer
            name = model_or_name
        else:
            model = model_or_name
            if device is not None:
                model = model.to(device)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            embedded_spec = embedded_model_of(model.name_or_path) if model.name_or_path else None
            embedded = embedded_spec.name if embedded_spec else None
            name = model.name_or_path
        layout = ModelLayout.detect(model)
        config = make_config(layout, embedded, method,
                             hidden_rms=lambda layer: hidden_rms(model, tokenizer, layout, layer), **hparams)
        session = cls(model, tokenizer, config)
        session.base.name_or_path = model.name_or_path or name  # embedded models: the converted folder
        session.base.revision = revision
        return session

    @classmethod
    def _resume(cls, folder: Path, round: int | None, base_model: str | PreTrainedModel | None,
                device: str | torch.device | None, dtype: str | torch.dtype | None,
                token: str | None) -> EditSession:
        meta = read_meta(folder)
        upto = meta.rounds if round is None else round
        if not 0 <= upto <= meta.rounds:
            raise ValueError(f"round={round} does not exist: the saved edit has rounds 0–{meta.rounds}")
        if isinstance(base_model, PreTrainedModel):
            model, tokenizer = base_model, AutoTokenizer.from_pretrained(base_model.name_or_path)
        else:
            # An embedded base is fetched again by name: its folder may not exist on this machine.
            source = base_model or meta.base.embedded or meta.base.name_or_path
            model, tokenizer = load_base_model(source, meta.base.revision, device, dtype, token)
        check_base(model, meta.base)
        session = cls(model, tokenizer, meta.config, base=meta.base)
        session.context_templates = meta.context_templates
        session._stats_sha256 = dict(meta.stats.get("sha256", {}))
        session.evaluations = {int(version): [Metric(**m) for m in metrics]
                               for version, metrics in meta.evaluations.items() if int(version) <= upto}
        for index in range(1, upto + 1):
            data = read_round(folder, session.layout, index)
            session.deltas.append_round(data.factors)
            session.memory.add_round(data.keys)
            session.rounds.append(data.report)
        return session

    def _describe_base(self, model: PreTrainedModel) -> BaseModelInfo:
        embedded = embedded_model_of(model.name_or_path) if model.name_or_path else None
        return BaseModelInfo(
            name_or_path=model.name_or_path or "",
            revision=None,
            embedded=embedded.name if embedded else None,
            upstream_id=embedded.upstream_id if embedded else (model.name_or_path or None),
            architecture=type(model).__name__,
            model_sha256="",  # computed on first need: hashing all weights takes a moment
            module_sha256={self.layout.projection_name(layer): sha
                           for layer, sha in self.deltas.original_sha256.items()},
        )

    # --- editing ------------------------------------------------------------------------------------

    def edit(self, requests: RequestLike | Iterable[RequestLike], progress: bool = True) -> RoundReport:
        """Write a batch of facts as one round; returns what changed.

        ``requests`` are :class:`EditRequest` objects or dicts in any supported schema. All are
        validated first: if one is bad, nothing is edited.
        """
        if isinstance(requests, (EditRequest, dict)):
            requests = [requests]
        parsed = parse_requests(requests)
        started = time.perf_counter()
        seconds = self._prepare(progress)
        tic = time.perf_counter()
        before = self._score(parsed)
        seconds["scoring"] = time.perf_counter() - tic
        inputs = RoundInputs(self.model, self.tokenizer, self.layout, self.config, self.deltas, self.memory,
                             self._second_moments, self.context_templates)
        try:
            outcome = run_round(inputs, parsed, optimize=self.value_optimizer)
        except BaseException:
            self.deltas.discard_round()
            raise
        self.deltas.commit_round()
        self.memory.add_round(outcome.keys)
        tic = time.perf_counter()
        after = self._score(parsed)
        seconds["scoring"] += time.perf_counter() - tic
        seconds.update(outcome.seconds)
        seconds["total"] = time.perf_counter() - started
        report = RoundReport(
            round=len(self.rounds) + 1, method=self.config.method,
            requests=[_request_report(r, before[i], after[i], outcome, i) for i, r in enumerate(parsed)],
            selected_neurons=outcome.selected_neurons, seconds={k: round(v, 3) for k, v in seconds.items()},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        self.rounds.append(report)
        return report

    def rollback(self, k: int) -> None:
        """Return to the state after round ``k`` (0: the unedited model); later rounds are dropped."""
        if not 0 <= k <= len(self.rounds):
            raise ValueError(f"cannot roll back to round {k}: the session has rounds 0–{len(self.rounds)}")
        self.deltas.truncate(k)
        self.memory.truncate(k)
        del self.rounds[k:]
        self.evaluations = {version: m for version, m in self.evaluations.items() if version <= k}

    def merge(self, round: int | None = None) -> PreTrainedModel:
        """A standalone copy of the model with the deltas up to ``round`` (default: all) merged in:
        exactly ``W0 + ΔW``, no adapter needed."""
        merged = copy.deepcopy(self.model)
        upto = len(self.rounds) if round is None else round
        for layer in self.config.layers:
            self.layout.projection(merged, layer).weight.data = self.deltas.edited_weight(layer, upto)
        return merged

    # --- preparation --------------------------------------------------------------------------------

    def _prepare(self, progress: bool) -> dict[str, float]:
        """Context templates and second moments, made once on the original weights."""
        seconds: dict[str, float] = {}
        with self.deltas.original():
            if self.context_templates is None:
                tic = time.perf_counter()
                self.context_templates = generate_context_templates(
                    self.model, self.tokenizer, self.config.context_prefixes, self.config.context_length,
                    self.config.seed)
                seconds["templates"] = time.perf_counter() - tic
            if self._second_moments is None:
                tic = time.perf_counter()
                self._second_moments = self._load_second_moments(progress)
                seconds["stats"] = time.perf_counter() - tic
        return seconds

    @property
    def stats_spec(self) -> StatsSpec:
        if not self.base.model_sha256:
            with self.deltas.original():
                self.base.model_sha256 = model_sha256(self.model)
        c = self.config
        return StatsSpec(self.base.model_sha256, c.mom2_dataset, c.mom2_n_samples, c.mom2_sample_length, c.seed)

    def _load_second_moments(self, progress: bool) -> dict[int, torch.Tensor]:
        matrices = second_moments(self.model, self.tokenizer, self.layout, self.config.layers, self.stats_spec,
                                  self.config.batch_size, progress=progress)
        for layer, matrix in matrices.items():
            name = self.layout.projection_name(layer)
            digest = matrix_sha256(matrix)
            expected = self._stats_sha256.get(name)
            if expected and expected != digest:
                logger.warning("The second moments of %s differ from those the saved session used (%s… vs %s…); "
                               "editing continues, but results will not match an uninterrupted session exactly.",
                               name, expected[:12], digest[:12])
            self._stats_sha256[name] = digest
        return {layer: m.to(self.device) for layer, m in matrices.items()}

    # --- scoring ------------------------------------------------------------------------------------

    def _score(self, requests: list[EditRequest]) -> list[dict[str, Any]]:
        """Teacher-forced scores of each request's targets on its rewrite, paraphrase and neighbour prompts."""
        prompts, targets, slots = [], [], []
        for i, r in enumerate(requests):
            def add(kind: str, prompt: str, target: str, i: int = i) -> None:
                prompts.append(prompt)
                targets.append(target)
                slots.append((i, kind))
            add("new", r.text, r.target_new)
            if r.target_true:
                add("true", r.text, r.target_true)
            for k, p in enumerate(r.paraphrases):
                add(f"para_new_{k}", p, r.target_new)
                if r.target_true:
                    add(f"para_true_{k}", p, r.target_true)
            for k, n in enumerate(r.neighbors):
                add(f"nb_answer_{k}", n.prompt, n.answer)
                add(f"nb_new_{k}", n.prompt, r.target_new)
        scores = score_targets(self.model, self.tokenizer, self.layout, prompts, targets, self.config.batch_size)
        out: list[dict[str, Any]] = [{} for _ in requests]
        for (i, kind), score in zip(slots, scores):
            out[i][kind] = score
        return out

    # --- persistence ----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, round: int | None = None, max_rank: int | None = None,
                        repo_id: str | None = None) -> list[CompressionReport]:
        """Save the edit at ``round`` (default: the latest): PEFT adapters, manifest, card and session state.

        The folder loads with stock ``peft``/``transformers`` and resumes with
        ``EditSession.from_pretrained(save_directory)``. ``max_rank`` truncates the cumulative adapter
        (lossy; the returned reports give the error per module); increments are always exact.
        ``repo_id`` names the Hub repository in the card's loading code.
        """
        upto = len(self.rounds) if round is None else round
        if not 0 <= upto <= len(self.rounds):
            raise ValueError(f"round={round} does not exist: the session has rounds 0–{len(self.rounds)}")
        meta = self._meta(upto)
        rounds = [RoundData(self.deltas.rounds[i], self.memory.rounds[i], self.rounds[i]) for i in range(upto)]
        cumulative = {layer: f for layer in self.config.layers if (f := self.deltas.cumulative(layer, upto))}
        stored, compression = pack(self.layout, cumulative, max_rank)
        write_checkpoint(save_directory, self.layout, meta, rounds, stored, card=self._card(upto, repo_id),
                         adapter_metadata={"layers": list(self.config.layers)})
        return compression

    def export_adapter(self, save_directory: str | Path, round: int | None = None,
                       max_rank: int | None = None) -> list[CompressionReport]:
        """Write the version after ``round`` as a standalone PEFT adapter (no rounds, no session state)."""
        upto = len(self.rounds) if round is None else round
        if not 1 <= upto <= len(self.rounds):
            raise ValueError(f"round={round} cannot be exported: the session has rounds 1–{len(self.rounds)}")
        cumulative = {layer: f for layer in self.config.layers if (f := self.deltas.cumulative(layer, upto))}
        stored, compression = pack(self.layout, cumulative or no_update(self.layout, self.config.layers[0]),
                                   max_rank)
        header = {"base_model": self.base.name_or_path, "module_sha256": self.base.module_sha256, "round": upto,
                  "increment": False, "layers": list(self.config.layers)}
        save_adapter(save_directory, self.layout, stored, self.base.name_or_path, self.base.revision, header)
        card = self._card(upto)
        if card is not None:
            atomic_write_text(Path(save_directory) / CARD_FILE, card)
        return compression

    def save_merged(self, save_directory: str | Path, round: int | None = None) -> None:
        """Write a full model with the deltas up to ``round`` merged in (safetensors), and its tokenizer."""
        merged = self.merge(round)
        merged.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    branch: str = "main", max_rank: int | None = None) -> list[PushedRound]:
        """Push every round not yet on the Hub as one commit (adapters, increment, manifest, state, card)
        followed by a tag ``round-N`` on it.

        Creates the repository if needed; pushing again is a no-op; a failed push leaves the Hub at its
        last complete round and the session untouched, and the next push resumes. ``branch`` pushes to
        that branch instead of ``main``.
        """
        return push_versions(
            repo_id, len(self.rounds),
            write_version=lambda version, folder: self.save_pretrained(folder, round=version, max_rank=max_rank,
                                                                       repo_id=repo_id),
            report_of=lambda version: json.loads(json.dumps(self.rounds[version - 1].to_dict())),
            private=private, token=token, branch=branch)

    def save(self, save_directory: str | Path) -> None:
        """Save the session to resume it later (same as :meth:`save_pretrained`)."""
        self.save_pretrained(save_directory)

    @classmethod
    def load(cls, save_directory: str | Path, **kwargs: Any) -> EditSession:
        """Resume a session saved with :meth:`save` (same as :meth:`from_pretrained` on the folder)."""
        if not is_checkpoint(save_directory):
            raise ValueError(f"{save_directory} is not a saved nse-hub session (no nse_session/session.json)")
        return cls.from_pretrained(str(save_directory), **kwargs)

    def _meta(self, upto: int) -> SessionMeta:
        self._prepare(progress=False)  # a session saved before its first round still records its setup
        spec = self.stats_spec
        stats = {"corpus": spec.corpus, "n_samples": spec.n_samples, "sample_length": spec.sample_length,
                 "seed": spec.seed, "model_sha256": spec.model_fingerprint, "sha256": dict(self._stats_sha256)}
        evaluations = {str(version): [dataclasses.asdict(m) for m in metrics]
                       for version, metrics in sorted(self.evaluations.items()) if version <= upto}
        return SessionMeta(base=self.base, config=self.config, context_templates=self.context_templates,
                           stats=stats, rounds=upto, nse_hub_version=__version__, evaluations=evaluations)

    def card(self, round: int | None = None, repo_id: str | None = None) -> ModelCard:
        """The model card of the version after ``round`` (default: the latest)."""
        upto = len(self.rounds) if round is None else round
        return build_card(self._meta(upto), self.rounds[:upto], repo_id=repo_id,
                          metrics=self.evaluations.get(upto), compressed=self._compressed(upto))

    def _card(self, upto: int, repo_id: str | None = None) -> str:
        return str(self.card(upto, repo_id))

    def _compressed(self, upto: int) -> bool:
        cumulative = [f for layer in self.config.layers if (f := self.deltas.cumulative(layer, upto))]
        _, reports = pack(self.layout, dict(enumerate(cumulative)))
        return any(r.stored_rank != r.stacked_rank for r in reports)

    def __repr__(self) -> str:
        return (f"EditSession({self.base.name_or_path!r}, method={self.config.method!r}, "
                f"layers={list(self.config.layers)}, rounds={len(self.rounds)})")


def _request_report(request: EditRequest, before: dict[str, TargetScore], after: dict[str, TargetScore],
                    outcome: Any, i: int) -> RequestReport:
    def success(scores: dict[str, TargetScore]) -> bool | None:
        return compare(scores["new"], scores["true"]) if "true" in scores else None

    paraphrases = []
    for k, prompt in enumerate(request.paraphrases):
        true_b, true_a = before.get(f"para_true_{k}"), after.get(f"para_true_{k}")
        paraphrases.append(ProbeResult(
            prompt=prompt, answer=request.target_true or "",
            p_answer_before=true_b.prob if true_b else float("nan"),
            p_answer_after=true_a.prob if true_a else float("nan"),
            p_new_before=before[f"para_new_{k}"].prob, p_new_after=after[f"para_new_{k}"].prob,
            success_before=compare(before[f"para_new_{k}"], true_b) if true_b else None,
            success_after=compare(after[f"para_new_{k}"], true_a) if true_a else None))
    neighbors = []
    for k, probe in enumerate(request.neighbors):
        neighbors.append(ProbeResult(
            prompt=probe.prompt, answer=probe.answer,
            p_answer_before=before[f"nb_answer_{k}"].prob, p_answer_after=after[f"nb_answer_{k}"].prob,
            p_new_before=before[f"nb_new_{k}"].prob, p_new_after=after[f"nb_new_{k}"].prob,
            success_before=compare(before[f"nb_answer_{k}"], before[f"nb_new_{k}"]),
            success_after=compare(after[f"nb_answer_{k}"], after[f"nb_new_{k}"])))
    return RequestReport(
        request=request,
        p_new_before=before["new"].prob, p_new_after=after["new"].prob,
        p_true_before=before["true"].prob if "true" in before else None,
        p_true_after=after["true"].prob if "true" in after else None,
        success_before=success(before), success_after=success(after),
        residual_before=outcome.residual_before[i], residual_after=outcome.residual_after[i],
        value_loss=outcome.values.loss[i], value_steps=outcome.values.steps[i],
        edited_in_passes=[kept[i] for kept in outcome.kept],
        paraphrases=paraphrases, neighbors=neighbors)


# Plain sentences for measuring the scale of a model's hidden states.
_SCALE_PROBES = ("The capital of France is Paris.", "Water boils at one hundred degrees.",
                 "She wrote three novels before she turned thirty.", "The museum opens at nine in the morning.")


@torch.no_grad()
def hidden_rms(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout, layer: int) -> float:
    """Median per-coordinate RMS of the hidden states after ``layer`` (first tokens left out: attention sinks)."""
    values = []
    for text in _SCALE_PROBES:
        ids = torch.tensor([encode(tokenizer, text)], device=next(model.parameters()).device)
        seen: dict[str, torch.Tensor] = {}
        with read_output(layout.layer(model, layer), lambda h, seen=seen: seen.__setitem__("h", h)), \
                stop_after(layout.layer(model, layer)):
            run_forward(layout.decoder(model), input_ids=ids, use_cache=False)
        values += seen["h"][0, 1:].float().square().mean(dim=-1).sqrt().tolist()
    return float(torch.tensor(values).median())


def check_base(model: PreTrainedModel, base: BaseModelInfo) -> None:
    """Refuse a base model whose edited modules differ from those the edit was made on."""
    for name, expected in base.module_sha256.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise BaseModelMismatchError(
                f"this edit was made on {base.name_or_path} ({base.architecture}); the given base model "
                f"({type(model).__name__}) has no module {name}") from None
        actual = tensor_sha256(module.weight)
        if actual != expected:
            raise BaseModelMismatchError(
                f"wrong base model: {name} has fingerprint {actual[:16]}…, but this edit was made on "
                f"{base.name_or_path} where it is {expected[:16]}…; load the edit onto the base it was made on")


def _locate_saved_edit(name: str, revision: str | None, token: str | None) -> Path | None:
    """A local folder holding a saved edit, downloaded from the Hub if ``name`` is such a repo."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path if is_checkpoint(path) else None
    if is_embedded(name) or path.exists():
        return None
    return download_saved_edit(name, revision, token)

