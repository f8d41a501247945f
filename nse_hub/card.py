"""Model cards for saved edits, rendered from ``cards/model_card.md`` through ``huggingface_hub.ModelCard``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from nse_hub.adapters import CompressionReport
from nse_hub.checkpoint import SessionMeta
from nse_hub.corpus import Corpus
from nse_hub.lineage import fact_key, lineage_lines
from nse_hub.models import EMBEDDED_MODELS
from nse_hub.report import ROUND_METRICS, RoundReport, edit_metrics

MAX_EDIT_ROWS = 500
PORTABILITY_KEYS = ("portability", "portability_generation", "portability_true", "portability_true_generation")
PORTABILITY_NOTE = (" *Portability* asks MQuAKE's multi-hop questions, which depend on the edited facts (\"What is "
                    "the official language of the country of citizenship of …?\"): a case counts when any of its "
                    "questions is answered with the new answer that the edits imply; *multi-hop accuracy (original "
                    "answer)* counts the answer before the edits instead. The *unedited model* rows are the same "
                    "questions before editing. Questions follow a few-shot prompt; teacher-forced figures compare "
                    "the two answers' likelihoods, generation figures match the greedy answer against the answer "
                    "and its aliases.")
TAGS = ["model-editing", "knowledge-editing", "nse", "nse-hub", "peft", "lora"]


def template_path() -> Path:
    """The card template: packaged in wheels, at the repository's top in a source checkout."""
    packaged = Path(str(files("nse_hub"))) / "card_templates" / "model_card.md"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "cards" / "model_card.md"


# Read once: a long-running process (a benchmark of hours) renders its cards with the template of the code it runs,
# not with one edited on disk since, which may name settings its configuration does not have.
TEMPLATE = template_path().read_text(encoding="utf-8")


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
    figures = edit_metrics([r for report in reports for r in report.requests])
    protocol = "running, teacher-forced: each edit scored right after its round"
    return [Metric(key, key.capitalize(), round(figures[key], 1), protocol, "edit requests of this repository",
                   "nse-hub-edits") for key in ROUND_METRICS if key in figures]


# How each method is named and explained in cards (what follows "This edit uses").
_MEMIT = "MEMIT (Meng et al., ICLR 2023, [arXiv:2210.07229](https://arxiv.org/abs/2210.07229))"
METHODS = {
    "nse": ("NSE", "**NSE** — Neuron-level Sequential Editing (Jiang et al., ACL 2025, "
                   "[arXiv:2410.04045](https://arxiv.org/abs/2410.04045)) — which computes each fact's target "
                   "hidden state on the *original* weights, writes it into the MLP output projections of a few layers "
                   "with a least-squares update that preserves what those layers already encode, and touches only "
                   "the neurons most activated by the edited subjects. This keeps many rounds of edits from eroding "
                   "each other or the model."),
    "alphaedit": ("AlphaEdit", "**AlphaEdit** (Fang et al., ICLR 2025, "
                               "[arXiv:2410.02355](https://arxiv.org/abs/2410.02355)), which projects each update onto "
                               "the null space of the keys the layer must preserve, so that knowledge outside the "
                               "edits is left as it was."),
    "ultraedit": ("UltraEdit", "**UltraEdit** (Gu et al., [arXiv:2505.14679](https://arxiv.org/abs/2505.14679)), "
                               "which computes each round's change in one step from the edited projections' inputs "
                               "and loss gradients at the positions that predict the new answers, normalised by "
                               "running statistics of every earlier round's (lifelong normalization), and solves "
                               "for the weight change in closed form (ridge regression): no value optimisation, no "
                               "corpus statistics."),
    "nse_null": ("NSE-null", "**NSE-null**, nse-hub's lifelong method: NSE's target hidden states computed on the "
                             "*original* weights, its neuron selection and residual-filtered passes (Jiang et al., "
                             "[arXiv:2410.04045](https://arxiv.org/abs/2410.04045)), with AlphaEdit's solve (Fang et "
                             "al., [arXiv:2410.02355](https://arxiv.org/abs/2410.02355)): each update confined to the "
                             "null space of the keys the selected neurons must preserve, and to the keys of earlier "
                             "rounds."),
    "memit": ("MEMIT", f"**{_MEMIT}**, which spreads each fact's change over the MLP output projections of a few "
                       "layers with a least-squares update that preserves what those layers already encode."),
    "memit_seq": ("sequential MEMIT", f"**sequential MEMIT**: {_MEMIT} whose least-squares update also preserves "
                                      "the keys written by earlier rounds."),
}


