"""The engine after crashes and with damaged or misfit concepts, on the tiny pipeline: the weights
rebuilt at start-up are the weights it had, a damaged concept does not block learns, a learn or
import whose first run stored the concept before a crash is done when run again, and an import
that does not fit the model is not kept."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cns_daemon.api.errors import ConesError
from cns_daemon.api.protocol import LearnJob
from cns_daemon.api.settings import Settings
from cns_daemon.archive import Archive
from cns_daemon.engine import SAVED_BEFORE_STOP, Engine
from cns_daemon.importing import IMPORTED
from cns_daemon.methods.cns.layers import kv_weights
from cns_daemon.model import build_tiny_pipeline
from cones_store import ConceptMeta, ConceptRecord, ConceptStore, SparseDelta


@pytest.fixture
def engine(tmp_path):
    store = ConceptStore.open(tmp_path / "store")
    eng = Engine(Settings(model="tiny", home=str(tmp_path)), store, Archive(tmp_path / "archive"))
    eng.attach(build_tiny_pipeline(seed=0))
    yield eng
    store.close()


def restarted(eng: Engine) -> Engine:
    again = Engine(eng.settings, eng.store, eng.archive)
    again.attach(build_tiny_pipeline(seed=0))
    return again


def cns_record(eng: Engine, name: str, token: str, value: float, created: float, **meta) -> ConceptRecord:
    """A CNS concept written into the weights (scope all) at the first 40 positions of one K/V."""
    tensor, weight = next(iter(kv_weights(eng.pipe.unet).items()))
    idx = np.arange(40, dtype=np.int64)
    return ConceptRecord(
        meta=ConceptMeta(name=name, method="cns", class_word="dog", token=token, created=created,
                         hparams={"scope": "all"}, fingerprint=eng.info.fingerprint, **meta),
        deltas={tensor: SparseDelta(idx, np.full(40, value, np.float32), tuple(weight.shape))})


def first_values(eng: Engine) -> torch.Tensor:
    return next(iter(kv_weights(eng.pipe.unet).values())).detach().reshape(-1)[:40].clone()


def test_start_up_rebuilds_the_weights_in_the_order_concepts_came_into_the_store(engine):
    """A concept learned yesterday elsewhere and imported now lies on top of the ones here;
    rebuilt by learning time, the local one won the shared positions after a restart."""
    local = cns_record(engine, "local", "sks", 1.0, time.time())
    engine.store.put(local)
    engine._apply_resident(local)
    from cns_daemon.methods.common.tokens import rare_tokens

    rare = rare_tokens(engine.pipe.tokenizer)[5]   # a word cones would pick: imported as it is
    engine.import_record(cns_record(engine, "imported", rare, 2.0, time.time() - 86400))
    live = first_values(engine)
    assert torch.all(live == 2.0)
    again = restarted(engine)
    assert torch.equal(first_values(again), live)
    # `cones list` lists it where its overlap says it came: after the local one
    assert [c.name for c in again.concepts()] == ["local", "imported"]
    assert again.store.meta("imported").hparams[IMPORTED] > again.store.meta("local").created


def test_an_import_that_does_not_fit_the_model_is_not_kept(engine):
    alien = ConceptRecord(meta=ConceptMeta(name="alien", method="cns", class_word="dog", token="sks"),
                          deltas={"up_blocks.9.attn2.to_k.weight": SparseDelta(
                              np.arange(3), np.ones(3, np.float32), (8, 8))})
    with pytest.raises(ConesError):
        engine.import_record(alien)
    assert "alien" not in engine.store and "alien" not in engine._live()


def test_a_damaged_concept_does_not_block_learning_others(engine, tmp_path, monkeypatch):
    """Its token stays taken (metadata alone); its neurons cannot be read, so they are not."""
    from cns_daemon.methods import CancelToken
    from test_store_recovery import damage_value

    engine.store.put(cns_record(engine, "old", "sks", 1.0, time.time()))
    engine.store.close()
    damage_value(tmp_path / "store", "deltas", b"old\0" + next(iter(kv_weights(engine.pipe.unet))).encode())
    engine.store = ConceptStore.open(tmp_path / "store")
    again = restarted(engine)
    assert again.problems["old"].code.value == "corrupt"
    seen = {}

    class Capture:
        from cns_daemon.methods.cns import CNSParams as Params

        def learn(self, pipe, photos, spec, progress, cancel, previous=None):
            seen["previous"] = previous
            raise RuntimeError("seen")

    monkeypatch.setattr("cns_daemon.methods.get_method", lambda name: Capture())
    job = LearnJob(name="new", class_word="dog", method="cns", photo_digests=["0" * 64])
    monkeypatch.setattr(again.archive, "path", lambda digest: tmp_path / "p.png")
    for problems in (again.problems, {}):   # known at start-up, or found by the learn itself
        again.problems = dict(problems)
        with pytest.raises(RuntimeError, match="seen"):
            again.learn(job, None, CancelToken())
        (old,) = seen["previous"]
        assert old.meta.token == "sks" and not old.deltas
        assert "old" in again.problems


def test_a_learn_or_import_whose_first_run_stored_it_is_done_when_run_again(engine):
    record = cns_record(engine, "rex", "sks", 1.0, 1_700_000_000.0, photo_digests=["a" * 64, "b" * 64])
    engine.store.put(record)
    job = LearnJob(name="rex", class_word="dog", method="cns", photo_digests=["a" * 64, "b" * 64], seed=3)
    result = engine.saved_by_first_run(job)
    assert result.concept == "rex" and result.seed == 3 and result.metrics["note"] == SAVED_BEFORE_STOP
    assert result.metrics["neurons"] == 40 and result.metrics["method"] == "cns"
    other = job.model_copy(update={"photo_digests": ["c" * 64, "b" * 64]})
    assert engine.saved_by_first_run(other) is None   # another concept of that name
    assert engine.saved_by_first_run(job.model_copy(update={"name": "nobody"})) is None
    assert engine.saved_by_first_run(record.meta).metrics["note"] == SAVED_BEFORE_STOP
    import dataclasses

    assert engine.saved_by_first_run(dataclasses.replace(record.meta, created=1.0)) is None


def test_start_up_settles_a_learn_stopped_for_good_after_it_stored_its_concept_as_done(engine):
    """A review's find: the service killed on a learn's last attempt after the concept was
    stored (or a cancel that came after it was) left the job "failed" (or "cancelled") beside the
    stored concept; an inbox folder then got a note saying it failed. Start-up now looks."""
    import types

    from cns_daemon.jobkinds import saved_before_stop
    from cns_daemon.worker import MAX_ATTEMPTS, Worker
    from cones_store.records import JobRecord

    engine.store.put(cns_record(engine, "rex", "sks", 1.0, 1_700_000_000.0, photo_digests=["a" * 64]))
    learn = LearnJob(name="rex", class_word="dog", method="cns", photo_digests=["a" * 64]).model_dump(mode="json")
    other = {**learn, "name": "pot"}   # stopped for good, nothing stored: failed as before
    jobs = {"crashed": JobRecord(id="a" * 12, kind="learn", request=learn, state="running", attempts=MAX_ATTEMPTS),
            "cancelled": JobRecord(id="b" * 12, kind="learn", request=learn, state="running", attempts=1,
                                   cancel_requested=True),
            "again": JobRecord(id="c" * 12, kind="learn", request=learn, state="running", attempts=1),
            "lost": JobRecord(id="d" * 12, kind="learn", request=other, state="running", attempts=MAX_ATTEMPTS)}
    for job in jobs.values():
        engine.store.put_job(job)
    service = types.SimpleNamespace(engine=engine, store=engine.store)
    Worker(engine.store, lambda *a: None).recover(lambda job: saved_before_stop(service, job))
    got = {k: engine.store.get_job(j.id) for k, j in jobs.items()}
    assert got["crashed"].state == got["cancelled"].state == "done"
    assert got["crashed"].result["metrics"]["note"] == SAVED_BEFORE_STOP and got["crashed"].error is None
    assert got["again"].state == "queued"   # a retry still to come finds it itself (jobkinds._learn)
    assert got["lost"].state == "failed"


@pytest.mark.parametrize("scope", ["all", "concept"])
def test_a_cns_record_refused_half_way_leaves_the_model_as_it_was(fresh_tiny_pipe, scope):
    """Its embedding row has the wrong width: found before any value is written (values stayed
    written and a scope entry stayed with no layer to remove it)."""
    from cns_daemon.methods.cns.layers import stack_for
    from cns_daemon.methods.common.scope import token_scope

    pipe = fresh_tiny_pipe
    kv = kv_weights(pipe.unet)
    before = {n: p.detach().clone() for n, p in kv.items()}
    name, w = next(iter(kv.items()))
    rec = ConceptRecord(ConceptMeta("rex", "cns", "dog", "sks", hparams={"scope": scope}),
                        deltas={name: SparseDelta(np.array([0, 1, 2]), np.full(3, 5.0, np.float16),
                                                  tuple(w.shape))},
                        embeddings={"sks": np.zeros(7, np.float32)})
    with pytest.raises(ConesError):
        stack_for(pipe).push(rec)
    assert all(torch.equal(p, before[n]) for n, p in kv.items())
    assert stack_for(pipe).names() == [] and "rex" not in token_scope(pipe.unet).names()


def test_a_cones_mask_past_its_tensor_shuts_nothing(fresh_tiny_pipe):
    """A mask carries no shape the store could check: a position past its tensor was found
    after the masks before it were written, and those neurons stayed shut until a restart."""
    from cns_daemon.generate import generate
    from cns_daemon.methods.common.tokens import rare_tokens

    pipe = fresh_tiny_pipe
    kv = kv_weights(pipe.unet)
    before = {n: p.detach().clone() for n, p in kv.items()}
    names = list(kv)
    masks = {n: np.arange(0, 40, dtype=np.int64) for n in names}
    masks[names[-1]] = np.array([0, 10 ** 9], np.int64)
    mug = ConceptRecord(ConceptMeta("mug", "cones", "mug", rare_tokens(pipe.tokenizer)[1]), masks=masks)
    with pytest.raises(ConesError, match="out of range"):
        generate(pipe, "a photo of <mug>", {"mug": mug}, n=1, steps=2, output_type="np")
    assert all(torch.equal(p, before[n]) for n, p in kv.items())


def test_cns_records_applied_together_are_all_taken_off_when_one_is_refused(fresh_tiny_pipe):
    from cns_daemon.methods import get_method
    from cns_daemon.methods.cns.layers import stack_for

    pipe = fresh_tiny_pipe
    kv = kv_weights(pipe.unet)
    before = {n: p.detach().clone() for n, p in kv.items()}
    name, w = next(iter(kv.items()))

    def record(n, token, width):
        return ConceptRecord(ConceptMeta(n, "cns", "dog", token, hparams={"scope": "all"}),
                             deltas={name: SparseDelta(np.array([0, 1]), np.full(2, 5.0, np.float32), tuple(w.shape))},
                             embeddings={token: np.zeros(width, np.float32)})

    good = record("good", "sks", pipe.text_encoder.get_input_embeddings().weight.shape[1])
    with pytest.raises(ConesError):
        get_method("cns").apply(pipe, [good, record("bad", "xqz", 7)])
    assert stack_for(pipe).names() == []
    assert all(torch.equal(p, before[n]) for n, p in kv.items())


def test_a_concept_file_that_is_not_what_cones_writes_is_refused_or_mended_at_import(engine):
    """One changed byte made a value NaN (every image black) or a mask unsorted (reported as a
    bug in cones, exit 70): refused as not a usable file. A token that is an everyday word
    ("grass") would change every prompt that says it: the concept moves to a rare word."""
    from cns_daemon.api.errors import BadInput
    from cns_daemon.methods.common.tokens import rare_tokens
    from cns_daemon.transfer import decode, encode

    good = cns_record(engine, "nan", rare_tokens(engine.pipe.tokenizer)[3], 1.0, time.time())
    bad = dataclasses_replace_delta(good, np.float32("nan"))
    with pytest.raises(BadInput, match="not finite"):
        decode(encode(bad))
    tensor, weight = next(iter(kv_weights(engine.pipe.unet).items()))
    mug = ConceptRecord(ConceptMeta("mug", "cones", "mug", "qqq"),
                        masks={tensor: np.array([5, 3], np.int64)}, embeddings={"qqq": np.zeros(4, np.float32)})
    with pytest.raises(BadInput, match="not a cones concept file"):
        decode(encode(mug))
    walker = dataclasses.replace(good, meta=dataclasses.replace(good.meta, photo_digests=["../../../etc/passwd"]))
    with pytest.raises(BadInput, match="photos are not named by their SHA-256"):   # rm --photos failed on it
        decode(encode(walker))

    width = engine.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    grass = cns_record(engine, "gtok", "grass", 1.0, time.time())
    grass.embeddings["grass"] = np.ones(width, np.float32)
    result = engine.import_record(decode(encode(grass)))
    token = engine.store.meta("gtok").token
    assert token != "grass" and token in rare_tokens(engine.pipe.tokenizer)
    assert "everyday word ('grass')" in result.metrics["note"]
    # the same word in capitals is the same token, and a special token acts on every prompt
    for name, clashing, said in (("gtok2", token.upper(), "is used by <gtok>"),
                                 ("gtok3", "<|endoftext|>", "everyday word")):
        other = cns_record(engine, name, clashing, 1.0, time.time())
        other.embeddings[clashing] = np.ones(width, np.float32)
        result = engine.import_record(decode(encode(other)))
        assert engine.store.meta(name).token not in (token, clashing) and said in result.metrics["note"]
    # a word a learn under way holds (pinned, or picked by the running one) is taken too
    held = rare_tokens(engine.pipe.tokenizer)[40]
    result = engine.import_record(decode(encode(cns_record(engine, "gtok4", held, 1.0, time.time()))),
                                  reserved=[held])
    assert engine.store.meta("gtok4").token != held and "is used by a learn under way" in result.metrics["note"]


def dataclasses_replace_delta(record: ConceptRecord, value) -> ConceptRecord:
    """The record with its first delta value set to `value` (a byte changed in the file)."""
    import dataclasses

    (name, delta), = record.deltas.items()
    values = delta.values.copy()
    values[0] = value
    return dataclasses.replace(record, deltas={name: SparseDelta(delta.indices, values, delta.shape)})


def test_request_checks_never_use_the_tokenizer_a_learn_is_using(engine):
    """The tokenizer keeps its padding and truncation settings in itself: a request thread's check
    set them while the worker tokenized for a learn, and the learn failed as a bug in cones
    ("Unable to create tensor"). Checks use a copy of their own thread's."""
    import copy
    import threading

    from cns_daemon.api.protocol import GenerateRequest

    real = engine.pipe.tokenizer

    class Tripwire:   # the worker's tokenizer: request threads must not call it
        def __call__(self, *a, **k):
            raise AssertionError("a request thread used the worker's tokenizer")

        def __deepcopy__(self, memo):
            return copy.deepcopy(real, memo)

        def __getattr__(self, name):
            return getattr(real, name)

    engine.pipe.tokenizer = Tripwire()
    seen, errors = [], []

    def request():
        try:
            engine.check_generate(GenerateRequest(prompt="a photo of a dog on the grass", negative_prompt="blur"))
            engine.check_learn("cns", None, {}, "dog", [("a.png", "a dog on the grass")])
            seen.append(engine.tokenizer_here())
            assert engine.tokenizer_here() is seen[-1]   # one copy a thread, kept
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    engine.pipe.tokenizer = real
    assert errors == [] and len({id(t) for t in seen}) == 2
    # the copies decode as the tokenizer does (a refusal quoted 'red</w>red</w>' from a copy)
    ids = real("a photo of a red star red red").input_ids
    assert real.decode(ids[1:-1]) == "a photo of a red star red red"
    assert [t.decode(ids[1:-1]) for t in seen] == [real.decode(ids[1:-1])] * 2


