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


def test_a_32_bit_float_greyscale_tiff_keeps_its_tones(tmp_path):
    """A review's find: mode F (0-1 floats) was truncated to black, and several such photos were
    refused as copies of one another."""
    values = np.full((64, 64), 0.25, dtype=np.float32)
    values[:, 32:] = 0.75
    path = tmp_path / "f32.tif"
    Image.fromarray(values, "F").save(path)
    assert Image.open(path).mode == "F"
    rgb = np.asarray(load_photo(path))
    assert abs(rgb[:, :32].mean() - 0.25 * 255) < 1 and abs(rgb[:, 32:].mean() - 0.75 * 255) < 1


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

    from cones_cli.views import write_file
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
    from cones_store.store import ConceptStore

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
        from cns_daemon.methods.cns import CNSParams as Params

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


def _checked(data: bytes, name: str = "p.png"):
    from cns_daemon.archive import check_photo

    return check_photo(name, data)


def test_photos_as_phones_and_editors_write_them(tmp_path):
    """MPO (a JPEG with a preview after it) is a JPEG; a nearly black 16-bit image stays dark;
    transparent parts come out white, not the colour they hide, and a photo with nothing opaque
    is refused; an EXIF block PIL cannot parse
    leaves the photo as stored instead of failing the request."""
    from cns_daemon.archive import CheckedPhoto

    base = Image.new("RGB", (64, 64), (40, 160, 40))
    mpo = _encoded(base, "MPO", save_all=True, append_images=[base.resize((32, 32))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    checked = _checked(mpo, "phone.jpg")
    assert isinstance(checked, CheckedPhoto) and checked.suffix == ".jpg"
    (tmp_path / "phone.jpg").write_bytes(mpo)
    assert load_photo(tmp_path / "phone.jpg").size == (64, 64)

    dark = np.full((64, 64), 195, dtype=np.uint16)   # of 65535: all but black
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert np.asarray(load_photo(tmp_path / "dark.png")).max() <= 1

    cut = np.zeros((64, 64, 4), dtype=np.uint8)
    cut[..., :3] = (40, 160, 40)                      # grass under the cut-away part
    cut[16:48, 16:48] = (200, 20, 20, 255)            # the object, opaque
    Image.fromarray(cut, "RGBA").save(tmp_path / "cut.png")
    rgb = np.asarray(load_photo(tmp_path / "cut.png"))
    assert (rgb[0, 0] == 255).all() and tuple(rgb[32, 32]) == (200, 20, 20)
    palette = Image.fromarray(cut, "RGBA").convert("P")   # a transparent palette index
    palette.info["transparency"] = palette.getpixel((0, 0))
    palette.save(tmp_path / "cut_p.png", transparency=palette.getpixel((0, 0)))
    assert (np.asarray(load_photo(tmp_path / "cut_p.png"))[0, 0] == 255).all()
    assert isinstance(_checked((tmp_path / "cut.png").read_bytes(), "cut.png"), CheckedPhoto)
    cut[..., 3] = 0                                   # the layer exported without its object
    gone = _checked(_encoded(Image.fromarray(cut, "RGBA"), "PNG"), "layer.png")
    assert not isinstance(gone, CheckedPhoto) and "fully transparent" in gone.reason

    import struct

    from PIL import ImageOps

    def unparsable(img, *a, **k):   # what PIL does with some cameras' maker data (struct.error)
        raise struct.error("required argument is not an integer")

    exif = base.getexif()
    exif[0x0112] = 6
    (tmp_path / "odd.jpg").write_bytes(_encoded(base, "JPEG", exif=exif))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ImageOps, "exif_transpose", unparsable)
        assert isinstance(_checked((tmp_path / "odd.jpg").read_bytes(), "odd.jpg"), CheckedPhoto)
        assert load_photo(tmp_path / "odd.jpg").size == (64, 64)   # as stored


def _bytes_read_from(path, call, monkeypatch):
    """(call(), the bytes read from `path` meanwhile, by any open() of it)."""
    import builtins

    real_open, total = builtins.open, [0]

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, *a):
            data = self._f.read(*a)
            total[0] += len(data)
            return data

        def readinto(self, b):
            n = self._f.readinto(b)
            total[0] += n or 0
            return n

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def counting_open(file, *a, **kw):
        f = real_open(file, *a, **kw)
        return Counting(f) if str(file) == str(path) else f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", counting_open)
        return call(), total[0]


