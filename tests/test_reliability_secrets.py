"""Secrets and trust: a token never leaks into any output; a repo's code never runs; pickle is
never loaded without the opt-in, and then only with ``weights_only=True``."""

from __future__ import annotations

import json

import pytest
import torch
from factories import save_ingredient, tiny_bert_config
from safetensors.torch import load_file
from test_errors import assert_nothing_written, assert_one_line_error

reliability = pytest.mark.reliability
CANARY = "hf_SECRET_canary_123"


@reliability(
    "HF_TOKEN set while inspecting, souping (uniform and greedy), pushing and failing",
    "the token appears in no output stream, traceback (--debug), card, results.json, recipe or "
    "any other file of the soup",
)
def test_the_token_appears_nowhere(
    faulty_hub, api, tiny_greedy, tmp_path, repo_id, cli, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    # A private ingredient: the soup only succeeds if the token is really sent.
    private = repo_id("private")
    api.create_repo(private, private=True, token=CANARY)
    api.upload_folder(repo_id=private, folder_path=str(tiny_greedy["dirs"][1]), token=CANARY)
    repos = [tiny_greedy["repos"][0], private]
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    runs = [
        cli("inspect", *repos),
        cli("soup", *repos, "--output", tmp_path / "uniform", "--push-to", repo_id("soup")),
        cli("soup", *repos, "--method", "greedy", "--task", task, "--output", tmp_path / "greedy"),
        cli("push", tmp_path / "uniform", repo_id("pushed"), "--private"),
        cli("soup", repos[0], "test-org/no-such-repo", "--output", tmp_path / "x", "--debug"),
    ]
    faulty_hub.add_fault(method="POST", path=r"/commit/", times=None, status=403)
    runs.append(cli("push", tmp_path / "greedy", repo_id("denied"), "--debug"))
    assert [r.returncode for r in runs] == [0, 0, 0, 0, 2, 2], [r.stderr for r in runs]
    for run in runs:
        assert CANARY not in run.stdout and CANARY not in run.stderr
    files = [p for d in ("uniform", "greedy") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert {"README.md", "results.json", "hfsoup_recipe.yaml"} <= {p.name for p in files}
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), path


@pytest.fixture
def quiet_transformers():
    """What -q does in a fresh process (TRANSFORMERS_VERBOSITY=error), here where transformers
    is already imported: its warning about the unknown model type stays off stderr."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


def _with_remote_code(folder, marker, model_type: str = "bert") -> None:
    """Give ``folder`` an ``auto_map`` to code that, if ever imported, writes ``marker``."""
    payload = f"open({str(marker)!r}, 'w').write('the repo code ran')\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(payload)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


@reliability(
    "Ingredient whose config points to custom code (auto_map)",
    "the code never runs (trust_remote_code is never set): a known architecture is souped with "
    "transformers' own classes; an unknown one fails with one line (TaskError) when scored",
)
def test_repo_code_is_never_run(tiny_greedy, tmp_path, publish, cli, quiet_transformers):
    marker = tmp_path / "code-ran"
    repos = []
    for model_type in ("bert", "evil"):
        folder = save_ingredient(tmp_path / model_type, tiny_bert_config(), seed=5)
        tiny_greedy["tok"].save_pretrained(folder)
        _with_remote_code(folder, marker, model_type)
        repos.append(publish(folder)[0])
    known, custom = repos
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    other = tiny_greedy["repos"][0]
    proc = cli("soup", known, other, "--output", tmp_path / "uniform", "-q")
    assert proc.returncode == 0, proc.stderr
    greedy = ("--method", "greedy", "--task", task, "-q")
    proc = cli("soup", known, other, *greedy, "--output", tmp_path / "greedy")
    assert proc.returncode == 0, proc.stderr
    proc = cli("soup", custom, custom, *greedy, "--output", tmp_path / "custom")
    assert_one_line_error(proc, "custom code")
    assert not marker.exists()


def _evil_pickle(folder, marker) -> None:
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pickle ran')",))

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    state["bert.pooler.dense.bias"] = Evil()
    torch.save(state, folder / "pytorch_model.bin")


@reliability(
    "Pickle-only ingredient whose pickle would run code",
    "without --allow-pickle: one line naming --allow-pickle (UnsafeWeightsError), the file is not "
    "even opened; with it: one line '... cannot be loaded with torch.load(weights_only=True) "
    "(Unsupported global: GLOBAL exec was not an allowed global ...)' (CorruptWeightsError); "
    "the code never runs",
)
def test_a_malicious_pickle_never_runs(hub, tmp_path, publish, cli, monkeypatch):
    marker = tmp_path / "pickle-ran"
    good = save_ingredient(tmp_path / "good", tiny_bert_config(), seed=1)
    evil = save_ingredient(tmp_path / "evil", tiny_bert_config(), seed=2)
    _evil_pickle(evil, marker)
    repo = publish(evil)[0]
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    proc = cli("soup", good, repo, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, repo, "--allow-pickle")
    assert loads == []
    proc = cli("soup", good, repo, "--output", tmp_path / "soup", "--allow-pickle", "-q")
    assert_one_line_error(proc, "weights_only=True", "Unsupported global")
    assert "GLOBAL exec" in proc.stderr
    assert loads and all(k.get("weights_only") is True for k in loads)
    assert not marker.exists()
    assert_nothing_written(tmp_path)