@pytest.mark.parametrize("method,options", [("cones2", {"lr": 1e9}),
                                            ("cns", {"lr": 1e9, "prior_images": 0, "variants": 1})])
def test_a_learn_whose_training_diverged_stores_nothing(engine, tmp_path, method, options):
    """At a learning rate of 1e9 the values became NaN or infinity: the concept was stored as
    learned, and every image of it came out black."""
    from cns_daemon.api.errors import BadInput
    from cns_daemon.archive import check_photo
    from cns_daemon.methods.base import CancelToken
    from helpers.service import write_photos

    digests = [engine.archive.put(check_photo(p.name, p.read_bytes())) for p in write_photos(tmp_path / "p", 2)]
    job = LearnJob(name="wild", class_word="dog", method=method, steps=3, options=options,
                   photo_digests=digests)
    before = {n: w.detach().clone() for n, w in kv_weights(engine.pipe.unet).items()}
    with pytest.raises(BadInput, match="diverged"):
        engine.learn(job, None, CancelToken())
    assert "wild" not in engine.store
    assert all(torch.equal(w, before[n]) for n, w in kv_weights(engine.pipe.unet).items())


def test_a_learn_picks_its_token_past_those_held_and_says_it_while_it_runs(engine, tmp_path):
    """A review's find: a learn picking its token took the word a queued learn had pinned, and
    while it ran its own picked word could be pinned by another learn: each then failed
    minutes later as "already used". The engine picks it, skipping `reserved`, and holds it in
    `learning_token` while it runs (the service's `pinned_tokens` reads it)."""
    from cns_daemon.archive import check_photo
    from cns_daemon.methods.base import CancelToken
    from cns_daemon.methods.common.tokens import rare_tokens
    from helpers.service import write_photos

    rare = rare_tokens(engine.pipe.tokenizer)
    digests = [engine.archive.put(check_photo(p.name, p.read_bytes())) for p in write_photos(tmp_path / "p", 2)]
    seen = []
    job = LearnJob(name="picked", class_word="dog", method="cns", steps=2, photo_digests=digests,
                   options={"variants": 1})
    engine.learn(job, lambda ev: seen.append(engine.learning_token), CancelToken(), reserved=[rare[0]])
    assert engine.store.meta("picked").token == rare[1] and set(seen) == {rare[1]}
    assert engine.learning_token is None
    assert engine.store.meta("picked").hparams["options_given"] == {"variants": 1}   # as asked


