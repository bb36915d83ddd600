#!/usr/bin/env python3
"""Train a demo model on the prepared photographs (tools/prep_data.py).

  python3 tools/train.py sr   [--minutes 15] [--threads 2]
  python3 tools/train.py base [--minutes 15] [--threads 2]

Writes $TESSERA_DATA/<model>.pt (EMA weights) and logs progress to $TESSERA_DATA/<model>.log.
Fixed seeds; the learning rate follows a cosine over the wall-clock budget, so the number of
steps (recorded in the checkpoint and the log) depends on the machine's speed.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nets  # noqa: E402
import schedule  # noqa: E402

DATA = os.environ.get("TESSERA_DATA", "/tmp/tessera-data")
T = 1000
ABAR = torch.tensor(schedule.alphas_cumprod("squaredcos_cap_v2", T), dtype=torch.float32)


def load_train(min_side, max_long=None):
    z = np.load(os.path.join(DATA, "train.npz"))
    out = []
    for k in z.files:
        a = z[k]
        long = int(k.split("@")[1])
        if min(a.shape[:2]) >= min_side and (max_long is None or long <= max_long):
            out.append(torch.from_numpy(a).permute(2, 0, 1).contiguous())
    return out


def crops(imgs, n, size, g):
    batch = []
    for _ in range(n):
        a = imgs[int(torch.randint(len(imgs), (1,), generator=g))]
        y = int(torch.randint(a.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(a.shape[2] - size + 1, (1,), generator=g))
        c = a[:, y:y + size, x:x + size]
        if torch.rand(1, generator=g) < 0.5:
            c = c.flip(2)
        batch.append(c)
    return torch.stack(batch).float() / 127.5 - 1.0


def degrade(hr, scale=4):
    """HR [-1,1] -> bicubic-upsampled low-res (antialiased bicubic down, bicubic up)."""
    h, w = hr.shape[2:]
    lr = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", align_corners=False,
                       antialias=True)
    return F.interpolate(lr, size=(h, w), mode="bicubic", align_corners=False)


def augment(up, f, g):
    """Noise-conditioning augmentation exactly as the Go side does it."""
    ta = torch.round(f * (T - 1)).long()
    ab = ABAR[ta].view(-1, 1, 1, 1)
    n = torch.randn(up.shape, generator=g)
    aug = ab.sqrt() * up + (1 - ab).sqrt() * n
    return torch.where((f > 0).view(-1, 1, 1, 1), aug, up)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["sr", "base"])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--init", help="continue from this checkpoint (EMA weights) instead of scratch")
    ap.add_argument("--out", help="checkpoint/log stem (default: the model name)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    stem = args.out or args.model
    log = open(os.path.join(DATA, stem + ".log"), "w", buffering=1)

    if args.model == "sr":
        net = nets.SRNet()
        patch, margin, bs = 64, 8, 16
        imgs = load_train(patch + 2 * margin)
    else:
        net = nets.BaseNet()
        bs = 32
        imgs = load_train(32, max_long=160)
    prev_steps, prev_seconds = 0, 0.0
    if args.init:
        ck = torch.load(args.init)
        net.load_state_dict(ck["model"])
        prev_steps, prev_seconds = ck["steps"], ck["seconds"]
        print(f"continuing from {args.init} ({prev_steps} steps, {prev_seconds:.0f}s)", file=log)
    ema = nets.SRNet() if args.model == "sr" else nets.BaseNet()
    ema.load_state_dict(net.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    budget = args.minutes * 60
    t0 = time.time()
    step, run_loss = 0, 0.0
    print(f"{args.model}: {nets.count_params(net)} params, {len(imgs)} source arrays", file=log)
    while True:
        el = time.time() - t0
        if el > budget:
            break
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * el / budget))
        for pg in opt.param_groups:
            pg["lr"] = lr
        t = torch.randint(0, T, (bs,), generator=g)
        ab = ABAR[t].view(-1, 1, 1, 1)
        snr = (ab / (1 - ab)).view(-1)
        if args.model == "sr":
            hr = crops(imgs, bs, patch + 2 * margin, g)
            up = degrade(hr)[..., margin:-margin, margin:-margin]
            hr = hr[..., margin:-margin, margin:-margin]
            f = torch.rand(bs, generator=g) * 0.25 * (torch.rand(bs, generator=g) < 0.5)
            cond = augment(up, f, g)
            eps = torch.randn(hr.shape, generator=g)
            xt = ab.sqrt() * hr + (1 - ab).sqrt() * eps
            pred = net(xt, cond, t.float(), f)
            w = torch.clamp(snr, max=5.0)                # min-SNR-5 weight for x0 loss
            loss = (w * (pred - hr).square().mean(dim=(1, 2, 3))).mean()
        else:
            x0 = crops(imgs, bs, 32, g)
            eps = torch.randn(x0.shape, generator=g)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
            pred = net(xt, t.float())
            w = torch.clamp(snr, max=5.0) / (snr + 1)    # min-SNR-5 weight for v loss
            loss = (w * (pred - v).square().mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.mul_(d).add_(pn, alpha=1 - d)
        run_loss = 0.98 * run_loss + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0:
            print(f"step {step} t={el:.0f}s lr={lr:.2e} loss={run_loss:.5f}", file=log)
    el = time.time() - t0
    print(f"done: {step} steps in {el:.0f}s", file=log)
    torch.save({"model": ema.state_dict(), "steps": prev_steps + step, "seconds": prev_seconds + el,
                "params": nets.count_params(ema)}, os.path.join(DATA, stem + ".pt"))


if __name__ == "__main__":
    main()
