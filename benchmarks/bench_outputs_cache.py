"""The outputs cache across runs: a greedy soup after an ``hfsoup evaluate``, with and without it.

Self-contained (no Hub, no download): k BERT-shaped classifiers made from one seeded init plus
seeded noise (weights only matter for timing here, not for accuracy), saved as local folders,
and a parquet text-classification task written beside them. Measures, on the same machine and
ingredients:

1. ``hfsoup.evaluate`` with an empty outputs cache (every ingredient scored, outputs stored);
2. a greedy soup after it (every ingredient's outputs read from the cache);
3. the same greedy soup with ``cache=False`` (every ingredient scored again);
4. a learned soup after them (cache on), and with ``cache=False``.

    python benchmarks/bench_outputs_cache.py --k 6 --examples 1000

Prints a table of ``timings.score_ingredients``, ``timings.cache`` and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i}" for i in range(400)]


def _make(folder: Path, k: int, examples: int, hidden: int, layers: int, seed: int) -> dict:
    import pandas as pd
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=4 * hidden,
                        max_position_embeddings=128, num_labels=2)  # fmt: skip
    torch.manual_seed(seed)
    base = BertForSequenceClassification(config).state_dict()
    repos = []
    for i in range(k):
        gen = torch.Generator().manual_seed(seed + 1 + i)
        model = BertForSequenceClassification(config)
        noisy = {n: t + 0.02 * torch.randn(t.shape, generator=gen) if t.is_floating_point()
                 else t for n, t in base.items()}  # fmt: skip
        model.load_state_dict(noisy)
        out = folder / f"ft-{i}"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        repos.append(str(out))
    rng = random.Random(seed)
    data = folder / "data"
    data.mkdir()
    files = {}
    for split in ("validation", "test"):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))),
                 "label": rng.randint(0, 1)} for _ in range(examples)]  # fmt: skip
        pd.DataFrame(rows).to_parquet(data / f"{split}.parquet")
        files[split] = str(data / f"{split}.parquet")
    task = {"dataset": {"path": "parquet", "data_files": files}, "selection_split": "validation",
            "report_splits": ["test"], "input_columns": ["text"], "label_column": "label",
            "metrics": ["accuracy"], "max_length": 64, "batch_size": 64}  # fmt: skip
    return {"repos": repos, "task": task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--examples", type=int, default=1000, help="per split")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hfsoup-bench-outputs-"))
    os.environ["HFSOUP_OUTPUTS_CACHE"] = str(work / "outputs-cache")
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    import hfsoup

    made = _make(work, args.k, args.examples, args.hidden, args.layers, args.seed)
    repos, task = made["repos"], made["task"]
    rows = []

    def timed(name, fn):
        t0 = time.perf_counter()
        timings = fn()
        wall = time.perf_counter() - t0
        rows.append({"run": name, "wall_s": round(wall, 2),
                     "score_ingredients_s": timings.get("score_ingredients",
                                                        timings.get("evaluate")),
                     "cache": timings.get("cache")})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    timed("evaluate (empty cache)",
          lambda: hfsoup.evaluate(repos, task=task, progress=False)["timings"])  # fmt: skip
    for method, extra in (("greedy", {}), ("learned", {"learned": {"epochs": 1}})):
        for cache in (None, False):
            out = work / f"{method}-{cache}"
            timed(f"{method} ({'no-cache' if cache is False else 'after evaluate'})",
                  lambda out=out, cache=cache, method=method, extra=extra: hfsoup.soup(
                      repos, output=out, method=method, task=task, progress=False,
                      cache=cache, **extra).results["timings"])  # fmt: skip
    print("\n| run | wall (s) | score_ingredients (s) | cache |\n|---|---|---|---|")
    for r in rows:
        sec = r["score_ingredients_s"]
        print(f"| {r['run']} | {r['wall_s']:.1f} | {sec:.2f} | {r['cache']} |")


if __name__ == "__main__":
    main()
