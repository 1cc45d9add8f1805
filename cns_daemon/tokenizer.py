"""The real CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.

The gzipped merge list in assets/ is the one CLIP was trained with; from it we derive the
`vocab.json` / `merges.txt` pair that transformers' CLIPTokenizer reads, once per process, in a
cache folder. No hub access is ever needed.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BPE_FILE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges: 256*2 + merges + 2 specials = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable-character table."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def write_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json + merges.txt (+ the special-token config) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:N_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


@functools.lru_cache(maxsize=1)
def tokenizer_folder() -> Path:
    """The tokenizer's files, written once per user and vocabulary into the temporary folder.
    Only a folder of this user's that no one else may write to is read back: another local
    user could otherwise make it first, with a vocabulary of theirs (a review's find); then
    this process writes its own private copy."""
    digest = hashlib.sha256(BPE_FILE.read_bytes()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"cones-clip-tokenizer-{os.getuid()}-{digest}"
    if _written_by_us(folder):
        return folder
    tmp = write_tokenizer_files(Path(tempfile.mkdtemp(prefix="cones-tok-")))   # 0700
    try:
        tmp.rename(folder)
    except OSError:  # there already: another process of ours won the race, or it is not ours
        if _written_by_us(folder):
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        return tmp
    return folder


def _written_by_us(folder: Path) -> bool:
    """A folder of this user's, no one else may write to, holding the files."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
            and (folder / "tokenizer_config.json").exists())


def clip_tokenizer(max_length: int = 77):
    """A fresh CLIPTokenizer (each pipeline gets its own: concepts add tokens to it)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_folder()), local_files_only=True)
    tok.model_max_length = max_length
    return tok
