"""Errors a user can cause: one clear line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from factories import save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file

reliability = pytest.mark.reliability


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hfsoup: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(parent, name: str = "soup") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.hfsoup")]


@pytest.fixture
def good_repo(tmp_path, publish):
    return publish(save_ingredient(tmp_path / "good", tiny_bert_config(), seed=1))[0]


def soup_cli(tmp_path, *ingredients: str, extra: tuple[str, ...] = ()):
    return run_cli("soup", *ingredients, "--output", str(tmp_path / "soup"), "-q", *extra)


@reliability(
    "Repo that does not exist",
    "one line: '<repo>: repository not found (or private: set HF_TOKEN or run `hf auth login` "
    "...)' (IngredientNotFoundError); nothing written",
)
def test_missing_repo(hub, tmp_path, good_repo):
    proc = soup_cli(tmp_path, good_repo, "test-org/does-not-exist")
    assert_one_line_error(proc, "test-org/does-not-exist", "repository not found")
    assert_nothing_written(tmp_path)


@reliability(
    "Revision that does not exist",
    "one line: '<repo>@<rev>: revision not found' (IngredientNotFoundError); nothing written",
)
def test_missing_revision(hub, tmp_path, good_repo):
    proc = soup_cli(tmp_path, good_repo, f"{good_repo}@no-such-branch")
    assert_one_line_error(proc, "no-such-branch", "revision not found")
    assert_nothing_written(tmp_path)


@reliability(
    "Malformed ingredient string",
    "one line: 'ingredient 'X' is not 'org/name', 'org/name@revision' or a local directory' "
    "(IngredientSpecError)",
)
def test_malformed_ingredient_string(hub, tmp_path, good_repo):
    proc = soup_cli(tmp_path, good_repo, "not a repo!")
    assert_one_line_error(proc, "'not a repo!'", "org/name")
    assert_nothing_written(tmp_path)


@reliability(
    "Local ingredient directory that does not exist",
    "one line: 'ingredient './x': no such local directory' (IngredientNotFoundError)",
)
def test_missing_local_directory(hub, tmp_path, good_repo):
    proc = soup_cli(tmp_path, good_repo, "./no/such/dir")
    assert_one_line_error(proc, "no such local directory")


def _variant(tmp_path, publish, name, **config_overrides):
    config = tiny_bert_config(**config_overrides)
    return publish(save_ingredient(tmp_path / name, config, seed=2))[0]


@reliability(
    "Ingredients with different tensor shapes",
    "one line: '<ing> differs from <first>: tensor 'X' has shape [48], expected [32]' "
    "(IncompatibleIngredientsError), before any weight byte is fetched",
)
def test_different_shapes_name_the_tensor(hub, tmp_path, publish, good_repo):
    bad = _variant(tmp_path, publish, "wide", intermediate_size=48)
    proc = soup_cli(tmp_path, good_repo, bad)
    assert_one_line_error(proc, bad, "layer.0.intermediate.dense", "shape [48], expected [32]")
    assert_nothing_written(tmp_path)


@reliability(
    "Ingredients with different tensor names",
    "one line: '<ing> differs from <first>: tensor names: extra 'X', ...' "
    "(IncompatibleIngredientsError)",
)
def test_different_tensor_names_are_listed(hub, tmp_path, publish, good_repo):
    bad = _variant(tmp_path, publish, "deep", num_hidden_layers=3)
    proc = soup_cli(tmp_path, good_repo, bad)
    assert_one_line_error(proc, bad, "tensor names", "extra", "layer.2")


@reliability(
    "Ingredients with different label sets",
    "one line: '<ing> differs from <first>: id2label {...} != {...}' "
    "(IncompatibleIngredientsError)",
)
def test_different_labels_are_refused(hub, tmp_path, publish, good_repo):
    bad = _variant(
        tmp_path, publish, "labels", id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    proc = soup_cli(tmp_path, good_repo, bad)
    assert_one_line_error(proc, bad, "id2label")


@reliability(
    "Ingredients with different model_type",
    "one line: '<ing> differs from <first>: model_type 'roberta' != 'bert'' "
    "(IncompatibleIngredientsError)",
)
def test_different_model_type_is_refused(hub, tmp_path, publish, good_repo):
    folder = save_ingredient(tmp_path / "other", tiny_bert_config(), seed=2)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "roberta"
    (folder / "config.json").write_text(json.dumps(config))
    bad = publish(folder)[0]
    proc = soup_cli(tmp_path, good_repo, bad)
    assert_one_line_error(proc, bad, "model_type", "roberta")


@reliability(
    "Only pickle weights (pytorch_model.bin)",
    "one line: '<repo> has only pickle weights ...; Set allow_pickle to load it with "
    "torch.load(weights_only=True) (--allow-pickle)' (UnsafeWeightsError)",
)
def test_pickle_only_ingredient_names_the_opt_in(hub, tmp_path, publish, good_repo):
    folder = save_ingredient(tmp_path / "pkl", tiny_bert_config(), seed=2)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    bad = publish(folder)[0]
    proc = soup_cli(tmp_path, good_repo, bad)
    assert_one_line_error(proc, bad, "--allow-pickle")
    assert_nothing_written(tmp_path)
    proc = soup_cli(tmp_path, good_repo, bad, extra=("--allow-pickle",))
    assert proc.returncode == 0, proc.stderr


@reliability(
    "Output folder exists and is not empty",
    "one line: 'output folder DIR exists and is not empty; set overwrite to replace it "
    "(--overwrite)' "
    "(OutputExistsError); the folder is untouched",
)
def test_existing_output_is_refused_without_overwrite(hub, tmp_path, good_repo):
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "keep.txt").write_text("mine")
    proc = soup_cli(tmp_path, good_repo, good_repo)
    assert_one_line_error(proc, "not empty", "--overwrite")
    assert (tmp_path / "soup" / "keep.txt").read_text() == "mine"
    proc = soup_cli(tmp_path, good_repo, good_repo, extra=("--overwrite",))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "soup" / "keep.txt").exists()


@reliability(
    "Weights that do not match the ingredient count",
    "one line: 'got 3 weights for 2 ingredients' (RecipeError)",
)
def test_weights_must_match_ingredient_count(hub, tmp_path, good_repo):
    proc = soup_cli(tmp_path, good_repo, good_repo, extra=("--weights", "1", "2", "3"))
    assert_one_line_error(proc, "3 weights for 2 ingredients")
    assert_nothing_written(tmp_path)


@reliability(
    "Unreadable --max-shard-size",
    "one line: 'output.max_shard_size: cannot read 'lots' as a size in bytes (e.g. 5GB, "
    "500MiB)' (RecipeError)",
)
def test_bad_max_shard_size(hub, tmp_path, good_repo):
    proc = soup_cli(tmp_path, good_repo, extra=("--max-shard-size", "lots"))
    assert_one_line_error(proc, "max_shard_size", "'lots'")


@reliability(
    "safetensors header with overlapping offsets",
    "one line: '<ing>: model.safetensors: tensors 'a' and 'b' overlap' (CorruptWeightsError)",
)
def test_overlapping_offsets_in_a_header_are_refused(hub, tmp_path, publish, good_repo):
    folder = tmp_path / "evil"
    folder.mkdir()
    save_ingredient(tmp_path / "src", tiny_bert_config(), seed=2)
    (folder / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    # Two tensors pointing at the same bytes.
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}  # fmt: skip
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(12))
    bad = publish(folder)[0]
    proc = run_cli("inspect", bad)
    assert_one_line_error(proc, "overlap")


def test_debug_shows_the_traceback(hub, tmp_path):
    proc = run_cli("soup", "test-org/nope", "--output", str(tmp_path / "soup"), "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hfsoup: error:")


@reliability(
    "Truncated safetensors header",
    "one line: '<ing>: model.safetensors: safetensors header claims N bytes, file is shorter' "
    "(CorruptWeightsError)",
)
def test_truncated_header_is_refused(tmp_path):
    folder = save_ingredient(tmp_path / "t", tiny_bert_config(), seed=1)
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[:100])
    proc = run_cli("inspect", str(folder))
    assert_one_line_error(proc, "header")


@reliability(
    "Weight index naming paths outside the repo (../)",
    "one line: '<ing>: weight index names '../../etc/passwd', which is not a file of the "
    "repo' (CorruptWeightsError)",
)
def test_index_pointing_outside_the_repo_is_refused(tmp_path):
    folder = save_ingredient(tmp_path / "i", tiny_bert_config(), seed=1)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": {k: "../../etc/passwd" for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = run_cli("inspect", str(folder))
    assert_one_line_error(proc, "../../etc/passwd")
