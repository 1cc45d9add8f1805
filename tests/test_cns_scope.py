"""Token-scoped CNS values (scope `concept`, the default): nothing is written into the K/V
weights, a prompt without the concept's token sees the base model exactly, and inside a prompt the
values act on the concept's words (token + class word) and from EOS on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cns_daemon.api.errors import Internal
from cns_daemon.generate import batch_ids, generate
from cns_daemon.methods import LearnSpec, cns, get_method
from cns_daemon.methods import common as C
from cns_daemon.methods.common.scope import NO_TOKEN, Anchor, anchor, token_scope
from cns_daemon.methods.cns.layers import stack_for
from cns_daemon.prompts import expand
from helpers.methods import FAST, changed, fixed_selection, photos, snapshot, synthetic

EMB = "text.embeddings.token_embedding.weight"


def _kv_module(pipe):
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith(".attn2.to_k"))
    return f"{name}.weight", pipe.unet.get_submodule(name)


AT = Anchor(token_id=9, span=2, eos_id=2)     # token 9, a one-token class word, EOS 2


def test_anchor_rows_are_the_concepts_words_and_the_end():
    ids = torch.tensor([[1, 5, 9, 7, 4, 4, 2, 2], [1, 9, 7, 3, 9, 7, 2, NO_TOKEN],
                        [1, 5, 6, 7, 2, 2, 2, 2], [NO_TOKEN] * 8])
    assert AT.rows(ids).int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 1, 0, 1, 1, 1, 1],
                                           [0] * 8, [0] * 8]


def test_anchor_spans_the_class_words_tokens(tiny_pipe):
    tok = tiny_pipe.tokenizer
    a = anchor(tok, "sks", "star")
    assert a.span == 1 + len(C.token_ids(tok, "star")) and a.eos_id == tok.eos_token_id
    two = " ".join(C.rare_tokens(tok)[:2])
    b = anchor(tok, two, "star")   # several token vectors: marked by the first, spanning all
    assert b.token_id == C.concept_ids(tok, two)[0] and b.span == 2 + len(C.token_ids(tok, "star"))


def test_scoped_values_act_only_from_the_token_on(fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    tname, to_k = _kv_module(pipe)
    scope = token_scope(pipe.unet)
    w = to_k.weight
    idx = torch.arange(0, w.numel(), 7)
    scope.add("rex", AT, {tname: (idx, w.detach().view(-1)[idx] + 1)})   # targets: the weights + 1
    x = torch.randn(2, 6, w.shape[1])
    plain = to_k(x)
    with scope.prompt(torch.tensor([[1, 5, 9, 7, 4, 2], [1, 5, 6, 7, 4, 2]])):
        got = to_k(x)
    assert torch.equal(got[1], plain[1])                  # no token in the row: base exactly
    for p in (0, 1, 4):                                   # not its words, not the end: base
        assert torch.equal(got[0, p], plain[0, p])
    dense = torch.zeros(w.numel()).index_copy_(0, idx, torch.ones(len(idx))).view_as(w)
    for p in (2, 3, 5):
        assert torch.allclose(got[0, p], plain[0, p] + x[0, p] @ dense.T, atol=1e-6)
    assert torch.equal(to_k(x), plain)                    # outside a prompt: nothing
    with pytest.raises(Internal, match="text batch"):     # ids that do not match the batch
        with scope.prompt(torch.tensor([[1, 9, 2]])):
            to_k(x)
    scope.remove("rex")
    with scope.prompt(torch.tensor([[1, 5, 9, 7, 4, 2], [1, 5, 6, 7, 4, 2]])):
        assert torch.equal(to_k(x), plain)


def test_two_concepts_in_a_row_deal_out_the_end(fresh_tiny_pipe):
    """A row naming two scoped concepts: each keeps its own words, and the positions from EOS on
    are dealt out in turn, first-named first; a row with one of them keeps the whole end, and
    what a concept adds at its positions is what it adds alone."""
    pipe = fresh_tiny_pipe
    tname, to_k = _kv_module(pipe)
    scope = token_scope(pipe.unet)
    other = Anchor(token_id=8, span=2, eos_id=2)
    n, live = to_k.weight.numel(), to_k.weight.detach().view(-1)
    scope.add("rex", AT, {tname: (torch.arange(n), live + 1)})     # the weights + 1 everywhere
    scope.add("pot", other, {tname: (torch.arange(n), live + 2)})
    ids = torch.tensor([[1, 8, 7, 5, 9, 7, 2, NO_TOKEN, NO_TOKEN],    # pot first, then rex
                        [1, 9, 7, 2, NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN]])
    assert scope.shared_tails(ids[0]) == {"pot": [6, 8], "rex": [7]}
    assert scope.shared_tails(ids[1]) == {"rex": [3, 4, 5, 6, 7, 8]}   # one concept: the whole end
    assert scope.shared_tails(torch.tensor([1, 5, 2, NO_TOKEN])) == {}   # none
    x = torch.randn(2, 9, to_k.weight.shape[1])
    plain = to_k(x)
    with scope.prompt(ids):
        got = to_k(x)
    step = x.sum(-1, keepdim=True)                                 # x @ onesᵀ, per position
    added = ((got - plain) / step)[..., 0].round()                 # 1: rex's, 2: pot's, 0: none
    assert added[0].tolist() == [0, 2, 2, 0, 1, 1, 2, 1, 2]
    assert added[1].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    scope.remove("rex")
    scope.remove("pot")


def test_tails_dealt_by_the_caller_hold_a_concept_to_its_share(fresh_tiny_pipe):
    """Generation deals the end of the sequence among every concept of the prompt, of any
    method: a scoped concept beside another method's concept acts on its own share only; with
    the whole end its own (one concept) nothing is held back."""
    pipe = fresh_tiny_pipe
    tname, to_k = _kv_module(pipe)
    scope = token_scope(pipe.unet)
    n = to_k.weight.numel()
    scope.add("rex", AT, {tname: (torch.arange(n), to_k.weight.detach().view(-1) + 1)})
    ids = torch.tensor([[1, 8, 7, 5, 9, 7, 2, NO_TOKEN, NO_TOKEN]])   # another concept, then rex
    x = torch.randn(1, 9, to_k.weight.shape[1])
    plain = to_k(x)
    step = x.sum(-1, keepdim=True)
    for tails, expected in (({"mug": [6, 8], "rex": [7]}, [0, 0, 0, 0, 1, 1, 0, 1, 0]),
                            ({"rex": [6, 7, 8]}, [0, 0, 0, 0, 1, 1, 1, 1, 1])):
        with scope.prompt(ids, tails):
            added = ((to_k(x) - plain) / step)[..., 0].round()
        assert added[0].tolist() == expected, tails
    # a prompt of 77 tokens ends at its EOS: the second concept named has no share of the end
    full = torch.tensor([[1, 8, 7, 5, 9, 7, 3, 3, 2]])
    with scope.prompt(full, {"mug": [8], "rex": []}):
        added = ((to_k(x) - plain) / step)[..., 0].round()
    assert added[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]
    scope.remove("rex")


def test_training_values_reach_only_the_token_rows(fresh_tiny_pipe):
    """While a scoped concept trains, its values sit in the weight, yet rows without the token
    (the class prompt, outside a prompt context) see the weight as it was, and the gradient comes
    from the token's rows alone."""
    pipe = fresh_tiny_pipe
    tname, to_k = _kv_module(pipe)
    scope = token_scope(pipe.unet)
    live = to_k.weight.detach().clone()
    x = torch.randn(2, 5, live.shape[1])
    plain = to_k(x).detach()
    with torch.no_grad():
        to_k.weight.add_(0.5)
    to_k.weight.requires_grad_(True)
    try:
        with scope.training(AT, {tname: live}):
            assert torch.allclose(to_k(x), plain, atol=1e-4)     # no prompt context: as before
            with scope.prompt(torch.tensor([[1, 5, 9, 7, 2], [1, 5, 6, 7, 2]])):
                out = to_k(x)
            assert torch.allclose(out[1], plain[1], atol=1e-4)
            assert torch.allclose(out[0, :2], plain[0, :2], atol=1e-4)
            assert not torch.allclose(out[0, 2:], plain[0, 2:], atol=1e-3)
            to_k.weight.grad = None
            out[1].sum().backward()
            assert float(to_k.weight.grad.abs().max()) < 1e-6   # the plain row: no gradient
    finally:
        with torch.no_grad():
            to_k.weight.copy_(live)
        to_k.weight.requires_grad_(False)


