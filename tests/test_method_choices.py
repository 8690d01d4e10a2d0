"""The CLI, the recipe and the Space list methods from the registry, read when they are used."""

from __future__ import annotations

import pytest

from hfsoup.cli import build_parser, main
from hfsoup.errors import RecipeError
from hfsoup.recipe import parse_recipe
from hfsoup.registry import MergeMethod, method_names, register, unregister


@pytest.fixture
def toy():
    """A method registered from this test file alone (and taken away afterwards)."""
    register(MergeMethod("toy", "a toy method registered by a test"))
    yield "toy"
    unregister("toy")


def test_a_method_registered_at_run_time_is_a_cli_choice(toy):
    args = build_parser().parse_args(["soup", "org/a", "org/b", "-o", "out", "--method", toy])
    assert args.method == toy


def test_a_method_registered_at_run_time_is_a_recipe_method(toy):
    recipe = parse_recipe(f"method: {toy}\ningredients: [org/a, org/b]\n")
    assert recipe.method == toy


def test_an_unregistered_method_is_refused_again(toy, capsys):
    unregister(toy)
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["soup", "org/a", "-o", "out", "--method", toy])
    assert stop.value.code == 2
    assert "invalid choice: 'toy'" in capsys.readouterr().err
    with pytest.raises(RecipeError, match=r"<recipe>:1: method: Input should be 'uniform'"):
        parse_recipe(f"method: {toy}\ningredients: [org/a]\n")


def test_recipe_error_lists_every_registered_method(toy):
    with pytest.raises(RecipeError) as err:
        parse_recipe("method: soupy\ningredients: [org/a]\n")
    quoted = ", ".join(repr(n) for n in method_names()[:-1])
    assert str(err.value).endswith(f"Input should be {quoted} or {method_names()[-1]!r}")


def test_soup_help_shows_each_methods_summary(toy, capsys):
    with pytest.raises(SystemExit):
        main(["soup", "--help"])
    assert "a toy method registered by a test" in " ".join(capsys.readouterr().out.split())


def test_inspect_refuses_a_method_the_estimates_do_not_know(toy, cli):
    proc = cli("inspect", "org/a", "org/b", "--method", toy)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "hfsoup: error: inspect estimates memory and time for the methods uniform, greedy, "
        "learned, task_arithmetic, ties, dare_linear, dare_ties, wise_ft; method 'toy' has no "
        "estimate yet (--method)"
    )


def test_inspect_estimates_the_registered_methods_that_carry_an_estimate(toy):
    from hfsoup.registry import estimable_methods, get_method

    assert toy not in estimable_methods()  # registered without an estimate
    register(MergeMethod(toy, "a toy method", estimate=get_method("uniform").estimate))
    assert estimable_methods()[-1] == toy
    assert "uniform" in estimable_methods()
