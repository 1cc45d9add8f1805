"""Photos as phones and editors write them: 16-bit greyscale PNGs and EXIF-rotated JPEGs load as
they look, and caption sidecars in UTF-16 are read while other non-UTF-8 text is refused."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cns_daemon.api.errors import BadInput
from cns_daemon.archive import sidecar_caption
from cns_daemon.methods.data import load_photo


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
