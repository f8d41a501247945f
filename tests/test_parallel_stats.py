"""The data-parallel statistics pass: 2 processes on gloo (CPU) give the one-process C, and resume."""

import datetime
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model, tiny_tokenizer

from nse_hub import stats
from nse_hub.architectures import ModelLayout
from nse_hub.fingerprint import model_sha256
from nse_hub.stats import Shard, StatsSpec, second_moments

LAYERS = [1, 2]
TEXT = "\n\n".join(f"Paragraph {i}: the river runs past the old mill, where {i} millers once ground wheat and rye "
                   f"for the town of Kyoto; they sold flour at the market every {i % 7 + 1} days." for i in range(40))


class _Interrupt(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spec(corpus: str) -> StatsSpec:
    n_samples, length = (40, 16) if corpus != "model" else (70, 8)
    return StatsSpec(model_sha256(tiny_model("llama")), corpus, n_samples=n_samples, sample_length=length, seed=3)


def _worker(rank: int, world: int, port: int, corpus: str, root: str, out: str, fail_after: int | None) -> None:
    """One process of the pass: its C (or the interruption) and its forward count go to ``out``/rank<r>.pt."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    calls: list[int] = []
    real = stats.run_forward

    def forward(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise _Interrupt
        calls.append(1)
        return real(*args, **kwargs)

    stats.run_forward = forward
    model = tiny_model("llama")
    result: dict = {"shard": Shard.current()}
    try:
        result["C"] = second_moments(model, tiny_tokenizer(), ModelLayout.detect(model), LAYERS, _spec(corpus),
                                     batch_size=4, root=Path(root), progress=False)
    except _Interrupt:
        result["interrupted"] = True
    finally:
        result["forwards"] = len(calls)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _launch(corpus: str, root: Path, out: Path, fail_after: int | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, _free_port(), corpus, str(root), str(out), fail_after), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture
def corpus_file(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.mark.parametrize("corpus", ["file", "model"])
def test_two_processes_give_the_one_process_matrix(corpus: str, corpus_file: str, tmp_path: Path) -> None:
    name = corpus_file if corpus == "file" else "model"
    model = tiny_model("llama")
    layout = ModelLayout.detect(model)
    spec = _spec(name)
    single = second_moments(model, tiny_tokenizer(), layout, LAYERS, spec, batch_size=4, root=tmp_path / "one",
                            progress=False)
    ranks = _launch(name, tmp_path / "two", tmp_path / "out")
    one_pass = -(-spec.n_samples // 4)
    assert [r["forwards"] for r in ranks] == [-(-spec.n_samples // 2 // 4)] * 2 and ranks[0]["forwards"] < one_pass
    for layer in LAYERS:
        assert torch.equal(ranks[0]["C"][layer], ranks[1]["C"][layer])  # every process holds the same C
        torch.testing.assert_close(ranks[0]["C"][layer], single[layer], rtol=1e-6, atol=1e-7)
        written = stats._read(spec.path(layout, layer, tmp_path / "two"))[0]
        assert torch.equal(written, ranks[0]["C"][layer])
    assert not list((tmp_path / "two").rglob("partial-*"))


def test_an_interrupted_parallel_pass_resumes(corpus_file: str, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    spec = _spec(corpus_file)
    layout = ModelLayout.detect(tiny_model("llama"))
    first = _launch(corpus_file, root, tmp_path / "first", fail_after=2)
    assert all(r.get("interrupted") for r in first) and not spec.path(layout, 1, root).exists()
    partials = sorted(p.name for p in spec.folder(root).glob("partial-*"))
    assert [name.split("-rank")[1] for name in partials] == ["0of2.safetensors", "1of2.safetensors"]

    resumed = _launch(corpus_file, root, tmp_path / "second")
    assert [r["forwards"] for r in resumed] == [5 - 2] * 2  # 20 samples each, 4 per batch, 2 batches done
    model = tiny_model("llama")
    single = second_moments(model, tiny_tokenizer(), layout, LAYERS, spec, batch_size=4, root=tmp_path / "one",
                            progress=False)
    for layer in LAYERS:
        assert torch.equal(resumed[0]["C"][layer], resumed[1]["C"][layer])
        torch.testing.assert_close(resumed[0]["C"][layer], single[layer], rtol=1e-6, atol=1e-7)
    assert not list(root.rglob("partial-*"))


def test_shards_cover_every_sample_once() -> None:
    for n in (0, 1, 7, 40):
        for world in (1, 2, 3):
            bounds = [Shard(rank, world).bounds(n) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_the_documented_torchrun_command(corpus_file: str, tiny_dir: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m nse_hub.cli stats compute``: rank 0 caches the one-process C."""
    cache = tmp_path / "cache"
    settings = ["--set", f"mom2_dataset={corpus_file}", "--set", "mom2_n_samples=40", "--set",
                "mom2_sample_length=16", "--set", "layers=[1,2]"]
    env = {**os.environ, "NSE_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "nse_hub.cli", "stats", "compute",
                           str(tiny_dir), "--device", "cpu", "--quiet", *settings],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert sorted(printed) == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]  # rank 0 only

    model = tiny_model("llama")
    spec = StatsSpec(model_sha256(model), corpus_file, n_samples=40, sample_length=16, seed=0)
    single = second_moments(model, tiny_tokenizer(), ModelLayout.detect(model), LAYERS, spec, batch_size=10,
                            root=tmp_path / "one", progress=False)
    for layer in LAYERS:
        path = Path(printed[f"model.layers.{layer}.mlp.down_proj"])
        assert path.is_file() and path.is_relative_to(cache)
        torch.testing.assert_close(stats._read(path)[0], single[layer], rtol=1e-6, atol=1e-7)
