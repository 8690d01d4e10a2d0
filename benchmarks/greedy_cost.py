"""The cost of a greedy soup against one scoring pass of its ingredients (issue 16).

On real fine-tunes (local folders) and their task, with the outputs cache across runs OFF, in
three modes, in one process: dataset-order batches; length-bucketed batches; length buckets and
candidates scored on the examples the ingredients miss first (the default):

- **unit**: each of the k ingredients loaded (``from_pretrained``) and scored once, timed per
  split: on the selection split alone, and on every split the task scores (which is what a
  greedy run's first phase, ``timings.score_ingredients``, does: the table needs each
  ingredient's report scores);
- **greedy**: ``hfsoup.soup(method="greedy", cache=False)`` end to end, with its per-phase
  ``timings`` from results.json, and the candidate examples scored against a full evaluation
  (``greedy.examples_*``: saved by early rejections and by early acceptances).

The ratios are greedy / unit, in the same bucketing mode and against the dataset-order unit.
The unit does not depend on the candidates' order: the last two modes share one.
Pad tokens per split (a count, from the prepared batches) show what bucketing removes.

    hfsoup reproduce --workdir repro      # the 12 fine-tunes (its sweep is all this needs)
    python benchmarks/greedy_cost.py --input repro --k 8

``--input``: a finished ``hfsoup reproduce`` workdir (:func:`hfsoup.reproduce.workdir_pool`),
or a JSON file ``{"ingredients": [folders...], "task": {...}}`` (more keys are ignored). Prints a markdown table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _pads(scorer: Any) -> dict[str, dict[str, int]]:
    """Per split: real and pad tokens in the prepared batches."""
    counts = {}
    for name, split in scorer.splits.items():
        masks = [b["attention_mask"] for b in split.batches if "attention_mask" in b]
        real = sum(int(m.sum()) for m in masks)
        counts[name] = {"real": real, "pad": sum(int(m.numel()) for m in masks) - real}
    return counts


def _unit(folders: list[str], task: dict) -> dict[str, Any]:
    """Every ingredient loaded and scored once per split; seconds per split summed over k."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from hfsoup.tasks.classification import Scorer

    t0 = time.perf_counter()
    scorer = Scorer.from_pretrained(task, folders[0], progress=False)
    prepare = time.perf_counter() - t0
    sel = scorer.selection_split
    seconds = {"load": 0.0, **{name: 0.0 for name in scorer.splits}}
    selection_outputs = []
    for folder in folders:
        t0 = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        seconds["load"] += time.perf_counter() - t0
        for name in scorer.splits:
            t0 = time.perf_counter()
            outputs = scorer.outputs(model, name)
            seconds[name] += time.perf_counter() - t0
            if name == sel:
                selection_outputs.append(outputs)
        del model
    load = seconds["load"]
    return {
        "prepare_s": prepare,
        "seconds": seconds,
        "selection_s": load + seconds[sel],
        "all_splits_s": load + sum(seconds[name] for name in scorer.splits),
        "splits": {name: split.size for name, split in scorer.splits.items()},
        "tokens": _pads(scorer),
        "selection_split": sel,
        "_outputs": torch.stack(selection_outputs),
    }


def _greedy(folders: list[str], task: dict, out: Path, accept: str, order: str) -> dict[str, Any]:
    import hfsoup

    t0 = time.perf_counter()
    result = hfsoup.soup(folders, output=out, method="greedy", task=task, accept=accept,
                         order=order, cache=False, progress=False, overwrite=True)  # fmt: skip
    wall = time.perf_counter() - t0
    results = result.results
    greedy = results["greedy"]
    keys = ("examples_scored", "examples_full_evaluation", "examples_saved",
            "examples_saved_rejections", "examples_saved_acceptances")  # fmt: skip
    timings = {k: v for k, v in results.get("timings", {}).items() if isinstance(v, float)}
    return {
        "wall_s": wall,
        "timings": timings,
        "accepted": greedy["accepted"],
        "decisions": [step["accepted"] for step in greedy["trace"]],
        "stopped_early": [step.get("stopped_early") for step in greedy["trace"]],
        **{k: greedy[k] for k in keys},
        "greedy_selection": results["table"]["greedy_soup"],
    }


def _warm_up(folders: list[str], task: dict, work: Path) -> None:
    """Every ingredient file read once (the page cache), one scoring pass and a greedy soup of
    the first two ingredients, thrown away: the first mode measured pays neither the disk nor
    the process's first-call costs (the first greedy run in a process was several times
    slower than the next ones on the test models)."""
    for folder in folders:
        for file in Path(folder).rglob("*"):
            if file.is_file():
                file.read_bytes()
    _unit(folders[:1], task)
    _greedy(folders[:2], task, work / "warm-up", ">=", "score")


