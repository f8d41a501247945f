"""Sequential-editing runs: N edits in rounds of B, evaluated as they go and at the end; resumable; plotted.

A run can last longer than a working day (2000 edits on a CPU). With ``state_dir`` it saves the session
after every round (a normal saved edit) and its own progress (``run.json``: the running curve and round
timings) beside it, so that :func:`run_sequential` called again with the same arguments continues from the
last saved round instead of starting over::

    session = resume_session("smollm2-135m", "runs/nse-2000", method="nse")   # fresh, or the saved rounds
    run = run_sequential(session, requests, 100, running_every=5, state_dir="runs/nse-2000")

NSE and NSE-null optimise their value targets on the original weights, so a round's targets depend only on the
model, the value step's settings and the round's requests: a :class:`ValueStore` keeps them on disk, so that
runs of both methods share them and helper processes can compute them ahead (:func:`precompute_values`) while
the run solves — the value step is most of an NSE round's time. Each process claims the round it computes, so
none is computed twice. For the methods whose targets depend on the earlier rounds, the same store is a replay
log: a run whose saved session was lost re-solves the rounds it had made from their stored targets.

A stream of edits can write one fact twice (CounterFact's first 10,000 records hold two facts with two
targets each). A round writes each fact once, so :func:`schedule_rounds` moves a second write of a fact to
the next round — the later record still wins, as in the stream — and runs edit in that order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from nse_hub.ability import perplexity, perplexity_texts
from nse_hub.algorithm import ValueResult
from nse_hub.checkpoint import is_checkpoint
from nse_hub.errors import CheckpointError, ConfigError
from nse_hub.evaluation import FLUENCY_METRICS, METRIC_NAMES, EvalOptions, Evaluation, evaluate_session
from nse_hub.fingerprint import tensor_sha256
from nse_hub.io import atomic_path, atomic_write_json, sha256_bytes
from nse_hub.offload import read_tensor
from nse_hub.requests import EditRequest, fact_key
from nse_hub.session import EditSession

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
SESSION_DIR = "session"
FINAL_PARTS_DIR = "final-parts"  # the final evaluation's per-record measurements while it runs


@dataclass
class SequentialRun:
    """One method's sequential editing run: the running curve, the final evaluation, the time per round."""

    method: str
    batch: int
    curve: list[Evaluation]
    final: Evaluation | None
    round_seconds: list[dict[str, float]]
    devices: list[str] = dataclasses.field(default_factory=list)  # where its rounds ran, in order of use
    label: str | None = None  # the run's name where one method runs with several settings (default: the method)

    @property
    def name(self) -> str:
        return self.label or self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "label": self.label, "batch": self.batch,
                "curve": [e.to_dict() for e in self.curve],
                "final": self.final.to_dict() if self.final else None, "round_seconds": self.round_seconds,
                "devices": self.devices}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SequentialRun:
        return cls(method=data["method"], batch=int(data["batch"]),
                   curve=[Evaluation(**e) for e in data["curve"]],
                   final=Evaluation(**data["final"]) if data.get("final") else None,
                   round_seconds=list(data["round_seconds"]), devices=list(data.get("devices", [])),
                   label=data.get("label"))


