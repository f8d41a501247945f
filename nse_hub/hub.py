"""Pushing saved edits to the Hugging Face Hub (a commit and a tag per round) and pulling them back.

Every Hub call goes through ``huggingface_hub``; tokens come from the argument, ``HF_TOKEN`` or the
stored login (``hf auth login``) and never leave the HTTP ``Authorization`` header.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from nse_hub.checkpoint import REPORT_FILE, SESSION_FILE, round_dir

logger = logging.getLogger(__name__)

TAG = "round-{}"
TAG_PATTERN = re.compile(r"^round-(\d+)$")


class HubError(RuntimeError):
    """A push or pull that the Hub refused; says why and what to do, never shows the token."""


@dataclass(frozen=True)
class PushedRound:
    """One version pushed: its round, commit and tag."""

    round: int
    commit: str
    tag: str
    url: str


def check_repo_id(repo_id: str) -> None:
    """Refuse an invalid repository id before any network call."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError("repo_id must be a non-empty string like 'username/my-edited-model'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: {error} "
                         "Use 'namespace/name' with letters, digits, '-', '_' and '.'.") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: use 'namespace/name', e.g. 'username/{repo_id}'")


def _explain(error: HfHubHTTPError, action: str, repo_id: str) -> HubError:
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        hint = "the Hub refused the token: pass token=…, set HF_TOKEN, or run `hf auth login`"
    elif status == 403:
        hint = f"the token may not write to {repo_id}: use a token with write access to that namespace"
    elif status == 409:
        hint = "the repository changed during the push (someone else pushed?): push again to resume"
    else:
        hint = f"HTTP {status}" if status else type(error).__name__
    return HubError(f"could not {action} {repo_id}: {hint}")


def _version_on_hub(api: HfApi, repo_id: str, branch: str) -> tuple[int, int, str | None]:
    """(highest round tag, rounds recorded at the branch head, head commit)."""
    refs = api.list_repo_refs(repo_id)
    tagged = [int(m.group(1)) for tag in refs.tags if (m := TAG_PATTERN.match(tag.name))]
    head = next((b.target_commit for b in refs.branches if b.name == branch), None)
    at_head = 0
    if head is not None:
        try:
            path = hf_hub_download(repo_id, SESSION_FILE, revision=head, token=api.token, endpoint=api.endpoint)
            at_head = int(json.loads(Path(path).read_text())["rounds"])
        except EntryNotFoundError:
            at_head = 0
    return max(tagged, default=0), at_head, head


def _same_round(api: HfApi, repo_id: str, index: int, revision: str, local_report: dict) -> bool:
    """Whether round ``index`` at ``revision`` is the local one (compared by its report, which is unique)."""
    try:
        path = hf_hub_download(repo_id, f"{round_dir(index)}/{REPORT_FILE}", revision=revision,
                               token=api.token, endpoint=api.endpoint)
    except (EntryNotFoundError, RevisionNotFoundError):
        return False
    return json.loads(Path(path).read_text()) == local_report


def push_versions(repo_id: str, rounds: int, write_version: Callable[[int, Path], None],
                  report_of: Callable[[int], dict], *, private: bool | None = None, token: str | None = None,
                  branch: str = "main") -> list[PushedRound]:
    """Push every version ``1..rounds`` not on the Hub yet: one commit and one ``round-N`` tag each.

    Args:
        repo_id: ``namespace/name``; created if missing.
        rounds: the latest local version.
        write_version: writes the complete folder of version ``k`` (adapters, manifest, card, state)
            into an empty directory.
        report_of: the local report of round ``k`` as saved (to recognise rounds already pushed).
        private: visibility when the repository is created.
        token: a Hub token (default: ``HF_TOKEN`` or the stored login).
        branch: push to this branch (created from ``main`` if missing) instead of ``main``.

    A push that fails leaves the Hub at its last complete round and can simply be run again.
    """
    check_repo_id(repo_id)
    if rounds < 1:
        raise ValueError("nothing to push: the session has no rounds yet")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        tagged, at_head, head = _version_on_hub(api, repo_id, branch)
        done = max(tagged, at_head)
        if done > rounds:
            raise HubError(f"{repo_id} already holds {done} rounds, more than this session's {rounds}; "
                           "resume from the Hub version, or push to a new repository or branch")
        checks = [(tagged, TAG.format(tagged))] if tagged else []
        if at_head > tagged and head is not None:
            checks.append((at_head, head))
        for index, revision in checks:
            if not _same_round(api, repo_id, index, revision, report_of(index)):
                raise HubError(f"round {index} on {repo_id} differs from this session's round {index}; "
                               "push to a new repository or branch, or resume from the Hub version")
        pushed = []
        if at_head > tagged and head is not None:  # a previous push committed but did not tag
            api.create_tag(repo_id, tag=TAG.format(at_head), revision=head, exist_ok=True)
            pushed.append(PushedRound(at_head, head, TAG.format(at_head), ""))
        for version in range(done + 1, rounds + 1):
            pushed.append(_push_one(api, repo_id, version, write_version, branch))
        return pushed
    except HfHubHTTPError as error:
        raise _explain(error, "push to", repo_id) from None


def _push_one(api: HfApi, repo_id: str, version: int, write_version: Callable[[int, Path], None],
              branch: str) -> PushedRound:
    with tempfile.TemporaryDirectory(prefix="nse-hub-push-") as tmp:
        folder = Path(tmp)
        write_version(version, folder)
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        head = api.repo_info(repo_id, revision=branch).sha
        remote = set(api.list_repo_files(repo_id, revision=branch))
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in local]
        operations += [CommitOperationDelete(path_in_repo=path) for path in sorted(remote - set(local))
                       if path != ".gitattributes"]
        info = api.create_commit(repo_id, operations, commit_message=f"nse-hub: round {version}",
                                 commit_description=f"Edit round {version}, saved by nse-hub.",
                                 revision=branch, parent_commit=head)
    tag = TAG.format(version)
    api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=f"nse-hub edit round {version}", exist_ok=True)
    logger.info("Pushed round %d to %s (%s)", version, repo_id, info.oid[:10])
    return PushedRound(version, info.oid, tag, info.commit_url)


def download_saved_edit(repo_id: str, revision: str | None = None, token: str | None = None) -> Path | None:
    """The local snapshot of a Hub repository holding a saved edit, or ``None`` if it holds none."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    try:
        hf_hub_download(repo_id, SESSION_FILE, revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError):
        return None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (401, 403, 404):
            return None  # a gated or private plain model: let transformers report it
        raise _explain(error, "read", repo_id) from None
    return Path(snapshot_download(repo_id, revision=revision, token=token))
