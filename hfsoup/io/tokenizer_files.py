"""An ingredient's tokenizer read from its files as data, and compared across ingredients.

A soup averages the embedding matrix row by row, so every ingredient must give every token the
same id: a token added to one fine-tune, or two vocab entries swapped, would average the rows of
different tokens. The vocab and added tokens are read from ``tokenizer.json``, ``vocab.json``
or ``vocab.txt``, ``added_tokens.json`` and ``tokenizer_config.json`` as JSON or text (no
tokenizer class is built, no repo code runs). What does not change an id (special-token roles,
``model_max_length``, a chat template, other tokenizer settings) is only reported: the soup
keeps the first ingredient's files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hfsoup.errors import CorruptWeightsError, TokenizerMismatchError
from hfsoup.io.hub import Ingredient

# Read as JSON or text; sentencepiece models are binary and only compared by content.
JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
)
TEXT_FILES = ("vocab.txt", "chat_template.jinja")
BINARY_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
TOKENIZER_FILES = JSON_FILES + TEXT_FILES + ("merges.txt",) + BINARY_FILES
SPECIAL_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# tokenizer_config.json entries shown elsewhere, or that say nothing about tokenisation.
_NOT_SETTINGS = {
    *SPECIAL_ROLES,
    "added_tokens_decoder",
    "additional_special_tokens",
    "extra_special_tokens",
    "chat_template",
    "model_max_length",
    "auto_map",
    "name_or_path",
    "_name_or_path",
    "tokenizer_file",
    "backend",
}
MAX_TEXT_BYTES = 64 * 2**20
SHOWN = 5  # differing tokens named in a message


@dataclass
class TokenizerInfo:
    """What an ingredient's tokenizer files say, read as data.

    Attributes:
        files: the tokenizer files the ingredient has.
        ids: token -> id, added tokens included; ``None`` when no file gives a vocab as data.
        vocab_from: the file the vocab came from.
        added: added tokens (content -> id).
        special: special-token role -> token (``additional_special_tokens`` as a list).
        chat_template: the chat template's text, if any.
        model_max_length: from tokenizer_config.json.
        settings: the other scalar entries of tokenizer_config.json (``do_lower_case``, ...).
        digests: sha256 of the binary (sentencepiece) model files.
    """

    files: list[str] = field(default_factory=list)
    ids: dict[str, int] | None = None
    vocab_from: str | None = None
    added: dict[str, int] = field(default_factory=dict)
    special: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    model_max_length: Any = None
    settings: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int | None:
        """The number of ids (the largest id + 1), as the embedding matrix must have rows."""
        return max(self.ids.values(), default=-1) + 1 if self.ids else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "vocab_size": self.vocab_size,
            "vocab_from": self.vocab_from,
            "added_tokens": dict(sorted(self.added.items(), key=lambda kv: kv[1])),
            "special_tokens": self.special,
            "chat_template": self.chat_template is not None,
            "model_max_length": self.model_max_length,
            "settings": self.settings,
        }


def read_tokenizer(ingredient: Ingredient) -> TokenizerInfo:
    """Read ``ingredient``'s tokenizer files (small files, downloaded whole and verified).

    Raises:
        CorruptWeightsError: a tokenizer file is not valid JSON / UTF-8, or its vocab is not a
            map from tokens to integer ids; the message names the file.
        IngredientNotFoundError: a local file points outside its folder.
    """
    present = [f for f in TOKENIZER_FILES if f in ingredient.files]
    info = TokenizerInfo(files=present)
    data = {f: ingredient.source.read_json(f) for f in JSON_FILES if f in present}
    text = {f: _read_text(ingredient, f) for f in TEXT_FILES if f in present}
    for f in BINARY_FILES:
        if f in present:
            info.digests[f] = _sha256(ingredient, f)
    where = ingredient.source.where
    if "tokenizer.json" in data:
        info.ids, info.vocab_from = _model_vocab(data["tokenizer.json"], where("tokenizer.json"))
        for tok in _list(data["tokenizer.json"].get("added_tokens")):
            if isinstance(tok, dict) and _is_token(tok.get("content"), tok.get("id")):
                info.added[tok["content"]] = tok["id"]
    elif "vocab.json" in data:
        info.ids, info.vocab_from = (
            _token_map(data["vocab.json"], where("vocab.json")),
            "vocab.json",
        )
    elif "vocab.txt" in text:
        # One token a line, its id the line number (as transformers' load_vocab reads it).
        lines = text["vocab.txt"].split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        info.ids, info.vocab_from = {t: i for i, t in enumerate(lines)}, "vocab.txt"
    config = data.get("tokenizer_config.json", {})
    decoder = config.get("added_tokens_decoder")
    for key, tok in decoder.items() if isinstance(decoder, dict) else ():
        if isinstance(tok, dict) and str(key).isdigit() and isinstance(tok.get("content"), str):
            info.added.setdefault(tok["content"], int(key))
    extra = data.get("added_tokens.json", {})
    info.added.update(_token_map(extra, where("added_tokens.json")) if extra else {})
    if info.ids is not None:
        info.ids = {**info.ids, **info.added}
    for source in (data.get("special_tokens_map.json", {}), config):
        for role in (*SPECIAL_ROLES, "additional_special_tokens"):
            value = _content(source.get(role))
            if value is not None:
                info.special[role] = value
    template = config.get("chat_template")
    template = data.get("chat_template.json", {}).get("chat_template", template)
    template = text.get("chat_template.jinja", template)
    info.chat_template = None if template is None else str(template)
    info.model_max_length = config.get("model_max_length")
    info.settings = {
        k: v
        for k, v in sorted(config.items())
        if k not in _NOT_SETTINGS and isinstance(v, (str, int, float, bool))
    }
    return info


def read_tokenizers(ingredients: Sequence[Ingredient]) -> list[TokenizerInfo]:
    """:func:`read_tokenizer` for each ingredient, concurrently (a few small files each)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(ingredients)))) as pool:
        return list(pool.map(read_tokenizer, ingredients))


