"""`cones generate` and `cones eval`: prompts in, images (copied to -o, all or none) or CLIP
scores out."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cones_cli.config import JSON
from cones_cli.session import client, request, wait_for
from cones_cli.views import (console, err_console, eval_table, handled, output_folder, print_json, remove_made,
                             write_files)
from cns_daemon.api.errors import BadInput, ConesError, NotFound, ProtocolMismatch
from cns_daemon.api.protocol import (MAX_GUIDANCE_SCALE, MAX_IMAGES, MAX_SEED, EvalRequest, GenerateRequest,
                                     check_segment)
from cns_daemon.archive import read_text


@handled
def generate(prompt: str = typer.Argument(..., help="Prompt; name concepts as <name>."),
             n: int = typer.Option(1, "-n", help=f"Number of images (1-{MAX_IMAGES})."),
             seed: Optional[int] = typer.Option(
                 None, help=f"Seed of the first image, 0 to {MAX_SEED}; image k is drawn from seed + k "
                 "(default: random)."),
             steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's, 30 unless its cones.json says; the toy world's 20). The model's scheduler sets the range: 2 to 999 for SD's."),
             box: List[str] = typer.Option([], "--box", help="NAME=x0,y0,x1,y1: fractions of the width and height, from the top-left corner (y runs down); repeatable."),
             negative: Optional[str] = typer.Option(None, "--negative", help="What to steer away from, in plain words."),
             guidance_scale: Optional[float] = typer.Option(
                 None, "--guidance-scale", "--cfg",
                 help=f"Classifier-free guidance, 1 to {MAX_GUIDANCE_SCALE:g} (default: the model's; 1 turns it off)."),
             width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the model's)."),
             height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the model's)."),
             out: Optional[Path] = typer.Option(None, "-o", "--out", help="Copy the PNGs into this folder, named JOBID-NN.png and JOBID-contact-sheet.png (earlier runs' files stay beside them; the printed paths are this run's)."),
             as_json: bool = JSON) -> None:
    """Generate images; writes PNGs and a contact sheet and prints their paths (the sheet last)."""
    # as a blank one is told by the service ("" failed as "prompt: empty", from the protocol)
    from cns_daemon.prompts import blank_negative, empty_prompt

    if not prompt.strip():
        raise empty_prompt()
    if negative is not None and not negative.strip():
        raise blank_negative()
    req = request(GenerateRequest, prompt=prompt, n=n, seed=seed, steps=steps, boxes=box,
                  negative_prompt=negative, guidance_scale=guidance_scale, width=width, height=height)
    if out is not None:
        out = out.expanduser().absolute()   # the paths printed (and in --json) work from anywhere
        if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not out.exists():
            raise BadInput(f"-o {out} names a file, but generate writes its images and a contact "
                           "sheet into a folder.", f"Give -o a folder, e.g. -o {out.with_suffix('')}/")
        made = output_folder(out, "images")   # before the job: a bad -o must not cost a generation
    with client() as c:
        left = f"; its images stay in the service's outputs, not copied to {out}" if out else ""
        try:
            job = wait_for(c, c.generate(req), quiet=as_json, tell_wait=not as_json, left_behind=left)
        except ConesError:
            if out is not None:   # made for this generate, and nothing came: not left empty
                remove_made(made)
            raise
    result = job.result
    if result is None:
        raise BadInput("The job finished without images.")
    if out is not None:
        job = _copy_out(job, out, made)
        result = job.result
    if as_json:
        print_json(job)
        return
    if result.seed is not None:
        seeds = f"seed {result.seed}" if len(result.images) == 1 else (
            f"seeds {result.seed}-{result.seed + len(result.images) - 1}, one per image in order")
        err_console.print(f"{seeds}; the contact sheet is the last line", highlight=False)
    for p in result.images:
        console.print(p, highlight=False, markup=False)   # a path, as written ("shots[red]/")
    if result.contact_sheet:   # last, alone on its line: `cones generate ... | tail -1` opens it
        console.print(result.contact_sheet, highlight=False, markup=False)


def _copy_out(job, out: Path, made: list[Path]):
    """The job's images and sheet copied into -o, all or none (and the folder made for them
    taken back): the job as the person's copies name it."""
    result = job.result
    try:   # the id names files in -o: one with "/" or ".." would put them elsewhere
        check_segment("id", job.id)
    except BadInput:
        raise ProtocolMismatch(f"The service answered with a job id that is none ({job.id[:40]!r}).") from None
    sources = [Path(p) for p in result.images + ([result.contact_sheet] if result.contact_sheet else [])]
    # Named after the job, so a second run into the same folder adds its images beside the
    # first's instead of replacing some of them under a contact sheet that no longer fits; as
    # private as the service keeps them.
    def read(p: Path) -> tuple[Path, bytes, int]:
        try:
            return out / f"{job.id}-{p.name}", p.read_bytes(), p.stat().st_mode & 0o777
        except OSError as exc:   # removed or unreadable meanwhile: none is copied
            raise NotFound(f"Cannot read the service's {p}: {exc.strerror or exc}; nothing was "
                           f"copied to {out}.", "Generate again.") from None

    copied = [str(p) for p in write_files(
        (read(p) for p in sources),
        f"The images are in {sources[0].parent if sources else 'the service'}; free space or give -o "
        "a writable folder.",
        made)]
    sheet = copied.pop() if result.contact_sheet else None
    return job.model_copy(update={"result": result.model_copy(update={"images": copied, "contact_sheet": sheet})})


