"""Check the memory plan (nse_hub.plan) against measured peak resident memory on the CPU, phase by phase.

    python benchmarks/memory_plan.py                       # every check, one subprocess each
    python benchmarks/memory_plan.py --checks smollm2-nse  # one of them
    python benchmarks/memory_plan.py --readme              # the plan's table for the four public configs

Each check runs in a fresh process that wraps the engine's phases (statistics pass, value step, key reads,
null space, solves, key memory, saving) and reads the process' peak resident memory (VmHWM) in each, resetting
it at every phase's start (/proc/self/clear_refs); "weights" is everything before the statistics pass (loading,
the session, context templates, the fingerprint). Checks:

* smollm2-nse, smollm2-alphaedit: SmolLM2-135M (real weights, float32), one round of the first 10 CounterFact
  records, with a fresh statistics cache (the pass runs), then save_pretrained.
* llama-width-nse: a random Llama-3-8B-width model of reduced depth (hidden 4,096, d_ff 14,336, 32 heads / 8 KV
  heads, 2 layers, vocabulary 1,024 from the test tokenizer instead of 128,256), float32, edit layer 1. The
  whole round would pass the 10 GB this machine allows (the solve), so it measures the phases that fit: the
  statistics pass on 2,048 tokens of text (its memory does not depend on the token count; with fewer tokens than
  d_ff it stops at the check that follows its peak), then a round on a synthetic C written to the cache with
  the solves replaced by zero updates of the same shape (they are measured alone, next).
* llama-width-solve: NSE's solve at d_ff 14,336 on its own (C, P and neuron_update; no model), float64 path.
* llama-width-solve-lean: the same solve on the lean engine (EditConfig.lean): C in float32, a key memory of
  1,000 earlier keys (kept as keys), the system promoted and factorised in float64.
* gemma3-nse: Gemma 3 270M (real weights, float32), as the SmolLM2 checks.
* llama-width-4-nse: the whole NSE round of a random Llama-3-8B-width model of 4 layers (vocabulary 1,024),
  bfloat16 weights so that it fits 12 GB, edit layer 1: one request, one Adam step (v_num_grad_steps 2), no
  generated context templates, one update pass (the CPU's bfloat16 matmuls are slow; the phases' memory hardly
  depends on these),
  the statistics pass on one 64-token sample (stopping at the check after its peak) and then a synthetic C,
  and the real solve at d_ff 14,336. The key memory is put in its steady state first (``P`` stored as a float32
  d_ff², as after d_ff keys), which is what the plan describes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"
TINY_TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-tokenizer"
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
CHECKS = ("smollm2-nse", "smollm2-alphaedit", "llama-width-nse", "llama-width-solve", "gemma3-nse",
          "llama-width-4-nse", "llama-width-solve-lean")
MIB = 2**20


# --- inside the measured process ------------------------------------------------------------------------------


class PhasePeaks:
    """Peak resident memory per phase: reset at each wrapped call's start, read at its end."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.current = "weights"
        self.overall = 0

    @staticmethod
    def hwm() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    @staticmethod
    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")

    def close(self, phase: str | None) -> None:
        peak = self.hwm()
        self.overall = max(self.overall, peak)
        if phase:
            self.peaks[phase] = max(self.peaks.get(phase, 0), peak)
            # On stderr as it goes: a check cut short by a time limit still shows the phases it measured.
            print(f"phase {phase}: {peak / MIB:.0f} MiB", file=sys.stderr, flush=True)

    def wrap(self, owner: object, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if self.current is not None:  # a phase inside another counts for the outer one
                return inner(*args, **kwargs)
            self.close("weights" if not self.peaks else None)
            self.reset()
            self.current = phase
            try:
                return inner(*args, **kwargs)
            finally:
                self.close(phase)
                self.current = None
                self.reset()

        setattr(owner, name, wrapped)

    def install(self) -> None:
        import nse_hub.algorithm.rounds as rounds
        import nse_hub.deltas as deltas
        import nse_hub.session as session

        self.wrap(session, "second_moments", "statistics pass")
        self.wrap(rounds.KeyProbe, "read", "key reads")
        self.wrap(rounds, "KeyProbe", "key reads")
        self.wrap(rounds, "_null_space", "null space")
        self.wrap(rounds, "neuron_update", "solves")
        self.wrap(rounds, "alphaedit_update", "solves")
        self.wrap(deltas.WeightDeltas, "add", "solves")
        self.wrap(deltas.KeyMemory, "add_round", "key memory")
        self.wrap(session.EditSession, "save_pretrained", "saving")

    def start(self) -> None:
        self.current = None  # "weights" until the first wrapped phase


def _requests(limit: int = 10):
    from nse_hub import load_requests

    return load_requests(COUNTERFACT, limit=limit)


def measure_smollm2(method: str, out: Path, model: str = "smollm2-135m") -> dict:
    import nse_hub.models as models

    cache = Path(tempfile.mkdtemp(prefix="nse-hub-plan-"))
    (cache / "models").symlink_to(models.cache_dir() / "models")
    os.environ["NSE_HUB_CACHE"] = str(cache)  # an empty statistics cache: the pass runs
    peaks = PhasePeaks()
    peaks.install()
    from nse_hub import EditSession

    peaks.start()
    session = EditSession.from_pretrained(model, method=method, device="cpu")
    peaks.wrap(session, "value_optimizer", "value step (per chunk)")
    session.edit(_requests(), progress=False)
    session.save_pretrained(out / "session")
    peaks.close(None)
    return {"peaks": peaks.peaks, "overall": peaks.overall}


def llama_width_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=1024, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False)


