"""The systemd user unit: rendered with this machine's paths, hardened, and accepted by
`systemd-analyze verify` where that tool exists; sd_notify messages reach NOTIFY_SOCKET."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cones_cli.main import app
from cns_daemon.notify import Notifier
from cns_daemon.api.settings import load_settings


def _install(tmp_path, cones_home):
    result = CliRunner().invoke(app, ["service", "install", "--unit-dir", str(tmp_path / "units"), "--no-start"])
    assert result.exit_code == 0, result.output
    return (tmp_path / "units" / "cones.service").read_text(), result.output


def test_install_writes_unit_with_paths_and_hardening(tmp_path, cones_home):
    unit, output = _install(tmp_path, cones_home)
    paths = load_settings().paths
    lines = unit.splitlines()
    assert "Type=notify" in lines and "Restart=on-failure" in lines
    # a wrong model or setting is not restarted every 5 s for ever (a model load each time)
    assert "RestartPreventExitStatus=2 4 6 7 8 12" in lines
    # (no start limit of its own: systemd counts manual starts too, so five restarts after edits
    # of config.toml would have left it down)
    assert not any(l.startswith("StartLimit") for l in lines)
    assert any(l.startswith("WatchdogSec=") for l in lines)
    assert "NoNewPrivileges=yes" in lines and "RestrictSUIDSGID=yes" in lines
    for p in (paths.data, paths.inbox, paths.runtime):   # made as the service makes them
        assert p.is_dir() and (p.stat().st_mode & 0o777) == 0o700, p
    exec_start = next(l for l in lines if l.startswith("ExecStart="))
    assert exec_start.endswith(" serve") and os.access(exec_start.split("=", 1)[1].split()[0], os.X_OK)
    assert f"Environment=CONES_HOME={cones_home}" in lines
    assert "@" not in unit.replace("default.target", "")   # every placeholder filled
    assert "wrote" in output and "--no-start" in output


def test_the_unit_has_no_file_system_sandbox_a_user_manager_cannot_give(tmp_path, cones_home):
    """A review's find: systemd 254 and later sets ProtectSystem, ProtectHome, PrivateTmp and
    ReadWritePaths up for a user unit inside a user namespace mapping this user alone, where /,
    /run and /tmp read as the overflow user's: the service refused its socket folder as another
    user's and exited 2 (not restarted), so the installed service never ran; earlier versions
    ignored them in user units."""
    unit, _ = _install(tmp_path, cones_home)
    settings = {l.split("=", 1)[0] for l in unit.splitlines() if "=" in l and not l.startswith("#")}
    needs_namespace = {"ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "ReadOnlyPaths",
                       "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                       "PrivateDevices", "PrivateUsers", "ExecStartPre"}
    assert not settings & needs_namespace, settings & needs_namespace


def test_unit_carries_the_environment_resolved(tmp_path, cones_home, monkeypatch):
    """A relative CONES_HOME and a CONES_DATA_DIR set in this shell reach the unit as the absolute
    paths this shell means (the service starts in another folder); config.toml values are left to
    the file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONES_HOME", "relhome")
    monkeypatch.setenv("CONES_DATA_DIR", "~/otherdata")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    unit, _ = _install(tmp_path, cones_home)
    lines = unit.splitlines()
    assert f"Environment=CONES_HOME={tmp_path / 'relhome'}" in lines
    assert f"Environment=CONES_DATA_DIR={tmp_path / 'me' / 'otherdata'}" in lines
    assert not any(l.startswith("Environment=CONES_INBOX_DIR") for l in lines)


def test_install_where_it_cannot_write_is_one_error(tmp_path, cones_home):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(app, ["service", "install", "--unit-dir", str(tmp_path / "afile" / "u"),
                                      "--no-start"])
    assert result.exit_code == 2 and "Cannot write" in result.stderr and "Traceback" not in result.output
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.MonkeyPatch.context() as m:
        if os.geteuid() == 0:   # root writes anywhere: the refusal it would meet, faked
            real = Path.mkdir

            def mkdir(self, *a, **kw):
                if self.is_relative_to(locked):
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real(self, *a, **kw)

            m.setattr(Path, "mkdir", mkdir)
        result = CliRunner().invoke(app, ["service", "install", "--unit-dir", str(locked / "u"), "--no-start"])
    assert result.exit_code == 12 and "Cannot write" in result.stderr, result.output


