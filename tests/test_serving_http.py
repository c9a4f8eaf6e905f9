"""node/serving/: the OpenAI-compatible HTTP API over real models in this process, reached by a plain HTTP client
(urllib, in a thread) on a real aiohttp server bound to 127.0.0.1 port 0.

  * a tiny seeded GPT-2 (byte vocabulary) behind LocalBackend: greedy completions equal transformers' own
    ``generate``; one seed gives one sample; usage counts; stop strings
  * the bundled all-MiniLM-L6-v2 behind LocalBackend: embeddings equal mean-pooled unit vectors computed here, and
    concurrent requests share backend calls yet each gets its own rows
  * every refusal a 4xx with a one-line OpenAI-shaped error; 429 when the queue is full; 401 without the token
  * EmbedBatcher and RequestGate on their own, with an injected clock (no waiting on real time)
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from node.ml.models import BYTE_VOCAB, build_model, minilm_path, quiet_transformers
from node.runtime.errors import NodeError
from node.serving.batching import BatcherClosed, Busy, EmbedBatcher, RequestGate
from node.serving.http_api import SERVING_KEY, Limits, ServingAPI, needs_token, start_http
from node.serving.local import LocalBackend
from node.serving.text import ByteText, HFText

GPT2 = "tiny-gpt2"
MINILM = "all-MiniLM-L6-v2"
CONTEXT = 64  # the tiny GPT-2's n_positions
ASCII = 128  # the tiny GPT-2's vocabulary: 7-bit bytes, so every generated text decodes back to its ids losslessly
MINILM_CONTEXT = 256  # max_seq_length of the package's sentence_bert_config.json
# The client's threads are its own: on the server's default executor (a few threads on a small machine) eight
# blocked clients would leave none for the server's tokenizer and model calls
CLIENTS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="http-client")
SENTENCES = ["The cat sits on the mat.", "A swarm of volunteers trains one model.", "Embeddings are unit vectors."]


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=ASCII, n_layer=2, n_embd=32, n_head=2, n_positions=CONTEXT,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model.eval()


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, HFText]:
    """The node's 'minilm' model (the package's pretrained encoder under a seeded head) and its tokenizer."""
    return build_model("minilm", None, seed=0).module, HFText.from_folder(minilm_path())


def gpt2_backend(model: torch.nn.Module, cls: type[LocalBackend] = LocalBackend) -> LocalBackend:
    return cls(model, ByteText(ASCII), name=GPT2, kind="causal-lm", max_context=CONTEXT)


def minilm_backend(minilm: tuple[torch.nn.Module, HFText], cls: type[LocalBackend] = LocalBackend) -> LocalBackend:
    model, text = minilm
    return cls(model, text, name=MINILM, kind="encoder", max_context=MINILM_CONTEXT)


def reference_embeddings(sentences: list[str]) -> np.ndarray:
    """sentence-transformers' recipe for all-MiniLM-L6-v2, done here by hand on an independently loaded BertModel:
    tokenize with padding, mean of the last hidden states over real tokens, L2-normalise. (len(sentences), 384)"""
    from transformers import AutoModel, AutoTokenizer

    with quiet_transformers():
        model = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


# ------------------------------------------------------------------------------------------------ the client

def call(url: str, path: str, body: Any = None, *, raw: bytes | None = None, token: str | None = None,
         method: str | None = None) -> tuple[int, dict]:
    """(status, parsed JSON body) of one request to ``url + path``; a plain HTTP client, no aiohttp."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def serve(backend: LocalBackend, check: Callable[[str, ServingAPI], Awaitable[Any]], **options: Any) -> Any:
    """Run ``check(url, api)`` against a server of ``backend`` on 127.0.0.1:0 (torn down after, whatever happens)."""
    async def main() -> Any:
        runner, url = await start_http(backend, "127.0.0.1", 0, options.pop("token_path", None), **options)
        try:
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
            return await asyncio.wait_for(check(url, runner.app[SERVING_KEY]), 45)
        finally:
            await runner.cleanup()
    return asyncio.run(main())


