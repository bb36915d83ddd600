#!/usr/bin/env python3
"""Evaluate demo-sr at 4x on the held-out photographs (tools/prep_data.py), next to bicubic
and Lanczos. Reproduces the table in models/README.md:

  python3 tools/eval_sr.py            # default settings from models/demo-sr/tessera.yaml
  python3 tools/eval_sr.py --sweep    # also a few strength / noise-level / step variants

Ground truth: each held-out image at long side 512 (Lanczos from the original), cropped to
multiples of 16. Low-res: antialiased bicubic downsampling by 4 (torch). Conditioning: the
low-res upsampled by bicubic (torch, align_corners=False), noise-augmented at noise_level
as the Go side does. Sampler: DDIM (eta 0), 'trailing' timesteps for `steps`, started
part-way as diffusers' img2img does (the last int(steps*strength) of them, from the
upsampled image noised to the first), the final step going to abar = 1. The torch model is
loaded from the weights inside models/demo-sr/model.onnx. PSNR/SSIM on RGB in [0, 1],
4-pixel border shaved, SSIM with an 11x11 Gaussian window (sigma 1.5), mean over channels.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export  # noqa: E402
import nets  # noqa: E402
import schedule  # noqa: E402
from train import augment, DATA  # noqa: E402

torch.set_num_threads(2)
ROOT = os.environ.get("TESSERA_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABAR = torch.tensor(schedule.alphas_cumprod("squaredcos_cap_v2", 1000), dtype=torch.float32)


def psnr(a, b):
    mse = ((a - b) / 2).square().mean().item()   # [-1,1] -> [0,1] scale
    return 10 * math.log10(1.0 / mse)


def ssim(a, b):
    a, b = (a + 1) / 2, (b + 1) / 2
    k = torch.exp(-(torch.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    k = (k / k.sum())
    win = (k[:, None] * k[None, :]).expand(3, 1, 11, 11).contiguous()
    f = lambda x: F.conv2d(x, win, groups=3)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    saa, sbb, sab = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return m.mean().item()


def shave(x, s=4):
    return x[..., s:-s, s:-s]


def lanczos(lr, h, w):
    chans = [np.asarray(Image.fromarray(c).resize((w, h), Image.LANCZOS))
             for c in lr[0].numpy().astype(np.float32)]
    return torch.from_numpy(np.stack(chans)[None]).clamp(-1, 1)


@torch.no_grad()
def ddim_sr(net, up, steps, strength, noise_level, seed):
    g = torch.Generator().manual_seed(seed)
    ts = schedule.timesteps(steps, 1000, "trailing")
    init = min(int(steps * strength), steps)
    ts = ts[steps - init:]
    b = up.shape[0]
    f = torch.full((b,), float(noise_level))
    cond = augment(up, f, g) if noise_level > 0 else up
    a0 = ABAR[ts[0]]
    x = a0.sqrt() * up + (1 - a0).sqrt() * torch.randn(up.shape, generator=g)
    for i, t in enumerate(ts):
        x0 = net(x, cond, torch.full((b,), float(t)), f)
        a = ABAR[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        ap = ABAR[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    return x.clamp(-1, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = os.path.join(ROOT, "models", "demo-sr")
    man = yaml.safe_load(open(os.path.join(d, "tessera.yaml")))
    dflt = man["defaults"]
    net = export.load_from_onnx(nets.SRNet(), os.path.join(d, "model.onnx"))
    held = np.load(os.path.join(DATA, "heldout.npz"))
    configs = [("demo-sr (defaults)", dflt["steps"], dflt["strength"], dflt["noise_level"])]
    if args.sweep:
        for st, s, nl in ((2, 0.5, 0.0), (4, 0.5, 0.0), (10, 0.5, 0.0), (20, 0.5, 0.0),
                          (20, 0.25, 0.0), (20, 1.0, 0.0), (4, 0.5, 0.02), (4, 0.5, 0.1)):
            configs.append((f"demo-sr steps {st} strength {s} noise_level {nl}", st, s, nl))
    rows = {}
    for name in held.files:
        hr = torch.from_numpy(held[name]).permute(2, 0, 1)[None].float() / 127.5 - 1
        h, w = hr.shape[2:]
        lr = F.interpolate(hr, size=(h // 4, w // 4), mode="bicubic", align_corners=False,
                           antialias=True)
        up = F.interpolate(lr, size=(h, w), mode="bicubic", align_corners=False)
        outs = {"bicubic": up.clamp(-1, 1), "lanczos": lanczos(lr, h, w)}
        for cname, st, s, nl in configs:
            outs[cname] = ddim_sr(net, up, st, s, nl, args.seed)
        for k, v in outs.items():
            rows.setdefault(k, []).append((psnr(shave(v), shave(hr)), ssim(shave(v), shave(hr))))
        print(f"{name} {w}x{h}: " + ", ".join(f"{k} {psnr(shave(v), shave(hr)):.2f}" for k, v in outs.items()),
              file=sys.stderr)
    names = list(held.files)
    print("| method | " + " | ".join(f"{n} PSNR / SSIM" for n in names) + " | mean PSNR | mean SSIM |")
    print("|---|" + "---|" * (len(names) + 2))
    for k, v in rows.items():
        cells = " | ".join(f"{p:.2f} / {s:.4f}" for p, s in v)
        print(f"| {k} | {cells} | {np.mean([p for p, _ in v]):.2f} | {np.mean([s for _, s in v]):.4f} |")


if __name__ == "__main__":
    main()