def method_name(method: str) -> str:
    return METHODS.get(method, (method.upper(), ""))[0]


def _efficacy(report: RoundReport) -> str:
    value = report.metrics().get("efficacy")
    return "–" if value is None else f"{value:.0f} %"


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
                f"With nse-hub installed, `nse-hub models fetch {embedded.name}` builds the same folder. "
                f"`adapter_config.json` names the upstream `{embedded.upstream_id}`, so that stock loaders resolve "
                "it anywhere; its weights are close to, not identical with, the de-quantised ones edited here.")
        return embedded.stock_recipe, note, False
    name = meta.base.portable_id
    revision = f', revision="{meta.base.revision}"' if meta.base.revision else ""
    code = (f'base = AutoModelForCausalLM.from_pretrained("{name}"{revision})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{revision})')
    return code, "", meta.base.upstream_id is None


def _dtype_note(dtype: str | None) -> str:
    """What the card says about the precision the base was edited in (nothing for edits that did not record it)."""
    if dtype in ("bfloat16", "float16"):
        return (f"The edit was made on the base loaded in {dtype}, with the deltas kept in float32 on top of it "
                "(not rounded into the weights), the way PEFT keeps LoRA factors: the adapters' factors are float32. "
                f"Load the base in {dtype} (`dtype=torch.{dtype}`) for the outputs the edit was measured with.")
    return f"The edit was made on the base loaded in {dtype}." if dtype else ""


def _adapter_note(compression: list[CompressionReport]) -> str:
    if any(r.lossy for r in compression):
        worst = max(compression, key=lambda r: r.relative_error)
        ranks = ", ".join(sorted({str(r.stored_rank) for r in compression if r.lossy}))
        return (f"**This version's cumulative adapter is an approximation**: it was truncated to rank {ranks} "
                f"(`max_rank`), which changes the edit by a relative error of up to {worst.relative_error:.1%} "
                f"(Frobenius norm, `{worst.module}`). The per-round increments in `rounds/` are exact.")
    if any(r.stored_rank != r.stacked_rank for r in compression):
        return ("Each update is exactly a low-rank product `ΔW = B·A`, so the adapters below are the edit itself, "
                "not an approximation (the cumulative adapter was repacked exactly by QR/SVD where the stacked rank "
                "exceeded the dense size).")
    return ("Each update is exactly a low-rank product `ΔW = B·A`, so the adapters below are the edit itself, not "
            "an approximation.")


def history_lines(meta: SessionMeta, reports: list[RoundReport], repo: str, tags: list[str]) -> list[str]:
    """The card's History section: lineage (branch point, merges) and what changed from the previous version."""
    lines = lineage_lines(meta.lineage)
    if reports:
        last = reports[-1]
        earlier = {fact_key(r.request): r.request for report in reports[:-1] for r in report.requests}
        changed = [r.request for r in last.requests
                   if (old := earlier.get(fact_key(r.request))) and old.target_new != r.request.target_new]
        previous, current = tags[len(reports) - 1], tags[len(reports)]
        what = f"{len(last.requests)} edit{'s' if len(last.requests) != 1 else ''} written"
        if changed:
            what += (f", {len(changed)} of them changing a fact an earlier round wrote ("
                     + ", ".join(_cell(f"{r.subject} → {r.target_new}") for r in changed[:5])
                     + (", …" if len(changed) > 5 else "") + ")")
        lines.append(f"Changes from `{previous}`: {what}. With nse-hub, `nse-hub diff {repo}@{previous} "
                     f"{repo}@{current} --probe` lists them with what each version answers.")
    return lines


