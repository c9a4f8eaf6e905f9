// The swarmnode dashboard: renders the node's snapshot (GET api/state, then every change from the server-sent
// events of api/events; node/api/dashboard.py). No library and nothing fetched from elsewhere: the page works
// offline. Every number shown is the snapshot's, which is what `swarmnode status|peers|jobs --json` print.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
const peerSeries = [];          // [time, live peers] as the page saw them
const peerEvents = [];          // "joined" / "left" lines, newest first
let knownPeers = null;          // peer ids of the previous snapshot
const lossPoints = {};          // job id -> Map(round -> loss): this node's report, then the progress records
const metricPoints = {};        // job id -> Map(round -> metric)

const short = (id) => (id ? `${id.slice(0, 8)}…${id.slice(-6)}` : "-");
const gib = (n) => (n == null ? "-" : `${(n / 2 ** 30).toFixed(1)} GiB`);
const num = (x, d = 4) => (x == null ? "-" : Number(x).toFixed(d));
const ago = (t, now) => (t ? `${Math.max(0, Math.round(now - t))} s ago` : "-");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function plot(canvas, series, label) {
  // series: [[x, y], ...] in order; draws a line with its last value; the points stay readable in data-points
  canvas.dataset.points = JSON.stringify(series);
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#4a5365";
  g.font = "11px system-ui";
  g.fillText(label, 4, 12);
  if (!series.length) return;
  const xs = series.map((p) => p[0]), ys = series.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (w - 2 * pad);
  const sy = (y) => h - pad / 2 - ((y - y0) / (y1 - y0 || 1)) * (h - pad * 1.5);
  g.strokeStyle = "#2f6fdf";
  g.beginPath();
  series.forEach(([x, y], i) => (i ? g.lineTo(sx(x), sy(y)) : g.moveTo(sx(x), sy(y))));
  g.stroke();
  const [lx, ly] = series[series.length - 1];
  g.fillText(`${Number(ly).toPrecision(5)}`, Math.min(sx(lx) + 4, w - 60), sy(ly) - 4);
}

function renderHost(state) {
  const host = state.host, rows = [
    ["peer id", state.status.peer_id], ["swarm", state.status.swarm],
    ["training device", state.status.capability.train_device || "-"],
    ["CPU", `${num(host.cpu_percent, 1)} %`],
    ["memory", `${gib(host.memory_used_bytes)} of ${gib(host.memory_total_bytes)}`],
    ["uptime", `${Math.round(state.status.uptime_s)} s`],
  ];
  for (const gpu of host.gpus) {
    rows.push([`GPU ${gpu.index}`, `${gpu.name}: ${gpu.utilization_percent} %, ` +
      `${gib(gpu.memory_used_bytes)} of ${gib(gpu.memory_total_bytes)}`]);
  }
  document.querySelector("#host tbody").replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", {}, k),
    el("td", {}, v))));
  document.getElementById("node").textContent = `${short(state.status.peer_id)} in swarm ${state.status.swarm}`;
}

function renderRejected(state) {
  const rows = (state.rejected || []).map((r) => el("tr", {}, el("td", {}, r.what), el("td", {}, r.reason),
    el("td", {}, r.count)));
  document.querySelector("#rejected tbody").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 3, class: "muted" }, "nothing"))]));
}

function renderPeers(state) {
  const now = state.time, ids = new Set(state.peers.map((p) => p.peer_id));
  if (knownPeers) {
    for (const id of ids) if (!knownPeers.has(id)) peerEvents.unshift(`${new Date(now * 1000).toLocaleTimeString()} joined ${short(id)}`);
    for (const id of knownPeers) if (!ids.has(id)) peerEvents.unshift(`${new Date(now * 1000).toLocaleTimeString()} left ${short(id)}`);
  }
  knownPeers = ids;
  peerSeries.push([now, state.peers.length]);
  const rows = state.peers.map((p) => el("tr", { class: p.is_self ? "self" : "", "data-peer": p.peer_id },
    el("td", {}, short(p.peer_id) + (p.is_self ? " (this node)" : "")),
    el("td", {}, p.capability.train_device || (p.capability.gpus.length ? p.capability.gpus[0].name : "cpu")),
    el("td", {}, gib(p.capability.device_free_bytes ?? p.capability.ram_bytes)),
    el("td", {}, num(p.capability.tflops_fp32, 2)), el("td", {}, p.capability.cpu_cores),
    el("td", {}, p.reachability), el("td", {}, ago(p.last_seen, now))));
  document.querySelector("#peers tbody").replaceChildren(...rows);
  document.getElementById("peer-count").textContent = `${state.peers.length} live` +
    (peerEvents.length ? ` · ${peerEvents.slice(0, 5).join(" · ")}` : "");
  plot(document.getElementById("peer-curve"), peerSeries.map(([t, n]) => [t - peerSeries[0][0], n]),
    "live peers over time (s)");
}

