#!/usr/bin/env python3
"""Sample grid for demo-base: python3 tools/sample_base.py  -> models/demo-base/samples.png

8x8 unconditional samples at 32x32 (shown at 2x, nearest), DDIM (eta 0) with the manifest's
default steps and trailing timesteps, v-prediction, seed 0; the torch model is loaded from the
weights inside models/demo-base/model.onnx.
"""
import os
import sys

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export  # noqa: E402
import nets  # noqa: E402
import schedule  # noqa: E402

torch.set_num_threads(2)
ROOT = os.environ.get("TESSERA_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.no_grad()
def sample(net, n, steps, seed=0, size=32):
    abar = torch.tensor(schedule.alphas_cumprod("squaredcos_cap_v2", 1000), dtype=torch.float32)
    ts = schedule.timesteps(steps, 1000, "trailing")
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(ts):
        v = net(x, torch.full((n,), float(t)))
        a = abar[t]
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        eps = a.sqrt() * v + (1 - a).sqrt() * x
        ap = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    return x.clamp(-1, 1)


def main():
    d = os.path.join(ROOT, "models", "demo-base")
    man = yaml.safe_load(open(os.path.join(d, "tessera.yaml")))
    net = export.load_from_onnx(nets.BaseNet(), os.path.join(d, "model.onnx"))
    x = sample(net, 64, man["defaults"]["steps"])
    img = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()     # [64,32,32,3]
    grid = img.reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(os.path.join(d, "samples.png"))
    print("wrote", os.path.join(d, "samples.png"))


if __name__ == "__main__":
    main()
