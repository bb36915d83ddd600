#!/usr/bin/env python3
"""Export the trained demo models to ONNX with their manifests.

  python3 tools/export.py sr    # $TESSERA_DATA/sr.pt   -> models/demo-sr/{model.onnx,tessera.yaml}
  python3 tools/export.py base  # $TESSERA_DATA/base.pt -> models/demo-base/{model.onnx,tessera.yaml}

Opset 17; batch, height and width are dynamic. The SR export measures the receptive field
(gradient support of one output pixel, all stride phases) and checks that a tile cut with a
halo of that radius (rounded up to size_multiple) reproduces the full-canvas output.
"""
import os
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import manifest  # noqa: E402
import nets  # noqa: E402

torch.set_num_threads(2)
ROOT = os.environ.get("TESSERA_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("TESSERA_DATA", "/tmp/tessera-data")
AX = {0: "batch", 2: "height", 3: "width"}

SR_DEFAULTS = {"steps": 4, "sampler": "ddim", "guidance": 1.0, "strength": 0.5,
               "noise_level": 0.0}
BASE_DEFAULTS = {"steps": 30, "sampler": "ddim", "guidance": 1.0}


def load_from_onnx(net, path):
    """Fill a torch module from the initializers of its exported graph (names = state_dict keys)."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    sd = net.state_dict()
    missing = [k for k in sd if k not in inits]
    if missing:
        raise KeyError(f"{path}: initializers missing for {missing[:5]}")
    net.load_state_dict({k: torch.from_numpy(np.array(inits[k])) for k in sd})
    return net.eval()


def _export(net, args, names, path):
    axes = {n: (AX if a.dim() == 4 else {0: "batch"}) for n, a in zip(names, args)}
    axes["out_sample"] = AX
    # keep parameters as named initializers (no constant folding), so the graph can be
    # loaded back into torch by tools/eval_sr.py and tools/sample_base.py
    torch.onnx.export(net, args, path, opset_version=17, input_names=names,
                      output_names=["out_sample"], dynamic_axes=axes, do_constant_folding=False)
    m = onnx.load(path)
    dims = m.graph.output[0].type.tensor_type.shape.dim
    for i, d in enumerate(m.graph.input[0].type.tensor_type.shape.dim):
        dims[i].Clear()
        if d.dim_param:
            dims[i].dim_param = d.dim_param
        else:
            dims[i].dim_value = d.dim_value
    onnx.checker.check_model(m)
    onnx.save(m, path)


def receptive_field(net, mult=4):
    size, c = 128, 64
    r = 0
    for py in range(mult):
        for px in range(mult):
            x = torch.randn(1, 3, size, size, requires_grad=True)
            lr = torch.randn(1, 3, size, size, requires_grad=True)
            out = net(x, lr, torch.tensor([300.0]), torch.tensor([0.05]))
            out[0, :, c + py, c + px].sum().backward()
            gmask = (x.grad.abs() + lr.grad.abs()).sum(dim=(0, 1)) > 0
            ys, xs = torch.nonzero(gmask, as_tuple=True)
            r = max(r, int((ys - (c + py)).abs().max()), int((xs - (c + px)).abs().max()))
    return r


def export_sr():
    ck = torch.load(os.path.join(DATA, "sr.pt"))
    net = nets.SRNet()
    net.load_state_dict(ck["model"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    rf = receptive_field(net)
    halo = -(-rf // 4) * 4
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 192, 192, generator=g)
        lr = torch.randn(1, 3, 192, 192, generator=g).clamp(-1, 1)
        t, f = torch.tensor([400.0]), torch.tensor([0.0])
        full = net(x, lr, t, f)
        y0, x0, s = 64, 64, 64
        sub = net(x[..., y0 - halo:y0 + s + halo, x0 - halo:x0 + s + halo],
                  lr[..., y0 - halo:y0 + s + halo, x0 - halo:x0 + s + halo], t, f)
        err = (sub[..., halo:-halo, halo:-halo] - full[..., y0:y0 + s, x0:x0 + s]).abs().max()
        assert err < 1e-5, f"tile check failed: {err}"
    d = os.path.join(ROOT, "models", "demo-sr")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    a = (torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64), torch.tensor([500.0]),
         torch.tensor([0.0]))
    _export(net, a, ["sample", "low_res", "timestep", "noise_level"], path)
    load_from_onnx(nets.SRNet(), path)
    manifest.write(os.path.join(d, "tessera.yaml"), {
        "version": 1, "kind": "sr", "prediction": "sample",
        "inputs": {"sample": "sample", "lowres": "low_res", "timestep": "timestep",
                   "noise_level": "noise_level"},
        "outputs": {"prediction": "out_sample"},
        "lowres_concat": False, "channels": 3, "scale": 4, "size_multiple": 4,
        "receptive_field": rf, "classes": 0, "null_class": -1,
        "schedule": dict(manifest.SCHEDULE_DEFAULT),
        "defaults": dict(SR_DEFAULTS),
        "description": f"Demo 4x SR U-Net (norm-free, widths 12/32/64, {nets.count_params(net)} params), "
                       "predicts x0 as a residual over the upsampled low-res; tiles need origins on multiples of 4",
        "license": "CC-BY-4.0 (weights; trained on CC0/public-domain/CC-BY-4.0 photographs, see models/SOURCES.md)",
    })
    print(f"demo-sr: {nets.count_params(net)} params, receptive field {rf}, tile check err {err:.2e}, "
          f"{ck['steps']} steps in {ck['seconds']:.0f}s")


def export_base():
    ck = torch.load(os.path.join(DATA, "base.pt"))
    net = nets.BaseNet()
    net.load_state_dict(ck["model"])
    net.eval()
    d = os.path.join(ROOT, "models", "demo-base")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    _export(net, (torch.zeros(1, 3, 32, 32), torch.tensor([500.0])), ["sample", "timestep"], path)
    load_from_onnx(nets.BaseNet(), path)
    manifest.write(os.path.join(d, "tessera.yaml"), {
        "version": 1, "kind": "base", "prediction": "v_prediction",
        "inputs": {"sample": "sample", "timestep": "timestep"},
        "outputs": {"prediction": "out_sample"},
        "lowres_concat": False, "channels": 3, "native_size": [32, 32], "size_multiple": 4,
        "receptive_field": 0, "classes": 0, "null_class": -1,
        "schedule": dict(manifest.SCHEDULE_DEFAULT),
        "defaults": dict(BASE_DEFAULTS),
        "description": f"Demo unconditional 32x32 pixel U-Net (GroupNorm, attention at 8x8, {nets.count_params(net)} params), v-prediction",
        "license": "CC-BY-4.0 (weights; trained on CC0/public-domain/CC-BY-4.0 photographs, see models/SOURCES.md)",
    })
    print(f"demo-base: {nets.count_params(net)} params, {ck['steps']} steps in {ck['seconds']:.0f}s")


if __name__ == "__main__":
    for which in sys.argv[1:] or ["sr", "base"]:
        {"sr": export_sr, "base": export_base}[which]()
