"""Library errors name options as the API spells them; the CLI adds the flags as a hint."""

from __future__ import annotations

import logging

import pytest

from hfsoup.cli import build_parser, flag_hint
from hfsoup.compute.placement import parse_max_memory
from hfsoup.errors import OutputExistsError, RecipeError


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize(
    ("command", "options", "hint"),
    [
        (["run"], ["allow_local"], " (--allow-local)"),
        (["soup"], ["max_memory", "device_map"], " (--max-memory, --device-map)"),
        (["soup"], ["output.dir", "learned.lr"], " (--output, --learned-lr)"),
        (["soup"], ["task.config", "metrics"], " (--dataset-config, --metric)"),
        (["hub", "serve"], ["token"], " (--token)"),
        (["demo"], ["overwrite"], ""),  # demo has no --overwrite: no hint
        (["soup"], ["no_such_option"], ""),
    ],
)
def test_hint_names_the_flags_the_command_has(parser, command, options, hint):
    err = RecipeError("the message", options=options)
    assert flag_hint(err, parser, command) == "the message" + hint


def test_library_message_names_no_flag():
    with pytest.raises(RecipeError) as err:
        parse_max_memory(["gpu0=1GB"])
    assert "--" not in str(err.value)
    assert err.value.options == ("max_memory",)


def test_cli_error_line_carries_the_hint(tmp_path, cli):
    from factories import save_ingredient, tiny_bert_config

    for seed, name in enumerate("ab"):
        save_ingredient(tmp_path / name, tiny_bert_config(), seed=seed)
    out = tmp_path / "soup"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("soup", tmp_path / "a", tmp_path / "b", "--output", out)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"hfsoup: error: output folder {out} exists and is not empty; set overwrite to replace "
        "it (--overwrite)\n"
    )


def test_a_notice_with_options_gets_the_hint(cli, monkeypatch, tmp_path):
    """A notice logged with ``extra={"options": [...]}`` is printed with the flags too."""
    import hfsoup.api

    def push(folder, repo_id, **kwargs):
        logging.getLogger("hfsoup").warning("left out x; add it with include",
                                            extra={"options": ["include"]})  # fmt: skip
        raise OutputExistsError("stop here")

    monkeypatch.setattr(hfsoup.api, "push", push)
    proc = cli("push", tmp_path, "org/soup")
    assert proc.stderr.splitlines() == [
        "hfsoup: left out x; add it with include (--include)",
        "hfsoup: error: stop here",
    ]
