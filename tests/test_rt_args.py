"""Hostile command lines, local folders and output targets: links planted under hfsoup's working
names or given as the output, names the file system cannot hold, usage mistakes, option values
that overflow or do nothing, pipes where a file is expected, a push folder whose index nests
absurdly deep, and the local output folder in a soup's card."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from factories import load_state_dict, save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error
from test_hostile_local import assert_same_tensors, plain_average

import hfsoup
from hfsoup.cli import main
from hfsoup.errors import RecipeError

reliability = pytest.mark.reliability


@pytest.fixture
def pair(tmp_path):
    """Two tiny local ingredients of one init."""
    config = tiny_bert_config()
    return [save_ingredient(tmp_path / f"ing{i}", config, seed=i + 1) for i in range(2)]


def soup_args(pair, output, *extra):
    return ("soup", *map(str, pair), "--output", str(output), "-q", *extra)


def usage(capfd, *args):
    """Run the CLI in this process when argparse itself may refuse the command line."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


# --- 1. hfsoup's working names beside the output are never followed --------------------------


@reliability(
    "A symlink planted under the output's lock name (.NAME.hfsoup-lock -> a file elsewhere)",
    "nothing: the link is removed and the lock made in its place; the file it pointed to is "
    "neither truncated nor written; the soup is made",
)
def test_a_lock_name_that_is_a_symlink_is_not_written_through(tmp_path, cli, pair):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".soup.hfsoup-lock").symlink_to(victim)

    proc = cli(*soup_args(pair, tmp_path / "soup"))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious"
    assert_same_tensors(load_state_dict(tmp_path / "soup"), plain_average(*pair))
    assert not os.path.lexists(tmp_path / ".soup.hfsoup-lock")


@reliability(
    "A symlink (to a folder elsewhere) left under the output's partial or old name "
    "(.NAME.hfsoup-partial, .NAME.hfsoup-old), with or without --overwrite",
    "nothing: the link itself is removed, never followed: the folder it points to keeps its "
    "files; the soup is made (it was a traceback)",
)
@pytest.mark.parametrize("suffix", ["partial", "old"])
def test_working_names_that_are_symlinks_are_removed_not_followed(tmp_path, cli, pair, suffix):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / f".soup.hfsoup-{suffix}").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "old.txt").write_text("old soup")

    proc = cli(*soup_args(pair, tmp_path / "soup", "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup.hfsoup")]


# --- 2. the output itself ---------------------------------------------------------------------


@reliability(
    "--output that is a symlink (to a folder elsewhere, or dangling), with or without --overwrite",
    "one line: 'output DIR is a symlink (to X); hfsoup writes no soup through a link and replaces "
    "no folder it points to: give the folder itself, X (--output)' (OutputExistsError); the "
    "folder it points to is untouched (--overwrite replaced it before)",
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_a_symlink_is_refused(tmp_path, cli, pair, overwrite):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / "soup").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    extra = ("--overwrite",) if overwrite else ()

    for link in ("soup", "dangling"):
        proc = cli(*soup_args(pair, tmp_path / link, *extra))
        assert_one_line_error(proc, f"output {tmp_path / link} is a symlink", "--output")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "nowhere").exists()
    assert not [p for p in tmp_path.iterdir() if ".hfsoup-" in p.name]


@reliability(
    "--output named like hfsoup's own working folders (.NAME.hfsoup-partial, -lock, -old)",
    "one line: 'output folder DIR is named like hfsoup's working folders ..., which another run "
    "removes; choose another name' (OutputExistsError); nothing written",
)
@pytest.mark.parametrize("suffix", ["partial", "lock", "old"])
def test_an_output_named_like_a_working_folder_is_refused(tmp_path, cli, pair, suffix):
    name = f".soup.hfsoup-{suffix}"
    proc = cli(*soup_args(pair, tmp_path / name))
    assert_one_line_error(proc, "is named like hfsoup's working folders")
    assert_nothing_written(tmp_path, name)


@reliability(
    "--output whose name the file system cannot hold (over 255 bytes; over 239, leaving no room "
    "for .NAME.hfsoup-partial) or holding a NUL byte (Python API / in-process)",
    "one line: 'output folder name 'xxx...'... is 300 bytes long; at most 239 ...' / '... holds a "
    "NUL byte' (OutputExistsError), before anything is read (it was a traceback)",
)
@pytest.mark.parametrize("name", ["x" * 300, "y" * 240, "bad\0name"])
def test_an_output_name_the_file_system_cannot_hold_is_one_line(tmp_path, cli, pair, name):
    proc = cli(*soup_args(pair, f"{tmp_path}/{name}"))
    assert_one_line_error(proc, "NUL byte" if "\0" in name else "at most 239")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ing0", "ing1"]


def test_the_longest_allowed_output_name_is_written(tmp_path, cli, pair):
    proc = cli(*soup_args(pair, tmp_path / ("z" * 239)))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / ("z" * 239) / "model.safetensors").is_file()


# --- 3. the command line itself ---------------------------------------------------------------


@reliability(
    "A command line argparse refuses (a weight that is not a number, an unknown --dtype or "
    "command, a missing ingredient or --output)",
    "one line: 'hfsoup: error: argument --weights: invalid float value: 'abc' (see hfsoup soup "
    "--help)', exit 2 (it was the whole usage text and a second line)",
)
@pytest.mark.parametrize(
    "args, fragment",
    [
        (("soup", "a/b", "-o", "x", "--weights", "abc"), "invalid float value: 'abc'"),
        (("soup", "a/b", "-o", "x", "--dtype", "int8"), "invalid choice: 'int8'"),
        (("inspect",), "required: INGREDIENT"),
        (("soup", "a/b"), "required: --output"),
        (("bake",), "invalid choice: 'bake'"),
    ],
)
def test_a_usage_error_is_one_line(capfd, args, fragment):
    proc = usage(capfd, *args)
    assert_one_line_error(proc, fragment, "--help)")


