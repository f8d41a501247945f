"""Value optimisation at round sizes beyond one chunk: chunks of whole requests change nothing but speed/memory."""

import pytest
import torch
from conftest import FIXTURES, tiny_model, tiny_tokenizer

from nse_hub.algorithm.batches import build_value_batch
from nse_hub.algorithm.values import optimize_values, optimize_values_reference, value_chunks
from nse_hub.architectures import ModelLayout
from nse_hub.config import EditConfig
from nse_hub.requests import load_requests
from nse_hub.tokens import pad_id

TEMPLATES = ["{}", "Once upon a time. {}", "I think. {}"]


def _setup(family: str = "llama"):
    model = tiny_model(family).requires_grad_(False)
    tokenizer = tiny_tokenizer()
    requests = load_requests(FIXTURES / "requests.json")
    return model, tokenizer, ModelLayout.detect(model), build_value_batch(tokenizer, requests, TEMPLATES)


def test_chunks_hold_whole_requests_within_the_bound() -> None:
    _, _, _, batch = _setup()
    rows = len(TEMPLATES) + 1  # per request: its templates and its KL prompt
    assert value_chunks(batch, 10_000) == [[0, 1, 2, 3]]
    assert value_chunks(batch, 2 * rows) == [[0, 1], [2, 3]]
    assert value_chunks(batch, 2 * rows + 1) == [[0, 1], [2, 3]]
    assert value_chunks(batch, 1) == [[0], [1], [2], [3]]  # a request larger than the bound runs alone
    sub = batch.subset([2, 3])
    assert sub.num_requests == 2 and len(sub.sequences) == 2 * rows
    assert sub.sequences[sub.plain_row[0]] == batch.sequences[batch.plain_row[2]]
    assert sub.sequences[sub.kl_row[1]] == batch.sequences[batch.kl_row[3]]
    assert set(sub.request_of) == {0, 1}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_values_equal_one_loop_and_the_reference(family: str) -> None:
    model, tokenizer, layout, batch = _setup(family)
    config = EditConfig(layers=(0, 1), v_num_grad_steps=6, v_lr=0.3)
    whole = optimize_values(model, layout, batch, config, pad_id(tokenizer))
    again = optimize_values(model, layout, batch, config, pad_id(tokenizer), max_sequences=len(batch.sequences))
    assert torch.equal(whole.targets, again.targets)  # one chunk: the same computation
    for limit in (1, 2 * (len(TEMPLATES) + 1)):
        chunked = optimize_values(model, layout, batch, config, pad_id(tokenizer), max_sequences=limit)
        assert torch.allclose(chunked.hidden, whole.hidden, atol=1e-6)
        assert torch.allclose(chunked.targets, whole.targets, atol=1e-5)
        assert chunked.steps == whole.steps
        assert chunked.loss == pytest.approx(whole.loss, rel=1e-4)
    reference = optimize_values_reference(model, layout, batch, config, pad_id(tokenizer))
    assert torch.allclose(chunked.targets, reference.targets, atol=1e-4)


def test_progress_bar_counts_steps_times_chunks(capsys: pytest.CaptureFixture) -> None:
    model, tokenizer, layout, batch = _setup()
    config = EditConfig(layers=(0, 1), v_num_grad_steps=5)
    optimize_values(model, layout, batch, config, pad_id(tokenizer), max_sequences=8, progress=True)
    err = capsys.readouterr().err
    assert "values (4 requests)" in err and "/8" in err  # 4 steps × 2 chunks
    optimize_values(model, layout, batch, config, pad_id(tokenizer), progress=False)
    assert "values" not in capsys.readouterr().err


def test_default_chunks_follow_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from nse_hub.algorithm import values

    model, _, layout, batch = _setup()
    need = values.sequence_bytes(model, layout, batch, z=1)
    assert need > 0
    assert values.chunk_sequences(model, layout, batch, z=1) >= len(batch.sequences)  # small rounds: one chunk
    monkeypatch.setitem(values.CHUNK_BYTES, "cpu", 2 * need * (len(TEMPLATES) + 1))
    assert values.chunk_sequences(model, layout, batch, z=1) == 2 * (len(TEMPLATES) + 1)
    seen = []
    monkeypatch.setattr(values, "value_chunks", lambda b, limit: seen.append(limit) or [list(range(b.num_requests))])
    optimize_values(model, layout, batch, EditConfig(layers=(0, 1), v_num_grad_steps=2), 0)
    assert seen == [2 * (len(TEMPLATES) + 1)]
