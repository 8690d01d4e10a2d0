"""Recipes nobody here wrote: a soup's card (or hfsoup_recipe.yaml) never pushes, never chooses
the output and reads nothing local unasked; recipes of any size or shape fail fast in one line."""

from __future__ import annotations

import logging
import time

import pytest
import yaml
from conftest import run_cli
from factories import load_state_dict, save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
from hfsoup.errors import RecipeError
from hfsoup.recipe import MAX_RECIPE_BYTES, load_recipe

reliability = pytest.mark.reliability
SHA = "0123456789abcdef0123456789abcdef01234567"


def _card(folder, recipe: dict | str) -> str:
    """A README.md holding ``recipe`` in its hfsoup-recipe block, as a soup's card does."""
    body = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    path.write_text(f"---\ntags: [hfsoup]\n---\n# A soup\n\n```yaml hfsoup-recipe\n{body}```\n")
    return path


def _pushed_soup(tmp_path, repos, target, **kw):
    hfsoup.soup(repos, output=tmp_path / "soup", push_to=target, progress=False, **kw)
    return tmp_path / "soup"


def _commits(api, repo) -> int:
    return len(api.list_repo_commits(repo))


@reliability(
    "Rebuilding from a soup's card (README.md or hfsoup_recipe.yaml) whose recipe names a push_to",
    "the soup is rebuilt in --output; nothing is pushed (a notice says 'pushes nowhere (the "
    "card's push_to R is not used; --push-to to push)')",
)
@pytest.mark.parametrize("name", ["README.md", "hfsoup_recipe.yaml"])
def test_card_recipe_never_pushes_by_itself(bert_soup_ingredients, tmp_path, api, repo_id, cli,
                                            name):  # fmt: skip
    repos, _ = bert_soup_ingredients
    target = repo_id("soup")
    soup = _pushed_soup(tmp_path, repos, target)
    assert "push_to" in (soup / "hfsoup_recipe.yaml").read_text()  # the card does name it
    before = _commits(api, target)
    proc = cli("run", soup / name, "--output", tmp_path / "again", "-q")
    assert proc.returncode == 0, proc.stderr
    assert _commits(api, target) == before
    a, b = load_state_dict(soup), load_state_dict(tmp_path / "again")
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


