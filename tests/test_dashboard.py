"""node/api/dashboard.py and node/api/metrics.py without a swarm: the --dashboard setting, the token off loopback,
the shipped page, and a snapshot rendered as Prometheus text and read back with prometheus_client's own parser.
tests/test_dashboard_live.py runs the dashboard of real daemons training a real job."""

from __future__ import annotations

import asyncio
import math
import stat
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.api.dashboard import finite, start_dashboard
from node.api.metrics import metrics_text
from node.runtime.config import NodeConfig


def entry(r: int, ok: bool = True, seconds: float = 1.5, sent: int = 4000, received: int = 6000) -> dict:
    """One round of a report.json, as node/jobs/federated/export.py round_entry writes it."""
    return {"round": r, "ok": ok, "error": None if ok else "no group", "participants": ["a", "b"],
            "train_loss": 0.5, "samples": 64, "metrics": {"accuracy": 0.9}, "bytes_sent": sent,
            "bytes_received": received, "seconds": seconds, "local_seconds": 1.0, "model_hash": "ab" * 32,
            "paused": False, "reported_by": "me"}


def state(jobs: list[dict], peers: int = 3, gpus: list[dict] | None = None) -> dict:
    return {"status": {}, "peers": [{"peer_id": f"p{i}"} for i in range(peers)], "jobs": jobs, "time": 0.0,
            "host": {"cpu_percent": 12.5, "memory_used_bytes": 2**30, "memory_total_bytes": 2**34, "gpus": gpus or []}}


def job(job_id: str, job_state: str, history: list[dict], round_: int) -> dict:
    return {"job_id": job_id, "state": job_state, "round": round_, "history": history}


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def value(family, name: str, **labels) -> float:
    hits = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, family.samples)
    return hits[0]


def test_metrics_count_each_jobs_rounds_by_outcome_and_bucket_their_time_and_bytes():
    history = [entry(0), entry(1, ok=False), entry(2, seconds=0.2, sent=400, received=500), entry(3, seconds=40.0)]
    text = metrics_text(state([job("j1", "running", history, 3), job("j2", "done", [], 5)],
                              gpus=[{"index": 0, "utilization_percent": 87, "memory_used_bytes": 5 * 2**30}]))
    f = families(text)
    assert value(f["swarmnode_peers"], "swarmnode_peers") == 3
    assert value(f["swarmnode_jobs"], "swarmnode_jobs", state="running") == 1
    assert value(f["swarmnode_jobs"], "swarmnode_jobs", state="done") == 1
    assert value(f["swarmnode_jobs"], "swarmnode_jobs", state="cancelled") == 0
    rounds = f["swarmnode_rounds"]
    assert value(rounds, "swarmnode_rounds_total", job_id="j1", outcome="ok") == 3
    assert value(rounds, "swarmnode_rounds_total", job_id="j1", outcome="failed") == 1
    assert value(rounds, "swarmnode_rounds_total", job_id="j2", outcome="ok") == 0
    assert value(f["swarmnode_job_round"], "swarmnode_job_round", job_id="j2") == 5
    seconds = f["swarmnode_round_seconds"]
    assert value(seconds, "swarmnode_round_seconds_count", job_id="j1") == 3  # applied rounds only
    assert value(seconds, "swarmnode_round_seconds_bucket", job_id="j1", le="0.25") == 1
    assert value(seconds, "swarmnode_round_seconds_bucket", job_id="j1", le="2.5") == 2
    assert value(seconds, "swarmnode_round_seconds_bucket", job_id="j1", le="+Inf") == 3
    assert math.isclose(value(seconds, "swarmnode_round_seconds_sum", job_id="j1"), 41.7)
    sizes = f["swarmnode_round_bytes"]
    assert value(sizes, "swarmnode_round_bytes_bucket", job_id="j1", le="1000.0") == 1
    assert value(sizes, "swarmnode_round_bytes_sum", job_id="j1") == 10000 + 900 + 10000
    assert value(f["swarmnode_host_cpu_percent"], "swarmnode_host_cpu_percent") == 12.5
    assert value(f["swarmnode_gpu_utilization_percent"], "swarmnode_gpu_utilization_percent", gpu="0") == 87


def test_nan_and_infinity_become_null_for_the_page():
    assert finite({"a": [math.nan, 1.0, {"b": math.inf}], "c": "x"}) == {"a": [None, 1.0, {"b": None}], "c": "x"}


