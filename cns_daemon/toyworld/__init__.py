"""The toy world: a synthetic world small enough to train a model on a CPU, in which learning a
concept can be measured exactly (DESIGN.md §5), built to behave like Stable Diffusion where the
personalization methods care.

Photos are 32x32 RGB: one object (centred, 19-24 px across) or two (one per half), each with a
shape, a main colour, a pattern in a second colour and, for a pattern, a tilt (straight or
diagonal), on a background, under mild lighting and noise variation. Captions always name shape,
main colour and background (and left/right for two objects); about half of them also name the
pattern and second colour ("a photo of a red star with yellow stripes on the grass"), as a real
captioner would; none ever names the tilt. So, as in real SD, words have a text pathway to most
of a look, "a photo of a red star" still varies in pattern and tilt, and a personal concept (a
diagonally striped yellow-on-red star) is an instance whose words can approach its look but not
say all of it.

API (import the submodules; this package module imports nothing heavy):

    from cns_daemon.toyworld.world import (SHAPES, COLORS, PATTERNS, TILTS, BACKGROUNDS, ObjectSpec,
                                            SceneSpec, render, render_array, caption,
                                            render_concept_photos, random_object, random_scene)
    obj = ObjectSpec("star", "red", "stripes", "yellow", "diagonal")  # solid: no second colour, no tilt
    img = render(SceneSpec((obj,), "grass"), seed=3)           # PIL 32x32, deterministic per seed
    caption(SceneSpec((obj,), "grass"))                        # 'a photo of a red star on the grass'
    caption(SceneSpec((obj,), "grass"), look="full")           # '... a red star with yellow stripes ...'
    photos = render_concept_photos(obj, n=4, seed=0)           # [(PIL image, caption naming the look)]
    two = SceneSpec((obj, ObjectSpec("ring", "blue")), "sand") # left, right
    caption(two)  # 'a photo of a red star on the left and a blue ring on the right on the sand'

    from cns_daemon.toyworld.probe import Probe, Attributes
    probe = Probe.load()                                       # shipped weights, CPU, < 1 MB
    probe.read([img])        # [Attributes(shape, color, pattern, second_color|None, tilt|None, background, confidence)]
    probe.read_halves([im])  # [(left Attributes, right Attributes)] for two-object images
    attrs.matches(obj, "grass")                                # named look (+ background) check

    from cns_daemon.toyworld.fidelity import (plain_prompt_cases, named_look_cases, generate_batch,
                                               prompt_fidelity, look_fidelity, two_object_fidelity,
                                               attribute_distribution, entropy_bits)

The fixture model (cns_daemon/toyworld/model, a diffusers folder; `cns_daemon.model.load_pipeline
(None)` loads it) is trained by `python -m cns_daemon.toyworld.train`; the probe (toyworld/probe/)
by `python -m cns_daemon.toyworld.probe_train`. Both record their seed and settings next to the
weights, and a run warm-started from another (`--init`) records that one's too.
CLI: `cones toyworld render ...`, `cones toyworld probe IMAGES... [--json]`.
Benchmark: `python -m bench.toyworld [--json]`.

Measured figures of the shipped model (bench.toyworld): README and docs/tuning.md.
"""
