"""Write CounterFact facts into SmolLM2 in rounds, evaluate them, and save versioned PEFT adapters with a card.

    python examples/edit_counterfact.py --edits 20 --batch 10 --out smollm2-counterfact

Reads ``../shared/data/counterfact_easyedit/counterfact-edit.json`` by default (``--data`` for another file in
any supported format). The saved folder is a PEFT adapter (see ``load_without_nse_hub.py``) with one
increment per round under ``rounds/``, the session state to continue editing, and a model card whose
``model-index`` holds the final-protocol metrics measured here. Add ``--push user/repo`` to publish every
round as a commit and a ``round-N`` tag (needs ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from nse_hub import EditSession, evaluate_session, load_requests
from nse_hub.evaluation import EvalOptions

COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, Hub id or local folder")
    parser.add_argument("--data", type=Path, default=COUNTERFACT)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10, help="edits per round")
    parser.add_argument("--out", type=Path, default=Path("smollm2-counterfact"))
    parser.add_argument("--push", metavar="REPO_ID", help="also push every round to this Hub repository")
    parser.add_argument("--repo-id", help="the repository named in the card's loading code (default: --push)")
    args = parser.parse_args()

    console = Console()
    requests = load_requests(args.data, limit=args.edits)
    session = EditSession.from_pretrained(args.model)
    for start in range(0, len(requests), args.batch):
        report = session.edit(requests[start:start + args.batch])
        console.print(report.table())
        # Every round is a version: evaluate it, then save (the card reports this version's metrics).
        evaluation = evaluate_session(session, options=EvalOptions(fluency_records=5))
        console.print({name: round(value, 1) for name, value in evaluation.metrics.items()})
        session.save_pretrained(args.out, repo_id=args.repo_id or args.push)
        if args.push:
            session.push_to_hub(args.push)
    console.print(f"Saved {len(session.rounds)} rounds to {args.out}; the model card is {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
