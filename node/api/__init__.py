"""The local control API (CLI <-> daemon), package swarmnode.v1 of proto/swarmnode/v1/control.proto.

    service.py  NodeService (what the daemon serves, in Python terms), NodeStatus, JobSummary, the token convention
    server.py   ControlServicer over any NodeService; start_control_server (0600 Unix socket, or TCP + token)
    client.py   ControlClient: what the CLI uses to reach a running daemon
    serde.py    the one place that converts protobuf messages to and from Python (x_to_proto) and JSON (x_json)
    dashboard.py  the dashboard page, its JSON snapshot and event stream, GET /metrics (aiohttp, same NodeService)
    metrics.py  the snapshot in Prometheus' text format (prometheus_client)
    static/     the page's HTML, script and style, shipped in the package (nothing fetched at run time)
    rpc/        protoc's generated code (``make protos``; tests/test_protos.py fails when it is stale)
"""
