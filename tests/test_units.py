"""One of each (issue 13): one size rule, one byte formatter, one dtype table, one '@' parser."""

from __future__ import annotations

import argparse

import pytest
import torch

from hfsoup import dtypes
from hfsoup.compute.placement import parse_max_memory
from hfsoup.errors import RecipeError
from hfsoup.ingredients import IngredientEntry, split_revision
from hfsoup.units import human_bytes, parse_size

SIZES = ["5Gb", "5gb", "5GB", "500MiB", "1.5GiB", "1TB", "2TiB", "1024", "512B", "3 MB", 1000]


@pytest.mark.parametrize("text", SIZES)
def test_max_memory_reads_sizes_as_every_other_size_option(text):
    # --max-memory used accelerate's parser, which read "5Gb" as gigabits and refused TB.
    assert parse_max_memory({"cpu": text}) == {"cpu": parse_size(text)}


def test_a_lowercase_b_is_bytes_not_bits():
    assert parse_size("5Gb") == parse_size("5gb") == 5 * 10**9
    assert parse_max_memory(["0=5Gb"]) == {0: 5 * 10**9}


def test_max_memory_keeps_its_own_messages():
    with pytest.raises(RecipeError, match=r"max_memory: 'lots' is not a size"):
        parse_max_memory(["0=lots"])
    with pytest.raises(RecipeError, match=r"max_memory: cpu=0GB must be positive"):
        parse_max_memory(["cpu=0GB"])


def test_human_bytes_decimal_by_default_binary_when_asked():
    assert human_bytes(1_234_567) == "1.2 MB" and human_bytes(999) == "999 B"
    assert human_bytes(17_600_000, binary=True) == "16.8 MiB"
    assert human_bytes(3 * 1024**3, binary=True) == "3.0 GiB"
    assert human_bytes(5 * 10**15) == "5000.0 TB"


def _choices(parser: argparse.ArgumentParser, command: str, flag: str) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    return list(action.choices)


def test_the_cli_offers_the_dtype_table():
    from hfsoup.cli import build_parser

    parser = build_parser()
    assert _choices(parser, "soup", "--dtype") == list(dtypes.OUTPUT_DTYPES)
    assert _choices(parser, "soup", "--score-dtype") == list(dtypes.SCORE_DTYPES)
    assert _choices(parser, "soup", "--accumulate") == list(dtypes.ACCUMULATE_DTYPES)


def test_the_recipe_dtype_is_the_table():
    from typing import get_args

    from hfsoup.recipe import DType

    assert list(get_args(DType)) == list(dtypes.OUTPUT_DTYPES)


def test_safetensors_codes_round_trip():
    assert all(dtypes.SAFETENSORS[dtypes.CODE_OF[d]] is d for d in dtypes.SAFETENSORS.values())
    assert dtypes.itemsize("BF16") == 2 and dtypes.itemsize("F8_E4M3") == 1
    assert "I64" not in dtypes.FLOAT_CODES and "BF16" in dtypes.FLOAT_CODES


def test_one_at_parser_for_recipes_and_the_command_line():
    assert split_revision("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert split_revision("org/name") == ("org/name", None)
    assert split_revision("org/name@") == ("org/name", "")
    entry = IngredientEntry.model_validate(IngredientEntry.from_item("org/name@v2"))
    assert (entry.repo, entry.revision, entry.text) == ("org/name", "v2", "org/name@v2")


def test_a_float64_running_sum_makes_the_soup(tmp_path):
    # --accumulate float64 was accepted, then looked up in the output dtype table (KeyError).
    from factories import load_state_dict, save_ingredient, tiny_bert_config

    import hfsoup

    folders = [
        str(save_ingredient(tmp_path / f"ft{i}", tiny_bert_config(), seed=i + 1)) for i in range(2)
    ]
    hfsoup.soup(folders, output=tmp_path / "soup", accumulate="float64", progress=False)
    soup = load_state_dict(tmp_path / "soup")
    a, b = (load_state_dict(f) for f in folders)
    name = next(n for n, t in a.items() if t.is_floating_point())
    expected = ((a[name].double() + b[name].double()) / 2).float()
    assert torch.equal(soup[name], expected)