@reliability(
    "--max-memory with a size too large for a number (cpu=1e400GB)",
    "one line: 'max_memory: cannot read ['cpu=1e400GB'] as sizes (...) (--max-memory)' (RecipeError), before "
    "anything is read (it was a traceback)",
)
def test_a_max_memory_that_overflows_is_one_line(tmp_path, cli, pair):
    proc = cli(*soup_args(pair, tmp_path / "soup", "--device-map", "auto",
                          "--max-memory", "cpu=1e400GB"))  # fmt: skip
    assert_one_line_error(proc, "--max-memory", "1e400GB")
    assert_nothing_written(tmp_path)


@reliability(
    "--memory-budget on a soup that is not learned (where it did nothing), or not a size",
    "one line: 'memory_budget applies to method 'learned', not 'uniform' (--memory-budget)' "
    "(RecipeError); nothing written",
)
def test_a_memory_budget_that_would_do_nothing_is_refused(tmp_path, cli, pair):
    proc = cli(*soup_args(pair, tmp_path / "soup", "--memory-budget", "8GB"))
    assert_one_line_error(proc, "applies to method 'learned', not 'uniform'")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "lots"])
def test_max_in_flight_must_be_a_positive_byte_count(tmp_path, pair, value):
    with pytest.raises(RecipeError, match="max_in_flight must be a positive number of bytes"):
        hfsoup.soup(pair, output=tmp_path / "soup", progress=False, max_in_flight=value)
    assert_nothing_written(tmp_path)


# --- 4. pipes and devices where a file is expected ----------------------------------------------


@reliability(
    "`hfsoup run` on a recipe that is a named pipe nothing writes to",
    "one line at once: 'recipe R is a named pipe, not a file; hfsoup reads recipes from files' "
    "(RecipeError) (it waited forever)",
)
def test_a_recipe_that_is_a_named_pipe_fails_at_once(tmp_path, cli):
    os.mkfifo(tmp_path / "recipe.yaml")
    proc = cli("run", tmp_path / "recipe.yaml", "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "is a named pipe, not a file")
    assert_nothing_written(tmp_path)


@reliability(
    "--task FILE.yaml that is a named pipe, a folder, /dev/zero (endless) or over 1 MiB",
    "one line: 'cannot read task file F: it is a named pipe or socket, not a file' / 'task file F "
    "is larger than 1 MiB, the most hfsoup reads' (RecipeError), at once (it waited forever or "
    "read without end)",
)
@pytest.mark.parametrize("kind", ["fifo", "folder", "dev-zero"])
def test_a_task_file_that_is_not_a_small_file_fails_at_once(tmp_path, cli, pair, kind):
    task = tmp_path / "task.yaml"
    if kind == "fifo":
        os.mkfifo(task)
    elif kind == "folder":
        task.mkdir()
    else:
        task.symlink_to("/dev/zero")
    proc = cli("evaluate", *map(str, pair), "--task", task, "-q")
    assert_one_line_error(proc, "larger than 1 MiB" if kind == "dev-zero" else "not a file")


# --- 5. push folders ----------------------------------------------------------------------------


@reliability(
    "push DIR whose model.safetensors.index.json nests 100,000 levels deep, or is over 8 MiB",
    "one line: 'DIR/model.safetensors.index.json is not a readable weight index (JSON nested too "
    "deep)' (PushError); nothing uploaded (it was a traceback)",
)
@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, " " * (9 << 20) + "{}"])
def test_a_push_folder_with_an_absurd_index_is_one_line(tmp_path, cli, pair, repo_id, content):
    soup = tmp_path / "soup"
    assert cli(*soup_args(pair, soup, "--max-shard-size", "10KB")).returncode == 0
    (soup / "model.safetensors.index.json").write_text(content)
    proc = cli("push", soup, repo_id("deep-index"))
    assert_one_line_error(proc, "model.safetensors.index.json")


# --- 6. the card names no local output folder --------------------------------------------------


@reliability(
    "A soup's card and hfsoup_recipe.yaml, locally and as pushed to the Hub",
    "neither names the local output folder (output.dir is not recorded: a recipe from a soup "
    "never chooses its output); push_to and the rest of the recipe are kept",
)
def test_the_pushed_card_names_no_local_output_folder(tmp_path, cli, publish, repo_id, api):
    config = tiny_bert_config()
    repos = [publish(save_ingredient(tmp_path / f"ing{i}", config, seed=i + 1))[0] for i in (0, 1)]
    out = tmp_path / "private-place" / "soup"
    target = repo_id("pushed-soup")
    proc = cli("soup", *repos, "--output", out, "--push-to", target, "-q")
    assert proc.returncode == 0, proc.stderr

    for name in ("README.md", "hfsoup_recipe.yaml"):
        local = (out / name).read_text(encoding="utf-8")
        remote = Path(api.hf_hub_download(target, name)).read_text(encoding="utf-8")
        assert local == remote
        assert str(tmp_path) not in remote
    recipe = yaml.safe_load((out / "hfsoup_recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["output"] == {"push_to": target}
    assert str(tmp_path) not in (out / "results.json").read_text(encoding="utf-8")
