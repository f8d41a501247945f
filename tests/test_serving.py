"""`nse-hub serve`: version selection, rank checks, adapters, the vLLM command, and the real server.

Everything but the last test runs without vLLM on tiny models. The last one (marked ``serve``) starts
vLLM's OpenAI-compatible server on SmolLM2 from the serving environment (``make serve-env``) and
compares its greedy answers with PEFT's; ``make test-serve`` runs it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, save_tiny
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from nse_hub import EditSession, load_requests
from nse_hub.adapters import read_adapter
from nse_hub.architectures import ModelLayout
from nse_hub.cli import main
from nse_hub.deltas import Factors
from nse_hub.errors import VersionNotFoundError
from nse_hub.serve_memory import GIB, SERVER_PROCESSES_BYTES, NodeMemory
from nse_hub.serving import (
    BASE_ADAPTER,
    VLLM_LORA_RANKS,
    VLLM_SERVER_MODULE,
    ServeError,
    ServerOptions,
    describe_plan,
    display_command,
    find_serve_python,
    fit_version,
    memory_choice,
    parse_versions,
    plan_serving,
    run_server,
    server_command,
    server_env,
    serving_footprint,
    vllm_rank,
    write_adapters,
)

REQUESTS = load_requests(FIXTURES / "requests.json")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def saved_edit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model and a saved edit of three rounds on it."""
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny(root / "tiny-llama")
    session = EditSession.from_pretrained(str(base), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    for batch in (REQUESTS[:2], REQUESTS[2:3], REQUESTS[3:]):
        session.edit(batch, progress=False)
    session.save_pretrained(root / "edit")
    return base, root / "edit"


def big_layout() -> ModelLayout:
    return ModelLayout(family="llama", model_type="llama", layers_path="model.layers", projection_path="mlp.down_proj",
                       final_norm_path="model.norm", weight_layout="linear", num_layers=2, hidden_size=1024,
                       intermediate_size=2048)


# --- ranks and versions -----------------------------------------------------------------------------


def test_vllm_rank_is_the_smallest_allowed_value_above() -> None:
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 17, 300, 321, 512)] == [1, 8, 8, 16, 32, 320, 512, 512]
    with pytest.raises(ServeError, match="largest max_lora_rank"):
        vllm_rank(513)


def test_parse_versions() -> None:
    assert parse_versions("all", 3) == [1, 2, 3]
    assert parse_versions(None, 2) == [1, 2]
    assert parse_versions("round-3, 1,round-1", 3) == [1, 3]
    for bad in ("round-4", "0", "latest"):
        with pytest.raises(VersionNotFoundError, match="round-1 … round-3"):
            parse_versions(bad, 3)
    with pytest.raises(VersionNotFoundError, match="no rounds"):
        parse_versions("all", 0)


def test_rank_above_vllm_limit_is_refused_or_truncated_with_its_error() -> None:
    g = torch.Generator().manual_seed(0)
    wide = Factors(torch.randn(1024, 600, generator=g), torch.randn(600, 2048, generator=g))
    with pytest.raises(ServeError, match=r"rank 600 at model\.layers\.1\.mlp\.down_proj.*--max-rank 512"):
        fit_version("round-1", 1, big_layout(), {1: wide})
    with pytest.raises(ServeError, match="not a rank vLLM serves"):
        fit_version("round-1", 1, big_layout(), {1: wide}, max_rank=500)
    version = fit_version("round-1", 1, big_layout(), {1: wide}, max_rank=512)
    assert version.rank == 512 and version.lossy
    exact = wide.dense().double()
    error = float((version.factors[1].dense().double() - exact).norm() / exact.norm())
    assert version.relative_error == pytest.approx(error, rel=1e-3) and 0 < error < 1


