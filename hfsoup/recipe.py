"""Recipes: a soup described in YAML, holding the same things as the CLI flags.

Unknown keys are errors (``extra="forbid"``), reported with the key and its line in the file, so
a misspelt option never silently does nothing.

Recipes are read with bounded effort, whoever wrote them: a recipe file holds at most
:data:`MAX_RECIPE_BYTES` (a card at most :data:`MAX_CARD_BYTES`, its recipe block at most
:data:`MAX_RECIPE_BYTES`), is parsed once, and may not use YAML anchors or aliases (an alias
"bomb" expands exponentially once validated), nest deeper than :data:`MAX_DEPTH` levels, hold more
than :data:`MAX_NODES` values, or use keys that are not strings or appear twice.

A recipe read from a soup (:func:`load_recipe` on a model card or on the ``hfsoup_recipe.yaml``
written beside the weights) remembers where it came from (:attr:`Recipe.from_soup`) and chooses
neither the output folder nor a push target: the card's ``output.dir``, ``output.push_to`` and
``output.private`` are dropped when it is read (see :mod:`hfsoup.untrusted` for the rest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from hfsoup.errors import RecipeError
from hfsoup.ingredients import IngredientEntry

MAX_RECIPE_BYTES = 1 << 20
"""The largest recipe read: a YAML file, or the recipe block of a card (1 MiB)."""

MAX_CARD_BYTES = 16 << 20
"""The largest model card (README.md) a recipe is read from (16 MiB)."""

MAX_DEPTH = 32
"""How deeply a recipe's mappings and lists may nest."""

MAX_NODES = 20_000
"""How many YAML values (scalars, mappings, lists) a recipe may hold."""

SOUP_RECIPE_FILE = "hfsoup_recipe.yaml"
"""The pinned recipe every soup writes beside its weights (the same as its card's)."""

_BLOCK_OPENERS = ("```yaml hfsoup-recipe", "```yml hfsoup-recipe")
_STR_TAG = "tag:yaml.org,2002:str"

DType = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputConfig(_Strict):
    """Where and how the soup is written."""

    dir: str | None = None
    dtype: DType | None = None
    max_shard_size: str | int = "5GB"
    push_to: str | None = None
    private: bool = False
    # LoRA adapter ingredients: write the soup as one adapter (rank-``rank`` SVD of the
    # averaged ΔW; default rank: the largest of the adapters') instead of a full model.
    adapter: bool = False
    rank: int | None = Field(None, ge=1)


