"""Bad inputs beyond tests/test_errors.py: safetensors headers that lie, NaN/Inf weights,
recipe mistakes through the CLI, datasets without the named columns, GLUE test splits."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml
from factories import load_state_dict, save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
from hfsoup.errors import NonFiniteWeightsError

reliability = pytest.mark.reliability


def rewrite_header(path, edit) -> None:
    """Apply ``edit(header_dict) -> header_dict | bytes`` to a safetensors file's header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def _last(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _past_the_end(header):
    lo, hi = header[_last(header)]["data_offsets"]
    header[_last(header)]["data_offsets"] = [lo + 4096, hi + 4096]
    return header


def _reversed(header):
    lo, hi = header[_last(header)]["data_offsets"]
    header[_last(header)]["data_offsets"] = [hi, lo]
    return header


def _wrong_size(header):
    header[_last(header)]["shape"] = [3]  # the byte range holds more than 3 floats
    return header


LIES = {
    "past the end of the file": (_past_the_end, "ends past the end of the file"),
    "reversed offsets": (_reversed, "bad byte range"),
    "byte range that does not match the shape": (_wrong_size, "bad byte range"),
}


@reliability(
    "safetensors header with out-of-range offsets or a size that does not match the shape",
    "one line naming the ingredient, file and tensor: '... tensor X ends past the end of the "
    "file' / '... has a bad byte range' (CorruptWeightsError), before any weight byte is read",
)
@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_header_that_lies_about_offsets_is_refused(tmp_path, cli, lie):
    edit, message = LIES[lie]
    folder = save_ingredient(tmp_path / "liar", tiny_bert_config(), seed=1)
    rewrite_header(folder / "model.safetensors", edit)
    proc = cli("inspect", folder)
    assert_one_line_error(proc, "model.safetensors", message)


@reliability(
    "safetensors header that claims more bytes than the file has (on the Hub)",
    "one line: '<repo>: model.safetensors: safetensors header claims N bytes, file is shorter' "
    "(CorruptWeightsError)",
)
def test_a_header_longer_than_the_file_is_refused(hub, tmp_path, publish, cli):
    folder = save_ingredient(tmp_path / "liar", tiny_bert_config(), seed=1)
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 100)
    path.write_bytes(bytes(raw))
    repo = publish(folder)[0]
    proc = cli("soup", repo, repo, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, repo, "header claims", "file is shorter")
    assert_nothing_written(tmp_path)


def _poisoned(tmp_path, value: float, name: str = "poisoned"):
    folder = save_ingredient(tmp_path / name, tiny_bert_config(), seed=2)
    state = load_file(folder / "model.safetensors")
    state["bert.encoder.layer.1.output.dense.weight"][3, 5] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@reliability(
    "NaN or Inf in an ingredient",
    "one line: '<ingredient>: tensor X holds NaN or Inf values; set allow_nonfinite to soup it "
    "anyway (--allow-nonfinite)' "
    "(NonFiniteWeightsError); nothing written",
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weights_are_refused_naming_ingredient_and_tensor(tmp_path, cli, value):
    good = save_ingredient(tmp_path / "good", tiny_bert_config(), seed=1)
    bad = _poisoned(tmp_path, value)
    proc = cli("soup", good, bad, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(
        proc, str(bad), "'bert.encoder.layer.1.output.dense.weight'", "--allow-nonfinite"
    )
    assert_nothing_written(tmp_path)


@reliability(
    "NaN or Inf with --allow-nonfinite (or recipe key allow_nonfinite: true)",
    "the soup is made; the recipe in the card records allow_nonfinite, so rebuilding it works",
)
def test_allow_nonfinite_soups_and_is_recorded_in_the_recipe(tmp_path, cli):
    good = save_ingredient(tmp_path / "good", tiny_bert_config(), seed=1)
    bad = _poisoned(tmp_path, float("nan"))
    proc = cli("soup", good, bad, "--output", tmp_path / "soup", "--allow-nonfinite", "-q")
    assert proc.returncode == 0, proc.stderr
    name = "bert.encoder.layer.1.output.dense.weight"
    assert torch.isnan(load_state_dict(tmp_path / "soup")[name][3, 5])
    recipe = yaml.safe_load((tmp_path / "soup" / "hfsoup_recipe.yaml").read_text())
    assert recipe["allow_nonfinite"] is True
    proc = cli("run", tmp_path / "soup" / "README.md", "--output", tmp_path / "again",
               "--allow-local", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@reliability(
    "NaN or Inf in an ingredient of a greedy soup",
    "one line naming the ingredient and tensor (NonFiniteWeightsError), when it is first read",
)
def test_greedy_soup_refuses_nonfinite_weights(tiny_greedy, tmp_path, publish):
    folder = _poisoned(tmp_path, float("inf"))
    tiny_greedy["tok"].save_pretrained(folder)
    bad = publish(folder)[0]
    with pytest.raises(NonFiniteWeightsError, match=rf"{bad}: tensor 'bert\.encoder"):
        hfsoup.soup([tiny_greedy["repos"][0], bad], output=tmp_path / "soup", method="greedy",
                    task=tiny_greedy["task"], progress=False)  # fmt: skip
    assert not (tmp_path / "soup").exists()


RECIPE_MISTAKES = {
    "unknown key": (
        "output:\n  dir: out\n  max_shard: 5GB\n",
        ":5: unknown key 'output.max_shard'",
    ),
    "wrong type": ("seed: first\n", ":3: seed: Input should be a valid integer"),
}


@reliability(
    "Recipe with an unknown key or a value of the wrong type",
    "one line: 'RECIPE.yaml:LINE: unknown key 'output.max_shard'' / 'RECIPE.yaml:LINE: seed: "
    "Input should be a valid integer ...' (RecipeError)",
)
@pytest.mark.parametrize("mistake", sorted(RECIPE_MISTAKES))
def test_recipe_mistakes_name_the_key_and_line(tmp_path, cli, mistake):
    tail, expected = RECIPE_MISTAKES[mistake]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: uniform\ningredients: [org/a, org/b]\n" + tail)
    proc = cli("run", recipe)
    assert_one_line_error(proc, f"{recipe}{expected}")


@reliability(
    "Dataset without the named columns",
    "one line: 'column 'X' not found in split 'S'; its columns are: ...' (TaskError)",
)
def test_dataset_without_the_named_column(tiny_greedy, cli):
    proc = cli("evaluate", tiny_greedy["repos"][0], "--dataset", tiny_greedy["dataset"],
               "--selection-split", "validation", "--input-column", "sentence",
               "--metric", "accuracy", "-q")  # fmt: skip
    assert_one_line_error(proc, "column 'sentence' not found in split 'validation'", "text, label")


@reliability(
    "GLUE test split as a report split",
    "one line: '... GLUE test splits carry no labels ...' (TaskError), before anything is read",
)
def test_glue_test_split_cannot_be_reported(tmp_path, cli):
    proc = cli("soup", "org/a", "org/b", "--method", "greedy", "--task", "glue/sst2",
               "--report-split", "test", "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert_one_line_error(proc, "GLUE test splits carry no labels")
    assert_nothing_written(tmp_path)