def test_versions_are_the_exported_versions(saved_edit: tuple[Path, Path], tmp_path: Path) -> None:
    base, folder = saved_edit
    plan = plan_serving(folder, "all")
    assert [a.name for a in plan.adapters] == [BASE_ADAPTER, "round-1", "round-2", "round-3"]
    assert plan.max_loras == 5 and plan.max_lora_rank == vllm_rank(max(a.rank for a in plan.adapters))
    assert plan.base_model == str(base) and plan.served_name == "tiny-llama"
    assert not any(f.B.any() or f.A.any() for f in plan.adapters[0].factors.values())
    session = EditSession.from_pretrained(str(folder), device="cpu")
    for version in plan.versions:
        session.export_adapter(tmp_path / version.name, round=version.round)
        exported, _ = read_adapter(tmp_path / version.name, session.layout)
        assert sorted(exported) == sorted(version.factors) and not version.lossy
        for layer, f in exported.items():
            assert torch.allclose(version.factors[layer].dense(), f.dense(), atol=1e-6)
    assert [a.name for a in plan_serving(folder, "round-2").adapters] == [BASE_ADAPTER, "round-2"]


def test_written_adapters_load_with_peft_as_each_version(saved_edit: tuple[Path, Path], tmp_path: Path) -> None:
    base, folder = saved_edit
    plan = plan_serving(folder, "round-1,round-2")
    written = write_adapters(plan, tmp_path / "adapters")
    assert sorted(written) == [BASE_ADAPTER, "round-1", "round-2"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), written[BASE_ADAPTER],
                                      adapter_name=BASE_ADAPTER)
    for name in ("round-1", "round-2"):
        model.load_adapter(written[name], adapter_name=name)
    unedited = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.set_adapter(BASE_ADAPTER)
        assert torch.equal(model(input_ids=IDS).logits, unedited(input_ids=IDS).logits)
        for version in (1, 2):
            model.set_adapter(f"round-{version}")
            expected = EditSession.from_pretrained(str(folder), round=version, device="cpu").model(input_ids=IDS)
            assert torch.allclose(model(input_ids=IDS).logits, expected.logits, atol=1e-4)


def test_max_rank_truncates_and_is_reported_as_lossy(saved_edit: tuple[Path, Path]) -> None:
    _, folder = saved_edit
    plan = plan_serving(folder, "all", max_rank=1)
    assert plan.max_lora_rank == 1 and all(v.rank == 1 for v in plan.versions)
    lossy = [v for v in plan.versions if v.lossy]
    assert lossy and all(0 < v.relative_error < 1 for v in lossy)
    text = "\n".join(describe_plan(plan))
    assert "LOSSY" in text and "relative error" in text


# --- the command and the serving environment --------------------------------------------------------