def build_card(meta: SessionMeta, reports: list[RoundReport], repo_id: str | None = None,
               metrics: list[Metric] | None = None, compression: list[CompressionReport] | None = None,
               tags: list[str] | None = None) -> ModelCard:
    """The model card of the version after ``len(reports)`` rounds.

    Args:
        meta: the saved session's description (base, hyperparameters, corpus).
        reports: the rounds of this version, in order.
        repo_id: the Hub repository (for the loading code); a placeholder when saving locally.
        metrics: figures to report; default: :func:`running_metrics` of the reports.
        compression: what packaging did to the cumulative adapter (the card says when it is lossy).
        tags: the tag of each version ``0..len(reports)`` (default ``round-N``; a branch's rounds are
            ``<branch>/round-N``).
    """
    version = len(reports)
    tags = tags or [f"round-{k}" for k in range(version + 1)]
    metrics = running_metrics(reports) if metrics is None else metrics
    base = meta.base
    base_id = base.portable_id
    hub_base = base.upstream_id
    weights_note = base.weights_note
    card_data = ModelCardData(
        base_model=hub_base,
        base_model_relation="adapter" if hub_base else None,
        license=base.license,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[*TAGS, meta.config.method],
        model_name=repo_id.split("/")[-1] if repo_id else f"{Path(base_id or 'model').name}-nse-edit",
        eval_results=[EvalResult(task_type="text-generation", dataset_type=m.dataset_type,
                                 dataset_name=m.dataset_name, metric_type=m.key, metric_name=m.name,
                                 metric_value=m.value) for m in metrics] or None,
        # Where the edited weights are not the upstream checkpoint itself (a de-quantised GGUF), say which they are.
        **({"base_model_weights": weights_note} if weights_note else {}),
    )
    requests = [(report.round, r) for report in reports for r in report.requests]
    example = requests[0][1].request if requests else None
    base_loading, base_note, base_is_local = _base_loading(meta)
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=f"{Path(base_id or 'model').name}, edited with {method_name(meta.config.method)} "
              f"(version round-{version})",
        base_display=base_id or "the base model",
        base_link=f"https://huggingface.co/{hub_base}" if hub_base else "#how-to-use",
        example_prompt=_cell(example.text) if example else "The mother tongue of Danielle Darrieux is",
        example_target=_cell(example.target_new) if example else "English",
        adapter_note=_adapter_note(compression or []),
        method_description=METHODS.get(meta.config.method, ("", meta.config.method.upper()))[1],
        weights_note=weights_note,
        dtype_note=_dtype_note(base.dtype),
        license=base.license or "not stated (see the base model's terms)",
        rounds=[{"round": r.round, "tag": tags[r.round] if r.round < len(tags) else f"round-{r.round}",
                 "date": r.created[:10] or "–", "edits": len(r.requests),
                 "method": method_name(r.method), "seconds": f"{r.seconds.get('total', 0):.0f}",
                 "efficacy": _efficacy(r)} for r in reports],
        version=version,
        tag=tags[version],
        history=history_lines(meta, reports, repo_id or "path/to/this/folder", tags),
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
                      "the unedited model's: a sharp fall means repetitive text)."
                      + (PORTABILITY_NOTE if any(m.key.endswith(PORTABILITY_KEYS) for m in metrics) else "")),
        method=method_name(meta.config.method),
        layers=", ".join(str(layer) for layer in meta.config.layers),
        module_pattern=" … ".join(dict.fromkeys([min(base.module_sha256), max(base.module_sha256)])),
        hparams=meta.config,
        nullspace_dims=", ".join(str(d) for d in reports[-1].nullspace_dims.values()) if reports else "",
        norm_anchor=next((f"{r.norm_anchor:.3g}" for r in reports if r.norm_anchor is not None), "–"),
        norm_skipped=sum(r.norm_skipped for report in reports for r in report.requests),
        corpus=Corpus.parse(meta.config.mom2_dataset).describe() if meta.config.mom2_dataset else "–",
        repo=repo_id or "path/to/this/folder",
        base_loading=base_loading,
        base_note=base_note,
        base_is_local=base_is_local,
    )
