"""The store under failure: crashes mid-write, damaged bytes, a full map, concurrent threads and
processes, a store from a newer schema."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from cns_daemon.api.errors import Corrupt, NotFound, ProtocolMismatch
from cones_store import ConceptStore
from cones_store.envelope import frame
from cones_store.fixtures.samples import sample_record
from cones_store.serialize import dump_json
from helpers.service import wait_until

REPO = Path(__file__).resolve().parents[1]


def all_keys(path: Path) -> dict[str, list[bytes]]:
    """Every key of every named database, read with plain lmdb (store closed)."""
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    out = {}
    with env.begin() as txn:
        for name, _ in txn.cursor():
            db = env.open_db(name, txn=txn, create=False)
            out[name.decode()] = [k for k, _ in txn.cursor(db=db)]
    env.close()
    return out


def keys_of(path: Path, concept: str) -> list[bytes]:
    prefix = concept.encode()
    return [k for keys in all_keys(path).values() for k in keys
            if k == prefix or k.startswith(prefix + b"\x00")]


# -- one transaction per concept ------------------------------------------------------------------


def _half_then(action):
    """Replace ConceptStore._put_items: write half the items into the transaction, then `action`."""
    original = ConceptStore._put_items

    def patched(self, txn, items):
        items = list(items)
        original(self, txn, items[: len(items) // 2])
        action()
        original(self, txn, items[len(items) // 2:])
    return patched


class Boom(Exception):
    pass


def test_exception_inside_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s"
    rex_v1 = sample_record("rex", "cns", seed=1)
    with ConceptStore.open(path) as s:
        s.put(rex_v1)
        monkeypatch.setattr(ConceptStore, "_put_items", _half_then(lambda: (_ for _ in ()).throw(Boom())))
        with pytest.raises(Boom):
            s.put(sample_record("mug", "cones", seed=2))
        with pytest.raises(Boom):
            s.put(sample_record("rex", "cones", seed=3), replace=True)
        monkeypatch.undo()
        assert s.names() == ["rex"]
        assert s.get("rex").meta.method == "cns"  # the old version, whole
        np.testing.assert_array_equal(
            next(iter(s.get("rex").deltas.values())).indices,
            next(iter(rex_v1.deltas.values())).indices)
        s.put(sample_record("mug", "cones", seed=2))  # and the store still takes writes
    assert keys_of(path, "mug") and len(keys_of(path, "rex")) == len(rex_v1.deltas) + 3


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from cones_store import ConceptStore
    from cones_store.fixtures.samples import sample_record
    path, flag, name, method, replace = sys.argv[1:]
    original = ConceptStore._put_items
    def patched(self, txn, items):
        items = list(items)
        original(self, txn, items[: len(items) // 2])
        Path(flag).write_text("half written")
        time.sleep(120)  # killed here
        original(self, txn, items[len(items) // 2:])
    ConceptStore._put_items = patched
    store = ConceptStore.open(path)
    store.put(sample_record(name, method, seed=5), replace=replace == "1")
""")


def _kill_mid_write(path: Path, tmp_path: Path, name: str, method: str, replace: bool) -> None:
    flag = tmp_path / f"flag-{name}-{int(replace)}"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(flag), name, method,
                              "1" if replace else "0"], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert child.poll() is None, "child exited before reaching the write"
            assert time.monotonic() < deadline, "child never reached the write"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigkill_mid_write_leaves_all_or_nothing(tmp_path):
    path = tmp_path / "s"
    rex = sample_record("rex", "cns", seed=1)
    with ConceptStore.open(path) as s:
        s.put(rex)
    before = all_keys(path)

    _kill_mid_write(path, tmp_path, "mug", "cones", replace=False)  # a new concept
    _kill_mid_write(path, tmp_path, "rex", "cones", replace=True)   # replacing one
    assert all_keys(path) == before and keys_of(path, "mug") == []
    with ConceptStore.open(path) as s:
        assert s.names() == ["rex"]
        got = s.get("rex")
        assert got.meta.method == "cns"
        for t, d in rex.deltas.items():
            assert got.deltas[t].values.tobytes() == d.values.tobytes()
        s.put(sample_record("mug", "cones", seed=5))  # the killed writer's lock was released
        assert s.get("mug").masks


# -- damaged values -------------------------------------------------------------------------------


def _three_concepts(path: Path) -> dict:
    records = {n: sample_record(n, m, seed=i) for i, (n, m) in
               enumerate([("rex", "cns"), ("star", "cones2"), ("mug", "cones")])}
    with ConceptStore.open(path, fingerprint="base-A") as s:
        for r in records.values():
            s.put(r)
    return records


