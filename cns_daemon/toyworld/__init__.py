"""The toy world: a synthetic world small enough to train a model on a CPU, in which learning a
concept can be measured exactly (DESIGN.md §5).

Photos are 32x32 RGB: one object (centred, 19-24 px across) or two (one per half), each with a
shape, a main colour and a pattern in a second colour, on a background, under mild lighting and
noise variation. Captions name shape, main colour and background (and left/right for two
objects), never the pattern or second colour: "a photo of a red star on the grass". A personal
concept is an object whose pattern the words cannot say ("a red star with yellow stripes").

API (import the submodules; this package module imports nothing heavy):

    from cns_daemon.toyworld.world import (SHAPES, COLORS, PATTERNS, BACKGROUNDS, ObjectSpec,
                                            SceneSpec, render, render_array, caption,
                                            render_concept_photos, random_object, random_scene)
    obj = ObjectSpec("star", "red", "stripes", "yellow")        # pattern "solid": second_color None
    img = render(SceneSpec((obj,), "grass"), seed=3)           # PIL 32x32, deterministic per seed
    caption(SceneSpec((obj,), "grass"))                        # 'a photo of a red star on the grass'
    photos = render_concept_photos(obj, n=4, seed=0)           # [(PIL image, caption), ...]
    two = SceneSpec((obj, ObjectSpec("ring", "blue")), "sand") # left, right
    caption(two)  # 'a photo of a red star on the left and a blue ring on the right on the sand'

    from cns_daemon.toyworld.probe import Probe, Attributes
    probe = Probe.load()                                       # shipped weights, CPU, ~0.3 MB
    probe.read([img])        # [Attributes(shape, color, pattern, second_color|None, background, confidence)]
    probe.read_halves([im])  # [(left Attributes, right Attributes)] for two-object images
    attrs.matches(obj, "grass")                                # identity (+ background) check

    from cns_daemon.toyworld.fidelity import (plain_prompt_cases, generate_batch, prompt_fidelity,
                                               two_object_fidelity, attribute_distribution)

The fixture model (cns_daemon/toyworld/model, a diffusers folder; `cns_daemon.model.load_pipeline
(None)` loads it) is trained by `python -m cns_daemon.toyworld.train`; the probe (toyworld/probe/)
by `python -m cns_daemon.toyworld.probe_train`. Both record their seed and settings next to the
weights. CLI: `cones toyworld render ...`, `cones toyworld probe IMAGES... [--json]`.
Benchmark: `python -m bench.toyworld [--json]`.

Measured (bench.toyworld, 20 DDIM steps, guidance 4): probe accuracy >= 0.968 per attribute on
fresh renders; the shipped model is undertrained (2008 UNet steps fitted in its 60-min run on a
busy 2-core machine): plain-prompt fidelity 0.06 (shape 0.25, colour 0.36, background 0.60, chance
0.17 / 0.125 / 0.2), and its VAE loses fine pattern detail. Resume training with
`python -m cns_daemon.toyworld.train --resume` (checkpoints in toyworld/model.work/, not committed).
"""