async def post(url: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, dict]:
    return await asyncio.get_running_loop().run_in_executor(CLIENTS, lambda: call(url, path, body, **kwargs))


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def ok(status: int, body: dict) -> dict:
    assert status == 200, body
    return body


# ------------------------------------------------------------------------------------------------- text, token

def test_byte_text_is_the_byte_vocabulary_of_the_byte_models():
    text = ByteText()
    assert text.vocab_size == BYTE_VOCAB == 256
    data = "x = 'é'\n".encode()
    assert text.encode("x = 'é'\n") == np.frombuffer(data, np.uint8).tolist()  # as datasets.py feeds the model
    assert text.decode(text.encode("π ≈ 3.14")) == "π ≈ 3.14"
    assert text.decode([0xE2, 0x82]) == "\ufffd"  # cut mid-character: replaced, still valid JSON text
    assert ByteText(ASCII).encode("abc") == [97, 98, 99]
    with pytest.raises(ValueError, match="byte 0xc3"):
        ByteText(ASCII).encode("é")


@pytest.mark.parametrize("host, expected", [("0.0.0.0", True), ("::", True), ("10.1.2.3", True),
                                            ("node.example", True), ("127.0.0.1", False), ("::1", False),
                                            ("[::1]", False), ("localhost", False), ("127.0.0.2", False)])
def test_a_token_is_needed_off_loopback(host, expected):
    assert needs_token(host) is expected


def test_with_a_token_every_request_needs_it(gpt2, tmp_path):
    token_path = tmp_path / "serving.token"

    async def check(url: str, api: ServingAPI) -> str:
        token = token_path.read_text()
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600 and len(token) >= 32
        request = {"model": GPT2, "prompt": "ab", "max_tokens": 2, "temperature": 0}
        for given in (None, "wrong", token + "x"):
            for path, body in (("/models", None), ("/completions", request), ("/nothing", None)):
                status, error = await post(url, path, body, token=given)
                assert status == 401 and error["error"]["type"] == "authentication_error", (path, given)
                assert "Authorization: Bearer TOKEN" in error["error"]["message"]
        ok(*await post(url, "/models", token=token))
        assert ok(*await post(url, "/completions", request, token=token))["usage"]["completion_tokens"] == 2
        return token

    first = serve(gpt2_backend(gpt2), check, token_path=token_path, require_token=True)
    assert serve(gpt2_backend(gpt2), check, token_path=token_path, require_token=True) != first  # fresh each start
    with pytest.raises(ValueError, match="needs a token"):
        asyncio.run(start_http(gpt2_backend(gpt2), "127.0.0.1", 0, None, require_token=True))


