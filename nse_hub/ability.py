"""General ability before and after editing: the NSE authors' GLUE-style suite and perplexity.

The suite (SST-2, MRPC, CoLA, RTE, MMLU, NLI; files ``<task>.json`` as in the NSE repository's
``glue_eval/dataset``) is read from a folder or a Hub dataset repository holding the same files; it
is not shipped with nse-hub. Each example is a zero-shot prompt in the authors' format, answered by
comparing the mean per-token likelihood of the options (" positive"/" negative", " Yes"/" No",
" True"/" False", " A"…" D"), as their likelihood-based prediction does. RTE uses GLUE's labels
(0 = entailment → "True"); the authors' script maps them the other way round.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nse_hub.architectures import ModelLayout
from nse_hub.errors import MissingFileError
from nse_hub.scoring import logprobs_at, next_token_logprobs, score_targets, target_text
from nse_hub.tokens import continuation_ids, encode, pad_id
from nse_hub.tracing import model_device


@dataclass(frozen=True)
class Task:
    """A classification task: how to prompt an example, its options, and its gold option."""

    prompt: Callable[[dict[str, Any]], str]
    options: tuple[str, ...]
    gold: Callable[[dict[str, Any]], int]


def _mmlu_prompt(example: dict[str, Any]) -> str:
    choices = _choices(example)
    lines = [f"Question: {example['question']}"] + [f"({letter}) {c}" for letter, c in zip("ABCD", choices)]
    return "\n".join(lines) + "\nAnswer:"


def _choices(example: dict[str, Any]) -> list[str]:
    choices = example["choices"]
    return ast.literal_eval(choices) if isinstance(choices, str) else list(choices)


TASKS: dict[str, Task] = {
    "sst2": Task(lambda e: f"Review :{e['sentence']}\nSentiment :", ("positive", "negative"),
                 lambda e: 0 if int(e["label"]) == 1 else 1),
    "mrpc": Task(lambda e: ("Are the sentences paraphrases of each other.\n"
                            f"Sentence 1: {e['sentence1']}\nSentence 2: {e['sentence2']}\nAnswer:"),
                 ("Yes", "No"), lambda e: 0 if int(e["label"]) == 1 else 1),
    "cola": Task(lambda e: f"Is this sentence linguistically acceptable?\nSentence: {e['sentence']}\nAnswer:",
                 ("Yes", "No"), lambda e: 0 if int(e["label"]) == 1 else 1),
    "rte": Task(lambda e: f"{e['sentence1']}\nquestion: {e['sentence2']} True or False?\nanswer:",
                ("True", "False"), lambda e: 0 if int(e["label"]) == 0 else 1),
    "mmlu": Task(_mmlu_prompt, ("A", "B", "C", "D"), lambda e: int(e["answer"])),
    "nli": Task(lambda e: f"{e['sentence1']} entails the {e['sentence2']} True or False? Answer:",
                ("True", "False"), lambda e: 0 if e["label"] == "entailment" else 1),
}


def suite_folder(source: str | Path) -> Path:
    """A local folder of ``<task>.json`` files, or a Hub dataset repository downloaded to one."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), repo_type="dataset", allow_patterns=["*.json"]))


def load_task(folder: Path, name: str) -> list[dict[str, Any]]:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: the suite folder needs {', '.join(f'{t}.json' for t in TASKS)}")
    return json.loads(path.read_text())


def _mcc(gold: list[int], predicted: list[int]) -> float:
    """Matthews correlation for a binary task whose positive class is option 0."""
    tp = sum(g == 0 and p == 0 for g, p in zip(gold, predicted))
    tn = sum(g == 1 and p == 1 for g, p in zip(gold, predicted))
    fp = sum(g == 1 and p == 0 for g, p in zip(gold, predicted))
    fn = sum(g == 0 and p == 1 for g, p in zip(gold, predicted))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def suite_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
                   source: str | Path, examples_per_task: int = 100, tasks: Sequence[str] = tuple(TASKS),
                   batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy (and MCC for CoLA) on the first ``examples_per_task`` examples of each task."""
    folder = suite_folder(source)
    results = {}
    for name in tasks:
        task = TASKS[name]
        examples = load_task(folder, name)[:examples_per_task]
        predicted = _predict(model, tokenizer, layout, [task.prompt(e) for e in examples], task.options, batch_size)
        gold = [task.gold(e) for e in examples]
        result = {"accuracy": 100 * sum(p == g for p, g in zip(predicted, gold)) / len(examples),
                  "examples": len(examples)}
        if name == "cola":
            result["mcc"] = 100 * _mcc(gold, predicted)
        results[name] = result
    return results


def _predict(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
             prompts: list[str], options: tuple[str, ...], batch_size: int) -> list[int]:
    """The option with the lowest mean per-token NLL after each prompt."""
    option_ids = [[continuation_ids(tokenizer, p, target_text(o)) for o in options] for p in prompts]
    if all(len(ids) == 1 for per_prompt in option_ids for ids in per_prompt):
        # One token each: one forward per prompt scores every option (same ranking as mean NLL).
        logprobs = next_token_logprobs(model, tokenizer, layout, prompts,
                                       [[ids[0] for ids in per_prompt] for per_prompt in option_ids], batch_size)
        return [max(range(len(options)), key=row.__getitem__) for row in logprobs]
    k = len(options)
    scores = score_targets(model, tokenizer, layout, [p for p in prompts for _ in options],
                           list(options) * len(prompts), batch_size)
    return [min(range(k), key=lambda j, i=i: scores[i * k + j].mean_nll) for i in range(len(prompts))]


def perplexity_texts(source: str | Path, count: int = 200, skip: int = 100) -> list[str]:
    """Held-out English text from the suite: MRPC and RTE first sentences after the evaluated examples."""
    folder = suite_folder(source)
    texts = [e["sentence1"] for name in ("mrpc", "rte") for e in load_task(folder, name)[skip:]]
    return texts[:count]


@torch.no_grad()
def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: ModelLayout,
               texts: Sequence[str], batch_size: int = 32) -> float:
    """exp(total NLL / total predicted tokens), each text scored on its own."""
    total, count = 0.0, 0
    encoded = [ids for ids in (encode(tokenizer, t) for t in texts) if len(ids) > 1]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        rows = [r for r, seq in enumerate(chunk) for _ in range(len(seq) - 1)]
        cols = [c for seq in chunk for c in range(len(seq) - 1)]
        labels = torch.tensor([t for seq in chunk for t in seq[1:]], device=model_device(model))
        logprobs = logprobs_at(model, layout, chunk, pad_id(tokenizer), rows, cols)
        total -= float(logprobs.gather(1, labels[:, None]).sum())
        count += len(labels)
    return math.exp(total / count)