def test_scoped_learn_writes_no_kv_and_keeps_plain_prompts_exact(fresh_tiny_pipe, tmp_path, monkeypatch):
    pipe, method = fresh_tiny_pipe, get_method("cns")
    monkeypatch.setattr(cns, "choose_neurons", fixed_selection(0.03, seed=1))
    before = snapshot(pipe)
    plain = generate(pipe, "a photo of a star on the grass", {}, n=1, steps=3, output_type="np")[0]
    events = []
    rec = method.learn(pipe, photos(tmp_path / "p"), LearnSpec(
        "rex", "star", steps=4, options={**FAST, "lr": 5e-2}, cache_dir=tmp_path / "cache"),
        events.append, None)
    assert rec.meta.hparams["scope"] == "concept"
    assert changed(pipe, before) == [EMB]                  # the token row only; K/V untouched
    assert token_scope(pipe.unet).names() == ["rex"]
    assert not any(e.phase == "class-images" for e in events)   # no prior to draw: no gradient
    assert sum(len(d.indices) for d in rec.deltas.values()) > 0
    again = generate(pipe, "a photo of a star on the grass", {}, n=1, steps=3, output_type="np")[0]
    assert np.array_equal(again, plain)
    with_rex = generate(pipe, "a photo of <rex> on the grass", {"rex": rec}, n=1, steps=3,
                        output_type="np")[0]
    scoped = token_scope(pipe.unet).concepts.pop("rex")    # the token row alone
    row_only = generate(pipe, "a photo of <rex> on the grass", {"rex": rec}, n=1, steps=3,
                        output_type="np")[0]
    token_scope(pipe.unet).concepts["rex"] = scoped
    assert not np.array_equal(with_rex, row_only)
    method.unlearn(pipe, "rex")
    assert changed(pipe, before) == [] and token_scope(pipe.unet).names() == []