def _assert_only_damaged(path: Path, records: dict, bad: str) -> None:
    with ConceptStore.open(path, fingerprint="base-A") as s:
        with pytest.raises(Corrupt) as err:
            s.get(bad)
        assert f"'{bad}'" in err.value.message and f"cones rm {bad}" in err.value.hint
        assert sorted(s.damaged()) == [bad]
        for name in records:
            if name != bad:
                assert s.get(name).meta.name == name
        assert sorted(s.names()) == sorted(records)
        s.delete(bad)  # the damaged concept can be removed and learned again
        s.put(records[bad])
        assert s.get(bad).meta.name == bad and s.damaged() == {}


def test_bytes_changed_on_disk_name_the_concept(tmp_path):
    path = tmp_path / "s"
    records = _three_concepts(path)
    pattern = records["star"].residual.tobytes()
    data = bytearray((path / "data.mdb").read_bytes())
    hits = 0
    pos = data.find(pattern)
    while pos >= 0:
        data[pos + 100] ^= 0x01  # one bit of one float of the residual
        hits += 1
        pos = data.find(pattern, pos + 1)
    assert hits >= 1
    (path / "data.mdb").write_bytes(bytes(data))
    _assert_only_damaged(path, records, "star")


@pytest.mark.parametrize("how", ["garbage", "truncated", "wrong key"])
def test_bad_write_names_the_concept(tmp_path, how):
    path = tmp_path / "s"
    records = _three_concepts(path)
    tensor = next(iter(records["mug"].masks)).encode()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        masks = env.open_db(b"masks", txn=txn)
        key = b"mug\x00" + tensor
        good = txn.get(key, db=masks)
        if how == "garbage":
            bad = b"\x00" * 40
        elif how == "truncated":
            bad = good[: len(good) // 2]
        else:  # rex's delta, written under mug's key
            bad = txn.get(b"rex\x00" + tensor, db=env.open_db(b"deltas", txn=txn))
        txn.put(key, bad, db=masks)
    env.close()
    _assert_only_damaged(path, records, "mug")


def test_damaged_metadata_and_jobs(tmp_path):
    path = tmp_path / "s"
    records = _three_concepts(path)
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"rex", b"cs\x01\x00junkjunk", db=env.open_db(b"concepts", txn=txn))
        txn.put(b"job-1", b"not a job", db=env.open_db(b"jobs", txn=txn))
    env.close()
    with ConceptStore.open(path) as s:
        assert sorted(m.name for m in s.list()) == ["mug", "star"]  # listing still works
        with pytest.raises(Corrupt, match="'rex'"):
            s.get("rex")
        with pytest.raises(Corrupt, match="job-1"):
            s.get_job("job-1")
        assert s.jobs() == [] and s.damaged_jobs() == ["job-1"]   # (said by `cones jobs` and `status`)
        assert s.get("mug").masks.keys() == records["mug"].masks.keys()
        # It can never run: the hint's `cones cancel` removes it
        from cns_daemon.worker import Worker

        with pytest.raises(Corrupt, match="job-1") as err:
            s.get_job("job-1")
        assert "`cones cancel job-1` removes it" in err.value.hint
        with pytest.raises(Corrupt, match="it is removed now"):
            Worker(s, lambda *a: None).cancel("job-1")
        with pytest.raises(NotFound):
            s.get_job("job-1")
        assert s.damaged_jobs() == []


def test_not_an_lmdb_file_is_a_clear_error(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not lmdb" * 1000)
    with pytest.raises(Corrupt, match="not a readable LMDB"):
        ConceptStore.open(path)
    with pytest.raises(NotFound):
        ConceptStore.open(tmp_path / "missing", create=False)


def test_store_from_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s"
    ConceptStore.open(path).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema", frame(b"schema", dump_json({"version": 99})),
                db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(ProtocolMismatch, match="schema 99"):
        ConceptStore.open(path)


def test_a_store_a_newer_cones_wrote_is_told_as_newer_not_as_damage(tmp_path):
    """A review's find: a newer cones frames every value at its own version, the schema record
    too; read so, this cones called the schema record damaged, `store check` every record, and
    the advised salvage copied nothing into a fresh store: the person's concepts gone from view.
    Now open, check and salvage all say it is a newer store, and salvage moves nothing."""
    from cones_store.salvage import check, salvage

    path = tmp_path / "s"
    with ConceptStore.open(path) as s:
        s.put(sample_record("rex", "cns"))
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:   # as a schema-2 cones writes it: framed at 2 throughout
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"schema", frame(b"schema", dump_json({"version": 2}), version=2), db=meta)
    env.close()
    for opening in (lambda: ConceptStore.open(path), lambda: check(path), lambda: salvage(path)):
        with pytest.raises(ProtocolMismatch, match="newer cones .schema 2"):
            opening()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]   # nothing moved aside


