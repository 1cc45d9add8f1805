"""The `<name>` syntax: expansion per method, token positions, boxes."""
from __future__ import annotations

import pytest

from cns_daemon.api.errors import BadInput, NotFound
from cns_daemon.prompts import Box, check_boxes, expand, parse_box, referenced_names
from cns_daemon.tokenizer import clip_tokenizer
from cones_store.records import ConceptMeta


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


@pytest.fixture
def metas():
    return {
        "rex": ConceptMeta("rex", "cns", "dog", "sks"),
        "mug": ConceptMeta("mug", "cones", "mug", "ohwx"),
        "pot": ConceptMeta("pot", "cones2", "teapot", ""),
    }


def _words(tok, ids):
    return [tok.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]


def test_expansion_per_method(tok, metas):
    e = expand("a photo of <rex>, <mug> and <pot> on the beach", metas, tok)
    assert e.text == "a photo of a sks dog , a ohwx mug and a teapot on the beach"
    assert e.names == ["rex", "mug", "pot"]
    assert list(e.token_ids) == list(tok(e.text).input_ids)


def test_a_reference_reads_as_its_training_caption(tok, metas):
    """"a photo of <rex>" is exactly the template caption the concept learned from, and the
    class prompt of its prior with the token added; a determiner already there is kept."""
    from cns_daemon.methods.common.prior import prior_prompt
    from cns_daemon.methods.data import template_caption

    assert expand("a photo of <rex>", metas, tok).text == template_caption(0, "sks", "dog")
    assert expand("a photo of <pot>", metas, tok).text == prior_prompt("teapot")
    for prompt, text in (("the <rex> on the sofa", "the sks dog on the sofa"),
                         ("my <rex> and two <mug>", "my sks dog and two ohwx mug"),
                         ("anna's <rex>", "anna's sks dog"),
                         ("<rex> running", "a sks dog running"),
                         ("a red <rex> next to <mug>", "a red sks dog next to a ohwx mug"),
                         ("(<mug>)", "( a ohwx mug )")):
        e = expand(prompt, metas, tok)
        assert e.text == text, prompt
        assert list(e.token_ids) == list(tok(e.text).input_ids)
    # the article is not part of the concept's positions (guidance and residuals use those)
    e = expand("a photo of <rex>", metas, tok)
    assert [_words(tok, e.token_ids)[p] for p in e.positions("rex")] == ["sks", "dog"]


def test_the_article_before_a_token_is_the_training_captions(tok, metas):
    """Every template caption says "a" before the token, whatever its first letter, so a token
    starting with a vowel gets "a" too; a Cones 2 concept, its class word alone, gets English's."""
    from cns_daemon.methods.data import template_caption

    assert expand("a photo of <mug>", metas, tok).text == template_caption(0, "ohwx", "mug")
    metas["apple"] = ConceptMeta("apple", "cones2", "apple", "")
    assert expand("a photo of <apple>", metas, tok).text == "a photo of an apple"


def test_a_concepts_token_as_a_plain_word_is_refused(tok, metas):
    """The word a concept is drawn by would draw it unasked (its values and row act wherever its
    token stands): in the prompt outside `<name>`, and in the negative prompt, it is refused,
    naming the concept; its own expansion and other words pass."""
    from cns_daemon.prompts import check_plain_words

    for prompt in ("a photo of a sks dog", "<mug> next to an sks", "ohwx style, <rex>"):
        with pytest.raises(BadInput) as err:
            expand(prompt, metas, tok)
        assert "<rex>" in err.value.message or "<mug>" in err.value.message, prompt
    assert "'sks'" in pytest.raises(BadInput, expand, "a sks dog", metas, tok).value.message
    assert expand("a photo of <rex> and <mug>, skis", metas, tok).names == ["rex", "mug"]
    with pytest.raises(BadInput) as err:
        check_plain_words("blurry, ohwx", metas, tok, "negative prompt")
    assert "negative prompt" in err.value.message and "<mug>" in err.value.message
    # not "write <mug> for the concept": <name> is refused in a negative prompt too
    assert "cannot be steered away from" in err.value.message and "<mug>" not in err.value.hint
    check_plain_words("blurry, dark", metas, tok, "negative prompt")
    # multi-vector tokens: each of its words
    metas["cup"] = ConceptMeta("cup", "cns", "cup", "httr rcn")
    with pytest.raises(BadInput, match="<cup>"):
        expand("a rcn cup", metas, tok)


