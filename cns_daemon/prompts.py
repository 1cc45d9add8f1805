"""The `<name>` prompt syntax and layout boxes.

A prompt names stored concepts in angle brackets: "a photo of <rex> and <mug> on the beach".
Each reference is expanded per method (CNS and Cones: "<token> <class>", Cones 2: "<class>", the
residual going to that class word), and we record which positions of the tokenized prompt belong
to which concept: Cones 2 adds its residual there and layout guidance biases attention there.

A reference reads as a noun phrase, as the concept's training captions put it ("a photo of a
<token> <class>"): where it stands alone — at the start, after punctuation, or after a
preposition or conjunction ("a photo of <rex>", "<rex> and <mug>", "next to <rex>") — it gets the
article, so "a photo of <rex>" is "a photo of a sks dog", exactly the caption the concept
learned from and its prior's class prompt ("a photo of a dog") with the token added. Anywhere
else it is left as written ("the <rex>", "my <rex>", "a red <rex>", "anna's <rex>").
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cns_daemon.api.errors import BadInput, Internal, NotFound
from cns_daemon.api.names import validate_name
from cones_store.records import ConceptMeta

# Anything in angle brackets without spaces is meant as a reference; the name check then says
# precisely what is wrong with a malformed one instead of silently passing "<my dog>" through.
REFERENCE_RE = re.compile(r"<([^<>\s]+)>")
# One or two name-like words in angle brackets with spaces ("<my dog>", "< rex >") read as a
# reference too: a concept's name has no spaces, so they are refused rather than drawn as plain
# words. Other uses of < and > (a heart <3, an emoticon >_<, "x < y and y > z") pass.
SPACED_REFERENCE_RE = re.compile(r"<(\s*[A-Za-z_][\w-]*(?:\s+[A-Za-z_][\w-]*)?\s*)>")
# A name-like word after "<" and no ">" before the next "<" or the end ("a photo of <rex on the
# grass", "<rex and <mug>"): a reference with a typo, refused rather than drawn as plain words.
# "<3", "< y", "<div class=x>" pass.
UNCLOSED_REFERENCE_RE = re.compile(r"<([A-Za-z_][\w-]*)(?![\w>-])[^<>]*(?=<|$)")
BOX_FORM = "NAME=x0,y0,x1,y1 with numbers in [0,1], x0 < x1 and y0 < y1 (for example rex=0,0.2,0.5,1)"


@dataclass(frozen=True)
class ConceptSpan:
    """One occurrence of a concept in the expanded prompt."""
    name: str
    method: str
    positions: tuple[int, ...]   # every token of the expansion (token + class word), BOS = 0
    anchor: int                  # the class word's last token: where a Cones 2 residual goes


@dataclass(frozen=True)
class ExpandedPrompt:
    text: str                          # what the text encoder sees
    token_ids: tuple[int, ...]         # BOS ... EOS, before padding
    spans: tuple[ConceptSpan, ...]     # in prompt order; a concept may occur more than once

    @property
    def names(self) -> list[str]:
        """Referenced concept names, first occurrence order, without repeats."""
        return list(dict.fromkeys(s.name for s in self.spans))

    def positions(self, name: str) -> list[int]:
        return sorted({p for s in self.spans if s.name == name for p in s.positions})

    def anchors(self, name: str) -> list[int]:
        return sorted({s.anchor for s in self.spans if s.name == name})


def referenced_names(prompt: str, what: str = "prompt") -> list[str]:
    """The validated `<name>` references of a prompt, first occurrence order, no repeats."""
    spaced = next((m for m in SPACED_REFERENCE_RE.finditer(prompt) if re.search(r"\s", m.group(1))), None)
    if spaced:
        raise BadInput(f"{spaced.group(0)!r} in the {what} looks like a concept, but a concept's "
                       "name has no spaces.", "Write it as <name>, e.g. <rex> or <my_mug>; "
                       "`cones list` shows the names.")
    unclosed = UNCLOSED_REFERENCE_RE.search(prompt)
    if unclosed:
        raise BadInput(f"'<{unclosed.group(1)}' in the {what} looks like a concept with no closing '>'.",
                       f"Write it as <{unclosed.group(1)}>; `cones list` shows the names.")
    if "<>" in prompt:
        raise BadInput(f"The {what} holds an empty '<>'.", "Put a concept's name inside it, e.g. <rex>; "
                       "`cones list` shows the names.")
    return list(dict.fromkeys(validate_name(m.group(1)) for m in REFERENCE_RE.finditer(prompt)))


def check_length(tokenizer, text: str, what: str = "prompt") -> None:
    """BadInput when `text` is longer than the text encoder reads: the encoder would drop the
    rest without a word (diffusers only logs it)."""
    ids = tokenizer(text, verbose=False).input_ids   # (its "longer than" warning: said here)
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        dropped = tokenizer.decode(ids[limit - 1:-1]).strip()
        shown = dropped if len(dropped) <= 60 else f"{dropped[:57]}..."
        raise BadInput(f"The {what} is {len(ids) - 2} tokens long, over the {limit - 2} the text "
                       f"encoder reads: {shown!r} would be left out.", f"Shorten the {what}.")


def expansion(meta: ConceptMeta) -> tuple[str, str]:
    """(prefix, class word) a reference expands to; the prefix is "" for Cones 2."""
    if meta.method == "cones2":
        return "", meta.class_word
    if not meta.token:
        raise Internal(f"Concept {meta.name!r} ({meta.method}) has no token to expand to.")
    return meta.token, meta.class_word


# Words after which a reference stands alone and gets an article of its own.
STANDALONE_AFTER = frozenset(
    "of in on at with without and or but by for from to into onto near beside besides behind "
    "under over above below beneath between among against around across through along like "
    "as than via inside outside upon off".split())
_LAST_WORD = re.compile(r"([A-Za-z']+)\s+$")


def _needs_article(before: str) -> bool:
    """Whether a reference after `before` (the prompt text up to it) gets "a"/"an"."""
    text = before.rstrip()
    if not text:
        return True
    if text[-1] in ",;:([{":
        return True
    if text is before:                       # glued to a word ("x<rex>"): leave it as written
        return False
    last = _LAST_WORD.search(before)
    return last is not None and last.group(1).lower() in STANDALONE_AFTER


def _article(first_word: str) -> str:
    return "an" if first_word[:1].lower() in "aeiou" else "a"


def _ids(tokenizer, text: str) -> list[int]:
    text = text.strip()
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def empty_prompt() -> BadInput:
    return BadInput("The prompt is empty.", "Give a prompt such as 'a photo of <rex> on the beach'.")


def blank_negative() -> BadInput:
    return BadInput("The negative prompt is blank.", "Leave --negative out, or say what to avoid.")


def _check_digit_names(prompt: str, metas: Mapping[str, ConceptMeta]) -> None:
    """The typos `referenced_names` refuses ("<rex on the grass", "< rex >"), for names that
    start with a digit ("7up"): those it cannot tell from "<5cm tall" or a heart "<3" unless the
    name is a stored concept's."""
    for name in (n for n in metas if n[:1].isdigit()):
        for m in re.finditer(rf"<(\s*){re.escape(name)}(?![\w-])(\s*)(>?)", prompt):
            if m.group(1) or m.group(2) or not m.group(3):   # spaced, or no closing '>'
                raise BadInput(f"{m.group(0).strip()!r} in the prompt looks like the concept <{name}> "
                               "written with spaces or no closing '>'.", f"Write it as <{name}>.")


