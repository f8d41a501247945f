"""Pushing saved edits to the Hugging Face Hub (a commit and a tag per round) and pulling them back.

Rounds on ``main`` are tagged ``round-N``; rounds pushed to another branch ``<branch>/round-N`` (a branch
started from a version of the same repository begins at that version's commit).

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

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from nse_hub.checkpoint import CARD_FILE, REPORT_FILE, SESSION_FILE, is_checkpoint, round_dir
from nse_hub.errors import HubError, RepoIdError, VersionNotFoundError
from nse_hub.hub_http import explain_transport, transport_errors, use_timeout
from nse_hub.io import WORK_FILES
from nse_hub.models import is_embedded

logger = logging.getLogger(__name__)

TAG = "round-{}"
TAG_PATTERN = re.compile(r"^round-(\d+)$")


def tag_name(branch: str, round: int) -> str:
    """The tag of version ``round`` on ``branch``: ``round-N`` on ``main``, ``<branch>/round-N`` elsewhere."""
    return TAG.format(round) if branch == "main" else f"{branch}/{TAG.format(round)}"


def tag_pattern(branch: str) -> re.Pattern[str]:
    return TAG_PATTERN if branch == "main" else re.compile(rf"^{re.escape(branch)}/round-(\d+)$")


@dataclass(frozen=True)
class PushedRound:
    """One version pushed: its round, commit and tag."""

    round: int
    commit: str
    tag: str  # empty for a version pushed into a pull request
    url: str
    pr_revision: str | None = None  # ``refs/pr/N`` when pushed with ``create_pr``
    metadata_only: bool = False  # a commit of the card and session state alone (new figures), without a tag


def check_repo_id(repo_id: str) -> None:
    """Refuse an invalid repository id (``name`` or ``namespace/name``) before any network call."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise RepoIdError("repo_id must be a non-empty string like 'username/my-edited-model'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RepoIdError(f"invalid Hub repository id {repo_id!r}: {error} "
                         "Use 'namespace/name' with letters, digits, '-', '_' and '.'.") from error


def full_repo_id(api: HfApi, repo_id: str) -> str:
    """``namespace/name``: a bare ``name`` goes to the token's own namespace, as ``transformers`` does."""
    check_repo_id(repo_id)
    if "/" in repo_id:
        return repo_id
    return f"{api.whoami()['name']}/{repo_id}"


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
    details = [f"server: {error.server_message.strip()}" if error.server_message else "",
               f"request id {error.request_id}" if error.request_id else ""]
    details = [d for d in details if d]
    return HubError(f"could not {action} {repo_id}: {hint}" + (f" ({'; '.join(details)})" if details else ""))


def _version_on_hub(api: HfApi, repo_id: str, branch: str) -> tuple[int, int, str | None]:
    """(highest round tag, rounds recorded at the branch head, head commit)."""
    refs = api.list_repo_refs(repo_id)
    pattern = tag_pattern(branch)
    tagged = [int(m.group(1)) for tag in refs.tags if (m := pattern.match(tag.name))]
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


@dataclass(frozen=True)
class PushOptions:
    """How versions are committed (the arguments of ``push_to_hub`` besides the repository).

    Attributes:
        commit_message: the commit title; ``{round}`` is replaced by the round (default ``"nse-hub: round {round}"``).
        commit_description: the commit description, formatted the same way.
        private: visibility when the repository is created.
        token: a Hub token, ``True`` for the stored login, ``False``/``None`` for the default (``HF_TOKEN`` or the
            stored login).
        revision: the branch to push to (created from ``main`` if missing).
        create_pr: open a pull request with the new versions instead of committing to ``revision``; the
            commits of a pull request get no ``round-N`` tags until it is merged and pushed again.
        branch_start: ``(repo_id, revision)`` the session was started from (its branch point): a new branch
            of that repository starts there instead of at ``main``.
        inherited: rounds the branch shares with its parent (its branch point); a branch other than ``main``
            does not tag them again.
    """

    commit_message: str | None = None
    commit_description: str | None = None
    private: bool | None = None
    token: str | bool | None = None
    revision: str = "main"
    create_pr: bool = False
    branch_start: tuple[str, str] | None = None
    inherited: int = 0