# -- map growth and concurrency -------------------------------------------------------------------

BIG = {f"blocks.{i}.attn2.to_k.weight": (320, 768) for i in range(4)}


def test_map_grows_when_full(tmp_path):
    path = tmp_path / "s"
    records = [sample_record(f"c{i}", "cns", seed=i, density=0.05, shapes=BIG) for i in range(4)]
    with ConceptStore.open(path, map_size=64 << 10) as s:
        start = s.map_size
        for r in records:  # each about 200 KB of fp16 values + indices: far past 64 KB
            s.put(r)
        assert s.map_size >= 4 * start
        assert (path / "data.mdb").stat().st_size > start
        for r in records:
            got = s.get(r.name)
            for t, d in r.deltas.items():
                assert got.deltas[t].values.tobytes() == d.values.tobytes()
    with ConceptStore.open(path, map_size=64 << 10) as s:  # reopening small still reads all
        assert sorted(s.names()) == sorted(r.name for r in records)
        assert s.get("c3").deltas.keys() == BIG.keys()


def test_map_grown_by_another_process_is_adopted(tmp_path):
    path = tmp_path / "s"
    with ConceptStore.open(path, map_size=64 << 10) as s:
        s.put(sample_record("small", "cones2"))
        small_map = s.map_size
        code = ("import sys; from cones_store import ConceptStore; "
                "from cones_store.fixtures.samples import sample_record; "
                f"BIG = {BIG!r}; s = ConceptStore.open(sys.argv[1], map_size=64 << 10); "
                "[s.put(sample_record(f'big{i}', 'cns', seed=i, shapes=BIG)) for i in range(3)]")
        subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True, timeout=120)
        assert sorted(s.names()) == ["big0", "big1", "big2", "small"]
        assert s.get("big2").deltas.keys() == BIG.keys()
        s.put(sample_record("after", "cones", seed=1, shapes=BIG))  # and this process can write
        assert s.map_size > small_map


def test_one_writer_and_readers_across_map_growth(tmp_path):
    stable = sample_record("stable", "cones", seed=0, shapes=BIG)
    store = ConceptStore.open(tmp_path / "s", map_size=64 << 10)
    store.put(stable)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            for i in range(12):
                store.put(sample_record(f"w{i}", "cns", seed=i, shapes=BIG))
                if i % 3 == 2:
                    store.delete(f"w{i - 1}")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    def reader():
        try:
            while not done.is_set():
                got = store.get("stable")
                assert all(np.array_equal(got.masks[t], stable.masks[t]) for t in BIG)
                names = store.names()
                assert "stable" in names
                store.tuned_union("cones")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    store.close()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_readers_do_not_wait_for_a_slow_write(tmp_path, monkeypatch):
    store = ConceptStore.open(tmp_path / "s")
    store.put(sample_record("rex", "cones"))
    halfway, release = threading.Event(), threading.Event()
    monkeypatch.setattr(ConceptStore, "_put_items",
                        _half_then(lambda: (halfway.set(), release.wait(30))))
    writer = threading.Thread(target=store.put, args=(sample_record("mug", "cns"),))
    writer.start()
    try:
        assert halfway.wait(30)
        t0 = time.monotonic()
        assert store.get("rex").masks and store.names() == ["rex"]  # the old snapshot
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        writer.join(30)
    assert store.names() == ["mug", "rex"]
    store.close()


def test_a_put_counts_its_overlap_before_it_takes_the_writer_lock(tmp_path, monkeypatch):
    """A review measured a generate's job record waiting 2.3 s behind a learn's put with 15
    SD-size concepts stored: the put decoded every stored concept's positions inside its write.
    Other writes now go through while the overlap is counted."""
    from cones_store.records import JobRecord

    store = ConceptStore.open(tmp_path / "s")
    store.put(sample_record("rex", "cones"))
    counting, release = threading.Event(), threading.Event()
    real = ConceptStore._shared_counts

    def slow(self, *args, **kwargs):
        counting.set()
        release.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ConceptStore, "_shared_counts", slow)
    writer = threading.Thread(target=store.put, args=(sample_record("mug", "cones", seed=2),))
    writer.start()
    try:
        assert counting.wait(30)
        t0 = time.monotonic()
        store.put_job(JobRecord(id="job-1", kind="generate", request={"prompt": "a dog"}))
        assert time.monotonic() - t0 < 5 and store.get_job("job-1").kind == "generate"
    finally:
        release.set()
        writer.join(30)
    assert store.names() == ["mug", "rex"] and "rex" in store.get("mug").overlap.shared_with
    store.close()


