"""An OpenAI-compatible HTTP API over one Backend (node/serving/local.py), served by aiohttp in the daemon's own event
loop like the dashboard (node/api/dashboard.py), so that existing clients (the ``openai`` package, LangChain, curl
scripts) talk to a swarm's model unchanged.

    runner, url = await start_http(backend, "127.0.0.1", 0, home / "serving.token")   # url: http://127.0.0.1:PORT/v1
    ...
    await runner.cleanup()

    GET  /v1/models              the one model: {"object": "list", "data": [{"id": NAME, "object": "model", ...}]}
    GET  /v1/models/NAME         that model, or 404
    POST /v1/embeddings          an encoder's mean-pooled unit vectors, inputs of concurrent requests batched
    POST /v1/completions         a causal LM's continuation of each prompt (greedy at temperature 0, else sampled)

Errors have OpenAI's shape, ``{"error": {"message": ONE LINE, "type": ..., "param": FIELD or null, "code": null}}``,
never a traceback: 400 a request this server will not run (malformed JSON, a wrong type -- a JSON true is not an
integer --, too many inputs, too many tokens, an unsupported option), 401 no or a wrong token, 404 an unknown model
or path, 413 a body over Limits.max_body_bytes, 429 the queue is full (retry), 503 the backend failed or the server
is stopping.

Every limit is checked before a model sees the request, so one client cannot make a node allocate without bound:
the body's size (before parsing), the number of inputs, each input's tokens (<= the model's context), max_tokens
(<= a cap, and prompt + max_tokens <= the context), and every token id a client sends (< the vocabulary). At most
``max_concurrent`` requests are served at once and ``max_queue`` more wait; one more gets 429 at once, since a queue
without bound turns overload into timeouts for every client.

Bound to loopback the API answers anyone on this machine; bound to any other address every request needs
``Authorization: Bearer TOKEN`` with the token written (0600) to ``token_path`` at start, as OpenAI clients send
their API key.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import math
import pathlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from node.ml.models import CAUSAL_LM
from node.runtime.config import LOOPBACK_HOSTS
from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from node.serving.batching import DEFAULT_MAX_ROWS, DEFAULT_WINDOW_S, BatcherClosed, Busy, EmbedBatcher, RequestGate
from node.serving.local import ENCODER, FINISH_STOP, Backend

logger = logging.getLogger(__name__)
SHUTDOWN_S = 1.0  # requests still running when the server stops get this long
MAX_STOP = 4  # OpenAI's limit on "stop" sequences
MAX_STOP_CHARS = 256  # a stop string longer than this is a mistake, not a use
MAX_MESSAGE = 300  # characters of an error message (one line)
MAX_SEED = 2**63  # seeds are in [0, 2**63), what torch.Generator.manual_seed takes without wrapping
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
INVALID, AUTH, RATE, SERVER = "invalid_request_error", "authentication_error", "rate_limit_error", "server_error"
# OpenAI request fields this server does not implement: accepted only at their default (null, or the value shown),
# so a client library that always sends them still works and one that asks for more is told so, not ignored.
COMPLETION_DEFAULTS: dict[str, Any] = {"stream": False, "echo": False, "logprobs": None, "best_of": 1, "top_p": 1,
                                       "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None,
                                       "suffix": None, "stream_options": None}
EMBEDDING_DEFAULTS: dict[str, Any] = {"encoding_format": "float", "dimensions": None}


@dataclass(frozen=True)
class Limits:
    """What one request and all requests together may ask of the server (each refusal a one-line message)."""

    max_body_bytes: int = 1 << 20  # 1 MiB: 64 inputs of a 512-token context at ~8 characters a token, with room
    max_inputs: int = 64  # inputs (embeddings) or prompts (completions) of one request
    max_input_tokens: int | None = None  # tokens of one input or prompt; None: the model's max_context
    max_new_tokens: int = 512  # the largest max_tokens a completion may ask for
    max_concurrent: int = 8  # requests served at once (and generate calls running at once)
    max_queue: int = 32  # requests waiting for a place; one more is a 429
    embed_window_s: float = DEFAULT_WINDOW_S  # how long a batch of embedding inputs gathers (batching.py)
    embed_max_rows: int = DEFAULT_MAX_ROWS  # inputs of one embedding batch

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_new_tokens", "max_concurrent", "embed_max_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serving limit {name} must be a positive integer, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"serving limit max_queue must be an integer >= 0, got {self.max_queue!r}")
        tokens = self.max_input_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"serving limit max_input_tokens must be a positive integer or None, got {tokens!r}")


class APIError(Exception):
    """A refusal in OpenAI's error shape; ``message`` is one line, ``param`` the request field it concerns."""

    def __init__(self, status: int, message: str, *, type: str = INVALID, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, one_line(message), type, param

    def response(self) -> web.Response:
        headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}.get(self.status)
        return web.json_response({"error": {"message": self.message, "type": self.type, "param": self.param,
                                            "code": None}}, status=self.status, headers=headers)


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (newlines included) made single spaces, cut to MAX_MESSAGE characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def needs_token(host: str) -> bool:
    """Whether a server bound to ``host`` must ask for a token: not on loopback (127.0.0.0/8, ::1, localhost, as
    node/runtime/config.py's LOOPBACK_HOSTS), where only this machine reaches it; yes on any other address, the
    wildcards 0.0.0.0 and :: included, and on any host name (it may resolve anywhere)."""
    if host in LOOPBACK_HOSTS:
        return False
    try:
        return not ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return True


