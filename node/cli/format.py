"""What the swarmnode command prints for people: tables and progress lines, from the control API's messages.

    print(format_peers_table(client.peers()))      # PEER ID  ADDRESS  GPU ...
    print(format_job_line(info))                   # [######              ] round 9/30  running ...

``--json`` prints node/api/serde.py's dicts of the same messages instead.
"""

from __future__ import annotations

import pathlib
import time

from node.api.serde import capability_json


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _age(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f}s ago"


def table(header: list[str], rows: list[list[str]], footer: str) -> str:
    """Left-aligned columns two spaces apart, as wide as their widest cell, then a footer line."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([*lines, footer])


def format_peers_table(resp) -> str:
    header = ["PEER ID", "ADDRESS", "GPU", "VRAM", "CORES", "RAM", "TRAINS ON", "TFLOPS fp32/bf16", "VERSION",
              "LAST SEEN"]
    rows = []
    for p in resp.peers:
        cap = p.capability
        if cap.gpus:
            names = sorted({g.name for g in cap.gpus})
            gpu = f"{len(cap.gpus)}x {names[0]}" + ("" if len(names) == 1 else " (mixed)")
            vram = _gib(sum(g.memory_bytes for g in cap.gpus))
        else:
            gpu, vram = "none (CPU only)", "-"
        bf16 = f"{cap.tflops_bf16:.2f}" if cap.HasField("tflops_bf16") else "-"
        addr = ((p.addrs[0].split("/p2p/")[0] if p.addrs else "-")
                + (f" (+{len(p.addrs) - 1})" if len(p.addrs) > 1 else ""))
        if p.reachability == "private":  # its own addresses are behind a NAT: how others reach it instead
            addr = "NAT'd, via " + (", ".join(r[-8:] for r in p.relays) or "no relay")
        rows.append([p.peer_id + (" *" if p.is_self else ""), addr, gpu, vram, str(cap.cpu_cores), _gib(cap.ram_bytes),
                     train_device(cap), f"{cap.tflops_fp32:.3f}/{bf16}", p.version, _age(p.last_seen)])
    return table(header, rows, f"{len(rows)} node(s); * = this node")


def train_device(cap) -> str:
    """The device a node trains on and its free memory there, e.g. "cuda:0 (71.2 GiB free)"; "-" when unknown."""
    if not cap.train_device:
        return "-"
    free = f" ({_gib(cap.device_free_bytes)} free)" if cap.HasField("device_free_bytes") else ""
    return cap.train_device + free


def job_figures(info, with_round: bool = True) -> str:
    """A job's state in one line: round, state, participants, loss, metric, bytes and time of the last round."""
    loss = f"{info.train_loss:.4f}" if info.train_loss == info.train_loss else "-"
    metric = f"{info.eval_metric:.4f}" if info.eval_metric == info.eval_metric else "-"
    return (f"{f'round {info.round}/{info.rounds}  ' if with_round else ''}{info.state:<9} participants "
            f"{len(info.participants)}  loss {loss}  eval {metric}  {info.bytes_exchanged / 1e3:.1f} kB  "
            f"{info.round_time_s:.2f} s")


def format_job_line(info) -> str:
    """job_figures behind a text bar: what --follow prints off a terminal (node/cli/progress.py draws it live)."""
    bar = "#" * min(20, max(0, round(20 * info.round / max(1, info.rounds))))  # a peer may claim round > rounds
    return f"[{bar:<20}] {job_figures(info)}"


def format_jobs_table(resp) -> str:
    header = ["JOB ID", "NAME", "MODEL", "STATE", "ROUND", "PARTICIPANTS", "EVAL", "THIS NODE"]
    rows = [[j.job_id, j.name, j.summary, j.state, f"{j.round}/{j.rounds}", str(len(j.participants)),
             f"{j.eval_metric:.4f}" if j.eval_metric == j.eval_metric else "-",
             f"declined: {j.declined}" if j.declined else "-"] for j in resp.jobs]
    return table(header, rows, f"{len(rows)} job(s)")


NATTED = "no: behind a NAT, reached through relays (swarmnode doctor)"