def test_a_part_under_a_damaged_key_makes_its_concept_damaged_not_smaller(tmp_path):
    """A review's find: one delta's key with a flipped byte ("rex\\0..." read as "rez\\0...")
    left rex whole-looking with 3 of its 4 deltas: the service would apply it and draw something
    else, and check and salvage called it whole. The store counts each concept's parts now."""
    from cones_store.salvage import check

    store = ConceptStore.open(tmp_path / "s", fingerprint="base-A")
    store.put(sample_record("rex", "cns", seed=1))
    assert store.get("rex").meta.parts["deltas"] == len(sample_record("rex", "cns", seed=1).deltas)
    # an export leaves the count behind: an importing store counts anew, an older cones reads it
    import json

    from safetensors import safe_open

    from cns_daemon.transfer import encode

    (tmp_path / "rex.safetensors").write_bytes(encode(store.get("rex")))
    with safe_open(str(tmp_path / "rex.safetensors"), "np") as f:
        assert "parts" not in json.loads(f.metadata()["meta"])
    with store._env.env.begin(write=True) as txn:
        cur = txn.cursor(db=store._db["deltas"])
        cur.set_range(b"rex\0")
        key, value = bytes(cur.key()), bytes(cur.value())
        txn.delete(key, db=store._db["deltas"])
        txn.put(b"rez" + key[3:], value, db=store._db["deltas"])
    with pytest.raises(Corrupt, match="deltas: 3 of its 4 parts read"):
        store.get("rex")
    store.close()
    assert "rex" in check(tmp_path / "s").damaged


def test_a_damaged_key_in_the_overlap_or_mask_index_fails_no_write(tmp_path):
    """A non-UTF-8 byte in an overlap or mask key made every put and delete (which walk those
    indices) fail as a bug in cones; `store check` names the key and writes go on."""
    from cones_store.salvage import check

    store = ConceptStore.open(tmp_path / "s", fingerprint="base-A")
    store.put(sample_record("rex", "cones", seed=1))
    store.put(sample_record("mug", "cones", seed=2))
    with store._env.env.begin(write=True) as txn:
        value = txn.get(b"mug", db=store._db["overlap"])
        txn.delete(b"mug", db=store._db["overlap"])
        txn.put(b"m\xf5g", value, db=store._db["overlap"])
        cur = txn.cursor(db=store._db["masks"])
        cur.set_range(b"mug\0")
        key, value = bytes(cur.key()), bytes(cur.value())
        txn.delete(key, db=store._db["masks"])
        txn.put(b"m\xf5g" + key[3:], value, db=store._db["masks"])
    store.put(sample_record("pot", "cones", seed=3))
    store.delete("rex")
    assert store.names() == ["mug", "pot"] and len(store.tuned_union()) > 0
    store.close()
    assert "m\\xf5g" in check(tmp_path / "s").damaged


def test_a_concept_under_a_damaged_key_that_reads_as_another_name_points_to_salvage(tmp_path):
    """A review's find: "rex" under a key read as "rez" was called damaged with the hint `cones
    rm rez`, which deleted its metadata (salvage would have copied it back whole), and
    prune-photos, finding no learn of "rez", could delete rex's photos."""
    import dataclasses

    store = ConceptStore.open(tmp_path / "s", fingerprint="base-A")
    rex = sample_record("rex", "cns", seed=1)
    rex = dataclasses.replace(rex, meta=dataclasses.replace(rex.meta, photo_digests=["ab" * 32]))
    store.put(rex)
    with store._env.env.begin(write=True) as txn:
        value = txn.get(b"rex", db=store._db["concepts"])
        txn.delete(b"rex", db=store._db["concepts"])
        txn.put(b"rez", value, db=store._db["concepts"])
    with pytest.raises(Corrupt) as err:
        store.get("rez")
    assert "is concept 'rex' under a damaged key" in err.value.message
    assert "salvage" in err.value.hint and "cones rm" not in err.value.hint
    assert store.misfiled_photos() == {"ab" * 32}
    store.close()


def test_a_database_root_page_overwritten_is_damage_with_the_salvage_hint(tmp_path):
    """Bytes over the root page of the store's own `meta` database: LMDB ends the transaction
    (MDB_BAD_TXN); that is a damaged store (exit 7, salvage), not a disk or permission matter."""
    import struct

    path = tmp_path / "store"
    with ConceptStore.open(path, fingerprint="base-A") as s:
        s.put(sample_record("rex", "cns"))
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:   # the main database maps each name to its MDB_db; md_root ends it
        root = struct.unpack("<Q", dict(txn.cursor())[b"meta"][-8:])[0]
    env.close()
    data = bytearray((path / "data.mdb").read_bytes())
    page = 4096
    data[root * page:root * page + 64] = b"\xff" * 64
    (path / "data.mdb").write_bytes(bytes(data))
    with pytest.raises(Corrupt) as info:
        ConceptStore.open(path, fingerprint="base-A")
    assert "damaged" in info.value.message and "cones store salvage" in info.value.hint


