"""A merge method is one value in the registry: toy methods registered from this file alone run
through the CLI like the built-in ones, and the card describes them (issue 13)."""

from __future__ import annotations

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config

from hfsoup.methods.context import MethodContext, MethodOutcome
from hfsoup.registry import MergeMethod, register, unregister


class ElementwiseMax:
    """One pass: the largest value of each element across the ingredients."""

    passes = 1

    def start(self, name: str, like: torch.Tensor, device: torch.device | str) -> None:
        self.best = torch.full(like.shape, -torch.inf, dtype=torch.float32, device=device)

    def add(self, pass_index: int, slot: int, tensor: torch.Tensor) -> None:
        torch.maximum(self.best, tensor.to(self.best), out=self.best)

    def result(self) -> torch.Tensor:
        return self.best


class SignElectedMean:
    """Two passes, shaped like TIES without trimming: pass 0 sums the values to elect each
    element's sign, pass 1 averages only the values of the elected sign."""

    passes = 2

    def start(self, name: str, like: torch.Tensor, device: torch.device | str) -> None:
        self.sum = torch.zeros(like.shape, dtype=torch.float32, device=device)
        self.kept = torch.zeros_like(self.sum)
        self.count = torch.zeros_like(self.sum)

    def add(self, pass_index: int, slot: int, tensor: torch.Tensor) -> None:
        x = tensor.to(self.sum)
        if pass_index == 0:
            self.sum.add_(x)
            return
        agrees = (torch.sign(x) == torch.sign(self.sum)).to(x)
        self.kept.add_(x * agrees)
        self.count.add_(agrees)

    def result(self) -> torch.Tensor:
        return self.kept / self.count.clamp(min=1)


def _streamed(accumulator):
    def run(ctx: MethodContext) -> MethodOutcome:
        ctx.stream_soup(accumulator)
        return MethodOutcome(ctx.results(ctx.weights, {}))

    return run


@pytest.fixture
def toy_methods():
    """Two methods registered from this test file alone, taken away afterwards."""
    register(MergeMethod("toy-max", "elementwise max of the ingredients",
                         run=_streamed(ElementwiseMax), card="toy max: the elementwise maximum"))  # fmt: skip
    register(MergeMethod("toy-signs", "mean of the values agreeing with the elected sign",
                         run=_streamed(SignElectedMean)))  # fmt: skip
    yield
    unregister("toy-max")
    unregister("toy-signs")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three local tiny BERTs, one perturbed init (a float tensor per layer, integer buffers)."""
    tmp = tmp_path_factory.mktemp("toy")
    return [save_ingredient(tmp / f"ing{i}", tiny_bert_config(), seed=70 + i) for i in range(3)]


def _floats(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if v.is_floating_point()}


def test_a_registered_method_runs_through_the_cli(toy_methods, three, cli, tmp_path):
    out = tmp_path / "soup"
    proc = cli("soup", *three, "--method", "toy-max", "--output", out, "-q")
    assert proc.returncode == 0, proc.stderr
    sds = [load_state_dict(d) for d in three]
    soup = load_state_dict(out)
    for name in _floats(sds[0]):
        expected = torch.stack([sd[name] for sd in sds]).amax(dim=0)
        torch.testing.assert_close(soup[name], expected, rtol=0, atol=0)
    for name in sds[0].keys() - _floats(sds[0]).keys():
        assert torch.equal(soup[name], sds[0][name])  # integer buffers: the first ingredient's


def test_a_two_pass_method_sees_every_ingredient_in_each_pass(toy_methods, three, cli, tmp_path):
    out = tmp_path / "soup"
    proc = cli("soup", *three, "--method", "toy-signs", "--output", out, "-q")
    assert proc.returncode == 0, proc.stderr
    sds = [_floats(load_state_dict(d)) for d in three]
    soup = load_state_dict(out)
    for name in sds[0]:
        stacked = torch.stack([sd[name] for sd in sds])
        agrees = torch.sign(stacked) == torch.sign(stacked.sum(dim=0))
        expected = (stacked * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)
        torch.testing.assert_close(soup[name], expected)


def test_the_card_and_results_name_a_registered_method(toy_methods, three, cli, tmp_path):
    import json

    out = tmp_path / "soup"
    proc = cli("soup", *three[:2], "--method", "toy-max", "--output", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "**Method:** toy max: the elementwise maximum." in (out / "README.md").read_text()
    assert json.loads((out / "results.json").read_text())["method"] == "toy-max"
