"""The concept store's API: round-trips, names, base-model binding, overlap bookkeeping, jobs."""
from __future__ import annotations

import numpy as np
import pytest

from cns_daemon.api.errors import BadInput, Conflict, Internal, ModelMismatch, NotFound
from cones_store import ConceptMeta, ConceptRecord, ConceptStore, JobRecord
from cones_store.fixtures.samples import assert_same_record, sample_record


@pytest.fixture
def store(tmp_path):
    s = ConceptStore.open(tmp_path / "store", fingerprint="base-A")
    yield s
    s.close()


@pytest.mark.parametrize("method", ["cns", "cones", "cones2"])
def test_each_method_roundtrips_exactly(store, method):
    record = sample_record("rex", method, seed=7)
    record.meta.metrics = {"fidelity": np.float32(0.5), "n": np.int64(3)}  # numpy scalars
    record.meta.photo_digests = ["0" * 64]
    store.put(record)
    got = store.get("rex")
    record.meta.metrics = {"fidelity": 0.5, "n": 3}
    assert_same_record(got, record)
    assert store.names() == ["rex"] and "rex" in store and "mug" not in store
    assert [m.name for m in store.list()] == ["rex"]
    assert store.size_of("rex") > 0


def test_a_concepts_size_is_measured_without_copying_its_values(store):
    """From a scale review: `cones list` measured each concept by copying every value out of
    the store (at SD size about 12 MB a concept, each listing). Views of the map are measured
    now: the size is the bytes stored, and Python allocates almost nothing to find it."""
    import tracemalloc

    big = sample_record("rex", "cns", seed=3, density=0.5, shapes={"big.to_k": (2048, 2048)})
    store.put(big)
    values = sum(d.values.nbytes for d in big.deltas.values())   # 4 MB (positions are packed)
    tracemalloc.start()
    try:
        size = store.size_of("rex")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert values < size < 2 * values
    assert peak < 1_000_000, f"{peak:,} bytes allocated to measure {size:,}"


def test_put_conflict_replace_and_delete(store):
    store.put(sample_record("rex", "cones", seed=1))
    with pytest.raises(Conflict, match="rex"):
        store.put(sample_record("rex", "cns", seed=2))
    assert store.get("rex").meta.method == "cones"  # the refused put changed nothing

    small = sample_record("rex", "cns", seed=2, shapes={"only.to_k": (8, 64)})
    store.put(small, replace=True)
    got = store.get("rex")
    assert_same_record(got, small)  # no masks or tensors left over from the old version
    assert store.size_of("rex") < 4000

    store.delete("rex")
    assert store.names() == []
    for call in (lambda: store.get("rex"), lambda: store.delete("rex"),
                 lambda: store.size_of("rex"), lambda: store.update_metrics("rex", {})):
        with pytest.raises(NotFound, match="rex"):
            call()


def test_parts_left_without_their_concept_key_are_not_read_back_as_a_new_concept(store):
    """A concept key damaged (then removed as another name) leaves the concept's parts under its
    old name: a new concept of that name must not read them as its own."""
    store.put(sample_record("rex", "cns", seed=1))
    store._env.write(lambda txn: txn.delete(b"rex", db=store._db["concepts"]))
    assert store.names() == []
    small = sample_record("rex", "cns", seed=2, shapes={"only.to_k": (8, 64)})
    store.put(small)
    assert_same_record(store.get("rex"), small)
    assert store.size_of("rex") < 4000


def test_a_key_whose_bytes_are_no_name_is_counted_apart(store):
    """A flipped byte in a concepts key: `names` (which everything addresses concepts by) leaves
    it out and `unnamed` shows it, so the service starts and lists the rest."""
    store.put(sample_record("mug", "cns", seed=1))
    raw = store._env.read(lambda txn: bytes(txn.get(b"mug", db=store._db["concepts"])))
    for key in (b"r\xe5x", b"r x"):
        store._env.write(lambda txn: txn.put(key, raw, db=store._db["concepts"]))
    assert store.names() == ["mug"] and sorted(store.unnamed()) == ["r x", "r\\xe5x"]
    assert [m.name for m in store.list()] == ["mug"]


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/name", "dot.name", "ü",
                                  "nul\x00", "<rex>", "semi;colon"])
