"""Cones 2 on the tiny model: the live encoder is never changed, the residual lands only on the
conditional embeddings at the concept's class-word position and its share of the end of the
sequence, public residuals import."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cns_daemon.api.errors import BadInput, ModelMismatch
from cns_daemon.generate import encode
from cns_daemon.methods.base import LearnSpec
from cns_daemon.methods.cones2 import (METHOD, Cones2Handle, SentenceSet, class_residual,
                                       imported_record, import_residual, sentence_set, sentences)
from cns_daemon.prompts import expand
from cones_store.records import ConceptMeta, ConceptRecord

WIDTH = 64  # the tiny model's text encoder width
TOKENS = 77  # its sequence


def write_photos(folder, n=3, seed=0):
    """Small PNGs of one 'object': a two-tone striped square on a noisy background."""
    rng = np.random.default_rng(seed)
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(90, 130, (40, 40, 3)).astype(np.uint8)
        x, y = rng.integers(4, 14, 2)
        patch = np.zeros((20, 20, 3), np.uint8)
        patch[:] = (220, 40, 40)
        patch[::4] = (40, 40, 220)
        img[y:y + 20, x:x + 20] = patch
        p = folder / f"p{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_pipe):
    torch.set_num_threads(2)
    photos = write_photos(tmp_path_factory.mktemp("photos"))
    before = {"text": _state(tiny_pipe.text_encoder), "unet": _state(tiny_pipe.unet)}
    flags = [p.requires_grad for p in tiny_pipe.text_encoder.parameters()]
    spec = LearnSpec("pot", "teapot", steps=4, seed=3, options={"reg_batch": 4})
    record = METHOD.learn(tiny_pipe, photos, spec, None, None)
    return record, before, flags, photos, spec


def test_learn_leaves_the_live_pipeline_untouched(learned, tiny_pipe):
    record, before, flags, _, _ = learned
    assert _same(before["text"], _state(tiny_pipe.text_encoder))
    assert _same(before["unet"], _state(tiny_pipe.unet))
    assert [p.requires_grad for p in tiny_pipe.text_encoder.parameters()] == flags
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())


def test_record_holds_the_class_word_and_the_end_of_the_sequence(learned, tiny_pipe):
    """By default a row for the class word, one for EOS and one per position; with tail off the
    paper's one vector."""
    record, _, _, photos, spec = learned
    assert record.meta.method == "cones2" and record.meta.token == ""
    assert record.residual.shape == (2 + TOKENS, WIDTH) and record.residual.dtype == np.float32
    assert np.isfinite(record.residual).all() and np.abs(record.residual).max() > 0
    assert record.meta.metrics["sentences"] >= 100 and record.meta.metrics["tail_norm"] > 0
    paper = METHOD.learn(tiny_pipe, photos, LearnSpec("pot", "teapot", steps=2, seed=3,
                                                      options={"reg_batch": 4, "tail": False}), None, None)
    assert paper.residual.shape == (WIDTH,) and "tail_norm" not in paper.meta.metrics


def test_learn_is_deterministic_per_seed(learned, tiny_pipe):
    record, _, _, photos, spec = learned
    again = METHOD.learn(tiny_pipe, photos, spec, None, None)
    np.testing.assert_array_equal(again.residual, record.residual)


def test_shipped_sentences_contain_the_class_word(tiny_pipe):
    s = sentences("teapot")
    assert len(s) >= 100 and len(set(s)) == len(s) and all("teapot" in x for x in s)
    sset = sentence_set(tiny_pipe, "teapot")
    teapot = tiny_pipe.tokenizer("teapot", add_special_tokens=False).input_ids[-1]
    rows = torch.arange(len(s))
    assert (sset.ids[rows, sset.anchors] == teapot).all()
    assert (~sset.keep).sum(1).eq(1).all()   # exactly the class word is not preserved
    free = sentence_set(tiny_pipe, "teapot", tail=True)
    eos = tiny_pipe.tokenizer.eos_token_id
    assert (free.ids[rows, free.eos] == eos).all() and torch.equal(free.eos, sset.eos)
    tail = torch.arange(free.ids.shape[1])[None] >= free.eos[:, None]
    assert torch.equal(~free.keep, ~sset.keep | tail)   # and the end of the sequence is free


def test_class_residual_rows_by_position():
    """Row 0 the class word's mean shift, row 1 EOS's, row 2 + p position p's over the sentences
    that pad p; positions no sentence pads take the first padded one's."""
    s, t, d = 2, 8, 3
    shift = torch.arange(t, dtype=torch.float32)[None, :, None].expand(s, t, d)   # p at position p
    tuned = lambda ids: (shift[: len(ids)],)   # noqa: E731 (the encoder's output tuple)
    sset = SentenceSet(torch.zeros(s, t, dtype=torch.long), torch.tensor([2, 4]),
                       torch.ones(s, t, dtype=torch.bool), torch.tensor([3, 5]))
    rows = class_residual(tuned, torch.zeros(s, t, d), sset, tail=True)
    assert rows.shape == (2 + t, d)
    assert rows[:, 0].tolist() == [3.0, 4.0] + [4.0] * 4 + [4.0, 5.0, 6.0, 7.0]
    assert class_residual(tuned, torch.zeros(s, t, d), sset).tolist() == [3.0] * d