class LearnedConfig(_Strict):
    """How a learned soup learns its mixing weights α and temperature β (see hfsoup.methods.learned)."""

    by_layer: bool = False
    path: Literal["auto", "memory", "stream"] = "auto"
    epochs: int = Field(3, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(32, ge=1)
    param: Literal["softmax", "free"] = "softmax"


class Recipe(_Strict):
    """A whole soup: what goes in, how it is combined, scored and written."""

    name: str | None = None
    # Any name in the method registry (hfsoup.registry), checked when validated, so a
    # method registered at run time is a valid recipe ``method`` too.
    method: str = "uniform"
    accept: Literal[">=", ">"] = ">="
    order: Literal["score", "random"] = "score"
    seed: int = 0
    # Average ingredients whose weights hold NaN/Inf instead of refusing them.
    allow_nonfinite: bool = False
    ingredients: list[IngredientEntry] = Field(min_length=1)
    # Task-vector methods (hfsoup.methods.task_vectors): the base model theta_0 and the
    # coefficients; None: the method's default (the pinned recipe writes the ones used).
    base: IngredientEntry | None = None
    # "auto": chosen on the task's selection split from ``grid`` (hfsoup.methods.tv_search).
    lambda_: Annotated[float, Field(allow_inf_nan=False)] | Literal["auto"] | None = Field(
        None, alias="lambda"
    )
    density: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] | None = None
    alpha: Annotated[float, Field(allow_inf_nan=False)] | Literal["auto"] | None = None
    grid: dict[Literal["lambda", "density", "alpha"], list[float]] | None = None
    # Greedy soups (hfsoup.methods.greedy_combine): the operator the accepted set is merged
    # with; None: the plain average (the paper's Recipe 1).
    combine: Literal["average", "task_arithmetic", "ties", "dare_ties"] | None = None
    task: Any = None
    learned: LearnedConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)
    # Where a recipe read from a soup came from, and the output that soup's recipe named.
    _soup: str | None = PrivateAttr(None)
    _soup_output: OutputConfig | None = PrivateAttr(None)

    @property
    def from_soup(self) -> str | None:
        """The card or ``hfsoup_recipe.yaml`` this recipe was read from; None for others."""
        return self._soup

    @property
    def soup_output(self) -> OutputConfig | None:
        """What the soup's recipe named as output (not used: see :func:`load_recipe`)."""
        return self._soup_output

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        from hfsoup.registry import method_names

        names = method_names()
        if isinstance(value, str) and value in names:
            return value
        # Worded as pydantic words a Literal: "Input should be 'uniform', 'greedy' or 'learned'".
        quoted = [repr(n) for n in names]
        expected = " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": expected}
        )

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, value: Any) -> Any:
        if value is None:
            return None
        from hfsoup.tasks.task import resolve_task

        return resolve_task(value)

    @field_validator("ingredients", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [IngredientEntry.from_item(v) for v in value]

    @field_validator("base", mode="before")
    @classmethod
    def _base(cls, value: Any) -> Any:
        return IngredientEntry.from_item(value)

    def to_yaml(self) -> str:
        """The recipe as YAML, in the order a person would write it, defaults left out."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True, by_alias=True)
        data["method"] = self.method
        data["ingredients"] = [_compact(e) for e in data.get("ingredients", [])]
        if "base" in data:
            data["base"] = _compact(data["base"])
        keys = [f.alias or k for k, f in type(self).model_fields.items()]
        ordered = {k: data[k] for k in keys if k in data}
        return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


def _compact(entry: dict) -> str | dict:
    return entry["repo"] if set(entry) == {"repo"} else entry


def is_soup_recipe(source: str | Path) -> bool:
    """Whether ``source`` is a recipe written by a soup: a card (``*.md``) or its recipe file."""
    path = Path(source)
    return path.suffix.lower() == ".md" or path.name == SOUP_RECIPE_FILE


def load_recipe(source: str | Path) -> Recipe:
    """Read a recipe from a YAML file, or from the recipe block of a soup's model card.

    A recipe from a soup (a ``*.md`` card, or a file named ``hfsoup_recipe.yaml``) comes back
    without ``output.dir``, ``output.push_to`` and ``output.private`` (kept aside in
    :attr:`Recipe.soup_output`) and with :attr:`Recipe.from_soup` set: the caller chooses where
    the rebuilt soup goes, and whether it is pushed.

    Raises:
        RecipeError: unreadable or oversized file, invalid YAML (anchors, aliases, absurd
            nesting, keys that are not strings), an unknown key or a value of the wrong type
            (naming the key and its line).
    """
    path = Path(source)
    card = path.suffix.lower() == ".md"
    cap = MAX_CARD_BYTES if card else MAX_RECIPE_BYTES
    try:
        # A bounded read: a huge file, /dev/zero or a pipe is refused after cap + 1 bytes.
        with path.open("rb") as f:
            raw = f.read(cap + 1)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    if len(raw) > cap:
        raise RecipeError(f"recipe {path} is larger than {_mib(cap)}, the most hfsoup reads")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {exc.start})") from exc
    offset = 0
    if card:
        text, offset = _recipe_block(text, path)
    recipe = parse_recipe(text, where=str(path), line_offset=offset)
    if is_soup_recipe(path):
        given = recipe.output
        dropped = given.model_copy(update={"dir": None, "push_to": None, "private": False})
        update = {"output": dropped, "ingredients": _beside(recipe.ingredients, path)}
        if recipe.base is not None:
            update["base"] = _beside([recipe.base], path)[0]
        recipe = recipe.model_copy(update=update)
        recipe._soup, recipe._soup_output = str(path), given
    return recipe


def _beside(entries: list[IngredientEntry], source: Path) -> list[IngredientEntry]:
    """A soup's ingredients with relative local paths (``../ft-1``: how a soup names its local
    ingredients) taken relative to the soup's folder, not the working directory. They are still
    local folders, which a recipe from a soup may only read with ``allow_local``."""
    base = source.expanduser().resolve().parent
    found = []
    for entry in entries:
        if entry.repo.startswith(("./", "../")) or entry.repo in (".", ".."):
            entry = entry.model_copy(update={"repo": str((base / entry.repo).resolve())})
        found.append(entry)
    return found


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _recipe_block(card: str, path: Path) -> tuple[str, int]:
    """The first ```` ```yaml hfsoup-recipe ```` block of a card, and the line it starts after."""
    lines = card.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() in _BLOCK_OPENERS), None)
    if start is None:
        raise RecipeError(f"{path} holds no hfsoup recipe block")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("```")), None)
    if end is None:
        raise RecipeError(f"{path}:{start + 1}: the hfsoup recipe block is not closed (```)")
    block = "".join(lines[start + 1 : end])
    if len(block.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}:{start + 1}: the recipe block is larger than {_mib(MAX_RECIPE_BYTES)}, "
            "the most hfsoup reads"
        )
    return block, start + 1