@handled
def eval_(names: List[str] = typer.Argument(..., help="Concepts to score (all of them in every prompt)."),
          prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file, one a line; `{}` marks the concepts (default: the shipped list)."),
          n: int = typer.Option(4, "-n", help=f"Images per prompt (1-{MAX_IMAGES})."),
          clip: str = typer.Option("ViT-L-14", "--clip", help="open_clip model name."),
          clip_weights: Optional[str] = typer.Option(None, "--clip-weights", help="Weights file, transformers CLIP folder, or open_clip pretrained tag."),
          seed: int = typer.Option(0, help=f"Seed of each prompt's first image, 0 to {MAX_SEED}."),
          steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's; its scheduler sets the range, 2 to 999 for SD's)."),
          as_json: bool = JSON) -> None:
    """Score concepts with CLIP-I (likeness to their photos) and CLIP-T (prompt fidelity)."""
    lines = _prompt_lines(prompts) if prompts is not None else None
    if clip_weights is not None and not clip_weights.strip():   # Path("") is the working folder
        raise BadInput("--clip-weights is blank.", "Give a weights file, a transformers CLIP folder or "
                       "an open_clip pretrained tag, or leave it out.")
    if clip_weights is not None and (Path(clip_weights).expanduser().exists() or "/" in clip_weights):
        # a path, not an open_clip tag: the service has its own working folder, so send it whole
        clip_weights = str(Path(clip_weights).expanduser().absolute())
    req = request(EvalRequest, names=names, prompts=lines, n=n, clip=clip, clip_weights=clip_weights,
                  seed=seed, steps=steps)
    with client() as c:
        job = wait_for(c, c.evaluate(req), quiet=as_json, tell_wait=not as_json)
    if job.result is None or job.result.metrics is None:
        raise BadInput("The job finished without scores.")
    if as_json:
        print(json.dumps({"names": names, **job.result.metrics}, indent=2))
        return
    console.print(eval_table(names, job.result.metrics))


def _prompt_lines(path: Path) -> list[str]:
    """One prompt a line; blank lines and # comments are skipped (as in the shipped list)."""
    if not path.is_file():
        raise BadInput(f"No prompt file at {path}.", "Give a text file with one prompt per line; "
                       "`{}` marks where the concepts go.")
    lines = [ln.strip() for ln in read_text(path, f"The prompt file {path}").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise BadInput(f"The prompt file {path} has no prompts.", "Write one prompt per line.")
    return lines
