"""Uniform soups from Hub repos: the numbers, the layout on disk, and loading the result."""

from __future__ import annotations

import json

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config, tiny_vit_config

import hfsoup


def plain_average(dirs, weights=None) -> dict[str, torch.Tensor]:
    """Independent reference: fully loaded state dicts averaged with plain torch."""
    sds = [load_state_dict(d) for d in dirs]
    weights = weights or [1.0] * len(sds)
    total = sum(weights)
    return {
        k: sum(w * sd[k].double() for w, sd in zip(weights, sds, strict=True)) / total
        for k in sds[0]
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_uniform_soup_equals_plain_average(hub, bert_soup_ingredients, tmp_path):
    repos, dirs = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6


def test_weighted_soup_normalises_weights(hub, bert_soup_ingredients, tmp_path):
    repos, dirs = bert_soup_ingredients
    result = hfsoup.soup(repos, output=tmp_path / "soup", weights=[2, 1, 1], progress=False)
    assert result.weights == pytest.approx([0.5, 0.25, 0.25])
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs, [2, 1, 1])) <= 1e-6


def test_output_is_sharded_with_an_index(hub, bert_soup_ingredients, tmp_path):
    repos, dirs = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", max_shard_size="10KB", progress=False)
    index = json.loads((tmp_path / "soup" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "soup").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6


def test_soup_loads_with_from_pretrained(hub, bert_soup_ingredients, tmp_path):
    from transformers import AutoModelForSequenceClassification

    repos, dirs = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup")
    expected = plain_average(dirs)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, param in state.items():
        assert torch.allclose(param.double(), expected[name], atol=1e-6), name


def test_dtype_option_casts_the_output(hub, bert_soup_ingredients, tmp_path):
    repos, dirs = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", dtype="bfloat16", progress=False)
    out = load_state_dict(tmp_path / "soup")
    expected = plain_average(dirs)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert all(torch.equal(out[k], expected[k].float().to(torch.bfloat16)) for k in out)
    config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_mixed_float_dtypes_are_cast_and_written_in_the_first_dtype(hub, tmp_path, publish):
    config = tiny_bert_config()
    a = save_ingredient(tmp_path / "a", config, seed=1)
    b = save_ingredient(tmp_path / "b", config, seed=2)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(b).half().save_pretrained(tmp_path / "b16")
    repos = [publish(a)[0], publish(tmp_path / "b16")[0]]
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    out = load_state_dict(tmp_path / "soup")
    assert all(t.dtype == torch.float32 for t in out.values())
    assert max_diff(out, plain_average([a, tmp_path / "b16"])) <= 1e-6


def test_older_revision_soups_the_older_weights(hub, tmp_path, publish, api):
    config = tiny_bert_config()
    old = save_ingredient(tmp_path / "old", config, seed=1)
    new = save_ingredient(tmp_path / "new", config, seed=99)
    other = save_ingredient(tmp_path / "other", config, seed=2)
    repo, old_sha = publish(old, message="v1")
    publish(new, repo=repo, message="v2")
    api.create_tag(repo, tag="v1", revision=old_sha)
    other_repo = publish(other)[0]
    result = hfsoup.soup([f"{repo}@v1", other_repo], output=tmp_path / "soup", progress=False)
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average([old, other])) <= 1e-6
    assert result.results["ingredients"][0]["sha"] == old_sha
    assert result.results["ingredients"][0]["revision"] == "v1"


def test_vit_soup_with_image_processor(hub, tmp_path, publish):
    from transformers import AutoModelForImageClassification, ViTImageProcessor

    config = tiny_vit_config()
    dirs = [save_ingredient(tmp_path / f"v{i}", config, seed=i + 1) for i in range(2)]
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(dirs[0])
    repos = [publish(d)[0] for d in dirs]
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    assert (tmp_path / "soup" / "preprocessor_config.json").is_file()
    AutoModelForImageClassification.from_pretrained(tmp_path / "soup")
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6


def test_local_directories_are_ingredients(tmp_path):
    config = tiny_bert_config()
    dirs = [save_ingredient(tmp_path / f"d{i}", config, seed=i + 1) for i in range(2)]
    hfsoup.soup([str(d) for d in dirs], output=tmp_path / "soup", progress=False)
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6


def test_tokenizer_files_of_the_first_ingredient_are_copied(hub, tmp_path, publish):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]
    config = tiny_bert_config()
    dirs = [save_ingredient(tmp_path / f"t{i}", config, seed=i + 1) for i in range(2)]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(dirs[0])
    repos = [publish(d)[0] for d in dirs]
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(tmp_path / "soup")
    theirs = AutoTokenizer.from_pretrained(dirs[0])
    assert ours("good bad")["input_ids"] == theirs("good bad")["input_ids"] == [2, 5, 6, 3]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "soup" / name).read_bytes() == (dirs[0] / name).read_bytes()


def test_soup_leaves_the_torch_thread_count_as_it_found_it(tmp_path):
    config = tiny_bert_config()
    dirs = [save_ingredient(tmp_path / f"d{i}", config, seed=i + 1) for i in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hfsoup.soup([str(d) for d in dirs], output=tmp_path / "soup", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
