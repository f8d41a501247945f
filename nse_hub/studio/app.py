"""The studio's page (Gradio): Compare, Versions, Diff and Edit tabs over one :class:`~nse_hub.studio.Studio`.

The ``/compare`` API endpoint takes ``(prompt: str, versions: list[str])`` and returns ``{version: continuation}``;
the page's Compare button runs the same function and also shows p(new)/p(old) where the prompt is an edit's.
Every nse-hub error is shown in the page with the CLI's message (``gr.Error``).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from nse_hub.errors import NSEHubError
from nse_hub.history import VersionSpec
from nse_hub.lineage import HistoryDiff
from nse_hub.studio.versions import BASE, FactProbabilities, Studio, probability, read_new_facts

VERSION_COLUMNS = ["version", "date", "edits", "method", "efficacy", "generalization", "specificity",
                   "recorded evaluation"]
EDIT_COLUMNS = ["prompt", "old → new", "p(new) before → after", "p(old) before → after", "ok"]
NEW_FACT_COLUMNS = ["prompt ({} = subject)", "subject", "new answer", "old answer"]
TABLE_STYLE = "width:100%;border-collapse:collapse;font-size:0.95em"
CELL_STYLE = "border:1px solid #d0d7de;padding:6px 8px;vertical-align:top;text-align:left"


def guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with nse-hub's errors raised as ``gr.Error`` (shown in the page, message unchanged)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NSEHubError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def _cell(text: str, tag: str = "td", **attributes: str) -> str:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(v)}"' for k, v in attributes.items())
    return f'<{tag} style="{CELL_STYLE}"{extra}>{text}</{tag}>'


def compare_html(prompt: str, answers: dict[str, str], fact: FactProbabilities | None) -> str:
    """The versions side by side: one column each, the continuation, then p(new) and p(old) of an edited fact."""
    head = _cell("", "th") + "".join(_cell(html.escape(v), "th") for v in answers)
    rows = [_cell("<b>continuation</b>") + "".join(
        _cell(f"<i>{html.escape(prompt)}</i><b>{html.escape(text)}</b>", data_version=v, class_="continuation")
        for v, text in answers.items())]
    if fact is not None:
        rows.append(_cell(f"p(new) <code>{html.escape(fact.new)}</code>")
                    + "".join(_cell(probability(fact.p_new.get(v)), data_version=v, class_="p-new") for v in answers))
        if fact.old:
            rows.append(_cell(f"p(old) <code>{html.escape(fact.old)}</code>") + "".join(
                _cell(probability(fact.p_old.get(v)), data_version=v, class_="p-old") for v in answers))
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f'<table id="compare-results" style="{TABLE_STYLE}"><tr>{head}</tr>{body}</table>'


def diff_rows(result: HistoryDiff) -> list[list[str]]:
    """``nse-hub diff``'s table as rows: kind, prompt, A → B, and with a probe what each version answers."""
    marks = {"added": "+ added", "removed": "− removed", "changed": "~ changed"}
    rows = []
    for c in result.changes:
        row = [marks[c.kind], c.request.text, f"{c.target_a or '?'} → {c.target_b or '?'}"]
        for side in ("a", "b"):
            p = c.probe.get(side)
            row.append(f"{p['continuation'].strip()!r} (p new {probability(p['p_new'])}, "
                       f"old {probability(p['p_old'])})" if p else "")
        rows.append(row)
    return rows


