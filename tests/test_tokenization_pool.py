"""Large prompts cannot starve anyone: a prompt whose size alone proves it over the limit is refused before
it is tokenized, and tokenization runs on a pool of its own where short prompts never wait behind long
ones and one tenant's long prompts cannot take every worker."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tokenizers
from fastapi.testclient import TestClient
from tokenizers import AddedToken, models, normalizers, pre_tokenizers

from server.api.app import build_app
from server.api.auth import KeyRing
from server.api.tokenization_pool import SHORT_PROMPT_BYTES
from server.config import Settings
from server.tokenizer import Tokenizer, build_byte_tokenizer
from tests.support.fake_engine import FakeEngine, FakeTokenizer
from tests.support.openai_http import assert_limit
from tests.support.tenant_keys import KEY_FILE, bearer

# Text that packs many bytes into few tokens: special tokens written out, runs the trained merges know,
# decomposed characters an NFC normalizer composes (three Hangul jamo, 9 bytes, to one 3-byte syllable).
DENSE_TEXTS = [
    "<|begin_of_text|>" * 20,
    "<|im_start|>user\nhi<|im_end|>" * 10,
    "the the the and and " * 20,
    "\u1100\u1161\u11a8" * 30,
    "e\u0302\u0301" * 30,
    "Café naïve 😀👍🏽 中文字符 " * 5,
]


# --------------------------------------------------------------------------------------------------
# The bound: bytes per token, read off the tokenizer


def _checkpoint_tokenizers(tmp_path: Path) -> list[Tokenizer]:
    from tests.support.tokenizer_checkpoints import write_llama3, write_qwen2  # trains two small BPE tokenizers

    return [Tokenizer.from_dir(write_llama3(tmp_path / "llama3")), Tokenizer.from_dir(write_qwen2(tmp_path / "qwen2"))]


def test_no_text_encodes_to_fewer_tokens_than_its_bytes_allow(tmp_path: Path) -> None:
    byte_tokenizer = build_byte_tokenizer()
    assert byte_tokenizer.max_input_bytes_per_token == len("<|begin_of_text|>")  # its longest token
    for tokenizer in [byte_tokenizer, *_checkpoint_tokenizers(tmp_path)]:
        bound = tokenizer.max_input_bytes_per_token
        assert bound is not None
        for text in DENSE_TEXTS:
            tokens = len(tokenizer.encode(text, add_special_tokens=False))
            assert tokens * bound >= len(text.encode("utf-8")), (text, tokens, bound)


def _backend(model: Any, normalizer: Any = None, pre_tokenizer: Any = None) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(model)
    if normalizer is not None:
        backend.normalizer = normalizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    return backend


BYTE_TOKENS = {f"<0x{b:02X}>": 4 + b for b in range(256)}
SENTENCEPIECE_VOCAB = {"<unk>": 0, "▁": 1, "a": 2, "▁a": 3} | BYTE_TOKENS


@pytest.mark.parametrize(
    ("backend", "bound"),
    [
        # Llama-2 / Mistral: "▁" for spaces, byte fallback for unknown characters; "<0x20>" (6 bytes) the longest.
        pytest.param(_backend(models.BPE(SENTENCEPIECE_VOCAB, [("▁", "a")], unk_token="<unk>", fuse_unk=True,
                                         byte_fallback=True),
                              normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])),
                     6, id="sentencepiece-bpe"),
        pytest.param(_backend(models.BPE(SENTENCEPIECE_VOCAB, [], unk_token="<unk>"), normalizers.NFKC()), 24,
                     id="nfkc-unknown-per-character"),
        # Each of these drops input without bound: a text of any size can come out as a handful of tokens.
        pytest.param(_backend(models.BPE(SENTENCEPIECE_VOCAB, [], unk_token="<unk>", fuse_unk=True)), None,
                     id="fused-unknowns"),
        pytest.param(_backend(models.BPE({"<unk>": 0, "a": 1, "<0x20>": 2}, [], unk_token="<unk>", fuse_unk=True,
                                         byte_fallback=True)), None, id="fused-unknowns-some-bytes-spelled"),
        pytest.param(_backend(models.BPE(SENTENCEPIECE_VOCAB, []), normalizers.Strip()), None, id="strip"),
        pytest.param(_backend(models.BPE(SENTENCEPIECE_VOCAB, []), None, pre_tokenizers.Whitespace()), None,
                     id="whitespace-dropped"),
        pytest.param(_backend(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), None, id="wordpiece"),
    ],
)
def test_bytes_per_token_of_other_pipelines(backend: tokenizers.Tokenizer, bound: int | None) -> None:
    tokenizer = Tokenizer(backend)
    assert tokenizer.max_input_bytes_per_token == bound
    if bound is not None:
        for text in [" a a a", "aaaa", "ﬀ ﬁ ﬂ ａ", *DENSE_TEXTS]:
            assert len(tokenizer.encode(text)) * bound >= len(text.encode("utf-8")), text


def test_a_space_absorbing_added_token_has_no_bound() -> None:
    backend = _backend(models.BPE(SENTENCEPIECE_VOCAB, [], unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert Tokenizer(backend).max_input_bytes_per_token is None


# --------------------------------------------------------------------------------------------------
# Refused by size, before tokenizing


class CountingTokenizer(FakeTokenizer):
    def __init__(self) -> None:
        self.encoded_chars = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded_chars += len(text)
        return super().encode(text, add_special_tokens)


@pytest.fixture
def counting() -> Iterator[tuple[TestClient, CountingTokenizer]]:
    tokenizer = CountingTokenizer()
    engine = FakeEngine(max_model_len=1000, tokenizer=tokenizer)
    with TestClient(build_app(engine, Settings(max_prompt_tokens=30))) as client:
        yield client, tokenizer


# FakeTokenizer: at most 4 bytes per token, so 30 tokens hold at most 120 bytes and 999 tokens 3996.
@pytest.mark.parametrize(
    ("path", "body", "param", "code", "words"),
    [
        ("/v1/completions", {"prompt": "a" * 121}, "prompt", "limit_exceeded", "--max-prompt-tokens of 30"),
        ("/v1/completions", {"prompt": "€" * 41}, "prompt", "limit_exceeded", "123 bytes"),
        ("/v1/completions", {"prompt": ["a" * 60, "b" * 61]}, "prompt", "limit_exceeded", "--max-prompt-tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 100},
                                               {"role": "user", "content": "b" * 21}]},
         "messages", "limit_exceeded", "--max-prompt-tokens of 30"),
    ],
)
def test_a_prompt_too_big_to_fit_is_refused_before_tokenizing(
    counting: tuple[TestClient, CountingTokenizer], path: str, body: dict[str, Any], param: str, code: str,
    words: str
) -> None:
    client, tokenizer = counting
    assert_limit(client.post(path, json=body | {"max_tokens": 1}), 400, param, code, words)
    assert tokenizer.encoded_chars == 0
    # Just within the bound: tokenized, then refused by its count of tokens as before.
    assert_limit(client.post("/v1/completions", json={"prompt": "a" * 120, "max_tokens": 1}), 400, "prompt",
                 "limit_exceeded", "--max-prompt-tokens of 30")
    assert tokenizer.encoded_chars == 120


def test_without_a_prompt_limit_the_context_length_bounds_the_size() -> None:
    tokenizer = CountingTokenizer()
    with TestClient(build_app(FakeEngine(max_model_len=100, tokenizer=tokenizer))) as client:
        response = client.post("/v1/completions", json={"prompt": "a" * (99 * 4 + 1), "max_tokens": 1})
        assert_limit(response, 400, "prompt", "context_length_exceeded", "context length of 100")
        assert tokenizer.encoded_chars == 0


# --------------------------------------------------------------------------------------------------
# The pool: short prompts and health checks never wait behind long prompts; tenants share the long lane


class GatedTokenizer(FakeTokenizer):
    """Long prompts (their first character names the tenant) stay inside `encode` until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.inside: Counter[str] = Counter()
        self.most_inside: Counter[str] = Counter()
        self.short_encoded = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= SHORT_PROMPT_BYTES:
            with self.lock:
                self.short_encoded += 1
            return super().encode(text, add_special_tokens)
        tenant = text[0]
        with self.lock:
            self.inside[tenant] += 1
            self.most_inside[tenant] = max(self.most_inside[tenant], self.inside[tenant])
        try:
            self.gate.wait(60)  # a safety net for a broken test, never reached when it passes
            return super().encode(text[:10], add_special_tokens)
        finally:
            with self.lock:
                self.inside[tenant] -= 1


