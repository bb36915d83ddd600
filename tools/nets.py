"""Model definitions for the demo models (torch).

SRNet  (demo-sr):   norm-free 3-level U-Net, widths 12/32/64 at 1, 1/2, 1/4 resolution, FiLM
                    conditioning on timestep and noise level, predicts x0 as a residual over
                    the (augmented) upsampled low-res image. Fully convolutional, bounded
                    receptive field, no attention, no normalisation (tiles match the canvas).
BaseNet (demo-base): 32x32 U-Net, widths 32/64/64, GroupNorm+SiLU residual blocks, sinusoidal
                    timestep embedding, one self-attention block at 8x8; predicts v.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Sinusoidal(nn.Module):
    def __init__(self, dim, max_period=10000.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half),
                             persistent=False)

    def forward(self, t):  # t: float [B]
        a = t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


# ------------------------------------------------------------------------------------ SR
class FiLMRes(nn.Module):
    """x + conv(silu(film(conv(silu(x))))): no normalisation, second conv zero-initialised."""

    def __init__(self, c, emb):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.film = nn.Linear(emb, 2 * c)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x, e):
        s, b = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = self.c1(F.silu(x)) * (1 + s) + b
        return x + self.c2(F.silu(h))


class SRNet(nn.Module):
    def __init__(self, w0=12, w1=32, w2=64, emb=128):
        super().__init__()
        self.t_emb = Sinusoidal(64)
        self.mlp = nn.Sequential(nn.Linear(128, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.conv_in = nn.Conv2d(6, w0, 3, padding=1)
        self.enc0 = FiLMRes(w0, emb)
        self.down1 = nn.Conv2d(w0, w1, 3, stride=2, padding=1)
        self.enc1 = FiLMRes(w1, emb)
        self.down2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.mid1 = FiLMRes(w2, emb)
        self.mid2 = FiLMRes(w2, emb)
        self.up2 = nn.Conv2d(w2, 4 * w1, 1)
        self.dec1 = FiLMRes(w1, emb)
        self.up1 = nn.Conv2d(w1, 4 * w0, 1)
        self.dec0 = nn.Conv2d(w0, w0, 3, padding=1)
        self.conv_out = nn.Conv2d(w0, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample, low_res, timestep, noise_level):
        e = self.mlp(torch.cat([self.t_emb(timestep), self.t_emb(noise_level * 1000.0)], dim=1))
        h0 = self.enc0(self.conv_in(torch.cat([sample, low_res], dim=1)), e)
        h1 = self.enc1(self.down1(F.silu(h0)), e)
        h2 = self.mid2(self.mid1(self.down2(F.silu(h1)), e), e)
        u1 = self.dec1(F.pixel_shuffle(self.up2(h2), 2) + h1, e)
        u0 = F.pixel_shuffle(self.up1(u1), 2) + h0
        return low_res + self.conv_out(F.silu(self.dec0(F.silu(u0))))


# ---------------------------------------------------------------------------------- base
class GNRes(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1 = nn.GroupNorm(8, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, cout)
        self.n2 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x))) + self.e(e)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n = nn.GroupNorm(8, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.scale = c ** -0.5

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.n(x)).flatten(2).chunk(3, dim=1)          # [B,C,N]
        a = torch.softmax(torch.bmm(q.transpose(1, 2), k) * self.scale, dim=-1)  # [B,N,N]
        o = torch.bmm(v, a.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj(o)


class BaseNet(nn.Module):
    def __init__(self, w=(32, 64, 64), emb=128):
        super().__init__()
        w0, w1, w2 = w
        self.t_emb = Sinusoidal(64)
        self.mlp = nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.conv_in = nn.Conv2d(3, w0, 3, padding=1)
        self.e0 = GNRes(w0, w0, emb)
        self.d1 = nn.Conv2d(w0, w1, 3, stride=2, padding=1)
        self.e1 = GNRes(w1, w1, emb)
        self.d2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.m1 = GNRes(w2, w2, emb)
        self.attn = Attn(w2)
        self.m2 = GNRes(w2, w2, emb)
        self.u1 = GNRes(w2 + w1, w1, emb)
        self.u0 = GNRes(w1 + w0, w0, emb)
        self.n_out = nn.GroupNorm(8, w0)
        self.conv_out = nn.Conv2d(w0, 3, 3, padding=1)

    def forward(self, sample, timestep):
        e = self.mlp(self.t_emb(timestep))
        h0 = self.e0(self.conv_in(sample), e)
        h1 = self.e1(self.d1(h0), e)
        h = self.m2(self.attn(self.m1(self.d2(h1), e)), e)
        h = self.u1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), e)
        h = self.u0(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h0], 1), e)
        return self.conv_out(F.silu(self.n_out(h)))


def count_params(m):
    return sum(p.numel() for p in m.parameters())