def test_a_learned_concept_keeps_its_photos_captions(engine, tmp_path):
    """The archive's caption beside a photo is the latest learn's: the concept keeps its own, for
    salvage to say which it had."""
    from cns_daemon.archive import check_photo
    from cns_daemon.methods.base import CancelToken
    from helpers.service import write_photos

    photos = write_photos(tmp_path / "p", 2)
    digests = [engine.archive.put(check_photo(p.name, p.read_bytes())) for p in photos]
    job = LearnJob(name="capt", class_word="dog", method="cones2", steps=2, photo_digests=digests,
                   photo_captions=["a dog on the beach", None])
    engine.learn(job, None, CancelToken())
    assert engine.store.meta("capt").photo_captions == ["a dog on the beach", None]


def test_a_hand_edited_concept_file_is_refused_at_import(engine):
    """From a walkthrough: "created": "yesterday" was imported and failed every `cones list`
    after (exit 70); hparams as a list and a class of 5 failed their import as bugs; a Cones 2
    residual of another width, a mask on a tensor no K/V weight, an empty class were stored as ok
    and failed every generate."""
    import dataclasses

    from cns_daemon.api.errors import BadInput
    from cns_daemon.methods.common.tokens import rare_tokens
    from cns_daemon.transfer import decode, encode

    good = cns_record(engine, "good", rare_tokens(engine.pipe.tokenizer)[5], 1.0, time.time())
    for edit in ({"created": "yesterday"}, {"hparams": [1, 2]}, {"class_word": 5}, {"class_word": ""},
                 {"photo_captions": [3]}):
        edited = dataclasses.replace(good, meta=dataclasses.replace(good.meta, **edit))
        with pytest.raises(BadInput, match="not a cones concept file"):
            decode(encode(edited))
    width = engine.pipe.text_encoder.config.hidden_size
    narrow = ConceptRecord(ConceptMeta("narrow", "cones2", "mug", ""), residual=np.zeros(width - 3, np.float32))
    name = next(iter(kv_weights(engine.pipe.unet)))
    q = ConceptRecord(ConceptMeta("onq", "cones", "mug", rare_tokens(engine.pipe.tokenizer)[6]),
                      masks={name.replace("to_k", "to_q"): np.array([1, 2], np.int64)})
    for record, said in ((narrow, f"residual of shape {width - 3}"), (q, "no K/V tensor")):
        record.meta.fingerprint = engine.info.fingerprint
        with pytest.raises(BadInput, match=said):
            engine.import_record(record)
        assert record.meta.name not in engine.store


