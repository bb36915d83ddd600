#!/usr/bin/python3
"""Time one 4x SR stage as a plain PyTorch loop over the demo-sr weights.

The reference for `tessera bench`'s speed claim: the same job Tessera runs
for the demo upscale (a 256x256 photograph to 1024x1024, DDIM, 8 steps
at strength 0.5 = 4 model steps, 256-pixel tiles with overlap 32 and halo 36 on a
4-pixel grid: 49 tiles), written the way the MultiDiffusion reference code
does it: for every step, every tile goes through the model, the predictions
are blended into a canvas with per-pixel weights, and the canvas steps once.

  /usr/bin/python3 tools/torch_tiled_sr.py [--batch 1] [--threads 2]

Prints the wall time of the sampling loop (model loading and the upsampling
excluded), the time inside the model, and the item's time: from decoding the
image to the clamped result, the span of Tessera's "seconds" (which also
counts creating the ONNX Runtime session). Compare with

  bin/tessera run examples/upscale-bench.yaml   (wall and model busy time in the
  summary; the item's own time, session creation included, is "seconds" in
  its JSON sidecar)
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nets  # noqa: E402
from export import load_from_onnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cosine_alphas_cumprod(T=1000):
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    return np.cumprod([1 - b for b in betas])


def axis(n, t, overlap, halo, align):
    """Tile starts as Tessera's TileGrid places them."""
    if n <= t:
        return [0]
    stride = t - 2 * halo - overlap
    if align > 1 and stride > align:
        stride -= align
    else:
        align = 1
    k = (n - t + stride - 1) // stride + 1
    starts = []
    for i in range(k):
        s = (2 * i * (n - t) + (k - 1)) // (2 * (k - 1))
        if align > 1 and 0 < i < k - 1:
            s = min((s + align // 2) // align * align, (n - t) // align * align)
        starts.append(s)
    return starts


def window(t, overlap, halo, first, last):
    w = np.ones(t)
    for p in range(t):
        for q, on in ((p - halo, not first), (t - 1 - p - halo, not last)):
            if not on:
                continue
            if q < 0:
                w[p] = 0
            elif q < overlap:
                w[p] *= math.sin(math.pi / 2 * (q + 0.5) / overlap) ** 2
    return w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default=os.path.join(ROOT, "testdata", "images", "chelsea-256.png"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--halo", type=int, default=36)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--strength", type=float, default=0.5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    net = load_from_onnx(nets.SRNet(), os.path.join(ROOT, "models", "demo-sr", "model.onnx"))

    item0 = time.perf_counter()  # the span Tessera's sidecar "seconds" covers, less session creation
    img = np.asarray(Image.open(a.image).convert("RGB"), dtype=np.float32) / 127.5 - 1
    low = torch.from_numpy(img).permute(2, 0, 1)[None]
    H, W = low.shape[2] * 4, low.shape[3] * 4
    up = F.interpolate(low, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1)

    abar = cosine_alphas_cumprod()
    T = len(abar)
    ts = [int(round(T - i * T / a.steps)) - 1 for i in range(a.steps)]  # trailing spacing
    start = a.steps - min(int(a.steps * a.strength), a.steps)
    ts = ts[start:]
    g = torch.Generator().manual_seed(0)
    x = math.sqrt(abar[ts[0]]) * up + math.sqrt(1 - abar[ts[0]]) * torch.randn(up.shape, generator=g)

    ys, xs = axis(H, a.tile, a.overlap, a.halo, 4), axis(W, a.tile, a.overlap, a.halo, 4)
    wy = [window(a.tile, a.overlap, a.halo, i == 0, i == len(ys) - 1) for i in range(len(ys))]
    wx = [window(a.tile, a.overlap, a.halo, j == 0, j == len(xs) - 1) for j in range(len(xs))]
    tiles = [(y0, x0, torch.from_numpy(np.outer(wy[i], wx[j])).float())
             for i, y0 in enumerate(ys) for j, x0 in enumerate(xs)]
    print(f"{W}x{H}, {len(tiles)} tiles of {a.tile}, {len(ts)} steps, batch {a.batch}, {a.threads} threads")

    model_s = 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for si, t in enumerate(ts):
            acc = torch.zeros_like(x)
            wsum = torch.zeros((1, 1, H, W))
            for b in range(0, len(tiles), a.batch):
                group = tiles[b:b + a.batch]
                xt = torch.cat([x[:, :, y0:y0 + a.tile, x0:x0 + a.tile] for y0, x0, _ in group])
                lt = torch.cat([up[:, :, y0:y0 + a.tile, x0:x0 + a.tile] for y0, x0, _ in group])
                n = len(group)
                m0 = time.perf_counter()
                pred = net(xt, lt, torch.full((n,), float(t)), torch.zeros(n))
                model_s += time.perf_counter() - m0
                for k, (y0, x0, w) in enumerate(group):
                    acc[:, :, y0:y0 + a.tile, x0:x0 + a.tile] += pred[k:k + 1] * w
                    wsum[:, :, y0:y0 + a.tile, x0:x0 + a.tile] += w
            x0_hat = acc / wsum  # demo-sr predicts the sample
            prev = ts[si + 1] if si + 1 < len(ts) else -1
            a_t, a_p = abar[t], (abar[prev] if prev >= 0 else 1.0)
            eps = (x - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
            x = math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p) * eps
    wall = time.perf_counter() - t0
    x = x.clamp(-1, 1)
    item = time.perf_counter() - item0
    print(f"pytorch: wall {wall:.2f}s, inside the model {model_s:.2f}s, "
          f"item {item:.2f}s (image decode to the clamped result)")


if __name__ == "__main__":
    main()