function renderJob(job, state) {
  const losses = (lossPoints[job.job_id] ??= new Map()), metrics = (metricPoints[job.job_id] ??= new Map());
  const applied = job.history.filter((e) => e.ok);  // the k-th applied round leaves k rounds completed
  applied.forEach((e, i) => {
    if (e.train_loss != null && !losses.has(i + 1)) losses.set(i + 1, e.train_loss);
    const m = Object.values(e.metrics || {})[0];
    if (m != null && !metrics.has(i + 1)) metrics.set(i + 1, m);
  });
  if (job.round > 0 && job.train_loss != null) losses.set(job.round, job.train_loss);  // the progress records'
  if (job.round > 0 && job.eval_metric != null) metrics.set(job.round, job.eval_metric);
  const byRound = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  const box = el("div", { class: "job", id: `job-${job.job_id}`, "data-state": job.state, "data-round": job.round });
  box.append(el("h3", {}, `${job.name} `, el("span", { class: "muted" }, `${job.job_id} · ${job.summary}`)));
  const last = applied.slice(-1)[0];
  box.append(el("div", { class: "figures" },
    el("span", {}, `state ${job.state}`), el("span", { class: "round" }, `round ${job.round}/${job.rounds}`),
    el("span", {}, `participants ${job.participants.length}`), el("span", {}, `loss ${num(job.train_loss)}`),
    el("span", {}, `eval ${num(job.eval_metric)}`), el("span", {}, `${(job.bytes_exchanged / 1e3).toFixed(1)} kB`),
    el("span", {}, `${num(job.round_time_s, 2)} s per round`),
    el("span", {}, `this node: ${job.local_round == null ? "not taking part" : `round ${job.local_round}`}`)));
  const loss = el("canvas", { class: "loss", width: 420, height: 140 });
  const metric = el("canvas", { class: "metric", width: 420, height: 140 });
  const group = el("canvas", { class: "participants", width: 420, height: 140 });
  box.append(loss, metric, group);
  plot(loss, byRound(losses), "training loss per round");
  plot(metric, byRound(metrics), "eval metric per round");
  plot(group, applied.map((e, i) => [i + 1, e.participants.length]), "participants per round");
  if (last) {
    const moved = last.bytes_exchanged ?? last.bytes_sent + last.bytes_received;
    box.append(el("div", { class: "muted" }, `last round here: ${num(last.seconds, 2)} s, ` +
      `${(moved / 1e3).toFixed(1)} kB ${last.bytes_exchanged == null ? "sent + received" : "of activations relayed"}`));
  }
  const steps = applied.filter((e) => e.stage_load_s);  // a pipeline job's steps, trained from this node
  if (steps.length) {
    const speed = el("canvas", { class: "throughput", width: 420, height: 140 });
    box.append(speed, el("div", { class: "throughput-now" },
      `${num(steps.slice(-1)[0].tokens_per_s, 1)} tokens/s in the last step`));
    plot(speed, steps.map((e) => [e.round, e.tokens_per_s]), "tokens per second per step");
  }
  if (job.declines.length) {
    box.append(el("h3", {}, "declined"), el("ul", { class: "declines" },
      ...job.declines.map((d) => el("li", {}, `${short(d.peer_id)}: ${d.reason}`))));
  }
  if (job.exclusions.length) {
    box.append(el("h3", {}, "excluded (byzantine)"), el("ul", { class: "exclusions" },
      ...job.exclusions.map((x) => el("li", {}, `${short(x.peer_id)} by ${short(x.by)}: ${x.evidence}`))));
  }
  if (job.stage_hosts) {
    const step = steps.slice(-1)[0];  // load: seconds of hops per serving replica in the last step
    const table = el("table", { class: "stages" }, el("tr", {}, el("th", {}, "stage"), el("th", {}, "hosts"),
      el("th", {}, "replicas serving"), el("th", {}, "load (s)")));
    job.stage_hosts.forEach((hosts, i) => table.append(el("tr", {
      class: step && step.bottleneck_stage === i ? "bottleneck" : "", "data-stage": i },
    el("td", {}, step && step.bottleneck_stage === i ? `${i} (bottleneck)` : i),
    el("td", {}, hosts.map(short).join(", ")), el("td", {}, step ? step.stage_replicas[i] : "-"),
    el("td", {}, step ? num(step.stage_load_s[i], 3) : "-"))));
    box.append(el("h3", {}, "stages"), table);
  }
  return box;
}

function alerts(state) {
  const out = [];
  for (const job of state.jobs) {
    const last = job.history.slice(-1)[0];
    if (last && !last.ok && !last.paused && job.state === "running") {
      out.push(`job ${job.name}: round ${last.round} failed on this node: ${last.error || "no aggregate"}`);
    }
    if (job.local_round != null && job.state === "running" && job.local_round + 1 < job.round) {
      out.push(`job ${job.name}: this node is behind (round ${job.local_round} of the swarm's ${job.round})`);
    }
  }
  document.getElementById("alerts").replaceChildren(...out.map((a) => el("div", { class: "alert" }, a)));
}

function render(state) {
  renderHost(state);
  renderRejected(state);
  renderPeers(state);
  document.getElementById("jobs").replaceChildren(...state.jobs.map((j) => renderJob(j, state)));
  alerts(state);
  document.body.dataset.updated = String(state.time);
}

function connect() {
  const live = document.getElementById("live");
  const events = new EventSource(withToken("api/events"));
  events.onmessage = (m) => {
    live.textContent = "live";
    live.className = "live";
    render(JSON.parse(m.data));
  };
  events.onerror = () => {
    live.textContent = "reconnecting";
    live.className = "live off";
  };
}

fetch(withToken("api/state")).then((r) => r.json()).then(render).finally(connect);
