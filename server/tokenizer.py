"""Tokenizer, chat templates and streaming detokenization, on `tokenizers` + `jinja2` only.

A Hugging Face checkpoint's `tokenizer.json` already describes the whole pipeline (normalizer,
pre-tokenizer, model, post-processor, decoder), so loading it into `tokenizers` reproduces
`transformers.AutoTokenizer` without importing transformers. What transformers adds on top (special tokens
from `tokenizer_config.json`, chat templates rendered in a jinja2 sandbox) is re-implemented here, and
tests/test_tokenizer.py holds it to transformers' output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cache, cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "build_byte_tokenizer"]


class ChatTemplateError(ValueError):
    """The chat could not be rendered; the message is meant for the client (HTTP 400)."""


# --------------------------------------------------------------------------------------------------
# Chat templates


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own `tojson` HTML-escapes <, >, & and '; transformers replaces it with plain json.dumps, and
    # tool-calling templates depend on that.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we just render it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block (like transformers') so that the body gets its own scope, exactly as there.
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers renders chat templates in, so outputs match character for character.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _clean_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape templates rely on, and drop None values (OpenAI sends `content: null` with tool
    calls; templates handle a missing key but would print "None"), as transformers does."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatTemplateError("messages must be a list of message objects")
    if not messages:
        raise ChatTemplateError("messages must contain at least one message")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must have a string 'role'")
        cleaned.append({key: value for key, value in message.items() if value is not None})
    return cleaned


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as "<s>" or as a serialized AddedToken {"content": "<s>"}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: cannot read JSON: {exc}") from exc


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what `tokenizers`' ByteLevel uses): printable bytes stand for themselves,
    the other 68 are shifted to U+0100 and up, so every byte is one visible character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return dict(sorted(mapping.items()))


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of a checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token is not None else None
        eos_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.eos_token_ids: frozenset[int] = frozenset(
            [*extra_eos_token_ids, *([eos_id] if eos_id is not None else [])]
        )
        # tokenizer.json's post-processor alone decides whether encode() adds BOS. transformers (v5) does
        # the same: it drops tokenizer_config.json's add_bos_token/add_eos_token whenever tokenizer.json
        # exists, so honouring them here would only disagree with it (and risk a second BOS on Llama-3).
        empty = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token: bool = self.bos_token_id is not None and empty[:1] == [self.bos_token_id]
        added = backend.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self.special_token_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        # Byte-level BPE tokens spell raw bytes; used to give logprobs the true bytes of partial characters.
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    # ---- loading and saving

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face checkpoint directory's tokenizer files."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{tokenizer_file}: not found (a Hugging Face fast tokenizer is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{tokenizer_file}: cannot load tokenizer: {exc}") from exc

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object")

        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the unnamed use is "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():  # newer layout keeps the template in its own file, and it wins
            template = jinja_file.read_text(encoding="utf-8")

        extra_eos: list[int] = []
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            generation = _read_json(generation_file)
            eos = generation.get("eos_token_id") if isinstance(generation, dict) else None
            extra_eos = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]

        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            chat_template=template if isinstance(template, str) else None,
            extra_eos_token_ids=extra_eos,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and the eos ids into generation_config.json, so that
        both `from_dir` and `transformers.AutoTokenizer.from_pretrained` load the same tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos_token,  # informational: tokenizer.json decides
            "clean_up_tokenization_spaces": False,  # our decode never "cleans up" spaces before punctuation
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():  # it would win over tokenizer_config.json on load; keep the two in agreement
            if self.chat_template is None:
                jinja_file.unlink()
            else:
                jinja_file.write_text(self.chat_template, encoding="utf-8")
        if self.eos_token_ids:
            # Merge into an existing generation_config.json rather than clobbering a model's settings.
            generation_file = path / "generation_config.json"
            generation = _read_json(generation_file) if generation_file.is_file() else {}
            generation["eos_token_id"] = sorted(self.eos_token_ids)
            generation_file.write_text(json.dumps(generation, indent=2) + "\n")

    # ---- text <-> ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_input_bytes_per_token(self) -> int | None:
        """The most UTF-8 bytes of input text that one token can stand for; None when the pipeline can drop
        input without bound (see `_max_input_bytes_per_token`). A text of more than `n` times this many bytes
        encodes to more than `n` tokens, which lets a server refuse a prompt by its size before tokenizing it."""
        return _max_input_bytes_per_token(json.loads(self._backend.to_str()))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. a special token's text), or None."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The bytes a token stands for (OpenAI logprobs "bytes"). For byte-level BPE these are the raw bytes,
        so a token holding half of a multi-byte character reports its real bytes rather than U+FFFD's."""
        if self._byte_level and token_id not in self._added_ids:
            piece = self._backend.id_to_token(token_id)
            to_byte = _unicode_to_byte()
            if piece is not None and all(c in to_byte for c in piece):
                return [to_byte[c] for c in piece]
        return list(self.token_text(token_id).encode("utf-8"))

    # ---- chat

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render a conversation to prompt text (encode it with add_special_tokens=False: the template
        writes BOS itself when the model wants one)."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "This model has no chat template; use /v1/completions with a plain prompt instead."
            )
        cleaned = _clean_messages(messages)
        special = {
            name: tok for name, tok in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if tok
        }
        # Same variables as transformers: tools/documents default to None (templates test `is not none`),
        # special tokens, then the caller's extras.
        context = {"tools": None, "documents": None, **special, **extra}
        context.update(messages=cleaned, add_generation_prompt=add_generation_prompt)
        try:
            return _compile_template(self.chat_template).render(context)
        except ChatTemplateError:
            raise
        except Exception as exc:
            # A template is a program shipped with the checkpoint; whatever it trips over while formatting the
            # client's messages (missing keys, content of an unexpected type) is reported as a bad request.
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# How many input bytes one token can stand for, read off tokenizer.json

