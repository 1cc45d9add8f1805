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
    out = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--model", "tiny", "--method", "cones2",
                          "--steps", "2", "--images", "2", "--sample-steps", "3"],
                         env=daemon_env(home), cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    sheets = re.findall(r"(\S+contact-sheet\.png)", out.stdout)
    assert len(sheets) == 3
    from PIL import Image

    for s in sheets:
        assert Image.open(s).size[0] > 32
    assert "probe" in out.stdout and "learning <redstar>" in out.stdout and "learning <bluering>" in out.stdout