async def _eventually(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_long_tokenizations_leave_room_for_health_short_prompts_and_other_tenants() -> None:
    tokenizer = GatedTokenizer()
    engine = FakeEngine(max_model_len=10**6, tokenizer=tokenizer)
    settings = Settings(tokenizer_workers=3, max_concurrent_tokenizations_per_tenant=2)
    app = build_app(engine, settings, KeyRing.parse(KEY_FILE, "test keys"))
    # More long prompts than asyncio's default executor has threads (32 at most): queued there, they would hold
    # up every other tokenization.
    flood = 40
    long_text = "a" * (SHORT_PROMPT_BYTES + 1)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            def post(tenant: str, prompt: str) -> asyncio.Task[httpx.Response]:
                body = {"prompt": prompt, "max_tokens": 1}
                return asyncio.create_task(client.post("/v1/completions", json=body, headers=bearer(tenant)))

            floods = [post("acme", long_text) for _ in range(flood)]
            try:
                await _eventually(lambda: tokenizer.inside["a"] >= 2, "acme tokenizing long prompts")
                # Acme's flood is at its cap, in the long lane: the liveness probe, another tenant's short prompt
                # and another tenant's long prompt all get through while every one of acme's stays stuck.
                assert (await client.get("/health")).status_code == 200
                short = await asyncio.wait_for(post("globex", "hi"), 30)
                assert short.status_code == 200 and short.json()["usage"]["prompt_tokens"] == 3
                other_long = post("initech", "i" * (SHORT_PROMPT_BYTES + 1))
                await _eventually(lambda: tokenizer.inside["i"] == 1, "initech's long prompt tokenizing")
                assert not any(task.done() for task in floods)
                assert tokenizer.inside["a"] == 2
            finally:
                tokenizer.gate.set()
            responses = await asyncio.wait_for(asyncio.gather(*floods, other_long), 60)
            assert [r.status_code for r in responses] == [200] * (flood + 1)
        assert tokenizer.most_inside == {"a": 2, "i": 1}

    asyncio.run(scenario())