def test_files_that_are_no_usable_photo_say_why(tmp_path, monkeypatch):
    """A PNG whose checksum is wrong is refused when it is given (it failed the learn later,
    named by its archive hash); a HEIC photo is named as one; a strip is refused; a video is
    skipped without being read whole."""
    import struct
    import zlib

    from cns_daemon.archive import SkippedFile, sniff

    png = bytearray(_encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG"))
    idat = png.find(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    crc_at = idat + 4 + length
    assert struct.unpack(">I", png[crc_at:crc_at + 4])[0] == zlib.crc32(png[idat:crc_at])
    png[crc_at] ^= 0xFF
    skipped = _checked(bytes(png), "crc.png")
    assert isinstance(skipped, SkippedFile) and "damaged" in skipped.reason and skipped.file == "crc.png"

    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    reason = _checked(heic, "IMG_0001.HEIC").reason
    assert "HEIC" in reason and "JPEG" in reason
    assert "AVIF" in _checked(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 64, "a.avif").reason

    # one byte of a TIFF's header changed (a review's fuzzing): PIL's load() raises TypeError,
    # not OSError; skipped as damaged, where it failed the request as a bug in cones
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tiff = bytearray(_encoded(Image.fromarray(pixels), "TIFF"))
    tiff[72] = 5
    skipped = _checked(bytes(tiff), "scan.tif")
    assert isinstance(skipped, SkippedFile) and "damaged" in skipped.reason, skipped

    strip = _checked(_encoded(Image.new("RGB", (400, 40)), "PNG"), "strip.png")
    assert isinstance(strip, SkippedFile) and "too wide (400x40" in strip.reason
    assert not isinstance(_checked(_encoded(Image.new("RGB", (96, 32)), "PNG")), SkippedFile)

    video = tmp_path / "IMG_0002.MOV"
    video.write_bytes(b"\x00\x00\x00\x14ftypqt  " + b"\x00" * 2**20)
    read = _bytes_read_from(video, lambda: sniff(video), monkeypatch)
    assert read[0].reason == "not an image" and 0 < read[1] <= 4096   # of 1 MiB
    (tmp_path / "photo.png").write_bytes(_encoded(Image.new("RGB", (64, 64)), "PNG"))
    assert sniff(tmp_path / "photo.png") is None


def test_a_full_disk_names_the_folder_it_could_not_write(tmp_path, monkeypatch):
    """ENOSPC from a write carries no file name: the archive's writes and the output folder's
    say which folder it was ("A file operation failed" said nothing of where)."""
    import builtins
    import errno

    from cns_daemon.api.errors import storage_error
    from cns_daemon.archive import atomic_write
    from cns_daemon.outputs import save_images

    real_open = builtins.open

    def full_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        if "w" in str(mode):
            def no_room(*_a, **_k):
                raise OSError(errno.ENOSPC, "No space left on device")
            fh.write = no_room
        return fh

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "archive" / "ab" / "photo.png", b"x")
    assert storage_error(info.value).message == f"Cannot use {tmp_path / 'archive' / 'ab'}: No space left on device."
    monkeypatch.undo()

    def no_room_png(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_room_png)
    with pytest.raises(OSError) as info:
        save_images([Image.new("RGB", (8, 8))], tmp_path / "outputs" / "job")
    assert str(tmp_path / "outputs") in storage_error(info.value).message
    assert not list((tmp_path / "outputs").iterdir())   # nothing half-written left


def test_a_photo_declared_far_past_the_pixel_limit_is_called_too_large_not_damaged():
    """PIL refuses a header of 100,000 x 100,000 pixels on opening (a decompression bomb); the
    skip said "damaged or truncated image", which sends a person looking for a broken file."""
    import struct
    import zlib

    from cns_daemon.archive import check_photo

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    skipped = check_photo("bomb.png", bomb)
    assert skipped.reason == "too large (10,000 megapixels; at most 50 megapixels)"


def test_a_generate_is_told_of_a_full_disk_before_it_draws_and_of_the_folder_not_a_hidden_one(
        tmp_path, monkeypatch):
    """From a scale review: a generate on a full disk drew all its steps and only then failed to
    write; and where the outputs folder could not be written, the error named the hidden
    folder the images are first written to."""
    import errno
    import shutil
    from collections import namedtuple

    from cns_daemon.api.errors import Storage, storage_error
    from cns_daemon.outputs import check_room, save_images

    outputs = tmp_path / "outputs"
    usage = namedtuple("usage", "total used free")
    free = [2_000_000]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - free[0], free[0]))
    check_room(outputs, 4, 64, 64)   # 1.9 MB of 2 MB: the images, their sheet's 256 px tiles, a spare MB
    with pytest.raises(Storage, match=r"has 2.0 MB free; 4 images of 512x512 and their contact sheet "
                                      r"need about 7.3 MB"):
        check_room(outputs, 4, 512, 512)
    # (a review's find: the count left the sheet out, 8-17 times short, and read "0.0 MB" near empty)
    free[0] = 500_000
    with pytest.raises(Storage, match=r"has 500 KB free; 1 image of 32x32 and their contact sheet need about 1.2 MB"):
        check_room(outputs, 1, 32, 32)
    monkeypatch.undo()

    real_mkdir = type(outputs).mkdir

    def read_only(self, *a, **k):
        if self.parent == outputs:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    outputs.mkdir()
    monkeypatch.setattr(type(outputs), "mkdir", read_only)
    with pytest.raises(OSError) as info:
        save_images([Image.new("RGB", (8, 8))], outputs / "job")
    assert storage_error(info.value).message == f"Cannot use {outputs}: Read-only file system."


def test_a_format_cones_does_not_take_is_refused_before_it_is_decoded(monkeypatch):
    """A review's find: any format PIL knows was decoded before its format was checked, an EPS
    through Ghostscript where it is installed (a file in a folder from someone else)."""
    import io

    from PIL import EpsImagePlugin, Image

    from cns_daemon.archive import check_photo

    def decoded(self, *a, **kw):
        raise AssertionError("an EPS was decoded")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", decoded)
    data = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(data, "EPS")
    assert check_photo("x.eps", data.getvalue()).reason == "unsupported image format EPS"
    data = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(data, "JPEG")   # MPO's decoder reads JPEGs: still taken
    assert check_photo("x.jpg", data.getvalue()).suffix == ".jpg"
