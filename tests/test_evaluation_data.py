"""Task data: loading splits, holdout, limit, column checks, preprocessing into batches.

Also home of the small data helpers the scorer tests import (tokenizer, parquet splits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hfsoup.errors import TaskError
from hfsoup.tasks.data import holdout_indices, load_task_splits
from hfsoup.tasks.preprocess import prepare_split
from hfsoup.tasks.task import resolve_task

WORDS = "the a good bad movie film great awful plot acting was is not very fine dull fun".split()  # noqa: SIM905
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer():
    """A BERT WordPiece tokenizer over a 22-word vocabulary (fits tiny_bert_config's 64 ids)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)})


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(n)]


def write_split(path: Path, columns: dict[str, list], features=None) -> str:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return str(path)


def text_dataset(folder: Path, sizes: dict[str, int], *, pairs: bool = False) -> dict:
    """Local parquet splits with ``idx``, ``sentence`` (and ``sentence2``) and a 0/1 ``label``."""
    files = {}
    for seed, (split, n) in enumerate(sizes.items()):
        columns = {"idx": list(range(n)), "sentence": sentences(n, seed)}
        if pairs:
            columns["sentence2"] = sentences(n, seed + 100)
        columns["label"] = [int("good" in s or "fun" in s) for s in columns["sentence"]]
        files[split] = write_split(folder / f"{split}.parquet", columns)
    return {"path": "parquet", "data_files": files}


def text_task(dataset: dict, **fields):
    base = {
        "dataset": dataset,
        "selection_split": "validation",
        "report_splits": ["test"],
        "input_columns": ["sentence"],
    }
    return resolve_task({**base, **fields})


@pytest.fixture
def data(tmp_path):
    return text_dataset(tmp_path / "data", {"train": 50, "validation": 20, "test": 12})


# -- loading ---------------------------------------------------------------------------------------
def test_splits_are_loaded_in_order_selection_first(data):
    splits = load_task_splits(text_task(data))
    assert list(splits) == ["validation", "test"]
    assert list(splits["test"]["sentence"]) == sentences(12, 2)


def test_missing_column_is_named_with_the_columns_that_exist(data):
    with pytest.raises(TaskError) as info:
        load_task_splits(text_task(data, input_columns=["text"]))
    assert str(info.value) == (
        "column 'text' not found in split 'validation'; its columns are: idx, sentence, label"
    )


def test_unknown_split_is_a_task_error(data):
    with pytest.raises(TaskError, match="'dev'"):
        load_task_splits(text_task(data, report_splits=["dev"]))


def test_limit_keeps_the_first_rows_of_every_split(data):
    splits = load_task_splits(text_task(data, limit=5))
    assert list(splits["validation"]["idx"]) == [0, 1, 2, 3, 4]
    assert list(splits["test"]["sentence"]) == sentences(12, 2)[:5]


def test_holdout_carves_a_disjoint_fraction_of_train(data):
    holdout = {"fraction": 0.2, "seed": 3}
    task = text_task(data, selection_split=None, holdout=holdout, report_splits=["train", "test"])
    splits = load_task_splits(task)
    held, rest = list(splits["holdout"]["idx"]), list(splits["train"]["idx"])
    assert len(held) == 10
    assert set(held).isdisjoint(rest) and sorted(held + rest) == list(range(50))


def test_holdout_is_the_same_on_every_run_and_changes_with_the_seed():
    first, _ = holdout_indices(1000, 0.05, seed=7)
    assert holdout_indices(1000, 0.05, seed=7)[0] == first
    assert holdout_indices(1000, 0.05, seed=8)[0] != first
    assert len(first) == 50


def test_holdout_rows_follow_numpy_pcg64_permutation():
    held, rest = holdout_indices(20, 0.25, seed=0)
    expected = np.random.default_rng(0).permutation(20)
    assert held == sorted(expected[:5].tolist()) and rest == sorted(expected[5:].tolist())


def test_remaining_train_rows_are_not_loaded_unless_reported(data):
    splits = load_task_splits(text_task(data, selection_split="holdout", holdout={"fraction": 0.2}))
    assert list(splits) == ["holdout", "test"]


def test_dataset_from_the_test_hub(api, repo_id, tmp_path):
    rid = repo_id("tweets")
    api.create_repo(rid, repo_type="dataset")
    folder = tmp_path / "repo"
    text_dataset(folder / "data", {"validation": 9, "test": 7})
    for split in ("validation", "test"):  # the Hub's default layout: data/<split>-*.parquet
        (folder / "data" / f"{split}.parquet").rename(folder / "data" / f"{split}-00000.parquet")
    api.upload_folder(repo_id=rid, repo_type="dataset", folder_path=str(folder))
    splits = load_task_splits(text_task(rid))
    assert list(splits["validation"]["sentence"]) == sentences(9, 0)
    assert list(splits["test"]["sentence"]) == sentences(7, 1)


