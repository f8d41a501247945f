"""A Hugging Face Space that runs the studio on a saved edit of the Hub: ``app.py``, ``requirements.txt``, README.

The Space's README carries the metadata the Hub reads (``sdk: gradio``, ``sdk_version``, ``app_file``), written
with ``huggingface_hub``'s :class:`~huggingface_hub.SpaceCard`. The app loads the edit from the Hub when it
starts, with the Space's ``HF_TOKEN`` secret where the repo is private.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData

from nse_hub._version import __version__
from nse_hub.errors import ConfigError
from nse_hub.io import atomic_write_text

# The Gradio the studio is tested with (constraints.txt pins the same); a Space installs it from sdk_version.
SPACE_GRADIO = "6.31.0"
PUSH_VARIABLE = "NSE_HUB_STUDIO_PUSH"

APP = '''"""nse-hub studio for {edit} (written by `nse-hub studio {edit} --space-dir DIR`)."""

import os

from nse_hub.studio import build_app

# Pushing from the page uses this Space's HF_TOKEN secret for every visitor: set the Space variable
# {push}=1 only on a private Space.
demo = build_app({edit!r}, allow_push=os.environ.get("{push}") == "1")

if __name__ == "__main__":
    demo.launch()
'''

BODY = '''
# nse-hub studio: {edit}

Compare, review and extend the versions of the knowledge edit [`{repo}`](https://huggingface.co/{repo}) —
{rounds} round(s) of {method} on `{base}` — in the browser: the base model is loaded once and every version
(`base`, `round-1`, …) answers the same prompt side by side; the Versions tab shows each version's edits and
metrics, the Diff tab the facts two versions disagree on, and the Edit tab writes new facts as the next round.

Scripts use the same comparison through the `/compare` API:

```python
from gradio_client import Client

client = Client("OWNER/SPACE")
print(client.predict("{prompt}", ["base", "round-{rounds}"], api_name="/compare"))
```

Written by `nse-hub studio {edit} --space-dir DIR` ([nse-hub](https://pypi.org/project/nse-hub/) {version}).
Pushing new rounds from the page uses the Space's `HF_TOKEN` secret and is off unless the Space variable
`{push}` is `1` (on a public Space every visitor could push with it).
'''


def write_space(edit: str, folder: str | Path, *, requirement: str | None = None,
                token: str | bool | None = None) -> list[Path]:
    """Write a Space folder that runs the studio on ``edit``, a Hub repo pushed by nse-hub (``repo@revision``).

    Args:
        edit: the saved edit on the Hub; it is read once here to check it and describe it.
        folder: where to write ``app.py``, ``requirements.txt`` and ``README.md`` (created if missing).
        requirement: how the Space installs nse-hub (default ``nse-hub[studio]==<this version>``; e.g. a
            ``nse-hub[studio] @ git+https://…`` URL for an unreleased version).
        token: Hub token for reading ``edit`` (default: ``HF_TOKEN`` or the stored login); not written anywhere.

    Returns:
        the files written.

    Raises:
        ConfigError: ``edit`` is a local folder (a Space can only load it from the Hub).
        VersionNotFoundError, HubError: ``edit`` is not a saved edit on the Hub, or the Hub could not be read.
    """
    from nse_hub.history import VersionSpec, read_version

    spec = VersionSpec.parse(edit)
    if Path(spec.source).expanduser().exists():
        raise ConfigError(f"{edit} is a local folder, which a Space cannot load: push it first "
                          f"(`nse-hub push {edit} USER/REPO`) and give USER/REPO or USER/REPO@round-N")
    version = read_version(spec, token=token)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rounds = len(version.reports)
    edits = [r.request.text for report in version.reports for r in report.requests]
    models = [spec.source, *([version.base.upstream_id] if version.base.upstream_id else [])]
    data = SpaceCardData(title=f"nse-hub studio: {spec.source.rsplit('/', 1)[-1]}", sdk="gradio",
                         sdk_version=SPACE_GRADIO, app_file="app.py", license=version.base.license, models=models,
                         tags=["nse-hub", "model-editing", "knowledge-editing"], emoji="🔬", colorFrom="indigo",
                         colorTo="gray", pinned=False, short_description="Compare and review knowledge-edit versions")
    body = BODY.format(edit=edit, repo=spec.source, rounds=rounds, method=version.config.method.upper(),
                       base=version.base.portable_id, prompt=edits[-1] if edits else "The capital of France is",
                       version=__version__, push=PUSH_VARIABLE)
    files = {"app.py": APP.format(edit=edit, push=PUSH_VARIABLE),
             "requirements.txt": (requirement or f"nse-hub[studio]=={__version__}") + "\n",
             "README.md": str(SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}"))}
    written = []
    for name, text in files.items():
        atomic_write_text(folder / name, text)
        written.append(folder / name)
    return written