def _near_names(name: str, names) -> list[str]:
    """The stored names `name` most likely meant: the same but for case, else those one letter
    off, else the closest spellings by difflib's ratio (≥ 0.75); all of them where several are
    as close (<dog1>: <dog2> and <dog3>, not the one sorted last)."""
    same = [m for m in names if m.lower() == name.lower()]
    if same:
        return same
    low = name.lower()
    one_off = sorted(m for m in names if _one_edit(low, m.lower()))
    if one_off:
        return one_off
    scored = [(difflib.SequenceMatcher(None, low, m.lower()).ratio(), m) for m in names]
    best = max((c for c, _ in scored), default=0.0)
    return sorted(m for c, m in scored if c == best) if best >= 0.75 else []


def _one_edit(a: str, b: str) -> bool:
    """One letter changed, added or left out (<car> for <cat>: difflib's ratio is 0.67 there)."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def expand(prompt: str, metas: Mapping[str, ConceptMeta], tokenizer) -> ExpandedPrompt:
    """Replace each `<name>` by its method's expansion and locate the concepts' tokens.

    Unknown names raise NotFound; a prompt whose concepts fall past the tokenizer's length limit
    raises BadInput (the encoder would silently drop them)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise empty_prompt()
    _check_digit_names(prompt, metas)
    missing = [n for n in referenced_names(prompt) if n not in metas]
    if missing:
        # Names are case-sensitive (<Star> and <star> may both exist); a near miss is said,
        # a misspelling too (<rexx> for <rex>)
        near = {n: _near_names(n, metas) for n in missing}
        hint = "; ".join("did you mean " + " or ".join(f"<{m}>" for m in near[n][:3]) + "?"
                         for n in missing if near[n])
        cased = any(m.lower() == n.lower() for n in missing for m in near[n])
        raise NotFound(f"Unknown concept{'s' if len(missing) > 1 else ''} in the prompt: "
                       + ", ".join(f"<{n}>" for n in missing) + ".",
                       (hint[0].upper() + hint[1:] + (" Names are case-sensitive." if cased else "")) if hint else
                       "`cones list` shows the stored concepts; learn a new one with `cones add`.")

    # "rex>" with its '<' forgotten would be drawn as the plain word, the concept left out
    for m in re.finditer(r"(?<![<\w-])([A-Za-z0-9][\w-]*)>", prompt):
        if m.group(1) in metas:
            raise BadInput(f"'{m.group(0)}' in the prompt looks like the concept <{m.group(1)}> with "
                           "no opening '<'.", f"Write it as <{m.group(1)}>.")

    pieces: list[str] = []
    ids: list[int] = [tokenizer.bos_token_id]
    spans: list[ConceptSpan] = []
    cursor = 0
    for match in REFERENCE_RE.finditer(prompt):
        before = prompt[cursor:match.start()]
        pieces.append(before)
        ids += _ids(tokenizer, before)
        meta = metas[match.group(1)]
        prefix, word = expansion(meta)
        prefix_ids, word_ids = _ids(tokenizer, prefix), _ids(tokenizer, word)
        if not word_ids:
            raise Internal(f"Concept {meta.name!r} has an empty class word.")
        if _needs_article(prompt[:match.start()]):
            # "a" before a token, as every training caption has it ("a photo of a ohwx mug");
            # English's rule before a class word alone (Cones 2: "an apple")
            article = "a" if prefix else _article(word)
            ids += _ids(tokenizer, article)
            pieces.append(f" {article}")
        start = len(ids)
        ids += prefix_ids + word_ids
        pieces.append(f" {prefix} {word} " if prefix else f" {word} ")
        spans.append(ConceptSpan(meta.name, meta.method, tuple(range(start, len(ids))), len(ids) - 1))
        cursor = match.end()
    pieces.append(prompt[cursor:])
    ids += _ids(tokenizer, prompt[cursor:])
    ids.append(tokenizer.eos_token_id)
    text = " ".join("".join(pieces).split())

    whole = list(tokenizer(text).input_ids)
    if whole != ids:  # cannot happen with a whitespace-splitting tokenizer; guard the assumption
        raise Internal(f"Segment-wise tokenization of {text!r} disagrees with the whole prompt.")
    limit = tokenizer.model_max_length - 1  # the last slot keeps EOS after truncation
    late = [s.name for s in spans if s.positions[-1] >= limit]
    if late:
        raise BadInput(f"The prompt is too long: <{late[0]}> falls past the {limit - 1} tokens the "
                       "text encoder reads.", "Shorten the prompt or name the concepts earlier in it.")
    check_length(tokenizer, text)
    named = {p for s in spans for p in s.positions}
    check_bare_tokens([i for k, i in enumerate(ids) if k not in named], metas, tokenizer)
    return ExpandedPrompt(text, tuple(ids), tuple(spans))


