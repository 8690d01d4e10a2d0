"""Task-vector merges on real fine-tunes: 12 MiniLM tweet fine-tunes from one zero-shot-head
init, beside the paper's soups, scored on the same held-out split.

The ingredients, the shared init (the base θ₀ of every task vector) and the task come from a
finished ``hfsoup reproduce`` sweep (``--sweep``: its workdir, default ``hfsoup-reproduce``, or a
JSON file with ``ingredients``, ``base_with_head``, ``task``; :func:`hfsoup.reproduce.workdir_pool`). Each row is one
``hfsoup.soup`` call on the local folders, one after the other in this process, with the
outputs cache on (``--workdir/outputs-cache``), so each run scores only what it has not scored
before (the ingredients' outputs are cached after the first run):

- best individual, uniform soup: the comparison table of the first run;
- greedy soup (Recipe 1, the plain average);
- task_arithmetic, λ auto (default grid 0.1..1.5);
- ties, λ and density auto (``--ties-lambdas`` × ``--ties-densities``);
- dare_ties at λ 1, density 0.5 (seed 0);
- wise_ft, α auto (default grid 0..1);
- greedy --combine ties at λ 1, density 0.5.

    PYTHONPATH=$PWD python benchmarks/minilm_task_vectors.py --workdir .bench/minilm-tv

Prints the table (selection, test and other report splits; the chosen coefficients; seconds
per run) and writes ``--workdir/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("hfsoup-reproduce"))
    parser.add_argument("--workdir", type=Path, default=Path(".bench/minilm-tv"))
    parser.add_argument("--ties-lambdas", type=_floats, default=[0.6, 1.0, 1.4, 1.8])
    parser.add_argument("--ties-densities", type=_floats, default=[0.2, 0.5, 0.8])
    parser.add_argument("--only", nargs="*", help="run only these rows (by name)")
    args = parser.parse_args()
    from hfsoup.reproduce import workdir_pool

    sweep = workdir_pool(args.sweep)  # a reproduce workdir, or a JSON file with its keys
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HFSOUP_OUTPUTS_CACHE"] = str(work / "outputs-cache")
    import yaml

    import hfsoup

    ingredients, base, task = sweep["ingredients"], sweep["base_with_head"], sweep["task"]
    rows = [
        ("greedy_soup", "greedy", {}),
        ("task_arithmetic", "task_arithmetic", {"base": base, "lambda": "auto"}),
        ("ties", "ties", {"base": base, "lambda": "auto", "density": "auto",
                          "grid": {"lambda": args.ties_lambdas, "density": args.ties_densities}}),
        ("dare_ties", "dare_ties", {"base": base}),
        ("wise_ft", "wise_ft", {"base": base, "alpha": "auto"}),
        ("greedy_ties", "greedy", {"base": base, "combine": "ties"}),
    ]  # fmt: skip
    table: dict[str, dict] = {}
    report: dict[str, dict] = {}
    for name, method, merge in rows:
        if args.only and name not in args.only:
            continue
        out = work / name
        t0 = time.perf_counter()
        result = hfsoup.soup(ingredients, output=out, method=method, task=task,
                             merge=merge or None, overwrite=True, progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        results = result.results
        for baseline in ("best_individual", "uniform_soup"):
            table.setdefault(baseline, results["table"][baseline])
        key = "greedy_soup" if method == "greedy" else method
        table[name] = results["table"][key]
        pinned = yaml.safe_load((out / "hfsoup_recipe.yaml").read_text())
        chosen = {k: pinned[k] for k in ("lambda", "density", "alpha") if pinned.get(k) is not None}
        report[name] = {"seconds": round(seconds, 1), "chosen": chosen,
                        "search_points": len(results.get("search") or []),
                        "kept": (results.get("greedy") or {}).get("accepted")}  # fmt: skip
        print(f"{name}: {seconds:.0f} s, chosen {chosen}", flush=True)
    splits = [task["selection_split"], *task.get("report_splits", [])]
    lines = ["| row | " + " | ".join(f"{s} acc" for s in splits) + " | chosen | kept | s |",
             "|---|" + "---|" * (len(splits) + 3)]  # fmt: skip
    for name, scores in table.items():
        r = report.get(name, {})
        accs = " | ".join(f"{scores[s]['accuracy']:.4f}" for s in splits)
        chosen = ", ".join(f"{k} {v:g}" for k, v in r.get("chosen", {}).items()) or "-"
        kept = len(r["kept"]) if r.get("kept") else "-"
        lines.append(f"| {name} | {accs} | {chosen} | {kept} | {r.get('seconds', '-')} |")
    print("\n".join(lines))
    (work / "report.json").write_text(json.dumps({"table": table, "runs": report}, indent=2))


if __name__ == "__main__":
    main()