def describe_device(device: torch.device) -> str:
    """The device a run's timings were taken on, in words (GPU name, or CPU threads), with torch's version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda, torch {torch.__version__})"
    return f"cpu, {torch.get_num_threads()} threads of {os.cpu_count()} cores (torch {torch.__version__})"


def resume_session(model: str, state_dir: str | Path | None, **kwargs: Any) -> EditSession:
    """The session a run continues: the one saved in ``state_dir`` if there is one, else a new one on ``model``.

    ``kwargs`` (method, hyperparameters, device) apply to a new session; a saved one keeps its own.
    """
    saved = Path(state_dir) / SESSION_DIR if state_dir else None
    if saved is not None and is_checkpoint(saved):
        device = kwargs.get("device")
        return EditSession.from_pretrained(str(saved), device=device)
    return EditSession.from_pretrained(model, **kwargs)


def schedule_rounds(requests: Sequence[EditRequest], batch: int) -> list[list[EditRequest]]:
    """``requests`` cut into rounds of at most ``batch``, in order, each fact (subject and prompt) once per round.

    A request whose fact is already in the round being filled waits for the next round, where it goes first
    (before requests that came after it). Without such repeats the rounds are the consecutive slices.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"the batch size (edits per round) must be a whole number of at least 1, got {batch!r}")
    rounds: list[list[EditRequest]] = []
    waiting: deque[EditRequest] = deque()
    upcoming = deque(requests)
    while waiting or upcoming:
        current: list[EditRequest] = []
        facts: set[tuple[str, str]] = set()
        deferred: deque[EditRequest] = deque()
        for source in (waiting, upcoming):
            while source and len(current) < batch:
                request = source.popleft()
                fact = fact_key(request)
                if fact in facts:
                    deferred.append(request)
                else:
                    facts.add(fact)
                    current.append(request)
        waiting = deferred + waiting  # what was deferred now, then what is still waiting from before
        rounds.append(current)
    return rounds


def running_sample(edits: int, size: int | None, total: int, seed: int = 0) -> list[int]:
    """Indices of the running protocol's edits after the first ``edits`` of ``total``: all of them, or ``size``.

    The sample is fixed: the first ``size`` of one seeded permutation of all ``total`` indices that are below
    ``edits`` (in edit order), so that every point of a run and every method draw from the same order.
    """
    if size is None or size >= edits:
        return list(range(edits))
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return sorted([i for i in order if i < edits][:size])