def test_server_command(saved_edit: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = saved_edit
    plan = plan_serving(folder, "round-1,round-3", served_name="tiny")
    adapters = write_adapters(plan, tmp_path)
    options = ServerOptions(host="127.0.0.1", port=8123, dtype="float32", extra_args=("--max-model-len", "256"))
    command = server_command(plan, adapters, "/env/bin/python", options)
    assert command[:3] == ["/env/bin/python", "-m", VLLM_SERVER_MODULE]

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--model") == plan.base_model and value("--served-model-name") == "tiny"
    assert (value("--host"), value("--port"), value("--dtype")) == ("127.0.0.1", "8123", "float32")
    assert "--enable-lora" in command and int(value("--max-lora-rank")) in VLLM_LORA_RANKS
    assert value("--max-loras") == value("--max-cpu-loras") == "4"  # base, two versions, a spare slot
    start = command.index("--lora-modules") + 1
    assert command[start:start + 3] == [f"{n}={(tmp_path / n).resolve()}" for n in ("base", "round-1", "round-3")]
    assert command[-2:] == ["--max-model-len", "256"]


def test_find_serve_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSE_HUB_SERVE_PYTHON", raising=False)
    with pytest.raises(ServeError, match="make serve-env"):
        find_serve_python(candidates=[tmp_path / "missing" / "python"])
    with pytest.raises(ServeError, match=r"does not exist.*make serve-env"):
        find_serve_python(tmp_path / "nope")
    python = tmp_path / "python"
    python.touch()
    assert find_serve_python(candidates=[tmp_path / "missing", python]) == python
    monkeypatch.setenv("NSE_HUB_SERVE_PYTHON", str(python))
    assert find_serve_python(candidates=[]) == python


def test_cli_dry_run_and_errors(saved_edit: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, folder = saved_edit
    out = tmp_path / "adapters"
    assert main(["serve", str(folder), "--versions", "round-1,round-3", "--port", "8124", "--dry-run",
                 "--serve-python", sys.executable, "--adapters-dir", str(out),
                 "--vllm-args", "--max-model-len 256"]) == 0
    printed = capsys.readouterr().out
    assert f"-m {VLLM_SERVER_MODULE}" in printed and "--port 8124" in printed and "--max-model-len 256" in printed
    assert f"round-3={(out / 'round-3').resolve()}" in printed and "round-2=" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["base", "round-1", "round-3"]
    assert main(["serve", str(folder), "--versions", "round-9", "--dry-run", "--serve-python", sys.executable]) == 2
    assert "round-1 … round-3" in capsys.readouterr().out
    assert main(["serve", str(folder), "--max-rank", "100", "--dry-run", "--serve-python", sys.executable]) == 2
    assert "not a rank vLLM serves" in capsys.readouterr().out


# --- memory, API key and the printed command ----------------------------------------------------------


def test_memory_share_is_chosen_from_what_serving_needs_and_what_is_available(saved_edit: tuple[Path, Path]) -> None:
    _, folder = saved_edit
    plan = plan_serving(folder, "all")
    options = ServerOptions(dtype="float32", on_cpu=True)
    footprint = serving_footprint(plan, options)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(plan.base_model).parameters())
    assert footprint.weights == 4 * params
    assert footprint.lora_slots > 0 and footprint.minimum < footprint.wanted
    # The machine: vLLM's default 0.92 (17.45 GiB) is more than the 17.22 GiB available.
    node = NodeMemory(0, int(18.96 * GIB), int(17.22 * GIB))
    choice = memory_choice(plan, options, node, env={})
    assert choice.fraction is not None and choice.warning is None
    assert footprint.wanted <= choice.fraction * node.total <= node.available - SERVER_PROCESSES_BYTES
    assert choice.fraction < 0.92 and "available" in choice.reason and "--memory-utilization" in choice.reason
    command = server_command(plan, write_adapters(plan, folder.parent / "mem-adapters"), "/env/bin/python", options,
                             choice.fraction)
    assert command[command.index("--gpu-memory-utilization") + 1] == f"{choice.fraction:g}"
    # Less available than wanted: what is available, and a warning once even the minimum does not fit.
    between = (footprint.minimum + footprint.wanted) // 2
    tight = NodeMemory(0, 16 * GIB, SERVER_PROCESSES_BYTES + between)
    squeezed = memory_choice(plan, options, tight, env={})
    assert squeezed.fraction * tight.total <= tight.available - SERVER_PROCESSES_BYTES and squeezed.warning is None
    full = memory_choice(plan, options, NodeMemory(0, 16 * GIB, GIB), env={})
    assert full.warning and "--memory-utilization" in full.warning
    # An explicit share wins (and is checked); the KV cache variable or a share in --vllm-args leave vLLM's setting.
    assert memory_choice(plan, ServerOptions(on_cpu=True, memory_utilization=0.3), node, env={}).fraction == 0.3
    assert memory_choice(plan, options, node, env={"VLLM_CPU_KVCACHE_SPACE": "1"}).fraction is None
    assert memory_choice(plan, ServerOptions(on_cpu=True, extra_args=("--gpu-memory-utilization=0.5",)), node,
                         env={}).fraction is None
    assert memory_choice(plan, ServerOptions(on_cpu=False), node, env={}).fraction is None
    shorter = serving_footprint(plan, ServerOptions(dtype="float32", extra_args=("--max-model-len", "256")))
    assert shorter.max_model_len == 256 and shorter.wanted <= footprint.wanted
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ServeError, match=r"--memory-utilization .* \(0, 1\]"):
            ServerOptions(memory_utilization=bad)


