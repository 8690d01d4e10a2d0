"""Compatibility decided on what matters, and the safetensors dtypes of real Hub repos."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save, save_file
from test_errors import assert_nothing_written, assert_one_line_error

from hfsoup.check.compat import align_ingredients, check_compatible
from hfsoup.errors import IncompatibleIngredientsError, NonFiniteWeightsError
from hfsoup.io.hub import parse_ingredient, resolve
from hfsoup.io.tensors import all_finite, index_ingredient

reliability = pytest.mark.reliability


def indexed(*folders):
    return [index_ingredient(resolve(parse_ingredient(str(f)))) for f in folders]


def edit_config(folder, drop=(), **values):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    config.update(values)
    path.write_text(json.dumps(config))


def plain_average(*folders) -> dict[str, torch.Tensor]:
    states = [load_state_dict(f) for f in folders]
    return {n: sum(s[n].double() for s in states) / len(states) for n in states[0]}


def assert_close_to(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-6, atol=1e-6)


@pytest.fixture
def pair(tmp_path):
    """Two tiny BERT fine-tunes of one init, saved by model.save_pretrained."""
    config = tiny_bert_config()
    return (
        save_ingredient(tmp_path / "a", config, seed=1),
        save_ingredient(tmp_path / "b", config, seed=2),
    )


# --- cosmetic config differences are a warning --------------------------------------------------


@reliability(
    "Ingredient whose config.json has no `architectures` (written by config.save_pretrained)",
    "a warning: 'hfsoup: <ing> differs from <first> in config fields that do not decide "
    "compatibility: architectures (unset in <ing>), ...'; the soup is made",
)
def test_config_without_architectures_soups(tmp_path, cli, publish, pair):
    a, b = pair
    tiny_bert_config().save_pretrained(b)  # config.json as an older repo has it
    assert "architectures" not in json.loads((b / "config.json").read_text())
    repo_a, repo_b = publish(a)[0], publish(b)[0]

    proc = cli("soup", repo_a, repo_b, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "architectures" in line]
    assert warning == [warning[0]] and warning[0].startswith(f"hfsoup: {repo_b} differs from")
    assert f"architectures (unset in {repo_b})" in warning[0]
    assert_close_to(load_state_dict(tmp_path / "soup"), plain_average(a, b))


def test_cosmetic_fields_are_one_warning_naming_each(pair, caplog):
    a, b = pair
    edit_config(
        b, drop=["architectures"], _name_or_path="/home/someone/ckpt-500",
        transformers_version="4.30.0", torch_dtype="float16", hidden_dropout_prob=0.3,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hfsoup"):
        report = check_compatible(indexed(a, b))
    fields = report.config_fields[str(b)]
    assert fields == [
        "_name_or_path (unset in " + str(a) + ")",
        f"architectures (unset in {b})",
        "hidden_dropout_prob",
        f"torch_dtype (unset in {a})",
        "transformers_version",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        f"{b} differs from {a} in config fields that do not decide compatibility: "
        f"{', '.join(fields)}; the soup's config.json is {a}'s"
    ]


def test_identical_configs_warn_nothing(pair, caplog):
    with caplog.at_level(logging.WARNING, logger="hfsoup"):
        report = check_compatible(indexed(*pair))
    assert report.config_fields == {} and caplog.records == []


@reliability(
    "Ingredients whose configs differ in a field that changes what the weights compute "
    "(hidden_act, layer_norm_eps, position_embedding_type, ...)",
    "one line: '<ing> differs from <first>: hidden_act 'relu' != 'gelu'' "
    "(IncompatibleIngredientsError)",
)
def test_a_field_that_changes_the_function_is_refused(pair):
    a, b = pair
    edit_config(b, hidden_act="relu")
    with pytest.raises(IncompatibleIngredientsError) as exc:
        check_compatible(indexed(a, b))
    assert str(exc.value) == f"{b} differs from {a}: hidden_act 'relu' != 'gelu'"


def test_a_functional_field_left_out_means_its_default(pair, caplog):
    a, b = pair
    assert json.loads((a / "config.json").read_text())["layer_norm_eps"] == 1e-12  # the default
    edit_config(b, drop=["layer_norm_eps", "hidden_act"])
    with caplog.at_level(logging.WARNING, logger="hfsoup"):
        report = check_compatible(indexed(a, b))
    assert report.config_fields == {} and caplog.records == []


def test_a_functional_field_left_out_is_compared_with_its_default(pair):
    a, b = pair
    edit_config(a, layer_norm_eps=1e-5)
    edit_config(b, drop=["layer_norm_eps"])
    with pytest.raises(IncompatibleIngredientsError, match=r"layer_norm_eps 1e-12 != 1e-05"):
        check_compatible(indexed(a, b))


def test_nested_config_fields_are_compared_one_by_one(pair):
    a, b = pair
    edit_config(a, text_config={"hidden_act": "gelu", "dropout": 0.1})
    edit_config(b, text_config={"hidden_act": "gelu", "dropout": 0.2})
    assert check_compatible(indexed(a, b)).config_fields == {str(b): ["text_config.dropout"]}
    edit_config(b, text_config={"hidden_act": "silu", "dropout": 0.1})
    with pytest.raises(IncompatibleIngredientsError, match="text_config.hidden_act 'silu'"):
        check_compatible(indexed(a, b))


def test_a_functional_field_holding_an_object_is_compared_whole(pair):
    a, b = pair
    edit_config(a, rope_scaling={"rope_type": "linear", "factor": 2.0})
    edit_config(b, rope_scaling={"rope_type": "linear", "factor": 4.0})
    with pytest.raises(IncompatibleIngredientsError, match=r"rope_scaling \{.*4\.0.*\} != "):
        check_compatible(indexed(a, b))


# --- the most serious difference leads ------------------------------------------------------------


def _differs_everywhere(folder):
    """Missing a tensor, another shape, an integer tensor for a float one, another model_type,
    another hidden_act, no architectures."""
    state = load_file(folder / "model.safetensors")
    del state["bert.pooler.dense.bias"]
    state["bert.embeddings.position_embeddings.weight"] = torch.zeros(48, 16)
    state["classifier.bias"] = torch.zeros(2, dtype=torch.int64)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(folder, drop=["architectures"], model_type="roberta", hidden_act="relu")


@reliability(
    "Ingredient that differs in several ways at once (tensors, shapes, dtypes, model_type, config)",
    "one line that leads with the most serious difference: '<ing> differs from <first>: tensor "
    "names: missing 'X'; also tensor 'Y' has shape ...; also ... model_type ...'",
)
def test_the_message_leads_with_the_most_serious_difference(tmp_path, cli, pair):
    a, b = pair
    _differs_everywhere(b)
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc)
    line = proc.stderr.strip()
    assert line == (
        f"hfsoup: error: {b} differs from {a}: tensor names: missing 'bert.pooler.dense.bias'; "
        "also tensor 'bert.embeddings.position_embeddings.weight' has shape [48, 16], expected "
        "[32, 16]; also tensor 'classifier.bias' has dtype I64, expected F32; also model_type "
        "'roberta' != 'bert' (and 1 more differences)"
    )
    assert "architectures" not in line
    assert_nothing_written(tmp_path)


def test_the_most_serious_difference_among_ingredients_leads(tmp_path, pair):
    a, b = pair
    c = save_ingredient(tmp_path / "c", tiny_bert_config(), seed=3)
    edit_config(b, model_type="roberta")
    state = load_file(c / "model.safetensors")
    del state["classifier.weight"]
    save_file(state, c / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleIngredientsError) as exc:
        check_compatible(indexed(a, b, c))
    assert str(exc.value) == (
        f"{c} differs from {a}: tensor names: missing 'classifier.weight'; also incompatible: {b}"
    )


@reliability(
    "Ingredient with NaN weights whose config.json also lacks `architectures`",
    "the config warning, then one line naming the tensor: '<ing>: tensor 'X' holds NaN or Inf "
    "values; ...' (NonFiniteWeightsError); nothing written",
)
def test_nonfinite_weights_are_not_hidden_by_a_config_difference(tmp_path, cli, pair):
    a, b = pair
    state = load_file(b / "model.safetensors")
    state["classifier.weight"][0, 0] = float("nan")
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    edit_config(b, drop=["architectures"])
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 2
    notice, error = proc.stderr.strip().splitlines()
    assert notice.startswith(f"hfsoup: {b} differs from {a}") and "architectures" in notice
    assert error == (
        f"hfsoup: error: {b}: tensor 'classifier.weight' holds NaN or Inf values; set "
        "allow_nonfinite to soup it anyway (--allow-nonfinite)"
    )
    assert_nothing_written(tmp_path)


# --- reporting does not change the indexes ---------------------------------------------------------


def _reordered_labels(folder):
    """The same classes, ids swapped: config and head rows both."""
    state = load_file(folder / "model.safetensors")
    for name in ("classifier.weight", "classifier.bias"):
        state[name] = state[name].flip(0).contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(
        folder, id2label={"0": "positive", "1": "negative"},
        label2id={"positive": 0, "negative": 1},
    )  # fmt: skip


def test_check_compatible_reports_label_alignment_without_changing_the_indexes(pair):
    _reordered_labels(pair[1])
    indexes = indexed(*pair)
    report = check_compatible(indexes)
    assert indexes[1].row_perm is None and indexes[1].head_tensors == frozenset()
    assert report.alignments[1].row_perm == [1, 0]
    assert report.alignments[1].head_tensors == {"classifier.weight", "classifier.bias"}

    aligned = align_ingredients(indexes)
    assert aligned[0] is indexes[0] and indexes[1].row_perm is None
    assert aligned[1].row_perm == [1, 0] and aligned[1].tensors == indexes[1].tensors


def test_reordered_labels_are_aligned_in_the_soup(tmp_path, cli, pair):
    a, b = pair
    before = load_state_dict(b)  # b in a's label order
    _reordered_labels(b)
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    state_a = load_state_dict(a)
    expected = {n: (state_a[n].double() + before[n].double()) / 2 for n in state_a}
    assert_close_to(load_state_dict(tmp_path / "soup"), expected)


# --- Float8 and unsigned integer dtypes ------------------------------------------------------------

FLOAT8 = {"f8_e4m3": torch.float8_e4m3fn, "f8_e5m2": torch.float8_e5m2}
UNSIGNED = {"u16": torch.uint16, "u32": torch.uint32, "u64": torch.uint64, "u8": torch.uint8}


def _with_new_dtypes(folder, seed: int):
    """A BERT checkpoint plus float8 weights and unsigned integer buffers, as a Hub repo holds."""
    gen = torch.Generator().manual_seed(seed)
    state = load_file(folder / "model.safetensors")
    for name, dtype in FLOAT8.items():
        state[f"extra.{name}"] = (torch.randn(6, 5, generator=gen) * 4).to(dtype)
    for name, dtype in UNSIGNED.items():
        state[f"extra.{name}"] = torch.randint(0, 250, (7,), generator=gen).to(dtype)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return state


def _header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {name: entry["dtype"] for name, entry in header.items()}


def _saved_dtypes(tensors: dict) -> dict:
    """The dtype strings safetensors itself writes for these tensors."""
    raw = save(tensors)
    (n,) = struct.unpack("<Q", raw[:8])
    return {k: v["dtype"] for k, v in json.loads(raw[8 : 8 + n]).items() if k != "__metadata__"}


@reliability(
    "Float8 (F8_E4M3, F8_E5M2) and unsigned integer (U16, U32, U64) tensors",
    "nothing: float8 tensors are averaged in float32 and written back as float8; unsigned "
    "integer buffers are taken from the first ingredient",
)
def test_float8_and_unsigned_tensors_round_trip_through_a_soup(tmp_path, cli, publish, pair):
    a, b = pair
    state_a, state_b = _with_new_dtypes(a, 1), _with_new_dtypes(b, 2)
    proc = cli("soup", publish(a)[0], publish(b)[0], "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr

    soup = load_file(tmp_path / "soup" / "model.safetensors")
    for name, dtype in FLOAT8.items():
        key = f"extra.{name}"
        expected = ((state_a[key].float() + state_b[key].float()) / 2).to(dtype)
        assert soup[key].dtype == dtype
        assert torch.equal(soup[key].view(torch.uint8), expected.view(torch.uint8)), key
    for name, dtype in UNSIGNED.items():
        key = f"extra.{name}"
        assert soup[key].dtype == dtype and torch.equal(soup[key], state_a[key]), key
    header = _header(tmp_path / "soup" / "model.safetensors")
    assert header == _saved_dtypes(soup)
    assert {header[f"extra.{n}"] for n in [*FLOAT8, *UNSIGNED]} == {
        "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "U8"
    }  # fmt: skip


def test_float8_tensors_take_the_dtype_asked_for(tmp_path, cli, pair):
    a, b = pair
    state_a, state_b = _with_new_dtypes(a, 1), _with_new_dtypes(b, 2)
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q", "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    key = "extra.f8_e4m3"
    expected = ((state_a[key].float() + state_b[key].float()) / 2).to(torch.float16)
    assert torch.equal(soup[key], expected)
    assert soup["extra.u32"].dtype == torch.uint32


def test_a_float8_ingredient_holding_nan_is_refused(tmp_path, pair):
    from hfsoup.compute.combine import normalise_weights, stream_average
    from hfsoup.io.tensors import plan_shards

    a, b = pair
    _with_new_dtypes(a, 1)
    state = _with_new_dtypes(b, 2)
    state["extra.f8_e4m3"][0, 0] = float("nan")
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    indexes = indexed(a, b)
    shards = plan_shards(indexes[0], max_shard_size=2**30)
    with pytest.raises(NonFiniteWeightsError, match="extra.f8_e4m3"):
        stream_average(indexes, normalise_weights(2, None), shards, on_shard=lambda i, t: None)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz])
def test_all_finite_reads_float8(dtype):
    values = torch.tensor([1.0, -2.0, 0.5]).to(dtype)
    assert all_finite(values)
    values[1] = float("nan")
    assert not all_finite(values)


def test_an_unsigned_tensor_in_place_of_a_float_one_is_refused(pair):
    a, b = pair
    state = load_file(b / "model.safetensors")
    state["classifier.bias"] = torch.zeros(2, dtype=torch.uint16)
    save_file(state, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleIngredientsError, match="'classifier.bias' has dtype U16"):
        check_compatible(indexed(a, b))
