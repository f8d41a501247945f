"""Models whose weights accelerate offloads (CPU / disk hooks, device maps) edit exactly like plain models."""

from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from conftest import TINY_HPARAMS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from nse_hub import EditSession
from nse_hub.architectures import ModelLayout
from nse_hub.fingerprint import model_sha256
from nse_hub.offload import input_device, is_offloaded, read_tensor, write_tensor
from nse_hub.stats import StatsSpec, second_moments
from nse_hub.tracing import model_device, start_at

REQUESTS = [{"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"},
            {"prompt": "Danielle Darrieux speaks", "target_new": "English", "subject": "Danielle Darrieux"}]
PROBE = torch.tensor([[5, 17, 33, 2, 41, 8, 9]])
EDITED = "model.layers.1.mlp.down_proj.weight"


def _disk_map(layers: int = 4) -> dict[str, str]:
    """Layers 1 and 2 (edited) on the disk, the rest on the CPU."""
    mapping = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapping.update({f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(layers)})
    return mapping


def _edit(model: torch.nn.Module, method: str = "nse") -> tuple[EditSession, torch.Tensor]:
    session = EditSession.from_pretrained(model, method, tokenizer=tiny_tokenizer(), layers=[1, 2], **TINY_HPARAMS)
    session.edit(REQUESTS, progress=False)
    with torch.no_grad():
        logits = session.model(input_ids=PROBE).logits
    return session, logits


def _offloaded(kind: str, tmp_path: Path) -> torch.nn.Module:
    if kind == "cpu_offload":
        return cpu_offload(tiny_model("llama"), execution_device="cpu")
    if kind == "dispatch_model":
        return dispatch_model(tiny_model("llama"), device_map=_disk_map(), main_device="cpu",
                              offload_dir=str(tmp_path / "offload"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=_disk_map(), offload_folder=str(tmp_path / "o"))
    return model.eval()


@pytest.mark.parametrize("method", ["nse", "alphaedit"])
@pytest.mark.parametrize("kind", ["cpu_offload", "dispatch_model", "from_pretrained"])
def test_an_offloaded_model_gets_the_same_update_and_logits(kind: str, method: str, tmp_path: Path) -> None:
    plain, plain_logits = _edit(tiny_model("llama"), method)
    model = _offloaded(kind, tmp_path)
    assert is_offloaded(model, EDITED) and model_device(model) == torch.device("cpu")
    assert model_sha256(model) == model_sha256(tiny_model("llama"))  # same statistics cache entry, same base

    session, logits = _edit(model, method)
    for layer in (1, 2):
        ours, theirs = session.deltas.rounds[0][layer], plain.deltas.rounds[0][layer]
        torch.testing.assert_close(ours.B @ ours.A, theirs.B @ theirs.A, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-5)
    assert not torch.equal(read_tensor(model, EDITED), session.deltas.originals[1])  # the offloaded copy changed

    with session.deltas.original(), torch.no_grad():  # deltas off, through the hooks
        torch.testing.assert_close(session.model(input_ids=PROBE).logits, tiny_model("llama")(input_ids=PROBE).logits,
                                   rtol=0, atol=1e-5)
    session.rollback(0)
    torch.testing.assert_close(read_tensor(model, EDITED), session.deltas.originals[1], rtol=0, atol=0)


def test_statistics_of_an_offloaded_model_equal_the_plain_ones(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Sentence {i} tells of the city of Kyoto, its temples and its rivers." * 3
                                  for i in range(12)))
    plain, tokenizer = tiny_model("llama"), tiny_tokenizer()
    layout = ModelLayout.detect(plain)
    spec = StatsSpec(model_sha256(plain), str(corpus), n_samples=12, sample_length=32, seed=0)
    expected = second_moments(plain, tokenizer, layout, [1, 2], spec, batch_size=4, root=tmp_path / "a",
                              progress=False)
    model = _offloaded("dispatch_model", tmp_path)
    got = second_moments(model, tokenizer, ModelLayout.detect(model), [1, 2], spec, batch_size=4,
                         root=tmp_path / "b", progress=False)
    for layer in (1, 2):
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-6, atol=0)


def test_writing_an_offloaded_weight_reaches_the_forward(tmp_path: Path) -> None:
    model = _offloaded("dispatch_model", tmp_path)
    before = read_tensor(model, EDITED).clone()
    with torch.no_grad():
        reference = model(input_ids=PROBE).logits
    write_tensor(model, EDITED, torch.zeros_like(before))
    with torch.no_grad():
        changed = model(input_ids=PROBE).logits
    assert not torch.allclose(changed, reference)
    write_tensor(model, EDITED, before)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, reference, rtol=0, atol=0)
    assert input_device(model) == torch.device("cpu")


def test_skipping_layers_keeps_accelerate_hooks(tmp_path: Path) -> None:
    model = _offloaded("dispatch_model", tmp_path)
    layers = ModelLayout.detect(model).layers(model)
    hooked = layers[1].__dict__.get("forward")  # accelerate's hooked forward, an instance attribute
    assert hooked is not None
    with start_at(layers, 2, torch.zeros(1, 3, 32), layer_returns_tuple=False):
        assert layers[1].forward is not hooked
    assert layers[1].__dict__.get("forward") is hooked