def test_node_memory_is_read_as_vllm_reads_it(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    (tmp_path / f"sys/devices/system/cpu/cpu{cpu}/node1").mkdir(parents=True)
    (tmp_path / "sys/devices/system/node/node1").mkdir(parents=True)
    (tmp_path / "sys/devices/system/node/node1/meminfo").write_text(
        "Node 1 MemTotal:       8000000 kB\nNode 1 MemFree:        1000000 kB\nNode 1 Active(file):    500000 kB\n"
        "Node 1 Inactive(file):  250000 kB\nNode 1 SReclaimable:    250000 kB\n")
    assert NodeMemory.read(tmp_path) == NodeMemory(1, 8_000_000 * 1024, 2_000_000 * 1024)
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text(f"{4_000_000 * 1024}\n")
    (tmp_path / "sys/fs/cgroup/memory.current").write_text(f"{3_000_000 * 1024}\n")
    assert NodeMemory.read(tmp_path) == NodeMemory(1, 4_000_000 * 1024, 1_000_000 * 1024)
    flat = tmp_path / "flat"
    (flat / "proc").mkdir(parents=True)
    (flat / "proc/meminfo").write_text("MemTotal:  16000000 kB\nMemFree:  2000000 kB\nMemAvailable:  9000000 kB\n")
    assert NodeMemory.read(flat) == NodeMemory(-1, 16_000_000 * 1024, 9_000_000 * 1024)


def test_api_key_reaches_the_server_but_is_never_printed(saved_edit: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = saved_edit
    plan = plan_serving(folder, "round-1")
    options = ServerOptions(api_key="s3cr3t-KEY", on_cpu=True)
    command = server_command(plan, write_adapters(plan, tmp_path), "/env/bin/python", options)
    assert "s3cr3t-KEY" not in " ".join(command) and "--api-key" not in command
    env = server_env(options)
    assert env == {"VLLM_API_KEY": "s3cr3t-KEY"}
    check = [sys.executable, "-c", "import os, sys; sys.exit(os.environ.get('VLLM_API_KEY') != 's3cr3t-KEY')"]
    assert run_server(check, env) == 0
    shown = display_command([*command, "--api-key", "other-secret"], env)
    assert "s3cr3t" not in shown and "other-secret" not in shown
    # Pasted into a shell with the key exported, the line runs the same command (the key comes from the shell).
    pasted = subprocess.run(["bash", "-c", f"{display_command(check, env)}"], env={**os.environ, **env})
    assert pasted.returncode == 0
    unset = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    refused = subprocess.run(["bash", "-c", display_command(check, env)], env=unset, capture_output=True, text=True)
    assert refused.returncode != 0 and "export VLLM_API_KEY" in refused.stderr
    with pytest.raises(ServeError, match="--api-key is empty"):
        ServerOptions(api_key=" ")


def test_cli_dry_run_prints_a_command_to_paste(saved_edit: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, folder = saved_edit
    out = tmp_path / "my adapters"  # a space: the printed command must quote it
    assert main(["serve", str(folder), "--versions", "round-2", "--dry-run", "--serve-python", sys.executable,
                 "--adapters-dir", str(out), "--served-model-name", "tiny model", "--memory-utilization", "0.3",
                 "--api-key", "s3cr3t-KEY", "--vllm-args", "--max-model-len 256"]) == 0
    printed = capsys.readouterr().out
    assert "s3cr3t-KEY" not in printed and "memory: 0.3 (--memory-utilization)" in printed
    line = next(line for line in printed.splitlines() if VLLM_SERVER_MODULE in line)
    words = shlex.split(line)
    assert words[0].startswith("VLLM_API_KEY=") and words[1] == sys.executable
    command = words[1:]
    assert command[command.index("--served-model-name") + 1] == "tiny model"
    assert f"round-2={out.resolve() / 'round-2'}" in command
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.3" and command[-2:] == ["--max-model-len",
                                                                                                "256"]
    assert main(["serve", str(folder), "--dry-run", "--serve-python", sys.executable,
                 "--memory-utilization", "1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().out


# --- the real server --------------------------------------------------------------------------------


def _serve_python() -> Path | None:
    try:
        return find_serve_python()
    except ServeError:
        return None


# Round 1 writes the first two facts, round 2 the third; the Louvre is a neighbour no round may change.
SERVE_PROMPTS = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is",
                 "The capital of Japan is", "The Louvre is located in the city of"]
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SERVE_KEY = "test-serve-key"


def _post(url: str, body: dict) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SERVE_KEY}"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            models = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {SERVE_KEY}"})
            with urllib.request.urlopen(models, timeout=5) as response:
                return [m["id"] for m in json.loads(response.read())["data"]]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    pytest.fail(f"the vLLM server did not come up in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _peft_greedy(base: str, adapter: Path, prompt_ids: list[list[int]], eos: set[int]) -> list[list[int]]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            mask = torch.ones(1, len(ids), dtype=torch.long)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=mask, do_sample=False,
                                 max_new_tokens=MAX_TOKENS)[0, len(ids):].tolist()
            cut = next((i for i, t in enumerate(out) if t in eos), len(out))
            outputs.append(out[:cut])
    return outputs