@dataclass
class TokenizerDiff:
    """How one ingredient's tokenizer differs from the first's.

    ``changed`` names the tokens whose id differs (``'x' (id 5 vs 7)``), in id order: any makes
    a soup wrong. ``warnings`` and ``notes`` do not change ids.
    """

    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def id_problem(self, who: str) -> str | None:
        """The one-line refusal for a soup, or ``None`` when every id agrees."""
        if not self.changed:
            return None
        shown = ", ".join(self.changed[:SHOWN])
        more = f" and {len(self.changed) - SHOWN} more" if len(self.changed) > SHOWN else ""
        return (
            f"{who}: the tokenizers give {len(self.changed)} token(s) different ids, and a soup "
            f"averages embedding rows by id: {shown}{more}"
        )


def compare(first: TokenizerInfo, other: TokenizerInfo) -> TokenizerDiff:
    """What differs between ``other``'s tokenizer and ``first``'s (ids, then the rest)."""
    diff = TokenizerDiff()
    if first.ids is not None and other.ids is not None:
        a, b = first.ids, other.ids
        tokens = [t for t in a.keys() | b.keys() if a.get(t) != b.get(t)]
        tokens.sort(key=lambda t: (min(x for x in (a.get(t), b.get(t)) if x is not None), t))
        diff.changed = [f"{t!r} (id {_id(b.get(t))} vs {_id(a.get(t))})"[:120] for t in tokens]
    elif bool(first.files) != bool(other.files):
        has, lacks = ("the first", "this one") if first.files else ("this one", "the first")
        diff.warnings.append(
            f"{has} has tokenizer files and {lacks} has none: not compared; the soup keeps "
            "the first's"
        )
    elif first.files:
        shared = sorted(first.digests.keys() & other.digests.keys())
        for name in shared:
            if first.digests[name] != other.digests[name]:
                diff.warnings.append(
                    f"{name} differs (a binary sentencepiece model, compared by content only): "
                    "check that the vocabularies agree"
                )
        if not shared:
            diff.warnings.append("no vocab of both is readable as data: ids not compared")
    roles = sorted(
        r
        for r in first.special.keys() | other.special.keys()
        if first.special.get(r) != other.special.get(r)
    )
    if roles:
        shown = ", ".join(
            f"{r} {_brief(other.special.get(r))} vs {_brief(first.special.get(r))}" for r in roles
        )
        diff.warnings.append(f"special tokens differ: {shown}; the soup keeps the first's")
    if first.model_max_length != other.model_max_length:
        diff.notes.append(
            f"model_max_length {_brief(other.model_max_length)} vs "
            f"{_brief(first.model_max_length)}; the soup keeps the first's"
        )
    if first.chat_template != other.chat_template:
        state = "differs" if first.chat_template and other.chat_template else "is in one only"
        diff.notes.append(f"the chat template {state}; the soup keeps the first's")
    keys = sorted(
        k
        for k in first.settings.keys() | other.settings.keys()
        if first.settings.get(k) != other.settings.get(k)
    )
    if keys:
        shown = ", ".join(
            f"{k} {_brief(other.settings.get(k))} vs {_brief(first.settings.get(k))}" for k in keys
        )
        diff.notes.append(f"tokenizer settings differ: {shown}; the soup keeps the first's")
    return diff


