"""The image path end to end: a ViT greedy soup scored on an image dataset served by the Hub."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from factories import save_ingredient, tiny_vit_config

import hfsoup


@pytest.fixture(scope="module")
def images(tmp_path_factory, hub):
    """Three ViT 'fine-tunes' with an image processor, and an image dataset repo."""
    import datasets
    from huggingface_hub import HfApi
    from PIL import Image
    from transformers import ViTImageProcessor

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def rows(n):
        labels = rng.integers(0, 3, n)
        pics = []
        for label in labels:
            pixels = rng.integers(0, 80, (8, 8, 3), dtype=np.uint8)
            pixels[..., label] += 150  # the label is the brightest channel
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            pics.append({"bytes": buf.getvalue(), "path": None})
        return {"image": pics, "labels": labels.tolist()}

    features = datasets.Features({"image": datasets.Image(), "labels": datasets.Value("int64")})
    data = tmp / "ds" / "data"
    data.mkdir(parents=True)
    for split, n in (("validation", 60), ("test", 40)):
        datasets.Dataset.from_dict(rows(n), features=features).to_parquet(
            str(data / f"{split}-00000-of-00001.parquet")
        )
    api.create_repo("test-org/tiny-images", repo_type="dataset", exist_ok=True)
    api.upload_folder(
        repo_id="test-org/tiny-images", repo_type="dataset", folder_path=str(data.parent)
    )
    repos, dirs = [], []
    for i in range(3):
        folder = save_ingredient(tmp / f"vit{i}", tiny_vit_config(), seed=i + 1, base_seed=0)
        ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(folder)
        api.create_repo(f"test-org/vit-ft-{i}", exist_ok=True)
        api.upload_folder(repo_id=f"test-org/vit-ft-{i}", folder_path=str(folder))
        repos.append(f"test-org/vit-ft-{i}")
        dirs.append(folder)
    task = {"dataset": "test-org/tiny-images", "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["image"], "label_column": "labels", "metrics": ["accuracy"], "batch_size": 16}  # fmt: skip
    return {"repos": repos, "dirs": dirs, "task": task}


def independent_accuracy(folder, split: str) -> float:
    import datasets
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    ds = datasets.load_dataset("test-org/tiny-images", split=split)
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**processor(list(ds["image"]), return_tensors="pt")).logits
    return (logits.argmax(-1) == torch.tensor(ds["labels"])).sum().item() / len(ds)


def test_image_greedy_soup_scores_match_an_independent_evaluation(hub, images, tmp_path):
    result = hfsoup.soup(images["repos"], output=tmp_path / "soup", method="greedy",
                         task=images["task"], progress=False)  # fmt: skip
    for row, folder in zip(result.results["ingredients"], images["dirs"], strict=True):
        assert row["scores"]["test"]["accuracy"] == pytest.approx(
            independent_accuracy(folder, "test"), abs=1e-9
        )
    soup_test = independent_accuracy(tmp_path / "soup", "test")
    assert result.results["table"]["greedy_soup"]["test"]["accuracy"] == pytest.approx(
        soup_test, abs=1e-9
    )
    assert (tmp_path / "soup" / "preprocessor_config.json").is_file()
