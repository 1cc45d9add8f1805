"""Checked-in stores of every schema version stay readable (future versions must migrate them)."""
from __future__ import annotations

import shutil

import pytest

from cns_daemon.api.errors import Internal, ModelMismatch
from cones_store import ConceptStore
from cones_store.envelope import SCHEMA_VERSION
from cones_store.fixtures.make import FINGERPRINT, expected_records, fixture_dir
from cones_store.fixtures.samples import assert_same_record


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
def test_fixture_of_each_schema_version_is_checked_in(version):
    data = fixture_dir(version) / "data.mdb"
    assert data.is_file() and data.stat().st_size < 100_000


def test_schema1_fixture_reads_back_exactly(tmp_path):
    path = tmp_path / "store"
    shutil.copytree(fixture_dir(1), path)  # never open the checked-in copy itself
    records, jobs = expected_records()
    with ConceptStore.open(path, fingerprint=FINGERPRINT) as store:
        assert store.fingerprint == FINGERPRINT
        assert sorted(store.names()) == sorted(r.name for r in records) == ["my_mug", "red-star", "rex"]
        assert store.damaged() == {}
        for record in records:
            assert_same_record(store.get(record.name), record, fingerprint=FINGERPRINT)
        assert store.get("rex").deltas and store.get("my_mug").masks
        assert store.get("red-star").residual.shape == (64,)
        assert store.get("rex").overlap.shared_with == {}
        mug = store.get("my_mug").overlap
        assert mug.total == sum(v.size for v in records[1].masks.values())
        assert set(mug.shared_with) <= {"rex"}
        assert store.jobs() == jobs
        # an old store keeps working for writes too
        store.update_metrics("rex", {"checked": True})
        store.delete("red-star")
        assert sorted(store.names()) == ["my_mug", "rex"]
    with pytest.raises(ModelMismatch, match=FINGERPRINT):
        ConceptStore.open(path, fingerprint="another-model")


def test_fixture_opens_read_only(tmp_path):
    path = tmp_path / "store"
    shutil.copytree(fixture_dir(1), path)
    records, _ = expected_records()
    before = (path / "data.mdb").read_bytes()
    with ConceptStore.open(path, fingerprint=FINGERPRINT, readonly=True) as store:
        assert_same_record(store.get("rex"), records[0], fingerprint=FINGERPRINT)
        with pytest.raises(Internal, match="read-only"):
            store.delete("rex")
    with pytest.raises(ModelMismatch, match=FINGERPRINT):
        ConceptStore.open(path, fingerprint="another-model", readonly=True)
    assert (path / "data.mdb").read_bytes() == before