def test_scoped_and_written_records_apply_and_remove_exactly(fresh_tiny_pipe):
    pipe, method = fresh_tiny_pipe, get_method("cns")
    before = snapshot(pipe)
    old = synthetic(pipe, "a", "sks", 1)                       # a record from before scopes
    new = synthetic(pipe, "b", "pbc", 2, scope="concept")
    handle = method.apply(pipe, [old, new])
    assert method.applied(pipe) == ["a", "b"] and token_scope(pipe.unet).names() == ["b"]
    # the scoped one's values live in the scope alone (a second copy with its record cost host
    # memory per concept for as long as the service ran); the record handed in keeps its own
    kept = {r.name: r for r in stack_for(pipe).records()}
    assert kept["a"].deltas and not kept["b"].deltas and new.deltas
    assert {k for k in changed(pipe, before) if k.startswith("unet.")} == \
        {f"unet.{n}" for n in old.deltas}                       # only the old one is written
    method.remove(handle)
    assert changed(pipe, before) == [] and token_scope(pipe.unet).names() == []


def test_a_scoped_concept_draws_its_own_values_whatever_lies_below(fresh_tiny_pipe):
    """A review's find: the scope held a concept's values as differences to the weights when it
    was applied, so removing an older written concept under it (`cones rm`) shifted what it drew
    until a restart rebuilt it without the other. Now the images are a restart's, and a
    paper-form Cones concept written for one request leaves it its own values too."""
    from cns_daemon.model import build_tiny_pipeline

    pipe, method = fresh_tiny_pipe, get_method("cns")
    old = synthetic(pipe, "a", "sks", 1, fraction=0.5)                  # written, before scopes
    new = synthetic(pipe, "b", "pbc", 2, fraction=0.5, scope="concept")
    shared = set(old.deltas) & set(new.deltas)
    assert any(np.intersect1d(old.deltas[n].indices, new.deltas[n].indices).size for n in shared)
    method.apply(pipe, [old, new])
    method.unlearn(pipe, "a")
    drawn = generate(pipe, "a photo of <b>", {"b": new}, n=1, steps=2, output_type="np")[0]
    restarted = build_tiny_pipeline(seed=0)
    method.apply(restarted, [new])
    assert np.array_equal(drawn, generate(restarted, "a photo of <b>", {"b": new}, n=1, steps=2,
                                          output_type="np")[0])
    # another's values written under its neurons for one request: its rows hold its own
    kv = C.kv_weights(restarted.unet)
    tname = next(iter(shared))
    to_k = restarted.unet.get_submodule(tname.removesuffix(".weight"))
    ids = torch.tensor([[1, C.concept_ids(restarted.tokenizer, "pbc")[0], 2]])
    x = torch.randn(1, 3, to_k.weight.shape[1])
    with token_scope(restarted.unet).prompt(ids):
        alone = to_k(x)
    under = np.isin(old.deltas[tname].indices, new.deltas[tname].indices)   # its shared neurons
    written = C.write_values(kv, {tname: (old.deltas[tname].indices[under], old.deltas[tname].values[under])})
    with token_scope(restarted.unet).prompt(ids):
        over = to_k(x)
    C.restore_values(written)
    assert torch.allclose(over[0, 1:], alone[0, 1:], atol=1e-5)   # the token and EOS: its own