class ValueStore:
    """Value targets of rounds in a folder, one file per round, named by a hash of what determines them: the base
    model's fingerprint and dtype, :meth:`EditConfig.value_settings`, the session's context templates and the
    round's requests — and, for the methods that optimise them on the current weights (MEMIT, sequential MEMIT,
    AlphaEdit), what the weights as the earlier rounds left them follow from
    (:meth:`EditSession.trajectory_sha256`: the settings and the earlier rounds' requests and targets).

    NSE-family targets are therefore shared by every run of the same values, in any order. The other methods'
    files are a replay log: a run that lost its saved session (a new machine) and starts again with the same
    store and settings re-solves its earlier rounds from their stored targets and finds each next round's,
    instead of optimising them again — on any thread count or hardware (the weights it re-solves may differ
    from the first run's in their last bits; the targets are the first run's). Logs written before the rounds
    were keyed so are read too: their later rounds are keyed by the weights' bits (found only on the same
    hardware and thread count); :meth:`record` adds the current keys of a session's rounds.

    Processes that share a store claim a round while they compute it (a ``.lock`` file beside its targets,
    released by the system if the process dies): a run that needs a round a helper is computing waits for it, and
    helpers skip each other's rounds, so no round is computed twice. UltraEdit has no value targets.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, session: EditSession, requests: Sequence[EditRequest]) -> Path | None:
        """Where the targets of ``requests`` as the session's next round are kept; ``None`` for UltraEdit."""
        return self._path(session, requests, len(session.rounds))

    def load(self, session: EditSession, requests: Sequence[EditRequest]) -> ValueResult | None:
        """The stored targets of ``requests`` as the next round, or ``None`` when there are none (or the method
        has none)."""
        path = self._stored(session, requests, self.path(session, requests))
        return ValueResult.from_tensors(load_file(path)) if path is not None else None

    def compute(self, session: EditSession, requests: Sequence[EditRequest]) -> ValueResult | None:
        """The stored targets of ``requests``, computed and stored first when missing (or waited for, while another
        process computes them); ``None`` for UltraEdit."""
        path = self.path(session, requests)
        if path is None:
            return None
        stored = self._stored(session, requests, path)
        if stored is None:
            self._fill(session, requests, path, wait=True)
        elif stored != path:  # an older log: keep its targets under the current key
            with atomic_path(path) as tmp:
                shutil.copyfile(stored, tmp)
        return ValueResult.from_tensors(load_file(path))

    def _stored(self, session: EditSession, requests: Sequence[EditRequest], path: Path | None) -> Path | None:
        """The file holding the targets of ``requests`` as the next round: ``path`` (their current key), else the
        key of logs written before :meth:`EditSession.trajectory_sha256`; ``None`` where neither exists."""
        if path is not None and not path.is_file():
            path = self._weights_keyed_path(session, requests)
        return path if path is not None and path.is_file() else None

    def record(self, session: EditSession) -> int:
        """Store the targets of the rounds ``session`` has made (where it knows them) under their keys, so that
        a replay finds them: a session edited without this store, or whose log was keyed by the weights' bits.
        Returns how many files it added."""
        added = 0
        for index, report in enumerate(session.rounds):
            targets = session.value_targets(index + 1)
            path = self._path(session, [r.request for r in report.requests], index)
            if targets is not None and path is not None and not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file(targets.to_tensors(), tmp)
                added += 1
        return added

    def _path(self, session: EditSession, requests: Sequence[EditRequest], earlier: int) -> Path | None:
        """Where the targets of ``requests`` as round ``earlier + 1`` of ``session`` are kept."""
        if not session.config.computes_values:
            return None
        identity = self._identity(session, requests)
        if not session.config.nse_family and earlier:  # round 1 starts from the base model, in the identity
            trajectory = session.trajectory_sha256(earlier)
            if trajectory is None:  # an earlier round's targets are unknown: only the weights say where it is
                return self._weights_keyed_path(session, requests) if earlier == len(session.rounds) else None
            identity["earlier_rounds"] = trajectory
        return self._file(identity)

    def _weights_keyed_path(self, session: EditSession, requests: Sequence[EditRequest]) -> Path | None:
        """Where logs before :meth:`EditSession.trajectory_sha256` kept a round's targets: keyed by the bits of
        the edit layers' weights (``None`` for the methods whose targets do not depend on them)."""
        if not session.config.computes_values or session.config.nse_family:
            return None
        return self._file({**self._identity(session, requests), "edited_weights": edited_weights_sha256(session)})

    @staticmethod
    def _identity(session: EditSession, requests: Sequence[EditRequest]) -> dict:
        session.prepare(progress=False, statistics=False)
        return {"model": session.stats_spec.model_fingerprint, "dtype": str(session.model.dtype),
                "settings": session.config.value_settings(), "templates": session.context_templates,
                "requests": [r.to_dict() for r in requests]}

    def _file(self, identity: dict) -> Path:
        digest = sha256_bytes(json.dumps(identity, sort_keys=True, default=list).encode())
        return self.folder / f"{digest[:32]}.safetensors"

    def compute_unclaimed(self, session: EditSession, requests: Sequence[EditRequest]) -> bool:
        """Compute and store the targets of ``requests`` unless they are stored or another process is computing
        them. Returns whether this call computed them."""
        path = self.path(session, requests)
        return path is not None and not path.is_file() and self._fill(session, requests, path, wait=False)

    @staticmethod
    def _fill(session: EditSession, requests: Sequence[EditRequest], path: Path, *, wait: bool) -> bool:
        """Store the targets at ``path`` under its claim; whether this call computed them. Without ``wait`` a
        round that another process has claimed is left to it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = path.with_suffix(".lock")
        claim = FileLock(lock_file)
        try:
            claim.acquire(timeout=0)
        except Timeout:
            if not wait:
                return False
            logger.info("waiting for another process to store the value targets %s", path.name)
            claim.acquire()
        try:
            if path.is_file():  # stored by the process this one waited for
                return False
            values = session.compute_values(requests, progress=False)
            with atomic_path(path) as tmp:
                save_file(values.to_tensors(), tmp)
            return True
        finally:
            if path.is_file():  # whoever claims it later finds the targets stored: the claim's file may go
                lock_file.unlink(missing_ok=True)
            claim.release()


def edited_weights_sha256(session: EditSession) -> str:
    """Fingerprint of the weights of the session's edit projections as they are now (earlier rounds included)."""
    digest = hashlib.sha256()
    for layer in session.config.layers:
        tensor_sha256(read_tensor(session.model, f"{session.layout.projection_name(layer)}.weight"), digest)
    return digest.hexdigest()


