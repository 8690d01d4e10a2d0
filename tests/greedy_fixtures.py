"""Tiny real fine-tunes for greedy-soup tests: a keyword-sentiment task a 2-layer BERT learns
in a second, trained from one shared init with different learning rates and seeds."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from factories import make_model, tiny_bert_config

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "movie", "was", "plot", "it", "very", "and"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILLER]


def sentences(n: int, seed: int) -> list[dict]:
    """Labelled sentences: positive iff more positive than negative words (ties dropped)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        p, q = rng.randint(0, 2), rng.randint(0, 2)
        if p == q:
            continue
        words += [rng.choice(POS) for _ in range(p)] + [rng.choice(NEG) for _ in range(q)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": int(p > q)})
    return rows


def tokenizer(tmp: Path):
    """A BERT WordPiece tokenizer over the task's words (fits tiny_bert_config's 64 ids)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def fine_tune(
    folder: Path, tok, train: list[dict], *, lr: float, seed: int, steps: int = 100,
    start: Path | None = None,
) -> Path:  # fmt: skip
    """Train the shared init (seed 0), or the model saved in ``start``, for a few steps; save
    model + tokenizer to ``folder``."""
    if start is None:
        model = make_model(tiny_bert_config(), seed=0)
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(start)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train), (16,), generator=gen).tolist()
        batch = tok([train[i]["text"] for i in idx], padding=True, return_tensors="pt")
        labels = torch.tensor([train[i]["label"] for i in idx])
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def publish_fine_tunes(
    api, tmp: Path, tok, train: list[dict], runs: list[dict], *, prefix: str
) -> tuple[list[str], list[Path]]:
    """One :func:`fine_tune` per ``runs`` entry (its keywords; seed = position), each uploaded
    to ``{prefix}-{i}``. Returns ``(repo IDs, local folders)``."""
    repos, dirs = [], []
    for i, run in enumerate(runs):
        folder = fine_tune(tmp / f"ft{i}", tok, train, seed=i, **run)
        repos.append(f"{prefix}-{i}")
        api.create_repo(repos[-1], exist_ok=True)
        api.upload_folder(repo_id=repos[-1], folder_path=str(folder))
        dirs.append(folder)
    return repos, dirs


def publish_dataset(api, repo: str, splits: dict[str, list[dict]], tmp: Path) -> None:
    import pandas as pd

    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    data = tmp / "dataset" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        pd.DataFrame(rows).to_parquet(data / f"{name}-00000-of-00001.parquet")
    api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(data.parent))


def accuracy(state: dict[str, torch.Tensor], folder, rows, tok) -> float:
    """Independent scoring: a fresh from_pretrained model with ``state`` loaded, full split."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        pred = model(**batch).logits.argmax(-1)
    return (pred == torch.tensor([r["label"] for r in rows])).sum().item() / len(rows)


def publish_sentiment(
    api, tmp: Path, runs: list[dict], *, dataset: str, prefix: str, seeds: tuple[int, int, int],
    sizes: tuple[int, int, int], batch_size: int,
) -> dict:  # fmt: skip
    """A train/validation/test keyword-sentiment dataset and one fine-tune per ``runs`` entry,
    on the Hub. Returns ``{repos, dirs, task, splits, tok}``."""
    tok = tokenizer(tmp)
    splits = {name: sentences(n, seed)
              for name, n, seed in zip(("train", "validation", "test"), sizes, seeds, strict=True)}  # fmt: skip
    publish_dataset(api, dataset, splits, tmp)
    repos, dirs = publish_fine_tunes(api, tmp, tok, splits["train"], runs, prefix=prefix)
    task = {"dataset": dataset, "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["text"], "label_column": "label", "metrics": ["accuracy"],
            "batch_size": batch_size}  # fmt: skip
    return {"repos": repos, "dirs": dirs, "task": task, "splits": splits, "tok": tok}
