"""nse-hub studio: a web page to compare, review and make the versions of a saved edit (Gradio).

Install the extra: ``pip install "nse-hub[studio]"``. Then::

    nse-hub studio my-edit                               # or me/facts, me/facts@round-3
    nse-hub studio me/facts --space-dir my-space        # a Hugging Face Space running the same page

or from Python::

    from nse_hub.studio import build_app

    build_app("me/facts").launch()

The page compares versions side by side (``/compare`` API: ``(prompt, versions) -> {version: continuation}``),
lists each version's edits and metrics, diffs two versions, and writes, saves and pushes new rounds.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from nse_hub.errors import MissingExtraError
from nse_hub.studio.space import SPACE_GRADIO, write_space
from nse_hub.studio.versions import BASE, Studio, read_new_facts, version_name

if TYPE_CHECKING:
    import gradio

DEFAULT_PORT = 7860


def _app() -> ModuleType:
    try:
        from nse_hub.studio import app
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith(("gradio", "fastapi", "starlette", "uvicorn")):
            raise
        raise MissingExtraError(f"nse-hub studio needs Gradio ({error.name} is missing): "
                                'pip install "nse-hub[studio]"') from None
    return app


def build_app(edit: str | Studio, **kwargs: Any) -> gradio.Blocks:
    """The studio page for a saved edit: see :func:`nse_hub.studio.app.build_app` for the options.

    Raises:
        MissingExtraError: Gradio is not installed.
    """
    return _app().build_app(edit, **kwargs)


def launch(edit: str | Studio, host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None,
           **launch_kwargs: Any) -> Any:
    """Serve the studio page of ``edit`` on ``host:port`` (blocks until stopped, unless ``prevent_thread_lock``)."""
    return build_app(edit, device=device).launch(server_name=host, server_port=port, **launch_kwargs)


__all__ = ["BASE", "DEFAULT_PORT", "SPACE_GRADIO", "Studio", "build_app", "launch", "read_new_facts",
           "version_name", "write_space"]
