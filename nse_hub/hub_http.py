"""The HTTP side of nse-hub's Hub calls: a client timeout, and connection failures as :class:`HubError`.

``huggingface_hub`` (2.x) shares one HTTP client whose default has no timeout: a Hub call that never answers (a
stalled proxy, a server that accepted the connection and went quiet) waits forever, and a connection closed in
the middle of a commit surfaces as the HTTP library's own ``RemoteProtocolError``. Every nse-hub entry point that
talks to the Hub calls :func:`use_timeout` first and turns :func:`transport_errors` into a :class:`HubError`.

The timeout is ``NSE_HUB_HTTP_TIMEOUT`` seconds (default 60) for connecting, each read and each write; a client
the user configured with its own timeout (``huggingface_hub.set_client_factory``) is left as it is.
"""

from __future__ import annotations

import importlib
import math
import os

from huggingface_hub.utils import get_session

from nse_hub.errors import ConfigError, HubError

TIMEOUT_ENV = "NSE_HUB_HTTP_TIMEOUT"
DEFAULT_TIMEOUT = 60.0

_applied: object | None = None  # the timeout this module last gave the shared client


def hub_timeout() -> float:
    """Seconds a Hub call may wait to connect, for each read and each write (``NSE_HUB_HTTP_TIMEOUT``, default 60).

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}: unset it for the "
                          f"default {DEFAULT_TIMEOUT:g} s")
    return seconds


def use_timeout() -> float:
    """Give huggingface_hub's shared HTTP client the :func:`hub_timeout`, unless the user set one of their own.

    Returns the timeout in seconds (also for calls that take ``timeout=`` themselves).
    """
    global _applied
    seconds = hub_timeout()
    client = get_session()
    current = getattr(client, "timeout", None)  # a requests.Session (huggingface_hub < 1.0) has none
    if current is None:
        return seconds
    unset = all(getattr(current, part, None) is None for part in ("connect", "read", "write", "pool"))
    if unset or current == _applied:
        client.timeout = type(current)(seconds)
        _applied = client.timeout
    return seconds


def transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP library's errors for a connection that failed, closed early or timed out (no HTTP status)."""
    errors: list[type[Exception]] = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    try:
        import requests

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def explain_transport(error: Exception, action: str, repo_id: str) -> HubError:
    """A :class:`HubError` for a connection failure: a timeout names the setting, anything else says to retry."""
    detail = f"{type(error).__name__}: {error}".strip().rstrip(":")
    if "timeout" in type(error).__name__.lower():
        return HubError(f"could not {action} {repo_id}: the Hub did not answer within {hub_timeout():g} s "
                        f"({detail}); try again later, or raise {TIMEOUT_ENV}")
    return HubError(f"could not {action} {repo_id}: the connection to the Hub failed or was closed before it "
                    f"answered ({detail}); run the same command again: it resumes where it stopped")
