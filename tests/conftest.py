"""Shared fixtures: tiny random models of every supported family, the real SmolLM2, the shared data."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# huggingface_hub reads these when it is first imported, so they are set before anything imports it:
# every Hub call of the test session (ours, peft's, transformers') goes to the loopback Hub server of
# tests/hub_server.py, never to the real Hub, and caches go to a throw-away folder.
HUB_PORT = _free_port()
HUB_TOKEN = "hf_nse_hub_test_token"
if not os.environ.get("NSE_HUB_LIVE_TESTS"):
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="nse-hub-tests-hf-")
    os.environ["HF_TOKEN"] = HUB_TOKEN
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COUNTERFACT = SHARED_DATA / "counterfact_easyedit" / "counterfact-edit.json"

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "gpt2", "gptj", "gpt_neox")


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(FIXTURES / "tiny-tokenizer")


def tiny_model(family: str = "llama", layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of ``family`` with hidden size 32, small enough for unit tests."""
    vocab = len(tiny_tokenizer())
    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "max_position_embeddings": 256}
    llama_like = {**common, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    builders = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**llama_like)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**llama_like)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**llama_like)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=16)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4,
                                                   n_positions=256, bos_token_id=0, eos_token_id=0)),
        "gptj": lambda: GPTJForCausalLM(GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4,
                                                   rotary_dim=4, n_positions=256, bos_token_id=0, eos_token_id=0)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32,
                                                             num_hidden_layers=layers, num_attention_heads=4,
                                                             intermediate_size=64, max_position_embeddings=256)),
    }
    model = builders[family]().eval()
    # Random init leaves the output scale tiny; a larger head makes edits measurable in tests.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def save_tiny(folder: Path, family: str = "llama", seed: int = 0, license: str | None = "apache-2.0") -> Path:
    """A tiny model folder as a Hub download looks: weights, tokenizer and a card stating its license."""
    model = tiny_model(family, seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if license:
        (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# A tiny random {family} model\n")
    return folder


# Small settings that keep tiny-model sessions fast.
TINY_HPARAMS = {"v_lr": 0.5, "mom2_n_samples": 16, "mom2_sample_length": 16, "v_num_grad_steps": 8, "context_length": 6}


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Statistics caches go to a per-run folder (inherited by subprocesses); converted models stay shared."""
    models = Path(os.environ.get("NSE_HUB_CACHE", Path.home() / ".cache" / "nse-hub")) / "models"
    models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("nse-hub-cache")
    (root / "models").symlink_to(models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NSE_HUB_CACHE", str(root))
        yield root


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def hub():
    """The loopback Hub every client of this test session talks to (see HF_ENDPOINT above)."""
    if os.environ.get("NSE_HUB_LIVE_TESTS"):
        pytest.skip("NSE_HUB_LIVE_TESTS is set: the clients talk to the real Hub, not the loopback server")
    from hub_server import HubServer

    with HubServer(token=HUB_TOKEN, port=HUB_PORT) as server:
        yield server


@pytest.fixture(scope="session")
def hub_base(hub, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny llama of ``tiny_dir`` (the same weights) as a model repository on the loopback Hub: edits made on
    it name a base that resolves anywhere, so they can be pulled back with nothing local."""
    folder = save_tiny(tmp_path_factory.mktemp("hub-base") / "tiny-llama")
    hub.seed_repo("tester/tiny-llama", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    return "tester/tiny-llama"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from nse_hub.models import fetch_model

    return fetch_model("smollm2-135m")


def needs_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not COUNTERFACT.is_file(),
                              reason=f"the shared evaluation data is not beside this checkout ({SHARED_DATA})")