def test_a_port_in_use_is_a_one_line_error(gpt2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(NodeError, match=f"^serving: cannot listen on 127.0.0.1:{port}: [^\n]+$"):
            asyncio.run(start_http(gpt2_backend(gpt2), "127.0.0.1", port, None))


# ----------------------------------------------------------------------------------------------- completions

def test_greedy_completions_equal_transformers_generate(gpt2):
    codec = ByteText(ASCII)
    prompts = ["def swarm(node):", "import os\n"]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([codec.encode(prompt)])
        out = gpt2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
        expected.append(out[0, ids.shape[1]:].tolist())

    async def check(url: str, api: ServingAPI) -> None:
        models = ok(*await post(url, "/models"))
        assert models["object"] == "list" and [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == \
            [(GPT2, "model", "swarmnode")]
        reply = ok(*await post(url, "/completions", {"model": GPT2, "prompt": prompts[0], "max_tokens": 20,
                                                     "temperature": 0}))
        assert reply["object"] == "text_completion" and reply["model"] == GPT2 and reply["id"].startswith("cmpl-")
        assert isinstance(reply["created"], int)
        choice, = reply["choices"]
        assert codec.encode(choice["text"]) == expected[0]
        assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
        n = len(prompts[0])
        assert reply["usage"] == {"prompt_tokens": n, "completion_tokens": 20, "total_tokens": n + 20}
        # token ids as the prompt, and several prompts in one request (one choice each, in order)
        by_ids = ok(*await post(url, "/completions", {"model": GPT2, "prompt": codec.encode(prompts[0]),
                                                      "max_tokens": 20, "temperature": 0.0}))
        assert by_ids["choices"][0]["text"] == choice["text"]
        both = ok(*await post(url, "/completions", {"model": GPT2, "prompt": [codec.encode(p) for p in prompts],
                                                    "max_tokens": 20, "temperature": 0}))
        assert [codec.encode(c["text"]) for c in both["choices"]] == expected
        assert [c["index"] for c in both["choices"]] == [0, 1]
        assert both["usage"]["prompt_tokens"] == sum(map(len, prompts)) and both["usage"]["completion_tokens"] == 40

    serve(gpt2_backend(gpt2), check)


def test_one_seed_gives_one_sample(gpt2):
    async def check(url: str, api: ServingAPI) -> None:
        def request(seed: int) -> dict:
            return {"model": GPT2, "prompt": "Once upon", "max_tokens": 24, "temperature": 1.0, "seed": seed}
        first = ok(*await post(url, "/completions", request(1234)))["choices"][0]["text"]
        again = ok(*await post(url, "/completions", request(1234)))["choices"][0]["text"]
        other = ok(*await post(url, "/completions", request(1235)))["choices"][0]["text"]
        assert first == again and len(ByteText(ASCII).encode(first)) == 24
        assert other != first  # 24 draws over 128 nearly uniform ids: equal by chance ~never

    serve(gpt2_backend(gpt2), check)


def test_a_stop_string_ends_the_text_early(gpt2):
    async def check(url: str, api: ServingAPI) -> None:
        request = {"model": GPT2, "prompt": "def f(x):", "max_tokens": 20, "temperature": 0}
        full = ok(*await post(url, "/completions", request))["choices"][0]["text"]
        stop = full[8:10]
        cut = full.find(stop)
        # "é" cannot be spelt in this 7-bit vocabulary: left out of the early stop, harmless
        reply = ok(*await post(url, "/completions", request | {"stop": ["é", stop]}))
        choice, = reply["choices"]
        assert choice["text"] == full[:cut] and choice["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] == cut + len(stop) < 20  # generation stopped there
        single = ok(*await post(url, "/completions", request | {"stop": stop}))["choices"][0]
        assert (single["text"], single["finish_reason"]) == (full[:cut], "stop")

    serve(gpt2_backend(gpt2), check)


# ------------------------------------------------------------------------------------------------ embeddings

class CountingBackend(LocalBackend):
    """The real LocalBackend, its embed calls counted (their sizes)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        self.batches.append(len(batch))
        return await super().embed(batch)


def test_embeddings_equal_mean_pooled_unit_vectors(minilm):
    expected = reference_embeddings(SENTENCES)
    _, text = minilm

    async def check(url: str, api: ServingAPI) -> None:
        reply = ok(*await post(url, "/embeddings", {"model": MINILM, "input": SENTENCES, "encoding_format": "float"}))
        assert reply["object"] == "list" and reply["model"] == MINILM
        assert [(d["object"], d["index"]) for d in reply["data"]] == [("embedding", i) for i in range(3)]
        got = np.array([d["embedding"] for d in reply["data"]])
        assert got.shape == (3, 384) and np.abs(got - expected).max() <= 1e-5
        tokens = sum(len(text.encode(s)) for s in SENTENCES)
        assert reply["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        one = ok(*await post(url, "/embeddings", {"model": MINILM, "input": text.encode(SENTENCES[1])}))
        assert np.abs(np.array(one["data"][0]["embedding"]) - expected[1]).max() <= 1e-5

    serve(minilm_backend(minilm), check)


def test_concurrent_embedding_requests_share_backend_calls(minilm):
    requests = [[f"request {i} asks about item {j}" for j in range(1 + i % 3)] for i in range(8)]
    flat = [s for r in requests for s in r]
    expected = reference_embeddings(flat)
    backend = minilm_backend(minilm, CountingBackend)

    async def check(url: str, api: ServingAPI) -> None:
        replies = await asyncio.gather(*(post(url, "/embeddings", {"model": MINILM, "input": r}) for r in requests))
        start = 0
        for request, (status, reply) in zip(requests, replies):
            got = np.array([d["embedding"] for d in ok(status, reply)["data"]])
            assert got.shape == (len(request), 384)
            assert np.abs(got - expected[start:start + len(request)]).max() <= 1e-5  # its own rows, in order
            start += len(request)

    serve(backend, check, limits=Limits(embed_window_s=0.25))
    assert sum(backend.batches) == len(flat) and len(backend.batches) < len(requests), backend.batches


# ------------------------------------------------------------------------------------------------- refusals

BAD_COMPLETIONS: list[tuple[str, Any, int, str]] = [
    ("malformed JSON", b'{"model": "tiny-gpt2", "prompt": ', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("NaN", b'{"model": "tiny-gpt2", "prompt": "a", "temperature": NaN}', 400, "not valid JSON"),
    ("deep nesting", b"[" * 3000, 400, "not valid JSON"),
    ("prompt a number", {"prompt": 5}, 400, "prompt must be a string"),
    ("prompt mixed", {"prompt": ["a", 1]}, 400, "all alike"),
    ("max_tokens a string", {"max_tokens": "16"}, 400, "max_tokens must be an integer"),
    ("max_tokens a boolean", {"max_tokens": True}, 400, "max_tokens must be an integer, got a boolean"),
    ("max_tokens a float", {"max_tokens": 16.0}, 400, "max_tokens must be an integer"),
    ("max_tokens over the cap", {"max_tokens": 33}, 400, "max_tokens must be in [1, 32]"),
    ("prompt + max_tokens over the context", {"prompt": "x" * 50, "max_tokens": 20}, 400, "context of 64"),
    ("temperature a string", {"temperature": "hot"}, 400, "temperature must be a number"),
    ("temperature too high", {"temperature": 2.5}, 400, "temperature must be in [0, 2]"),
    ("seed negative", {"seed": -1}, 400, "seed must be in"),
    ("seed a float", {"seed": 1.5}, 400, "seed must be an integer"),
    ("too many prompts", {"prompt": ["a"] * 5}, 400, "at most 4 per request"),
    ("prompt too long", {"prompt": "x" * 65, "max_tokens": 1}, 400, "65 tokens; this model takes at most 64"),
    ("token id outside the vocabulary", {"prompt": [1, 200]}, 400, "token id 200, outside the vocabulary"),
    ("unspellable text", {"prompt": "é"}, 400, "outside this model's 128 byte ids"),
    ("empty prompt", {"prompt": ""}, 400, "prompt is empty"),
    ("no prompt", {"prompt": None}, 400, "prompt is required"),
    ("prompt null", b'{"model": "tiny-gpt2", "prompt": null}', 400, "prompt must be a string"),
    ("n=2", {"n": 2}, 400, "n must be 1"),
    ("streaming", {"stream": True}, 400, "stream is not supported"),
    ("unknown field", {"temprature": 0}, 400, "unknown field 'temprature'"),
    ("five stops", {"stop": list("abcde")}, 400, "at most 4 strings"),
    ("wrong model", {"model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ("no model", {"model": None}, 400, "model must be a string"),
    ("too large a body", {"prompt": "x" * 5000}, 413, "over 4096 bytes"),
]


def check_error(status: int, body: dict, expected_status: int, fragment: str) -> None:
    assert status == expected_status, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] is None
    assert fragment in error["message"], error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"] and len(error["message"]) <= 300


def test_bad_completion_requests_are_refused_in_one_line(gpt2):
    async def check(url: str, api: ServingAPI) -> None:
        for name, change, status, fragment in BAD_COMPLETIONS:
            base = {"model": GPT2, "prompt": "hello", "max_tokens": 4, "temperature": 0}
            if isinstance(change, bytes):
                got = await post(url, "/completions", raw=change)
            else:
                got = await post(url, "/completions", {k: v for k, v in (base | change).items() if v is not None})
            try:
                check_error(*got, status, fragment)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
        check_error(*await post(url, "/embeddings", {"model": GPT2, "input": "a"}), 400,
                    "model tiny-gpt2 is a causal LM: use /v1/completions")
        check_error(*await post(url, "/chat/completions", {"model": GPT2}), 404, "no such endpoint")
        check_error(*await post(url, "/completions", method="GET"), 405, "GET is not allowed")
        ok(*await post(url, "/completions", {"model": GPT2, "prompt": "hello", "max_tokens": 4, "stream": False,
                                             "logprobs": None, "user": "me"}))  # defaults of the unsupported: fine

    serve(gpt2_backend(gpt2), check, limits=Limits(max_inputs=4, max_new_tokens=32, max_body_bytes=4096))


def test_bad_embedding_requests_are_refused_in_one_line(minilm):
    async def check(url: str, api: ServingAPI) -> None:
        def request(**change: Any) -> dict:
            return {"model": MINILM, "input": "hello"} | change
        for body, status, fragment in [
            (request(input=["a", "b", "c"]), 400, "3 inputs; at most 2 per request"),
            (request(input="word " * 300), 400, "this model takes at most 256"),
            (request(input=[[101, 102], []]), 400, "input 1 is empty"),
            (request(input=[101, 30522]), 400, "outside the vocabulary [0, 30522)"),
            (request(input=[[101], "a"]), 400, "all alike"),
            (request(input={"text": "a"}), 400, "got an object"),
            (request(encoding_format="base64"), 400, "encoding_format is not supported"),
            (request(model="text-embedding-3-small"), 404, "is not served here"),
            ({"model": MINILM}, 400, "input is required"),
        ]:
            check_error(*await post(url, "/embeddings", body), status, fragment)
        check_error(*await post(url, "/completions", {"model": MINILM, "prompt": "a"}), 400,
                    f"model {MINILM} is an encoder: use /v1/embeddings")

    serve(minilm_backend(minilm), check, limits=Limits(max_inputs=2))


class HeldBackend(LocalBackend):
    """The real LocalBackend whose generate first waits for ``release`` (which the test sets)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()
        self.entered = 0

    async def generate(self, *args: Any, **kwargs: Any) -> tuple[list[int], str]:
        self.entered += 1
        await self.release.wait()
        return await super().generate(*args, **kwargs)


def test_a_full_queue_is_a_429_at_once(gpt2):
    backend = gpt2_backend(gpt2, HeldBackend)
    assert isinstance(backend, HeldBackend)
    request = {"model": GPT2, "prompt": "queue", "max_tokens": 3, "temperature": 0}

    async def check(url: str, api: ServingAPI) -> None:
        first = asyncio.ensure_future(post(url, "/completions", request))
        await wait_until(lambda: backend.entered == 1, "the first request to reach the backend")
        second = asyncio.ensure_future(post(url, "/completions", request))
        await wait_until(lambda: api.gate.waiting == 1, "the second request to queue")
        status, body = await post(url, "/completions", request)
        check_error(status, body, 429, "server busy: 1 requests being served and 1 queued")
        assert body["error"]["type"] == "rate_limit_error"
        check_error(*await post(url, "/embeddings", {"model": GPT2, "input": "a"}), 429, "server busy")
        ok(*await post(url, "/models"))  # listing the model takes no place
        backend.release.set()
        for reply in await asyncio.gather(first, second):
            assert ok(*reply)["usage"]["completion_tokens"] == 3
        assert api.gate.admitted == 0 and backend.entered == 2

    serve(backend, check, limits=Limits(max_concurrent=1, max_queue=1))


# ------------------------------------------------------------------------- the batcher and the gate on their own

class Autojump:
    """A clock whose sleep returns at once, having moved the clock on (trio's autojump clock, in small)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def tag_rows(batch: list[list[int]]) -> list[list[float]]:
    return [[float(row[0]), float(len(batch))] for row in batch]


def test_the_batcher_merges_what_arrives_within_the_window():
    async def main() -> None:
        time = Autojump()
        batcher = EmbedBatcher(tag_rows, window_s=0.5, max_rows=8, clock=time.clock, sleep=time.sleep)
        a, b, c = await asyncio.gather(batcher.submit([[1], [2]]), batcher.submit([[3]]), batcher.submit([[4], [5]]))
        assert (a, b, c) == ([[1.0, 5.0], [2.0, 5.0]], [[3.0, 5.0]], [[4.0, 5.0], [5.0, 5.0]])
        assert batcher.calls == 1 and time.sleeps == [0.5]  # one window, one call
        assert await batcher.submit([[6]]) == [[6.0, 1.0]] and batcher.calls == 2
        await batcher.close()
        with pytest.raises(BatcherClosed):
            await batcher.submit([[7]])

    asyncio.run(main())


def test_a_full_batch_goes_without_waiting_out_the_window():
    async def never(seconds: float) -> None:
        await asyncio.Event().wait()  # a window that would never end: only a full batch can be sent

    async def main() -> None:
        batcher = EmbedBatcher(tag_rows, window_s=1.0, max_rows=3, clock=lambda: 0.0, sleep=never)
        got = await asyncio.wait_for(asyncio.gather(batcher.submit([[1]]), batcher.submit([[2], [3]])), 5)
        assert list(got) == [[[1.0, 3.0]], [[2.0, 3.0], [3.0, 3.0]]]
        big = await asyncio.wait_for(batcher.submit([[4], [5], [6], [7]]), 5)  # over max_rows: a batch of its own
        assert big == [[float(i), 4.0] for i in (4, 5, 6, 7)] and batcher.calls == 2
        waiting = asyncio.ensure_future(batcher.submit([[8]]))  # waits for a window that never ends
        await asyncio.sleep(0.01)
        await batcher.close()
        with pytest.raises(BatcherClosed):
            await waiting

    asyncio.run(main())


def test_a_failed_backend_call_fails_exactly_its_batch():
    async def main() -> None:
        time = Autojump()
        release = asyncio.Event()
        sent: list[list[list[int]]] = []

        async def embed(batch: list[list[int]]) -> list[list[float]]:
            sent.append(batch)
            if [666] in batch:
                await release.wait()  # the next requests gather meanwhile
                raise RuntimeError("boom")
            return await tag_rows(batch)

        batcher = EmbedBatcher(embed, window_s=0.1, max_rows=8, clock=time.clock, sleep=time.sleep)
        doomed = [asyncio.ensure_future(batcher.submit(rows)) for rows in ([[1]], [[666]])]
        while not sent:
            await asyncio.sleep(0)
        later = [asyncio.ensure_future(batcher.submit(rows)) for rows in ([[2]], [[3], [4]])]
        await asyncio.sleep(0)
        release.set()
        for task in doomed:
            with pytest.raises(RuntimeError, match="boom"):
                await task
        assert [await t for t in later] == [[[2.0, 3.0]], [[3.0, 3.0], [4.0, 3.0]]]
        assert sent == [[[1], [666]], [[2], [3], [4]]]
        await batcher.close()

    asyncio.run(main())


def test_the_gate_serves_n_queues_m_and_refuses_the_next():
    async def main() -> None:
        gate = RequestGate(max_active=2, max_waiting=1)
        hold = asyncio.Event()
        inside = []

        async def holder(i: int) -> None:
            async with gate.slot():
                inside.append(i)
                await hold.wait()

        tasks = [asyncio.ensure_future(holder(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert (gate.active, gate.waiting, inside) == (2, 1, [0, 1])
        with pytest.raises(Busy, match="2 requests being served and 1 queued"):
            async with gate.slot():
                pass
        hold.set()
        await asyncio.gather(*tasks)
        assert inside == [0, 1, 2] and gate.admitted == 0

    asyncio.run(main())
