import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from cns_daemon.api.settings import default_paths, load_settings


def test_cones_home_puts_every_path_under_it(cones_home):
    paths = load_settings().paths
    for p in (paths.data, paths.config, paths.runtime, paths.inbox, paths.socket, paths.store):
        assert Path(p).is_relative_to(cones_home), p
    assert paths.inbox == cones_home / "inbox"


def test_platformdirs_default_without_home(monkeypatch):
    monkeypatch.delenv("CONES_HOME")
    paths = default_paths()
    assert "cones" in str(paths.data) and "cones" in str(paths.config)
    assert paths.inbox.name == "cones-inbox"


def test_layering_defaults_toml_env_flags(cones_home, monkeypatch):
    assert load_settings().settle_seconds == 5.0                       # default
    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('settle_seconds = 7.5\nmethod = "cones"\nsteps = 30\n')
    s = load_settings()
    assert (s.settle_seconds, s.method, s.steps) == (7.5, "cones", 30)   # toml over default
    monkeypatch.setenv("CONES_SETTLE_SECONDS", "2")
    s = load_settings()
    assert s.settle_seconds == 2.0 and s.method == "cones"               # env over toml
    s = load_settings(settle_seconds=1.0, method=None)
    assert s.settle_seconds == 1.0 and s.method == "cones"               # flag over env; None = unset


def test_bad_values_are_rejected(cones_home):
    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('method = "dreambooth"\n')
    with pytest.raises(ValidationError, match="method"):
        load_settings()
    cfg.write_text('no_such_key = 1\n')
    with pytest.raises(ValidationError, match="no_such_key"):
        load_settings()


