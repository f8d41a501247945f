"""Second-moment statistics: value, one pass for all layers, disk cache, corpora, sample rule, resuming, checks."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import save_file

from nse_hub import stats
from nse_hub.architectures import ModelLayout
from nse_hub.config import make_config
from nse_hub.corpus import SAMPLE_STARTS, Corpus, token_sequences
from nse_hub.fingerprint import model_sha256
from nse_hub.stats import (
    StatisticsError,
    StatsSpec,
    check_second_moment,
    default_stat_samples,
    sample_size_warning,
    second_moments,
    sufficient_stat_samples,
)
from nse_hub.tokens import encode
from nse_hub.tracing import run_forward

FACTS = [
    "The mother tongue of Danielle Darrieux is French. Apple A5 was created by Apple.",
    "Ferrari F40, developed by Ferrari. The official religion of Edwin of Northumbria is Christianity.",
    "Saint Petersburg is a twin city of Warsaw. Inner Circle railway line can be found in Melbourne.",
    "Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain.",
    "What does Thomas Joannes Stieltjes speak? Dutch. Anaal Nathrakh originated in Birmingham.",
    "Brian Eno is a citizen of the United Kingdom. Michel Denisot speaks French at home.",
    "The headquarters of Nokia is in Espoo, and Nokia makes telephones and network equipment.",
    "Kyoto is a city in Japan; its temples draw many visitors every year, in spring and in autumn.",
]
TEXT = "\n\n".join(FACTS) + "\n"


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_matches_a_direct_computation_and_runs_one_pass(corpus_file: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=14, sample_length=12, seed=0)
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    result = second_moments(model, tokenizer, layout, [1, 2], spec, batch_size=4, root=tmp_path, progress=False)
    handle.remove()

    sequences = list(token_sequences(Corpus.parse(str(corpus_file)), tokenizer, 14, 12))
    assert len(calls) == -(-len(sequences) // 4)  # one forward per batch, both layers at once
    for layer in (1, 2):
        inputs = []
        hook = layout.projection(model, layer).register_forward_pre_hook(
            lambda _m, a, inputs=inputs: inputs.append(a[0][0]))
        with torch.no_grad():
            for seq in sequences:
                model(input_ids=torch.tensor([seq]))
        hook.remove()
        keys = torch.cat(inputs).double()
        expected = keys.T @ keys / len(keys)
        assert torch.allclose(result[layer].double(), expected, rtol=1e-5, atol=1e-7)


def test_cached_statistics_are_reused(corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=40, sample_length=16, seed=0)
    first = second_moments(model, tokenizer, layout, [0, 1], spec, root=tmp_path, progress=False)
    assert spec.path(layout, 0, tmp_path).is_file()

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(stats, "_measure", no_measuring)
    again = second_moments(model, tokenizer, layout, [0, 1], spec, root=tmp_path, progress=False)
    assert all(torch.equal(first[layer], again[layer]) for layer in (0, 1))
    # A different corpus sample is a different cache entry.
    other = StatsSpec(spec.model_fingerprint, spec.corpus, 39, 16, 0)
    with pytest.raises(AssertionError, match="recomputed"):
        second_moments(model, tokenizer, layout, [0], other, root=tmp_path, progress=False)


def test_model_sampled_corpus_is_reproducible() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    first = list(token_sequences(Corpus("model"), tokenizer, 5, 10, model=model, seed=3))
    second = list(token_sequences(Corpus("model"), tokenizer, 5, 10, model=model, seed=3))
    other = list(token_sequences(Corpus("model"), tokenizer, 5, 10, model=model, seed=4))
    assert first == second and first != other
    assert len(first) == 5 and all(len(s) == 10 for s in first)


def test_corpus_names(corpus_file: Path, tmp_path: Path) -> None:
    assert Corpus.parse("model") == Corpus("model")
    assert Corpus.parse(str(corpus_file)).kind == "files"
    assert Corpus.parse(str(tmp_path / "*.txt")).kind == "files"
    assert Corpus.parse("wikitext:wikitext-103-raw-v1") == Corpus("hub", "wikitext:wikitext-103-raw-v1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \.txt"):
        Corpus.parse(str(empty))
    # A files corpus is keyed by content, not by path.
    copy = tmp_path / "copy.txt"
    copy.write_text(TEXT)
    assert Corpus.parse(str(copy)).key == Corpus.parse(str(corpus_file)).key


# --- how much text: the default sample grows with d_ff -------------------------------------------

def _layout_with(d_ff: int, layers: int = 32) -> ModelLayout:
    return dataclasses.replace(ModelLayout.detect(tiny_model("llama")), intermediate_size=d_ff, num_layers=layers)


def test_default_sample_grows_with_d_ff() -> None:
    assert default_stat_samples(8192, 64) * 64 >= 81_920
    assert default_stat_samples(14_336, 64) * 64 >= 143_360
    assert default_stat_samples(1536, 64) == 320  # SmolLM2 keeps its measured 320 × 64
    assert default_stat_samples(2048, 64) == 320  # Gemma 3 270M too
    assert default_stat_samples(8192, 100) * 100 >= 81_920

    config = make_config(_layout_with(8192))  # no preset matches this shape
    assert config.preset is None
    assert config.mom2_n_samples * config.mom2_sample_length >= 10 * 8192
    longer = make_config(_layout_with(8192), mom2_sample_length=128)
    assert longer.mom2_n_samples * 128 >= 10 * 8192 and longer.mom2_n_samples < config.mom2_n_samples


def test_presets_keep_their_sample_and_explicit_values_win() -> None:
    smollm2_shape = dataclasses.replace(_layout_with(1536, 30), hidden_size=576)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preset = make_config(smollm2_shape, "smollm2-135m")
        assert (preset.preset, preset.mom2_n_samples, preset.mom2_sample_length) == ("smollm2-135m", 320, 64)
        assert make_config(_layout_with(8192), mom2_n_samples=2000).mom2_n_samples == 2000
    with pytest.warns(UserWarning, match=r"81,920.*mom2_n_samples >= 1280"):
        assert make_config(_layout_with(8192), mom2_n_samples=320).mom2_n_samples == 320
    with pytest.warns(UserWarning, match="fewer than d_ff, so C will be singular"):
        make_config(_layout_with(8192), mom2_n_samples=100)


# --- resuming an interrupted pass ------------------------------------------------------------------

class _Interrupt(Exception):
    pass


def _count_forwards(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[int]:
    calls: list[int] = []
    real = run_forward

    def forward(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise _Interrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "run_forward", forward)
    return calls


@pytest.mark.parametrize(("corpus", "n_samples", "length", "batch"), [("file", 24, 12, 4), ("model", 80, 8, 16)])
def test_an_interrupted_pass_resumes_to_the_same_matrix(corpus: str, n_samples: int, length: int, batch: int,
                                                        corpus_file: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    name = str(corpus_file) if corpus == "file" else "model"
    spec = StatsSpec(model_sha256(model), name, n_samples=n_samples, sample_length=length, seed=1)
    whole = second_moments(model, tokenizer, layout, [1, 2], spec, batch_size=batch, root=tmp_path / "a",
                           progress=False)

    root = tmp_path / "b"
    _count_forwards(monkeypatch, fail_after=3)
    with pytest.raises(_Interrupt):
        second_moments(model, tokenizer, layout, [1, 2], spec, batch_size=batch, root=root, progress=False)
    partial = spec.partial_path(layout, [1, 2], root)
    assert partial.is_file() and not spec.path(layout, 1, root).exists()

    calls = _count_forwards(monkeypatch)
    resumed = second_moments(model, tokenizer, layout, [1, 2], spec, batch_size=batch, root=root, progress=False)
    batches = -(-len(list(token_sequences(Corpus.parse(name), tokenizer, n_samples, length, model=model, seed=1)))
                // batch)
    assert len(calls) == batches - 3  # only what the interrupted pass had not done
    assert all(torch.equal(whole[layer], resumed[layer]) for layer in (1, 2))
    assert not partial.exists() and spec.path(layout, 2, root).is_file()


def test_partial_sums_are_saved_periodically(corpus_file: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=24, sample_length=12, seed=0)
    saved: list[int] = []
    real = stats._save_partial
    monkeypatch.setattr(stats, "_save_partial", lambda path, sums, samples, *rest: (saved.append(samples),
                                                                                  real(path, sums, samples, *rest)))
    second_moments(model, tokenizer, layout, [1], spec, batch_size=4, root=tmp_path, progress=False,
                   checkpoint_seconds=0)
    assert saved == [4, 8, 12, 16, 20]  # before every batch after the first (the end writes the result)
    saved.clear()
    spec2 = dataclasses.replace(spec, seed=5)
    second_moments(model, tokenizer, layout, [1], spec2, batch_size=4, root=tmp_path, progress=False,
                   checkpoint_seconds=3600)
    assert saved == []


# --- singular statistics fail early, naming the layer and the fix --------------------------------

def test_too_few_tokens_raise_naming_the_layer_and_the_fix(corpus_file: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=3, sample_length=12, seed=0)  # 36 < 64
    with pytest.raises(StatisticsError, match=r"model\.layers\.2\.mlp\.down_proj.*singular.*36 tokens.*mom2_n_samples"):
        second_moments(model, tokenizer, layout, [2], spec, root=tmp_path, progress=False)
    assert not spec.path(layout, 2, tmp_path).exists()  # never cached


def test_rank_deficient_matrices_are_refused() -> None:
    torch.manual_seed(0)
    keys = torch.randn(500, 64)
    healthy = keys.T @ keys / 500
    assert check_second_moment(healthy, "layer", tokens=500) > 1e-3
    few = keys[:40]
    with pytest.raises(StatisticsError, match=r"layer.*(not positive definite|numerically singular).*640 tokens"):
        check_second_moment(few.T @ few / 40, "layer")  # rank 40 of 64, token count unknown
    duplicated = torch.cat([keys, keys[:, :1]], dim=1)  # neuron 64 copies neuron 0
    with pytest.raises(StatisticsError, match=r"(not positive definite|numerically singular)"):
        check_second_moment(duplicated.T @ duplicated / 500, "layer", tokens=500)
    dead = healthy.clone()
    dead[5, :] = dead[:, 5] = 0
    with pytest.raises(StatisticsError, match=r"1 neuron\(s\) \(first: 5\) never fired"):
        check_second_moment(dead, "layer")
    with pytest.raises(StatisticsError, match="singular: it was measured on 40 tokens, fewer than its 64"):
        check_second_moment(healthy, "layer", tokens=40)


def test_a_singular_cached_matrix_is_refused_when_loaded(corpus_file: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=14, sample_length=12, seed=0)
    keys = torch.randn(30, 64)
    path = spec.path(layout, 1, tmp_path)
    path.parent.mkdir(parents=True)
    save_file({"second_moment": keys.T @ keys / 30}, str(path), metadata={"tokens": "500"})  # an old, unchecked file
    with pytest.raises(StatisticsError, match=r"model\.layers\.1\.mlp\.down_proj \(cached at .*\)"):
        second_moments(model, tokenizer, layout, [1], spec, root=tmp_path, progress=False)


# --- corpora: every local kind works offline --------------------------------------------------------

def _windows(tokenizer, texts: list[str], length: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), length):
            if len(ids[start:start + length]) < 8 and start > 0:
                break
            out.append(ids[start:start + length])
    return out


def test_local_corpora_work_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tokenizer = tiny_tokenizer()
    expected = _windows(tokenizer, FACTS, 12)

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(FACTS[:4]))
    (folder / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": f, "id": i}) + "\n"
                                                    for i, f in enumerate(FACTS[4:])))
    import datasets

    records = datasets.Dataset.from_dict({"text": FACTS, "id": list(range(len(FACTS)))})
    records.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": records, "test": records.select([0])}).save_to_disk(str(tmp_path / "saved-dict"))
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    records.to_parquet(str(tmp_path / "parquet" / "data" / "train-00000-of-00001.parquet"))

    for name, kind in [(folder, "files"), (folder / "**" / "*.jsonl", "files"), (tmp_path / "saved", "disk"),
                       (tmp_path / "saved-dict", "disk"), (tmp_path / "parquet", "folder")]:
        corpus = Corpus.parse(str(name))
        assert corpus.kind == kind, name
        got = list(token_sequences(corpus, tokenizer, 100, 12))
        want = _windows(tokenizer, FACTS[4:], 12) if "jsonl" in str(name) else expected
        assert got == want, name
        assert list(token_sequences(corpus, tokenizer, 100, 12, skip=3)) == want[3:]
        assert corpus.key == Corpus.parse(str(name)).key and corpus.describe()
    # A dataset saved with other content is another cache entry.
    records.select(range(3)).save_to_disk(str(tmp_path / "saved-3"))
    assert Corpus.parse(str(tmp_path / "saved-3")).key != Corpus.parse(str(tmp_path / "saved")).key


def test_statistics_from_a_saved_dataset(tmp_path: Path) -> None:
    import datasets

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    datasets.Dataset.from_dict({"text": FACTS}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "plain.txt").write_text("\n\n".join(FACTS))
    from_disk = second_moments(model, tokenizer, layout, [1],
                               StatsSpec(model_sha256(model), str(tmp_path / "saved"), 14, 12, 0),
                               root=tmp_path / "cache", progress=False)
    from_text = second_moments(model, tokenizer, layout, [1],
                               StatsSpec(model_sha256(model), str(tmp_path / "plain.txt"), 14, 12, 0),
                               root=tmp_path / "cache", progress=False)
    assert torch.equal(from_disk[1], from_text[1])


def test_model_samples_skip_exactly() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    whole = list(token_sequences(Corpus("model"), tokenizer, 70, 6, model=model, seed=2))
    for skip in (0, 5, 64, 66):
        assert list(token_sequences(Corpus("model"), tokenizer, 70, 6, model=model, seed=2, skip=skip)) == whole[skip:]


def test_model_sampling_shows_its_progress_and_samples_the_same(capsys) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    quiet = list(token_sequences(Corpus("model"), tokenizer, 70, 6, model=model, seed=2))
    shown = list(token_sequences(Corpus("model"), tokenizer, 70, 6, model=model, seed=2, progress=True))
    assert shown == quiet
    bar = capsys.readouterr().err
    starts = [len(encode(tokenizer, SAMPLE_STARTS[i % len(SAMPLE_STARTS)])) for i in range(70)]
    generated = sum(len(batch) * (6 - min(batch)) for batch in (starts[:64], starts[64:]))  # two sampling batches
    assert "sampling text" in bar and f"/{generated} [" in bar  # the bar counts every generated token


def test_sufficient_stat_samples_meet_the_ten_tokens_per_neuron_rule() -> None:
    assert sufficient_stat_samples(1536, 64) == 240  # SmolLM2: 15,360 tokens, below the presets' 320 × 64
    assert default_stat_samples(1536, 64) == 320
    for d_ff, length in ((1536, 64), (2048, 64), (8192, 100), (64, 16)):
        n = sufficient_stat_samples(d_ff, length)
        assert sample_size_warning(d_ff, n, length) is None and sample_size_warning(d_ff, n - 1, length)