def precompute_values(session: EditSession, requests: Sequence[EditRequest], batch: int, store: ValueStore,
                      rounds: Sequence[int] | None = None) -> int:
    """Compute and store the value targets of a run's rounds (``rounds``: their indices, in the order to do them;
    default: all, first to last), skipping those stored or being computed by another process, so that any
    number of helpers and the run itself can share one store. Returns how many it computed.

    Raises:
        ConfigError: the session's method does not compute its targets on the original weights.
    """
    if not session.config.nse_family:
        raise ConfigError(f"only NSE-family methods (nse, nse_null) can compute value targets ahead; "
                          f"{session.config.method!r} computes them on the weights its earlier rounds leave")
    schedule = schedule_rounds(requests, batch)
    computed = 0
    for index in (range(len(schedule)) if rounds is None else rounds):
        if store.compute_unclaimed(session, schedule[index]):
            computed += 1
            logger.info("values of round %d/%d stored", index + 1, len(schedule))
    return computed


def run_sequential(session: EditSession, requests: Sequence[EditRequest], batch: int, *, running: bool = True,
                   running_every: int = 1, running_sample_size: int | None = None,
                   options: EvalOptions | None = None, suite: str | Path | None = None,
                   suite_examples: int = 100, progress: bool = False, probes: Literal["all", "rewrite"] = "all",
                   state_dir: str | Path | None = None, values: ValueStore | None = None,
                   label: str | None = None) -> SequentialRun:
    """Edit ``requests`` in rounds of ``batch``; evaluate every ``running_every`` rounds (running protocol, the
    edits so far) and at the end (final protocol, every edit).

    Rounds follow :func:`schedule_rounds` (a fact written twice waits for the next round).

    Args:
        session: the session to edit; with ``state_dir``, one from :func:`resume_session`.
        requests: all edits of the run, in order.
        batch: edits per round.
        running: measure the running curve.
        running_every: rounds between running evaluations (the last round is always measured: its point is
            read off the final evaluation, which covers the same edits).
        running_sample_size: evaluate the running protocol on a fixed random sample of this many of the edits
            so far (:func:`running_sample`; the points say so); ``None``: on all of them.
        options: what to measure besides teacher-forced comparisons (fluency only in the final protocol).
        suite, suite_examples: the general-ability suite for the final evaluation; each running point also
            measures the perplexity of its held-out texts (the final protocol's), so the curve shows when the
            model starts to degrade.
        progress: progress bars inside each round.
        probes: what each round's own report scores (``session.edit``'s ``probes``: ``"all"`` or ``"rewrite"``).
        state_dir: save the session and the run's progress here after every round, and resume from them.
        values: take each round's value targets from this store (computing and storing them when missing,
            waiting for them while a helper computes them); the rounds already made are recorded in it
            (:meth:`ValueStore.record`).
        label: the run's name in results and plots (default: the method), for one method with other settings.

    Raises:
        CheckpointError: ``state_dir`` holds a run of other requests or another batch size.
    """
    schedule = schedule_rounds(requests, batch)
    requests = [request for round_requests in schedule for request in round_requests]  # in edit order
    state = Path(state_dir) if state_dir else None
    run = _load_run(state, session, requests, batch)
    run.label = label
    device = describe_device(session.device)
    if run.devices[-1:] != [device]:
        run.devices.append(device)
    running_options = dataclasses.replace(options or EvalOptions(), fluency_records=0)
    texts = perplexity_texts(suite, skip=suite_examples) if suite else []
    done = sum(len(r) for r in schedule[: len(session.rounds)])
    if values is not None and session.rounds and (added := values.record(session)):
        logger.info("%d earlier rounds' value targets added to %s", added, values.folder)

    def measure_point_if_due() -> None:
        # The last round's point is read off the final evaluation below, which measures the same edits.
        rounds = len(session.rounds)
        if not running or rounds % running_every or not 0 < rounds < len(schedule):
            return
        if any(point.rounds == rounds for point in run.curve):
            return
        run.curve.append(_running_point(session, requests, done, running_sample_size, running_options, texts))
        if state is not None:
            atomic_write_json(state / RUN_FILE, run.to_dict())

    measure_point_if_due()  # one an interrupted process saved the round for but did not finish measuring
    for index in range(len(session.rounds), len(schedule)):
        tic = time.perf_counter()
        given = values.compute(session, schedule[index]) if values is not None else None
        stored = time.perf_counter() - tic
        report = session.edit(schedule[index], progress=progress, probes=probes, values=given)
        if given is not None:  # the value step ran here (or its targets were read, computed ahead elsewhere)
            report.seconds["values"] = round(stored, 3)
            report.seconds["total"] = round(report.seconds["total"] + stored, 3)
        done += len(schedule[index])
        run.round_seconds.append(report.seconds)
        if state is not None:  # saved before the running point, so that an interruption there loses no round
            session.save_pretrained(state / SESSION_DIR)
            atomic_write_json(state / RUN_FILE, run.to_dict())
        measure_point_if_due()
        logger.info("round %d/%d done (%d edits, %.0f s)", index + 1, len(schedule), done,
                    report.seconds.get("total", 0.0))
    if run.final is None:
        parts = state / FINAL_PARTS_DIR if state is not None else None  # an interrupted final evaluation continues
        run.final = evaluate_session(session, requests, protocol="final", options=options, suite=suite,
                                     suite_examples=suite_examples, parts=parts)
        if running and (not run.curve or run.curve[-1].edits < len(requests)):
            run.curve.append(running_point(run.final))
        if state is not None:
            session.save_card(state / SESSION_DIR)
            atomic_write_json(state / RUN_FILE, run.to_dict())
            shutil.rmtree(state / FINAL_PARTS_DIR, ignore_errors=True)
    return run


