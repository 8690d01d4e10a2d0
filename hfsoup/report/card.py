"""The soup's model card: Hub metadata, the ingredients pinned to SHAs, and the recipe.

Rendering is pure: everything the card says is passed in, so it makes no network call and the
same inputs always give the same card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from hfsoup.recipe import Recipe
from hfsoup.registry import get_method

_PIPELINES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),  # GPT2LMHeadModel and its kin
    ("ForMaskedLM", "fill-mask"),
    ("ForConditionalGeneration", "text2text-generation"),
)


@dataclass
class CardRow:
    """One ingredient as the card lists it."""

    repo: str
    revision: str | None
    sha: str | None
    weight: float
    extra: dict[str, Any] = field(default_factory=dict)
    # A local folder, not a Hub repo: marked as such in the table, never in base_model.
    local: bool = False
    # A candidate the method left out (weight 0, e.g. greedy): in the table, marked, never in
    # base_model.
    rejected: bool = False


@dataclass
class CardInfo:
    """Everything a card says."""

    recipe: Recipe
    rows: list[CardRow]
    config: dict[str, Any]
    licenses: list[str | None]
    sections: list[str] = field(default_factory=list)
    model_index: list[dict[str, Any]] | None = None
    hfsoup_version: str = ""


def pipeline_tag(config: dict[str, Any]) -> str | None:
    """The Hub pipeline tag implied by the config's architecture, if one is obvious."""
    for arch in config.get("architectures") or []:
        for suffix, tag in _PIPELINES:
            if arch.endswith(suffix):
                return tag
    return None


def base_models(rows: list[CardRow]) -> list[str]:
    """The Hub models the soup is made of: ingredients with a weight, read from a Hub commit.

    Candidates a greedy soup rejected contributed nothing, and local folders have no Hub ID:
    neither is a parent in the Hub's model tree.
    """
    return [r.repo for r in rows if r.sha and not r.local and not r.rejected and r.weight != 0]


def card_metadata(info: CardInfo) -> dict[str, Any]:
    """The YAML front matter: valid Hub metadata for a merge of the ingredients.

    Built with huggingface_hub's ``ModelCardData``. ``base_model`` (and ``base_model_relation``)
    are left out when no ingredient of the soup is a Hub model: an empty list would claim a
    merge of nothing.
    """
    from huggingface_hub import ModelCardData

    parents = base_models(info.rows)
    # An ingredient's card is untrusted: only a plain string is taken as its license.
    licenses = [x if isinstance(x, str) else None for x in info.licenses]
    data = ModelCardData(
        base_model=parents or None,
        library_name="transformers",
        license=licenses[0] if licenses and licenses[0] and len(set(licenses)) == 1 else None,
        pipeline_tag=pipeline_tag(info.config),
        tags=["hfsoup", "model-soup", "merge", f"{info.recipe.method}-soup"],
        base_model_relation="merge" if parents else None,
        # In the Hub's format already (hfsoup.report.summary.model_index); parsed and checked again.
        **({"model-index": info.model_index} if info.model_index else {}),
    )
    return data.to_dict()


def render_card(info: CardInfo) -> str:
    """The whole README.md of a soup."""
    recipe = info.recipe
    title = recipe.name or "Model soup"
    lines = [
        "---",
        yaml.safe_dump(card_metadata(info), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        "This model is a *model soup* (Wortsman et al., ICML 2022): its weights are an average of "
        "several fine-tunes of one pretrained model, so it runs at the cost of one model. "
        "It was made with [hfsoup](https://pypi.org/project/hfsoup/) from the ingredients below, "
        "each pinned to the commit that was read.",
        "",
        f"**Method:** {get_method(recipe.method).card_text}.",
        "",
        "## Ingredients",
        "",
        _table(info.rows, recipe.method),
        "",
    ]
    lines += [s.rstrip() + "\n" for s in info.sections]
    lines += [
        "## Recipe",
        "",
        "Rebuild this soup with `hfsoup run README.md --output DIR` (the revisions are pinned SHAs):",
        "",
        "```yaml hfsoup-recipe",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    if info.hfsoup_version:
        lines += [f"<sub>Made with hfsoup {info.hfsoup_version}.</sub>", ""]
    return "\n".join(lines)


def _table(rows: list[CardRow], method: str) -> str:
    extra_keys = sorted({k for r in rows for k in r.extra})
    head = ["#", "repo", "requested revision", "commit SHA", "weight", *extra_keys]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        sha = "local folder, not on the Hub" if r.local or not r.sha else f"`{r.sha}`"
        weight = f"{r.weight:.4g}" + (f" (rejected by {method})" if r.rejected else "")
        cells = [str(i), f"`{r.repo}`", f"`{r.revision}`" if r.revision else "(default)",
                 sha, weight,
                 *(_cell(r.extra.get(k)) for k in extra_keys)]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
