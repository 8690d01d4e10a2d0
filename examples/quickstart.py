"""Offline quickstart: publish three ingredients to a local Hub, soup them by repo ID, push.

The ingredients are one tiny BERT init plus three distinct seeded perturbations (stand-ins for
fine-tunes, so this runs in seconds); everything else is real: the local Hub speaks the Hub's
HTTP protocol, and huggingface_hub / transformers talk to it unmodified.

    python examples/quickstart.py [--workdir quickstart-out]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="quickstart-out")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from hfsoup.serve.hubserver import LocalHub

    hub = LocalHub(tempfile.mkdtemp(prefix="hfsoup-hub-")).start()
    # The Hub clients read these at import time: set them before importing hfsoup's API.
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=hub.token)
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForSequenceClassification, BertConfig

    import hfsoup

    api = HfApi()
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)  # fmt: skip
    repos = []
    for i in range(3):
        torch.manual_seed(0)  # one shared init ...
        model = AutoModelForSequenceClassification.from_config(config)
        with torch.no_grad():  # ... plus a distinct perturbation per "fine-tune"
            gen = torch.Generator().manual_seed(i + 1)
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        repo = f"demo-org/tiny-ft-{i + 1}"
        api.create_repo(repo, exist_ok=True)
        model.push_to_hub(repo)
        repos.append(repo)

    print(hfsoup.inspect(repos).to_dict()["compatible"] and "ingredients are compatible")
    result = hfsoup.soup(repos, output=work / "soup", overwrite=True, push_to="demo-org/tiny-soup")
    print(f"soup written to {result.output} and pushed: {result.url}")
    print((result.output / "README.md").read_text())
    hub.stop()


if __name__ == "__main__":
    main()