def test_a_concept_file_cannot_reach_past_its_own_words(engine):
    """From a security review: a file with a token row for "red" as well as its own imported
    cleanly and turned every red thing of every prompt blue; options as a list, steps as a
    table, an empty token and 50 MB of metadata were taken too (and broke `cones list` after).
    A concept that acts on every prompt (scope all) is taken, and said so, at import and in
    `cones show`."""
    import dataclasses

    from cns_daemon.api.errors import BadInput
    from cns_daemon.methods.common.tokens import rare_tokens
    from cns_daemon.transfer import decode, encode

    token = rare_tokens(engine.pipe.tokenizer)[5]
    width = engine.pipe.text_encoder.config.hidden_size
    row = np.zeros(width, np.float32)
    good = dataclasses.replace(cns_record(engine, "good", token, 1.0, time.time()), embeddings={token: row})
    decode(encode(good))   # as cones writes it
    red = dataclasses.replace(good, embeddings={token: row, "red": row})
    with pytest.raises(BadInput, match="token rows for words its token does not name .'red'"):
        decode(encode(red))
    for edit, said in (({"token": ""}, "names no token"),
                       ({"hparams": {"options_given": [1]}}, "options are not names with values"),
                       ({"hparams": {"steps": {"a": 1}}}, "its steps is a dict"),
                       ({"hparams": {"scope": "sometimes"}}, "newer version of cones .its scope 'sometimes' is none this version knows"),
                       ({"photo_captions": ["x" * (1 << 20)]}, "over 1,048,576"),
                       # taken once, and stamped with the loaded model's, whichever it was learned on
                       ({"fingerprint": ""}, "names no base model")):
        edited = dataclasses.replace(good, meta=dataclasses.replace(good.meta, **edit))
        if edit.get("token") == "":
            edited = dataclasses.replace(edited, embeddings={})
        with pytest.raises(BadInput, match=said):
            decode(encode(edited))
    result = engine.import_record(decode(encode(good)))
    assert "acts on every prompt" in result.metrics["note"]
    assert engine.concept("good").learned_with["scope"] == "all"
    scoped = dataclasses.replace(good, meta=dataclasses.replace(good.meta, name="scoped", token=rare_tokens(
        engine.pipe.tokenizer)[6], hparams={"scope": "concept"}), embeddings={})
    assert engine.import_record(decode(encode(scoped))).metrics is None
    assert "scope" not in engine.concept("scoped").learned_with