LLAMA_WIDTH_SETTINGS = {"layers": [1], "mom2_n_samples": 32, "batch_size": 32}
# The 4-layer check's whole round, cut to what the CPU computes in minutes (one request, one step, one pass).
LLAMA_WIDTH_4 = {"layers": 4, "dtype": "bfloat16", "edits": 1,
                 "settings": {"layers": [1], "mom2_n_samples": 1, "batch_size": 1, "v_num_grad_steps": 2,
                              "context_prefixes": [], "max_iterations": 2, "alpha": 0.0, "upper_bound": 1e9}}


def _synthetic_second_moment(session, layer: int) -> None:
    """A C with a log-normal spectrum written to the cache, as the pass would have written it."""
    import torch
    from safetensors.torch import save_file

    from nse_hub.stats import CHECK_VERSION

    n = session.layout.intermediate_size
    c = torch.diag(torch.randn(n).exp())
    path = session.stats_spec.path(session.layout, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"second_moment": c}, str(path), metadata={"tokens": str(10 * n), "check": CHECK_VERSION})
    session._second_moments = None


def measure_llama_width_4(out: Path) -> dict:
    import torch

    cache = Path(tempfile.mkdtemp(prefix="nse-hub-plan-"))
    os.environ["NSE_HUB_CACHE"] = str(cache)
    corpus = cache / "corpus.txt"
    corpus.write_text(" ".join(["The river runs past the old mill where the millers ground wheat."] * 40))
    peaks = PhasePeaks()
    peaks.install()
    from transformers import AutoTokenizer, LlamaForCausalLM

    from nse_hub import EditSession
    from nse_hub.deltas import KeyMemory
    from nse_hub.errors import StatisticsError

    peaks.start()
    from transformers.initialization import no_init_weights

    with no_init_weights():  # normal init of 0.9B parameters takes minutes on a busy CPU; uniform is quick
        model = LlamaForCausalLM._from_config(llama_width_config(LLAMA_WIDTH_4["layers"]), dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.uniform_(-0.035, 0.035, generator=generator)  # std 0.02, the config's initializer_range
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    settings = {**LLAMA_WIDTH_4["settings"], "mom2_dataset": str(corpus)}
    session = EditSession.from_pretrained(model, method="nse", tokenizer=tokenizer, **settings)
    # The plan describes a session in its steady state, whose key memory holds d_ff keys or more and so keeps P as
    # a float32 d_ff² on the host (at this width 784 MiB); a first round would hold only its own keys.
    memory = session.memory
    session.memory = KeyMemory(memory.layers, memory.size, memory.device, lean=memory.lean, matrix_after=0)
    peaks.wrap(session, "value_optimizer", "value step (per chunk)")
    with contextlib.suppress(StatisticsError):
        session.prepare(progress=False)  # the statistics pass on too few tokens: it fails at the check, after its peak
    _synthetic_second_moment(session, 1)
    session.edit(_requests(LLAMA_WIDTH_4["edits"]), progress=False)
    session.save_pretrained(out / "session")
    peaks.close(None)
    return {"peaks": peaks.peaks, "overall": peaks.overall}


def measure_llama_width(out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    cache = Path(tempfile.mkdtemp(prefix="nse-hub-plan-"))
    os.environ["NSE_HUB_CACHE"] = str(cache)
    corpus = cache / "corpus.txt"
    records = json.loads(COUNTERFACT.read_text())
    corpus.write_text("\n".join(" ".join(r.get("paraphrase_prompts", [])) or str(r) for r in records[:400]))
    peaks = PhasePeaks()
    peaks.install()
    from transformers import AutoTokenizer, LlamaForCausalLM

    import nse_hub.algorithm.rounds as rounds
    from nse_hub import EditSession
    from nse_hub.deltas import Factors
    from nse_hub.errors import StatisticsError
    from nse_hub.stats import CHECK_VERSION

    peaks.start()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_width_config()).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    settings = {**LLAMA_WIDTH_SETTINGS, "mom2_dataset": str(corpus)}
    session = EditSession.from_pretrained(model, method="nse", tokenizer=tokenizer, **settings)
    peaks.wrap(session, "value_optimizer", "value step (per chunk)")
    with contextlib.suppress(StatisticsError):
        session.prepare(progress=False)  # templates, then the statistics pass on too few tokens
    # A synthetic C (log-normal spectrum) in the cache, as the pass would have written it.
    spec, layout = session.stats_spec, session.layout
    n = layout.intermediate_size
    c = torch.diag(torch.randn(n).exp())
    path = spec.path(layout, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"second_moment": c}, str(path), metadata={"tokens": str(10 * n), "check": CHECK_VERSION})
    del c
    session._second_moments = None

    def zero_update(keys, residual, *args, **kwargs):  # the solve's shape, not its memory
        return Factors(torch.zeros(residual.shape[0], keys.shape[1]), torch.zeros(keys.shape[1], keys.shape[0]))

    rounds.neuron_update = zero_update
    peaks.peaks.pop("solves", None)
    session.edit(_requests(), progress=False)
    peaks.peaks.pop("solves", None)
    session.save_pretrained(out / "session")
    peaks.close(None)
    return {"peaks": peaks.peaks, "overall": peaks.overall}


