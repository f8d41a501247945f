"""How long a newcomer waits for the first edit of ``nse-hub demo``, by phase.

Runs ``nse-hub demo`` in this process and times its phases: loading the model, the one-time context
templates and statistics pass (with the time spent sampling text from the model inside it), the rest of
the round (values, keys, solve, scoring), and the whole command; CPU seconds too, which a shared machine
disturbs less than wall-clock ones. Point ``NSE_HUB_CACHE`` at an empty folder for a first run (link
``models/smollm2-135m`` from your cache into it to leave the model fetch out; ``--fetch`` times it apart)::

    mkdir -p /tmp/fresh/models && ln -s ~/.cache/nse-hub/models/smollm2-135m /tmp/fresh/models/
    NSE_HUB_CACHE=/tmp/fresh OMP_NUM_THREADS=1 python benchmarks/demo_wait.py --out demo_wait.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nse_hub.corpus as corpus
from nse_hub import EditSession
from nse_hub.cli import main
from nse_hub.models import fetch_model

timing: dict[str, Any] = {"sampling": 0.0}


def _timed(generator: Iterator[list[int]]) -> Iterator[list[int]]:
    while True:
        tic = time.perf_counter()
        try:
            item = next(generator)
        except StopIteration:
            return
        finally:
            timing["sampling"] += time.perf_counter() - tic
        yield item


def _instrument(start: float) -> None:
    sample, from_pretrained, edit = corpus.sample_from_model, EditSession.from_pretrained.__func__, EditSession.edit
    corpus.sample_from_model = lambda *a, **k: _timed(sample(*a, **k))

    def timed_from_pretrained(cls: type[EditSession], *args: Any, **kwargs: Any) -> EditSession:
        tic = time.perf_counter()
        session = from_pretrained(cls, *args, **kwargs)
        timing["load"] = time.perf_counter() - tic
        return session

    def timed_edit(self: EditSession, *args: Any, **kwargs: Any) -> Any:
        timing["mom2_n_samples"] = self.config.mom2_n_samples
        report = edit(self, *args, **kwargs)
        timing["round_seconds"] = report.seconds
        timing["first_edit_done"] = time.perf_counter() - start
        return report

    EditSession.from_pretrained = classmethod(timed_from_pretrained)
    EditSession.edit = timed_edit


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the timings")
    parser.add_argument("--demo-out", default="/tmp/nse-hub-demo-wait", help="where the demo saves its edit")
    parser.add_argument("--fetch", action="store_true", help="time only the model fetch + conversion")
    args = parser.parse_args()
    start, cpu = time.perf_counter(), time.process_time()
    if args.fetch:
        fetch_model("smollm2-135m")
        timing.pop("sampling")
    else:
        _instrument(start)
        timing["exit"] = main(["demo", "--out", args.demo_out])
    timing["total"] = time.perf_counter() - start
    timing["cpu_total"] = time.process_time() - cpu
    timing["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing, indent=1))


if __name__ == "__main__":
    main_cli()