@pytest.mark.parametrize("setting, address, loopback", [
    ("127.0.0.1:0", ("127.0.0.1", 0), True), ("127.0.0.2:8080", ("127.0.0.2", 8080), True),
    ("[::1]:9000", ("::1", 9000), True), ("localhost:1", ("localhost", 1), True),
    ("0.0.0.0:0", ("0.0.0.0", 0), False), ("192.0.2.7:80", ("192.0.2.7", 80), False),
    ("node.example:80", ("node.example", 80), False), ("off", None, False)])
def test_the_dashboard_setting(setting, address, loopback, tmp_path):
    config = NodeConfig(home=tmp_path, dashboard=setting)
    assert config.dashboard_address() == address and config.dashboard_is_loopback() is loopback


@pytest.mark.parametrize("setting", ["", "8080", ":8080", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:-1",
                                     "127.0.0.1:http", "a b:80"])
def test_a_malformed_dashboard_setting_is_refused_in_one_line(setting, tmp_path):
    with pytest.raises(ValueError, match="dashboard must be HOST:PORT"):
        NodeConfig(home=tmp_path, dashboard=setting)


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def serve(config: NodeConfig, check) -> None:
    """Start the dashboard (no service behind it: these requests never reach one), run ``check(url)`` in a thread."""
    async def main():
        started = await start_dashboard(None, config)  # type: ignore[arg-type]
        assert started is not None
        runner, url = started
        try:
            await asyncio.to_thread(check, url)
        finally:
            await runner.cleanup()
    asyncio.run(main())


def test_off_loopback_every_request_needs_the_token(tmp_path):
    config = NodeConfig(home=tmp_path, dashboard="0.0.0.0:0")

    def check(url: str) -> None:
        token = (tmp_path / "dashboard.token").read_text()
        assert stat.S_IMODE((tmp_path / "dashboard.token").stat().st_mode) == 0o600
        assert url.endswith(f"/?token={token}")
        local = url.replace("0.0.0.0", "127.0.0.1").split("?")[0]  # reached over loopback, as a client would
        for path in ("", "metrics", "api/state", "api/events", "static/dashboard.js"):
            status, body = get(local + path)
            assert status == 401 and b"dashboard token" in body, (path, status)
            assert get(local + path + "?token=wrong")[0] == 401
            assert get(local + path, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(local + "static/dashboard.css", {"Authorization": f"Bearer {token}"})[0] == 200
        status, body = get(local + f"?token={token}")
        assert status == 200 and b'src="static/dashboard.js"' in body

    serve(config, check)


def test_on_loopback_the_page_and_its_assets_are_served_and_nothing_else(tmp_path):
    def check(url: str) -> None:
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        assert not (tmp_path / "dashboard.token").exists()
        status, page = get(url)
        assert status == 200 and b"<title>swarmnode</title>" in page
        for name in ("dashboard.js", "dashboard.css"):
            assert get(url + "static/" + name)[0] == 200
        for path in ("static/../dashboard.py", "static/dashboard.py", "static/%2e%2e%2fdashboard.py", "nothing"):
            assert get(url + path)[0] == 404, path

    serve(NodeConfig(home=tmp_path, dashboard="127.0.0.1:0"), check)


def test_a_dashboard_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    from node.runtime.errors import NodeError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(NodeError, match=f"dashboard: cannot listen on 127.0.0.1:{port}"):
            asyncio.run(start_dashboard(None, NodeConfig(home=tmp_path, dashboard=f"127.0.0.1:{port}")))  # type: ignore[arg-type]


def test_refusals_are_counted_by_what_and_the_errors_class_and_bounded(monkeypatch):
    from collections import Counter

    from protocol import rejections
    from protocol.wire import WireError

    # the process's own counts stay as they were: filling them to MAX_KEYS here would leave later tests no room
    monkeypatch.setattr(rejections, "_counts", Counter(rejections.counts()))
    before = rejections.counts()
    rejections.count("test record", WireError("a peer's long and varying text " * 10))
    rejections.count("test record", WireError("another text"))
    after = rejections.counts()
    assert after[("test record", "WireError")] == before.get(("test record", "WireError"), 0) + 2
    assert all(len(reason) < 40 for _, reason in after)  # class names, never a peer's text
    for i in range(rejections.MAX_KEYS + 10):
        rejections.count(f"kind {i}", "X")
    assert len(rejections.counts()) == rejections.MAX_KEYS
    text = metrics_text(state([]) | {"rejected": [{"what": "peer record", "reason": "InvalidSignature",
                                                      "count": 4}]})
    assert value(families(text)["swarmnode_rejected"], "swarmnode_rejected_total", what="peer record",
                 reason="InvalidSignature") == 4
