"""Second-moment statistics: value, one pass for all layers, disk cache, corpora."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from nse_hub import stats
from nse_hub.architectures import ModelLayout
from nse_hub.corpus import Corpus, token_sequences
from nse_hub.fingerprint import model_sha256
from nse_hub.stats import StatsSpec, second_moments

TEXT = ("The mother tongue of Danielle Darrieux is French. Apple A5 was created by Apple.\n\n"
        "Ferrari F40, developed by Ferrari. The official religion of Edwin of Northumbria is Christianity.\n\n"
        "Saint Petersburg is a twin city of Warsaw. Inner Circle railway line can be found in Melbourne.\n")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_matches_a_direct_computation_and_runs_one_pass(corpus_file: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(model)
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=10, sample_length=12, seed=0)
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    result = second_moments(model, tokenizer, layout, [1, 2], spec, batch_size=4, root=tmp_path, progress=False)
    handle.remove()

    sequences = list(token_sequences(Corpus.parse(str(corpus_file)), tokenizer, 10, 12))
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
    spec = StatsSpec(model_sha256(model), str(corpus_file), n_samples=8, sample_length=12, seed=0)
    first = second_moments(model, tokenizer, layout, [0, 1], spec, root=tmp_path, progress=False)
    assert spec.path(layout, 0, tmp_path).is_file()

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(stats, "_measure", no_measuring)
    again = second_moments(model, tokenizer, layout, [0, 1], spec, root=tmp_path, progress=False)
    assert all(torch.equal(first[layer], again[layer]) for layer in (0, 1))
    # A different corpus sample is a different cache entry.
    other = StatsSpec(spec.model_fingerprint, spec.corpus, 9, 12, 0)
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