def test_a_store_folder_removed_while_open_refuses_writes(tmp_path):
    """Removing the data folder under a running service: writes used to go into the unlinked
    file and vanish at the restart; they are refused with what to do."""
    import shutil

    from cns_daemon.api.errors import Storage

    path = tmp_path / "store"
    with ConceptStore.open(path, fingerprint="base-A") as s:
        s.put(sample_record("rex", "cns"))
        shutil.rmtree(path)
        with pytest.raises(Storage, match="removed or replaced while the service ran") as info:
            s.put(sample_record("mug", "cns"))
        assert "Restart the service" in info.value.hint
        with ConceptStore.open(path, fingerprint="base-A") as fresh:   # a new store there
            fresh.put(sample_record("cup", "cns"))
        with pytest.raises(Storage):   # the old handle does not write into the new store's place
            s.put(sample_record("pot", "cns"))


def test_the_worker_outlives_a_store_removed_under_a_job(tmp_path):
    """The store's folder removed while a job runs: the job's end cannot be recorded, but its
    followers hear that it failed and why, and the worker thread lives on."""
    import shutil

    from cns_daemon.api.errors import Storage
    from cns_daemon.api.protocol import GenerateRequest, JobResult
    from cns_daemon.worker import Worker

    path = tmp_path / "store"
    store = ConceptStore.open(path, fingerprint="base-A")
    heard = []

    def runner(job, progress, token):
        shutil.rmtree(path)
        return JobResult(images=[])

    worker = Worker(store, runner)
    worker.hub.publish = heard.append
    worker.start()
    try:
        worker.submit("generate", GenerateRequest(prompt="a plain photo"))
        deadline = time.monotonic() + 10
        while not any(h.state == "failed" for h in heard) and time.monotonic() < deadline:
            time.sleep(0.05)
        final = [h for h in heard if h.state == "failed"]
        assert final and final[0].error.code == "storage" and "removed" in final[0].error.message
        time.sleep(0.2)
        assert worker.alive
        with pytest.raises(Storage):   # the next request is refused at once, with the reason
            worker.submit("generate", GenerateRequest(prompt="a plain photo"))
    finally:
        worker.stop()
        store.close()


def test_a_job_that_fails_with_a_cones_error_is_in_the_service_log(tmp_path, caplog):
    """From a scale review: a learn that failed on a full disk (a Storage error) was told to
    its follower and nowhere else: the service log, which a person reads later, had nothing."""
    import logging

    from cns_daemon.api.errors import Storage
    from cns_daemon.api.protocol import GenerateRequest
    from cns_daemon.worker import Worker

    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")

    def runner(job, progress, token):
        raise Storage("No space left on device.", "Free some space.")

    worker = Worker(store, runner)
    worker.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cns_daemon.worker"):
            job = worker.submit("generate", GenerateRequest(prompt="a plain photo"))
            deadline = time.monotonic() + 10
            while store.get_job(job.id).state != "failed" and time.monotonic() < deadline:
                time.sleep(0.02)
        assert f"job {job.id} (generate) failed: No space left on device." in caplog.text
    finally:
        worker.stop()
        store.close()


def _running_learn(worker, store):
    """A learn submitted to `worker`, once it runs."""
    from cns_daemon.api.protocol import AddRequest, Photo

    learn = worker.submit("learn", AddRequest(name="rex", class_word="dog", steps=10, photos=[
        Photo(filename="a.png", data=b"x"), Photo(filename="b.png", data=b"y")]))
    deadline = time.monotonic() + 10
    while store.get_job(learn.id).state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    return learn


