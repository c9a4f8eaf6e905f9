"""The live display of ``swarmnode submit --follow`` / ``job ID --follow`` on a terminal, drawn by rich: a bar over
the job's rounds with the time left at the pace of the rounds seen while following, the figures of format.py's job
line beside it, and each decline or exclusion printed above the bar as it first appears.

    with JobDisplay(console) as display:         # console: rich.console.Console, a terminal
        for info, notes in updates:              # control_pb2.JobInfo messages, as the daemon streams them
            display.show(info, notes)

Off a terminal (a pipe, a log file, CI) the commands print format.py's lines instead, one per change, and with
``--json`` node/api/serde.py's dicts: only people watching a terminal get the live bar.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from node.cli.format import job_figures

ETA_WINDOW_S = 3600.0  # the pace behind the time left: the rounds completed within the last hour of following


class JobDisplay:
    def __init__(self, console: Console, clock: Callable[[], float] | None = None):
        """``clock``: seconds, for the pace (rich's monotonic clock when None)."""
        self.progress = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[figures]}", markup=False), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, speed_estimate_period=ETA_WINDOW_S,
                                 get_time=clock)
        self.task: TaskID | None = None

    def __enter__(self) -> JobDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def show(self, info, notes: list[str]) -> None:
        """One state of the job: the bar moves to its round (a peer may claim more rounds than the job has: capped);
        notes (declines, exclusions) go above the bar."""
        for note in notes:
            self.progress.console.print(note, highlight=False, markup=False)
        rounds = max(1, info.rounds)
        done = min(info.round, rounds)
        figures = job_figures(info, with_round=False)  # "round r/n": the bar's own columns
        if self.task is None:  # the rounds done before following started count as done, not as pace
            self.task = self.progress.add_task("job", total=rounds, completed=done, figures=figures)
        else:
            self.progress.update(self.task, total=rounds, completed=done, figures=figures)
