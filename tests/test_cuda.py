"""The CUDA path: every method edits, saves and loads back with stock peft on a GPU (skipped without one).

CI has no GPU; these tests run where one is (see the main README's GPU section for what they verified).
"""

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS, save_tiny
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from nse_hub import EditSession, load_requests
from nse_hub.config import METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible to torch)")

REQUESTS = load_requests(FIXTURES / "requests.json")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_edit_save_and_stock_load_on_cuda(tmp_path, family, method):
    base = save_tiny(tmp_path / "base", family)
    session = EditSession.from_pretrained(str(base), method=method, **TINY_HPARAMS)
    assert session.model.device.type == "cuda"  # the default device when a GPU is visible
    half = len(REQUESTS) // 2
    session.edit(REQUESTS[:half], progress=False)
    session.edit(REQUESTS[half:], progress=False)
    session.save_pretrained(tmp_path / "edit")

    ids = AutoTokenizer.from_pretrained(base)([r.prompt for r in REQUESTS], return_tensors="pt",
                                              padding=True).input_ids.cuda()
    stock = AutoModelForCausalLM.from_pretrained(base).cuda().eval()
    stock = PeftModel.from_pretrained(stock, tmp_path / "edit").eval()
    with torch.no_grad():
        gap = (session.model(ids).logits.float() - stock(ids).logits.float()).abs().max().item()
    assert gap < 1e-4