def test_positions_point_at_the_expanded_tokens(tok, metas):
    e = expand("<pot> next to <rex>'s bowl and <mug>", metas, tok)
    words = _words(tok, e.token_ids)
    assert [words[p] for p in e.positions("rex")] == ["sks", "dog"]
    assert [words[p] for p in e.positions("mug")] == ["ohwx", "mug"]
    assert [words[p] for p in e.positions("pot")] == ["teapot"]
    # The anchor (Cones 2 residual position) is the class word's last token.
    assert [words[p] for p in e.anchors("rex")] == ["dog"]
    assert [words[p] for p in e.anchors("pot")] == ["teapot"]
    assert words[0] == "<|startoftext|>" and words[-1] == "<|endoftext|>"


def test_repeated_concept_and_glued_text(tok, metas):
    e = expand("x<rex>y and <rex>", metas, tok)
    words = _words(tok, e.token_ids)
    assert e.names == ["rex"]
    assert len(e.spans) == 2
    assert [words[p] for p in e.positions("rex")] == ["sks", "dog", "sks", "dog"]
    assert words[e.spans[0].positions[0] - 1] == "x" and words[e.spans[0].positions[-1] + 1] == "y"


def test_multi_token_class_word(tok):
    metas = {"sh": ConceptMeta("sh", "cones2", "sunglasses hat", "")}
    e = expand("a <sh>", metas, tok)
    words = _words(tok, e.token_ids)
    assert [words[p] for p in e.positions("sh")] == ["sunglasses", "hat"]
    assert e.anchors("sh") == [e.positions("sh")[-1]]


def test_plain_prompt_has_no_spans(tok, metas):
    e = expand("a red star on grass", metas, tok)
    assert e.spans == () and e.text == "a red star on grass"


def test_unknown_name_is_not_found(tok, metas):
    with pytest.raises(NotFound, match="<nobody>"):
        expand("a photo of <nobody> and <rex>", metas, tok)
    with pytest.raises(NotFound) as info:
        expand("a photo of <Rex>", metas, tok)
    assert info.value.hint == "Did you mean <rex>? Names are case-sensitive."
    with pytest.raises(NotFound) as info:   # a misspelling is named too
        expand("a photo of <rexx>", metas, tok)
    assert info.value.hint == "Did you mean <rex>?"
    from cns_daemon.prompts import _near_names

    assert _near_names("dog1", ["dog2", "dog3", "rex"]) == ["dog2", "dog3"]   # as close: both, not one
    assert _near_names("cat", ["car", "mug"]) == ["car"]   # one letter off in a short name
    assert _near_names("c1", ["c11", "c2", "zebra"]) == ["c11", "c2"]
    assert _near_names("zzz", ["car", "mug"]) == [] and _near_names("x", []) == []
    with pytest.raises(NotFound) as info:   # nothing close: where to look
        expand("a photo of <nobody>", metas, tok)
    assert info.value.hint.startswith("`cones list` shows the stored concepts")


def test_invalid_name_is_bad_input(tok, metas):
    with pytest.raises(BadInput):
        expand("a photo of <re$x>", metas, tok)
    assert referenced_names("<a> <b> <a>") == ["a", "b"]


def test_angle_brackets_around_spaced_words_are_refused(tok, metas):
    for prompt in ("a photo of <my dog>", "a photo of < rex >", "<rex> and <big mug>"):
        with pytest.raises(BadInput, match="name has no spaces"):
            expand(prompt, metas, tok)
    for fine in ("a heart <3 and <rex>, bigger > smaller", "cute face <3 so happy >_< <rex>",
                 "x < y and y > z with <rex>", "arrow <-- left and right --> <rex>", "<div class=sale> <rex>"):
        assert referenced_names(fine) == ["rex"], fine   # other uses of < and > pass


