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