def measure_llama_width_solve(lean: bool = False) -> dict:
    import torch

    from nse_hub.algorithm.update import neuron_update
    from nse_hub.deltas import LayerMemory

    n, edits = 14336, 10
    peaks = PhasePeaks()
    c = torch.diag(torch.randn(n).exp())  # C, float32
    if lean:  # 1,000 earlier keys, kept as keys
        p = LayerMemory(torch.randn(n, 1000) / 30, None, torch.device("cpu"))
    else:
        p = torch.zeros(n, n, dtype=torch.float64)  # the key memory
    keys, residual = torch.randn(n, edits), torch.randn(4096, edits)
    peaks.close(None)
    peaks.reset()
    neuron_update(keys, residual, c, p, 1e4, torch.arange(n))
    peaks.close("solves")
    return {"peaks": peaks.peaks, "overall": peaks.overall}


# --- the parent: plans, subprocesses, the table -----------------------------------------------------------------


def plan_for(check: str) -> dict[str, int]:
    import torch

    from nse_hub.plan import NSE_SOLVE_MATRICES, PROCESS_BYTES, _lean_solve, build_shape, memory_plan

    if check.startswith(("smollm2", "gemma3")):
        name = "smollm2-135m" if check.startswith("smollm2") else "gemma3-270m"
        plan = memory_plan(name, method=check.split("-")[-1], dtype="float32", device="cpu", batch_size=10)
        return {p.name: p.bytes for p in plan.phases}
    if check == "llama-width-4-nse":
        plan = memory_plan(llama_width_config(LLAMA_WIDTH_4["layers"]), method="nse", dtype=LLAMA_WIDTH_4["dtype"],
                           device="cpu", batch_size=LLAMA_WIDTH_4["edits"], hparams=LLAMA_WIDTH_4["settings"])
        return {p.name: p.bytes for p in plan.phases}
    plan = memory_plan(llama_width_config(), method="nse", dtype="float32", device="cpu", batch_size=10,
                       hparams=LLAMA_WIDTH_SETTINGS)
    phases = {p.name: p.bytes for p in plan.phases}
    if check == "llama-width-solve":  # the process, C, P and the solve; no model
        square = 14336**2
        return {"solves": PROCESS_BYTES + 4 * square + 8 * square + int(NSE_SOLVE_MATRICES * 8 * square)}
    if check == "llama-width-solve-lean":  # the process, C, the keys and the lean solve's transient
        shape = build_shape(llama_width_config(), "nse", torch.float32, "cpu", 10, None, LLAMA_WIDTH_SETTINGS)
        transient, _ = _lean_solve(shape)
        return {"solves": PROCESS_BYTES + 4 * 14336**2 + 4 * 14336 * 1000 + transient}
    return phases