def build_app(edit: str | Studio, *, allow_edit: bool = True, allow_push: bool = True, device: str | None = None,
              token: str | bool | None = None) -> gr.Blocks:
    """The studio page for a saved edit (a folder, ``repo`` or ``repo@revision``) or a loaded :class:`Studio`.

    Args:
        edit: the saved edit; its base model is loaded once.
        allow_edit: show the Edit tab (new rounds, save).
        allow_push: let the Edit tab push to the Hub with the token of the environment (``HF_TOKEN``, a Space's
            secret). On a public Space this lets every visitor push with it: leave it off there.
        device: where to run the model (default: CUDA if available).
        token: Hub token for loading (default: ``HF_TOKEN`` or the stored login); never shown.

    Returns:
        the Blocks; ``.launch()`` serves it. ``blocks.studio`` is the :class:`Studio` behind it.
    """
    studio = edit if isinstance(edit, Studio) else Studio.load(edit, device=device, token=token)
    with gr.Blocks(title=f"nse-hub studio — {studio.source}") as blocks:
        gr.Markdown(f"# nse-hub studio\n{studio.describe()}", elem_id="studio-header")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                compare_refresh = _compare_tab(studio)
            with gr.Tab("Versions", id="versions"):
                versions_refresh = _versions_tab(studio)
            with gr.Tab("Diff", id="diff"):
                diff_refresh = _diff_tab(studio)
            if allow_edit:
                with gr.Tab("Edit", id="edit"):
                    _edit_tab(studio, allow_push, [*compare_refresh, *versions_refresh, *diff_refresh])

        def compare(prompt: str, versions: list[str]) -> dict[str, str]:
            """Greedy continuations of `prompt` by each chosen version (`base`, `round-1`, …)."""
            return studio.compare(prompt, versions)

        gr.api(guarded(compare), api_name="compare")
    blocks.studio = studio  # type: ignore[attr-defined]
    return blocks


def _version_choices(studio: Studio) -> list[Any]:
    """What depends on the list of versions, in the order of the refresh outputs of each tab."""
    return [gr.CheckboxGroup(choices=studio.versions),
            gr.Dataframe(value=studio.version_rows()), gr.Dropdown(choices=studio.versions, value=studio.latest),
            gr.Plot(value=studio.curves()),
            gr.Dropdown(choices=studio.versions), gr.Dropdown(choices=studio.versions, value=studio.latest)]


def _compare_tab(studio: Studio) -> list[Any]:
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", placeholder="The Eiffel Tower is located in the city of", scale=3,
                            elem_id="compare-prompt")
        versions = gr.CheckboxGroup(studio.versions, value=list(dict.fromkeys([BASE, studio.latest])),
                                    label="Versions", scale=2, elem_id="compare-versions")
    edited = studio.edited_prompts()
    if edited:
        gr.Examples([[p] for p in edited[:10]], inputs=[prompt], label="Prompts of the edits")
    button = gr.Button("Compare", variant="primary", elem_id="compare-button")
    table = gr.HTML(elem_id="compare-table")
    with gr.Accordion("As the /compare API returns it", open=False):
        answers = gr.JSON(elem_id="compare-json")
        gr.Markdown("`gradio_client.Client(URL).predict(prompt, [\"base\", \"round-1\"], api_name=\"/compare\")`")

    @guarded
    def run(text: str, chosen: list[str]) -> tuple[str, dict[str, str]]:
        result = studio.compare(text, chosen)
        return compare_html(text.rstrip(), result, studio.probabilities(text, chosen)), result

    button.click(run, [prompt, versions], [table, answers], api_visibility="private")
    prompt.submit(run, [prompt, versions], [table, answers], api_visibility="private")
    return [versions]


def _versions_tab(studio: Studio) -> list[Any]:
    table = gr.Dataframe(studio.version_rows(), headers=VERSION_COLUMNS, interactive=False, elem_id="versions-table",
                         label="Versions (efficacy, generalization, specificity: each round's own edits, after it)")
    chosen = gr.Dropdown(studio.versions, value=studio.latest, label="Edits of version")
    edits = gr.Dataframe(studio.edit_rows(studio.latest), headers=EDIT_COLUMNS, interactive=False, wrap=True)
    curves = gr.Plot(studio.curves(), label="Metrics by version")
    chosen.change(guarded(studio.edit_rows), [chosen], [edits], api_visibility="private")
    return [table, chosen, curves]


def _diff_tab(studio: Studio) -> list[Any]:
    with gr.Row():
        a = gr.Dropdown(studio.versions, value=BASE, label="A")
        b = gr.Dropdown(studio.versions, value=studio.latest, label="B")
        probe = gr.Checkbox(label="probe: what each version answers (runs the model)")
    button = gr.Button("Diff", variant="primary")
    summary = gr.Markdown()
    table = gr.Dataframe(headers=["", "prompt", "A → B", "A answers", "B answers"], interactive=False, wrap=True)

    @guarded
    def run(first: str, second: str, probed: bool) -> tuple[str, list[list[str]]]:
        result = studio.diff(first, second, probe=probed)
        return result.summary(), diff_rows(result)

    button.click(run, [a, b, probe], [summary, table], api_visibility="private")
    return [a, b]