def _floors(unit: dict[str, Any], k: int) -> dict[str, float]:
    """Greedy's cost in units of the every-split pass, from the pass's own per-split seconds:
    ``floor``: the ingredients' own pass, the uniform soup and the greedy soup on every split
    (one model each, about 1/k of the pass) and no candidate example; ``full_candidates``:
    the same plus the k - 1 candidates each scored on the whole selection split."""
    every = unit["all_splits_s"]
    per_model = (every - unit["seconds"]["load"]) / k
    candidate = unit["seconds"][unit["selection_split"]] / k
    floor = (every + 2 * per_model) / every
    return {"floor": floor, "full_candidates": floor + (k - 1) * candidate / every}


def _interleaved_passes(folders: list[str], task: dict, rounds: int) -> dict[str, Any]:
    """One ingredient's pass over the selection split, dataset order and buckets alternating
    for ``rounds`` rounds: a per-pass ratio that a shared machine's changing load spoils less
    than measurements minutes apart."""
    import statistics

    from transformers import AutoModelForSequenceClassification

    from hfsoup.tasks.classification import Scorer

    ours = Scorer.from_pretrained(task, folders[0], progress=False)
    loaded, tokenizer, label2id, max_tokens, _ = ours._sources
    plain = Scorer(ours.task, tokenizer, progress=False, splits=loaded, label2id=label2id,
                   max_tokens=max_tokens, bucket=False)  # fmt: skip
    scorers = {False: plain, True: ours}
    model = AutoModelForSequenceClassification.from_pretrained(folders[0]).eval()
    sel = scorers[True].selection_split
    for scorer in scorers.values():  # untimed: first-call costs
        scorer.outputs(model, sel)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for bucket in (False, True):
            t0 = time.perf_counter()
            scorers[bucket].outputs(model, sel)
            seconds[bucket].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(seconds[False], seconds[True], strict=True)]
    return {"seconds": {"dataset order": seconds[False], "buckets": seconds[True]},
            "median_ratio": statistics.median(ratios)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="hfsoup-reproduce")
    parser.add_argument("--k", type=int, default=8, help="the first k ingredients")
    parser.add_argument("--accept", default=">=")
    parser.add_argument("--order", default="score")
    parser.add_argument("--out", default=".bench/greedy_cost.json")
    parser.add_argument(
        "--passes", type=int, default=0,
        help="only this many interleaved rounds of one ingredient's selection pass, dataset "
        "order against buckets (no greedy run)",
    )  # fmt: skip
    args = parser.parse_args()

    import torch

    from hfsoup.reproduce import workdir_pool
    from hfsoup.tasks import preprocess

    spec = workdir_pool(args.input)  # a reproduce workdir, or a JSON file with its keys
    folders = [str(f) for f in spec["ingredients"][: args.k]]
    task = spec["task"]
    k = len(folders)
    work = Path(tempfile.mkdtemp(prefix="hfsoup-greedy-cost-"))
    os.environ["HFSOUP_OUTPUTS_CACHE"] = str(work / "outputs-cache")  # and cache=False anyway
    before = _uptime()
    started = time.perf_counter()
    if args.passes:
        passes = _interleaved_passes(folders, task, args.passes)
        print(json.dumps({**passes, "uptime_before": before, "uptime_after": _uptime()}))
        return
    _warm_up(folders, task, work)
    from hfsoup.methods import greedy as greedy_module

    modes = {"dataset order": (False, False), "buckets": (True, False),
             "buckets + hardest first": (True, True)}  # fmt: skip
    runs: dict[str, Any] = {mode: {} for mode in modes}
    # Each measurement in every mode back to back, so that a change in the machine's load
    # falls on all alike. The unit does not depend on the candidates' order: measured once
    # per bucketing mode.
    for what in ("unit", "greedy"):
        for mode, (bucket, hardest) in modes.items():
            preprocess._BUCKET_TEXT, greedy_module._HARDEST_FIRST = bucket, hardest
            if what == "unit" and hardest:
                runs[mode]["unit"] = runs["buckets"]["unit"]
                continue
            cpu = time.process_time()
            if what == "unit":
                runs[mode]["unit"] = _unit(folders, task)
            else:
                out = work / f"soup-{int(bucket)}{int(hardest)}"
                runs[mode]["greedy"] = _greedy(folders, task, out, args.accept, args.order)
            runs[mode][what]["cpu_s"] = time.process_time() - cpu
    after = _uptime()
    plain, ours = runs["dataset order"], runs["buckets"]
    for run in runs.values():
        run["floors"] = _floors(run["unit"], k)
    diff = float((plain["unit"].pop("_outputs") - ours["unit"].pop("_outputs")).abs().max())
    runs = json.loads(json.dumps(runs))  # the shared unit dict written out once per mode
    report = {
        "command": f"python benchmarks/greedy_cost.py --input {args.input} --k {args.k}",
        "k": k,
        "ingredients": folders,
        "task": task,
        "uptime_before": before,
        "uptime_after": after,
        "seconds_total": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "max_abs_logit_diff_buckets_vs_dataset_order": diff,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(_markdown(report))


def _markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    base = runs["dataset order"]["unit"]
    lines = [
        f"k = {report['k']}; splits {base['splits']} (selection: `{base['selection_split']}`); "
        f"torch threads {report['torch_threads']}",
        "",
        "| | " + " | ".join(runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]

    def row(label: str, get: Any, fmt: str = "{:.1f}") -> None:
        lines.append(f"| {label} | " + " | ".join(fmt.format(get(runs[m])) for m in runs) + " |")

    for name in base["tokens"]:
        row(f"pad tokens / real tokens, `{name}`",
            lambda r, n=name: f"{r['unit']['tokens'][n]['pad']} / {r['unit']['tokens'][n]['real']}",
            "{}")  # fmt: skip
    row("unit: k ingredients loaded + scored on the selection split, s",
        lambda r: r["unit"]["selection_s"])  # fmt: skip
    row(
        "unit: k ingredients loaded + scored on every split, s", lambda r: r["unit"]["all_splits_s"]
    )
    row("unit (every split), CPU s of this process", lambda r: r["unit"]["cpu_s"])
    row("greedy end to end (hfsoup.soup wall), s", lambda r: r["greedy"]["wall_s"])
    row("greedy end to end, CPU s of this process", lambda r: r["greedy"]["cpu_s"])
    phases = {p: None for r in runs.values() for p in r["greedy"]["timings"]}
    for phase in phases:
        row(f"greedy `timings.{phase}`, s", lambda r, p=phase: r["greedy"]["timings"].get(p, 0.0))
    row("**greedy / unit (every split)**",
        lambda r: r["greedy"]["wall_s"] / r["unit"]["all_splits_s"], "{:.2f}x")  # fmt: skip
    row("greedy / dataset-order unit (every split)",
        lambda r: r["greedy"]["wall_s"] / base["all_splits_s"], "{:.2f}x")  # fmt: skip
    row("greedy / unit (every split), CPU s",
        lambda r: r["greedy"]["cpu_s"] / r["unit"]["cpu_s"], "{:.2f}x")  # fmt: skip
    row("floor: no candidate example scored, in units (every split)",
        lambda r: r["floors"]["floor"], "{:.2f}x")  # fmt: skip
    row("the same with every candidate scored in full", lambda r: r["floors"]["full_candidates"],
        "{:.2f}x")  # fmt: skip
    row("greedy / unit (selection split only)",
        lambda r: r["greedy"]["wall_s"] / r["unit"]["selection_s"], "{:.2f}x")  # fmt: skip
    row("candidate examples scored / full evaluation",
        lambda r: f"{r['greedy']['examples_scored']} / {r['greedy']['examples_full_evaluation']} "
        f"= {r['greedy']['examples_scored'] / r['greedy']['examples_full_evaluation']:.3f}x",
        "{}")  # fmt: skip
    row("saved by early rejections / acceptances",
        lambda r: f"{r['greedy']['examples_saved_rejections']} / "
        f"{r['greedy']['examples_saved_acceptances']}", "{}")  # fmt: skip
    row("decisions (trace)", lambda r: "".join("+" if d else "-" for d in r["greedy"]["decisions"]),
        "`{}`")  # fmt: skip
    same = len({json.dumps(r["greedy"]["decisions"]) for r in runs.values()}) == 1
    lines += [
        "",
        f"Decisions identical in every mode: {same}. Max |logit difference| on the "
        f"selection split, buckets vs dataset order: {report['max_abs_logit_diff_buckets_vs_dataset_order']:.2e}.",
        f"uptime before: `{report['uptime_before']}`; after: `{report['uptime_after']}`",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
