"""A generation's files: each image a PNG that keeps what was asked (its text) and its own seed,
and a contact sheet of them all, written whole or not at all."""
from __future__ import annotations

import shutil
from pathlib import Path

from cns_daemon.api.errors import Internal, Storage
from cns_daemon.api.protocol import GenerateRequest, JobResult

PARTIAL_PREFIX = ".partial-"   # an output folder being written (save_images)


def seeds_text(seed: int | None, n: int) -> str:
    """Image k of a request is drawn from seed + k: "seed 7", or "seeds 7-10" for four."""
    return f"seed {seed}" if n == 1 or seed is None else f"seeds {seed}-{seed + n - 1}"


def generation_caption(req: GenerateRequest, size: tuple[int, int] | None = None,
                       steps: int | None = None, cfg: float | None = None) -> str:
    """The contact sheet's caption line: what was asked, enough to draw it again, defaults
    included (the model's recommended CFG and steps change with the model): `size`, the images'
    width and height; `steps` and `cfg`, as generated. Without them, what the request set."""
    from cns_daemon.prompts import parse_box, referenced_names

    names = ", ".join(f"<{n}>" for n in referenced_names(req.prompt)) or "none"
    parts = [req.prompt, seeds_text(req.seed, req.n), f"concepts {names}"]
    if req.boxes:   # as read (" rex =1e-1,..." and "<rex>=..." are one box)
        boxes = [parse_box(b) for b in req.boxes]
        parts.append("boxes " + "; ".join(f"{b.name}={b.x0:g},{b.y0:g},{b.x1:g},{b.y1:g}" for b in boxes))
    if req.negative_prompt:
        parts.append(f"not {req.negative_prompt}")
    cfg = req.guidance_scale if cfg is None else cfg
    if cfg is not None:
        parts.append(f"CFG {cfg:g}")
    if steps is not None:
        parts.append(f"{steps} steps")
    if size or req.width or req.height:
        width, height = size or (req.width, req.height)
        parts.append(f"size {width or 'native'}x{height or 'native'}")
    return " · ".join(parts)


def png_text(caption: str, seed: int | None = None):
    """What was asked, kept in the PNG itself (an image viewer's "description"): whole, in any
    script, where the sheet's drawn caption has only the letters its font holds; and the
    image's own seed, to draw it again with `--seed N -n 1`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if caption:
        info.add_itxt("Description", caption)
    if seed is not None:
        info.add_itxt("Seed", str(seed))
    return info


# What a generate writes, at most: its PNGs (a toy-world one took 0.60-0.98 of its raw pixels,
# the smaller the closer to all of them) and the contact sheet, whose tiles scale small images up
# (a 32 px image's sheet took three times the image). Counted as raw pixels, with room for the
# store's own pages: a disk with less free than that cannot hold them, so a generate says so
# before it draws (it drew every step, minutes on SD, then failed; the count was 8-17 times short).
SPARE_BYTES = 1 << 20


def check_room(outputs: Path, n: int, height: int, width: int) -> None:
    """Storage error when the disk of `outputs` cannot hold `n` images of that size and their
    contact sheet."""
    from cns_daemon.sheet import tile_pixels

    need = 3 * (n * height * width + tile_pixels(n, width, height)) + SPARE_BYTES
    probe = outputs if outputs.exists() else outputs.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return   # not measurable here: saving says what goes wrong
    if free < need:
        raise Storage(f"The disk of {outputs} has {_size(free)} free; {n} image{'s' * (n > 1)} of "
                      f"{width}x{height} and their contact sheet need about {_size(need)}.",
                      f"Free some space there (generated images stay in {outputs} until you delete them).")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def save_images(images, out_dir: Path, caption: str = "", labels: list[str] | None = None,
                seed: int | None = None) -> JobResult:
    """PNG per image plus a contact sheet of all of them (cns_daemon.sheet), written into a
    hidden folder beside `out_dir` and renamed to it when whole: a full disk or a process
    killed half-way leaves no folder of half the images (Service.sweep removes what a killed
    one left)."""
    from cns_daemon.sheet import contact_sheet

    if not images:
        raise Internal("The generation returned no images.")
    partial = out_dir.with_name(PARTIAL_PREFIX + out_dir.name)
    names = [f"{i:02d}.png" for i in range(len(images))]
    try:
        partial.mkdir(parents=True, exist_ok=True)
        for i, (name, img) in enumerate(zip(names, images)):
            img.save(partial / name, pnginfo=png_text(caption, None if seed is None else seed + i))
        contact_sheet(images, caption, labels).save(partial / "contact-sheet.png", pnginfo=png_text(caption))
        partial.rename(out_dir)
    except OSError as exc:   # a full disk: no cut images left behind (the folder is this job's own)
        shutil.rmtree(partial, ignore_errors=True)
        # "no space left" names no file, and a file in the hidden folder means nothing to a
        # person: the folder it was for is named
        if not exc.filename or Path(exc.filename) == partial or partial in Path(exc.filename).parents:
            exc.filename = str(out_dir.parent)
        raise
    return JobResult(images=[str(out_dir / n) for n in names],
                     contact_sheet=str(out_dir / "contact-sheet.png"), seed=seed)
