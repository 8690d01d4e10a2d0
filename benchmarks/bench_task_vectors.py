"""Peak RSS of a streamed TIES merge against the uniform soup, for k = 2, 4, 8 ingredients.

Each merge runs in a fresh subprocess (``hfsoup soup``, local folders) and its peak resident
set (``ru_maxrss`` of the child) is reported; the ingredients are a BERT of ~``--hidden`` width
(default 512: ~30 MB float32 each) made once under ``--dir``.

    PYTHONPATH=$PWD python benchmarks/bench_task_vectors.py --dir /tmp/tvbench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def make(folder: Path, hidden: int, k: int) -> tuple[Path, list[Path]]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=4,
                     num_attention_heads=8, intermediate_size=4 * hidden, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
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
        paths.append(path)
    return paths[0], paths[1:]


def peak_mb(args: list[str]) -> float:
    """The child's own peak RSS (os.wait4 reports that one process's rusage)."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "hfsoup", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"hfsoup {' '.join(args)} failed ({proc.returncode})")
    return usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=512)
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    base, fts = make(a.dir, a.hidden, 8)
    size = sum(f.stat().st_size for f in fts[0].glob("*.safetensors")) / 2**20
    print(f"ingredient size: {size:.1f} MB (float32)")
    print("| k | uniform peak RSS (MB) | ties peak RSS (MB) |")
    print("|---|---|---|")
    for k in (2, 4, 8):
        paths = [str(p) for p in fts[:k]]
        common = ["--overwrite", "--quiet"]
        u = peak_mb(["soup", *paths, "-o", str(a.dir / f"u{k}"), *common])
        t = peak_mb(["soup", *paths, "--method", "ties", "--base", str(base),
                     "-o", str(a.dir / f"t{k}"), *common])  # fmt: skip
        print(f"| {k} | {u:.0f} | {t:.0f} |")


if __name__ == "__main__":
    main()