def format_status(s) -> str:
    cap = capability_json(s.capability)
    gpus = ", ".join(f"{g['name']} ({_gib(g['memory_bytes'])}, cc {g['compute_capability']})" for g in cap["gpus"])
    lines = [f"peer id    {s.peer_id}", f"swarm      {s.swarm}", f"version    {s.version}",
             f"uptime     {s.uptime_s:.0f} s", f"peers      {s.peers_seen} at last read",
             f"heartbeat  {s.last_heartbeat_age_s:.1f} s ago",
             f"hardware   {gpus or 'CPU only'}; {cap['cpu_cores']} cores, {_gib(cap['ram_bytes'])} RAM, "
             f"{cap['tflops_fp32']:.3f} TFLOPS fp32", f"trains on  {train_device(s.capability)}",
             f"reachable  {NATTED if s.reachability == 'private' else 'yes'}; relayed {s.relay.bytes_relayed} "
             "bytes for others", f"dashboard  {s.dashboard or 'off'}",
             "addresses", *(f"  {a}" for a in s.addrs)]
    return "\n".join(lines)


def format_data_table(entries: list[dict], data_dir: pathlib.Path) -> str:
    header = ["NAME", "TASK", "TRAIN", "TEST", "ITEM", "CLASSES", "SLICE", "SCHEME"]
    rows = []
    for e in entries:
        if e["error"]:
            rows.append([e["name"], "unusable: " + e["error"], "", "", "", "", "", ""])
            continue
        item = "x".join(map(str, e["item_shape"])) + f" {e['dtype']}"
        rows.append([e["name"], e["task"], str(e["train"]), str(e["test"]), item, str(e["classes"] or "-"),
                     e["slice"], e["scheme"]])
    return table(header, rows, f"{len(rows)} dataset(s) in {data_dir}")


def format_sources_table(entries: list[dict]) -> str:
    """This node's own data sources (node/ml/user_data.py list_sources)."""
    header = ["NAME", "FORMAT", "ROWS", "SCHEMA", "HASH", "PATH"]
    rows = []
    for e in entries:
        if e["error"]:
            rows.append([e["name"], e.get("format", ""), "unusable: " + e["error"], "", "", e.get("path", "")])
            continue
        schema = ", ".join(f"{k}: {v}" for k, v in list(e["schema"].items())[:4])
        schema += f" (+{len(e['schema']) - 4})" if len(e["schema"]) > 4 else ""
        rows.append([e["name"], e["format"], str(e["rows"]), schema, e["schema_sha256"][:12], e["path"]])
    return table(header, rows, f"{len(rows)} own data source(s), read in place")


def format_doctor(resp) -> str:
    """`swarmnode doctor`'s report: this node, its relays, every peer, then what to do."""
    how = {"checked": "checked by peers dialling back", "assumed": "assumed: nobody could check",
           "set": "set with --reachability"}.get(resp.how, resp.how)
    lines = [f"reachability   {resp.reachability} ({how})",
             f"seen as        {', '.join(resp.seen_as) or '-'}",
             f"listening on   TCP {', '.join(map(str, resp.ports)) or '-'}; open from outside: "
             f"{', '.join(map(str, resp.open_ports)) or 'none'}",
             f"announces      {', '.join(resp.addrs) or '-'}"]
    lines += [f"asked          {line}" for line in resp.asked]
    if resp.relays or resp.reachability == "private":
        lines.append(f"relayed via    {', '.join(resp.relays) or 'no relay'}")
    lines += [f"relay dropped  {line}" for line in resp.relay_errors]
    r = resp.relay
    lines.append(f"relay service  {'on' if resp.relay_service else 'off'}: {r.reservations} reservation(s), "
                 f"{r.circuits} open / {r.circuits_total} circuit(s), {r.bytes_relayed} bytes relayed, "
                 f"{r.cut} cut, {r.refused} refused")
    rows = [[c.peer_id, c.reachability, c.route or "-", f"{c.rtt_ms:.1f}" if not c.error else "-",
             f"{c.throughput_bytes_s * 8 / 1e6:.1f}" if not c.error else "-", c.error or "ok"] for c in resp.peers]
    lines += ["", table(["PEER ID", "REACH", "ROUTE", "RTT ms", "Mbit/s", "STATUS"], rows,
                        f"{len(rows)} peer(s) checked")]
    lines += ["", *(f"- {line}" for line in resp.advice)]
    return "\n".join(lines)