# -- preprocessing ---------------------------------------------------------------------------------
def test_text_batches_are_padded_per_batch_and_truncated(data):
    tokenizer = make_tokenizer()
    task = text_task(data, batch_size=8, max_length=6)
    dataset = load_task_splits(task)["validation"]
    prepared = prepare_split(dataset, task, tokenizer, name="validation")
    assert [len(b["input_ids"]) for b in prepared.batches] == [8, 8, 4]
    # Length buckets (the default) put the examples in ``order``: batch i holds its 8.
    order = prepared.order.tolist()
    for i, batch in enumerate(prepared.batches):
        texts = [dataset["sentence"][j] for j in order[8 * i : 8 * i + 8]]
        ids = [tokenizer(t, truncation=True, max_length=6)["input_ids"] for t in texts]
        assert batch["input_ids"].shape[1] == max(map(len, ids))
        assert [
            row[: len(r)].tolist() for row, r in zip(batch["input_ids"], ids, strict=True)
        ] == ids
    assert prepared.labels.tolist() == list(dataset["label"])


def test_two_input_columns_are_tokenized_as_pairs(tmp_path):
    data = text_dataset(tmp_path, {"validation": 4, "test": 4}, pairs=True)
    task = text_task(data, input_columns=["sentence", "sentence2"])
    dataset = load_task_splits(task)["validation"]
    prepared = prepare_split(dataset, task, make_tokenizer(), name="validation")
    expected = make_tokenizer()(list(dataset["sentence"]), list(dataset["sentence2"]), padding=True)
    order = prepared.order.tolist()  # one batch, its rows sorted by the pair's length
    assert prepared.batches[0]["input_ids"].tolist() == [expected["input_ids"][j] for j in order]
    assert prepared.batches[0]["token_type_ids"].tolist() == [
        expected["token_type_ids"][j] for j in order
    ]


def test_image_column_goes_through_the_image_processor(tmp_path):
    import datasets
    from PIL import Image
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)) for _ in range(5)]
    images[1] = images[1].convert("L")  # grayscale rows are converted to RGB
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(3)})
    files = {
        s: write_split(
            tmp_path / f"{s}.parquet", {"img": images, "label": [0, 1, 2, 1, 0]}, features
        )
        for s in ("validation", "test")
    }
    task = text_task({"path": "parquet", "data_files": files}, input_columns=["img"], batch_size=2)
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    prepared = prepare_split(load_task_splits(task)["test"], task, processor, name="test")
    pixels = torch.cat([b["pixel_values"] for b in prepared.batches])
    expected = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    torch.testing.assert_close(pixels, expected["pixel_values"])
    assert prepared.labels.tolist() == [0, 1, 2, 1, 0]


def test_unlabelled_examples_are_refused(tmp_path):
    files = {
        s: write_split(tmp_path / f"{s}.parquet", {"sentence": ["a", "b"], "label": [0, -1]})
        for s in ("validation", "test")
    }
    task = text_task({"path": "parquet", "data_files": files})
    with pytest.raises(TaskError, match="unlabelled"):
        prepare_split(load_task_splits(task)["test"], task, make_tokenizer(), name="test")


def test_label_names_are_mapped_through_the_model_label2id(tmp_path):
    files = {
        s: write_split(tmp_path / f"{s}.parquet", {"sentence": ["a", "b"], "label": ["pos", "neg"]})
        for s in ("validation", "test")
    }
    task = text_task({"path": "parquet", "data_files": files})
    split = load_task_splits(task)["test"]
    prepared = prepare_split(
        split, task, make_tokenizer(), name="test", label2id={"neg": 0, "pos": 1}
    )
    assert prepared.labels.tolist() == [1, 0]
    with pytest.raises(TaskError, match="'pos'"):
        prepare_split(split, task, make_tokenizer(), name="test", label2id={"neg": 0, "other": 1})


def test_class_label_ids_follow_the_model_label_order(tmp_path):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    files = {
        s: write_split(
            tmp_path / f"{s}.parquet", {"sentence": ["a", "b"], "label": [0, 1]}, features
        )
        for s in ("validation", "test")
    }
    task = text_task({"path": "parquet", "data_files": files})
    split = load_task_splits(task)["test"]
    prepared = prepare_split(
        split, task, make_tokenizer(), name="test", label2id={"pos": 0, "neg": 1}
    )
    assert prepared.labels.tolist() == [1, 0]


def test_float_labels_are_regression_targets(tmp_path):
    files = {
        s: write_split(tmp_path / f"{s}.parquet", {"sentence": ["a", "b"], "label": [0.5, 4.25]})
        for s in ("validation", "test")
    }
    task = text_task({"path": "parquet", "data_files": files})
    prepared = prepare_split(load_task_splits(task)["test"], task, make_tokenizer(), name="test")
    assert prepared.labels.dtype == torch.float32 and prepared.labels.tolist() == [0.5, 4.25]