# ------------------------------------------------------------------------------------------- request checking

def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else (NaN and Infinity are not JSON; nesting too deep for the
    parser is refused, not a crash)."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"the request body is not valid JSON{where}: "
                            f"{e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(data)}")
    return data


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def check_fields(data: dict[str, Any], known: set[str], defaults: dict[str, Any]) -> None:
    """Refuse unknown fields and non-default values of the fields in ``defaults`` (the OpenAI options not
    implemented here)."""
    for key, value in data.items():
        if key in known:
            continue
        if key not in defaults:
            raise APIError(400, f"unknown field {key!r:.60}", param=key[:60])
        default = defaults[key]
        if value is not None and (value != default or isinstance(value, bool) != isinstance(default, bool)):
            raise APIError(400, f"{key} is not supported by this server (only {json.dumps(default)})", param=key)


def get_int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if not is_int(value):
        raise APIError(400, f"{key} must be an integer, got {json_type(value)}", param=key)
    if not low <= value <= high:
        raise APIError(400, f"{key} must be in [{low}, {high}], got {value}", param=key)
    return value


def get_temperature(data: dict[str, Any]) -> float:
    value = data.get("temperature")
    if value is None:
        return 1.0  # OpenAI's default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"temperature must be a number, got {json_type(value)}", param="temperature")
    if not (math.isfinite(value) and 0 <= value <= MAX_TEMPERATURE):
        raise APIError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {value}", param="temperature")
    return float(value)


def get_stops(data: dict[str, Any]) -> list[str]:
    value = data.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop must be a string or an array of at most {MAX_STOP} strings, each of 1 to "
                            f"{MAX_STOP_CHARS} characters", param="stop")
    return stops


def get_inputs(value: Any, param: str, max_inputs: int) -> list[str | list[int]]:
    """A text or token-id input field (str | list[str] | list[int] | list[list[int]], as OpenAI takes them) as a list
    of inputs, each a string or a list of ids."""
    if isinstance(value, str):
        return [value]
    shape = f"{param} must be a string, an array of strings, an array of token ids or an array of such arrays"
    if not isinstance(value, list) or not value:
        raise APIError(400, shape + ("" if isinstance(value, list) else f", got {json_type(value)}"), param=param)
    if all(is_int(v) for v in value):
        return [value]
    if len(value) > max_inputs:
        raise APIError(400, f"{param} has {len(value)} inputs; at most {max_inputs} per request", param=param)
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(isinstance(v, list) and all(is_int(t) for t in v) for v in value):
        return list(value)
    raise APIError(400, shape + " (all alike)", param=param)


# ---------------------------------------------------------------------------------------------------- the app

