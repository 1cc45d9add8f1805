"""The built package, not the checkout: every tracked file of the three packages is in the
wheel, and the wheel alone renders and reads a toy-world photo from outside the source tree
(the tests otherwise import the checkout, so a data file a new folder held would be left out of
the wheel without a word)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs `cones` (sys.argv after -c) without the editable install's finder, then prints the files
# of the project's modules it loaded.
WHEEL_ONLY = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.argv[0] = "cones"
try:
    runpy.run_module("cones_cli.main", run_name="__main__")
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print("MODULES", *sorted({m.__file__ for n, m in list(sys.modules.items())
                          if n.split(".")[0] in ("cns_daemon", "cones_store", "cones_cli")
                          and getattr(m, "__file__", None)}))
"""
PACKAGES = ("cns_daemon", "cones_store", "cones_cli")


def tracked(*paths: str) -> list[str]:
    try:
        run = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, timeout=60)
    except OSError:   # no git here
        pytest.skip("git is not installed: the tracked files are unknown")
    if run.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [p for p in run.stdout.decode().split("\0") if p]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tracked files (the build writes build/ and egg-info
    where it runs)."""
    src = tmp_path_factory.mktemp("src")
    for rel in tracked(*PACKAGES, "pyproject.toml", "MANIFEST.in", "README.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(out), str(src)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return next(out.glob("cones-*.whl"))


def test_the_wheel_holds_every_tracked_file_of_the_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p for p in tracked(*PACKAGES) if not p.endswith(".gitignore")}
    assert wanted - names == set()
    assert not {n for n in names if "__pycache__" in n or n.endswith(".pyc")}
    assert any(n.endswith("entry_points.txt") for n in names)


def test_the_wheel_alone_renders_and_reads_a_toy_world_photo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"   # outside the source tree: nothing found there by accident
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}

    def cones(*args: str) -> str:
        """`cones ARGS` with the checkout's editable install out of the way (its finder answers
        for any module the wheel lacks), then a check that every project module came from the
        wheel."""
        run = subprocess.run([sys.executable, "-P", "-c", WHEEL_ONLY, *args], cwd=work, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        out, _, loaded = run.stdout.rpartition("MODULES ")
        loaded = loaded.split()
        assert any(m.endswith("/cns_daemon/__init__.py") for m in loaded), loaded
        assert all(Path(m).is_relative_to(site) for m in loaded), [m for m in loaded if not Path(m).is_relative_to(site)]
        return out

    cones("toyworld", "render", "--shape", "star", "--color", "red", "--pattern", "stripes",
          "--second-color", "yellow", "-n", "2", "--out", str(work / "photos"))
    photos = sorted((work / "photos").glob("*.png"))
    assert len(photos) == 2
    read = cones("toyworld", "probe", *map(str, photos))
    assert read.count("star") >= 2 and "red" in read, read