@pytest.fixture(scope="module")
def smollm2_edit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved edit of SmolLM2 with two rounds (``NSE_HUB_SERVE_EDIT`` reuses one)."""
    if os.environ.get("NSE_HUB_SERVE_EDIT"):
        return Path(os.environ["NSE_HUB_SERVE_EDIT"])
    from nse_hub.cli import DEMO_REQUESTS

    requests = load_requests(Path(str(DEMO_REQUESTS)))
    session = EditSession.from_pretrained("smollm2-135m", device="cpu", mom2_n_samples=96)
    session.edit(requests[:3], progress=False)
    session.edit(requests[3:], progress=False)
    folder = tmp_path_factory.mktemp("smollm2-serve") / "edit"
    session.save_pretrained(folder)
    return folder


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.skipif(_serve_python() is None, reason="no serving environment with vLLM (make serve-env, or set "
                                                    "NSE_HUB_SERVE_PYTHON); `make test-serve` runs this test")
def test_real_server_answers_each_version_like_peft(smollm2_edit: Path, tmp_path: Path) -> None:
    plan = plan_serving(smollm2_edit, "round-1,round-2")
    tokenizer = AutoTokenizer.from_pretrained(plan.base_model)
    prompt_ids = [tokenizer(p).input_ids for p in SERVE_PROMPTS]
    eos = {t for t in [tokenizer.eos_token_id, *(getattr(tokenizer, "all_special_ids", []))] if t is not None}
    adapters = tmp_path / "adapters"
    expected = {name: _peft_greedy(plan.base_model, folder, prompt_ids, eos)
                for name, folder in write_adapters(plan, adapters).items()}

    port, log = _free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "nse_hub.cli", "serve", str(smollm2_edit), "--versions", "round-1,round-2",
               "--port", str(port), "--dtype", "float32", "--adapters-dir", str(adapters), "--api-key", SERVE_KEY,
               "--vllm-args", "--max-model-len 512 --enforce-eager --seed 0"]
    # No VLLM_CPU_KVCACHE_SPACE: the server starts with the memory share nse-hub chooses.
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_API_KEY")}
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        served = _wait_until_up(url, server, log)
        assert {plan.served_name, BASE_ADAPTER, "round-1", "round-2"} <= set(served)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{url}/v1/models", timeout=30)
        assert "memory: 0." in log.read_text() and SERVE_KEY not in log.read_text()
        # One batch: every (model, prompt) pair at once, so vLLM schedules base and edited requests together.
        # The plain served name (no adapter) must come back unedited as well: the spare slot keeps it clean.
        models = [plan.served_name, BASE_ADAPTER, "round-1", "round-2"]
        jobs = [(m, i) for i in range(len(prompt_ids)) for m in models]
        body = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True}
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: _post(f"{url}/v1/completions",
                                                      {**body, "model": job[0], "prompt": prompt_ids[job[1]]}), jobs))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    got: dict[tuple[str, int], list[int]] = {}
    for (model, index), answer in zip(jobs, answers):
        choice = answer["choices"][0]
        tokens = choice.get("token_ids") or tokenizer(choice["text"], add_special_tokens=False).input_ids
        got[model, index] = [t for t in tokens if t not in eos]
    report = {f"{m} | {SERVE_PROMPTS[i]}": tokenizer.decode(got[m, i]) for m, i in jobs}
    print(json.dumps(report, indent=1, ensure_ascii=False))
    for model, index in jobs:
        reference = expected[BASE_ADAPTER if model == plan.served_name else model][index]
        assert got[model, index] == reference, (model, SERVE_PROMPTS[index], tokenizer.decode(got[model, index]),
                                                tokenizer.decode(reference))
    assert got["round-1", 0] != got[BASE_ADAPTER, 0] and got["round-2", 2] != got["round-1", 2]
    assert got["round-2", 3] == got[BASE_ADAPTER, 3]