def test_path_settings_expand_the_home_folder_and_become_absolute(cones_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('data_dir = "~/conesdata"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONES_INBOX_DIR", "drop")
    paths = load_settings().paths
    assert paths.data == tmp_path / "me" / "conesdata"
    assert paths.inbox == tmp_path / "drop"


def test_a_blank_setting_means_its_default(cones_home, monkeypatch):
    """CONES_MODEL= (a variable blanked to reset it) is the toy world, not the current folder."""
    monkeypatch.setenv("CONES_MODEL", "")
    monkeypatch.setenv("CONES_INBOX_DIR", "  ")
    monkeypatch.setenv("CONES_STEPS", "")
    s = load_settings()
    assert s.model is None and s.paths.inbox == cones_home / "inbox" and s.steps is None


def test_a_blank_variable_or_flag_leaves_config_toml_its_say(cones_home, monkeypatch):
    """A review's find: `CONES_STEPS=' '` was refused as a bad `steps` in config.toml (pydantic
    drops only "" as unset), `CONES_MODEL=' '` and `--model ""` put the toy world over the model
    config.toml names (while `cones service install`, reading blanks as unset, did not)."""
    config = cones_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('steps = 50\nmodel = "tiny"\n')
    monkeypatch.setenv("CONES_STEPS", " ")
    monkeypatch.setenv("CONES_MODEL", "\t")
    s = load_settings()
    assert s.steps == 50 and s.model == "tiny"
    assert load_settings(model="", steps=None).model == "tiny"
    assert load_settings(model="x").model == "x"


def test_cli_names_a_broken_config_file_and_a_folder_it_cannot_use(cones_home, monkeypatch, tmp_path):
    """A TOML syntax error and a data folder where a file stands are one clear line each with
    exit code 2, not a traceback."""
    from typer.testing import CliRunner

    from cones_cli.main import app

    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("model = \n")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "config.toml is not valid TOML" in result.stderr, result.output
    assert str(cfg) in result.stderr.replace("\n", "")
    cfg.write_bytes("steps = 5\n".encode("utf-16"))   # Notepad's "Unicode"
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "is not UTF-8 text" in result.stderr, result.output
    cfg.write_bytes("steps = 5\n".encode("utf-16-le"))   # no byte-order mark: NULs in "UTF-8"
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "is not UTF-8 text" in result.stderr, result.output
    cfg.write_bytes(b"\xef\xbb\xbfsteps = 5\n")   # UTF-8 with a byte-order mark
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "byte-order mark" in result.stderr, result.output
    cfg.unlink()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("CONES_DATA_DIR", str(tmp_path / "afile" / "data"))
    result = CliRunner().invoke(app, ["serve", "--no-inbox"])
    assert result.exit_code == 2 and "Cannot use" in result.stderr and "data_dir" in result.stderr, \
        result.output
    monkeypatch.delenv("CONES_DATA_DIR")
    (cones_home / "run" / "cones.sock").mkdir(parents=True)   # a folder where the socket goes
    result = CliRunner().invoke(app, ["serve", "--no-inbox"])
    assert result.exit_code == 2 and "A folder stands where the service's socket goes" in \
        " ".join(result.stderr.split()), result.output


def test_cli_refusals_that_need_no_service(cones_home, tmp_path):
    """A bad concept name in the friendly words, a missing store as not found, an unknown log
    level: each a clear line and its exit code."""
    from typer.testing import CliRunner

    from cones_cli.main import app

    photo = tmp_path / "p.png"
    photo.write_bytes(b"x")
    result = CliRunner().invoke(app, ["add", "ring☃", str(photo), "--class", "ring"])
    assert result.exit_code == 2 and "Use 1-64 ASCII letters" in result.stderr, result.output
    result = CliRunner().invoke(app, ["add", "--class", "dog", "--", "-rex", str(photo)])
    assert result.exit_code == 2 and "cannot start with '-'" in " ".join(result.stderr.split()), result.output
    result = CliRunner().invoke(app, ["store", "check"])
    assert result.exit_code == 3 and "No concept store" in result.stderr, result.output
    result = CliRunner().invoke(app, ["serve", "--log-level", "bogus"])
    assert result.exit_code == 2 and "Unknown log level" in result.stderr, result.output
    # blank paths: export wrote ./NAME.safetensors without a word, import said ". is a folder"
    result = CliRunner().invoke(app, ["export", "rex", "-o", ""])
    assert result.exit_code == 2 and "-o is empty" in result.stderr, result.output
    result = CliRunner().invoke(app, ["import", ""])
    assert result.exit_code == 2 and "No file given" in result.stderr, result.output
    fifo = tmp_path / "pipe.png"   # it exists: not "No such file"
    os.mkfifo(fifo)
    result = CliRunner().invoke(app, ["add", "rex", str(fifo), str(photo), "--class", "dog"])
    assert result.exit_code == 2 and "is not a regular file" in " ".join(result.stderr.split()), result.output
    pngs = tmp_path / "ring"   # a folder given for its photos: the pattern said fits them
    pngs.mkdir()
    for i in range(3):
        (pngs / f"{i}.png").write_bytes(b"x")
    result = CliRunner().invoke(app, ["add", "rex", str(pngs), "--class", "dog"])
    assert result.exit_code == 2 and f"e.g. {pngs}/*.png." in result.stderr, result.output
    result = CliRunner().invoke(app, ["service", "install", "--no-start", "--unit-dir", str(photo)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "is a file, not a folder for the unit" in said, result.output
    assert "folder" not in result.stdout   # nothing made before the refusal


def test_a_folder_the_service_may_not_write_is_a_storage_error(tmp_path, monkeypatch):
    """Exit 12 (README: a folder cannot be written) for a read-only place or no permission;
    a file in the way stays bad input (exit 2)."""
    import errno
    import os

    from cns_daemon.api.errors import BadInput, Storage
    from cns_daemon.daemon import make_folder

    def read_only(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", read_only)
        with pytest.raises(Storage, match="Cannot use .* as the data folder: Read-only") as info:
            make_folder(tmp_path / "data", "data folder", "data_dir")
        assert "data_dir" in info.value.hint
    for code, said in ((errno.EACCES, "Permission denied"), (errno.EPERM, "Operation not permitted")):
        def refused(self, *a, code=code, said=said, **kw):
            raise OSError(code, said, str(self))

        with monkeypatch.context() as m:
            m.setattr(Path, "mkdir", refused)
            with pytest.raises(Storage, match=f"as the data folder: {said}"):
                make_folder(tmp_path / "data", "data folder", "data_dir")
    with monkeypatch.context() as m:   # there, but not ours to write (root writes anywhere: faked)
        m.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(Storage, match="as the data folder: Permission denied"):
            make_folder(tmp_path / "data", "data folder", "data_dir")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput):
        make_folder(tmp_path / "afile" / "data", "data folder", "data_dir")


def test_a_cones_variable_that_is_no_setting_is_said(cones_home, monkeypatch):
    """CONES_STEP=5 (for CONES_STEPS) was ignored without a word."""
    import cones_cli.config
    from typer.testing import CliRunner

    from cones_cli.main import app

    monkeypatch.setattr(cones_cli.config, "_told", False)
    monkeypatch.setenv("CONES_STEP", "5")
    result = CliRunner().invoke(app, ["status"])
    said = " ".join(result.stderr.split())
    assert "CONES_STEP is not a cones setting and is ignored (did you mean CONES_STEPS?)" in said, said


def test_a_refused_setting_says_where_it_was_set(cones_home, monkeypatch):
    from typer.testing import CliRunner

    from cones_cli.main import app

    monkeypatch.setenv("CONES_STEPS", "abc")
    said = " ".join(CliRunner().invoke(app, ["status"]).stderr.split())
    assert "Fix it where it is set: the environment variable CONES_STEPS." in said, said
    monkeypatch.delenv("CONES_STEPS")
    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('steps = "x"\n')
    said = "".join(CliRunner().invoke(app, ["status"]).stderr.split())
    assert f"Fixitwhereitisset:{cfg}.".replace(" ", "") in said, said


def test_a_config_toml_that_is_a_folder_is_said(cones_home):
    from typer.testing import CliRunner

    from cones_cli.main import app

    (cones_home / "config" / "config.toml").mkdir(parents=True)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "is not a file" in result.stderr, result.output


def test_home_cannot_be_set_in_the_file_found_through_it(cones_home, monkeypatch):
    """`home` in config.toml moved the other settings' folders but not the file itself, and a
    service installed from that shell read another config.toml. A blank CONES_HOME is unset for
    every path too (it made folders named "  " in the current one)."""
    from cns_daemon.api.errors import BadInput

    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('home = "/elsewhere"\n')
    with pytest.raises(BadInput, match="`home` cannot be set in") as err:
        load_settings()
    assert "CONES_HOME" in err.value.hint
    monkeypatch.setenv("CONES_HOME", "   ")
    assert load_settings().paths.data == default_paths(None).data and "  " not in str(default_paths().data)


def test_a_shared_runtime_folder_is_refused_not_stripped_of_its_permissions(tmp_path):
    """runtime_dir = "/tmp" made /tmp 0700 (and failed with a traceback where it could not)."""
    import os

    from cns_daemon.api.errors import BadInput
    from cns_daemon.api.settings import Paths
    from cns_daemon.daemon import prepare_runtime

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    paths = Paths(data=tmp_path / "d", config=tmp_path / "c", runtime=shared, inbox=tmp_path / "i")
    with pytest.raises(BadInput, match="shared folder") as err:
        prepare_runtime(paths)
    assert str(shared / "cones") in err.value.hint
    assert os.stat(shared).st_mode & 0o7777 == 0o1777
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    prepare_runtime(Paths(data=tmp_path / "d", config=tmp_path / "c", runtime=own, inbox=tmp_path / "i"))
    assert os.stat(own).st_mode & 0o777 == 0o700


def test_a_socket_folder_another_user_could_take_over_is_refused_on_both_sides(tmp_path):
    """From a security review: the CLI sent photos to whatever listened where it looked, and
    the service followed a link planted as its runtime folder (tightened the target, deleted a
    file named cones.sock there). A runtime folder that is a link, or under a folder others may
    write to that is not sticky, is refused by the service, and the CLI does not connect there."""
    import os

    from cones_cli.client import Client
    from cns_daemon.api.errors import BadInput, ConesError
    from cns_daemon.api.settings import Paths
    from cns_daemon.daemon import prepare_runtime

    def paths(runtime):
        return Paths(data=tmp_path / "d", config=tmp_path / "c", runtime=runtime, inbox=tmp_path / "i")

    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o755)   # (not by mkdir: an earlier test's service set this process's umask)
    (target / "cones.sock").write_text("precious")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(BadInput, match="is a link"):
        prepare_runtime(paths(tmp_path / "link"))
    assert (target / "cones.sock").read_text() == "precious" and os.stat(target).st_mode & 0o777 == 0o755
    with pytest.raises(BadInput, match="is a link"), Client(tmp_path / "link" / "cones.sock") as c:
        c.status()
    open_ = tmp_path / "open"
    (open_ / "run").mkdir(parents=True, mode=0o700)
    os.chmod(open_, 0o777)   # anyone may rename run/ and put a folder of their own there
    with pytest.raises(BadInput, match=f"others may write to {open_}, above it"):
        prepare_runtime(paths(open_ / "run"))
    with pytest.raises(BadInput, match="another user could stand in"), Client(open_ / "run" / "cones.sock") as c:
        c.status()
    os.chmod(open_, 0o1777)   # sticky, as /tmp: only run/'s owner may rename it
    prepare_runtime(paths(open_ / "run"))
    with pytest.raises(ConesError, match="not running"), Client(open_ / "run" / "cones.sock") as c:
        c.status()
    # A missing folder is not checked and trusted: another user could make it, with a socket,
    # between the check and the connect. It is "not running", and nothing is connected to.
    missing = Client(open_ / "gone" / "cones.sock")
    with pytest.raises(ConesError, match="not running"), missing:
        missing.status()
    assert not missing.trusted
    if os.getuid() == 0:   # as root the folder can be given to another user
        os.chown(open_ / "run", 65534, 65534)
        with pytest.raises(BadInput, match="belongs to another user .uid 65534"), \
                Client(open_ / "run" / "cones.sock") as c:
            c.status()
        # a link of another user's above the folder: its owner could point it elsewhere later
        (tmp_path / "mine" / "run").mkdir(parents=True)
        theirs = open_ / "lnk"
        theirs.symlink_to(tmp_path / "mine")
        os.lchown(theirs, 65534, 65534)
        with pytest.raises(BadInput, match="above it, is a link that belongs to another user"):
            prepare_runtime(paths(theirs / "run"))


def _status(args=("status",)):
    from typer.testing import CliRunner

    from cones_cli.main import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.stderr.split())


def _config(cones_home, text: str) -> Path:
    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize("layer", ["toml", "env", "home"])
def test_a_home_folder_of_no_user_is_a_refusal_naming_the_setting(cones_home, monkeypatch, layer):
    """"~nosuchuser/x" crashed every command with a traceback (pathlib's RuntimeError)."""
    if layer == "toml":
        _config(cones_home, 'inbox_dir = "~nosuchuser0/x"\n')
    elif layer == "env":
        monkeypatch.setenv("CONES_DATA_DIR", "~nosuchuser0/d")
    else:
        monkeypatch.setenv("CONES_HOME", "~nosuchuser0/h")
    code, said = _status()
    assert code == 2 and "there is no user 'nosuchuser0'" in said, said
    assert {"toml": "config.toml", "env": "CONES_DATA_DIR", "home": "CONES_HOME"}[layer] in said


def test_booleans_are_no_numbers_and_unknown_keys_are_named_with_the_nearest(cones_home):
    """`steps = true` learned 1 step; `step = 5` said pydantic's "Extra inputs are not permitted"."""
    _config(cones_home, "steps = true\n")
    code, said = _status()
    assert code == 2 and "steps: a number is needed, not true or false" in said, said
    _config(cones_home, "step = 5\n")
    code, said = _status()
    assert code == 2 and "`step` is not a cones setting (did you mean `steps`?)" in said, said


def test_every_layer_with_a_bad_value_is_named_and_flags_by_their_own_name(cones_home, monkeypatch):
    cfg = _config(cones_home, 'device = "gpu"\n')
    monkeypatch.setenv("CONES_STEPS", "0")
    code, said = _status()
    assert code == 2 and "config.toml; the environment variable CONES_STEPS." in said, said
    cfg.unlink()
    monkeypatch.delenv("CONES_STEPS")
    code, said = _status(["serve", "--settle", "-1"])
    assert code == 2 and "the command's --settle flag" in said, said   # not --settle-seconds


def test_a_variable_spelled_in_another_case_is_said_as_read(cones_home, monkeypatch):
    """CONES_Method is read as CONES_METHOD (the settings ignore case): the CLI said it was ignored."""
    import cones_cli.config

    monkeypatch.setattr(cones_cli.config, "_told", False)
    monkeypatch.setenv("CONES_Method", "cones2")
    assert load_settings().method == "cones2"
    _, said = _status()
    assert "CONES_Method is read as CONES_METHOD" in said and "ignored" not in said, said


def test_a_config_toml_link_to_nothing_or_unreadable_is_said(cones_home, monkeypatch):
    cfg = cones_home / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.symlink_to(cones_home / "gone.toml")
    code, said = _status()
    assert code == 2 and "which is not there" in said, said   # the defaults were used silently
    cfg.unlink()
    _config(cones_home, "steps = 5\n")

    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tomllib.load", unreadable)
    code, said = _status()
    assert code == 2 and "cannot be read: Permission denied" in said, said   # not exit 12, storage


def test_a_refused_value_is_named_by_its_flag_in_plain_words_and_the_hint_names_the_command(cones_home):
    """"n: Input should be greater than or equal to 1" and "guidance_scale: ..." named fields no
    flag is called, in pydantic's words, and the hint said `cones COMMAND --help`."""
    code, said = _status(["generate", "x", "-n", "0"])
    assert code == 2 and "Invalid value: -n: must be at least 1." in said, said
    assert "`cones generate --help`" in said and "COMMAND" not in said
    code, said = _status(["generate", "x", "--cfg", "31"])
    assert code == 2 and "--guidance-scale: must be at most 30." in said, said   # the flag's name
    code, said = _status(["eval", "rex", "-n", "0"])
    assert "`cones eval --help`" in said, said


def test_a_folder_whose_name_is_not_utf8_is_refused_by_name_where_the_service_uses_it(cones_home, monkeypatch, tmp_path):
    """A review's find: CONES_HOME or CONES_DATA_DIR holding a byte that is not UTF-8 failed
    `cones serve` with a traceback (the lock file's text, LMDB's path). Folders the service does
    not use (a base overridden, an inbox not watched) are not checked (a second review's find)."""
    from cns_daemon.api.errors import BadInput
    from cns_daemon.api.settings import check_text_paths
    from cns_daemon.daemon import serve

    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/d\xff")
    monkeypatch.setenv("CONES_DATA_DIR", odd)
    settings = load_settings()
    with pytest.raises(BadInput, match=r"data folder .*d\\xff has a name that is not UTF-8"):
        serve(settings)   # refused before anything is made or locked
    assert not os.path.exists(os.fsencode(odd))
    monkeypatch.delenv("CONES_DATA_DIR")
    monkeypatch.setenv("CONES_INBOX_DIR", odd)
    check_text_paths(load_settings().paths, inbox=False)   # an inbox not watched: not used
    with pytest.raises(BadInput, match="inbox folder"):
        check_text_paths(load_settings().paths, inbox=True)


def test_a_read_only_data_folder_and_a_full_disk_at_the_first_start_are_said_as_they_are(tmp_path, monkeypatch):
    """A review's find: a read-only mount was said as "Permission denied", and a full disk at
    the first start as "A file operation failed" without a file."""
    import types

    from cns_daemon import daemon
    from cns_daemon.api.errors import Storage, storage_error

    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setattr(daemon.os, "access", lambda *a: False)
    monkeypatch.setattr(daemon.os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(Storage, match="Read-only file system"):
        daemon.make_folder(folder, "data folder", "data_dir")
    monkeypatch.setattr(daemon.os, "statvfs", lambda p: types.SimpleNamespace(f_flag=0))
    with pytest.raises(Storage, match="Permission denied"):
        daemon.make_folder(folder, "data folder", "data_dir")
    monkeypatch.undo()

    lock = daemon.InstanceLock(tmp_path / "cones.lock")
    lock.acquire(None)

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon.os, "pwrite", full)
    with pytest.raises(OSError) as exc:
        lock.say("serving")
    assert str(tmp_path / "cones.lock") in storage_error(exc.value).message
    lock.release()
