"""Task-vector merges: peak RSS and seconds of a streamed TIES merge against the uniform soup
for k = 2, 4, 8 ingredients, and the cost of a coefficient search (``--lambda auto``).

Each merge runs in a fresh subprocess (``hfsoup soup``'s ``main``, local folders): its peak
resident set (VmHWM), its growth above the resident set after the heavy imports (the high-water
mark reset there), and its wall seconds (spawn to exit, imports included) are reported beside
``hfsoup inspect``'s estimate for the same run; the ingredients are a BERT of ~``--hidden`` width (default 512: ~30 MB float32 each)
made once under ``--dir``.

The search part scores k = 4 task-arithmetic merges on a small local parquet task (random
keyword sentences, ``--examples`` in the selection split) with grids of 1 and ``--points`` λ
values, and a TIES search over 1 and 2 densities: the λ points share one merged task vector
(each is θ₀ + λ·τ in the live model, then scored), a second density streams τ again.

    PYTHONPATH=$PWD python benchmarks/bench_task_vectors.py --dir /tmp/tvbench
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = ["good", "great", "bad", "awful", "the", "a", "movie", "plot", "was", "very"]


def make(folder: Path, hidden: int, k: int) -> tuple[Path, list[Path]]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    cfg = BertConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=4,
                     num_attention_heads=8, intermediate_size=4 * hidden, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    paths = []
    for i, name in enumerate(["base", *[f"ft{j}" for j in range(k)]]):
        path = folder / name
        if not path.exists():
            model = BertForSequenceClassification(cfg)
            model.load_state_dict(base.state_dict())
            if i:
                gen = torch.Generator().manual_seed(i)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            model.save_pretrained(path)
            tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1:]


def make_task(folder: Path, examples: int) -> Path:
    """A local parquet task: sentences labelled by whether 'good'/'great' outnumber the rest."""
    import pandas as pd

    rng = random.Random(0)
    files = {}
    for split, n in (("validation", examples), ("test", examples)):
        rows = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            pos = sum(w in ("good", "great") for w in words)
            rows.append({"text": " ".join(words), "label": int(pos > len(words) / 5)})
        files[split] = str(folder / f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(files[split])
    task = {"dataset": {"path": "parquet", "data_files": files}, "selection_split": "validation",
            "report_splits": ["test"], "input_columns": ["text"], "label_column": "label",
            "metrics": ["accuracy"], "batch_size": 64}  # fmt: skip
    path = folder / "task.yaml"
    path.write_text(json.dumps(task))  # JSON is YAML
    return path


# The child: the heavy imports first, then the high-water mark reset (Linux >= 4.0), then the
# command in-process; it prints the growth of VmHWM above the post-import resident set.
_CHILD = """
import json, sys
import torch, transformers, datasets, safetensors
import hfsoup.api, hfsoup.methods.task_vectors, hfsoup.methods.tv_search
import hfsoup.methods.greedy_run, hfsoup.tasks.classification
from hfsoup.cli import main
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
code = main(sys.argv[1:])
print(json.dumps({"code": code, "growth": status("VmHWM") - before, "hwm": status("VmHWM")}))
"""


def measure(args: list[str]) -> tuple[float, float, float]:
    """The child's peak RSS and its growth above the post-import resident set (MB), and its
    wall seconds (spawn to exit, imports included)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"hfsoup {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["hwm"] / 2**20, out["growth"] / 2**20, seconds


def estimate_mb(paths: list[str], **options) -> float:
    """``hfsoup inspect``'s peak-memory estimate for the same run (it counts no imports)."""
    import hfsoup

    return hfsoup.inspect(paths, **options).estimate["peak_memory_bytes"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--examples", type=int, default=200, help="selection (and test) examples")
    ap.add_argument("--points", type=int, default=8, help="λ values of the larger grid")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    base, fts = make(a.dir, a.hidden, 8)
    size = sum(f.stat().st_size for f in fts[0].glob("*.safetensors")) / 2**20
    print(f"ingredient size: {size:.1f} MB (float32)\n")
    common = ["--overwrite", "--quiet", "--no-cache"]
    print(
        "Peak RSS: the whole process, imports included; growth: its peak above the resident "
        "set after the imports, what the inspect estimate counts.\n"
    )
    print(
        "| k | uniform peak / growth (MB) | ties peak / growth (MB) | uniform s | ties s "
        "| estimate uniform / ties (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for k in (2, 4, 8):
        paths = [str(p) for p in fts[:k]]
        u, ug, us = measure(["soup", *paths, "-o", str(a.dir / f"u{k}"), *common])
        t, tg, ts = measure(["soup", *paths, "--method", "ties", "--base", str(base),
                             "-o", str(a.dir / f"t{k}"), *common])  # fmt: skip
        eu, et = estimate_mb(paths), estimate_mb(paths, method="ties", base=str(base))
        print(f"| {k} | {u:.0f} / {ug:.0f} | {t:.0f} / {tg:.0f} | {us:.1f} | {ts:.1f} "
              f"| {eu:.0f} / {et:.0f} |")  # fmt: skip

    task = make_task(a.dir, a.examples)
    paths = [str(p) for p in fts[:4]]
    lambdas = ",".join(f"{0.2 * (i + 1):g}" for i in range(a.points))
    rows = [
        ("task_arithmetic, no task (the merge alone)", ["--method", "task_arithmetic"]),
        ("task_arithmetic, λ auto, 1 point", ["--method", "task_arithmetic", "--task", str(task),
                                              "--lambda", "auto", "--grid", "lambda=1"]),
        (f"task_arithmetic, λ auto, {a.points} points",
         ["--method", "task_arithmetic", "--task", str(task), "--lambda", "auto",
          "--grid", f"lambda={lambdas}"]),
        ("ties, λ + density auto, 1 × 1 points",
         ["--method", "ties", "--task", str(task), "--lambda", "auto", "--density", "auto",
          "--grid", "lambda=1", "density=0.5"]),
        ("ties, λ + density auto, 1 λ × 2 densities",
         ["--method", "ties", "--task", str(task), "--lambda", "auto", "--density", "auto",
          "--grid", "lambda=1", "density=0.3,0.7"]),
    ]  # fmt: skip
    print(f"\nk = 4, {a.examples} selection + {a.examples} test examples:\n")
    print("| run | peak RSS / growth (MB) | s | inspect estimate (MB) |")
    print("|---|---|---|---|")
    for i, (label, flags) in enumerate(rows):
        rss, growth, s = measure(["soup", *paths, "--base", str(base), *flags,
                                  "-o", str(a.dir / f"s{i}"), *common])  # fmt: skip
        est = estimate_mb(paths, method=flags[1], base=str(base), scored="--task" in flags)
        print(f"| {label} | {rss:.0f} / {growth:.0f} | {s:.1f} | {est:.0f} |")


if __name__ == "__main__":
    main()
