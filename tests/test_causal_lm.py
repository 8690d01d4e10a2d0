"""The causal-LM task kind: perplexity and choice accuracy against plain torch, exact early
stops, the probability ensemble, chat templates, and a greedy soup by perplexity via the CLI.

Ingredients are tiny GPT-2- (tied embeddings) and Llama-shaped models trained for a few steps
from one init with different learning rates and data orders, on sentences of a toy grammar.
"""

from __future__ import annotations

import json
import math
import random
import uuid

import pytest
import torch

from hfsoup.errors import TaskError
from hfsoup.tasks.causal_lm import KIND, windows
from hfsoup.tasks.kinds import HIGHER, LOWER
from hfsoup.tasks.task import resolve_task

SUBJECTS, VERBS, OBJECTS = ["cat", "dog", "bird", "fish"], ["sees", "likes", "eats"], ["food", "ball", "tree", "cat"]  # fmt: skip
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "the", "a", "and", "user", "assistant", *SUBJECTS,
         *VERBS, *OBJECTS[:3], "yes", "no", "?"]  # fmt: skip
CHAT = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def sentence(rng: random.Random, clauses: int) -> str:
    parts = [f"the {rng.choice(SUBJECTS)} {rng.choice(VERBS)} a {rng.choice(OBJECTS)}"]
    parts += [parts[0].split()[1] + " " + rng.choice(VERBS) for _ in range(clauses - 1)]
    return " and ".join(parts)


def texts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": sentence(rng, rng.randint(1, 4))} for _ in range(n)]


def questions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
        good = f"a {rng.choice(OBJECTS)}"
        bad = f"{rng.choice(VERBS)} the and"
        choices = [good, bad] if rng.random() < 0.5 else [bad, good]
        rows.append({"context": f"the {subject} {verb}", "choices": choices,
                     "label": choices.index(good)})  # fmt: skip
    return rows


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>")  # fmt: skip
    tok.chat_template = CHAT
    return tok


def make_config(shape: str):
    from transformers import GPT2Config, LlamaConfig

    if shape == "gpt2":
        return GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3,
                          architectures=["GPT2LMHeadModel"])  # fmt: skip
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0, architectures=["LlamaForCausalLM"])  # fmt: skip


