"""Photos as phones and editors write them: 16-bit greyscale PNGs and EXIF-rotated JPEGs load as
they look, caption sidecars in UTF-16 are read while other non-UTF-8 text is refused, and a
picture given twice (a phone's original and a resized or re-saved copy) counts once."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cns_daemon.api.errors import BadInput
from cns_daemon.archive import sidecar_caption
from cns_daemon.methods.data import load_photo
from cns_daemon.toyworld.world import ObjectSpec

STAR = ObjectSpec("star", "red", "stripes", "yellow", "diagonal")


def test_a_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    values = np.full((64, 64), 30000, dtype=np.uint16)
    values[:, 32:] = 60000
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_photo(path))
    assert rgb.shape == (64, 64, 3)
    assert abs(rgb[:, :32].mean() - 30000 / 257) < 1 and abs(rgb[:, 32:].mean() - 60000 / 257) < 1


def test_the_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((96, 128, 3), dtype=np.uint8)
    pixels[:, :64] = 255           # left half white as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6               # "rotate 90° clockwise to show"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    shown = load_photo(path)
    assert shown.size == (96, 128)  # upright: taller than wide
    top = np.asarray(shown)[:64].mean()
    assert top > 200               # the stored left half is on top once turned


def test_caption_encodings(tmp_path):
    photo = tmp_path / "a.png"
    (tmp_path / "a.txt").write_bytes("a photo of a dog at the café".encode("utf-16"))
    assert sidecar_caption(photo) == "a photo of a dog at the café"
    (tmp_path / "a.txt").write_bytes("\ufeffa dog in the snow\n".encode("utf-8"))
    assert sidecar_caption(photo) == "a dog in the snow"
    (tmp_path / "a.txt").write_bytes("a dog at the café".encode("latin-1"))
    with pytest.raises(BadInput, match="a.txt is not UTF-8"):
        sidecar_caption(photo)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_the_same_picture_saved_again_or_resized_counts_once():
    from cns_daemon.archive import check_photos
    from cns_daemon.toyworld.world import render_concept_photos

    a, b = (im.resize((384, 384), Image.Resampling.BICUBIC)
            for im, _ in render_concept_photos(STAR, 2, seed=1, background="grass"))
    phone = _encoded(a, "PNG")
    sent = _encoded(a.resize((200, 200), Image.Resampling.BICUBIC), "JPEG", quality=70)
    turned = a.rotate(90, expand=True)        # stored on its side, with the tag that turns it back
    exif = turned.getexif()
    exif[0x0112] = 6
    good, skipped = check_photos([("IMG_1.png", phone, None), ("chat.jpg", sent, "a caption"),
                                  ("IMG_1-side.jpg", _encoded(turned, "JPEG", exif=exif), None),
                                  ("IMG_2.png", _encoded(b, "PNG"), None)])
    assert [p.filename for p in good] == ["IMG_1.png", "IMG_2.png"]
    assert [(s.file, s.reason) for s in skipped] == [
        ("chat.jpg", "the same picture as IMG_1.png (saved again or resized)"),
        ("IMG_1-side.jpg", "the same picture as IMG_1.png (saved again or resized)")]


def test_different_pictures_are_kept_even_when_alike():
    from cns_daemon.archive import check_photos
    from cns_daemon.toyworld.world import render_concept_photos

    # one object's photos on one ground: as alike as a concept's photos come
    photos = [_encoded(im, "PNG") for im, _ in render_concept_photos(STAR, 5, seed=2, background="sky")]
    grey = []
    for level in (30000, 33000):   # 16-bit greyscale, which PIL would clip to white
        values = np.full((64, 64), level, dtype=np.uint16)
        values[:, 32:] = 60000
        grey.append(_encoded(Image.fromarray(values), "PNG"))
    table = []   # a small object on a plain table, moved or recoloured between photos
    for (x, y), colour in (((100, 100), (200, 30, 30)), ((600, 500), (200, 30, 30)), ((100, 100), (30, 30, 200))):
        pixels = np.full((900, 1200, 3), (180, 160, 140), np.uint8)
        pixels[y:y + 90, x:x + 90] = colour
        table.append(_encoded(Image.fromarray(pixels), "JPEG", quality=90))
    good, skipped = check_photos([(f"{i}.png", d, None) for i, d in enumerate(photos + grey + table)])
    assert len(good) == 10 and skipped == []


def test_one_photo_archived_by_many_requests_at_once(tmp_path):
    """Requests run in threads of one process: each write has its own temporary file."""
    from concurrent.futures import ThreadPoolExecutor

    from cns_daemon.archive import Archive, check_photo

    archive = Archive(tmp_path / "archive")
    photos = [check_photo("a.png", _encoded(Image.new("RGB", (40, 40), (9, 9, 9)), "PNG"), f"caption {i % 2}")
              for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        digests = set(pool.map(archive.put, photos))
    assert len(digests) == 1
    assert not [p for p in (tmp_path / "archive").rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_is_a_storage_error_and_leaves_the_earlier_file(tmp_path, monkeypatch):
    import errno
    import os

    from cli.views import write_file
    from cns_daemon.api.errors import EXIT_CODES, ErrorCode, Storage, storage_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert isinstance(storage_error(full), Storage) and EXIT_CODES[ErrorCode.STORAGE] == 12
    assert "No space left" in storage_error(full).message
    assert storage_error(FileNotFoundError(errno.ENOENT, "gone")) is None
    target = tmp_path / "rex.safetensors"
    target.write_bytes(b"the earlier export")

    def no_room(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", no_room)
    with pytest.raises(Storage, match="Cannot write"):
        write_file(target, b"a new export")
    assert target.read_bytes() == b"the earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["rex.safetensors"]   # no temporary file left


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "I;16")])
def test_a_large_photo_is_kept_at_a_trainable_size(tmp_path, fmt, mode):
    """A learn holds every photo for its whole run: a 50-megapixel photo must not stay at
    150 MB when training crops 512 px at most."""
    from cns_daemon.methods.data import KEEP_SHORT_SIDE

    if mode == "I;16":
        values = np.full((2048, 3072), 30000, dtype=np.uint16)
        img = Image.fromarray(values)
    else:
        img = Image.new(mode, (3072, 2048), (200, 30, 30))
    path = tmp_path / f"big.{fmt.lower()}"
    img.save(path, format=fmt)
    shown = load_photo(path)
    assert shown.size == (KEEP_SHORT_SIDE * 3 // 2, KEEP_SHORT_SIDE)
    if mode == "I;16":
        assert abs(np.asarray(shown).mean() - 30000 / 257) < 1
    small = tmp_path / "small.png"
    Image.new("RGB", (640, 480), (1, 2, 3)).save(small)
    assert load_photo(small).size == (640, 480)   # smaller ones are left as they are


def test_a_learn_trains_on_the_captions_its_own_request_gave(tmp_path, monkeypatch, fresh_tiny_pipe):
    """The archive keeps one caption per picture: a later request with the same photo and
    another caption must not change what an earlier, still queued learn trains on."""
    from cns_daemon.api.errors import Cancelled
    from cns_daemon.api.protocol import LearnJob
    from cns_daemon.api.settings import load_settings
    from cns_daemon.archive import Archive, check_photo
    from cns_daemon.engine import Engine
    from cns_daemon.methods import CancelToken
    from store.store import ConceptStore

    archive = Archive(tmp_path / "archive")
    store = ConceptStore.open(tmp_path / "store")
    engine = Engine(load_settings(model="tiny"), store, archive)
    engine.attach(fresh_tiny_pipe)
    data = [_encoded(Image.new("RGB", (40, 40), (i * 90, 20, 20)), "PNG") for i in range(2)]
    digests = [archive.put(check_photo("a.png", data[0], "a dog on the beach")),
               archive.put(check_photo("b.png", data[1]))]
    archive.put(check_photo("c.png", data[0], "a dog in the snow"))   # a later request's caption
    seen = {}

    class Capture:
        def learn(self, pipe, photos, spec, progress, cancel, previous=None):
            seen["captions"] = spec.captions
            raise Cancelled("seen")

    monkeypatch.setattr("cns_daemon.methods.get_method", lambda name: Capture())
    job = LearnJob(name="rex", class_word="dog", method="cns", photo_digests=digests,
                   photo_names=["a.png", "b.png"], photo_captions=["a dog on the beach", None])
    with pytest.raises(Cancelled):
        engine.learn(job, None, CancelToken())
    assert seen["captions"] == ["a dog on the beach", None]
    store.close()