def test_invalid_names_are_clear_errors_everywhere(store, name):
    with pytest.raises(BadInput, match="name"):
        ConceptMeta(name=name, method="cns", class_word="dog", token="t")
    for call in (store.get, store.delete, store.size_of, lambda n: n in store,
                 lambda n: store.update_metrics(n, {})):
        with pytest.raises(BadInput) as err:
            call(name)
        assert "letters (a-z, A-Z), digits" in err.value.hint


@pytest.mark.parametrize("name", ["a", "A" * 64, "my_mug", "red-star", "0-9_x"])
def test_valid_names_are_accepted(store, name):
    store.put(sample_record(name, "cones2"))
    assert store.get(name).name == name


def test_fingerprint_binding_refuses_another_base_model(tmp_path):
    path = tmp_path / "store"
    with ConceptStore.open(path) as s:  # unbound: the first bind records the model
        assert s.fingerprint is None
        s.bind("base-A")
        s.put(sample_record("rex", "cns"))
        assert s.get("rex").meta.fingerprint == "base-A"
    with pytest.raises(ModelMismatch) as err:
        ConceptStore.open(path, fingerprint="base-B")
    assert "base-A" in err.value.message and "base-B" in err.value.message
    with ConceptStore.open(path) as s:
        assert s.fingerprint == "base-A"
        with pytest.raises(ModelMismatch, match="base-A.*base-B"):
            s.bind("base-B")
    with ConceptStore.open(path, fingerprint="base-A") as s:
        assert s.get("rex").meta.fingerprint == "base-A"
        foreign = sample_record("mug", "cones")
        foreign.meta.fingerprint = "base-C"  # a record learned on another model
        with pytest.raises(ModelMismatch, match="base-C.*base-A"):
            s.put(foreign)
        assert s.names() == ["rex"]


def test_a_refused_model_is_named_and_another_dtype_is_told(tmp_path):
    path = tmp_path / "store"
    with ConceptStore.open(path) as s:
        s.bind("base-A", {"model": "/models/sd15.safetensors", "dtype": "float32"})
    with ConceptStore.open(path) as s:
        with pytest.raises(ModelMismatch) as err:
            s.bind("base-B", {"model": "/models/other", "dtype": "float32"})
        assert "base-A (/models/sd15.safetensors, float32)" in err.value.message
        assert "base-B (/models/other, float32)" in err.value.message
        with pytest.raises(ModelMismatch) as err:   # the same file, loaded in bfloat16
            s.bind("base-C", {"model": "/models/sd15.safetensors", "dtype": "bfloat16"})
        assert "once with dtype = float32" in err.value.hint   # float32 <-> bfloat16: carried over then
    old = tmp_path / "old"   # a store from before models were named: named at its next binding
    with ConceptStore.open(old) as s:
        s.bind("base-A")
    with ConceptStore.open(old) as s:
        s.bind("base-A", {"model": "/models/sd15.safetensors", "dtype": "float32"})
        with pytest.raises(ModelMismatch, match=r"base-A \(/models/sd15.safetensors"):
            s.bind("base-B", {"model": "/models/x", "dtype": "float32"})


