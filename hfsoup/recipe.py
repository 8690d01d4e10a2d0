"""Recipes: a soup described in YAML, holding the same things as the CLI flags.

Unknown keys are errors (``extra="forbid"``), reported with the key and its line in the file, so
a misspelt option never silently does nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hfsoup.errors import RecipeError

Method = Literal["uniform", "greedy", "learned"]
DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngredientEntry(_Strict):
    """One ingredient: a repo ID (or local directory), an optional revision and weight."""

    repo: str
    revision: str | None = None
    weight: float | None = None

    @property
    def text(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


class OutputConfig(_Strict):
    """Where and how the soup is written."""

    dir: str | None = None
    dtype: DType | None = None
    max_shard_size: str | int = "5GB"
    push_to: str | None = None
    private: bool = False


class LearnedConfig(_Strict):
    """How a learned soup learns its mixing weights α and temperature β (see hfsoup.learned)."""

    by_layer: bool = False
    path: Literal["auto", "memory", "stream"] = "auto"
    epochs: int = Field(3, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(32, ge=1)
    param: Literal["softmax", "free"] = "softmax"


class Recipe(_Strict):
    """A whole soup: what goes in, how it is combined, scored and written."""

    name: str | None = None
    method: Method = "uniform"
    accept: Literal[">=", ">"] = ">="
    order: Literal["score", "random"] = "score"
    seed: int = 0
    # Average ingredients whose weights hold NaN/Inf instead of refusing them.
    allow_nonfinite: bool = False
    ingredients: list[IngredientEntry] = Field(min_length=1)
    task: Any = None
    learned: LearnedConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, value: Any) -> Any:
        if value is None:
            return None
        from hfsoup.evaluation.task import resolve_task

        return resolve_task(value)

    @field_validator("ingredients", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [_entry(v) for v in value]

    def to_yaml(self) -> str:
        """The recipe as YAML, in the order a person would write it, defaults left out."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True, by_alias=True)
        data["method"] = self.method
        data["ingredients"] = [_compact(e) for e in data.get("ingredients", [])]
        ordered = {k: data[k] for k in type(self).model_fields if k in data}
        return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


def _entry(value: Any) -> Any:
    if isinstance(value, str):
        repo, _, revision = value.partition("@")
        return {"repo": repo, "revision": revision or None}
    return value


def _compact(entry: dict) -> str | dict:
    return entry["repo"] if set(entry) == {"repo"} else entry


def load_recipe(source: str | Path) -> Recipe:
    """Read a recipe from a YAML file, or from the recipe block of a soup's model card.

    Raises:
        RecipeError: unreadable file, invalid YAML, an unknown key or a value of the wrong type
            (naming the key and its line).
    """
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".md":
        text = _recipe_block(text, path)
    return parse_recipe(text, where=str(path))


def _recipe_block(card: str, path: Path) -> str:
    match = re.search(r"^```ya?ml hfsoup-recipe\n(.*?)^```", card, re.S | re.M)
    if not match:
        raise RecipeError(f"{path} holds no hfsoup recipe block")
    return match.group(1)


def parse_recipe(text: str, *, where: str = "<recipe>") -> Recipe:
    """Validate recipe YAML text; see :func:`load_recipe`."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}:{line} invalid YAML") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping (name, method, ingredients, ...)")
    return build_recipe(data, where=where, root=root)


def build_recipe(data: dict[str, Any], *, where: str = "options", root: Any = None) -> Recipe:
    """Validate a recipe given as a mapping (``root``: its YAML node, for line numbers)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if p not in ("str", "IngredientEntry")]
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        at = f"{where}:{line}" if line else where
        if err["type"] == "extra_forbidden":
            raise RecipeError(f"{at}: unknown key {key!r}") from exc
        raise RecipeError(f"{at}: {key}: {err['msg']}") from exc


def _line_of(node: Any, loc: list) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