def test_a_crash_in_a_generate_is_not_counted_against_the_learn_it_paused(tmp_path):
    """A learn pauses for a generate; the service dies in the generate (an out-of-memory kill, say).
    At start-up the generate takes the crash (attempt 2 of 2 next) and the learn starts over
    uncounted, as after a clean stop: it was not running its own work."""
    import contextlib
    import threading

    from cns_daemon.api.protocol import GenerateRequest, JobResult
    from cns_daemon.worker import Worker, restart_note

    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    in_generate, release = threading.Event(), threading.Event()

    def runner(job, progress, token):
        if job.kind == "generate":
            in_generate.set()
            release.wait(10)
            return JobResult(images=[])
        while not token.cancelled:   # a learn: steps, with a pause point between them
            token.pause_point(contextlib.nullcontext)
            time.sleep(0.01)
        token.check()

    worker = Worker(store, runner)
    worker.start()
    try:
        learn = _running_learn(worker, store)
        gen = worker.submit("generate", GenerateRequest(prompt="a plain photo"))
        assert in_generate.wait(10)
        assert store.get_job(learn.id).paused and store.get_job(learn.id).state == "running"

        # What start-up finds if the process died now: both records say "running".
        settled = {j.id: j for j in Worker(store, runner).recover()}
        assert settled[learn.id].state == "queued" and settled[learn.id].attempts == 0
        assert not settled[learn.id].paused
        assert restart_note(settled[learn.id]) == (
            "restarted after the service stopped while it ran; it starts over when it runs")
        assert settled[gen.id].state == "queued" and settled[gen.id].attempts == 1
    finally:
        release.set()
        worker.stop()
        store.close()


def test_a_learn_is_no_longer_marked_paused_once_it_resumes(tmp_path):
    """The mark is taken off when the learn goes on, so a crash in its own steps counts."""
    import contextlib

    from cns_daemon.api.protocol import GenerateRequest, JobResult
    from cns_daemon.worker import Worker

    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    steps_after: list[bool] = []

    def runner(job, progress, token):
        if job.kind == "generate":
            return JobResult(images=[])
        while not token.cancelled:
            paused_before = token.pause_wanted
            token.pause_point(contextlib.nullcontext)
            if paused_before:
                steps_after.append(store.get_job(job.id).paused)
            time.sleep(0.01)
        token.check()

    worker = Worker(store, runner)
    worker.start()
    try:
        learn = _running_learn(worker, store)
        deadline = time.monotonic() + 10
        gen = worker.submit("generate", GenerateRequest(prompt="a plain photo"))
        while not steps_after and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.get_job(gen.id).state == "done"
        assert steps_after == [False] and not store.get_job(learn.id).paused
    finally:
        worker.stop()
        store.close()


def test_the_worker_gives_freed_memory_back_after_each_job(tmp_path, monkeypatch):
    """glibc keeps a job's freed heap for reuse; the worker asks it back after every job, so an
    idle service does not hold its largest job's peak."""
    from cns_daemon import worker as worker_module
    from cns_daemon.api.protocol import GenerateRequest, JobResult
    from cns_daemon.worker import Worker

    import types

    worker_module.release_freed()   # the real call: found on this system, or a no-op
    emptied = []   # and the GPU's cache, where torch has a GPU in use
    cuda = types.SimpleNamespace(is_initialized=lambda: True, empty_cache=lambda: emptied.append(1))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    worker_module.release_freed()
    monkeypatch.undo()
    assert emptied == [1]
    trims: list[str] = []
    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    monkeypatch.setattr(worker_module, "release_freed",
                        lambda: trims.append(store.jobs()[0].state))
    worker = Worker(store, lambda job, progress, token: JobResult(images=[]))
    worker.start()
    try:
        worker.submit("generate", GenerateRequest(prompt="a plain photo"))
        deadline = time.monotonic() + 10
        while not trims and time.monotonic() < deadline:
            time.sleep(0.01)
        assert trims == ["done"]   # once, after the job's end was recorded
    finally:
        worker.stop()
        store.close()


def test_the_job_queue_goes_on_after_the_worker_meets_an_error_between_jobs(tmp_path, monkeypatch):
    """A review's find: out of file handles, the step after a job (giving memory back) raised
    and the worker thread died; the service went on answering while no job ever ran again and
    `cones generate` waited for good. The worker logs it and serves the next job."""
    from cns_daemon import worker as worker_module
    from cns_daemon.api.protocol import GenerateRequest, JobResult
    from cns_daemon.worker import Worker

    calls: list[int] = []

    def failing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")

    monkeypatch.setattr(worker_module, "release_freed", failing_once)
    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    worker = Worker(store, lambda job, progress, token: JobResult(images=[]))
    worker.start()
    try:
        first = worker.submit("generate", GenerateRequest(prompt="a plain photo"))
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        second = worker.submit("generate", GenerateRequest(prompt="another photo"))
        deadline = time.monotonic() + 20
        while store.get_job(second.id).state != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get_job(first.id).state == store.get_job(second.id).state == "done"
        assert worker.alive and len(calls) == 2
    finally:
        worker.stop()
        store.close()