# Unicode normal forms and lowercasing shrink a text's UTF-8 size by less than this factor: the worst cases
# known shrink it threefold (three Hangul jamo, 9 bytes, compose to one 3-byte syllable; the 3-byte Kelvin
# sign lowercases to "k"). The margin only makes the size bound a little looser.
_CHARACTER_MAPPING_SHRINK = 4
_CHARACTER_MAPPINGS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
# Pre-tokenizers that split the text or rewrite its bytes but never drop any of it (unless told to, below).
_KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts", "FixedLength"}
)
_MAX_UTF8_CHAR_BYTES = 4
_BYTE_PIECES = frozenset(f"<0x{b:02X}>" for b in range(256))  # sentencepiece's byte-fallback tokens


def _normalizer_shrink(spec: Mapping[str, Any] | None) -> float | None:
    """By what factor the normalizer can shrink a text's UTF-8 size at most; None: without bound (it strips
    characters: Strip, StripAccents, BertNormalizer's control-character cleaning, a sentencepiece charsmap)."""
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor: float | None = 1.0
        for part in spec.get("normalizers", []):
            part_factor = _normalizer_shrink(part)
            factor = None if factor is None or part_factor is None else factor * part_factor
        return factor
    if kind in _CHARACTER_MAPPINGS:
        return _CHARACTER_MAPPING_SHRINK
    if kind == "Prepend":
        return 1.0
    if kind == "Replace":  # a literal replaced by a non-empty one shrinks by their ratio; a regex, unknowably
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content")
        if not pattern or not content:
            return None
        return max(1.0, len(pattern.encode("utf-8")) / len(content.encode("utf-8")))
    return None


def _keeps_input(spec: Mapping[str, Any] | None) -> bool:
    """Whether the pre-tokenizer hands on every character (Whitespace and BertPreTokenizer drop spaces)."""
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_input(part) for part in spec.get("pretokenizers", []))
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _model_piece_bytes(model: Mapping[str, Any], byte_level: bool) -> int | None:
    """The most bytes of normalized text one of the model's tokens covers; None where one unknown token can
    cover a whole word or run of characters (WordPiece, WordLevel, a fused unknown without byte fallback)."""
    kind = model.get("type")
    if kind == "BPE":
        pieces: list[str] = list(model.get("vocab", {}))
        fuses_unknowns = model.get("unk_token") is not None and model.get("fuse_unk")
    elif kind == "Unigram":  # sentencepiece merges consecutive unknown characters into one unknown piece
        pieces = [piece for piece, _score in model.get("vocab", [])]
        fuses_unknowns = model.get("unk_id") is not None
    else:
        return None
    # Byte fallback spells an unknown character in byte tokens, but a byte without its token is unknown again.
    spells_every_byte = model.get("byte_fallback") and _BYTE_PIECES.issubset(pieces)
    if fuses_unknowns and not spells_every_byte:
        return None
    # A byte-level piece spells one input byte per character; otherwise a piece is at least as long in UTF-8 as
    # what it covers ("▁" for a space, "<0x0A>" for a byte fallback are longer).
    measure = len if byte_level else (lambda piece: len(piece.encode("utf-8")))
    return max((measure(piece) for piece in pieces), default=0)


def _uses_byte_level(spec: Mapping[str, Any] | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_uses_byte_level(part) for part in spec.get("pretokenizers", []))
    return spec.get("type") == "ByteLevel"