def _edit_tab(studio: Studio, allow_push: bool, refreshed: Sequence[Any]) -> None:
    gr.Markdown("Write new facts as the next round: fill the table or upload a JSON/JSONL/CounterFact file. "
                "The round becomes the next version at once (compare it in the other tabs); save or push it to "
                "keep it.")
    facts = gr.Dataframe([[""] * 4 for _ in range(3)], headers=NEW_FACT_COLUMNS, datatype=["str"] * 4, column_count=4,
                         interactive=True, label="New facts", elem_id="edit-facts")
    upload = gr.File(label="or a request file", file_types=[".json", ".jsonl"], type="filepath")
    with gr.Row():
        run = gr.Button("Run round", variant="primary", elem_id="edit-run")
        discard = gr.Button("Discard the unsaved round")
    status = gr.Markdown(elem_id="edit-status")
    report = gr.Dataframe(headers=EDIT_COLUMNS, interactive=False, wrap=True, label="Before/after")
    with gr.Row():
        folder = gr.Textbox(label="Save to folder", value=_default_folder(studio), scale=3)
        save = gr.Button("Save", scale=1)
    if allow_push:
        with gr.Row():
            repo = gr.Textbox(label="Push to Hub repo (token: HF_TOKEN of the environment)",
                              value=_default_repo(studio), scale=2)
            branch = gr.Textbox(label="Branch (default main)", scale=1)
            push = gr.Button("Push", scale=1)

    def refresh() -> list[Any]:
        return _version_choices(studio)

    @guarded
    def run_round(rows: Any, path: str | None,
                  progress: gr.Progress = gr.Progress(track_tqdm=True)) -> list[Any]:  # noqa: B008 (Gradio's idiom)
        requests = read_new_facts(_rows(rows), path)
        result = studio.run_round(requests, progress=True)
        note = (f"Round {result.round}: {len(result.requests)} edit(s) in {result.seconds.get('total', 0):.1f} s — "
                f"version **{studio.latest}** (not saved yet)")
        return [note, studio.edit_rows(studio.latest), *refresh()]

    @guarded
    def discard_round() -> list[Any]:
        left = studio.discard_round()
        return [f"Discarded; the latest version is {studio.latest} ({left} round(s))", [], *refresh()]

    @guarded
    def save_edit(path: str) -> str:
        if not path.strip():
            raise gr.Error("no folder: type where to save the edit", print_exception=False)
        return f"Saved {studio.latest} to `{studio.save(path.strip())}`"

    outputs = [status, report, *refreshed]
    run.click(run_round, [facts, upload], outputs, api_visibility="private")
    discard.click(discard_round, None, outputs, api_visibility="private")
    save.click(save_edit, [folder], [status], api_visibility="private")
    if allow_push:
        @guarded
        def push_edit(repo_id: str, name: str) -> str:
            pushed = studio.push(repo_id.strip(), name.strip() or None)
            lines = [f"round {p.round}: commit {p.commit[:10]}" + (f", tag {p.tag}" if p.tag else "") for p in pushed]
            return "\n".join(lines) or f"{repo_id} already holds {studio.latest} (nothing to push)"

        push.click(push_edit, [repo, branch], [status], api_visibility="private")


def _rows(value: Any) -> list[list[Any]]:
    """The table's rows, whether Gradio hands over a pandas DataFrame or lists."""
    if hasattr(value, "values") and hasattr(value, "columns"):
        return value.values.tolist()
    return list(value or [])


def _is_folder(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _default_folder(studio: Studio) -> str:
    """The folder the edit came from, or for a Hub repo a folder named after it here."""
    source = VersionSpec.parse(studio.source).source
    return source if _is_folder(source) else source.rsplit("/", 1)[-1]


def _default_repo(studio: Studio) -> str:
    source = VersionSpec.parse(studio.source).source
    return "" if _is_folder(source) else source