def test_unit_carries_every_cones_setting_of_this_shell(tmp_path, cones_home, monkeypatch):
    """Steps, method and memory options set in this shell reach the service too (they were
    dropped without a word)."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    for key, value in (("CONES_STEPS", "300"), ("CONES_METHOD", "cones"), ("CONES_SDPA", "false"),
                       ("CONES_MODEL", str(model)), ("CONES_SETTLE_SECONDS", "")):
        monkeypatch.setenv(key, value)
    unit, output = _install(tmp_path, cones_home)
    lines = unit.splitlines()
    for want in ("CONES_STEPS=300", "CONES_METHOD=cones", "CONES_SDPA=false", f"CONES_MODEL={model}"):
        assert f"Environment={want}" in lines, want
    assert not any("CONES_SETTLE_SECONDS" in l for l in lines)   # blank: not set
    assert "carried from this shell" in output and "CONES_STEPS" in output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path, cones_home):
    _install(tmp_path, cones_home)
    unit = tmp_path / "units" / "cones.service"
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    complaints = [l for l in (result.stderr + result.stdout).splitlines() if "cones.service" in l]
    assert result.returncode == 0 and not complaints, result.stderr


def test_sd_notify_messages(tmp_path):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        assert n.watchdog_interval == pytest.approx(0.1)
        n.ready("idle; 0 queued")
        assert server.recv(1024) == b"READY=1\nSTATUS=idle; 0 queued"
        n.status("running learn <rex>")
        assert server.recv(1024) == b"STATUS=running learn <rex>"
        n.start_watchdog()
        assert server.recv(1024) == b"WATCHDOG=1"
        n.stop()
    finally:
        server.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.send("READY=1") and quiet.watchdog_interval is None
    other = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None   # the watchdog is for another process


def test_percent_and_dollar_in_paths_reach_systemd_as_written(tmp_path, cones_home, monkeypatch):
    """systemd reads %i as a specifier in every setting and expands $HOME in command lines: a
    folder named with them must be written %% and $$ there (and %% alone elsewhere)."""
    from cones_cli.service_unit import _quote

    inbox = tmp_path / "100%in$HOME"
    monkeypatch.setenv("CONES_INBOX_DIR", str(inbox))
    unit, _ = _install(tmp_path, cones_home)
    assert f"Environment=CONES_INBOX_DIR={str(inbox).replace('%', '%%')}" in unit.splitlines()
    assert _quote("/a%b$c", command=True) == "/a%%b$$c"


def test_a_unit_installed_from_a_shell_without_xdg_runtime_dir_pins_the_runtime_folder(tmp_path, monkeypatch):
    """Under systemd the service took the manager's XDG_RUNTIME_DIR, not where this shell's CLI
    looks (its /tmp fallback); one config.toml names is left to config.toml."""
    from cones_cli.service_unit import unit_environment

    monkeypatch.delenv("CONES_HOME", raising=False)
    monkeypatch.delenv("CONES_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    settings = load_settings()
    assert unit_environment(settings)["CONES_RUNTIME_DIR"] == str(settings.paths.runtime)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))   # the usual login shell: left to systemd
    assert "CONES_RUNTIME_DIR" not in unit_environment(load_settings())
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    config = settings.paths.config_file
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'runtime_dir = "{tmp_path / "rt"}"\n')   # read by the service itself
    assert "CONES_RUNTIME_DIR" not in unit_environment(load_settings())


def test_unit_carries_the_xdg_and_hf_folders_this_shell_finds_its_own_in(tmp_path, monkeypatch):
    """A systemd manager has not the shell's XDG_DATA_HOME / XDG_CONFIG_HOME: the service read
    another config.toml and served other folders than this shell's CLI looks in."""
    for key in [k for k in os.environ if k.startswith("CONES_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdata"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xconfig"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_PICTURES_DIR", str(tmp_path / "pics"))   # the inbox is found through it
    unit, output = _install(tmp_path, None)
    assert ("where the service finds its folders: HF_HOME, XDG_CONFIG_HOME, XDG_DATA_HOME, "
            "XDG_PICTURES_DIR, XDG_RUNTIME_DIR") in " ".join(output.split()), output
    lines = unit.splitlines()
    for key, folder in (("XDG_DATA_HOME", "xdata"), ("XDG_CONFIG_HOME", "xconfig"), ("HF_HOME", "hf"),
                        ("XDG_PICTURES_DIR", "pics"), ("XDG_RUNTIME_DIR", "run")):
        assert f"Environment={key}={tmp_path / folder}" in lines, unit
    monkeypatch.chdir(tmp_path)   # a relative HF_HOME: made absolute
    monkeypatch.setenv("HF_HOME", "relhf")
    unit, _ = _install(tmp_path, None)
    assert f"Environment=HF_HOME={tmp_path / 'relhf'}" in unit.splitlines(), unit


def test_what_a_unit_cannot_carry_as_this_shell_means_it_is_refused(tmp_path, cones_home, monkeypatch):
    """A relative folder in config.toml was resolved here for the unit's mkdir and sandbox, and
    by the service from its own working folder (the home folder, read-only there); a line break
    in a carried variable wrote a line of its own into the unit. A variable in another case
    (read all the same) is carried under its setting's name."""
    from cns_daemon.api.errors import BadInput
    from cones_cli.service_unit import unit_environment

    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('data_dir = "reld"\n')
    with pytest.raises(BadInput, match="data_dir is a relative path in config.toml"):
        unit_environment(load_settings())
    result = CliRunner().invoke(app, ["service", "install", "--unit-dir", str(tmp_path / "u"), "--no-start"])
    assert result.exit_code == 2 and not (tmp_path / "u" / "cones.service").exists(), result.output
    cfg.write_text('data_dir = "~/d"\n')   # the home folder, for both
    assert "CONES_DATA_DIR" not in unit_environment(load_settings())
    monkeypatch.setenv("CONES_DATA_DIR", "reld")   # this shell's: carried resolved
    assert unit_environment(load_settings())["CONES_DATA_DIR"] == str(Path("reld").absolute())
    monkeypatch.delenv("CONES_DATA_DIR")
    monkeypatch.setenv("CONES_Steps", "7")
    assert unit_environment(load_settings())["CONES_STEPS"] == "7"
    monkeypatch.setenv("CONES_MODEL", "/m/a b\nExecStartPre=/bin/true")
    with pytest.raises(BadInput, match="CONES_MODEL holds a line break"):
        unit_environment(load_settings())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_a_single_quote_in_a_path_is_quoted_for_systemd(tmp_path, cones_home, monkeypatch):
    """systemd reads ' as quoting: a folder named with one (and no space) broke every line that
    named it, ExecStart included."""
    inbox = tmp_path / "o'brien"
    monkeypatch.setenv("CONES_INBOX_DIR", str(inbox))
    unit, _ = _install(tmp_path, cones_home)
    assert f'Environment="CONES_INBOX_DIR={inbox}"' in unit.splitlines()
    path = tmp_path / "units" / "cones.service"
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    complaints = [l for l in (result.stderr + result.stdout).splitlines() if "cones.service" in l]
    assert result.returncode == 0 and not complaints, result.stderr


def test_the_unit_template_ships_inside_the_package():
    """A wheel carries package data only: the template lives in the cones_cli package and is declared."""
    import tomllib

    import cones_cli
    from cones_cli.service_unit import TEMPLATE

    assert TEMPLATE.is_file() and TEMPLATE.parent == Path(cones_cli.__file__).resolve().parent
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert TEMPLATE.name in pyproject["tool"]["setuptools"]["package-data"]["cones_cli"]


def test_without_an_installed_script_the_unit_runs_the_module_safely(tmp_path, monkeypatch):
    """No `cones` script where this Python installs them: `python -P -m cones_cli.main`, so a cones_cli/
    folder in the service's working folder cannot stand in for the installed one."""
    from cones_cli import service_unit

    python = tmp_path / "bin" / "python3"
    monkeypatch.setattr(service_unit.sys, "executable", str(python))
    monkeypatch.setattr(service_unit.sysconfig, "get_path", lambda *a, **k: str(tmp_path / "scripts"))
    assert service_unit.exec_command() == [str(python), "-P", "-m", "cones_cli.main"]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "cones").write_text("#!/bin/sh\n")
    assert service_unit.exec_command() == [str(tmp_path / "scripts" / "cones")]