def test_a_learn_reads_whole_only_the_concepts_whose_neurons_it_keeps(engine, monkeypatch):
    """From a scale review: every learn read every stored concept's tensors, though only CNS
    concepts that act on every prompt (scope all) matter to it beyond their tokens."""
    import dataclasses

    from cns_daemon.methods.common.tokens import rare_tokens

    rare = rare_tokens(engine.pipe.tokenizer)
    everywhere = cns_record(engine, "everywhere", rare[5], 1.0, time.time())
    scoped = cns_record(engine, "scoped", rare[6], 1.0, time.time() + 1)
    scoped = dataclasses.replace(scoped, meta=dataclasses.replace(scoped.meta, hparams={"scope": "concept"}))
    for record in (everywhere, scoped):
        engine.store.put(record)
    read = []
    get = engine.store.get
    monkeypatch.setattr(engine.store, "get", lambda name: read.append(name) or get(name))
    previous = {r.name: r for r in engine._previous()}
    assert read == ["everywhere"]
    assert previous["everywhere"].deltas and not previous["scoped"].deltas
    assert previous["scoped"].meta.token == rare[6]   # its token stays taken


def test_status_names_the_model_by_the_path_in_effect(tmp_path, monkeypatch):
    """`--model ../tw` showed as typed: from the CLI's folder that names another place."""
    from cns_daemon.api.settings import load_settings
    from cns_daemon.engine import Engine

    (tmp_path / "tw").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    engine = Engine(load_settings(home=str(tmp_path / "h"), model="../tw"), store=None, archive=None)
    assert Path(engine.info.model) == (tmp_path / "sub" / ".." / "tw").absolute()
    assert Path(engine.info.model).is_absolute() and Path(engine.info.model).resolve() == tmp_path / "tw"


