"""Hostile ingredients decided from headers, indexes and config.json alone: empty ingredients,
indexes that disagree with their shards, malformed header entries, malformed indexes and JSON
files. Each ends in one line naming the ingredient, file and tensor(s), exit 2, nothing written,
and no weight byte read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from factories import save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
import hfsoup.io.streaming
from hfsoup.errors import CorruptWeightsError

reliability = pytest.mark.reliability


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if a weight byte is fetched: every case here is decided before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight byte was read before the ingredient was refused")

    monkeypatch.setattr(hfsoup.io.streaming, "read_fetch", refuse)


@pytest.fixture
def good(tmp_path):
    return save_ingredient(tmp_path / "good", tiny_bert_config(), seed=1)


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file written by hand: 8-byte length, header JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def hostile(tmp_path, files: dict[str, bytes | str], name: str = "bad"):
    """A folder with a valid tiny BERT config.json and the given (hostile) files."""
    folder = tmp_path / name
    folder.mkdir()
    tiny_bert_config().to_json_file(folder / "config.json")
    for file, content in files.items():
        path = folder / file
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return folder


def soup(cli, tmp_path, *ingredients, extra=()):
    return cli("soup", *ingredients, "--output", tmp_path / "soup", "-q", *extra)


def assert_refused(proc, tmp_path, *fragments):
    assert_one_line_error(proc, *fragments)
    assert_nothing_written(tmp_path)


# --- 1. Ingredients without a single tensor ------------------------------------------------

EMPTY = {
    "empty header {}": ({"model.safetensors": safetensors_bytes({})}, "holds no tensors"),
    "header with only __metadata__": (
        {"model.safetensors": safetensors_bytes({"__metadata__": {"format": "pt"}})},
        "holds no tensors",
    ),
    "index with an empty weight_map": (
        {
            "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": {}}),
            "model-00001-of-00001.safetensors": safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)
            ),
        },
        "weight_map is empty",
    ),
}


@reliability(
    "Ingredient with no tensors (empty safetensors header, only __metadata__, index with an "
    "empty weight_map)",
    "one line: '<ing>: model.safetensors: holds no tensors (an empty safetensors header)' / "
    "'<ing>: model.safetensors.index.json: weight_map is empty ...' (CorruptWeightsError); "
    "no empty soup, nothing written",
)
@pytest.mark.parametrize("case", sorted(EMPTY))
def test_an_ingredient_without_tensors_is_refused(tmp_path, cli, good, no_weight_reads, case):
    files, message = EMPTY[case]
    bad = hostile(tmp_path, files)
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, str(bad), message)
    with pytest.raises(CorruptWeightsError):
        hfsoup.inspect([bad])


def _pickled(value) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


EMPTY_PICKLES = {
    "a training checkpoint nesting the weights": (
        {"state_dict": {"w": torch.zeros(2)}, "epoch": 3},
        "holds no tensors, only 'state_dict' (dict), 'epoch' (int)",
    ),
    "an empty dict": ({}, "holds no tensors (an empty state dict)"),
    "a list of tensors": ([torch.zeros(2)], "holds a list, not a state dict"),
    "tensors mixed with other values": (
        {"w": torch.zeros(2), "step": 5},
        "1 entries that are not named tensors: 'step' (int)",
    ),
}


@reliability(
    "Pickle weights (with --allow-pickle) that hold no tensors or more than tensors (a "
    "training checkpoint, an empty dict, a list, a step count beside the weights)",
    "one line: '<ing>: pytorch_model.bin: holds no tensors, only 'state_dict' (dict), ...' "
    "(CorruptWeightsError), saying what was found; nothing written",
)
@pytest.mark.parametrize("case", sorted(EMPTY_PICKLES))
def test_a_pickle_without_a_state_dict_of_tensors_is_refused(tmp_path, cli, good, case):
    value, message = EMPTY_PICKLES[case]
    bad = hostile(tmp_path, {"pytorch_model.bin": _pickled(value)})
    proc = soup(cli, tmp_path, good, bad, extra=("--allow-pickle",))
    assert_refused(proc, tmp_path, f"{bad}: pytorch_model.bin", message)


# --- 2. Indexes that disagree with their shards; names given twice ------------------------


def sharded(tmp_path, good, edit, name: str = "bad"):
    """``good``'s tensors split over two shards with an index; ``edit(shards, weight_map)``
    may change either (shards: file -> {name: tensor}) before they are written."""
    state = load_file(good / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": {n: state[n] for n in names[:half]},
        "model-00002-of-00002.safetensors": {n: state[n] for n in names[half:]},
    }
    weight_map = {n: f for f, tensors in shards.items() for n in tensors}
    edit(shards, weight_map)
    folder = hostile(tmp_path, {}, name=name)
    for file, tensors in shards.items():
        save_file(tensors, folder / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


FIRST, SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _listed_but_absent(shards, weight_map):
    weight_map["ghost.weight"] = SECOND


def _not_listed(shards, weight_map):
    weight_map.pop(sorted(shards[SECOND])[0])


def _listed_for_another_shard(shards, weight_map):
    weight_map[sorted(shards[SECOND])[0]] = FIRST


def _in_two_shards(shards, weight_map):
    name = sorted(shards[SECOND])[0]
    shards[FIRST][name] = shards[SECOND][name].clone()


MISMATCHES = {
    "tensor listed by the index but in no shard": (
        _listed_but_absent,
        f"lists 1 tensor(s) that no shard holds: 'ghost.weight' (listed for {SECOND})",
    ),
    "tensor in a shard but not in the index": (_not_listed, "does not list: 'bert."),
    "tensor in a shard but listed for another": (
        _listed_for_another_shard,
        "1 tensor(s) not in the shard model.safetensors.index.json names: 'bert.",
    ),
    "one tensor in two shards": (_in_two_shards, "in more than one shard: 'bert."),
}


@reliability(
    "Weight index that disagrees with its shards (a tensor listed but absent, present but not "
    "listed or listed for another shard, one tensor in two shards)",
    "one line naming the ingredient, the tensors (first few and a count) and their files: "
    "'<ing>: model.safetensors.index.json lists 1 tensor(s) that no shard holds: 'X' (listed for "
    "SHARD)' ... (CorruptWeightsError), before any weight byte is read",
)
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_an_index_that_disagrees_with_its_shards_is_refused(
    tmp_path, cli, good, no_weight_reads, case
):
    edit, message = MISMATCHES[case]
    bad = sharded(tmp_path, good, edit)
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, str(bad), message)


def test_a_consistent_sharded_ingredient_is_read_whole(tmp_path, good):
    # The control for the cases above: the same split, unedited, is accepted tensor for tensor.
    folder = sharded(tmp_path, good, lambda shards, weight_map: None, name="fine")
    index = hfsoup.inspect([folder]).ingredients[0]
    expected = {n: tuple(t.shape) for n, t in load_file(good / "model.safetensors").items()}
    assert {n: ref.shape for n, ref in index.tensors.items()} == expected


ENTRY = b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
TWICE = {
    "a tensor named twice in one header": (
        {"model.safetensors": safetensors_bytes(b'{"w": %s, "w": %s}' % (ENTRY, ENTRY), bytes(8))},
        "model.safetensors: safetensors header names 'w' more than once",
    ),
    "a tensor named twice in the index": (
        {
            "model.safetensors.index.json": '{"weight_map": {"w": "a.safetensors", '
            '"w": "a.safetensors"}}',
            "a.safetensors": safetensors_bytes(b'{"w": %s}' % ENTRY, bytes(8)),
        },
        "model.safetensors.index.json: names 'w' more than once",
    ),
    "a field named twice in a header entry": (
        {
            "model.safetensors": safetensors_bytes(
                b'{"w": {"dtype": "F32", "shape": [2], "shape": [1], "data_offsets": [0, 8]}}',
                bytes(8),
            )
        },
        "tensor 'w': header entry names 'shape' twice",
    ),
}


@reliability(
    "A tensor (or a header field) named twice in one safetensors header or weight index "
    "(JSON parsers silently keep the last)",
    "one line: '<ing>: model.safetensors: safetensors header names 'X' more than once' "
    "(CorruptWeightsError)",
)
@pytest.mark.parametrize("case", sorted(TWICE))
def test_a_name_given_twice_is_refused(tmp_path, cli, good, no_weight_reads, case):
    files, message = TWICE[case]
    bad = hostile(tmp_path, files)
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, str(bad), message)


# --- 3. Malformed header entries -----------------------------------------------------------

W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "negative dimension": ({**W, "shape": [-2]}, "shape [-2] is not a list of non-negative"),
    "float dimension": ({**W, "shape": [2.0]}, "shape [2.0] is not a list"),
    "bool dimension": ({**W, "shape": [True]}, "shape [True] is not a list"),
    "string dimension": ({**W, "shape": ["2"]}, "shape ['2'] is not a list"),
    "null dimension": ({**W, "shape": [None]}, "shape [None] is not a list"),
    "shape not a list": ({**W, "shape": 2}, "shape 2 is not a list"),
    "dimension past 2**63": ({**W, "shape": [2**64]}, "is not a list of non-negative"),
    "byte size past 2**63": ({**W, "shape": [2**62]}, "larger than any tensor can be"),
    "strides past 2**63 beside a zero": (
        {**W, "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]},
        "larger than any tensor can be",
    ),
    "65 dimensions": ({**W, "shape": [1] * 65}, "65 dimensions"),
    "negative offset": ({**W, "data_offsets": [-8, 0]}, "data_offsets [-8, 0] is not a pair"),
    "float offset": ({**W, "data_offsets": [0, 8.0]}, "is not a pair of non-negative"),
    "bool offset": ({**W, "data_offsets": [False, 8]}, "is not a pair of non-negative"),
    "one offset": ({**W, "data_offsets": [8]}, "data_offsets [8] is not a pair"),
    "three offsets": ({**W, "data_offsets": [0, 8, 16]}, "is not a pair"),
    "offsets not a list": ({**W, "data_offsets": "0-8"}, "is not a pair"),
    "offset past 2**63": ({**W, "data_offsets": [0, 2**64]}, "is not a pair"),
    "reversed offsets": ({**W, "data_offsets": [8, 0]}, "has a bad byte range"),
    "dtype not a string": ({**W, "dtype": ["F32"]}, "dtype ['F32'] is not a string"),
    "dtype null": ({**W, "dtype": None}, "dtype None is not a string"),
    "unknown dtype": ({**W, "dtype": "F8_E9M9"}, "unsupported dtype 'F8_E9M9'"),
    "entry not an object": ([0, 8], "header entry is not a JSON object"),
    "entry without data_offsets": ({"dtype": "F32", "shape": [2]}, "has no data_offsets"),
}


@reliability(
    "safetensors header entry with negative, non-integer (float, bool, string, null) or "
    "overflowing shapes or offsets, a dtype that is not a string, an entry that is not an object",
    "one line naming the ingredient, file, tensor and field: '... tensor 'w': shape [-2] is not "
    "a list of non-negative integers' (CorruptWeightsError), never a traceback",
)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_header_entry_is_refused(tmp_path, cli, good, no_weight_reads, case):
    entry, message = MALFORMED[case]
    bad = hostile(tmp_path, {"model.safetensors": safetensors_bytes({"w": entry}, bytes(8))})
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, f"{bad}: model.safetensors: tensor 'w'", message)


MALFORMED_HEADERS = {
    "__metadata__ not an object": ({"__metadata__": "pt", "w": W}, "__metadata__ must be"),
    "__metadata__ with a number": ({"__metadata__": {"n": 1}, "w": W}, "__metadata__ must be"),
    "header a list": (b"[1, 2]", "safetensors header is not a JSON object"),
    "header not UTF-8": (b'{"\xff": 1}', "safetensors header is not UTF-8"),
    "header nested absurdly deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "header not JSON": (b"{not json", "safetensors header is not valid JSON"),
    "header longer than any accepted": (b"{}", "more than the 100 MiB hfsoup accepts"),
}


@reliability(
    "safetensors header that is not a UTF-8 JSON object, is nested absurdly deep, claims more "
    "than 100 MiB, or whose __metadata__ is not an object of strings",
    "one line: '<ing>: model.safetensors: safetensors header is not UTF-8 text' / '... "
    "__metadata__ must be a JSON object of strings ...' (CorruptWeightsError)",
)
@pytest.mark.parametrize("case", sorted(MALFORMED_HEADERS))
def test_a_malformed_header_is_refused(tmp_path, cli, good, no_weight_reads, case):
    header, message = MALFORMED_HEADERS[case]
    raw = safetensors_bytes(header, bytes(8))
    if case == "header longer than any accepted":
        # The file really is that long (sparse), so only the cap can refuse it.
        raw = struct.pack("<Q", 200 * 2**20) + raw[8:]
    bad = hostile(tmp_path, {"model.safetensors": raw})
    if case == "header longer than any accepted":
        with open(bad / "model.safetensors", "r+b") as f:
            f.truncate(8 + 200 * 2**20 + 8)
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, f"{bad}: model.safetensors", message)


@reliability(
    "Malformed safetensors header on the Hub (read by range requests)",
    "the same one line as for a local folder, naming the repo, file and tensor "
    "(CorruptWeightsError); nothing written",
)
def test_a_malformed_header_on_the_hub_is_refused(hub, tmp_path, publish, cli, good):
    entry = {**W, "shape": [2**62]}
    folder = hostile(tmp_path, {"model.safetensors": safetensors_bytes({"w": entry}, bytes(8))})
    repo = publish(folder)[0]
    proc = soup(cli, tmp_path, publish(good)[0], repo)
    assert_refused(proc, tmp_path, f"{repo}: model.safetensors: tensor 'w'", "larger than any")


@reliability(
    "Weight index on the Hub that disagrees with its shards",
    "one line naming the repo, the index and the tensor (CorruptWeightsError), from the "
    "headers alone",
)
def test_an_index_that_disagrees_on_the_hub_is_refused(hub, tmp_path, publish, cli, good):
    repo = publish(sharded(tmp_path, good, _listed_but_absent))[0]
    proc = soup(cli, tmp_path, publish(good)[0], repo)
    assert_refused(proc, tmp_path, f"{repo}: model.safetensors.index.json lists", "ghost.weight")


# --- 4. Malformed weight indexes -------------------------------------------------------------

SHARD = safetensors_bytes({"w": W}, bytes(8))
INDEXES = {
    "weight_map a list": ({"weight_map": ["w"]}, "weight_map is not a JSON object"),
    "weight_map a string": ({"weight_map": "a.safetensors"}, "weight_map is not a JSON object"),
    "weight_map value a number": ({"weight_map": {"w": 1}}, "'w' map to 1"),
    "weight_map value null": ({"weight_map": {"w": None}}, "'w' map to None"),
    "weight_map value a list": ({"weight_map": {"w": ["a.safetensors"]}}, "'w' map to ['a"),
    "no weight_map": ({"metadata": {}}, "index has no weight_map"),
    "index a list": (["a.safetensors"], "a JSON object was expected"),
}


@reliability(
    "Weight index whose weight_map is missing, not an object, or maps names to non-strings",
    "one line: '<ing>: model.safetensors.index.json: weight_map must map tensor names to file "
    "names, but 'w' map to 1' (CorruptWeightsError)",
)
@pytest.mark.parametrize("case", sorted(INDEXES))
def test_a_malformed_weight_index_is_refused(tmp_path, cli, good, no_weight_reads, case):
    index, message = INDEXES[case]
    files = {"model.safetensors.index.json": json.dumps(index), "a.safetensors": SHARD}
    bad = hostile(tmp_path, files)
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, str(bad), "model.safetensors.index.json", message)


@reliability(
    "Pickle index (pytorch_model.bin.index.json) without weight_map",
    "one line: '<ing>: pytorch_model.bin.index.json: index has no weight_map' "
    "(CorruptWeightsError)",
)
def test_a_pickle_index_without_weight_map_is_refused(tmp_path, cli, good):
    files = {
        "pytorch_model.bin.index.json": json.dumps({"metadata": {}}),
        "pytorch_model-00001-of-00001.bin": _pickled({"w": torch.zeros(2)}),
    }
    bad = hostile(tmp_path, files)
    proc = soup(cli, tmp_path, good, bad, extra=("--allow-pickle",))
    assert_refused(proc, tmp_path, f"{bad}: pytorch_model.bin.index.json: index has no weight_map")


# --- 5. JSON files that are not UTF-8 JSON objects of a sane size and depth ---------------


def _too_large(folder):
    with open(folder / "config.json", "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: its size alone refuses it


def _write(content: bytes):
    return lambda folder: (folder / "config.json").write_bytes(content)


CONFIGS = {
    "not UTF-8": (_write(b'{"model_type": "\xff\xfe"}'), "not UTF-8 text"),
    "nested past the recursion limit": (_write(b"[" * 100_000 + b"]" * 100_000), "nested more"),
    "nested 500 levels (parses, too deep to use)": (
        _write(b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}"),
        "nested more than 100 levels deep",
    ),
    "a list": (_write(b"[1, 2]"), "a JSON object was expected"),
    "larger than 64 MiB": (_too_large, "more than the 64 MiB hfsoup reads for a JSON file"),
}


@reliability(
    "config.json that is not UTF-8, nested absurdly deep, not an object, or over 64 MiB",
    "one line: '<ing>/config.json: not UTF-8 text (invalid byte at offset N)' / '... JSON nested "
    "more than 100 levels deep' / '... more than the 64 MiB ...' (CorruptWeightsError)",
)
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_config_that_is_not_a_sane_json_object_is_refused(
    tmp_path, cli, good, no_weight_reads, case
):
    edit, message = CONFIGS[case]
    bad = hostile(tmp_path, {"model.safetensors": SHARD})
    edit(bad)
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, f"{bad}/config.json", message)


@reliability(
    "config.json on the Hub nested absurdly deep",
    "one line: '<repo>/config.json: JSON nested more than 100 levels deep' (CorruptWeightsError)",
)
def test_a_deep_config_on_the_hub_is_refused(hub, tmp_path, publish, cli, good):
    bad = hostile(tmp_path, {"model.safetensors": SHARD})
    (bad / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    repo = publish(bad)[0]
    proc = soup(cli, tmp_path, publish(good)[0], repo)
    assert_refused(proc, tmp_path, f"{repo}/config.json", "nested more than 100 levels deep")


FIELDS = {
    "architectures a list of objects": ({"architectures": [{"a": 1}]}, "architectures must be"),
    "architectures a string": ({"architectures": "BertModel"}, "architectures must be a list"),
    "model_type a number": ({"model_type": 5}, "model_type must be a string, got 5"),
    "id2label a list": ({"id2label": ["negative", "positive"]}, "id2label must be an object"),
    "id2label with object labels": ({"id2label": {"0": {}, "1": "x"}}, "id2label must be"),
    "id2label with a non-integer id": ({"id2label": {"0": "a", "x": "b"}}, "id2label must be"),
    "label2id a list": ({"label2id": [0, 1]}, "label2id must be an object"),
}


@reliability(
    "config.json whose model_type, architectures, id2label or label2id has the wrong type (in "
    "every ingredient alike, so no comparison catches it)",
    "one line: '<ing>/config.json: architectures must be a list of strings, got ...' "
    "(CorruptWeightsError); nothing written",
)
@pytest.mark.parametrize("case", sorted(FIELDS))
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, cli, no_weight_reads, case):
    patch, message = FIELDS[case]
    folders = []
    for seed in (1, 2):
        folder = save_ingredient(tmp_path / f"ing{seed}", tiny_bert_config(), seed=seed)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **patch}))
        folders.append(folder)
    proc = soup(cli, tmp_path, *folders)
    assert_refused(proc, tmp_path, "/config.json: ", message)


@reliability(
    "Empty (0-byte) or 5-byte model.safetensors, locally and on the Hub",
    "one line: '<ing>: model.safetensors: truncated safetensors header (0 bytes)' "
    "(CorruptWeightsError); nothing written",
)
@pytest.mark.parametrize("size", [0, 5])
def test_a_weight_file_shorter_than_its_length_field_is_refused(
    hub, tmp_path, publish, cli, good, no_weight_reads, size
):
    bad = hostile(tmp_path, {"model.safetensors": bytes(size)})
    message = f"model.safetensors: truncated safetensors header ({size} bytes)"
    proc = soup(cli, tmp_path, good, bad)
    assert_refused(proc, tmp_path, f"{bad}: {message}")
    repo = publish(bad)[0]
    proc = soup(cli, tmp_path, good, repo)
    assert_refused(proc, tmp_path, f"{repo}: {message}")


@reliability(
    "Pickle index (with --allow-pickle) that lists a tensor its shard does not hold",
    "one line: '<ing>: pytorch_model.bin.index.json lists 1 tensor(s) that no shard holds: "
    "'X' (listed for SHARD)' (CorruptWeightsError)",
)
def test_a_pickle_index_that_disagrees_with_its_shard_is_refused(tmp_path, cli, good):
    shard = "pytorch_model-00001-of-00001.bin"
    files = {
        "pytorch_model.bin.index.json": json.dumps({"weight_map": {"w": shard, "ghost": shard}}),
        shard: _pickled({"w": torch.zeros(2)}),
    }
    bad = hostile(tmp_path, files)
    proc = soup(cli, tmp_path, good, bad, extra=("--allow-pickle",))
    assert_refused(
        proc, tmp_path, f"{bad}: pytorch_model.bin.index.json lists 1 tensor(s) that no shard "
        f"holds: 'ghost' (listed for {shard})",
    )  # fmt: skip
