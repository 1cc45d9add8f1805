"""The photo archive: every photo a concept was learned from, stored by content (sha256).

Photos arrive from `cones add` (bytes in the request) or the inbox (files). Each is checked
(opens as an image, not truncated, at least MIN_SIDE and at most MAX_SIDE pixels a side, at most
MAX_PIXELS pixels) before it is kept, so a job never starts on a file it cannot read. The size is
read from the header and checked before anything is decoded (a 656 KB PNG can declare
13,000 x 13,000 pixels: half a gigabyte once decoded), and JPEGs are decoded at a reduced scale
(`Image.draft`), which still reads every byte of the file. The same photo given twice (same
bytes, whatever the file name) counts once, and so does the same picture saved again or resized
(a phone's original and the copy a messaging app sent: their 16x16 thumbnails match). Writes go to a temporary name and are renamed into
place, so the archive never holds half a file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps, UnidentifiedImageError

from cns_daemon.api.errors import BadInput, NotFound
from cns_daemon.api.protocol import SkippedFile

MIN_SIDE = 32  # the smallest photo the methods train on (methods.data.MIN_SIDE; errors.BadPhoto says so)
MAX_SIDE = 8192
MAX_PIXELS = 50_000_000   # about 8192 x 6144; a 48 MP phone photo fits
# A file past this is not read at all (a 1.5 GB file that began as a PNG was read whole, and held
# twice, before it was found broken): a 48 MP photo is under 30 MB as JPEG, under 150 MB as PNG.
MAX_PHOTO_BYTES = 256 * 1024 * 1024
# One concept's photos together, as an inbox folder is read (all of them are held while checked):
# what `cones add` may send in one request by default (settings.max_request_bytes).
MAX_CONCEPT_BYTES = 256 * 1024 * 1024
# A caption is at most 1,000 characters (protocol.MAX_PROMPT_CHARS): room for UTF-16 and spaces
MAX_CAPTION_BYTES = 16 * 1024
CHECK_DECODE_SIDE = 1024  # JPEGs are decoded at the smallest DCT scale at least this large
# Two photos are one picture when their 16x16 RGB thumbnails differ by less than SAME_PICTURE on
# average and by less than SAME_PICTURE_MAX in every cell (0-255). Measured: distinct toy-world
# photos of one object differ by 6.9 on average at least (2,000 pairs) and 54 in some cell; a
# copy resized to 256 px and saved as JPEG by 2.3 and 29 at most; a 1200x900 photo saved again
# at half size as JPEG by 2.0 and 3. The cell bound keeps a small object moved or recoloured on a
# plain table (1.3 on average, 130 in its cells) a photo of its own.
SAME_PICTURE = 3.0
SAME_PICTURE_MAX = 40
THUMB_SIDE = 16
# MPO is a JPEG with extra pictures after the first (a phone's preview or depth map): PIL names
# it apart, and its first picture is the photo.
ACCEPTED_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "BMP": ".bmp",
                    "GIF": ".gif", "TIFF": ".tif"}
# A photo wider than this many times its height (or taller) is refused: the methods train on a
# centre square, which of a 4000 x 50 strip is 1 % of it.
MAX_ASPECT = 3.0
# Containers PIL cannot open, told by their header (ISO base media `ftyp` brands), so the reason
# says what the file is and what to do instead of "not an image".
HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
               b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


@dataclass(frozen=True)
class CheckedPhoto:
    filename: str
    data: bytes
    suffix: str
    caption: str | None = None  # its caption: the inbox sidecar photo.txt, or `Photo.caption`
    thumb: bytes = field(default=b"", repr=False, compare=False)   # THUMB_SIDE² RGB, upright


# A photo whose every pixel is at most this opaque (0-255) shows nothing once laid on white.
INVISIBLE_ALPHA = 8


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, 8 bits a channel, as an image viewer shows it. 16-bit greyscale (PNG, TIFF) opens as
    an integer mode whose values PIL's convert() clips at 255 (a white photo): scaled down
    instead; 32-bit float greyscale (TIFF's mode F), which convert() truncates (0-1 became
    black), is read as image editors do, 0-1 as black to white. Transparent pixels are laid on
    white (convert() keeps whatever colour they hide: a cut-out's removed background, or black)."""
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np   # here: the CLI imports this module and starts without numpy

        values = np.nan_to_num(np.asarray(img).astype(np.float64))
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        elif img.mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def upright(img: Image.Image) -> Image.Image:
    """The photo turned as its EXIF orientation tag says (a phone's "rotate"). A tag PIL cannot
    parse (malformed maker data, as some cameras write) leaves the photo as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:   # noqa: BLE001 - struct.error, KeyError, TypeError ... from EXIF parsing
        return img


def is_text(name: str) -> bool:
    """Whether a file name is UTF-8 text (os.fsdecode keeps other bytes as lone surrogates,
    which no text file, JSON document or request can hold)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown(name: str) -> str:
    """A file name as text, the bytes that are not UTF-8 shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def not_an_image(head: bytes) -> str:
    """Why a file PIL cannot open is skipped, from its first bytes."""
    brand = HEIF_BRANDS.get(head[8:12]) if head[4:8] == b"ftyp" else None
    if brand in ("HEIC", "HEIF"):
        return (f"a {brand} photo, which cones cannot read; export it as JPEG (on an iPhone: "
                "Settings > Camera > Formats > Most Compatible)")
    if brand:
        return f"unsupported image format {brand}; export it as JPEG or PNG"
    return "not an image"


def thumbnail(img: Image.Image) -> bytes:
    """The picture as the methods see it (upright, 8-bit RGB), shrunk to THUMB_SIDE² pixels."""
    upright_ = upright(img)
    if upright_.mode in ("1", "P"):   # PIL shrinks these by picking pixels, not averaging them
        upright_ = to_rgb(upright_)
    return to_rgb(upright_.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)).tobytes()


def same_picture(a: bytes, b: bytes) -> bool:
    import numpy as np

    diff = np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8))
    return bool(diff.mean() < SAME_PICTURE and diff.max() < SAME_PICTURE_MAX)


def caption_file(photo: Path, exclude: Iterable[str] = ()) -> Path | None:
    """The caption beside a photo: `IMG_1.jpg.txt`, else `IMG_1.txt` (or `.TXT`, as some cameras
    and Windows tools write); None when there is none. `exclude`: file names that are never a
    caption (the inbox's own notes: ERROR.png is not captioned by ERROR.txt)."""
    photo = Path(photo)
    for txt in (photo.with_name(photo.name + ".txt"), photo.with_suffix(".txt"), photo.with_suffix(".TXT")):
        if txt != photo and txt.name not in exclude and txt.is_file():
            return txt
    return None


def sidecar_caption(path: Path, exclude: Iterable[str] = ()) -> str | None:
    """The text of the caption beside `path` (`caption_file`), if present and not empty, its
    whitespace collapsed (the inbox, `cones add` and the methods read captions the same way)."""
    txt = caption_file(path, exclude)
    if txt is None:
        return None
    # Its text goes into the concept and its exports: a link (in a folder unpacked from someone
    # else, to ~/.ssh/id_rsa) would carry whatever it points at there
    if txt.is_symlink():
        raise BadInput(f"The caption {txt.name} is a link (to {os.readlink(txt)}); cones reads a caption "
                       "only from a file of its own beside the photo, as its text goes into the concept "
                       "and its exports.", "Put a copy of the caption there instead of the link.")
    if (size := txt.stat().st_size) > MAX_CAPTION_BYTES:
        raise BadInput(f"The caption {txt.name} is {size:,} bytes, over the {MAX_CAPTION_BYTES:,} a caption "
                       "may have.", "Shorten it: a sentence saying what the photo shows.")
    return " ".join(read_text(txt, f"The caption {txt.name}").split()) or None


def read_text(path: Path, what: str) -> str:
    """A text file a person wrote (a caption, a prompt list), or BadInput saying why it cannot
    be read. UTF-16 with its byte-order mark is what Windows Notepad saves as "Unicode"; UTF-8
    (with or without a mark) is everyone else's. Anything else is refused rather than garbled."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise   # gone while it was read: the inbox looks again at its next scan
    except OSError as exc:
        raise BadInput(f"{what} cannot be read: {exc.strerror or exc}.",
                       "Check that it is a file you may read.") from None
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding).strip()
    except UnicodeDecodeError:
        text = "\0"
    # NUL is no character of text: UTF-16 without its mark decodes as UTF-8 with one between
    # every letter ("a\0 \0p\0h\0o\0..."), and was learned from as the caption
    if "\0" in text:
        raise BadInput(f"{what} is not UTF-8 text.",
                       "Save it as UTF-8 (or UTF-16 with a byte-order mark), or remove it.") from None
    return text


def check_photo(filename: str, data: bytes, caption: str | None = None) -> CheckedPhoto | SkippedFile:
    """Decode the whole image once; return it checked (with its caption), or why it is skipped."""
    if not data:
        return SkippedFile(file=filename, reason="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning etc.
            # Only the accepted formats' decoders: another PIL knows (EPS, PDF) is refused before
            # a byte is decoded (EPS through Ghostscript, where it is installed)
            with Image.open(io.BytesIO(data), formats=_decoders()) as img:
                img.verify()   # checksums (a PNG's), as the learn will
            with Image.open(io.BytesIO(data), formats=_decoders()) as img:   # the header only
                fmt = img.format or ""
                width, height = img.size
                if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
                    return SkippedFile(file=filename, reason=(
                        f"too large ({width}x{height}; at most {MAX_SIDE} pixels a side and "
                        f"{MAX_PIXELS // 1_000_000} megapixels)"))
                img.draft(img.mode, (CHECK_DECODE_SIDE, CHECK_DECODE_SIDE))   # JPEG only
                img.load()  # decodes every byte: truncated files fail here
                thumb = thumbnail(img)
                invisible = has_alpha(img) and img.convert("RGBA").getchannel("A").getextrema()[1] <= INVISIBLE_ALPHA
    except UnidentifiedImageError:
        other = _other_format(data)
        return SkippedFile(file=filename, reason=f"unsupported image format {other}" if other else
                           not_an_image(data[:16]))
    except Image.DecompressionBombError as exc:   # declared far past MAX_PIXELS: refused on opening
        declared = re.search(r"\((\d+) pixels\)", str(exc))   # PIL's "Image size (N pixels) exceeds ..."
        size = f"{int(declared.group(1)) / 1e6:,.0f} megapixels" if declared else "far more pixels"
        return SkippedFile(file=filename, reason=(
            f"too large ({size}; at most {MAX_PIXELS // 1_000_000} megapixels)"))
    except Exception as exc:   # noqa: BLE001 - OSError mostly, but PIL's decoders raise others on
        # damaged files (a byte-flipped TIFF: TypeError from load()); a bad photo is skipped, not a 500
        said = str(exc)[:300] or type(exc).__name__   # (a reason is bounded: protocol.SkippedFile)
        return SkippedFile(file=filename, reason=f"damaged or truncated image ({said})")
    if fmt not in ACCEPTED_FORMATS:
        return SkippedFile(file=filename, reason=f"unsupported image format {fmt or 'unknown'}")
    if invisible:
        return SkippedFile(file=filename, reason=(
            "fully transparent (nothing shows once laid on white; export the layer with the object "
            "in it, or flatten the image)"))
    if min(width, height) < MIN_SIDE:
        return SkippedFile(file=filename,
                           reason=f"too small ({width}x{height}; at least {MIN_SIDE}x{MIN_SIDE})")
    if max(width, height) > MAX_ASPECT * min(width, height):
        return SkippedFile(file=filename, reason=(
            f"too {'wide' if width > height else 'tall'} ({width}x{height}; the methods learn a "
            f"centre square, so crop it around the object, at most {MAX_ASPECT:g} times as long as wide)"))
    return CheckedPhoto(filename, data, ACCEPTED_FORMATS[fmt], caption, thumb)


@functools.lru_cache(maxsize=1)
def _decoders() -> tuple[str, ...]:
    """PIL's names of the accepted formats' decoders (all registered first: MPO is not until
    then)."""
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def _other_format(data: bytes) -> str | None:
    """The format of an image PIL knows but cones does not take, read from its header alone
    (opening decodes nothing), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.format or None
    except Exception:   # noqa: BLE001 - no image, or a damaged header: not one PIL knows
        return None


def sniff(path: Path) -> SkippedFile | None:
    """Why a file is not read at all: its header is no image PIL opens (a phone's video, a
    document). Read before the whole file is: a 3 GB video in an inbox folder cost the service
    3 GB of memory to be told it is not a photo."""
    try:
        size = Path(path).stat().st_size
        if size == 0:
            return None   # check_photo says "empty file"
        if size > MAX_PHOTO_BYTES:
            return SkippedFile(file=shown(Path(path).name), reason=(
                f"{size / 2**20:,.0f} MiB, over the {MAX_PHOTO_BYTES >> 20} MiB cones reads of a photo: "
                "save it smaller (as JPEG)"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path):   # the header only
                return None
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            return SkippedFile(file=shown(Path(path).name), reason=not_an_image(f.read(16)))
    except Exception:   # noqa: BLE001 - an image with a problem (PIL raises more than OSError on
        return None      # a damaged header): check_photo reads it and says which


def byte_copies(files: list[tuple[str, bytes]]) -> list[SkippedFile | None]:
    """Per (file name, bytes), why it is skipped if its bytes repeat an earlier file's, else
    None (`cones add` drops such copies before sending; the service before checking)."""
    seen: dict[bytes, str] = {}   # sha256 -> the file name it came with first
    out: list[SkippedFile | None] = []
    for filename, data in files:
        key = hashlib.sha256(data).digest()
        out.append(SkippedFile(file=filename, reason=f"the same photo as {seen[key]}") if key in seen else None)
        seen.setdefault(key, filename)
    return out


def check_photos(items: list[tuple[str, bytes, str | None]]) -> tuple[list[CheckedPhoto], list[SkippedFile]]:
    """Each (file name, bytes, caption) checked once: a repeat of one already given (the same
    bytes, or the same picture saved again or resized) is skipped, so the first one's caption
    counts."""
    good: list[CheckedPhoto] = []
    skipped: list[SkippedFile] = []
    for (filename, data, caption), copy in zip(items, byte_copies([(f, d) for f, d, _ in items])):
        if copy is not None:
            skipped.append(copy)
            continue
        result = check_photo(filename, data, caption)
        twin = isinstance(result, CheckedPhoto) and next(
            (p for p in good if same_picture(p.thumb, result.thumb)), None)
        if twin:
            skipped.append(SkippedFile(file=filename, reason=(
                f"the same picture as {twin.filename} (saved again or resized)")))
            continue
        (good if isinstance(result, CheckedPhoto) else skipped).append(result)
    return good, skipped


def make_private(root: Path) -> None:
    """Folders 0700 and files 0600 from `root` down: the data folder holds photos of people.
    Links are left alone (chmod would follow them out of the data folder, or fail on a dangling
    one), as is whatever vanishes meanwhile."""
    for path, mode in [(root, 0o700)] + [
            (os.path.join(folder, n), 0o700 if n in dirs else 0o600)
            for folder, dirs, files in os.walk(root) for n in dirs + files]:
        if os.path.islink(path):
            continue
        try:
            os.chmod(path, mode)
        except FileNotFoundError:
            pass


class Archive:
    """Content-addressed files under `root`: <root>/<aa>/<sha256><suffix> (+ .txt caption)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, photo: CheckedPhoto) -> str:
        digest = hashlib.sha256(photo.data).hexdigest()
        target = self._dir(digest) / f"{digest}{photo.suffix}"
        if not target.exists():
            atomic_write(target, photo.data)
        caption = target.with_suffix(".txt")
        if photo.caption is not None and not (caption.is_file() and caption.read_bytes() == photo.caption.encode()):
            atomic_write(caption, photo.caption.encode())
        return digest

    def path(self, digest: str) -> Path:
        folder = self._dir(digest)
        if folder.is_dir():
            for p in folder.iterdir():
                if p.stem == digest and p.suffix != ".txt" and not p.name.startswith("."):
                    return p
        raise NotFound(f"Photo {digest[:12]}… is missing from the archive ({self.root}).",
                       "Add the concept again with its photos.")

    def digests(self) -> list[str]:
        """Every photo in the archive (its folders are the digests' first two hex digits; the
        inbox's leftovers live beside them and are not photos of it)."""
        hexdigits = set("0123456789abcdef")
        return sorted(p.stem for d in (self.root.iterdir() if self.root.is_dir() else [])
                      if d.is_dir() and len(d.name) == 2 and set(d.name) <= hexdigits
                      for p in d.iterdir()
                      if p.suffix != ".txt" and not p.name.startswith(".") and len(p.stem) == 64)

    def delete(self, digest: str) -> bool:
        """Remove a photo and its caption; True if a photo was there."""
        folder = self._dir(digest)
        found = False
        for p in list(folder.iterdir()) if folder.is_dir() else []:
            if p.stem == digest:
                found |= p.suffix != ".txt"
                p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):   # the last photo of its folder: the folder goes too
            folder.rmdir()
        return found

    def has(self, digest: str) -> bool:
        try:
            self.path(digest)
            return True
        except NotFound:
            return False

    def _dir(self, digest: str) -> Path:
        if not is_digest(digest):
            raise NotFound(f"{digest!r} is not a photo digest.")
        return self.root / digest[:2]


def is_digest(text: str) -> bool:
    """A photo's name in the archive: its SHA-256, 64 lower-case hex digits."""
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def atomic_write(target: Path, data: bytes, mode: int = 0o600) -> None:
    """All of `data` at `target` or nothing there (written beside it, renamed into place; a
    failed write leaves no temporary file). Photos of people are private: folders 0700, files
    `mode` 0600, whatever the umask."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One temporary name per write: requests archiving the same photo run in threads of one
    # process, and a name per process let one rename the other's file away.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)   # a full disk leaves no half file behind
        if isinstance(exc, OSError) and not exc.filename:   # "no space left" names no file
            exc.filename = str(target.parent)
        raise