def test_a_concept_file_of_a_newer_cones_is_said_to_be_one(engine):
    """A file from a later version (a field added since, or a higher format) was "not a cones
    concept file" with the hint to export it again, which cannot help."""
    import json

    from safetensors.numpy import load, save

    from cns_daemon.api.errors import BadInput
    from cns_daemon.methods.common.tokens import rare_tokens
    from cns_daemon.api.concept_file import metadata as _header_metadata
    from cns_daemon.transfer import decode, encode

    data = encode(cns_record(engine, "new", rare_tokens(engine.pipe.tokenizer)[3], 1.0, time.time()))
    tensors, metadata = load(data), _header_metadata(data)
    meta = json.loads(metadata["meta"])
    later = save(tensors, {**metadata, "meta": json.dumps({**meta, "lighting": "soft"})})
    with pytest.raises(BadInput, match="newer version of cones.*lighting") as err:
        decode(later)
    assert "Update cones" in err.value.hint
    with pytest.raises(BadInput, match="newer version of cones.*cones-concept/2"):
        decode(save(tensors, {**metadata, "format": "cones-concept/2"}))
    with pytest.raises(BadInput, match="not a cones concept file"):
        decode(save(tensors, {**metadata, "format": "someone-else/3"}))
    # A method, a scope, an overlap field or a kind of part added since, in a file of format 1
    # (a review's find: "not a cones concept file", and export it again)
    hp = meta["hparams"]
    for changed, needle in ((dict(meta, method="cones3"), "its method 'cones3'"),
                            (dict(meta, hparams={**hp, "scope": "nearby"}), "its scope 'nearby'")):
        with pytest.raises(BadInput, match=f"newer version of cones.*{needle}"):
            decode(save(tensors, {**metadata, "meta": json.dumps(changed)}))
    overlap = json.loads(metadata["overlap"])
    with pytest.raises(BadInput, match="newer version of cones.*its overlap holds shared_heads"):
        decode(save(tensors, {**metadata, "overlap": json.dumps({**overlap, "shared_heads": 2})}))
    import numpy as np
    with pytest.raises(BadInput, match="newer version of cones.*a part of kind 'lora'"):
        decode(save({**tensors, "lora/x": np.zeros(2, np.float32)}, metadata))


