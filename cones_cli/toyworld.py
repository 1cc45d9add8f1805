"""`cones toyworld ...`: local tools for the synthetic world (no service needed).

`render` needs only numpy + PIL; `probe` loads the small torch classifier lazily inside the
command, so importing the CLI never imports torch.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List, Optional

import typer

from cones_cli.views import handled, output_folder, write_files
from cns_daemon.api.errors import BadInput
from cns_daemon.api.protocol import MAX_SEED

toyworld_app = typer.Typer(help="The toy world: render synthetic photos, read them with the probe.",
                           no_args_is_help=True)


@toyworld_app.command()
@handled
def render(shape: str = typer.Option(..., help="circle | square | triangle | star | ring | cross"),
           color: str = typer.Option(..., help="red | orange | yellow | green | blue | purple | pink | black"),
           pattern: str = typer.Option("solid", help="solid | stripes | dots | checks"),
           second_color: Optional[str] = typer.Option(None, help="The pattern's colour (not for solid)."),
           tilt: Optional[str] = typer.Option(
               None, help="How the pattern lies: straight | diagonal (default straight; not for solid). "
                          "No caption ever names it."),
           background: Optional[str] = typer.Option(
               None, help="white | grass | sand | sky | snow (default: varies per photo)"),
           # photo i of seed s is drawn with s*1000+i: more than 1,000 would repeat seed s+1's
           n: int = typer.Option(4, "-n", min=1, max=1000, help="How many photos (1-1000)."),
           seed: int = typer.Option(0, min=0, max=MAX_SEED, help=f"Same seed, same photos (0 to {MAX_SEED})."),
           out: Path = typer.Option(..., "-o", "--out", help="Folder for NNN.png + NNN.txt (caption)."),
           force: bool = typer.Option(False, "--force", help="Replace the photos a folder already holds.")) -> None:
    """Write photos of one object (a 'personal concept') with sidecar captions.

    The captions describe it as a captioning model would (shape, colours, pattern, background; never the tilt)."""
    from cns_daemon.toyworld.world import ObjectSpec, render_concept_photos

    if background is not None and not background.strip():
        raise BadInput("--background is blank.", "Name one (white, grass, sand, sky, snow), or leave it "
                       "out for backgrounds that vary per photo.")
    try:
        obj = ObjectSpec(shape, color, pattern, second_color, tilt)
        photos = render_concept_photos(obj, n, seed, background=background)
    except ValueError as exc:
        raise BadInput(f"{exc}.", "See `cones toyworld render --help` for the choices.") from None
    out = out.expanduser()   # `--out=~/x`: no shell expands that `~`
    if out.is_dir() and any(out.glob("*.png")) and not force:
        # The folder is what `cones add` or the inbox learns from: photos of another object (or
        # of the same one, partly replaced) would make one mixed training set.
        raise BadInput(f"{out} already holds photos.", "Give -o a new folder, or add --force to write into it.")
    made = output_folder(out, "photos")
    for old in out.glob("*.png"):   # --force: this run's photos replace the folder's, all of them
        old.unlink()
        old.with_suffix(".txt").unlink(missing_ok=True)
    def files():
        for i, (image, text) in enumerate(photos):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            yield out / f"{i:03d}.png", buffer.getvalue(), 0o666
            yield out / f"{i:03d}.txt", (text + "\n").encode(), 0o666

    # all or none: a full disk must not leave a cut photo or an empty caption
    write_files(files(), "Give -o a folder you can write to, on a disk with room.", made)
    typer.echo(f"wrote {len(photos)} photos to {out}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@toyworld_app.command()
@handled
def probe(images: List[Path] = typer.Argument(..., help="PNG/JPEG files of the toy world, or folders of them."),
          halves: bool = typer.Option(False, "--halves", help="Two-object images: read left and right halves."),
          as_json: bool = typer.Option(False, "--json", help="Print one machine-readable JSON document.")) -> None:
    """Read shape, colour, pattern, second colour, tilt and background from images."""
    from dataclasses import asdict

    from PIL import Image, UnidentifiedImageError

    from cns_daemon.toyworld.probe import Probe

    # A folder stands for its images (what `toyworld render -o` and `generate -o` write).
    images = [p for path in images
              for p in (sorted(q for q in path.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES
                               and not q.stem.endswith("contact-sheet"))   # generate -o's sheets
                        if path.is_dir() else [path])]
    if not images:
        raise BadInput("No images in the folders given.", f"Pass images ({', '.join(sorted(IMAGE_SUFFIXES))}), "
                       "or folders that hold them.")
    loaded = []
    for path in images:
        if not path.is_file():
            raise BadInput(f"No image at {path}.", "Check the path.")   # a missing input, as in add
        try:
            with Image.open(path) as im:
                loaded.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInput(f"{path} is not a readable image ({exc}).",
                           f"Pass images ({', '.join(sorted(IMAGE_SUFFIXES))}).") from None
    reader = Probe.load()
    if halves:
        rows = [{"image": str(p), "left": asdict(lft), "right": asdict(rgt)}
                for p, (lft, rgt) in zip(images, reader.read_halves(loaded))]
    else:
        rows = [{"image": str(p), **asdict(a)} for p, a in zip(images, reader.read(loaded))]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))   # as every other --json
        return
    for row in rows:
        parts = [("left", row["left"]), ("right", row["right"])] if halves else [("", row)]
        text = "; ".join(f"{label + ': ' if label else ''}{_describe(a)}" for label, a in parts)
        typer.echo(f"{row['image']}: {text}")


def _describe(a: dict) -> str:
    from cns_daemon.sheet import describe_reading   # the contact sheets' words for a reading

    return describe_reading(a)
