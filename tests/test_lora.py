"""PEFT LoRA adapters as ingredients (issue 18): souped in delta space on their base.

The adapters are made with ``peft`` on tiny bases (GPT-2 with Conv1D layers and a tied
embedding; a BERT classifier with a saved head), with random non-zero B, different ranks and
target modules. Every soup is checked against an independent computation: peft's own
``merge_and_unload`` per adapter, then a plain average of the state dicts.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_errors import assert_nothing_written, assert_one_line_error

reliability = pytest.mark.reliability

# (target modules, rank, alpha, rsLoRA): different ranks and module sets; GPT-2's c_attn,
# c_proj and c_fc are Conv1D (fan_in_fan_out), wte an embedding.
GPT2_ADAPTERS = [
    (["c_attn", "c_proj"], 4, 8, False),
    (["c_attn", "c_fc"], 2, 4, True),
    (["c_attn", "wte"], 3, 6, False),
]


def _tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def make_adapter(base_dir: Path, out: Path, *, base_name: str, seed: int, loader, **lora) -> Path:
    """A LoRA adapter of ``base_dir`` with random non-zero A and B, naming ``base_name``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(loader(base_dir), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:  # a trained head: not the base's
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _gpt2_loader(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder)


def merged_reference(base_dir: Path, adapter_dirs, loader, weights=None) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload per adapter, then the weighted average of the state dicts."""
    from peft import PeftModel

    weights = weights or [1 / len(adapter_dirs)] * len(adapter_dirs)
    avg: dict[str, torch.Tensor] = {}
    for w, folder in zip(weights, adapter_dirs, strict=True):
        merged = PeftModel.from_pretrained(loader(base_dir), folder).merge_and_unload()
        for k, v in merged.state_dict().items():
            avg[k] = avg.get(k, 0) + w * v.double()
    return avg


def _max_diff(soup: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert soup, "empty soup"
    return max((soup[k].double() - ref[k]).abs().max().item() for k in soup)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, hub):
    """A tiny GPT-2 base on the Hub and three adapters of it on the Hub (and on disk)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("lora-gpt2")
    tag = uuid.uuid4().hex[:8]
    base_dir = _tiny_gpt2(tmp / "base")
    base = f"test-org/lora-base-{tag}"
    api.create_repo(base)
    api.upload_folder(repo_id=base, folder_path=str(base_dir))
    dirs, repos = [], []
    for i, (targets, r, alpha, rs) in enumerate(GPT2_ADAPTERS):
        folder = make_adapter(base_dir, tmp / f"ad{i}", base_name=base, seed=10 + i,
                              loader=_gpt2_loader, target_modules=targets, r=r, lora_alpha=alpha,
                              use_rslora=rs, fan_in_fan_out="wte" not in targets)  # fmt: skip
        repo = f"test-org/lora-ad{i}-{tag}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        dirs.append(folder)
        repos.append(repo)
    return {"base": base, "base_dir": base_dir, "dirs": dirs, "repos": repos, "api": api}


def test_uniform_soup_of_adapters_equals_merge_then_average(gpt2, tmp_path, cli):
    proc = cli("soup", *gpt2["repos"], "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    ref = merged_reference(gpt2["base_dir"], gpt2["dirs"], _gpt2_loader)
    assert _max_diff(soup, ref) <= 1e-5
    # ΔW is not zero: the soup is not the base.
    base = load_file(gpt2["base_dir"] / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    assert (soup[name] - base[name]).abs().max() > 1e-3


def test_weighted_soup_of_adapters_on_a_given_base(gpt2, tmp_path, cli):
    # Local adapter folders, the base given explicitly (overriding what the adapters name).
    w = [0.5, 0.3, 0.2]
    args = [str(d) for d in gpt2["dirs"]]
    proc = cli("soup", *args, "--weights", *map(str, w), "--base", str(gpt2["base_dir"]),
               "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    ref = merged_reference(gpt2["base_dir"], gpt2["dirs"], _gpt2_loader, weights=w)
    assert _max_diff(soup, ref) <= 1e-5


def test_task_arithmetic_of_adapters_takes_their_base(gpt2, tmp_path, cli):
    # τᵢ = ΔWᵢ: θ₀ + λ Σ ΔWᵢ, with the base the adapters name (no --base given).
    proc = cli("soup", *gpt2["repos"][:2], "--method", "task_arithmetic", "--lambda", "0.5",
               "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    base = {k: v.double() for k, v in load_file(gpt2["base_dir"] / "model.safetensors").items()}
    avg = merged_reference(gpt2["base_dir"], gpt2["dirs"][:2], _gpt2_loader)
    # θ₀ + 0.5·(τ₁ + τ₂) = θ₀ + (mean θᵢ − θ₀)
    ref = {k: base[k] + (avg[k] - base[k]) for k in base}
    assert _max_diff(soup, ref) <= 1e-5


@reliability(
    "LoRA adapters that name different base models (base_model_name_or_path)",
    "one line naming each adapter and its base; nothing written",
)
def test_adapters_on_different_bases_are_refused(gpt2, tmp_path, cli):
    other = tmp_path / "other"
    other.mkdir()
    for f in gpt2["dirs"][1].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "test-org/some-other-base"
    (other / "adapter_config.json").write_text(json.dumps(config))
    proc = cli("soup", str(gpt2["dirs"][0]), str(other), "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "the adapters name different base models",
                          gpt2["base"], "test-org/some-other-base")  # fmt: skip
    assert_nothing_written(tmp_path)


@reliability(
    "A DoRA adapter (use_dora), or another PEFT type than LoRA, as an ingredient",
    "one line: 'X is a DoRA adapter (use_dora); hfsoup soups plain LoRA'; nothing written",
)
def test_dora_adapter_is_refused(gpt2, tmp_path, cli):
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in gpt2["dirs"][0].iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    proc = cli("soup", str(gpt2["dirs"][1]), str(dora), "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "is a DoRA adapter (use_dora)")
    assert_nothing_written(tmp_path)


def _svd_error(delta: torch.Tensor, rank: int) -> float:
    """Independent: the relative Frobenius error of the best rank-``rank`` approximation, from
    the singular values alone (Eckart–Young)."""
    s = torch.linalg.svdvals(delta.double())
    return (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()


def test_output_adapter_loads_in_peft_and_reports_its_svd_error(gpt2, tmp_path, cli):
    from peft import PeftModel

    rank = 2
    out = tmp_path / "soup"
    proc = cli("soup", *gpt2["repos"], "--output-adapter", "--rank", str(rank),
               "--output", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (out / "model.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    reported = results["lora"]["output_adapter"]
    assert reported["rank"] == rank

    base = {k: v.double() for k, v in load_file(gpt2["base_dir"] / "model.safetensors").items()}
    avg = merged_reference(gpt2["base_dir"], gpt2["dirs"], _gpt2_loader)
    expected = {}
    for module in reported["relative_frobenius_error"]["per_module"]:
        name = f"{module}.weight"
        delta = avg[name] - base[name]
        # Conv1D (GPT-2) and embeddings are stored (in, out): the adapter's ΔW is its transpose.
        expected[module] = _svd_error(delta.T, rank)
    # Every module any adapter targets: c_attn, c_proj and c_fc of both layers, and wte.
    assert len(expected) == 2 * 4 + 1
    per_module = reported["relative_frobenius_error"]["per_module"]
    for module, err in expected.items():
        assert abs(per_module[module] - err) <= 1e-5, module
    assert abs(reported["relative_frobenius_error"]["max"] - max(expected.values())) <= 1e-5
    mean = sum(expected.values()) / len(expected)
    assert abs(reported["relative_frobenius_error"]["mean"] - mean) <= 1e-5
    assert max(expected.values()) > 0.01  # rank 2 < the soup's rank: the error is real

    # The adapter loads with peft, and its merged model is θ₀ + the rank-R truncation.
    merged = PeftModel.from_pretrained(_gpt2_loader(gpt2["base_dir"]), out).merge_and_unload()
    state = merged.state_dict()
    name = "transformer.h.1.attn.c_attn.weight"
    delta = (avg[name] - base[name]).T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert (state[name].double() - (base[name] + truncated.T)).abs().max() <= 1e-5
    assert "LoRA adapters" in (out / "README.md").read_text()


def test_output_adapter_at_full_rank_is_exact(gpt2, tmp_path, cli):
    # Σ of the adapters' ranks bounds the soup's rank: at that rank the SVD loses nothing.
    rank = sum(r for _, r, _, _ in GPT2_ADAPTERS)
    proc = cli("soup", *gpt2["repos"], "--output-adapter", "--rank", str(rank),
               "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "soup" / "results.json").read_text())
    assert results["lora"]["output_adapter"]["relative_frobenius_error"]["max"] <= 1e-6


@reliability(
    "--output-adapter with full models as ingredients, or --rank without --output-adapter",
    "one line naming the flag; nothing written",
)
def test_output_adapter_of_full_models_is_refused(gpt2, tmp_path, cli):
    base = str(gpt2["base_dir"])
    proc = cli("soup", base, base, "--output-adapter", "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "an adapter output needs LoRA adapters", "--output-adapter")
    assert_nothing_written(tmp_path)
    proc = cli("soup", *gpt2["repos"], "--rank", "2", "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "rank applies to an adapter output only", "--rank")
    assert_nothing_written(tmp_path)


def _seq_cls_loader(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder)


@pytest.fixture(scope="module")
def cls_adapters(tiny_greedy, hub, tmp_path_factory):
    """Three SEQ_CLS adapters of a tiny BERT classifier on the Hub: LoRA on query/value with
    different ranks and modules, each with its own head saved whole (modules_to_save)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("lora-cls")
    base_repo, base_dir = tiny_greedy["repos"][0], tiny_greedy["dirs"][0]
    tag = uuid.uuid4().hex[:8]
    dirs, repos = [], []
    for i, (targets, r) in enumerate([(["query", "value"], 2), (["query"], 4), (["value"], 1)]):
        folder = make_adapter(base_dir, tmp / f"cls{i}", base_name=base_repo, seed=20 + i,
                              loader=_seq_cls_loader, task_type="SEQ_CLS", target_modules=targets,
                              r=r, lora_alpha=2 * r)  # fmt: skip
        repo = f"test-org/lora-cls{i}-{tag}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        dirs.append(folder)
        repos.append(repo)
    return {"dirs": dirs, "repos": repos, "base": base_repo, "base_dir": base_dir, "api": api,
            "task": tiny_greedy["task"]}  # fmt: skip


def test_greedy_soup_of_classifier_adapters_with_saved_heads(cls_adapters, tmp_path):
    """Greedy scores each SEQ_CLS adapter as θ₀ + ΔW with its own head, and the soup it keeps
    equals peft's merge-then-average of the adapters it kept."""
    import hfsoup

    c = cls_adapters
    result = hfsoup.soup(c["repos"], output=tmp_path / "soup", method="greedy", task=c["task"],
                         progress=False)  # fmt: skip
    results = result.results
    assert results["method"] == "greedy" and "greedy" in results
    assert [row["sha"] for row in results["ingredients"]] == [
        c["api"].model_info(r).sha for r in c["repos"]
    ]
    assert results["lora"]["base"]["repo"] == c["base"]
    assert results["lora"]["adapters"][0]["saved_whole"] == ["classifier.bias", "classifier.weight"]
    kept = [(w, d) for w, d in zip(result.weights, c["dirs"], strict=True) if w > 0]
    assert kept
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    ref = merged_reference(c["base_dir"], [d for _, d in kept], _seq_cls_loader,
                           weights=[w for w, _ in kept])  # fmt: skip
    assert _max_diff(soup, ref) <= 1e-5
    # The head is the adapters' (saved whole), not the base's.
    base = load_file(c["base_dir"] / "model.safetensors")
    assert (soup["classifier.weight"] - base["classifier.weight"]).abs().max() > 1e-3


def test_learned_soup_of_classifier_adapters_matches_its_weights(cls_adapters, tmp_path):
    """A learned soup of adapters: the written model is θ₀ + Σ αᵢ ΔWᵢ (heads: Σ αᵢ headᵢ)
    for the α it reports, as peft's merges averaged with those weights."""
    import hfsoup

    c = cls_adapters
    result = hfsoup.soup(c["repos"], output=tmp_path / "soup", method="learned", task=c["task"],
                         learned={"epochs": 1}, progress=False)  # fmt: skip
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    ref = merged_reference(c["base_dir"], c["dirs"], _seq_cls_loader, weights=result.weights)
    assert _max_diff(soup, ref) <= 1e-5


def test_card_recipe_pins_the_base_and_rebuilds_the_same_soup(gpt2, tmp_path, cli):
    import yaml

    proc = cli("soup", *gpt2["repos"][:2], "--output", tmp_path / "a", "-q")
    assert proc.returncode == 0, proc.stderr
    recipe = yaml.safe_load((tmp_path / "a" / "hfsoup_recipe.yaml").read_text())
    base_sha = gpt2["api"].model_info(gpt2["base"]).sha
    assert recipe["base"] == {"repo": gpt2["base"], "revision": base_sha}
    proc = cli("run", tmp_path / "a" / "README.md", "--output", tmp_path / "b", "-q")
    assert proc.returncode == 0, proc.stderr
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_output_adapter_is_pushed_with_its_files(gpt2, tmp_path, cli, repo_id):
    target = repo_id("lora-soup")
    proc = cli("soup", *gpt2["repos"][:2], "--output-adapter", "--output", tmp_path / "soup",
               "--push-to", target, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = set(gpt2["api"].list_repo_files(target))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert "model.safetensors" not in files
    # The default rank is the largest of the adapters' (4 and 2).
    config = json.loads((tmp_path / "soup" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == gpt2["base"]