def test_an_import_refused_in_half_precision_names_the_float32_way(engine, monkeypatch):
    from cns_daemon.api.errors import ModelMismatch
    from cns_daemon.methods.common.tokens import rare_tokens

    record = cns_record(engine, "old", rare_tokens(engine.pipe.tokenizer)[3], 1.0, time.time())
    record.meta.fingerprint = "an-earlier-digest"
    with pytest.raises(ModelMismatch) as err:
        engine.import_record(record)
    assert "float32" not in err.value.hint                  # this service is float32 already
    import dataclasses

    monkeypatch.setattr(engine, "info", dataclasses.replace(engine.info, dtype="bfloat16"))
    with pytest.raises(ModelMismatch) as err:
        engine.import_record(record)
    assert "dtype = float32" in err.value.hint and "exported again" in err.value.hint


def test_the_tiny_model_takes_the_device_and_dtype_given(tmp_path):
    """`cones serve --model tiny --dtype bfloat16` served float32 without a word (a review's
    find): the test model is placed as a real one is."""
    store = ConceptStore.open(tmp_path / "store")
    try:
        eng = Engine(Settings(model="tiny", home=str(tmp_path), dtype="bfloat16"), store, Archive(tmp_path / "a"))
        eng.start()
        assert eng.info.dtype == "bfloat16" and eng.pipe.text_encoder.dtype == torch.bfloat16
    finally:
        store.close()