@reliability(
    "Rebuilding from a card with --push-to given now",
    "pushed to that repo only, public unless --private is given now (the card's private: true "
    "does not apply)",
)
def test_card_recipe_pushes_only_where_asked_now(
    bert_soup_ingredients, tmp_path, api, repo_id, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the test Hub lets any token create private repos
    repos, _ = bert_soup_ingredients
    first, second = repo_id("soup"), repo_id("again")
    soup = _pushed_soup(tmp_path, repos, first, private=True)
    before = _commits(api, first)
    result = hfsoup.run(soup / "README.md", output=tmp_path / "again", push_to=second,
                        progress=False)  # fmt: skip
    assert result.url and second in result.url
    assert _commits(api, first) == before
    assert api.model_info(first, token="hf_test").private is True
    assert api.model_info(second, token="hf_test").private is False


@reliability(
    "Rebuilding from a card without --output (its recipe names the old output folder)",
    "one line: 'the recipe from SOUP/README.md does not choose where to write: give the output "
    "folder (--output DIR)' (RecipeError); the old soup is untouched, even with --overwrite",
)
def test_card_recipe_never_chooses_the_output(tmp_path, cli):
    soup = tmp_path / "soup"
    card = _card(soup, {"ingredients": [f"org/a@{SHA}"], "output": {"dir": str(soup)}})
    proc = cli("run", card, "--overwrite", "-q")
    assert_one_line_error(proc, f"the recipe from {card} does not choose where to write",
                          "--output")  # fmt: skip
    assert sorted(p.name for p in soup.iterdir()) == ["README.md"]


def test_python_api_applies_the_card_rule_to_a_loaded_recipe(tmp_path):
    recipe = load_recipe(_card(tmp_path / "soup", {"ingredients": [f"org/a@{SHA}"],
                                                    "output": {"dir": "x", "push_to": "evil/x"}}))  # fmt: skip
    assert (recipe.output.dir, recipe.output.push_to) == (None, None)
    assert recipe.soup_output.push_to == "evil/x"
    with pytest.raises(RecipeError, match="does not choose where to write"):
        hfsoup.run(recipe.model_copy(update={"seed": 1}), progress=False)


@reliability(
    "A card's recipe naming local folders as ingredients",
    "one line: 'the recipe from SOUP/README.md names the local folder 'DIR' as an ingredient; "
    "... unless allow_local is set (--allow-local)' (RecipeError), before anything is read; with "
    "--allow-local the soup is rebuilt",
)
def test_card_recipe_local_ingredient_needs_allow_local(tmp_path, cli):
    dirs = [save_ingredient(tmp_path / f"l{i}", tiny_bert_config(), seed=i) for i in range(2)]
    hfsoup.soup(dirs, output=tmp_path / "soup", progress=False)
    card = tmp_path / "soup" / "README.md"
    proc = cli("run", card, "--output", tmp_path / "again", "-q")
    assert_one_line_error(proc, "names the local folder", str(dirs[0]), "--allow-local")
    assert_nothing_written(tmp_path, "again")
    proc = cli("run", card, "--output", tmp_path / "again", "--allow-local", "-q")
    assert proc.returncode == 0, proc.stderr
    a, b = load_state_dict(tmp_path / "soup"), load_state_dict(tmp_path / "again")
    assert all(torch_equal(a[k], b[k]) for k in a)


PATH_INGREDIENTS = ["/etc", "./models/ft", "../ft", "~/ft", "org/ft/../../x"]


@reliability(
    "A card's recipe naming an ingredient written as a path (/abs, ./x, ../x, ~/x), existing or not",
    "one line naming it and --allow-local (RecipeError), before any read",
)
@pytest.mark.parametrize("ingredient", PATH_INGREDIENTS)
def test_card_recipe_path_ingredient_is_refused(tmp_path, cli, ingredient):
    card = _card(tmp_path / "soup", {"ingredients": [f"org/a@{SHA}", ingredient]})
    proc = cli("run", card, "--output", tmp_path / "again", "-q")
    # A relative path in a soup's recipe is relative to the soup's folder (how soups name their
    # local ingredients), so the message names where it points.
    named = str((card.parent / ingredient).resolve()) if ingredient.startswith(".") else ingredient
    assert_one_line_error(proc, f"names the local folder {named!r}", "--allow-local")
    assert_nothing_written(tmp_path, "again")


def _task(**dataset_or_keys):
    base = {"dataset": "org/data", "selection_split": "validation", "report_splits": ["test"]}
    return {**base, **dataset_or_keys}


LOCAL_TASKS = {
    "local dataset folder": (_task(dataset="/srv/data"), "the local dataset '/srv/data'"),
    "relative dataset folder": (_task(dataset="./data"), "the local dataset './data'"),
    "local data files": (
        _task(dataset={"path": "csv", "data_files": {"validation": "/etc/passwd"}}),
        "the local data file '/etc/passwd' (task.dataset.data_files)",
    ),
    "relative data files of a builder": (
        _task(dataset={"path": "parquet", "data_files": ["v.parquet"]}),
        "the local data file 'v.parquet'",
    ),
    "data files climbing out of a Hub dataset": (
        _task(dataset={"path": "org/data", "data_files": "../../x.csv"}),
        "the local data file '../../x.csv'",
    ),
    "file:// data files": (
        _task(dataset={"path": "org/data", "data_files": "file:///etc/passwd"}),
        "'file:///etc/passwd'",
    ),
    "local data dir": (
        _task(dataset={"path": "imagefolder", "data_dir": "/home"}),
        "the local data file '/home' (task.dataset.data_dir)",
    ),
    "dataset cache_dir (a write)": (
        _task(dataset={"path": "org/data", "cache_dir": "/tmp/elsewhere"}),
        "the dataset option task.dataset.cache_dir",
    ),
    "dataset storage_options": (
        _task(dataset={"path": "org/data", "storage_options": {"anon": False}}),
        "the dataset option task.dataset.storage_options",
    ),
    "local metric script": (
        _task(metrics=["./metric.py"]),
        "the local metric script './metric.py'",
    ),
}


@reliability(
    "A card's recipe whose task reads local data (dataset folder, data_files, data_dir), sets "
    "dataset options (cache_dir, storage_options) or names a local metric script",
    "one line naming it and --allow-local (RecipeError), before any read",
)
@pytest.mark.parametrize("case", sorted(LOCAL_TASKS))
def test_card_recipe_local_task_data_needs_allow_local(tmp_path, cli, case):
    task, fragment = LOCAL_TASKS[case]
    recipe = {"method": "greedy", "ingredients": [f"org/a@{SHA}", f"org/b@{SHA}"], "task": task}
    card = _card(tmp_path / "soup", recipe)
    proc = cli("run", card, "--output", tmp_path / "again", "-q")
    assert_one_line_error(proc, fragment, "--allow-local")
    assert_nothing_written(tmp_path, "again")


def test_card_recipe_hub_dataset_files_are_not_local(tmp_path):
    from hfsoup.untrusted import local_reads

    task = _task(dataset={"path": "org/data", "data_files": {"validation": "v/*.parquet",
                                                             "test": "hf://datasets/o/d/t.csv"}})  # fmt: skip
    recipe = load_recipe(_card(tmp_path / "soup", {"method": "greedy", "task": task,
                                                    "ingredients": [f"org/a@{SHA}"]}))  # fmt: skip
    assert local_reads(recipe) == []


@reliability(
    "A card's recipe naming a community metric (code from a Space)",
    "one line: '... names the community metric 'org/m', which runs code from that Space; copy the "
    "recipe into a file of your own to use it' (RecipeError)",
)
def test_card_recipe_community_metric_is_refused(tmp_path, cli):
    recipe = {"method": "greedy", "ingredients": [f"org/a@{SHA}"],
              "task": _task(metrics=["evil/metric"])}  # fmt: skip
    proc = cli("run", _card(tmp_path / "soup", recipe), "--output", tmp_path / "x", "--allow-local")
    assert_one_line_error(proc, "community metric 'evil/metric'")


@reliability(
    "Rebuilding from a card: what it will do",
    "two notice lines on stderr before anything is read: 'hfsoup: recipe from SOUP/README.md: reads "
    "org/a@SHA, ...' and '... writes DIR; pushes nowhere (...)'",
)
def test_card_recipe_plan_is_printed_before_reading(bert_soup_ingredients, tmp_path, hub):
    repos, _ = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    pinned = yaml.safe_load((tmp_path / "soup" / "hfsoup_recipe.yaml").read_text())
    names = [f"{e['repo']}@{e['revision']}" for e in pinned["ingredients"]]
    card = tmp_path / "soup" / "README.md"
    # An unreachable Hub: the plan must come before the first read.
    proc = run_cli("run", str(card), "--output", str(tmp_path / "new"), "-q", "--json",
                   env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"hfsoup: recipe from {card}: reads {', '.join(names)}"
    assert lines[1] == (
        f"hfsoup: recipe from {card}: writes {tmp_path / 'new'}; pushes nowhere (--push-to to push)"
    )
    assert lines[2].startswith("hfsoup: error: ")


def test_user_recipe_still_pushes_where_it_says(bert_soup_ingredients, tmp_path, api, repo_id,
                                               caplog):  # fmt: skip
    repos, _ = bert_soup_ingredients
    target = repo_id("mine")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": repos,
                                      "output": {"dir": str(tmp_path / "out"), "push_to": target}}))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hfsoup"):
        result = hfsoup.run(recipe, progress=False)
    assert result.url and api.file_exists(target, "model.safetensors")
    assert "recipe from" not in caplog.text


