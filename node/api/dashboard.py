"""The dashboard: a web page of the swarm, its jobs and this node, live, and GET /metrics, served by aiohttp in the
daemon's own event loop over any NodeService (node/api/service.py), like the gRPC control API beside it.

    runner, url = await start_dashboard(daemon, config)   # config.dashboard: HOST:PORT, port 0 for any free one
    ...
    await runner.cleanup()

    GET /                 the page (node/api/static/: HTML, script and style shipped in the package)
    GET /api/state        the snapshot below, as JSON
    GET /api/events       the same snapshot as server-sent events, one each time it changes (and every 15 s)
    GET /metrics          the snapshot in Prometheus' text format (node/api/metrics.py)

The snapshot is made of the control API's own messages turned into the dicts ``--json`` prints (node/api/serde.py:
status, peers, every job), each job with this node's report of its rounds (the entries of its export's
report.json), plus this machine's CPU, memory and, where NVML answers (nvidia-ml-py), GPU use. So every number on
the page is one ``swarmnode status|peers|jobs --json`` prints.

Bound to loopback the dashboard answers anyone on this machine, as the page's URL is only reachable here; bound
to any other address every request needs the token of ``<home>/dashboard.token`` (0600, written at start), as
``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (the page passes on its own ``?token=``): 401 otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import time
from importlib import resources

import psutil
from aiohttp import web

from node.api.metrics import metrics_text
from node.api.serde import job_json, job_to_proto, peers_json, peers_to_proto, status_json, status_to_proto
from node.api.service import NodeService
from node.runtime.config import NodeConfig
from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from protocol import rejections

logger = logging.getLogger(__name__)
SNAPSHOT_TTL_S = 1.0  # one snapshot serves every request and event stream within this long
SHUTDOWN_S = 0.5  # open event streams are cut after this long when the daemon stops
EVENT_HEARTBEAT_S = 15.0  # an unchanged snapshot is sent again this often (proxies drop silent streams)
MAX_HISTORY = 2000  # rounds of a job's report on the page (the newest)
STATIC = ("index.html", "dashboard.js", "dashboard.css")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def finite(obj):
    """``obj`` with every NaN or infinity replaced by None (the page's JSON.parse takes no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def host_usage() -> dict:
    """This machine's CPU and memory (psutil) and each GPU's utilisation and memory where NVML answers."""
    mem = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None), "memory_used_bytes": mem.total - mem.available,
            "memory_total_bytes": mem.total, "gpus": gpu_usage()}


def gpu_usage() -> list[dict]:
    try:
        import pynvml  # nvidia-ml-py, when installed (not a dependency: most volunteers' nodes have no NVIDIA GPU)
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver on this machine  # noqa: BLE001 (NVMLError has many subclasses)
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem, util = pynvml.nvmlDeviceGetMemoryInfo(handle), pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append({"index": i, "name": str(pynvml.nvmlDeviceGetName(handle)), "utilization_percent": util.gpu,
                         "memory_used_bytes": mem.used, "memory_total_bytes": mem.total})
        return gpus
    finally:
        pynvml.nvmlShutdown()


async def snapshot(service: NodeService) -> dict:
    """Everything the page shows, from the control API's messages as ``--json`` prints them."""
    status = status_json(status_to_proto(service.status()))
    peers = peers_json(peers_to_proto(await service.peers(), service.peer_id))
    jobs = []
    for summary in await service.list_jobs():
        job = job_json(job_to_proto(summary))
        job["history"] = service.job_history(job["job_id"])[-MAX_HISTORY:]
        jobs.append(job)
    host = await asyncio.to_thread(host_usage)
    refused = [{"what": what, "reason": why, "count": n} for (what, why), n in sorted(rejections.counts().items())]
    return finite({"status": status, "peers": peers, "jobs": jobs, "host": host, "rejected": refused,
                   "time": time.time()})


class Dashboard:
    def __init__(self, service: NodeService, token: str | None):
        self.service, self.token = service, token
        self._state: dict | None = None
        self._taken = -math.inf
        self._lock = asyncio.Lock()

    async def state(self) -> dict:
        async with self._lock:  # concurrent requests share one snapshot
            if time.monotonic() - self._taken >= SNAPSHOT_TTL_S:
                self._state, self._taken = await snapshot(self.service), time.monotonic()
            assert self._state is not None
            return self._state

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.token is not None:
            given = request.query.get("token", "")
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[len("Bearer "):]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(text="missing or wrong dashboard token (<home>/dashboard.token)\n")
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return self._file(name)

    @staticmethod
    def _file(name: str) -> web.Response:
        body = resources.files("node.api").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=CONTENT_TYPES[name[name.rfind("."):]], charset="utf-8")

    async def _api_state(self, request: web.Request) -> web.Response:
        return web.json_response(await self.state())

    async def _metrics(self, request: web.Request) -> web.Response:
        body = metrics_text(await self.state())
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        last, sent_at, seen = None, -math.inf, None
        while True:
            state = await self.state()
            if state is seen and time.monotonic() - sent_at < EVENT_HEARTBEAT_S:  # the same snapshot: nothing new
                await asyncio.sleep(SNAPSHOT_TTL_S)
                continue
            seen = state
            body = json.dumps({k: v for k, v in state.items() if k != "time"}, sort_keys=True)
            if body != last or time.monotonic() - sent_at >= EVENT_HEARTBEAT_S:
                try:
                    await response.write(f"data: {json.dumps(state)}\n\n".encode())
                except (ConnectionResetError, RuntimeError):  # the page went away
                    return response
                last, sent_at = body, time.monotonic()
            await asyncio.sleep(SNAPSHOT_TTL_S)


async def start_dashboard(service: NodeService, config: NodeConfig) -> tuple[web.AppRunner, str] | None:
    """Serve the dashboard at ``config.dashboard``; (runner, its URL), or None when it is "off". Off loopback,
    a fresh token is written to <home>/dashboard.token and the URL carries it."""
    address = config.dashboard_address()
    if address is None:
        return None
    host, port = address
    token = None if config.dashboard_is_loopback() else secrets.token_urlsafe(32)
    if token is not None:
        atomic_write(config.dashboard_token_path, token.encode(), mode=0o600)
    runner = web.AppRunner(Dashboard(service, token).app(), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise NodeError(f"dashboard: cannot listen on {config.dashboard}: {e.strerror or e}", EXIT_USAGE) from None
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token is not None else "")
    return runner, url