def _running_point(session: EditSession, requests: Sequence[EditRequest], done: int, sample_size: int | None,
                   options: EvalOptions, texts: Sequence[str]) -> Evaluation:
    """The running protocol on the edits so far (or their sample), with the perplexity of ``texts`` if any."""
    tic = time.perf_counter()
    chosen = running_sample(done, sample_size, len(requests))
    point = evaluate_session(session, [requests[i] for i in chosen], protocol="running", options=options,
                             record=False)
    general = ({"perplexity": perplexity(session.model, session.tokenizer, session.layout, texts,
                                         session.config.batch_size), "perplexity_texts": len(texts)}
               if texts else {})
    return dataclasses.replace(point, edits=done, sample=len(chosen) if len(chosen) < done else None,
                               general=general, seconds=round(time.perf_counter() - tic, 1))


def running_point(final: Evaluation) -> Evaluation:
    """The running protocol's figures inside a final evaluation of the same model and edits (no fluency; of the
    suite, the perplexity only, as in the running points)."""
    metrics = {key: value for key, value in final.metrics.items() if key not in FLUENCY_METRICS}
    general = {key: final.general[key] for key in ("perplexity", "perplexity_texts") if key in final.general}
    return dataclasses.replace(final, protocol="running", metrics=metrics, general=general)


def _load_run(state: Path | None, session: EditSession, requests: Sequence[EditRequest],
              batch: int) -> SequentialRun:
    fresh = SequentialRun(session.config.method, batch, [], None, [])
    if state is None or not session.rounds:
        return fresh
    path = state / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"{state} holds a saved session but no {RUN_FILE}: it is not a run's state; "
                              "give an empty folder to start a run")
    run = SequentialRun.from_dict(json.loads(path.read_text()))
    done = [r.request for report in session.rounds for r in report.requests]
    if run.batch != batch or done != list(requests[: len(done)]):
        raise CheckpointError(f"{state} holds a run of other edits or another batch size ({run.batch}); "
                              "resume it with the same data, limit and batch, or give a new folder")
    # Rounds saved after the last run.json write are redone from the saved session, not lost.
    run.round_seconds = run.round_seconds[: len(session.rounds)]
    run.curve = [e for e in run.curve if e.rounds <= len(session.rounds)]
    if len(done) < len(requests):
        run.final = None
    return run


