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