def train(shape: str, tok, rows: list[dict], *, lr: float, seed: int, steps: int):
    """The shared init (seed 0) trained ``steps`` steps in the data order of ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(shape))
    if steps:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(rows), (8,), generator=gen).tolist()
            batch = tok([rows[i]["text"] for i in idx], padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# (learning rate, data-order seed, steps) per ingredient: one barely trained, so greedy rejects.
RECIPES = [(3e-3, 1, 40), (1e-2, 2, 40), (3e-3, 3, 30), (1e-1, 4, 40)]


@pytest.fixture(scope="session")
def lm(tmp_path_factory, hub):
    """GPT-2 and Llama ingredients on the test Hub, a text dataset and a choice dataset."""
    from greedy_fixtures import publish_dataset
    from huggingface_hub import HfApi

    api, tmp, tag = HfApi(endpoint=hub.url), tmp_path_factory.mktemp("lm"), uuid.uuid4().hex[:8]
    tok = make_tokenizer()
    train_rows = texts(200, 0)
    out = {"tok": tok, "models": {}, "repos": {}}
    for shape in ("gpt2", "llama"):
        out["models"][shape], out["repos"][shape] = [], []
        for i, (lr, seed, steps) in enumerate(RECIPES):
            model = train(shape, tok, train_rows, lr=lr, seed=seed, steps=steps)
            folder = tmp / f"{shape}{i}"
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            repo = f"test-org/tiny-{shape}-{i}-{tag}"
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=str(folder))
            out["models"][shape].append(model)
            out["repos"][shape].append(repo)
    out["text"] = f"test-org/lm-text-{tag}"
    publish_dataset(api, out["text"], {"validation": texts(12, 1), "test": texts(10, 2)}, tmp)
    out["choice"] = f"test-org/lm-choice-{tag}"
    publish_dataset(api, out["choice"], {"validation": questions(14, 3), "test": questions(8, 4)},
                    tmp)  # fmt: skip
    return out


def text_task(lm, **keys):
    return resolve_task({"kind": "causal-lm", "dataset": lm["text"], "input_columns": ["text"],
                         "max_length": 8, "stride": 3, "batch_size": 3, **keys})  # fmt: skip


def choice_task(lm, **keys):
    return resolve_task({"kind": "causal-lm", "dataset": lm["choice"], "metrics": ["choice-accuracy"],
                         "input_columns": ["context"], "batch_size": 3, **keys})  # fmt: skip


@torch.no_grad()
def reference_token_logps(model, ids: list[int], max_length: int, stride: int) -> list[float]:
    """Token j's log-probability with the context the sliding-window rule gives it: from the
    start of the first window (starts every ``stride``) that reaches j, unpadded, one token at
    a time."""
    out = []
    for j in range(1, len(ids)):
        begin = max(0, math.ceil((j - max_length + 1) / stride) * stride)
        logits = model(torch.tensor([ids[begin:j]])).logits[0, -1].double()
        out.append(float(logits.log_softmax(-1)[ids[j]]))
    return out


def reference_perplexity(models, tok, rows, max_length: int, stride: int) -> float:
    per_model = [
        [v for r in rows for v in reference_token_logps(m, tok(r["text"])["input_ids"], max_length, stride)]
        for m in models
    ]  # fmt: skip
    mean_p = torch.tensor(per_model).exp().mean(0)  # the ensemble: mean probability per token
    return math.exp(float(-mean_p.log().sum()) / len(mean_p))


@torch.no_grad()
def reference_choices(model, tok, rows, *, normalize: bool) -> float:
    right = 0
    for r in rows:
        context = tok(r["context"])["input_ids"]
        totals = []
        for text in r["choices"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([context + ids])).logits[0].double().log_softmax(-1)
            total = sum(float(logp[len(context) + t - 1, i]) for t, i in enumerate(ids))
            totals.append(total / len(text) if normalize else total)
        right += totals.index(max(totals)) == r["label"]
    return right / len(rows)


def test_windows_predict_every_token_but_the_first_exactly_once():
    for n, length, stride in [(1, 4, 2), (5, 3, 2), (10, 4, 3), (11, 8, 3), (3, 8, 7), (9, 2, 1)]:
        ids = list(range(n))
        predicted = [
            w[i] for w, first in windows(ids, length, stride) for i in range(first, len(w))
        ]
        assert predicted == ids[1:]
        assert all(len(w) <= length for w, _ in windows(ids, length, stride))


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_perplexity_equals_a_token_by_token_torch_reference(lm, shape):
    scorer = KIND.prepare(text_task(lm), lm["repos"][shape][0], progress=False)
    model = lm["models"][shape][0]
    assert scorer.direction is LOWER
    for split, rows in (("validation", texts(12, 1)), ("test", texts(10, 2))):
        got = scorer.scores(scorer.outputs(model, split), split)["perplexity"]
        want = reference_perplexity([model], lm["tok"], rows, 8, 3)
        assert got == pytest.approx(want, rel=1e-5)


def test_the_ensemble_perplexity_is_that_of_mean_token_probabilities(lm):
    scorer = KIND.prepare(text_task(lm), lm["repos"]["gpt2"][0], progress=False)
    models = lm["models"]["gpt2"][:3]
    outputs = [scorer.outputs(m, "validation") for m in models]
    got = scorer.selection_score(scorer.ensemble(outputs))
    assert got == pytest.approx(
        reference_perplexity(models, lm["tok"], texts(12, 1), 8, 3), rel=1e-5
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_choice_accuracy_equals_a_torch_reference(lm, normalize):
    scorer = KIND.prepare(
        choice_task(lm, normalize=normalize), lm["repos"]["llama"][1], progress=False
    )
    assert scorer.direction is HIGHER
    for model in lm["models"]["llama"]:
        got = scorer.selection_score(scorer.outputs(model, "validation"))
        assert got == reference_choices(model, lm["tok"], questions(14, 3), normalize=normalize)


def thresholds(score: float) -> list[float]:
    return [score, math.nextafter(score, math.inf), math.nextafter(score, -math.inf),
            score * 0.5, score * 0.9, score * 1.1, score * 2, 0.0, math.inf]  # fmt: skip


@pytest.mark.parametrize("task", [text_task, choice_task])
def test_early_stopped_decisions_equal_full_evaluation(lm, task):
    scorer = KIND.prepare(task(lm), lm["repos"]["gpt2"][0], progress=False)
    stopped = 0
    for model in lm["models"]["gpt2"]:
        full = scorer.selection_score(scorer.outputs(model, "validation"))
        for other in [
            full,
            *(
                scorer.selection_score(scorer.outputs(m, "validation"))
                for m in lm["models"]["gpt2"]
            ),
        ]:
            for threshold in thresholds(other):
                for strict in (False, True):
                    early = scorer.score_with_early_stop(
                        model, "validation", threshold, strict=strict
                    )
                    want = scorer.direction.reaches(full, threshold, strict=strict)
                    assert scorer.direction.reaches(early.score, threshold, strict=strict) == want
                    if early.score is not None:
                        assert early.score == full
                    stopped += early.examples_scored < scorer.split("validation").size
    assert stopped  # the bound does stop some candidates


def test_conversations_are_scored_through_the_chat_template(lm):
    from datasets import Dataset

    from hfsoup.tasks.causal_lm import Scorer

    chat = [
        {"role": "user", "content": "the cat sees a ball"},
        {"role": "assistant", "content": "yes"},
    ]
    data = {
        "validation": Dataset.from_list([{"messages": chat}]),
        "test": Dataset.from_list([{"messages": chat}]),
    }
    tok = lm["tok"]
    templated = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    for flag, want in (
        (None, templated),
        (True, templated),
        (False, tok("the cat sees a ball\nyes")["input_ids"]),
    ):
        task = text_task(
            lm, input_columns=["messages"], max_length=64, stride=None, chat_template=flag
        )
        scorer = Scorer(task, tok, progress=False, splits=data)
        assert scorer.split("validation").batches[0]["input_ids"][0].tolist() == want


def test_the_learned_loss_is_the_summed_token_nll(lm):
    scorer = KIND.prepare(text_task(lm), lm["repos"]["gpt2"][0], progress=False)
    model, split = lm["models"]["gpt2"][1], scorer.split("validation")
    with torch.no_grad():
        loss = sum(
            float(scorer.loss(model(**b), torch.tensor(1.0), y))
            for b, y in zip(split.batches, split.labels, strict=True)
        )
    nll = -sum(float(o.double().sum()) for o in scorer.outputs(model, "validation"))
    assert loss == pytest.approx(nll, rel=1e-5)


def test_greedy_soup_by_perplexity_via_the_cli(lm, cli, tmp_path):
    out = tmp_path / "soup"
    proc = cli("soup", *lm["repos"]["gpt2"], "--method", "greedy", "--dataset", lm["text"],
               "--task-kind", "causal-lm", "--metric", "perplexity", "--max-length", "8",
               "--stride", "4", "--selection-split", "validation", "--report-split", "test",
               "--output", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["kind"] == "causal-lm"
    scores = [row["scores"]["validation"]["perplexity"] for row in results["ingredients"]]
    table = results["table"]
    assert table["best_individual"]["validation"]["perplexity"] == min(scores)
    assert table["greedy_soup"]["validation"]["perplexity"] <= min(scores)
    for row in ("uniform_soup", "ensemble", "greedy_ensemble"):
        assert table[row]["test"]["perplexity"] > 1
    assert [s["index"] for s in results["greedy"]["trace"]] == sorted(
        range(4), key=scores.__getitem__
    )
    card = (out / "README.md").read_text()
    assert "by `perplexity` (task kind `causal-lm`, lower is better)" in card
    assert "type: text-generation" in card


def test_a_learned_soup_trains_on_the_token_nll_via_the_cli(lm, cli, tmp_path):
    out = tmp_path / "learned"
    proc = cli("soup", *lm["repos"]["llama"][:3], "--method", "learned", "--dataset", lm["text"],
               "--task-kind", "causal-lm", "--max-length", "8", "--stride", "4",
               "--report-split", "test", "--learned-epochs", "1", "--output", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = json.loads((out / "results.json").read_text())["table"]
    assert table["learned_soup"]["validation"]["perplexity"] > 1


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--metric", "accuracy"], "scores one metric"),
        (["--input-column", "sentence"], "column 'sentence' not found"),
        (["--stride", "8"], "stride 8 must be shorter"),
    ],
)
def test_task_errors_are_one_line_exit_2(lm, cli, tmp_path, flags, words):
    proc = cli("soup", *lm["repos"]["gpt2"][:2], "--method", "greedy", "--dataset", lm["text"],
               "--task-kind", "causal-lm", "--max-length", "8", "--report-split", "test",
               *flags, "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "soup").exists()


def test_a_classification_model_is_refused_by_the_causal_lm_kind(tiny_greedy, lm, cli, tmp_path):
    proc = cli("soup", *tiny_greedy["repos"][:2], "--method", "greedy", "--dataset", lm["text"],
               "--task-kind", "causal-lm", "--report-split", "test", "--output", tmp_path / "s", "-q")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "scores language models" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_causal_lm_keys_are_refused_on_classification_tasks():
    with pytest.raises(TaskError, match="stride is a key of causal-lm tasks"):
        resolve_task({"dataset": "org/data", "stride": 4})


def test_the_causal_lm_scorer_implements_the_protocol(lm):
    from hfsoup.tasks.kinds import TaskScorer, get_kind

    assert get_kind("causal-lm") is KIND
    assert isinstance(
        KIND.prepare(text_task(lm), lm["repos"]["llama"][0], progress=False), TaskScorer
    )