try:  # libyaml's parser: fast, and not recursive
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml

    class _Parser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
        def __init__(self, text: str) -> None:
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


class _RecipeLoader(Composer, _Parser, SafeConstructor, Resolver):
    """PyYAML's safe loader with its composer in Python, so that every node passes a check.

    Events come from libyaml when it is there (fast, and not recursive); nodes are composed here,
    refusing anchors and aliases, nesting past :data:`MAX_DEPTH` and more than :data:`MAX_NODES`
    values before any of them is built (libyaml's own composer crashes on deep nesting).
    """

    def __init__(self, text: str) -> None:
        _Parser.__init__(self, text)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        Composer.__init__(self)
        self.depth = self.nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(line, "YAML anchors and aliases (&name, *name) are not allowed")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Refused(line, f"more than {MAX_NODES:,} values; a recipe is not that big")
        if self.depth >= MAX_DEPTH:
            raise _Refused(line, f"nested deeper than {MAX_DEPTH} levels")
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            _check_keys(node)
        return node


class _Refused(Exception):
    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line, self.problem = line, problem


def _check_keys(node: yaml.MappingNode) -> None:
    seen: set[str] = set()
    for key, _ in node.value:
        line = key.start_mark.line + 1
        if not isinstance(key, yaml.ScalarNode) or key.tag != _STR_TAG:
            shown = repr(key.value) if isinstance(key, yaml.ScalarNode) else f"(a {key.id})"
            raise _Refused(line, f"key {shown} is not a string")
        if key.value in seen:
            raise _Refused(line, f"key {key.value!r} appears twice")
        seen.add(key.value)


def load_bounded_yaml(text: str, *, where: str, line_offset: int = 0) -> tuple[Any, Any]:
    """YAML text parsed with a recipe's bounds: no anchors or aliases, bounded nesting and number
    of values, string keys given once (the same loader for recipes, task and search-space files).

    Returns:
        The data and its root node (for line numbers), ``(None, None)`` for an empty document.

    Raises:
        RecipeError: naming ``where`` and the line (shifted by ``line_offset``).
    """
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
        return (loader.construct_document(root) if root is not None else None), root
    except _Refused as exc:
        raise RecipeError(f"{where}:{exc.line + line_offset}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1 + line_offset}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}:{line} not valid YAML ({problem})") from None
    except (ValueError, OverflowError) as exc:  # a scalar YAML resolves but cannot build
        raise RecipeError(
            f"{where}: invalid YAML value ({' '.join(str(exc).split())[:80]})"
        ) from None
    finally:
        loader.dispose()


def parse_recipe(text: str, *, where: str = "<recipe>", line_offset: int = 0) -> Recipe:
    """Validate recipe YAML text; see :func:`load_recipe`.

    Args:
        text: the YAML (at most :data:`MAX_RECIPE_BYTES` in UTF-8).
        where: the file named in messages.
        line_offset: lines before ``text`` in that file (a card's recipe block).
    """
    if len(text) > MAX_RECIPE_BYTES or len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: a recipe is at most {_mib(MAX_RECIPE_BYTES)}")
    data, root = load_bounded_yaml(text, where=where, line_offset=line_offset)
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping (name, method, ingredients, ...)")
    return build_recipe(data, where=where, root=root, line_offset=line_offset)


def build_recipe(
    data: dict[str, Any], *, where: str = "options", root: Any = None, line_offset: int = 0
) -> Recipe:
    """Validate a recipe given as a mapping (``root``: its YAML node, for line numbers)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [p for p in err["loc"] if p not in ("str", "IngredientEntry")]
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        at = f"{where}:{line + line_offset}" if line else where
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
