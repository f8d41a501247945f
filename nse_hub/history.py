"""Versions named like git revisions — a saved-edit folder or ``repo@revision`` — compared and merged.

This is the layer above :class:`~nse_hub.EditSession` that the ``nse-hub diff`` and ``nse-hub merge-history``
commands use: it reads versions (only their ``session.json`` and round reports when no model is needed),
and runs :meth:`EditSession.diff` / :meth:`EditSession.merge_history` on them. The comparisons themselves
live in :mod:`nse_hub.lineage`.

Example::

    from nse_hub.history import diff, merge_history

    print(diff("me/facts@round-3", "me/facts@customer-a").summary())
    session, plan, evaluation = merge_history("me/facts@main", "me/facts@customer-a", "merged",
                                              prefer="theirs", evaluate=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from nse_hub.checkpoint import (
    REPORT_FILE,
    ROUNDS_DIR,
    SESSION_FILE,
    VALUES_FILE,
    read_meta,
    read_reports,
    read_values,
    round_dir,
    round_paths,
    verify_files,
)
from nse_hub.errors import HubError, VersionNotFoundError
from nse_hub.evaluation import EvalOptions, Evaluation, evaluate_session
from nse_hub.lineage import HistoryDiff, MergePlan, Side, Version
from nse_hub.session import EditSession, resolve_round


@dataclass(frozen=True)
class VersionSpec:
    """A version by name: a local saved edit, or a Hub repository at a revision (branch, tag or commit)."""

    source: str
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> VersionSpec:
        """``folder``, ``repo``, ``repo@revision`` (revisions may contain ``/``: ``me/facts@customer-a/round-4``)."""
        if Path(spec).expanduser().exists() or "@" not in spec:
            return cls(spec)
        source, _, revision = spec.partition("@")
        return cls(source, revision or None)

    @property
    def label(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else self.source

    def folder(self, values: bool = False, token: str | bool | None = None) -> Path:
        """The saved edit's folder: local, or a snapshot of its state and reports (and values) from the Hub."""
        path = Path(self.source).expanduser()
        if path.is_dir():
            if self.revision:
                raise VersionNotFoundError(f"{self.source} is a local folder: name its version with round=, "
                                           f"not @{self.revision}")
            return path
        patterns = [SESSION_FILE, f"{ROUNDS_DIR}/*/{REPORT_FILE}"]
        if values:
            patterns.append(f"{ROUNDS_DIR}/*/{VALUES_FILE}")
        try:
            return Path(snapshot_download(self.source, revision=self.revision, allow_patterns=patterns, token=token))
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise VersionNotFoundError(f"{self.label} is neither a local saved edit nor a Hub revision "
                                       f"({type(error).__name__})") from None
        except HfHubHTTPError as error:
            raise HubError(f"could not read {self.label}: {error}") from error


def read_version(spec: str | VersionSpec, round: int | None = None, values: bool = False,
                 token: str | bool | None = None) -> Version:
    """A version's history without loading its model (``values``: also its rounds' stored value targets)."""
    spec = VersionSpec.parse(spec) if isinstance(spec, str) else spec
    folder = spec.folder(values, token)
    meta = read_meta(folder, downloaded=not Path(spec.source).expanduser().is_dir())
    version = resolve_round(round, meta.rounds, owner=f"the saved edit {spec.label}")
    reports = read_reports(folder, meta, version)
    stored = []
    for index in range(1, version + 1) if values else ():
        verify_files(folder, meta, [p for p in round_paths(meta, index) if p.endswith(VALUES_FILE)])
        stored.append(read_values(folder / round_dir(index)))
    label = spec.label + (f" (round {version})" if round is not None else "")
    return Version(label, meta.base, meta.config, reports, dict(meta.lineage), stored)


def open_version(spec: str | VersionSpec, device: str | None = None, token: str | bool | None = None,
                 stats_repo: str | None = None) -> EditSession:
    """The session of a version (model loaded): ``EditSession.from_pretrained(source, revision=…)``."""
    spec = VersionSpec.parse(spec) if isinstance(spec, str) else spec
    return EditSession.from_pretrained(spec.source, revision=spec.revision, device=device, token=token,
                                       stats_repo=stats_repo)


def diff(a: str, b: str, probe: bool = False, device: str | None = None, token: str | bool | None = None,
         max_new_tokens: int = 8) -> HistoryDiff:
    """What changed from version ``a`` to version ``b``; with ``probe``, what each answers (models loaded)."""
    if not probe:
        from nse_hub.lineage import diff_versions

        return diff_versions(read_version(a, token=token), read_version(b, token=token))
    ours, theirs = open_version(a, device, token), open_version(b, device, token)
    result = ours.diff(theirs, probe=True, max_new_tokens=max_new_tokens)
    result.a, result.b = VersionSpec.parse(a).label, VersionSpec.parse(b).label
    return result


def merge_history(a: str, b: str, out: str | Path | None = None, prefer: Side | None = None,
                  resolutions: dict[Any, Side] | None = None, evaluate: bool = False,
                  options: EvalOptions | None = None, device: str | None = None, token: str | bool | None = None,
                  stats_repo: str | None = None, progress: bool = False
                  ) -> tuple[EditSession, MergePlan, Evaluation | None]:
    """Merge version ``b`` into version ``a`` (loaded), save the result to ``out``, evaluate it if asked.

    The evaluation is the final protocol on the union of both branches' edits (one per fact, the one the
    merge kept), recorded into the merged version's card.
    """
    session = open_version(a, device, token, stats_repo)
    theirs = read_version(b, values=True, token=token)
    plan = session.merge_history(theirs, prefer=prefer, resolutions=resolutions, progress=progress)
    evaluation = None
    if evaluate:
        evaluation = evaluate_session(session, session.as_version().effective_requests(), options=options)
    if out is not None:
        session.save_pretrained(out)
    return session, plan, evaluation