def check_tokenizers(ingredients: Sequence[Ingredient]) -> list[str]:
    """Refuse ingredients whose tokenizers give tokens different ids; return the other
    differences as lines to show (warnings first).

    Raises:
        TokenizerMismatchError: naming the ingredients, the first differing tokens and how many.
    """
    if len(ingredients) < 2:
        return []
    infos = read_tokenizers(ingredients)
    lines: list[str] = []
    for ingredient, info in zip(ingredients[1:], infos[1:], strict=True):
        who = f"{ingredient.label} differs from {ingredients[0].label}"
        diff = compare(infos[0], info)
        problem = diff.id_problem(who)
        if problem:
            raise TokenizerMismatchError(problem)
        lines += [f"{who}: tokenizer: {m}" for m in diff.warnings + diff.notes]
    return lines


def _model_vocab(data: dict, where: str) -> tuple[dict[str, int] | None, str | None]:
    """The vocab of a tokenizer.json model: a map (WordPiece, BPE, WordLevel) or, for Unigram,
    a list of ``[piece, score]`` whose ids are the positions."""
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if vocab is None:
        return None, None
    if isinstance(vocab, list):
        pieces = [p[0] if isinstance(p, list) and p else p for p in vocab]
        if not all(isinstance(p, str) for p in pieces):
            raise CorruptWeightsError(f"{where}: model.vocab must list [token, score] pairs")
        return {p: i for i, p in enumerate(pieces)}, "tokenizer.json"
    return _token_map(vocab, f"{where}: model.vocab"), "tokenizer.json"


def _token_map(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(_is_token(k, v) for k, v in value.items()):
        raise CorruptWeightsError(f"{where}: must map tokens to integer ids")
    return dict(value)


def _is_token(content: Any, token_id: Any) -> bool:
    return isinstance(content, str) and isinstance(token_id, int) and not isinstance(token_id, bool)


def _content(value: Any) -> Any:
    """A special token as transformers writes it: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_content(v) for v in value]
    return value if isinstance(value, str) else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _id(value: int | None) -> str:
    return "absent" if value is None else str(value)


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_text(ingredient: Ingredient, filename: str) -> str:
    where = ingredient.source.where(filename)
    size = ingredient.files.get(filename)
    limit = f"more than the {MAX_TEXT_BYTES // 2**20} MiB hfsoup reads for a tokenizer file"
    if size is not None and size > MAX_TEXT_BYTES:
        raise CorruptWeightsError(f"{where}: {size} bytes, {limit}")
    with open(ingredient.source.local_file(filename), "rb") as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise CorruptWeightsError(f"{where}: {limit}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptWeightsError(f"{where}: not UTF-8 text (invalid byte at {exc.start})") from exc


def _sha256(ingredient: Ingredient, filename: str) -> str:
    h = hashlib.sha256()
    with open(ingredient.source.local_file(filename), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["TokenizerDiff", "TokenizerInfo", "check_tokenizers", "compare", "read_tokenizer"]
