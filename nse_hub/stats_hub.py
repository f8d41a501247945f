"""Statistics measured once per model, shared through a Hub dataset repository.

The second moments ``C = E[kkᵀ]`` of a base model's edited layers depend only on its weights and the corpus
sample (:class:`~nse_hub.stats.StatsSpec`), so a team measures them once and pushes them; everyone else
downloads them into the local cache instead of running the statistics pass. The dataset repo mirrors the
local cache::

    <model fingerprint[:16]>/<corpus key>/<n>x<length>-seed<seed>/model.layers.4.mlp.down_proj.safetensors
    <model fingerprint[:16]>/<corpus key>/<n>x<length>-seed<seed>/manifest.json   # spec + sha256 of each file

A download is checked against the manifest's sha256 before it enters the cache. (NAS anchors and
AlphaEdit's null spaces are derived per session from these and the first round, so they are not shared.)

Example::

    session = EditSession.from_pretrained("smollm2-135m")
    session.push_statistics("my-org/nse-stats")                                  # once, by whoever measured
    session = EditSession.from_pretrained("smollm2-135m", stats_repo="my-org/nse-stats")   # everyone else
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from nse_hub.architectures import ModelLayout
from nse_hub.errors import HubError, StatisticsError
from nse_hub.hub_http import explain_transport, transport_errors, use_timeout
from nse_hub.io import atomic_path, atomic_write_json, file_sha256
from nse_hub.stats import StatsSpec

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPO_TYPE = "dataset"


def repo_folder(spec: StatsSpec) -> str:
    """The folder of ``spec``'s statistics inside the dataset repo (the local cache's relative layout)."""
    return spec.folder(Path("r")).relative_to("r").as_posix()


def _spec_dict(spec: StatsSpec) -> dict[str, Any]:
    return {"model_fingerprint": spec.model_fingerprint, "corpus": spec.corpus, "n_samples": spec.n_samples,
            "sample_length": spec.sample_length, "seed": spec.seed}


def _remote_manifest(repo_id: str, folder: str, token: str | bool | None,
                     revision: str | None = None) -> dict[str, Any] | None:
    try:
        path = hf_hub_download(repo_id, f"{folder}/{MANIFEST}", repo_type=REPO_TYPE, revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError):
        return None
    return json.loads(Path(path).read_text())


def push_statistics(repo_id: str, spec: StatsSpec, layout: ModelLayout, layers: Sequence[int],
                    token: str | bool | None = None, private: bool | None = None) -> str:
    """Upload the cached second moments of ``layers`` (they must be in the local cache) and their manifest.

    Entries of other layers already in the repo's manifest are kept. Returns the folder in the repo.

    Raises:
        StatisticsError: a layer's statistics are not in the local cache.
        HubError: the Hub refused.
    """
    folder = repo_folder(spec)
    paths = {layer: spec.path(layout, layer) for layer in layers}
    missing = [layout.projection_name(layer) for layer, path in paths.items() if not path.is_file()]
    if missing:
        raise StatisticsError(f"no cached statistics for {', '.join(missing)} to push: measure them first "
                              "(session.push_statistics does)")
    api = HfApi(token=token)
    use_timeout()
    try:
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
        manifest = _remote_manifest(repo_id, folder, token) or {"files": {}}
        with tempfile.TemporaryDirectory(prefix="nse-hub-stats-") as tmp:
            for path in paths.values():
                shutil.copyfile(path, Path(tmp) / path.name)
                manifest["files"][path.name] = file_sha256(path)
            manifest["spec"] = _spec_dict(spec)
            atomic_write_json(Path(tmp) / MANIFEST, manifest)
            api.upload_folder(repo_id=repo_id, repo_type=REPO_TYPE, folder_path=tmp, path_in_repo=folder,
                              commit_message=f"nse-hub: second moments of {len(paths)} module(s) "
                                             f"({spec.model_fingerprint[:12]}…, {spec.corpus})")
    except HfHubHTTPError as error:
        raise HubError(f"could not push statistics to the dataset {repo_id}: {error}") from error
    except transport_errors() as error:
        raise explain_transport(error, "push statistics to the dataset", repo_id) from error
    logger.info("Pushed the statistics of %d module(s) to %s/%s", len(paths), repo_id, folder)
    return folder


def pull_statistics(repo_id: str, spec: StatsSpec, layout: ModelLayout, layers: Sequence[int],
                    token: str | bool | None = None, revision: str | None = None) -> list[int]:
    """Download the second moments of ``layers`` missing from the local cache; returns the layers fetched.

    Layers the repo does not have are left to be measured (a missing repo only logs a warning).

    Raises:
        StatisticsError: a download does not match the manifest's sha256, or the manifest is for another spec.
    """
    wanted = [layer for layer in layers if not spec.path(layout, layer).is_file()]
    if not wanted:
        return []
    folder = repo_folder(spec)
    use_timeout()
    try:
        manifest = _remote_manifest(repo_id, folder, token, revision)
    except (HfHubHTTPError, *transport_errors()) as error:
        logger.warning("Could not read statistics from %s (%s); measuring them here.", repo_id, error)
        return []
    if manifest is None:
        logger.warning("%s has no statistics for this model and corpus (%s); measuring them here.", repo_id, folder)
        return []
    if manifest.get("spec") != _spec_dict(spec):
        raise StatisticsError(f"the statistics manifest {repo_id}/{folder}/{MANIFEST} describes "
                              f"{manifest.get('spec')}, not {_spec_dict(spec)}")
    fetched = []
    for layer in wanted:
        target = spec.path(layout, layer)
        expected = manifest.get("files", {}).get(target.name)
        if expected is None:
            continue
        try:
            downloaded = Path(hf_hub_download(repo_id, f"{folder}/{target.name}", repo_type=REPO_TYPE,
                                              revision=revision, token=token))
        except HfHubHTTPError as error:
            raise HubError(f"could not download {repo_id}/{folder}/{target.name}: {error}; try again, or leave "
                           "stats_repo unset to measure the statistics here") from error
        except transport_errors() as error:
            raise explain_transport(error, "download statistics from", repo_id) from error
        actual = file_sha256(downloaded)
        if actual != expected:
            raise StatisticsError(f"{repo_id}/{folder}/{target.name} has sha256 {actual[:16]}…, but the manifest "
                                  f"says {expected[:16]}…: the download is corrupt or the file was replaced; "
                                  "delete it from the Hub cache and try again")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(downloaded, tmp)
        fetched.append(layer)
    logger.info("Downloaded the statistics of %d module(s) from %s", len(fetched), repo_id)
    return fetched