def test_a_job_end_the_store_could_not_take_is_recorded_later_or_at_a_cancel(tmp_path, monkeypatch):
    """A review's find: a job whose end could not be written (a full disk) read "running" until
    a restart, `cones cancel` said "it stops at its next step" and did nothing, and a learn of
    the same name was refused as under way. Its end is now kept and recorded before the next
    job starts, or at once by a cancel."""
    from cns_daemon.api.errors import Storage
    from cns_daemon.api.protocol import GenerateRequest, JobResult
    from cns_daemon.worker import Worker

    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    real_put, full = store.put_job, [True]

    def put_job(job):
        if job.state in ("done", "failed", "cancelled") and full[0]:
            raise Storage("The store's disk is full.")
        return real_put(job)

    monkeypatch.setattr(store, "put_job", put_job)
    told: list[tuple[str, str]] = []   # what the listeners (the inbox, the status line) hear
    worker = Worker(store, lambda job, progress, token: JobResult(images=[]),
                    on_change=lambda job: told.append((job.id, job.state)))
    worker.start()
    try:
        first = worker.submit("generate", GenerateRequest(prompt="a plain photo"))
        wait_until(lambda: first.id in worker._unrecorded, what="the end that could not be written")
        assert store.get_job(first.id).state == "running"
        # what a follower, `cones jobs` and `cones status` read meanwhile: its end (a follower of
        # a generate that failed fast waited on the record's "running" for good)
        assert worker.view(store.get_job(first.id)).state == "done"
        with pytest.raises(Storage):   # the disk still full: said, and the end still kept
            worker.cancel(first.id)
        full[0] = False
        assert worker.cancel(first.id).state == "done"   # what it was, recorded by the cancel
        full[0] = True
        assert store.get_job(first.id).state == "done" and not worker._unrecorded
        second = worker.submit("generate", GenerateRequest(prompt="another photo"))
        wait_until(lambda: second.id in worker._unrecorded, what="the second end")
        full[0] = False   # space again: recorded before the next job starts
        third = worker.submit("generate", GenerateRequest(prompt="a third photo"))
        wait_until(lambda: store.get_job(third.id).state == "done", what="the third job")
        assert store.get_job(second.id).state == "done"
        assert (first.id, "done") in told and (second.id, "done") in told   # the late ends told too
    finally:
        worker.stop()
        store.close()


def test_a_salvage_stopped_between_its_two_moves_is_finished_at_the_next_start(tmp_path, monkeypatch):
    """The damaged store moved aside, the process died before the copy took its place: the next
    start found no store and made an empty one. Now the whole copy is put in its place."""
    from cns_daemon.api.settings import Paths
    from cns_daemon.daemon import open_store
    from cones_store.salvage import COMPLETE, salvage

    path = tmp_path / "data" / "store"
    records = _three_concepts(path)
    real_rename = Path.rename

    def dies_before_the_copy_moves(self, target):
        if Path(target) == path:
            raise KeyboardInterrupt("the process died here")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_before_the_copy_moves)
    with pytest.raises(KeyboardInterrupt):
        salvage(path)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not path.exists()
    paths = Paths(data=tmp_path / "data", config=tmp_path, runtime=tmp_path / "run", inbox=tmp_path / "inbox")
    assert paths.store == path
    with open_store(paths) as store:
        assert sorted(store.names()) == sorted(records)
    assert not (path / COMPLETE).exists()
    assert not list(path.parent.glob("store.salvage-*"))
    assert len(list(path.parent.glob("store.damaged-*"))) == 1


def test_a_job_failed_after_two_crashes_has_no_note_contradicting_its_error():
    """Stopped cleanly once, then killed twice: the note said "it started over" beside the error
    "The service stopped while this job was running, twice"."""
    from cns_daemon.api.errors import Internal
    from cns_daemon.worker import CRASH_REASON, error_body, restart_note
    from cones_store.records import JobRecord

    job = JobRecord(id="j", kind="generate", request={}, state="failed", attempts=2, interrupted=1,
                    error=error_body(Internal(CRASH_REASON)))
    assert restart_note(job) == ""
    job.error, job.state, job.attempts = None, "done", 1   # stopped cleanly once, then ran through
    assert "started over" in restart_note(job)


