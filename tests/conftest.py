"""Shared fixtures. Every test runs with CONES_HOME in a temporary folder so nothing touches
the real data, config or inbox folders, and with the hub switched off."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def cones_home(tmp_path, monkeypatch):
    home = tmp_path / "cones-home"
    monkeypatch.setenv("CONES_HOME", str(home))
    for key in list(os.environ):
        if key.startswith("CONES_") and key != "CONES_HOME":
            monkeypatch.delenv(key)
    return home


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny SD-architecture pipeline (seeded random weights). Tests that change it must
    restore it; use `fresh_tiny_pipe` for one of your own."""
    from cns_daemon.model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture
def fresh_tiny_pipe():
    from cns_daemon.model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)