def test_a_store_bound_to_an_older_digest_of_the_model_moves_to_the_new_one(tmp_path):
    """A store (and its records, and exports) made when the digest read fp32 bytes: the engine
    binds the new digest with the old one as an alias; the store moves over, keeps the alias,
    and every record made before reads as the current model's. Another model is still refused."""
    from cones_store.salvage import salvage

    path = tmp_path / "store"
    with ConceptStore.open(path) as s:
        s.bind("old-A")
        s.put(sample_record("rex", "cns"))
    with ConceptStore.open(path) as s:
        with pytest.raises(ModelMismatch, match="old-A"):
            s.bind("new-A")                       # without the alias: another model
        s.bind("new-A", aliases=["old-A"])
        assert s.fingerprint == "new-A" and s.aliases == ["old-A"]
        assert s.get("rex").meta.fingerprint == "new-A" and s.meta("rex").fingerprint == "new-A"
        assert [m.fingerprint for m in s.list()] == ["new-A"]
        exported = sample_record("mug", "cones")
        exported.meta.fingerprint = "old-A"       # a file exported before
        s.put(exported)
        assert s.get("mug").meta.fingerprint == "new-A"
        foreign = sample_record("cup", "cones")
        foreign.meta.fingerprint = "old-B"
        with pytest.raises(ModelMismatch, match="old-B"):
            s.put(foreign)
    with ConceptStore.open(path) as s:            # the next start binds the new digest alone
        s.bind("new-A", {"model": "/models/a", "dtype": "float32"}, aliases=["old-A-in-bf16"])
        assert s.aliases == ["old-A", "old-A-in-bf16"] and s.get("rex").meta.fingerprint == "new-A"
        with pytest.raises(ModelMismatch, match="new-A.*new-B"):
            s.bind("new-B", aliases=["old-B"])
    salvage(path)                                 # a salvaged copy keeps the aliases and the model's name
    with ConceptStore.open(path, fingerprint="new-A") as s:
        assert s.aliases == ["old-A", "old-A-in-bf16"] and s.get("rex").meta.fingerprint == "new-A"
        with pytest.raises(ModelMismatch, match=r"new-A \(/models/a, float32\)"):
            s.bind("new-B")


def test_unbound_store_takes_fingerprint_from_first_record(tmp_path):
    with ConceptStore.open(tmp_path / "s") as s:
        first = sample_record("rex", "cns")
        first.meta.fingerprint = "base-A"
        s.put(first)
        assert s.fingerprint == "base-A"
        other = sample_record("mug", "cns")
        other.meta.fingerprint = "base-B"
        with pytest.raises(ModelMismatch, match="base-A"):
            s.put(other)


def _expected_shared(a: ConceptRecord, b: ConceptRecord) -> int:
    from cones_store.store import record_indices

    ia, ib = record_indices(a), record_indices(b)
    return sum(len(set(ia[t].tolist()) & set(ib[t].tolist())) for t in ia.keys() & ib.keys())


def test_overlap_bookkeeping_and_union(store):
    rex = sample_record("rex", "cns", seed=1, density=0.3)
    mug = sample_record("mug", "cones", seed=2, density=0.2)
    dot = sample_record("dot", "cones", seed=3, density=0.2, shapes={"elsewhere.to_v": (16, 64)})
    assert store.put(rex).shared_with == {}
    ov = store.put(mug)
    assert ov.shared_with == {"rex": _expected_shared(mug, rex)} and ov.shared_with["rex"] > 0
    assert ov.total == sum(v.size for v in mug.masks.values())
    assert store.put(dot).shared_with == {}  # no shared tensors: left out
    assert store.overlap("mug") == ov

    probe = {t: np.arange(0, 4096, 2) for t in rex.deltas}
    counts = store.intersect(probe)
    assert counts["rex"] == sum(np.count_nonzero(d.indices % 2 == 0) for d in rex.deltas.values())
    assert counts["mug"] == sum(np.count_nonzero(mug.masks[t] % 2 == 0) for t in probe)
    assert "rex" not in store.intersect(probe, exclude="rex")

    union = store.tuned_union()
    for t in rex.deltas:
        want = set(rex.deltas[t].indices.tolist()) | set(mug.masks[t].tolist())
        assert union[t].tolist() == sorted(want)
    assert union["elsewhere.to_v"].tolist() == dot.masks["elsewhere.to_v"].tolist()
    cns_only = store.tuned_union("cns")
    assert cns_only.keys() == rex.deltas.keys()
    assert all(cns_only[t].tolist() == rex.deltas[t].indices.tolist() for t in rex.deltas)

    # replacing rex updates the pairwise count recorded by mug; deleting it removes the entry
    rex2 = sample_record("rex", "cns", seed=9, density=0.05)
    store.put(rex2, replace=True)
    assert store.overlap("mug").shared_with == {"rex": _expected_shared(mug, rex2)}
    assert store.overlap("rex").shared_with == {"mug": _expected_shared(mug, rex2)}
    store.delete("rex")
    assert store.overlap("mug").shared_with == {}