def test_a_store_file_cut_short_or_emptied_is_damage_not_a_crash_nor_a_new_store(tmp_path):
    """A data.mdb cut short (a full disk, a copy stopped half-way) killed check, salvage and
    serve with SIGBUS and no word; an emptied one was made a new empty store by the service,
    its concepts gone without a word."""
    import shutil

    src = tmp_path / "store"
    with ConceptStore.open(src, fingerprint="base-A") as store:
        for i in range(40):
            store.put(sample_record(f"c{i}", "cns", seed=i))
    size = (src / "data.mdb").stat().st_size
    for cut, said in ((size // 3, "cut short"), (8192, "cut short"), (0, "empty (0 bytes)")):
        trial = tmp_path / f"t{cut}"
        shutil.copytree(src, trial)
        os.truncate(trial / "data.mdb", cut)
        # in a child: a SIGBUS there is a failed test, not a dead test run
        script = ("from cones_store import ConceptStore\n"
                  "from cns_daemon.api.errors import Corrupt\n"
                  "try:\n"
                  f"    ConceptStore.open({str(trial)!r}, fingerprint='base-A')\n"
                  "except Corrupt as exc:\n"
                  "    print(exc.message)\n")
        out = subprocess.run([sys.executable, "-c", script], cwd=str(Path(__file__).parents[1]),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and said in out.stdout, (cut, out.returncode, out.stdout, out.stderr)
        assert (trial / "data.mdb").stat().st_size == cut   # nothing made anew over it


def test_two_salvages_in_one_second_keep_both_stores(tmp_path, monkeypatch):
    """`cones store salvage --force` twice in a second: the second failed on the first's
    store.damaged-<time> folder ("Directory not empty") and left its whole copy beside the store."""
    from cones_store import salvage as salvage_module

    path = tmp_path / "store"
    with ConceptStore.open(path, fingerprint="base-A") as store:
        store.put(sample_record("c1", "cns"))
    monkeypatch.setattr(salvage_module.time, "strftime", lambda fmt: "20261206-075912")
    first = salvage_module.salvage(path)
    second = salvage_module.salvage(path)
    assert first.kept_at != second.kept_at and Path(second.kept_at).name.endswith("-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "store", "store.damaged-20261206-075912", "store.damaged-20261206-075912-2"]
    with ConceptStore.open(path) as store:
        assert store.names() == ["c1"]


def test_a_stop_that_outlasts_a_slow_step_gives_the_attempt_back(tmp_path):
    """A review's find: a job in a step longer than the stop's wait (a class-image batch, a large
    generate on a CPU) was left "running" as the process exited, so the next start counted a
    clean stop as a crash, and a second such stop failed the job. Now it is back in the queue
    with its attempt returned, once, however its thread ends."""
    from cns_daemon.worker import Worker

    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    in_step, release = threading.Event(), threading.Event()

    def runner(job, progress, token):
        in_step.set()
        release.wait(10)   # a step that does not look at the token
        token.check()      # its next step: cancelled by the stop

    worker = Worker(store, runner)
    worker.start()
    try:
        learn = _running_learn(worker, store)
        assert in_step.wait(10)
        worker.stop(timeout=0.2)
        job = store.get_job(learn.id)
        assert (job.state, job.attempts, job.interrupted) == ("queued", 0, 1)
        release.set()
        worker._thread.join(10)
        job = store.get_job(learn.id)
        assert (job.state, job.attempts, job.interrupted) == ("queued", 0, 1)
        assert Worker(store, runner).recover() == []   # nothing for the next start to settle
    finally:
        release.set()
        store.close()


def test_running_out_of_memory_is_said_with_what_to_change(tmp_path):
    """Not "a bug in cones": a generate that ran out of memory is told to draw fewer or smaller
    images, or to turn the memory options on."""
    import torch

    from cns_daemon.api.protocol import GenerateRequest
    from cns_daemon.worker import Worker

    store = ConceptStore.open(tmp_path / "store", fingerprint="base-A")

    def runner(job, progress, token):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    worker = Worker(store, runner)
    worker.start()
    try:
        job = worker.submit("generate", GenerateRequest(prompt="a plain photo", n=16))
        deadline = time.monotonic() + 10
        while store.get_job(job.id).state != "failed" and time.monotonic() < deadline:
            time.sleep(0.02)
        error = store.get_job(job.id).error
        assert "ran out of memory" in error["message"] and "fewer images" in error["hint"]
        assert "bug" not in error["hint"]
    finally:
        worker.stop()
        store.close()


def test_an_import_whose_creation_time_is_no_time_is_refused():
    """A review's find: "created": 1e20 passed the import's type check and failed every
    `cones show` of the concept after (no calendar holds it)."""
    import dataclasses

    from cns_daemon.api.errors import BadInput
    from cns_daemon.transfer import decode, encode

    record = sample_record("rex", "cns", seed=1)
    record = dataclasses.replace(record, meta=dataclasses.replace(record.meta, fingerprint="base-A", created=1e9))
    assert decode(encode(record)).meta.created == 1e9
    for bad in (1e20, -5.0, float("nan")):
        odd = dataclasses.replace(record, meta=dataclasses.replace(record.meta, created=bad))
        with pytest.raises(BadInput, match="creation time"):
            decode(encode(odd))
