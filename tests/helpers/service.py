"""Support for the service tests (no tests here): a real daemon process in a temporary
CONES_HOME, photos drawn with numpy, and a FakeEngine for tests about the service itself
(queue, protocol, inbox, restarts) rather than about learning.

The FakeEngine is a test double, run only by this file's `serve` entry point; the shipped daemon
always uses cns_daemon.engine.Engine. It stores real (empty) concept records in the real store,
takes a configurable time per step and honours cancel like a method does.

Run as a script: `python tests/helpers/service.py serve` starts a daemon with the FakeEngine.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cns_daemon.engine import Engine, EngineInfo  # noqa: E402
from cns_daemon.outputs import generation_caption, save_images  # noqa: E402
from cns_daemon.api.errors import BadPhoto, Conflict  # noqa: E402
from cns_daemon.methods.base import ProgressReporter  # noqa: E402
from cns_daemon.api.protocol import JobResult  # noqa: E402
from cones_store.records import ConceptMeta, ConceptRecord  # noqa: E402


def photo_bytes(seed: int, size: int = 48, fmt: str = "PNG") -> bytes:
    """A distinct small picture: a coloured disc on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    img[disc] = rng.integers(100, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def write_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"photo{i}.png"
        p.write_bytes(photo_bytes(seed + i))
        paths.append(p)
    return paths


class FakeEngine(Engine):
    """Engine with the model parts replaced by sleeps; everything else (store, archive,
    prompt checks with the real CLIP tokenizer) is the real thing."""

    step_s = float(os.environ.get("CONES_TEST_STEP_S", "0.02"))
    FAILING_CLASS = "unlearnable"   # a learn job for this class word fails when it runs
    NOTED_CLASS = "noted"           # ... and for this one its record carries a note

    def start(self) -> None:
        from types import SimpleNamespace

        from cns_daemon.tokenizer import clip_tokenizer

        # The tokenizer, the native image size (32 px) and the scheduler's timesteps are what
        # the request checks read.
        self.pipe = SimpleNamespace(
            tokenizer=clip_tokenizer(), vae_scale_factor=2,
            unet=SimpleNamespace(config=SimpleNamespace(sample_size=16)),
            scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000, steps_offset=1)))
        self.live: list[str] = []   # the CNS concepts "in the weights"
        self.info = EngineInfo(model="fake", device="cpu", dtype="float32", fingerprint="f" * 32)
        self.store.bind(self.info.fingerprint)
        self.rebuild()

    def _apply_resident(self, record) -> bool:
        if record.meta.method == "cns":   # the one resident method (base.Method.resident)
            self.live.append(record.name)
        return record.meta.method == "cns"

    def _unapply_resident(self, name: str) -> None:
        self.live.remove(name)

    def _live(self) -> list[str]:
        return list(self.live)

    def _check_fits(self, record) -> None:   # no model to fit: its records are made up
        pass

    def learn(self, job, progress, cancel, reserved=()) -> JobResult:
        if job.name in self.store:
            raise Conflict(f"A concept named {job.name!r} already exists.")
        for d in job.photo_digests:
            self.archive.path(d)
        total = job.steps or 20
        report = ProgressReporter(progress, "train", total)
        for step in range(1, total + 1):
            cancel.check()
            cancel.pause_point(contextlib.nullcontext)   # a generate job may run here
            time.sleep(self.step_s)
            report(step, loss=1.0 / step)
        if job.class_word == self.FAILING_CLASS:
            raise BadPhoto(f"The fake engine cannot learn a {self.FAILING_CLASS} thing.")
        self.store.put(ConceptRecord(meta=ConceptMeta(
            name=job.name, method=job.method, class_word=job.class_word, token="sks",
            photo_digests=list(job.photo_digests), fingerprint=self.info.fingerprint,
            metrics={"note": f"photo 2 of 3 ({job.photo_names[1]}) was trained whole"}
            if job.class_word == self.NOTED_CLASS else {})))
        if job.method == "cns":
            self.live.append(job.name)
        return JobResult(concept=job.name)

    def generate(self, req, out_dir, progress, cancel) -> JobResult:
        from cns_daemon.prompts import referenced_names

        for name in referenced_names(req.prompt):
            self._get(name)
        total = req.steps or 5
        report = ProgressReporter(progress, "generate", total)
        for step in range(1, total + 1):
            cancel.check()
            time.sleep(self.step_s)
            report(step)
        rng = np.random.default_rng(req.seed or 0)
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(req.n)]
        return save_images(images, out_dir, generation_caption(req), seed=req.seed)


# ---------------------------------------------------------------- daemon processes


def short_home() -> Path:
    """CONES_HOME short enough for a Unix socket path (108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="cones-", dir="/tmp"))


@dataclass
class Daemon:
    proc: subprocess.Popen
    home: Path
    log: Path

    @property
    def socket(self) -> Path:
        return self.home / "run" / "cones.sock"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def daemon_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONES_")}
    env.update(CONES_HOME=str(home), CONES_SETTLE_SECONDS="0.3", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def start_daemon(home: Path, *, fake: bool = True, args: tuple[str, ...] = (), wait: bool = True,
                 timeout: float = 90.0, **env: str) -> Daemon:
    cmd = ([sys.executable, str(Path(__file__)), "serve"] if fake
           else [sys.executable, "-m", "cones_cli.main", "serve", *args])
    log = home / f"daemon-{time.monotonic_ns()}.log"
    home.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=daemon_env(home, **env), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=str(REPO), start_new_session=True)
    daemon = Daemon(proc, home, log)
    if wait:
        wait_ready(daemon, timeout)
    return daemon


@contextlib.contextmanager
def running_daemon(**start: object):
    """A daemon in a fresh short CONES_HOME for a `with` block (a module fixture's body);
    stopped with SIGTERM and its home removed afterwards."""
    home = short_home()
    daemon = start_daemon(home, **start)
    try:
        yield daemon
    finally:
        daemon.kill(signal.SIGTERM)
        shutil.rmtree(home, ignore_errors=True)


def wait_ready(daemon: Daemon, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.output()}")
        if daemon.socket.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(daemon.socket))
                return
        time.sleep(0.1)
    daemon.kill()
    raise RuntimeError(f"daemon not ready after {timeout}s:\n{daemon.output()}")


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _serve_fake() -> None:
    from cns_daemon.daemon import configure_logging, serve
    from cns_daemon.api.settings import load_settings

    configure_logging("INFO")
    serve(load_settings(), engine_factory=FakeEngine)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    _serve_fake()


def cli_in_process(home: Path, monkeypatch, *, merged: bool = False):
    """The `cones` CLI run in-process against the daemon whose CONES_HOME is `home`; each call
    returns (exit code, stdout, stderr), or (exit code, stdout + stderr) when `merged`."""
    from typer.testing import CliRunner

    from cones_cli.main import app

    monkeypatch.setenv("CONES_HOME", str(home))
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, list(args))
        err = result.stderr if result.stderr_bytes is not None else ""
        if merged:
            return result.exit_code, result.stdout + err
        return result.exit_code, result.stdout, err
    return run