def test_update_metrics_merges_and_persists(tmp_path):
    path = tmp_path / "s"
    with ConceptStore.open(path) as s:
        s.put(sample_record("rex", "cones"))
        s.update_metrics("rex", {"fidelity": 0.8})
        meta = s.update_metrics("rex", {"forgetting": np.float64(0.1)})
        assert meta.metrics == {"fidelity": 0.8, "forgetting": 0.1}
    with ConceptStore.open(path) as s:
        assert s.get("rex").meta.metrics == {"fidelity": 0.8, "forgetting": 0.1}
        assert s.get("rex").masks  # the rest of the concept is untouched
        # None drops a key (a later solo eval drops the joint one's "eval_with"), absent or not
        assert s.update_metrics("rex", {"fidelity": None, "absent": None}).metrics == {"forgetting": 0.1}


def test_jobs_queue(tmp_path):
    path = tmp_path / "s"
    with ConceptStore.open(path) as s:
        s.put_job(JobRecord(id="a", kind="learn", request={"name": "rex"}, created=1.0))
        s.put_job(JobRecord(id="b", kind="generate", request={"prompt": "p"}, created=2.0,
                            priority=10))
        s.put_job(JobRecord(id="c", kind="learn", request={}, created=0.5))
        assert [j.id for j in s.jobs()] == ["b", "c", "a"]  # priority, then oldest
        job = s.update_job("b", expect_state="queued", state="running", started=3.0, attempts=1)
        assert (job.state, job.started, job.attempts) == ("running", 3.0, 1)
        with pytest.raises(Conflict, match="running"):
            s.update_job("b", expect_state="queued", state="running")  # already claimed
        with pytest.raises(Internal, match="bogus"):
            s.update_job("a", bogus=1)
        with pytest.raises(NotFound):
            s.update_job("zzz", state="done")
        with pytest.raises(BadInput):
            s.get_job("")
    with ConceptStore.open(path) as s:  # survives a restart
        assert s.get_job("b").request == {"prompt": "p"}
        assert [j.id for j in s.jobs(states={"queued"})] == ["c", "a"]
        s.delete_job("c")
        with pytest.raises(NotFound):
            s.get_job("c")
        with pytest.raises(NotFound):
            s.delete_job("c")
        assert [j.id for j in s.jobs()] == ["b", "a"]


def test_a_store_carried_over_says_so_and_a_newer_ones_store_is_named(tmp_path):
    """bind() moved a store to a new digest without a word (earlier versions then refused it),
    and a version that met a store carried over by a newer one blamed another base model."""
    path = tmp_path / "store"
    made = {"model": "toy", "dtype": "float32"}
    with ConceptStore.open(path) as s:
        assert s.bind("old-digest", made) is None            # first binding: nothing moved
    with ConceptStore.open(path) as s:
        assert s.bind("new-digest", made, aliases=["old-digest"]) == "old-digest"
        assert s.bind("new-digest", made, aliases=["old-digest"]) is None
    with ConceptStore.open(path) as s, pytest.raises(ModelMismatch) as err:
        s.bind("old-digest", made)                           # the earlier version's view
    assert "newer version of cones" in err.value.hint