def run_check(check: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="nse-hub-plan-out-") as out:
        command = [sys.executable, __file__, "--measure", check, "--out", out]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        tic = time.perf_counter()
        # stderr streams through (phases as they are measured, errors); stdout holds the result.
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{check} failed (its output is above)")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["seconds"] = round(time.perf_counter() - tic, 1)
    return result


def measure_import() -> int:
    code = ("import torch, transformers, nse_hub.session, nse_hub.cli\n"
            "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return int(done.stdout.strip())


def table(results: dict[str, dict]) -> str:
    lines = ["| check | phase | predicted MiB | measured MiB | predicted / measured |", "|---|---|---|---|---|"]
    for check, result in results.items():
        predicted = plan_for(check)
        for phase, measured in result["peaks"].items():
            if phase in predicted:
                lines.append(f"| {check} | {phase} | {predicted[phase] / MIB:.0f} | {measured / MIB:.0f} | "
                             f"{predicted[phase] / measured:.2f} |")
        common = [p for p in result["peaks"] if p in predicted]
        peak_p, peak_m = max(predicted[p] for p in common), result["overall"]
        lines.append(f"| {check} | **peak** | **{peak_p / MIB:.0f}** | **{peak_m / MIB:.0f}** | "
                     f"**{peak_p / peak_m:.2f}** |")
    return "\n".join(lines)


def readme_table() -> str:
    from nse_hub.plan import memory_plan

    lines = ["| model | method | peak GiB on 24 GB (phase) | 24 GB | 48 GB | 80 GB | to fit 24 GB | float64 path "
             "(lean=false): peak GiB, fits 24/48/80 |", "|---|---|---|---|---|---|---|---|"]
    for name in ("llama-3-8b", "llama-3-70b", "qwen2.5-7b", "mistral-7b"):
        for method in ("nse", "alphaedit"):
            verdicts, plan24 = [], None
            for memory in ("24GB", "48GB", "80GB"):
                plan = memory_plan(CONFIGS / name, method=method, dtype="bfloat16", device="cuda",
                                   device_memory=memory, batch_size=100)
                plan24 = plan24 or plan
                verdicts.append("fits" if plan.fits else "no")
            best = plan24.suggestions[0] if plan24.suggestions else None
            hint = (f"{best.setting} → {best.peak_bytes / 2**30:.1f} GiB" + ("" if best.fits else " (still over)")
                    if best else "—")
            old = [memory_plan(CONFIGS / name, method=method, dtype="bfloat16", device="cuda", device_memory=memory,
                               batch_size=100, lean=False, suggest=False) for memory in ("24GB", "48GB", "80GB")]
            float64 = f"{old[0].peak_bytes / 2**30:.1f}: " + "/".join("fits" if p.fits else "no" for p in old)
            lines.append(f"| {name} | {method} | {plan24.peak_bytes / 2**30:.1f} ({plan24.peak_phase}) | "
                         + " | ".join(verdicts) + f" | {hint} | {float64} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--measure", choices=CHECKS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--readme", action="store_true", help="print the plan table of the four public configs")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.measure:
        out = Path(args.out)
        result = {"smollm2-nse": lambda: measure_smollm2("nse", out),
                  "smollm2-alphaedit": lambda: measure_smollm2("alphaedit", out),
                  "llama-width-nse": lambda: measure_llama_width(out),
                  "llama-width-solve": measure_llama_width_solve,
                  "gemma3-nse": lambda: measure_smollm2("nse", out, "gemma3-270m"),
                  "llama-width-4-nse": lambda: measure_llama_width_4(out),
                  "llama-width-solve-lean": lambda: measure_llama_width_solve(lean=True)}[args.measure]()
        print(json.dumps(result))
        return
    if args.readme:
        print(readme_table())
        return
    print(f"process after imports: {measure_import() / MIB:.0f} MiB")
    results = {}
    for check in args.checks:
        results[check] = run_check(check)
        print(f"{check}: {results[check]['seconds']} s", flush=True)
        print(table({check: results[check]}), flush=True)
        if args.json:  # after every check: a later one's failure keeps the earlier results
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print("\nall checks:")
    print(table(results))


if __name__ == "__main__":
    main()