class ServingAPI:
    """The aiohttp application over ``backend``: routes, the token check, limits and the embedding batcher."""

    def __init__(self, backend: Backend, limits: Limits | None = None, token: str | None = None,
                 token_hint: str = "the serving token file"):
        self.backend, self.limits, self.token, self.token_hint = backend, limits or Limits(), token, token_hint
        if backend.kind not in (CAUSAL_LM, ENCODER):
            raise ValueError(f"backend {backend.name!r}: kind must be {CAUSAL_LM!r} or {ENCODER!r}, "
                             f"got {backend.kind!r}")
        tokens = self.limits.max_input_tokens
        if tokens is not None and tokens > backend.max_context:
            raise ValueError(f"serving limit max_input_tokens={tokens} is over model {backend.name}'s context "
                             f"of {backend.max_context} tokens")
        self.max_input_tokens = tokens or backend.max_context
        self.gate = RequestGate(self.limits.max_concurrent, self.limits.max_queue)
        self.generating = asyncio.Semaphore(self.limits.max_concurrent)
        self.batcher = EmbedBatcher(backend.embed, window_s=self.limits.embed_window_s,
                                    max_rows=self.limits.embed_max_rows)
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.limits.max_body_bytes)
        app[SERVING_KEY] = self
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/completions", self._completions)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        await self.batcher.close()

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            if self.token is not None:
                header = request.headers.get("Authorization", "")
                given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
                if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
                    raise APIError(401, f"missing or wrong API token: send 'Authorization: Bearer TOKEN' with the "
                                        f"token of {self.token_hint}", type=AUTH)
            response = await handler(request)
        except APIError as e:
            response = e.response()
        except web.HTTPException as e:  # the router's 404 and 405
            if e.status == 405:
                message = f"{request.method} is not allowed on {request.path!r:.80}"
            elif e.status == 404:
                message = f"no such endpoint: {request.method} {request.path!r:.80}"
            else:
                message = e.reason
            response = APIError(e.status, message).response()
        except Exception:  # a bug here: the client gets one line, the log the traceback
            logger.exception("serving API: %s %s failed", request.method, request.path)
            response = APIError(500, "internal server error (logged on the server)", type=SERVER).response()
        response.headers["Cache-Control"] = "no-store"
        return response

    # ---------------------------------------------------------------------------------------------- helpers

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.backend.name, "object": "model", "created": self.created, "owned_by": "swarmnode"}

    async def _read(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise APIError(413, f"the request body is over {self.limits.max_body_bytes} bytes") from None
        return parse_body(body)

    def _check_model(self, data: dict[str, Any], wanted_kind: str) -> None:
        model = data.get("model")
        if not isinstance(model, str):
            raise APIError(400, f"model must be a string naming the model, got {json_type(model)}", param="model")
        if model != self.backend.name:
            raise APIError(404, f"model {model!r:.80} is not served here (this server serves "
                                f"{self.backend.name!r})", param="model")
        if self.backend.kind != wanted_kind:
            raise APIError(400, f"model {self.backend.name} is a causal LM: use /v1/completions"
                           if self.backend.kind == CAUSAL_LM else
                           f"model {self.backend.name} is an encoder: use /v1/embeddings", param="model")

    async def _token_ids(self, inputs: list[str | list[int]], param: str) -> list[list[int]]:
        """Each input as token ids, checked: non-empty, within the vocabulary, at most max_input_tokens."""
        text = self.backend.text
        if any(isinstance(i, str) for i in inputs):
            try:  # a tokenizer is CPU work on up to a whole body of text: off the event loop
                ids = await asyncio.to_thread(lambda: [text.encode(i) if isinstance(i, str) else i for i in inputs])
            except ValueError as e:
                raise APIError(400, f"{param}: {e}", param=param) from None
        else:
            ids = [i for i in inputs if not isinstance(i, str)]
        vocab = text.vocab_size
        for n, row in enumerate(ids):
            where = param if len(ids) == 1 else f"{param} {n}"
            if not row:
                raise APIError(400, f"{where} is empty", param=param)
            if len(row) > self.max_input_tokens:
                raise APIError(400, f"{where} has {len(row)} tokens; this model takes at most "
                                    f"{self.max_input_tokens}", param=param)
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"{where} has token id {bad}, outside the vocabulary [0, {vocab})", param=param)
        return ids

    async def _backend_call(self, call: Awaitable[Any]) -> Any:
        """``call``'s result; a backend's ValueError is the client's 400, any other failure a 503."""
        try:
            return await call
        except ValueError as e:
            raise APIError(400, str(e) or type(e).__name__) from None
        except BatcherClosed:
            raise APIError(503, "the server is stopping", type=SERVER) from None
        except Exception as e:
            logger.warning("serving API: model %s failed", self.backend.name, exc_info=True)
            raise APIError(503, f"model {self.backend.name} failed: {type(e).__name__}: {e}", type=SERVER) from None

    @staticmethod
    def _json(data: dict[str, Any]) -> web.Response:
        try:
            return web.json_response(data, dumps=functools.partial(json.dumps, allow_nan=False))
        except ValueError:  # NaN from a model with broken weights: JSON has no NaN
            raise APIError(503, "the model produced non-finite numbers", type=SERVER) from None

    @staticmethod
    def _busy(e: Busy) -> APIError:
        return APIError(429, str(e), type=RATE)

    # ------------------------------------------------------------------------------------------------ routes

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def _model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.backend.name:
            raise APIError(404, f"model {request.match_info['model']!r:.80} is not served here", param="model")
        return web.json_response(self._model_object())

    async def _embeddings(self, request: web.Request) -> web.Response:
        try:
            async with self.gate.slot():
                return await self._embed(await self._read(request))
        except Busy as e:
            raise self._busy(e) from None

    async def _embed(self, data: dict[str, Any]) -> web.Response:
        check_fields(data, {"model", "input", "user"}, EMBEDDING_DEFAULTS)
        self._check_model(data, ENCODER)
        if "input" not in data:
            raise APIError(400, "input is required", param="input")
        ids = await self._token_ids(get_inputs(data["input"], "input", self.limits.max_inputs), "input")
        vectors = await self._backend_call(self.batcher.submit(ids))
        tokens = sum(len(row) for row in ids)
        return self._json({"object": "list", "model": self.backend.name,
                           "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _completions(self, request: web.Request) -> web.Response:
        try:
            async with self.gate.slot():
                return await self._complete(await self._read(request))
        except Busy as e:
            raise self._busy(e) from None

    async def _complete(self, data: dict[str, Any]) -> web.Response:
        check_fields(data, {"model", "prompt", "max_tokens", "temperature", "seed", "stop", "n", "user"},
                     COMPLETION_DEFAULTS)
        self._check_model(data, CAUSAL_LM)
        if "prompt" not in data:
            raise APIError(400, "prompt is required", param="prompt")
        n = data.get("n")
        if n is not None and (not is_int(n) or n != 1):
            raise APIError(400, f"n must be 1 (one completion per prompt is supported), got {json.dumps(n):.40}",
                           param="n")
        max_tokens = get_int(data, "max_tokens", 16, 1, self.limits.max_new_tokens)
        temperature = get_temperature(data)
        seed = None if data.get("seed") is None else get_int(data, "seed", 0, 0, MAX_SEED - 1)
        stops = get_stops(data)
        prompts = await self._token_ids(get_inputs(data["prompt"], "prompt", self.limits.max_inputs), "prompt")
        context = self.backend.max_context
        for i, prompt in enumerate(prompts):
            if len(prompt) + max_tokens > context:
                where = "prompt" if len(prompts) == 1 else f"prompt {i}"
                raise APIError(400, f"{where} ({len(prompt)} tokens) + max_tokens ({max_tokens}) is over model "
                                    f"{self.backend.name}'s context of {context} tokens", param="max_tokens")
        stop_ids = self._stop_ids(stops)
        results = await asyncio.gather(*(self._generate(p, max_tokens, temperature, seed, stop_ids) for p in prompts),
                                       return_exceptions=True)
        choices, completion_tokens = [], 0
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                raise result
            tokens, finish = result
            text, cut = cut_at_stop(self.backend.text.decode(tokens), stops)
            choices.append({"text": text, "index": i, "logprobs": None,
                            "finish_reason": FINISH_STOP if cut else finish})
            completion_tokens += len(tokens)
        prompt_tokens = sum(len(p) for p in prompts)
        return self._json({"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                           "created": int(time.time()), "model": self.backend.name, "choices": choices,
                           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}})

    def _stop_ids(self, stops: list[str]) -> list[list[int]] | None:
        """The stop strings as id sequences, for the backend to stop early on; a string the vocabulary cannot spell
        can never be generated and is left out. Exact for byte-level text; a subword tokenizer may spell a string
        differently in context, so the text is cut at the string afterwards either way (cut_at_stop)."""
        ids = []
        for stop in stops:
            try:
                seq = self.backend.text.encode(stop, special_tokens=False)
            except ValueError:
                continue
            if seq:
                ids.append(seq)
        return ids or None

    async def _generate(self, prompt: list[int], max_tokens: int, temperature: float, seed: int | None,
                        stop: list[list[int]] | None) -> tuple[list[int], str]:
        async with self.generating:  # a request's prompts share the limit with every other request's
            return await self._backend_call(self.backend.generate(prompt, max_tokens, temperature, seed, stop))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest of ``stops`` (left out, as OpenAI leaves it out) and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


SERVING_KEY = web.AppKey("serving", ServingAPI)


async def start_http(backend: Backend, host: str, port: int, token_path: pathlib.Path | None, *,
                     require_token: bool | None = None, limits: Limits | None = None) -> tuple[web.AppRunner, str]:
    """Serve ``backend`` at ``host``:``port`` (0: any free port); (runner, the API's base URL, ``http://HOST:PORT/v1``).
    A token is required when ``require_token`` says so, or when it is None and ``needs_token(host)``: then a fresh one
    is written to ``token_path`` (0600) and every request must carry it. A port in use is a NodeError (EXIT_USAGE)."""
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ValueError(f"serving host must be a host name or address, got {host!r:.80}")
    if not is_int(port) or not 0 <= port <= 65535:
        raise ValueError(f"serving port must be an integer in [0, 65535], got {port!r}")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]" as written in a URL
    token = None
    if needs_token(host) if require_token is None else require_token:
        if token_path is None:
            raise ValueError(f"serving on {host} needs a token, and no token_path was given")
        token = secrets.token_urlsafe(32)
        atomic_write(pathlib.Path(token_path), token.encode(), mode=0o600)
    api = ServingAPI(backend, limits, token, token_hint=str(token_path))
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    shown = f"[{host}]" if ":" in host else host
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise NodeError(f"serving: cannot listen on {shown}:{port}: {e.strerror or e}", EXIT_USAGE) from None
    bound = runner.addresses[0][1]
    return runner, f"http://{shown}:{bound}/v1"
