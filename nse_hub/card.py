"""Model cards for saved edits, rendered from ``cards/model_card.md`` through ``huggingface_hub.ModelCard``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from nse_hub.checkpoint import SessionMeta
from nse_hub.corpus import Corpus
from nse_hub.models import EMBEDDED_MODELS
from nse_hub.report import RoundReport

MAX_EDIT_ROWS = 500
TAGS = ["model-editing", "knowledge-editing", "nse", "nse-hub", "peft", "lora"]


def template_path() -> Path:
    """The card template: packaged in wheels, at the repository's top in a source checkout."""
    packaged = Path(str(files("nse_hub"))) / "card_templates" / "model_card.md"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "cards" / "model_card.md"


@dataclass(frozen=True)
class Metric:
    """One figure for the card's table and its ``model-index``.

    Attributes:
        key: machine name (``efficacy``), used as the metric type.
        name: what the table shows.
        value: the figure (×100 for rates).
        protocol: how it was measured (``final``/``running``, teacher-forced or generation-based).
        dataset_name, dataset_type: what it was measured on.
    """

    key: str
    name: str
    value: float
    protocol: str
    dataset_name: str
    dataset_type: str


def running_metrics(reports: list[RoundReport]) -> list[Metric]:
    """Efficacy, generalization and specificity of every edit right after its own round."""
    requests = [r for report in reports for r in report.requests]
    dataset = "edit requests of this repository"

    def share(values: list[bool | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return 100 * sum(kept) / len(kept) if kept else None

    def mean_of_shares(lists: list[list[bool | None]]) -> float | None:
        shares = [s for s in (share(values) for values in lists) if s is not None]
        return sum(shares) / len(shares) if shares else None

    figures = {
        "efficacy": share([r.success_after for r in requests]),
        "generalization": mean_of_shares([[p.success_after for p in r.paraphrases] for r in requests]),
        "specificity": mean_of_shares([[p.success_after for p in r.neighbors] for r in requests]),
    }
    protocol = "running, teacher-forced: each edit scored right after its round"
    return [Metric(key, key.capitalize(), round(value, 1), protocol, dataset, "nse-hub-edits")
            for key, value in figures.items() if value is not None]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _probability(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _base_loading(meta: SessionMeta) -> tuple[str, str, bool]:
    """(code that makes ``base`` and ``tokenizer``, a note, whether the recorded base is a local folder)."""
    embedded = EMBEDDED_MODELS.get(meta.base.embedded or "")
    if embedded:
        note = (f"The base model is nse-hub's embedded `{embedded.name}`: {embedded.description}, "
                f"made from [{embedded.upstream_id}](https://huggingface.co/{embedded.upstream_id}). "
                f"With nse-hub installed, `nse-hub models fetch {embedded.name}` builds the same folder.")
        return embedded.stock_recipe, note, True
    name = meta.base.name_or_path
    revision = f', revision="{meta.base.revision}"' if meta.base.revision else ""
    code = (f'base = AutoModelForCausalLM.from_pretrained("{name}"{revision})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{revision})')
    return code, "", Path(name).expanduser().exists()


def build_card(meta: SessionMeta, reports: list[RoundReport], repo_id: str | None = None,
               metrics: list[Metric] | None = None, compressed: bool = False) -> ModelCard:
    """The model card of the version after ``len(reports)`` rounds.

    Args:
        meta: the saved session's description (base, hyperparameters, corpus).
        reports: the rounds of this version, in order.
        repo_id: the Hub repository (for the loading code); a placeholder when saving locally.
        metrics: figures to report; default: :func:`running_metrics` of the reports.
        compressed: whether the cumulative adapter was compressed.
    """
    version = len(reports)
    metrics = running_metrics(reports) if metrics is None else metrics
    base = meta.base
    base_id = base.upstream_id if base.embedded else base.name_or_path
    hub_base = base_id if base_id and "/" in base_id and not Path(base_id).exists() else None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[*TAGS, meta.config.method],
        model_name=repo_id.split("/")[-1] if repo_id else f"{Path(base_id or 'model').name}-nse-edit",
        eval_results=[EvalResult(task_type="text-generation", dataset_type=m.dataset_type,
                                 dataset_name=m.dataset_name, metric_type=m.key, metric_name=m.name,
                                 metric_value=m.value) for m in metrics] or None,
    )
    requests = [(report.round, r) for report in reports for r in report.requests]
    example = requests[0][1].request if requests else None
    base_loading, base_note, base_is_local = _base_loading(meta)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=f"{Path(base_id or 'model').name}, edited with NSE (version round-{version})",
        base_display=base_id or "the base model",
        base_link=f"https://huggingface.co/{hub_base}" if hub_base else "#how-to-use",
        example_prompt=_cell(example.text) if example else "The mother tongue of Danielle Darrieux is",
        example_target=_cell(example.target_new) if example else "English",
        compressed=compressed,
        rounds=[{"round": r.round, "date": r.created[:10] or "–", "edits": len(r.requests),
                 "method": r.method.upper(), "seconds": f"{r.seconds.get('total', 0):.0f}",
                 "efficacy": "–" if r.efficacy() is None else f"{100 * r.efficacy():.0f} %"} for r in reports],
        version=version,
        total_edits=len(requests),
        edits=[{"round": number, "subject": _cell(r.request.subject), "prompt": _cell(r.request.text),
                "old": _cell(r.request.target_true or "?"), "new": _cell(r.request.target_new),
                "p_before": _probability(r.p_new_before), "p_after": _probability(r.p_new_after)}
               for number, r in requests[:MAX_EDIT_ROWS]],
        edits_omitted=max(0, len(requests) - MAX_EDIT_ROWS),
        metrics=[{"name": m.name, "value": f"{m.value:.1f}", "protocol": m.protocol} for m in metrics],
        metrics_note=("Rates are percentages. *Efficacy*: edits whose new answer is more likely than the old "
                      "one after the edit prompt; *generalization*: the same on paraphrases; *specificity*: "
                      "prompts about neighbouring subjects that keep their own answer (mean per-token "
                      "likelihoods, per edit first, then averaged). *Generation* figures count a greedy "
                      "continuation only when it starts with the new answer. Magnitudes are mean probability "
                      "margins ×100; fluency is the n-gram entropy of generated text ×100 (compare it with "
                      "the unedited model's: a sharp fall means repetitive text)."),
        method=meta.config.method.upper(),
        layers=", ".join(str(layer) for layer in meta.config.layers),
        module_pattern=" … ".join(dict.fromkeys([min(base.module_sha256), max(base.module_sha256)])),
        hparams=meta.config,
        corpus=Corpus.parse(meta.config.mom2_dataset).describe() if meta.config.mom2_dataset else "–",
        repo=repo_id or "path/to/this/folder",
        base_loading=base_loading,
        base_note=base_note,
        base_is_local=base_is_local,
    )
