"""How the CLI shows a followed job: every phase's row ends full or is gone, none is left at
0/1 or spinning after the job finished."""
from __future__ import annotations

import io

from rich.console import Console

from cli.views import follow
from cns_daemon.api.protocol import ProgressInfo


def events(job="0123456789ab"):
    yield ProgressInfo(job=job, state="queued")
    yield ProgressInfo(job=job, state="running", phase="start")
    yield ProgressInfo(job=job, state="running", phase="prepare", step=0, total=1, message="token sks")
    yield ProgressInfo(job=job, state="running", phase="class-images", step=1, total=4)
    yield ProgressInfo(job=job, state="running", phase="waiting")   # no step count: a spinner
    yield ProgressInfo(job=job, state="running", phase="select", step=0, total=1)
    for k in range(4):
        yield ProgressInfo(job=job, state="running", phase="train", step=k, total=3, loss=0.5)
    yield ProgressInfo(job=job, state="done")


def test_finished_phases_are_full_or_gone():
    out = io.StringIO()
    follow(events(), console=Console(file=out, width=100, force_terminal=False))
    rows = {line.split()[0]: line for line in out.getvalue().splitlines() if line.strip()}
    for phase, count in (("prepare", "1/1"), ("class-images", "4/4"), ("select", "1/1"), ("train", "3/3")):
        assert count in rows[phase], out.getvalue()
    assert "waiting" not in rows and "queued" not in rows and "start" not in rows, out.getvalue()