@reliability(
    "A recipe file larger than 1 MiB (e.g. 50 MB), a card larger than 16 MiB, or a card whose "
    "recipe block is larger than 1 MiB",
    "one line: 'recipe R is larger than 1 MiB, the most hfsoup reads' (RecipeError), at once",
)
@pytest.mark.parametrize("kind", ["yaml", "card", "card block"])
def test_oversized_recipe_is_refused_at_once(tmp_path, cli, kind):
    if kind == "yaml":
        path = tmp_path / "big.yaml"
        path.write_text("ingredients:\n" + "  - org/a\n" * (50_000_000 // 10))
        fragment = "larger than 1 MiB"
    elif kind == "card":
        path = tmp_path / "README.md"
        path.write_text("# soup\n" + "x" * (17 << 20))
        fragment = "larger than 16 MiB"
    else:
        path = _card(tmp_path / "soup", "ingredients:\n" + "  - org/a\n" * (MAX_RECIPE_BYTES // 9))
        fragment = "the recipe block is larger than 1 MiB"
    t0 = time.perf_counter()
    proc = cli("run", path, "--output", tmp_path / "out", "-q")
    assert time.perf_counter() - t0 < 2
    assert_one_line_error(proc, fragment)


SHAPES = {
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: *c\ningredients: [org/a]\n",
        ":1: YAML anchors and aliases (&name, *name) are not allowed",
    ),
    "deep nesting": ("name: " + "[" * 200_000 + "]" * 200_000 + "\n", ":1: nested deeper than 32"),
    "too many values": (
        "ingredients: [" + "a/b, " * 150_000 + "a/b]\n",
        "more than 20,000 values",
    ),
    "top level a list": ("- org/a\n- org/b\n", "a recipe is a YAML mapping"),
    "top level a string": ("org/a\n", "a recipe is a YAML mapping"),
    "integer key": ("ingredients: [org/a]\n3: x\n", ":2: key '3' is not a string"),
    "list key": ("ingredients: [org/a]\n? [a, b]\n: c\n", ":2: key (a sequence) is not a string"),
    "duplicate key": (
        "ingredients: [org/a]\noutput: {dir: a}\noutput: {dir: b, push_to: evil/x}\n",
        ":3: key 'output' appears twice",
    ),
    "huge integer": ("ingredients: [org/a]\nseed: " + "9" * 5000 + "\n", "invalid YAML value"),
    "not UTF-8": (b"name: \xff\xfe\ningredients: [org/a]\n", "is not UTF-8 text"),
}


@reliability(
    "Recipe YAML of a hostile shape: an alias bomb, nesting 200,000 deep, 150,000 values (the "
    "cap is 20,000), a top level that is not a mapping, keys that are not strings or appear twice, a 5,000-digit "
    "integer, bytes that are not UTF-8",
    "one line naming the problem and, where there is one, its line: 'R.yaml:1: YAML anchors and "
    "aliases (&name, *name) are not allowed' (RecipeError), within a second or two",
)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hostile_recipe_shapes_fail_fast_in_one_line(tmp_path, cli, shape):
    text, fragment = SHAPES[shape]
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    proc = cli("run", path, "--output", tmp_path / "out", "-q")
    assert time.perf_counter() - t0 < 3
    assert_one_line_error(proc, fragment)
    assert_nothing_written(tmp_path, "out")


def test_card_recipe_errors_name_the_cards_line(tmp_path, cli):
    card = _card(tmp_path / "soup", "ingredients: [org/a]\nseed: first\n")
    proc = cli("run", card, "--output", tmp_path / "out")
    # The block starts on line 6 of the card (after the front matter and the title).
    assert_one_line_error(proc, f"{card}:8: seed:")