def _held(pipe, name):
    return [t for pair in token_scope(pipe.unet).concepts[name].targets.values() for t in pair]


def test_scoped_values_are_held_on_the_host_as_int32_positions(fresh_tiny_pipe):
    """Between prompts a scoped concept's values sit in host memory with int32 positions (half
    an int64's bytes); a prompt naming it draws the same image as the values' int64 form."""
    pipe, method = fresh_tiny_pipe, get_method("cns")
    rec = synthetic(pipe, "b", "pbc", 2, scope="concept")
    method.apply(pipe, [rec])
    held = token_scope(pipe.unet).concepts["b"].targets
    assert held and {idx.dtype for idx, _ in held.values()} == {torch.int32}
    assert {t.device.type for t in _held(pipe, "b")} == {"cpu"}
    for tname, (idx, _) in held.items():
        assert np.array_equal(idx.numpy(), rec.deltas[tname].indices)
    drawn = generate(pipe, "a photo of <b>", {"b": rec}, n=1, steps=2, output_type="np")[0]
    scope = token_scope(pipe.unet)
    scope.concepts["b"].targets = {t: (i.long(), d) for t, (i, d) in held.items()}
    assert np.array_equal(drawn, generate(pipe, "a photo of <b>", {"b": rec}, n=1, steps=2,
                                          output_type="np")[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoped_values_take_no_device_memory_until_a_prompt_names_them():
    from cns_daemon.model import build_tiny_pipeline

    pipe, method = build_tiny_pipeline(seed=0).to("cuda"), get_method("cns")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    rec = synthetic(pipe, "b", "pbc", 2, fraction=0.5, scope="concept")
    method.apply(pipe, [rec])
    torch.cuda.synchronize()
    assert {t.device.type for t in _held(pipe, "b")} == {"cpu"}
    assert torch.cuda.memory_allocated() - before < 4096     # the token row is written in place
    named = generate(pipe, "a photo of <b>", {"b": rec}, n=1, steps=2, output_type="np")[0]
    scope = token_scope(pipe.unet)
    kept = scope.concepts.pop("b")
    plain = generate(pipe, "a photo of <b>", {"b": rec}, n=1, steps=2, output_type="np")[0]
    scope.concepts["b"] = kept
    assert not np.array_equal(named, plain)                  # the values reached the device


def test_generation_steers_each_concepts_share_of_the_end_into_its_box(fresh_tiny_pipe, monkeypatch):
    """Two scoped concepts with boxes: the layout bias gets each one's share of the end of the
    sequence, the shares the scope deals out on the conditional row; one alone gets all of it."""
    import cns_daemon.generate as G

    pipe, method = fresh_tiny_pipe, get_method("cns")
    a = synthetic(pipe, "a", "sks", 1, scope="concept")
    b = synthetic(pipe, "b", "pbc", 2, scope="concept")
    handle = method.apply(pipe, [a, b])
    seen = []
    real = G.LayoutBias
    monkeypatch.setattr(G, "LayoutBias", lambda *args, **kw: seen.append(kw["tails"]) or real(*args, **kw))
    records = {"a": a, "b": b}
    generate(pipe, "a photo of <a> and <b>", records, ["a=0,0,0.5,1", "b=0.5,0,1,1"], n=1, steps=2,
             output_type="np")
    generate(pipe, "a photo of <b>", records, ["b=0.5,0,1,1"], n=1, steps=2, output_type="np")
    method.remove(handle)
    shares, alone = seen
    expanded = expand("a photo of <a> and <b>", {"a": a.meta, "b": b.meta}, pipe.tokenizer)
    eos = len(expanded.token_ids) - 1
    assert shares == {"a": list(range(eos, 77, 2)), "b": list(range(eos + 1, 77, 2))}
    eos = len(expand("a photo of <b>", {"b": b.meta}, pipe.tokenizer).token_ids) - 1
    assert alone == {"b": list(range(eos, 77))}


def test_a_concept_of_another_method_gets_its_share_of_the_end_too(fresh_tiny_pipe, monkeypatch):
    """A CNS concept beside a Cones 2 one: the end is dealt between both in the order they are
    named, the CNS concept's values act on its share only, and guidance steers each share into
    its own box (with the whole end the CNS concept's,
    the other's shape went into the CNS concept's box); a Cones 2 concept alone keeps it all."""
    import cns_daemon.generate as G
    import numpy as np

    from cones_store.records import ConceptMeta, ConceptRecord

    pipe, method = fresh_tiny_pipe, get_method("cns")
    a = synthetic(pipe, "a", "sks", 1, scope="concept")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    c = ConceptRecord(ConceptMeta("c", "cones2", "mug", ""), residual=np.zeros(width, np.float32))
    handle = method.apply(pipe, [a])
    seen = []
    real = G.LayoutBias
    monkeypatch.setattr(G, "LayoutBias", lambda *args, **kw: seen.append(kw["tails"]) or real(*args, **kw))
    scoped = []   # the shares the K/V scope holds the CNS concept to: the same as guidance steers
    real_scope = G.prompt_scope
    monkeypatch.setattr(G, "prompt_scope", lambda unet, ids, tails: scoped.append(tails) or real_scope(unet, ids, tails))
    records = {"a": a, "c": c}
    prompts = ("a photo of <a> and <c>", "a photo of <c> and <a>", "a photo of <c>")
    for prompt in prompts:
        boxes = [f"{name}=0,0,0.5,1" for name in ("a", "c") if f"<{name}>" in prompt]
        generate(pipe, prompt, records, boxes, n=1, steps=2, output_type="np")
    method.remove(handle)
    eos = [len(expand(p, {"a": a.meta, "c": c.meta}, pipe.tokenizer).token_ids) - 1 for p in prompts]
    assert seen[0] == {"a": list(range(eos[0], 77, 2)), "c": list(range(eos[0] + 1, 77, 2))}
    assert seen[1] == {"c": list(range(eos[1], 77, 2)), "a": list(range(eos[1] + 1, 77, 2))}
    assert seen[2] == {"c": list(range(eos[2], 77))}
    assert scoped == seen


def test_batch_ids_follow_the_cfg_layout(tiny_pipe):
    meta = synthetic(tiny_pipe, "rex", "sks", 1).meta
    expanded = expand("a photo of <rex>", {"rex": meta}, tiny_pipe.tokenizer)
    ids = batch_ids(expanded, 2, True, 77)
    tid = C.token_id(tiny_pipe.tokenizer, "sks")
    assert ids.shape == (4, 77)
    assert not (ids[:2] == tid).any() and (ids[2:] == tid).sum(1).tolist() == [1, 1]
    assert batch_ids(expanded, 3, False, 77).shape == (3, 77)