def test_an_unclosed_or_empty_reference_is_refused(tok, metas):
    """A typo must not turn a concept into plain words without a word said."""
    for prompt in ("a photo of <rex", "a photo of <rex on the grass", "<rex and <mug>"):
        with pytest.raises(BadInput, match="'<rex' in the prompt looks like a concept with no closing") as info:
            expand(prompt, metas, tok)
        assert "<rex>" in info.value.hint
    with pytest.raises(BadInput, match="empty '<>'"):
        expand("a photo of <> on the grass", metas, tok)
    with pytest.raises(BadInput, match="'rex>' in the prompt looks like the concept <rex> with no opening"):
        expand("a photo of rex> on the grass", metas, tok)
    expand("a photo of dog> and <rex>", metas, tok)   # not a concept's name: other uses of '>' pass
    # a name may start with a digit (`cones add 7up`): its typos are refused too (they were
    # drawn as plain words), while a heart "<3" and "<5cm tall" still pass
    digits = {**metas, "7up": ConceptMeta("7up", "cns", "can", "ohwx")}
    for prompt in ("a photo of <7up on the grass", "a photo of < 7up > and <rex>", "<7up and <rex>",
                   "a photo of < 7up>", "a photo of <7up >"):
        with pytest.raises(BadInput, match="looks like the concept <7up> written"):
            expand(prompt, digits, tok)
    expand("a photo of <7up> beside <rex>", digits, tok)
    for fine in ("i <3 <rex> so much <3", "a figurine <5cm tall, <rex>", "a <3d render of <rex>"):
        assert referenced_names(fine) == ["rex"], fine
        expand(fine, digits, tok)


def test_concept_past_the_token_limit(tok, metas):
    with pytest.raises(BadInput, match="too long"):
        expand("word " * 80 + "<rex>", metas, tok)


def test_words_past_the_token_limit_are_refused_not_dropped(tok, metas):
    """The encoder reads 77 tokens (75 words' worth); diffusers would drop the rest silently."""
    expand("<rex> " + "big " * 60, metas, tok)
    with pytest.raises(BadInput, match=r"over the 75 the text encoder reads: 'snow snow") as info:
        expand("<rex> on a " + "big " * 68 + "snow " * 6, metas, tok)
    assert "Shorten the prompt" in info.value.hint


def test_parse_box_forms():
    b = parse_box("rex=0,0.25,0.5,1")
    assert (b.name, b.x0, b.y0, b.x1, b.y1) == ("rex", 0.0, 0.25, 0.5, 1.0)
    assert parse_box("<rex>=0.1,0.1,0.2,0.2").name == "rex"
    for bad in ["rex", "rex=0,0,1", "rex=a,0,1,1", "=0,0,1,1", "rex=0,0,1,1,1"]:
        with pytest.raises(BadInput, match="x0,y0,x1,y1"):
            parse_box(bad)
    for bad in ["rex=0.5,0,0.5,1", "rex=0,0.6,1,0.5", "rex=-0.1,0,1,1", "rex=0,0,1.2,1"]:
        with pytest.raises(BadInput):
            parse_box(bad)


def test_box_for_a_name_not_in_the_prompt(tok, metas):
    e = expand("<rex> and <mug>", metas, tok)
    layout = check_boxes(["rex=0,0,0.5,1", Box("mug", 0.5, 0, 1, 1)], e)
    assert [b.name for b in layout.boxes] == ["rex", "mug"]
    with pytest.raises(BadInput, match="not in the prompt"):
        check_boxes(["pot=0,0,0.5,1"], e)
    with pytest.raises(BadInput, match="not in the prompt") as info:   # a near miss is said
        check_boxes(["REX=0,0,0.5,1"], e)
    assert "Did you mean --box rex=" in info.value.hint
    with pytest.raises(BadInput, match="Two boxes"):
        check_boxes(["rex=0,0,0.5,1", "rex=0.5,0,1,1"], e)


def test_a_box_naming_no_concept_of_the_prompt_gets_the_hint_that_fits(tok, metas):
    """A review's find: `--box dog=` for <rex>, a dog, was told to drop the box as a plain word
    of the prompt (the person never wrote "dog"), and a box of no stored concept was told to
    name it in the prompt, where it would fail as unknown."""
    e = expand("a photo of <rex> and <mug> on the grass", metas, tok)
    cases = (("dog", "'dog' is the class of <rex>: give its box as --box rex=..."),
             ("grass", "'grass' is a plain word of the prompt"),
             ("pot", "Name the concept in the prompt as <pot>"),
             ("sks2", "No concept has this name"))
    for name, hint in cases:
        with pytest.raises(BadInput, match="not in the prompt") as info:
            check_boxes([f"{name}=0,0,0.5,1"], e, metas)
        assert hint in info.value.hint, (name, info.value.hint)
