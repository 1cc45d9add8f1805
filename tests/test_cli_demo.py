"""`cones demo` end to end on the tiny model (slow: starts its own service and learns twice)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers.service import REPO, daemon_env, short_home


@pytest.mark.slow
def test_demo_runs_offline_and_prints_contact_sheets():
    home = short_home()   # no service runs here, so the demo starts its own
    out = subprocess.run([sys.executable, "-m", "cones_cli.main", "demo", "--model", "tiny", "--method", "cones2",
                          "--steps", "2", "--images", "2", "--sample-steps", "3"],
                         env=daemon_env(home), cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    sheets = re.findall(r"(\S+contact-sheet\.png)", out.stdout)
    assert len(sheets) == 3
    from PIL import Image

    for s in sheets:
        assert Image.open(s).size[0] > 32
    assert "probe" in out.stdout and "learning <redstar>" in out.stdout and "learning <bluering>" in out.stdout
    # both concepts' photos came with captions that say where each was taken (inbox sidecars for
    # the first, `Photo.caption` for the second), and the archive keeps them for the learn jobs
    from pathlib import Path

    kept = re.search(r"its files stay in (\S+)", " ".join((out.stdout + out.stderr).split()))
    assert kept, out.stderr
    archive = Path(kept.group(1)) / "data" / "archive"
    captions = sorted(p.read_text() for p in archive.glob("??/*.txt"))   # content-addressed
    assert len(captions) == 8, captions
    assert sum(c.startswith("a photo of a star ") for c in captions) == 4
    assert sum(c.startswith("a photo of a ring ") for c in captions) == 4


def test_a_demo_stopped_while_its_service_starts_stops_that_service(tmp_path, monkeypatch):
    """A review's find: Ctrl-C (or a failed start) while the temporary service loaded its model
    left that service running for good (it sits in a session of its own)."""
    from cones_cli import demo

    stopped = []

    class Starting:
        home = tmp_path

        def __init__(self, model):
            pass

        def wait_ready(self):
            raise KeyboardInterrupt

        def stop(self, keep_files):
            stopped.append(keep_files)

    monkeypatch.setenv("CONES_HOME", str(tmp_path / "home"))   # no service runs there
    monkeypatch.setattr(demo, "TempService", Starting)
    with pytest.raises(KeyboardInterrupt):
        demo.run(demo.Options(model=None, method=None, steps=None, images=1, seed=0))
    assert stopped == [True]


def test_the_demo_follows_the_learn_the_inbox_queued_not_an_earlier_one(tmp_path):
    """Against a running service that had learned <redstar> before (then removed), the demo
    followed that finished job and failed on the concept it had not waited for."""
    from cones_cli import demo
    from cns_daemon.api.protocol import JobInfo

    old = JobInfo(id="a" * 12, kind="learn", state="done", summary="learn <redstar> (cns)", created=0.0)
    new = JobInfo(id="b" * 12, kind="learn", state="running", summary="learn <redstar> (cns)", created=1.0)

    class Jobs:
        def jobs(self, limit):
            return [new, old]

    assert demo._wait_for_job(Jobs(), "learn <redstar>", tmp_path, {old.id}).id == new.id