def check_plain_words(text: str, metas: Mapping[str, ConceptMeta], tokenizer, what: str) -> None:
    """`check_bare_tokens` for text with no `<name>` in it (a negative prompt)."""
    check_bare_tokens(_ids(tokenizer, text), metas, tokenizer, what)


def check_bare_tokens(ids: Iterable[int], metas: Mapping[str, ConceptMeta], tokenizer,
                      what: str = "prompt") -> None:
    """Refuse a concept's token written as a plain word ("dbz" where a concept is drawn by it):
    the token's row and values act wherever its id stands (a CNS concept's always), so the word
    would draw the concept unasked, and a prompt without `<name>` would not be the base model's.
    Concept tokens are rare words, but some are words to someone (an acronym)."""
    owners = {i: m.name for m in metas.values() if m.token
              for w in m.token.split() for i in _ids(tokenizer, w)}
    hit = next((i for i in ids if i in owners), None)
    if hit is not None and what == "negative prompt":   # (<name> is refused there too)
        word = tokenizer.decode([hit]).strip()
        raise BadInput(f"The word {word!r} in the negative prompt is the token concept "
                       f"<{owners[hit]}> is drawn by; a concept cannot be steered away from.",
                       "Leave the word out of the negative prompt.")
    if hit is not None:
        word = tokenizer.decode([hit]).strip()
        raise BadInput(f"The word {word!r} in the {what} is the token concept <{owners[hit]}> is "
                       f"drawn by: it would draw <{owners[hit]}> there.",
                       f"Write <{owners[hit]}> for the concept; for the plain word, remove the concept "
                       "and learn it again (it gets another token), or leave the word out.")


