"""GPU benchmark (issue 5): hfsoup's host->GPU streaming and scoring beside the hardware's limits.

Two comparisons, measured side by side in one run:

1. Uniform soup streamed onto the GPU (pinned read buffers, non-blocking copies, float32 sums
   on the GPU) in GB/s of ingredient bytes, against the device's measured host->device copy
   bandwidth from pinned memory (``copy_(non_blocking=True)`` of one large pinned tensor). The
   ingredients sit in local folders that were just written, so they come from the page cache:
   what is measured is the host->GPU path, not a disk or a network.
2. Scoring throughput (examples/s) of hfsoup's live model (``SoupSession`` + ``Scorer``, the
   path every greedy decision takes) against plain ``transformers`` inference on the same
   tokenized batches at the same batch size, in float32 and bfloat16.

    python benchmarks/bench_gpu.py --k 4 --layers 12 --hidden 768 --examples 4096 --batch-size 128

``--device cpu --layers 2 --hidden 128 --examples 256`` runs the same code on a machine without a
GPU (a smoke test: the figures then say nothing about GPUs). Prints a Markdown table and, with
``--json FILE``, writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDS = [f"w{i}" for i in range(500)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """GB/s of one pinned host tensor copied to ``device`` (median of ``repeats``)."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


def make_ingredients(root: Path, k: int, layers: int, hidden: int) -> list[Path]:
    """``k`` BERT classifiers (one init plus seeded noise), float32, with a word tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    config = BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, num_labels=2,
    )  # fmt: skip
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    folders = []
    for i in range(k):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        folder = root / f"ingredient-{i}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def make_task(root: Path, examples: int, batch_size: int) -> dict:
    """A local two-split text dataset of random word sequences, as a task mapping."""
    rng = random.Random(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "test"):
        with open(data / f"{split}.csv", "w") as f:
            f.write("text,label\n")
            for _ in range(examples):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                f.write(f"{words},{rng.randint(0, 1)}\n")
    return {"dataset": str(data), "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["text"], "label_column": "label", "metrics": ["accuracy"],
            "batch_size": batch_size, "max_length": 128}  # fmt: skip


def stream_rate(folders: list[Path], device: torch.device, repeats: int) -> tuple[float, int]:
    """GB/s of ingredient bytes through hfsoup's uniform soup onto ``device`` (median)."""
    from hfsoup.api import load_ingredients
    from hfsoup.compute.combine import fetch_plan_bytes, normalise_weights, stream_average
    from hfsoup.compute.placement import Placement
    from hfsoup.io.tensors import plan_shards

    indexes = load_ingredients([str(f) for f in folders])
    shards = plan_shards(indexes[0], max_shard_size=5 * 2**30)
    weights = normalise_weights(len(indexes), None)
    nbytes = fetch_plan_bytes(indexes, shards)
    placement = Placement.single(device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        # on_shard drops the shard: the write to disk is not what is measured here.
        stream_average(indexes, weights, shards, on_shard=lambda i, t: None, placement=placement)
        sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9, nbytes


def scoring_rates(folders, task, device, dtype, repeats) -> tuple[float, float]:
    """Examples/s: hfsoup's live model and scorer vs plain transformers, same batches."""
    from transformers import AutoModelForSequenceClassification

    from hfsoup.api import load_ingredients
    from hfsoup.compute.placement import Placement
    from hfsoup.methods.greedy import SoupSession
    from hfsoup.methods.greedy_run import make_scorer
    from hfsoup.tasks.task import resolve_task

    indexes = load_ingredients([str(f) for f in folders[:1]])
    scorer = make_scorer(resolve_task(task), indexes[0], progress=False)
    split = scorer.split("validation")
    session = SoupSession(indexes, placement=Placement.single(device, dtype))
    session.show(0)
    plain = AutoModelForSequenceClassification.from_pretrained(folders[0], dtype=dtype)
    plain = plain.to(device).eval()

    def hfsoup_pass():
        scorer.logits(session.model, "validation")

    @torch.inference_mode()
    def plain_pass():
        for batch in split.batches:
            plain(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()

    rates = []
    for fn in (hfsoup_pass, plain_pass):
        times = []
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        rates.append(split.size / statistics.median(times[1:]))
    return rates[0], rates[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--k", type=int, default=4, help="ingredients")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--examples", type=int, default=4096, help="examples per split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth probe")
    p.add_argument("--workdir", help="where ingredients go (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    root = Path(args.workdir or tempfile.mkdtemp(prefix="hfsoup-bench-gpu-"))
    folders = make_ingredients(root, args.k, args.layers, args.hidden)
    task = make_task(root, args.examples, args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    h2d = h2d_bandwidth(device, args.copy_mb * 2**20, args.repeats)
    soup_rate, nbytes = stream_rate(folders, device, args.repeats)
    figures = {"device": name, "k": args.k, "ingredient_bytes_total": nbytes,
               "h2d_pinned_GBps": h2d, "uniform_soup_GBps": soup_rate, "scoring": {}}  # fmt: skip
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ours, plain = scoring_rates(folders, task, device, dtype, args.repeats)
        figures["scoring"][label] = {
            "hfsoup_examples_per_s": ours,
            "transformers_examples_per_s": plain,
        }

    print(f"\n{name}; {args.k} ingredients of {nbytes / args.k / 1e6:.0f} MB; "
          f"{args.examples} examples, batch {args.batch_size}; median of {args.repeats}\n")  # fmt: skip
    print("| measure | hfsoup | reference | ratio |\n|---|---|---|---|")
    print(f"| uniform soup host->GPU (GB/s) vs pinned copy | {soup_rate:.2f} | {h2d:.2f} | "
          f"{soup_rate / h2d:.2f} |")  # fmt: skip
    for label, row in figures["scoring"].items():
        ours, plain = row["hfsoup_examples_per_s"], row["transformers_examples_per_s"]
        print(f"| scoring {label} (examples/s) vs plain transformers | {ours:.0f} | {plain:.0f} | "
              f"{ours / plain:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
