"""What one pipeline step says about the pipeline's speed: tokens per second, each stage's load, the bottleneck.

    entry = step_entry(report, completed, tokens, participants, metric, bytes_, reporter)
    entry["tokens_per_s"], entry["stage_load_s"], entry["bottleneck_stage"]

A stage's load is the time its hops took during the step (StepReport.stage_busy: request to checked reply as the
trainer saw them, forward and backward, so the stage's compute and the network to it) divided by the replicas of
that stage that ended the step, which serve the step's micro-batches side by side. The stage with the most load per
replica is the bottleneck: the one whose next replica would speed the step up most (protocol/planning/stage_assign.py
sends newcomers there). Pure arithmetic, no I/O: the trainer's job loop (pipeline_jobs.py) keeps one entry per step
as the job's history, which the dashboard draws and pipeline.json keeps.
"""

from __future__ import annotations

from node.jobs.pipeline.steps import StepReport


def stage_loads(busy: tuple[float, ...], replicas: list[int]) -> list[float]:
    """Seconds of hops per serving replica, per stage (a stage none of whose replicas ended the step counts one)."""
    return [b / max(1, r) for b, r in zip(busy, replicas)]


def bottleneck(loads: list[float]) -> int | None:
    """The index of the most loaded stage (the first on ties); None without figures."""
    if not loads or max(loads) <= 0.0:
        return None
    return max(range(len(loads)), key=lambda i: (loads[i], -i))


def step_entry(report: StepReport, completed: int, tokens: int, participants: tuple[str, ...],
               metric: float | None, bytes_: int, reporter: str) -> dict:
    """The history entry of one completed step, with the keys a federated round's entry has where they mean the
    same (round, ok, train_loss, metrics, participants, seconds, reported_by) and the pipeline's own figures."""
    replicas = [len(st.hashes) for st in report.stages]
    loads = stage_loads(report.stage_busy, replicas)
    return {"round": completed, "ok": True, "train_loss": report.loss,
            "metrics": {} if metric is None else {"eval_bits_per_byte": metric},
            "participants": list(participants), "seconds": report.seconds, "bytes_exchanged": bytes_,
            "tokens": tokens, "tokens_per_s": tokens / report.seconds if report.seconds > 0 else None,
            "micro_batches": report.micro_batches, "retries": report.retries,
            "stage_busy_s": list(report.stage_busy), "stage_replicas": replicas, "stage_load_s": loads,
            "bottleneck_stage": bottleneck(loads), "reported_by": reporter}