def plot_curves(runs: Sequence[SequentialRun], path: str | Path, base: Evaluation | None = None,
                metrics: Sequence[str] = ("efficacy", "generalization", "specificity", "efficacy_generation"),
                labels: Sequence[str] | None = None) -> Path:
    """A PNG with one panel per metric against the number of edits (running protocol), one line per run.

    ``labels`` name the runs in the legend (default: each run's name in capitals).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = curve_figure(runs, base, metrics, labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def curve_figure(runs: Sequence[SequentialRun], base: Evaluation | None = None,
                 metrics: Sequence[str] = ("efficacy", "generalization", "specificity", "efficacy_generation"),
                 labels: Sequence[str] | None = None) -> Any:
    """The matplotlib figure of :func:`plot_curves` (its axes hold the plotted data, for tests and notebooks).

    Where running points measured perplexity, a last panel shows it: as a multiple of the unedited model's when
    ``base`` has it, else as measured.
    """
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs: give one label per run, or none")
    labels = list(labels or [run.name.upper() for run in runs])
    shown = [m for m in metrics if any(m in e.metrics for run in runs for e in run.curve)]
    with_perplexity = any("perplexity" in e.general for run in runs for e in run.curve)
    panels = len(shown) + with_perplexity
    figure, axes = plt.subplots(1, max(1, panels), figsize=(4.2 * max(1, panels), 4.0), squeeze=False)
    for axis, metric in zip(axes[0], shown):
        for run, label in zip(runs, labels):
            points = [(e.edits, e.metrics[metric]) for e in run.curve if metric in e.metrics]
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
        if base is not None and metric in base.metrics:
            axis.axhline(base.metrics[metric], color="grey", linestyle="--", linewidth=1, label="unedited")
        axis.set_title(METRIC_NAMES.get(metric, metric))
        axis.set_xlabel("edits")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    if with_perplexity:
        _perplexity_panel(axes[0][-1], runs, labels, base)
    axes[0][0].set_ylabel("%")
    figure.suptitle(f"Running protocol{_sampled(runs, labels)}", fontsize="medium")
    if panels:  # one legend below the panels, where it hides no line
        handles, names = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    return figure


def _perplexity_panel(axis: Any, runs: Sequence[SequentialRun], labels: Sequence[str],
                      base: Evaluation | None) -> None:
    unedited = base.general.get("perplexity") if base is not None else None
    for run, label in zip(runs, labels):
        points = [(e.edits, e.general["perplexity"] / (unedited or 1.0)) for e in run.curve
                  if "perplexity" in e.general]
        # a run without perplexity points still takes its colour, so that colours match across panels
        axis.plot(*(zip(*points) if points else ([], [])), marker="o", markersize=3, label=label)
    if unedited:
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="unedited")
    axis.set_title("Perplexity (× unedited)" if unedited else "Perplexity (held-out text)")
    axis.set_xlabel("edits")
    axis.grid(alpha=0.3)


def _sampled(runs: Sequence[SequentialRun], labels: Sequence[str]) -> str:
    sampled = [(label, max(e.sample for e in run.curve if e.sample)) for run, label in zip(runs, labels)
               if any(e.sample for e in run.curve)]
    return "".join(f"; {label}: beyond {size} edits, on a fixed random sample of {size} of them"
                   for label, size in sampled)


def write_results(path: str | Path, base: Evaluation | None, runs: Sequence[SequentialRun],
                  settings: dict[str, Any]) -> None:
    """``results.json``: the settings, the unedited model's evaluation and every run, atomically."""
    atomic_write_json(path, {"settings": settings, "base": base.to_dict() if base else None,
                             "runs": [run.to_dict() for run in runs]})
