"""Tiny models for tests: a shared init plus distinct perturbations, like real fine-tunes."""

from __future__ import annotations

from pathlib import Path

import torch

LABELS = {0: "negative", 1: "positive"}


def tiny_bert_config(num_labels: int = 2, **overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        id2label={i: LABELS.get(i, f"L{i}") for i in range(num_labels)},
        label2id={LABELS.get(i, f"L{i}"): i for i in range(num_labels)},
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_vit_config(num_labels: int = 3, **overrides):
    from transformers import ViTConfig

    kwargs = dict(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={i: f"class{i}" for i in range(num_labels)},
        label2id={f"class{i}": i for i in range(num_labels)},
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def make_model(config, seed: int = 0):
    """The shared 'pretrained' init: same seed -> same weights."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if config.model_type == "vit":
        return AutoModelForImageClassification.from_config(config)
    return AutoModelForSequenceClassification.from_config(config)


def perturbed(model, seed: int, scale: float = 0.05):
    """A 'fine-tune': the shared init plus seeded noise on every float parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def save_ingredient(
    path: Path, config, *, seed: int, base_seed: int = 0, max_shard_size: str | int = "5GB"
) -> Path:
    """Save base(base_seed) + noise(seed) to ``path`` with a tokenizer-free layout."""
    model = perturbed(make_model(config, base_seed), seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved (possibly sharded) safetensors checkpoint, fully loaded."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out