def _fake_systemctl(tmp_path, monkeypatch, active: bool | str):
    """A systemctl on PATH that logs its arguments; the unit's ActiveState is `active` (True),
    `inactive` (False) or the state given, its FragmentPath $FAKE_FRAGMENT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "systemctl.log"
    script = bin_dir / "systemctl"
    script.write_text("#!/bin/sh\n"
                      f'echo "$*" >> {log}\n'
                      f'case "$*" in *ActiveState*) echo {active if isinstance(active, str) else "active" if active else "inactive"};; '
                      f'*FragmentPath*) echo "$FAKE_FRAGMENT";; esac\n'
                      "exit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xconfig"))   # the manager's unit folder
    return log


@pytest.mark.parametrize("state", ["active", "activating", "inactive"])
def test_installing_again_restarts_a_running_service_so_the_new_unit_applies(tmp_path, cones_home,
                                                                             monkeypatch, state):
    """`enable --now` leaves a running service as it was started (or starting: loading its
    model): installing again after a setting changed said "enabled and started" while the old
    process served on."""
    log = _fake_systemctl(tmp_path, monkeypatch, state)
    result = CliRunner().invoke(app, ["service", "install"])
    assert result.exit_code == 0, result.output
    calls = log.read_text().splitlines()
    assert "--user enable --now cones.service" in calls
    active = state != "inactive"
    assert ("--user restart cones.service" in calls) == active
    assert ("was running: restarted, so this unit" in " ".join(result.output.split())) == active
    assert (tmp_path / "xconfig" / "systemd" / "user" / "cones.service").is_file()


def test_installing_again_does_not_start_a_running_job_over(tmp_path, cones_home, monkeypatch):
    """A review's find: the restart threw away a learn's hours unasked; it is said instead."""
    from cones_cli import service_unit
    from cns_daemon.api.protocol import JobInfo

    log = _fake_systemctl(tmp_path, monkeypatch, active=True)
    job = JobInfo(id="b" * 12, kind="learn", state="running", summary="learn <rex>", created=0.0)
    monkeypatch.setattr(service_unit, "_running_job", lambda settings: job)
    result = CliRunner().invoke(app, ["service", "install"])
    assert result.exit_code == 0 and "--user restart cones.service" not in log.read_text().splitlines()
    assert "not restarted: it runs job bbbbbbbbbbbb (learn <rex>)" in " ".join(result.output.split())


def test_a_unit_written_where_systemd_does_not_look_is_not_started(tmp_path, cones_home, monkeypatch):
    """`--unit-dir X` wrote the unit there, then `enable --now cones.service` by name failed
    (exit 11) or enabled another one; and uninstall disabled the real unit whatever X was."""
    log = _fake_systemctl(tmp_path, monkeypatch, active=True)
    result = CliRunner().invoke(app, ["service", "install", "--unit-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and "not starting it: the user manager reads" in " ".join(result.output.split())
    assert not log.exists() or "enable" not in log.read_text()
    result = CliRunner().invoke(app, ["service", "uninstall", "--unit-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and not (tmp_path / "elsewhere" / "cones.service").exists()
    assert not log.exists() or "disable" not in log.read_text()
    # linked there (`systemctl --user link`, as install says): started, and disabled on uninstall
    monkeypatch.setenv("FAKE_FRAGMENT", str(tmp_path / "elsewhere" / "cones.service"))
    result = CliRunner().invoke(app, ["service", "install", "--unit-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and "--user enable --now cones.service" in log.read_text().splitlines()
    result = CliRunner().invoke(app, ["service", "uninstall", "--unit-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and "--user disable --now cones.service" in log.read_text().splitlines()


def test_uninstalling_twice_says_there_is_nothing_to_remove(tmp_path, cones_home, monkeypatch):
    """The second uninstall ran `disable --now` first, which systemd refuses for a unit it does
    not know: exit 11 instead of "no unit"."""
    log = _fake_systemctl(tmp_path, monkeypatch, active=False)
    assert CliRunner().invoke(app, ["service", "install"]).exit_code == 0
    first = CliRunner().invoke(app, ["service", "uninstall"])
    assert first.exit_code == 0 and "--user disable --now cones.service" in log.read_text().splitlines()
    log.unlink()
    second = CliRunner().invoke(app, ["service", "uninstall"])
    assert second.exit_code == 0 and "nothing to remove" in second.output
    assert "disable" not in log.read_text() and "stop" not in log.read_text()


def test_uninstall_after_the_unit_file_was_deleted_by_hand_stops_the_service(tmp_path, cones_home,
                                                                               monkeypatch):
    """The service ran on and its enable link dangled (it started again at the next log-in), and
    uninstall said "nothing to remove"."""
    log = _fake_systemctl(tmp_path, monkeypatch, active=True)
    assert CliRunner().invoke(app, ["service", "install"]).exit_code == 0
    user_dir = tmp_path / "xconfig" / "systemd" / "user"
    wants = user_dir / "default.target.wants"
    wants.mkdir()
    (wants / "cones.service").symlink_to(user_dir / "cones.service")   # what `enable` makes
    (user_dir / "cones.service").unlink()                               # deleted by hand
    log.unlink()
    result = CliRunner().invoke(app, ["service", "uninstall"])
    assert result.exit_code == 0, result.output
    calls = log.read_text().splitlines()
    assert "--user stop cones.service" in calls and "--user daemon-reload" in calls
    assert not (wants / "cones.service").is_symlink()
    assert "nothing to remove" not in result.output and "dangling link" in result.output
    # a link that leads somewhere (a unit of the same name linked from elsewhere) is not ours
    elsewhere = tmp_path / "elsewhere.service"
    elsewhere.write_text("[Unit]\n")
    (wants / "cones.service").symlink_to(elsewhere)
    assert CliRunner().invoke(app, ["service", "uninstall"]).exit_code == 0
    assert (wants / "cones.service").is_symlink()
    # linked from elsewhere (`systemctl --user link`), that file deleted: both links dangle
    (user_dir / "cones.service").symlink_to(tmp_path / "gone" / "cones.service")
    (wants / "cones.service").unlink()
    (wants / "cones.service").symlink_to(tmp_path / "gone" / "cones.service")
    result = CliRunner().invoke(app, ["service", "uninstall"])
    assert result.exit_code == 0 and not (user_dir / "cones.service").is_symlink()
    assert not (wants / "cones.service").is_symlink()
