"""Half precision, as on a GPU (bf16, or fp16 before Ampere), run on the CPU: every method and the
CNS options that take a path of their own learn on a half-precision model, and generate with
boxes. Only fp32 had ever run: a CNS learn with `background = base` failed on any half model."""
from __future__ import annotations

import pytest
import torch

from cns_daemon.generate import generate
from cns_daemon.methods import LearnSpec, get_method
from cns_daemon.model import build_tiny_pipeline
from helpers.methods import FAST, photos

LEARNS = (("cns", {**FAST, "background": "base"}), ("cns", {**FAST, "scope": "all"}),
          ("cones", {**FAST, "tune_steps": 2}), ("cones2", {"variants": 2}))


# bfloat16 with -m slow (CI runs both): 9 s each
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp16", "bf16"])
def test_every_method_learns_and_generates_on_a_half_precision_model(dtype, tmp_path):
    pipe = build_tiny_pipeline(seed=0).to(dtype)
    shots = photos(tmp_path / "p")
    records = {}
    for i, (method, options) in enumerate(LEARNS):
        name = f"c{i}"
        spec = LearnSpec(name, "star", steps=2, options=options, cache_dir=tmp_path / "cache")
        records[name] = get_method(method).learn(pipe, shots, spec, None, None,
                                                 previous=list(records.values()))
    for name, record in records.items():
        images = generate(pipe, f"a photo of <{name}> on the grass", {name: record},
                          [f"{name}=0,0,0.5,1"], n=1, steps=2, output_type="np")
        assert images[0].shape == (32, 32, 3) and torch.isfinite(torch.as_tensor(images[0])).all()


def test_gradients_too_small_for_float16_survive_the_loss_scale():
    """On a float16 UNet (T4, V100) a denoising gradient of 2e-8 per position flushed to zero in
    float16 before it reached the weight: the concept learned nothing. The loss is scaled up
    before backward and the float32 master gradient divided back (`LossScale`)."""
    from cns_daemon.methods.common import LossScale

    def master_grad(scaled: bool) -> float:
        w = torch.nn.Parameter(torch.ones(1, 1, dtype=torch.float16))
        master = torch.zeros(1, requires_grad=True)   # a method's float32 copy of what trains
        opt = torch.optim.SGD([master], lr=1.0)
        x = torch.full((100_000, 1), 1e-3, dtype=torch.float16)
        loss = ((x @ w).float() ** 2).mean()   # dL/dpred = 2e-8: under float16's 6e-8
        scale = LossScale(torch.float16 if scaled else torch.float32, torch.device("cpu"))
        scale.backward(loss)
        master.grad = w.grad.view(-1).float()
        scale.unscale(opt)
        return float(master.grad)

    assert master_grad(scaled=False) == 0.0   # lost, as before
    assert master_grad(scaled=True) == pytest.approx(2e-6, rel=0.05)   # 2 w x² = 2e-6
    assert not LossScale(torch.bfloat16, torch.device("cpu")).enabled   # bf16 has float32's range


def test_cones_scores_keep_gradients_too_small_for_float16():
    """Cones ranks neurons by their gradients: on a float16 UNet those under 6e-8 read zero."""
    from types import SimpleNamespace

    from cns_daemon.methods.cones import _gradients

    w = torch.nn.Parameter(torch.ones(1, 1, dtype=torch.float16))
    x = torch.full((100_000, 1), 1e-3, dtype=torch.float16)
    loss_fn = lambda k: ((x @ w).float() ** 2).mean()   # noqa: E731  dL/dpred = 2e-8
    for dtype, expected in ((torch.float16, 2e-6), (torch.float32, 0.0)):   # unscaled: lost, as before
        pipe = SimpleNamespace(unet=SimpleNamespace(dtype=dtype))
        _, grads = _gradients(pipe, {"w": w}, {"w": torch.ones(1, 1)}, loss_fn, 0)
        assert float(grads["w"]) == pytest.approx(expected, rel=0.05, abs=1e-12), dtype