def _max_input_bytes_per_token(spec: Mapping[str, Any]) -> int | None:
    """From a parsed tokenizer.json: the most UTF-8 input bytes one token stands for, or None when no bound holds.

    Every token covers one piece of the normalized text, so a text's normalized size is at most the sum of its
    tokens' piece sizes, and its input size at most the normalizer's shrink factor times that. Added tokens are
    matched in the raw text (a special token written out counts as one token); one that strips the spaces
    around it covers any number of them.
    """
    shrink = _normalizer_shrink(spec.get("normalizer"))
    pre_tokenizer = spec.get("pre_tokenizer")
    piece_bytes = _model_piece_bytes(spec.get("model") or {}, _uses_byte_level(pre_tokenizer))
    added = spec.get("added_tokens") or []
    if shrink is None or piece_bytes is None or not _keeps_input(pre_tokenizer):
        return None
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    added_bytes = max((len(token["content"].encode("utf-8")) for token in added), default=0)
    # An unknown character becomes one token (or its bytes with byte fallback): at most a character's bytes.
    longest = max(piece_bytes, added_bytes, _MAX_UTF8_CHAR_BYTES)
    return math.ceil(longest * shrink)


# --------------------------------------------------------------------------------------------------
# The embedded demo model's tokenizer

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is not string %}"
    "{{ raise_exception('Message content must be a string.') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_byte_tokenizer() -> Tokenizer:
    """256 byte tokens (id == byte value) and four specials: every UTF-8 text round-trips, no files needed."""
    alphabet = _byte_to_unicode()
    backend = tokenizers.Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)]
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A:0",
        pair=f"{BOS_TOKEN} $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return Tokenizer(
        backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHATML_TEMPLATE,
        extra_eos_token_ids=[backend.token_to_id(IM_END)],
    )


# --------------------------------------------------------------------------------------------------
# Streaming detokenization


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas, with OpenAI stop-string semantics.

    Decoding works on a small window of recent ids (vLLM's prefix/read offsets): the text of
    `ids[prefix:]` minus the text of `ids[prefix:read]` is what the newest tokens add. The context tokens
    before `read` matter for decoders that treat the start of a string specially (SentencePiece's leading
    space). Stop strings are searched only in the held-back tail plus the new text.

    When several stop strings occur, the one that completes first wins (ties: the one starting earlier);
    this does not depend on how the text happens to be split into tokens.
    """

    # How long the undecoded window may grow before we release it as is. Merged BPE tokens can end inside a
    # character many times in a row (a run of emoji), so this is no small number; it only bounds the cost of
    # garbage output (invalid bytes that never complete, or a long run of skipped special tokens).
    _MAX_PENDING_TOKENS = 256

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(s for s in dict.fromkeys(stop) if s)  # an empty stop string would match at once
        self._include_stop = include_stop_str_in_output
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._held = ""  # decoded but unreleased: the longest tail that could still become a stop string
        self._released: list[str] = []
        self._stopped = False

    @property
    def text(self) -> str:
        if len(self._released) > 1:  # join once per read, not once per token
            self._released = ["".join(self._released)]
        return "".join(self._released)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, token_id: int) -> tuple[str, bool]:
        if self._stopped:
            raise RuntimeError("push() after a stop string matched")
        self._ids.append(token_id)
        return self._release(self._decode_delta(final=False), final=False)

    def flush(self) -> str:
        if self._stopped:
            return ""
        # The held text may still complete a stop string with the last undecodable bytes.
        return self._release(self._decode_delta(final=True), final=True)[0]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_delta(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Wait while the newest tokens add nothing (skipped specials) or end in half a character.
        waiting = len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")
        if waiting and not final and len(self._ids) - self._read_offset < self._MAX_PENDING_TOKENS:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, delta: str, final: bool) -> tuple[str, bool]:
        buffer = self._held + delta
        match = self._find_stop(buffer)
        if match is not None:
            start, end = match
            out, self._held, self._stopped = buffer[: end if self._include_stop else start], "", True
        else:
            keep = 0 if final else self._stop_prefix_len(buffer)
            out, self._held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        if out:
            self._released.append(out)
        return out, self._stopped

    def _find_stop(self, buffer: str) -> tuple[int, int] | None:
        # A stop ending in already released text would have been found earlier, and one starting before this
        # buffer would have to start inside the held tail, which is part of it: searching the buffer is exact.
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < (best[1], best[0])):
                best = (start, start + len(stop))
        return best

    def _stop_prefix_len(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:k]):
                    longest = k
                    break
        return longest
