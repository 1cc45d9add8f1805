"""Damage in the store, met by a real daemon process: a damaged concept can be removed and its
name used again; a bad B-tree page marks the concepts behind it damaged while the service serves
the rest; a store whose structure is unreadable is one clear error; `cones list` / `cones
status` show what is damaged or not rebuilt; `cones store check` / `cones store salvage` find it
and copy everything readable into a fresh store."""
from __future__ import annotations

import json
import shutil
import signal
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest

from cns_daemon.api.errors import EXIT_CODES, ErrorCode
from cones_store import ConceptStore
from cones_store.records import ConceptMeta, ConceptRecord, JobRecord, SparseDelta
from helpers.service import cli_in_process, short_home, start_daemon, write_photos

CORRUPT = EXIT_CODES[ErrorCode.CORRUPT]
P_BRANCH, P_LEAF = 0x01, 0x02
PAGE_HEADER = 16   # pgno (8), pad (2), flags (2), lower (2), upper (2)


# -- reaching into LMDB's file ---------------------------------------------------------------------


def db_root(store_dir: Path, db: str) -> tuple[int, int]:
    """(root page number, page size) of a named database, from its record in the main DB
    (LMDB's MDB_db: pad u32, flags u16, depth u16, four counters, root pgno)."""
    env = lmdb.open(str(store_dir), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            raw = txn.get(db.encode())
        psize = env.stat()["psize"]
    finally:
        env.close()
    return struct.unpack("<IHHQQQQQ", raw)[-1], psize


def xor_bytes(store_dir: Path, offset: int, mask: bytes) -> None:
    data = bytearray((store_dir / "data.mdb").read_bytes())
    for i, m in enumerate(mask):
        data[offset + i] ^= m
    (store_dir / "data.mdb").write_bytes(bytes(data))


def damage_value(store_dir: Path, db: str, key: bytes) -> None:
    """Flip two bytes in the middle of one stored value, wherever its bytes stand in the file
    (copy-on-write leaves older copies in free pages too)."""
    env = lmdb.open(str(store_dir), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        value = bytes(txn.get(key, db=env.open_db(db.encode(), txn=txn, create=False)))
    env.close()
    data = (store_dir / "data.mdb").read_bytes()
    offset, hits = data.find(value), 0
    while offset >= 0:
        xor_bytes(store_dir, offset + len(value) // 2, b"\x5a\xa5")
        hits += 1
        offset = data.find(value, offset + 1)
    assert hits


def break_branch_pointer(store_dir: Path, db: str, node: int = 1) -> None:
    """XOR 2 bytes of one child pointer in a database's root branch page: the page number then
    points past the end of the file (MDB_PAGE_NOTFOUND for every key under that child)."""
    root, psize = db_root(store_dir, db)
    page = (store_dir / "data.mdb").read_bytes()[root * psize:(root + 1) * psize]
    flags, lower = struct.unpack_from("<HH", page, 10)
    assert flags & P_BRANCH and (lower - PAGE_HEADER) // 2 > node, "not a branch page with children"
    node_at = struct.unpack_from("<H", page, PAGE_HEADER + 2 * node)[0]
    xor_bytes(store_dir, root * psize + node_at + 2, b"\x01\x01")   # mn_hi: pgno += 0x0101 << 16


def break_leaf_root(store_dir: Path, db: str) -> None:
    """Clear the leaf flag of a one-page database's root: LMDB then finds a page of the wrong
    kind (MDB_CORRUPTED) whenever it walks that database."""
    root, psize = db_root(store_dir, db)
    page = (store_dir / "data.mdb").read_bytes()[root * psize:(root + 1) * psize]
    assert struct.unpack_from("<H", page, 10)[0] == P_LEAF
    xor_bytes(store_dir, root * psize + 10, bytes([P_LEAF]))


# -- concepts that fit the tiny model ---------------------------------------------------------------


def tiny_records(count: int, seed: int = 0) -> tuple[str, list[ConceptRecord]]:
    """`count` CNS concepts with deltas of the tiny pipeline's K/V shapes (about 30 % of each
    tensor), one CNS concept whose delta has a shape the model does not have (it cannot be
    rebuilt), and one Cones 2 concept; with the tiny model's fingerprint."""
    from cns_daemon.methods.common.tokens import rare_tokens
    from cns_daemon.model import build_tiny_pipeline, fingerprint, kv_weights

    pipe = build_tiny_pipeline(seed=0)
    fp = fingerprint(pipe)
    weights = kv_weights(pipe.unet)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    tokens = rare_tokens(pipe.tokenizer)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count + 1):
        deltas = {}
        for name, w in weights.items():
            flat = w.detach().numpy().reshape(-1)
            idx = np.flatnonzero(rng.random(flat.size) < 0.3).astype(np.int64)
            values = (flat[idx] + rng.normal(0, 0.01, idx.size)).astype(np.float16)
            deltas[name] = SparseDelta(idx, values, tuple(w.shape))
        name = f"c{i:02d}" if i < count else "a-wrongshape"
        if i == count:
            first = next(iter(deltas))
            deltas[first] = SparseDelta(np.arange(4, dtype=np.int64), np.zeros(4, np.float16), (2, 2))
        meta = ConceptMeta(name, "cns", "dog", tokens[i], created=1000.0 + i, fingerprint=fp)
        records.append(ConceptRecord(meta, deltas=deltas,
                                     embeddings={tokens[i]: rng.normal(0, 0.02, width).astype(np.float32)}))
    meta = ConceptMeta("a-flat", "cones2", "mug", "", created=2000.0, fingerprint=fp)
    records.append(ConceptRecord(meta, residual=rng.normal(0, 0.1, width).astype(np.float32)))
    return fp, records


def write_store(home: Path, records: list[ConceptRecord], fp: str, jobs: int = 0) -> Path:
    path = home / "data" / "store"
    with ConceptStore.open(path, fingerprint=fp) as store:
        for r in records:
            store.put(r)
        for i in range(jobs):
            store.put_job(JobRecord(id=f"{i:012x}", kind="remove", request={"name": "x"},
                                    state="done", finished=1.0))
    return path


def unreadable(path: Path) -> set[str]:
    """Concepts a direct read of the store cannot return (whatever the error)."""
    bad = set()
    with ConceptStore.open(path, readonly=True) as store:
        for name in store.names():
            try:
                store.get(name)
            except Exception:
                bad.add(name)
    return bad


@pytest.fixture
def home():
    h = short_home()
    started = []
    yield h, started
    for d in started:
        d.kill(signal.SIGTERM)
    shutil.rmtree(h, ignore_errors=True)


def _states(cones) -> dict[str, str]:
    code, out, err = cones("list", "--json")
    assert code == 0, out + err
    return {c["name"]: c["state"] for c in json.loads(out)}


# -- item 1: a damaged concept can be removed -------------------------------------------------------


def test_damaged_concept_is_removed_and_its_name_is_free_again(home, tmp_path, monkeypatch):
    h, started = home
    cones = cli_in_process(h, monkeypatch)
    started.append(start_daemon(h))
    photos = [str(p) for p in write_photos(tmp_path / "rex", 2)]
    assert cones("add", "rex", *photos, "--class", "dog", "--steps", "2")[0] == 0
    assert cones("add", "mug", *photos, "--class", "mug", "--steps", "2")[0] == 0
    started.pop().kill(signal.SIGTERM)

    damage_value(h / "data" / "store", "concepts", b"rex")   # bytes inside rex's metadata

    started.append(start_daemon(h))
    assert _states(cones) == {"mug": "ok", "rex": "damaged"}
    code, out, err = cones("status", "--json")
    assert json.loads(out)["damaged"] == 1 and json.loads(out)["concepts"] == 2
    code, out, err = cones("status")
    assert code == 0 and "2 (1 damaged; see `cones list`)" in " ".join(out.split()), out
    code, out, err = cones("list")
    assert "damaged" in out and "cones rm rex" in err
    code, out, err = cones("generate", "a photo of <rex>")
    assert code == CORRUPT and "cones rm rex" in err
    code, out, err = cones("show", "rex", "--json")   # shown as list shows it, not refused
    assert code == 0 and json.loads(out)["state"] == "damaged" and "cones rm rex" in json.loads(out)["hint"]
    code, out, err = cones("show", "rex")
    assert code == 0 and "damaged" in out and "cones rm rex" in " ".join(out.split()), out + err
    code, out, err = cones("rm", "rex")
    assert code == 0, out + err
    assert _states(cones) == {"mug": "ok"}
    code, out, err = cones("add", "rex", *photos, "--class", "dog", "--steps", "2")
    assert code == 0, out + err
    assert _states(cones) == {"mug": "ok", "rex": "ok"}


@pytest.mark.slow   # 10-12 s; the main path is in the default run (the suite neared 14 min)
def test_salvage_says_how_to_learn_a_lost_concept_again_from_its_archived_photos(home, tmp_path, monkeypatch):
    """A concept salvage cannot copy is named with the command that learns it again from its
    archived photos: from its metadata when that reads, else from the learn job that made it."""
    import shlex

    h, started = home
    cones = cli_in_process(h, monkeypatch)
    started.append(start_daemon(h))
    photos = [str(p) for p in write_photos(tmp_path / "rex", 3)]
    assert cones("add", "rex", *photos, "--class", "dog", "--steps", "2")[0] == 0
    assert cones("add", "mug", *photos[:2], "--class", "mug", "--steps", "2")[0] == 0
    started.pop().kill(signal.SIGTERM)
    store_dir = h / "data" / "store"
    damage_value(store_dir, "concepts", b"rex")   # its metadata: the learn job says its photos
    with ConceptStore.open(store_dir) as store:   # the test double stores no values: give mug one
        meta = store.meta("mug")
        store.put(ConceptRecord(meta, deltas={"k": SparseDelta(np.arange(64, dtype=np.int64),
                                                               np.ones(64, np.float16), (8, 8))}),
                  replace=True)
    damage_value(store_dir, "deltas", _a_value_of(store_dir, b"mug"))   # its metadata still reads
    with ConceptStore.open(store_dir, create=False, readonly=True) as store:   # both routes are taken
        assert store.meta("mug").photo_digests
        with pytest.raises(Exception, match="damaged"):
            store.meta("rex")

    code, out, err = cones("store", "salvage")
    assert code == 0, out + err
    text = " ".join(out.split())
    assert "left behind <rex>" in text and "left behind <mug>" in text, out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("cones add ")]
    by_name = {shlex.split(c)[2]: shlex.split(c) for c in commands}
    assert set(by_name) == {"rex", "mug"}, out
    # what it was learned with: from rex's learn job (all of it), from mug's metadata (what the
    # test double records: the method)
    for name, n, rest in (("rex", 3, ["--class", "dog", "--method", "cns", "--steps", "2", "--seed", "0"]),
                          ("mug", 2, ["--class", "mug", "--method", "cns"])):
        words = by_name[name]
        at = words.index("--class")
        assert words[at:] == rest, words
        archived = words[3:at]
        assert len(archived) == n and all(Path(p).is_file() for p in archived)
        assert all(str(h / "data") in p for p in archived)
    assert "kept (`cones prune-photos` leaves them)" in text
    # the photos the commands name outlive a pruning: no concept of the fresh store names them
    started.append(start_daemon(h))
    code, out, _ = cones("prune-photos")
    assert code == 0 and out.startswith("Deleted 0 ") and all(Path(p).is_file() for p in by_name["rex"][3:6])
    # the command it printed works: the concept is back, and no longer kept as lost
    assert cones(*by_name["rex"][1:], "--steps", "2")[0] == 0
    assert _states(cones) == {"rex": "ok"}
    mug_photos = by_name["mug"][3:5]
    with ConceptStore.open(store_dir, create=False, readonly=True) as store:
        assert set(store.lost()) == {"mug"}
    # a lost concept can be let go: its photos then go with `--photos` (rex still uses them here)
    code, out, _ = cones("rm", "mug", "--photos")
    assert code == 0 and "Removed <mug> and 0 archived photos (2 kept" in " ".join(out.split()), out
    assert cones("rm", "mug")[0] != 0   # gone for good
    assert cones("rm", "rex", "--photos")[0] == 0
    assert not any(Path(p).exists() for p in mug_photos)


def _a_value_of(store_dir: Path, name: bytes) -> bytes:
    """The key of one of a concept's deltas."""
    from cones_store.overlap import SEP

    env = lmdb.open(str(store_dir), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            with txn.cursor(env.open_db(b"deltas", txn=txn, create=False)) as cur:
                if cur.set_range(name + SEP) and bytes(cur.key()).startswith(name + SEP):
                    return bytes(cur.key())
    finally:
        env.close()
    raise AssertionError(f"no values stored for {name!r}")


# one flip in the default run, the other with -m slow (CI runs both): 11 s each
@pytest.mark.parametrize("flip, shown", [pytest.param(b"\x00\x80\x00", "r\\xe5x", marks=pytest.mark.slow),
                                         (b"\x00\x45\x00", "r x")], ids=["not-utf8", "a-space"])
def test_a_concept_key_whose_bytes_are_no_name_leaves_the_service_serving_the_rest(home, tmp_path,
                                                                                  monkeypatch, flip, shown):
    """A byte of a concepts key flipped ("rex" read as "r\\xe5x" or "r x"): the service failed to
    start on it. It starts, lists it damaged with what to do, and salvage leaves it behind."""
    h, started = home
    cones = cli_in_process(h, monkeypatch)
    started.append(start_daemon(h))
    photos = [str(p) for p in write_photos(tmp_path / "rex", 2)]
    assert cones("add", "rex", *photos, "--class", "dog", "--steps", "2")[0] == 0
    others = [str(p) for p in write_photos(tmp_path / "mug", 2, seed=50)]
    assert cones("add", "mug", *others, "--class", "mug", "--steps", "2")[0] == 0
    started.pop().kill(signal.SIGTERM)
    store_dir = h / "data" / "store"
    root, psize = db_root(store_dir, "concepts")
    at = (store_dir / "data.mdb").read_bytes()[root * psize:(root + 1) * psize].find(b"rex")
    xor_bytes(store_dir, root * psize + at, flip)

    started.append(start_daemon(h))
    assert _states(cones) == {"mug": "ok", shown: "damaged"}
    code, out, err = cones("list")
    assert code == 0 and "cones store salvage" in " ".join(err.split()), out + err
    code, out, _ = cones("status")
    assert "2 (1 damaged; see `cones list`)" in " ".join(out.split()), out
    # which photos the damaged one needs is not known until salvage reads it: none pruned
    code, out, _ = cones("prune-photos")
    assert code == 0 and out.startswith("Deleted 0 "), out
    assert cones("add", "rex", *photos, "--class", "dog", "--steps", "2")[0] == 0   # the name is free
    started.pop().kill(signal.SIGTERM)
    code, out, _ = cones("store", "salvage")
    text = " ".join(out.split())
    assert code == 0 and f"left behind <{shown}>: Its name in the concept store is damaged" in text, out
    started.append(start_daemon(h))
    assert _states(cones) == {"mug": "ok", "rex": "ok"}


# one flip in the default run, the others with -m slow (CI runs both): 6 s each
@pytest.mark.parametrize("flip, shown", [pytest.param(b"\x00\x80\x00", "r\\xe5x", marks=pytest.mark.slow),
                                         (b"\x00\x45\x00", "r x"),
                                         pytest.param(b"\x00\x04\x00", "rax", marks=pytest.mark.slow)],
                         ids=["not-utf8", "a-space", "another-name"])
def test_salvage_files_a_concept_under_a_damaged_key_under_its_own_name_again(home, tmp_path,
                                                                          monkeypatch, flip, shown):
    """The metadata under a damaged key names the concept it was written for, and its checksum
    (which covers the key) confirms it: salvage copies the concept whole under that name, where
    it left it behind to be learned again."""
    h, started = home
    cones = cli_in_process(h, monkeypatch)
    started.append(start_daemon(h))
    for name, seed in (("rex", 0), ("mug", 50)):
        photos = [str(p) for p in write_photos(tmp_path / name, 2, seed=seed)]
        assert cones("add", name, *photos, "--class", "dog", "--steps", "2")[0] == 0
    started.pop().kill(signal.SIGTERM)
    store_dir = h / "data" / "store"
    root, psize = db_root(store_dir, "concepts")
    at = (store_dir / "data.mdb").read_bytes()[root * psize:(root + 1) * psize].find(b"rex")
    xor_bytes(store_dir, root * psize + at, flip)

    code, out, _ = cones("store", "check")
    text = " ".join(out.split())
    assert code == CORRUPT and f"misfiled <rex>: whole, but its key reads '{shown}'" in text, out
    code, out, _ = cones("store", "salvage")
    text = " ".join(out.split())
    assert code == 0 and f"filed <rex> under its own name again (its key read '{shown}')" in text, out
    assert "left behind" not in text and "Copied 2 concepts" in text, out
    started.append(start_daemon(h))
    assert _states(cones) == {"mug": "ok", "rex": "ok"}
    assert json.loads(cones("show", "rex", "--json")[1])["class_word"] == "dog"


# -- items 2 and 3: a bad page; check and salvage ------------------------------------------------------


@pytest.mark.slow   # 15 s; damaged concepts are in the default run (CI runs -m slow)
def test_bad_page_in_deltas_marks_concepts_damaged_and_salvage_keeps_the_rest(home, monkeypatch):
    h, started = home
    cones = cli_in_process(h, monkeypatch)
    fp, records = tiny_records(12)
    path = write_store(h, records, fp)
    break_branch_pointer(path, "deltas")
    lost = unreadable(path)
    cns_ok = {r.name for r in records if r.meta.method == "cns"} - lost - {"a-wrongshape"}
    assert lost and cns_ok and lost < {r.name for r in records}

    started.append(start_daemon(h, fake=False, args=("--model", "tiny"), timeout=180))
    states = _states(cones)
    assert {n for n, s in states.items() if s == "damaged"} == lost
    assert states["a-wrongshape"] == "not_rebuilt" and states["a-flat"] == "ok"
    assert all(states[n] == "ok" for n in cns_ok)
    code, out, err = cones("status", "--json")
    status = json.loads(out)
    assert (status["concepts"], status["damaged"], status["not_rebuilt"]) == (len(records), len(lost), 1)
    ok_name, bad_name = sorted(cns_ok)[0], sorted(lost)[0]
    code, out, err = cones("generate", f"a photo of <{ok_name}> and <a-flat>", "--steps", "2")
    assert code == 0, out + err
    code, out, err = cones("generate", f"a photo of <{bad_name}>", "--steps", "2")
    assert code == CORRUPT and "cones store salvage" in err
    code, out, err = cones("generate", "a photo of <a-wrongshape>", "--steps", "2")
    assert code != 0 and "a-wrongshape" in err
    code, out, err = cones("rm", bad_name)   # its keys sit behind the bad page: salvage is the way
    assert code == CORRUPT and "cones store salvage" in err
    started.pop().kill(signal.SIGTERM)

    code, out, err = cones("store", "check")
    assert code == CORRUPT and all(f"<{n}>" in out for n in lost), out
    code, out, err = cones("store", "salvage")
    assert code == 0 and f"Copied {len(records) - len(lost)} concepts" in out, out + err
    assert len(list(path.parent.glob("store.damaged-*"))) == 1
    code, out, err = cones("store", "check", "--json")
    assert code == 0 and json.loads(out)["ok"] and not json.loads(out)["damaged"]

    started.append(start_daemon(h, fake=False, args=("--model", "tiny"), timeout=180))
    states = _states(cones)
    assert set(states) == {r.name for r in records} - lost
    assert states["a-wrongshape"] == "not_rebuilt"
    assert all(s == "ok" for n, s in states.items() if n != "a-wrongshape")
    code, out, err = cones("generate", f"a photo of <{ok_name}>", "--steps", "2")
    assert code == 0, out + err


def test_unreadable_structure_is_one_clear_error_and_salvage_restores_service(home, monkeypatch):
    import subprocess
    import sys

    from helpers.service import REPO, daemon_env

    import dataclasses

    h, started = home
    cones = cli_in_process(h, monkeypatch)
    fake_fp = "f" * 32   # the test double's base model: the store fails before any model loads
    records = [dataclasses.replace(r, meta=dataclasses.replace(r.meta, fingerprint=fake_fp))
               for r in tiny_records(2)[1]]
    path = write_store(h, records, fake_fp, jobs=3)
    break_leaf_root(path, "jobs")
    proc = subprocess.run([sys.executable, "-m", "cones_cli.main", "serve", "--model", "tiny"],
                          env=daemon_env(h), cwd=str(REPO), capture_output=True, text=True, timeout=180)
    assert proc.returncode == CORRUPT, proc.stdout + proc.stderr
    assert "is damaged" in proc.stderr and "cones store salvage" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout

    code, out, err = cones("store", "check")
    assert code == CORRUPT and "damaged database" in out and "jobs" in out, out
    code, out, err = cones("store", "salvage")
    assert code == 0 and f"Copied {len(records)} concepts and 0 jobs" in out, out + err
    started.append(start_daemon(h))
    states = _states(cones)
    assert set(states) == {r.name for r in records} and set(states.values()) == {"ok"}


def test_salvage_refuses_while_the_service_runs(home, monkeypatch):
    h, started = home
    cones = cli_in_process(h, monkeypatch)
    started.append(start_daemon(h))
    code, out, err = cones("store", "salvage")
    assert code == EXIT_CODES[ErrorCode.CONFLICT] and "already running" in err
    # a shell that sees another runtime folder (no XDG_RUNTIME_DIR after su) is refused as well:
    # the service holds a lock in the data folder too
    monkeypatch.setenv("CONES_RUNTIME_DIR", str(h / "elsewhere"))
    code, out, err = cones("store", "salvage")
    assert code == EXIT_CODES[ErrorCode.CONFLICT] and "already running on the data folder" in err, err
    monkeypatch.delenv("CONES_RUNTIME_DIR")
    code, out, err = cones("store", "check")   # reading is fine beside a running service
    assert code == 0, out + err


def test_the_data_lock_and_the_runtime_lock_can_share_a_folder(tmp_path):
    """runtime_dir may be the data folder: the service's two locks are two files there."""
    from cns_daemon.api.settings import Paths
    from cns_daemon.daemon import InstanceLock

    paths = Paths(data=tmp_path, config=tmp_path, runtime=tmp_path, inbox=tmp_path)
    runtime, data = InstanceLock(paths.runtime_lock), InstanceLock(paths.data_lock)
    runtime.acquire(tmp_path / "cones.sock")
    try:
        data.acquire(None)
        data.release()
    finally:
        runtime.release()


def test_salvage_of_a_healthy_store_moves_nothing(home, monkeypatch):
    h, started = home
    cones = cli_in_process(h, monkeypatch)
    fp, records = tiny_records(2)
    path = write_store(h, records, fp, jobs=1)
    code, out, err = cones("store", "salvage")
    assert code == 0 and "Nothing is damaged" in out, out + err
    assert not list(path.parent.glob("store.damaged-*"))
    code, out, err = cones("store", "salvage", "--force")
    assert code == 0 and f"Copied {len(records)} concepts and 1 jobs" in out and "old store" in out, out + err
    assert len(list(path.parent.glob("store.damaged-*"))) == 1


@pytest.mark.parametrize("garble,field", [("newest", "magic"), ("older", "magic"), ("newest", "version")])
def test_a_garbled_meta_page_is_read_around_by_salvage(home, monkeypatch, garble, field):
    """LMDB keeps two meta pages and refuses the whole file when either is garbled: salvage
    reads the store as the other one describes it (the commit before the newest, or the newest
    when the older page is the garbled one) instead of giving up on every concept."""
    import struct

    from cones_store.env import other_meta_page

    h, started = home
    cones = cli_in_process(h, monkeypatch)
    fp, records = tiny_records(2)
    path = write_store(h, records[:2], fp)
    with ConceptStore.open(path, fingerprint=fp) as store:   # the newest commit: one concept more
        store.put(records[2])
    # both pages whole: a store refused for another reason (a lock file it may not open, a page
    # error) is never rolled back a commit
    assert other_meta_page(path) is None and other_meta_page(h / "nowhere") is None
    data = (path / "data.mdb").read_bytes()
    psize = struct.unpack_from("<I", data, 16 + 24)[0]
    txnids = [struct.unpack_from("<Q", data, slot * psize + 16 + 128)[0] for slot in (0, 1)]
    slot = txnids.index(max(txnids) if garble == "newest" else min(txnids))
    # its magic number, or its data version (LMDB's "version mismatch", once read as a store
    # that could not be opened for want of permissions: no salvage)
    xor_bytes(path, slot * psize + 16 + (0 if field == "magic" else 4),
              b"\xff\xff\xff\xff" if field == "magic" else b"\x02")
    code, out, err = cones("store", "check")
    assert code == CORRUPT and "not a readable LMDB store" in out + err, out + err

    code, out, err = cones("store", "salvage")
    assert code == 0, out + err
    text = " ".join(out.split())
    newest = [r.meta.name for r in records[:3]]
    expected = newest if garble == "older" else newest[:2]
    assert f"Copied {len(expected)} concepts" in text, out
    assert "meta pages of the store's data file is damaged" in text and "damaged store is kept" in text, out
    with ConceptStore.open(path, readonly=True) as store:
        assert sorted(store.names()) == sorted(expected)
    assert not list(path.parent.glob("*other-meta-page*"))   # its working copy is gone
    assert len(list(path.parent.glob("store.damaged-*"))) == 1


def test_a_relearn_command_says_which_captions_the_archive_no_longer_holds(tmp_path):
    """The archive keeps one caption per photo: the same photo learned later for another concept
    with another caption replaced it, and salvage's relearn command (`cones add` reads the caption
    beside each photo) would learn the lost concept with the other one."""
    from cones_cli.admin import _relearn_text
    from cns_daemon.archive import Archive, check_photo
    from cones_store.salvage import LostConcept

    archive = Archive(tmp_path / "archive")
    first, second = write_photos(tmp_path / "p", 2)
    digests = [archive.put(check_photo(first.name, first.read_bytes(), "a dog on the beach")),
               archive.put(check_photo(second.name, second.read_bytes(), "a dog in the snow"))]
    archive.put(check_photo(first.name, first.read_bytes(), "a mug on a table"))   # a later learn
    lost = LostConcept("dog", digests, "cns", photo_captions=["a dog on the beach", "a dog in the snow"])
    text = _relearn_text("rex", lost, archive.root)
    assert "cones add rex" in text
    (note,) = [line for line in text.splitlines() if "was learned with" in line]
    assert "'a dog on the beach'" in note and "'a mug on a table'" in note, text
    assert _relearn_text("rex", LostConcept("dog", digests, "cns"), archive.root).count("\n") == 1   # none known


@pytest.mark.parametrize("db", ["embeddings", "concepts"])
def test_a_page_whose_header_is_garbage_leaves_the_other_databases_readable(home, db):
    """A page of one database with a garbled header: LMDB answers MDB_BAD_TXN, and `store
    check` and `store salvage` both gave up on the whole store (exit 7, nothing listed, no
    relearn command), though every other database read whole. (`concepts` too: the walk for
    misfiled concepts stops there as the others do.)"""
    from cones_store.salvage import check, salvage

    h, _ = home
    fp, records = tiny_records(4)
    path = write_store(h, records, fp, jobs=3)
    root, psize = db_root(path, db)
    with open(path / "data.mdb", "r+b") as f:
        f.seek(root * psize + 8)
        f.write(b"\xff" * 8)
    report = check(path)
    assert not report.open_error and db in report.databases, report
    assert report.jobs == 3 and set(report.damaged) <= {r.name for r in records}
    done = salvage(path)
    assert done.jobs_copied == 3
    with ConceptStore.open(path, readonly=True) as store:
        assert len(store.jobs()) == 3


@pytest.mark.parametrize("record", ["fingerprint", "schema", "lost", "base_model"])
def test_a_damaged_record_of_the_store_itself_is_checked_and_salvaged(home, record):
    """A review's find: one damaged byte in one of the store's own small records (its base
    model's fingerprint, its schema, the concepts a salvage lost) refused every concept, while
    `store check` said all was well and salvage refused or did nothing. Now check names it and
    salvage keeps every concept, the fingerprint made anew from the concepts' own."""
    from cones_store.salvage import check, salvage

    h, _ = home
    fp, records = tiny_records(2)
    path = write_store(h, records, fp)
    with ConceptStore.open(path, fingerprint=fp) as store:
        store.set_lost({"gone": ["ab" * 32]})
        store.bind(fp, {"model": "toy", "dtype": "float32"})
    damage_value(path, "meta", record.encode())
    report = check(path)
    assert not report.open_error and not report.ok and list(report.damaged_records) == [record], report
    with pytest.raises(Exception) as err:   # what the service meets: the salvage hint
        with ConceptStore.open(path, fingerprint=fp) as store:
            store.lost() if record == "lost" else store.names() if record != "base_model" else \
                store._meta_value(b"base_model")
    assert "cones store salvage" in getattr(err.value, "hint", ""), err.value
    done = salvage(path)
    assert sorted(done.copied) == sorted(r.name for r in records)
    with ConceptStore.open(path, fingerprint=fp) as store:   # the model's store again
        assert store.fingerprint == fp and sorted(store.names()) == sorted(r.name for r in records)
    assert check(path).ok
