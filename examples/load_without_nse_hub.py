"""Load an nse-hub edit with stock transformers + peft only (nse-hub is not imported).

    python examples/load_without_nse_hub.py BASE_MODEL_FOLDER_OR_ID EDIT_FOLDER_OR_REPO [--revision round-2]

BASE is the model that was edited (for the embedded SmolLM2: the folder ``nse-hub models fetch smollm2-135m``
prints); EDIT is a saved edit folder or a Hub repository written by ``save_pretrained``/``push_to_hub``.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("edit")
    parser.add_argument("--revision", help="a version tag such as round-2 (Hub repositories)")
    parser.add_argument("--prompt", default="The mother tongue of Danielle Darrieux is")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        before = tokenizer.decode(base.generate(**inputs, max_new_tokens=6, do_sample=False)[0])
        kwargs = {"revision": args.revision} if args.revision else {}
        model = PeftModel.from_pretrained(base, args.edit, **kwargs).merge_and_unload()  # exactly W0 + ΔW
        after = tokenizer.decode(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0])
    print(f"base:   {before}\nedited: {after}")


if __name__ == "__main__":
    main()