def test_residual_changes_only_the_conditional_class_word_and_its_end_share(learned, tiny_pipe):
    """pot (class word and end rows) and cup (the paper's one vector) in one prompt: pot's rows
    land at its class word, EOS and its turns of the padding (the end is dealt out between the
    two, pot first); cup's at its class word only; the unconditional branch is untouched."""
    record, *_ = learned
    other = ConceptRecord(ConceptMeta("cup", "cones2", "mug", ""),
                          residual=np.full(WIDTH, 0.5, np.float32))
    metas = {"pot": record.meta, "cup": other.meta}
    e = expand("a <pot> beside a <cup> on the sand", metas, tiny_pipe.tokenizer)
    handle = METHOD.apply(tiny_pipe, [record, other])
    with torch.no_grad():
        plain = encode(tiny_pipe, e, 2, True)
        edited = encode(tiny_pipe, e, 2, True, [handle])
    assert torch.equal(plain.uncond, edited.uncond)
    diff = (edited.cond - plain.cond).abs().amax(dim=(0, 2))
    changed = torch.nonzero(diff).flatten().tolist()
    eos = len(e.token_ids) - 1
    pot_end = list(range(eos, TOKENS, 2))
    assert changed == sorted(e.anchors("pot") + e.anchors("cup") + pot_end)
    rows = torch.from_numpy(record.residual)
    expected = {e.anchors("pot")[0]: rows[0], e.anchors("cup")[0]: torch.full((WIDTH,), 0.5),
                eos: rows[1], eos + 2: rows[2 + eos + 2], pot_end[-1]: rows[2 + pot_end[-1]]}
    for p, vec in expected.items():
        torch.testing.assert_close(edited.cond[:, p] - plain.cond[:, p], vec.expand(2, -1))
    METHOD.remove(handle)


def test_apply_refuses_a_residual_of_another_shape(tiny_pipe):
    for shape, words in (((768,), "768.*width 64"), ((2 + TOKENS, 768), "79x768"),
                         ((3, WIDTH), "3x64.*79 rows")):
        bad = ConceptRecord(ConceptMeta("big", "cones2", "dog", ""), residual=np.zeros(shape, np.float32))
        with pytest.raises(ModelMismatch, match=words):
            METHOD.apply(tiny_pipe, [bad])


def test_import_public_residual_shapes(tmp_path, tiny_pipe):
    vec = torch.randn(WIDTH)
    for name, tensor in (("flat.pt", vec), ("row.pt", vec[None])):
        torch.save(tensor, tmp_path / name)
        np.testing.assert_array_equal(import_residual(tmp_path / name, tiny_pipe), vec.numpy())
    rec = imported_record("imp", "dog", tmp_path / "row.pt", tiny_pipe)
    assert rec.meta.method == "cones2" and rec.residual.shape == (WIDTH,)

    torch.save(torch.randn(1, 768), tmp_path / "sd15.pt")
    with pytest.raises(BadInput, match=r"768.*64"):
        import_residual(tmp_path / "sd15.pt", tiny_pipe)
    cases = {"two.pt": torch.randn(2, WIDTH), "int.pt": torch.arange(WIDTH),
             "dict.pt": {"residual": vec}, "cube.pt": torch.randn(1, 1, WIDTH)}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(BadInput, match="not a float tensor"):
            import_residual(tmp_path / name, tiny_pipe)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BadInput, match="junk.pt"):
        import_residual(tmp_path / "junk.pt", tiny_pipe)
    with pytest.raises(BadInput, match="No residual"):
        import_residual(tmp_path / "missing.pt", tiny_pipe)


def test_handle_add_residuals_copies():
    handle = Cones2Handle({"a": torch.ones(3)})
    cond = torch.zeros(1, 5, 3)
    out = handle.add_residuals(cond, {"a": [2], "b": [4]}, {"a": [3, 4]}, 3)
    assert cond.abs().sum() == 0 and out[0, 2].tolist() == [1, 1, 1] and out.abs().sum() == 3


def test_preservation_loss_limits_drift_of_the_other_tokens(tmp_path, tiny_pipe):
    """With a large learning rate the encoder copy drifts; λ_reg pulls the non-class-word
    outputs back toward the frozen encoder's (measured on the shipped sentences)."""
    photos = write_photos(tmp_path / "p", n=3, seed=1)
    drift = {}
    for lam in (0.0, 20.0):
        spec = LearnSpec("pot", "teapot", steps=3, seed=0,
                         options={"lr": 3e-3, "lambda_reg": lam, "reg_batch": 8})
        drift[lam] = METHOD.learn(tiny_pipe, photos, spec, None, None).meta.metrics["preservation_last"]
    assert drift[20.0] < 0.6 * drift[0.0]


def test_an_untrained_residual_is_zero_on_a_half_precision_model(tmp_path, monkeypatch):
    """The frozen outputs are read from the fp32 copy before it trains: read from a bf16 encoder,
    its rounding alone made a residual with no training at all."""
    from cns_daemon.model import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.text_encoder.to(torch.bfloat16)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)   # trains nothing
    spec = LearnSpec("pot", "teapot", steps=1, seed=3, options={"reg_batch": 2, "variants": 2})
    record = METHOD.learn(pipe, write_photos(tmp_path / "photos", 2), spec, None, None)
    assert np.abs(record.residual).max() == 0.0


def test_the_preservation_loss_of_an_untrained_copy_is_zero_under_autocast(tiny_pipe):
    """On a GPU the loop runs under autocast: the copy's outputs in bf16 against the fp32 frozen
    ones made a loss of rounding alone (2e-5 on the tiny model) that training pushed against."""
    import copy

    from cns_daemon.methods.cones2 import _encode, preservation_loss, sentence_set

    tuned = copy.deepcopy(tiny_pipe.text_encoder).float()
    sset = sentence_set(tiny_pipe, "star")
    with torch.no_grad():
        frozen = _encode(tuned, sset.ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert float(preservation_loss(tuned, frozen, sset.ids, sset.keep)) == 0.0
