"""Tokenizers from Hugging Face directories and GGUF metadata, and UTF-8-safe streaming decode.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` with what generation
needs: BOS handling, the stop token ids (EOS plus the end-of-turn marker of
the chat template), and the chat template (:mod:`inference.chat`).

- :func:`tokenizer_from_hf_dir` reads ``tokenizer.json`` plus
  ``tokenizer_config.json`` / ``config.json`` / ``generation_config.json``;
- :func:`tokenizer_from_gguf` rebuilds a byte-level BPE (``tokenizer.ggml.model
  == "gpt2"``) from the vocabulary, merges and token types in the metadata,
  with the pre-tokenizer named by ``tokenizer.ggml.pre``.

:class:`Detokenizer` turns a growing list of ids into text deltas that never
split a UTF-8 character: a token that ends mid-character yields "" until the
character completes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from overlay.errors import ModelLoadError

from .chat import ChatTemplate, Segment, parse_template

__all__ = ["Detokenizer", "Tokenizer", "tokenizer_from_gguf", "tokenizer_from_hf_dir"]

log = logging.getLogger(__name__)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
_GPT2 = frozenset({"gpt2", "default", "mpt", "olmo", "jais", "trillion"})
_LLAMA3 = frozenset({"llama-bpe", "llama3", "smaug-bpe", "dbrx"})
_QWEN2 = frozenset({"qwen2", "stablelm2", "deepseek-r1-qwen"})
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: ChatTemplate | None,
        source: str,
    ) -> None:
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        stops = list(dict.fromkeys(eos_token_ids))
        if chat_template is not None:
            for marker in chat_template.stop_markers:
                tid = tok.token_to_id(marker)
                if tid is not None and tid not in stops:
                    stops.append(tid)
        self.eos_token_ids = tuple(stops)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.source = source

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS); ``special=False`` treats special-token strings as text."""
        self.tok.encode_special_tokens = not special
        try:
            return list(self.tok.encode(text, add_special_tokens=False).ids)
        finally:
            self.tok.encode_special_tokens = False

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: BOS (when the model wants one) + the text, specials parsed."""
        ids = self.encode(text, special=True)
        return [self.bos_token_id, *ids] if self.add_bos and self.bos_token_id is not None else ids

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """A chat prompt rendered through the model's template, ending with the assistant turn."""
        if self.chat_template is None:
            raise ValueError("this model has no supported chat template; send a raw prompt")
        ids: list[int] = []
        segments: list[Segment] = self.chat_template.render(messages)
        for seg in segments:
            ids.extend(self.encode(seg.text, special=seg.special))
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))


class Detokenizer:
    """Incremental, UTF-8-safe decoding of generated ids (one per request)."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        """``context``: ids whose text the reader already has (a resumed generation)."""
        self._tok = tokenizer
        self._ids: list[int] = list(context[-8:])
        self._prefix = 0  # ids before this index were fully emitted
        self._read = len(self._ids)  # ids before this index are covered by emitted text

    def add(self, token_id: int) -> str:
        """Append one id; the newly completed text (may be "")."""
        self._ids.append(token_id)
        done = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(done) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character decodes as U+FFFD)."""
        done = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(done) :]


# --------------------------------------------------------------------------- loaders


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(v: object) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _ids(v: object) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def tokenizer_from_hf_dir(model_dir: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (``tokenizer.json`` is required)."""
    path = model_dir / "tokenizer.json"
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing (a model directory needs tokenizer.json)") from None
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelLoadError(f"{path}: cannot parse tokenizer: {e}") from e
    tcfg = _read_json(model_dir / "tokenizer_config.json")
    cfg = _read_json(model_dir / "config.json")
    gen = _read_json(model_dir / "generation_config.json")

    def tid(key: str) -> int | None:
        content = _token_content(tcfg.get(key))
        return None if content is None else tok.token_to_id(content)

    eos = _ids(gen.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    eos_from_tok = tid("eos_token")
    if eos_from_tok is not None and eos_from_tok not in eos:
        eos.append(eos_from_tok)
    bos = tid("bos_token")
    if bos is None:
        bos_ids = _ids(cfg.get("bos_token_id"))
        bos = bos_ids[0] if bos_ids else None
    template_src = tcfg.get("chat_template")
    if not isinstance(template_src, str):
        jinja = model_dir / "chat_template.jinja"
        template_src = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    template = parse_template(template_src)
    if template_src and template is None:
        log.warning("chat template of %s not recognized; chat requests will be refused", model_dir)
    return Tokenizer(
        tok,
        bos_token_id=bos,
        eos_token_ids=eos,
        add_bos=bool(tcfg.get("add_bos_token", False)),
        chat_template=template,
        source=str(path),
    )


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {**dict.fromkeys(_LLAMA3, _LLAMA3_SPLIT), **dict.fromkeys(_QWEN2, _QWEN2_SPLIT)}.get(pre)
    if split is None:
        log.warning("unknown GGUF pre-tokenizer %r; using the GPT-2 split", pre)
        split = _GPT2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_from_gguf(meta: dict[str, object], source: str) -> Tokenizer:
    """Rebuild the tokenizer stored in GGUF metadata (byte-level BPE only)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{source}: tokenizer model {kind!r} not supported (only byte-level BPE 'gpt2')")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list) or not tokens:
        raise ModelLoadError(f"{source}: GGUF tokenizer vocabulary or merges missing")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for m in merges:
        a, sep, b = str(m).partition(" ")
        if not sep:
            raise ModelLoadError(f"{source}: malformed GGUF merge {m!r}")
        pairs.append((a, b))
    try:
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:
        raise ModelLoadError(f"{source}: cannot build the tokenizer: {e}") from e
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "gpt2")))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(list(types))  # type: ignore[call-overload]
            if int(t) in (_CONTROL, _USER_DEFINED) and i < len(tokens)
        ]
        tok.add_special_tokens(special)

    def meta_id(key: str) -> int | None:
        v = meta.get(key)
        return v if isinstance(v, int) and 0 <= v < len(tokens) else None

    eos = meta_id("tokenizer.ggml.eos_token_id")
    eot = meta_id("tokenizer.ggml.eot_token_id")
    template_src = meta.get("tokenizer.chat_template")
    template = parse_template(template_src if isinstance(template_src, str) else None)
    return Tokenizer(
        tok,
        bos_token_id=meta_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[i for i in (eos, eot) if i is not None],
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=template,
        source=source,
    )
