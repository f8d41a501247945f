"""One opt-in test against the real Hugging Face Hub (Xet transfers, server-side card validation, permissions).

Run with ``NSE_HUB_LIVE_TESTS=1 NSE_HUB_LIVE_NAMESPACE=you HF_TOKEN=hf_… pytest tests/test_hub_live.py``.
It pushes two rounds of a tiny model's edits to a new private repository in that namespace, reads them
back, and deletes the repository.
"""

import os
import uuid
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_HPARAMS
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from nse_hub import EditSession, load_requests

pytestmark = pytest.mark.skipif(
    not (os.environ.get("NSE_HUB_LIVE_TESTS") and os.environ.get("NSE_HUB_LIVE_NAMESPACE")),
    reason="live Hub test: set NSE_HUB_LIVE_TESTS=1, NSE_HUB_LIVE_NAMESPACE and HF_TOKEN to run it")


def test_push_and_pull_on_the_real_hub(tiny_dir: Path) -> None:
    repo = f"{os.environ['NSE_HUB_LIVE_NAMESPACE']}/nse-hub-live-{uuid.uuid4().hex[:8]}"
    requests = load_requests(FIXTURES / "requests.json")
    session = EditSession.from_pretrained(str(tiny_dir), device="cpu", **TINY_HPARAMS, layers=(1, 2))
    session.edit(requests[:2], progress=False)
    session.edit(requests[2:], progress=False)
    api = HfApi()
    try:
        pushed = session.push_to_hub(repo, private=True)
        assert [p.round for p in pushed] == [1, 2]
        assert session.push_to_hub(repo, private=True) == []
        card = ModelCard.load(hf_hub_download(repo, "README.md", revision="round-2"))
        card.validate()  # the Hub's own metadata validation
        resumed = EditSession.from_pretrained(repo, revision="round-1", device="cpu")
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            assert torch.equal(resumed.model(input_ids=ids).logits, session.merge(round=1)(input_ids=ids).logits)
    finally:
        api.delete_repo(repo, missing_ok=True)