def push_versions(repo_id: str, rounds: int, write_version: Callable[[int, Path], None],
                  report_of: Callable[[int], dict], options: PushOptions | None = None) -> list[PushedRound]:
    """Push every version ``1..rounds`` not on the Hub yet: one commit and one ``round-N`` tag each.

    Args:
        repo_id: ``namespace/name``, or ``name`` for the token's own namespace; created if missing.
        rounds: the latest local version.
        write_version: writes the complete folder of version ``k`` (adapters, manifest, card, state)
            into an empty directory.
        report_of: the local report of round ``k`` as saved (to recognise rounds already pushed).
        options: commit messages, visibility, token, branch, pull request.

    A push that fails leaves the Hub at its last complete round and can simply be run again.

    Raises:
        HubError: the Hub refused a call (the message carries its reason and request id), or the Hub holds
            rounds that differ from the local ones.
    """
    options = options or PushOptions()
    if rounds < 1:
        raise VersionNotFoundError("nothing to push: the session has no rounds yet")
    api = HfApi(token=options.token)
    use_timeout()
    try:
        repo_id = full_repo_id(api, repo_id)
        api.create_repo(repo_id, private=options.private, exist_ok=True)
        branch = options.revision
        if branch != "main":
            start = None
            if options.branch_start and options.branch_start[0] in (repo_id, repo_id.split("/", 1)[1]):
                start = options.branch_start[1]
            api.create_branch(repo_id, branch=branch, revision=start, exist_ok=True)
        tagged, at_head, head = _version_on_hub(api, repo_id, branch)
        done = max(tagged, at_head)
        if done > rounds:
            raise HubError(f"{repo_id} already holds {done} rounds, more than this session's {rounds}; "
                           "resume from the Hub version, or push to a new repository or branch")
        checks = [(tagged, tag_name(branch, tagged))] if tagged else []
        if at_head > tagged and head is not None:
            checks.append((at_head, head))
        for index, revision in checks:
            if not _same_round(api, repo_id, index, revision, report_of(index)):
                raise HubError(f"round {index} on {repo_id} differs from this session's round {index}; "
                               "push to a new repository or branch, or resume from the Hub version")
        pushed = []
        inherited = options.inherited if branch != "main" else 0
        if at_head > max(tagged, inherited) and head is not None and not options.create_pr:  # the tag failed
            api.create_tag(repo_id, tag=tag_name(branch, at_head), revision=head, exist_ok=True)
            pushed.append(PushedRound(at_head, head, tag_name(branch, at_head), ""))
        target = branch
        for version in range(done + 1, rounds + 1):
            result = _push_one(api, repo_id, version, write_version, target, options)
            pushed.append(result)
            if options.create_pr and version == done + 1:
                target = result.pr_revision or target  # later versions go into the same pull request
        if done == rounds and head is not None and not options.create_pr:
            recorded = _push_metadata(api, repo_id, rounds, write_version, branch, head)
            pushed += [recorded] if recorded else []
        return pushed
    except HfHubHTTPError as error:
        raise _explain(error, "push to", repo_id) from error
    except transport_errors() as error:  # a connection closed mid-commit, or a Hub that never answered
        raise explain_transport(error, "push to", repo_id) from error


def _push_one(api: HfApi, repo_id: str, version: int, write_version: Callable[[int, Path], None],
              revision: str, options: PushOptions) -> PushedRound:
    with tempfile.TemporaryDirectory(prefix="nse-hub-push-") as tmp:
        folder = Path(tmp)
        write_version(version, folder)
        head = api.repo_info(repo_id, revision=revision, timeout=use_timeout()).sha  # None would wait forever
        opens_pr = options.create_pr and not revision.startswith("refs/pr/")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, parent_commit=None if opens_pr else head,
            commit_message=(options.commit_message or "nse-hub: round {round}").format(round=version),
            commit_description=(options.commit_description or "Edit round {round}, saved by nse-hub.").format(
                round=version),
            delete_patterns="*",  # files of the previous version that this one no longer has
            ignore_patterns=list(WORK_FILES),
            create_pr=opens_pr or None)
    if options.create_pr:
        logger.info("Pushed round %d to %s in %s", version, repo_id, info.pr_url or revision)
        return PushedRound(version, info.oid, "", info.pr_url or info.commit_url, info.pr_revision or revision)
    tag = tag_name(options.revision, version)
    api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=f"nse-hub edit round {version}", exist_ok=True)
    logger.info("Pushed round %d to %s (%s)", version, repo_id, info.oid[:10])
    return PushedRound(version, info.oid, tag, info.commit_url)


def _push_metadata(api: HfApi, repo_id: str, version: int, write_version: Callable[[int, Path], None],
                   branch: str, head: str) -> PushedRound | None:
    """Commit the card and session state of the latest version where they differ from the Hub's (figures
    recorded since the push); the weights and the ``round-N`` tags stay as they are."""
    with tempfile.TemporaryDirectory(prefix="nse-hub-push-") as tmp:
        folder = Path(tmp)
        write_version(version, folder)
        changed = []
        for relpath in (CARD_FILE, SESSION_FILE):
            try:
                remote = Path(hf_hub_download(repo_id, relpath, revision=head, token=api.token,
                                              endpoint=api.endpoint)).read_bytes()
            except EntryNotFoundError:
                remote = None
            if remote != (folder / relpath).read_bytes():
                changed.append(relpath)
        if not changed:
            return None
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=branch, parent_commit=head, allow_patterns=changed,
            commit_message=f"nse-hub: record the figures of round {version}",
            commit_description="The model card and session state only; the adapters are unchanged.")
    logger.info("Pushed the card and session state of round %d to %s (%s)", version, repo_id, info.oid[:10])
    return PushedRound(version, info.oid, "", info.commit_url, metadata_only=True)


def download_saved_edit(repo_id: str, revision: str | None = None, token: str | None = None) -> Path | None:
    """The local snapshot of a Hub repository holding a saved edit, or ``None`` if it holds none."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    use_timeout()
    try:
        hf_hub_download(repo_id, SESSION_FILE, revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError):
        return None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (401, 403, 404):
            return None  # a gated or private plain model: let transformers report it
        raise _explain(error, "read", repo_id) from error
    except transport_errors() as error:
        raise explain_transport(error, "read", repo_id) from error
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except HfHubHTTPError as error:
        raise _explain(error, "download", repo_id) from error
    except transport_errors() as error:
        raise explain_transport(error, "download", repo_id) from error


def locate_saved_edit(name: str | Path, revision: str | None = None, token: str | bool | None = None) -> Path | None:
    """The local folder of a saved edit named ``name`` (a folder, or a Hub repo, downloaded); ``None`` if it is
    something else (a plain model folder or id, an embedded model's name)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path if is_checkpoint(path) else None
    if is_embedded(str(name)) or path.exists():
        return None
    return download_saved_edit(str(name), revision, token)