@dataclass(frozen=True)
class Box:
    """A layout box in image fractions (x right, y down, origin top-left)."""
    name: str
    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self):
        validate_name(self.name)
        coords = (self.x0, self.y0, self.x1, self.y1)
        if not all(0.0 <= c <= 1.0 for c in coords) or not (self.x0 < self.x1 and self.y0 < self.y1):
            raise BadInput(f"Box for {self.name!r} is not a box inside the image: {coords}.",
                           f"Use {BOX_FORM}.")


def parse_box(text: str) -> Box:
    """Parse `name=x0,y0,x1,y1` (the name may keep its angle brackets)."""
    name, sep, rest = str(text).partition("=")
    name = name.strip()
    if name.startswith("<") and name.endswith(">"):
        name = name[1:-1]
    parts = rest.split(",")
    if not sep or not name or len(parts) != 4:
        raise BadInput(f"Malformed box {text!r}.", f"Use {BOX_FORM}.")
    try:
        coords = [float(p) for p in parts]
    except ValueError:
        raise BadInput(f"Malformed box {text!r}: the coordinates must be numbers.",
                       f"Use {BOX_FORM}.") from None
    return Box(name, *coords)


@dataclass(frozen=True)
class Layout:
    """Checked boxes for one expanded prompt: one box per named concept at most."""
    boxes: tuple[Box, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.boxes)


def check_boxes(boxes: Iterable[Box | str], expanded: ExpandedPrompt,
                metas: Mapping[str, ConceptMeta] | None = None) -> Layout:
    """Boxes must name concepts of the prompt, each once. `metas`, every stored concept, make
    the hint for a box that names none exact."""
    parsed = [b if isinstance(b, Box) else parse_box(b) for b in boxes]
    seen: set[str] = set()
    for box in parsed:
        if box.name not in expanded.names:
            near = [n for n in expanded.names if n.lower() == box.name.lower()]
            of_class = [n for n in expanded.names if metas and n in metas
                        and metas[n].class_word.lower() == box.name.lower()]
            if near:
                hint = f"Did you mean --box {near[0]}=...? Names are case-sensitive."
            elif of_class:   # "--box star=..." for <rex>, a star: the prompt's star is <rex>
                hint = (f"'{box.name}' is the class of <{of_class[0]}>: give its box as "
                        f"--box {of_class[0]}=...")
            elif re.search(rf"\b{re.escape(box.name)}\b", expanded.text, re.IGNORECASE):
                # "--box grass=..." for "on the grass": boxes place concepts, not words
                hint = (f"'{box.name}' is a plain word of the prompt; boxes place concepts "
                        f"(<name>, learned with `cones add`): drop this box.")
            elif metas is not None and box.name not in metas:
                hint = "No concept has this name (`cones list` shows the names): drop its box."
            else:
                hint = "Name the concept in the prompt as <" + box.name + ">, or drop its box."
            raise BadInput(f"There is a box for <{box.name}>, which is not in the prompt.", hint)
        if box.name in seen:
            raise BadInput(f"Two boxes for <{box.name}>.", "Give one box per concept.")
        seen.add(box.name)
    return Layout(tuple(parsed))
