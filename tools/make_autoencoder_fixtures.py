#!/usr/bin/env python3
"""Autoencoder fixtures for the latent-stage tests, written to testdata/autoencoders/<name>/.

Folders as Optimum writes a pipeline's autoencoder: vae_decoder/model.onnx (input
latent_sample [B,C,h,w] -> sample [B,3,H,W]) and vae_encoder/model.onnx (sample ->
latent_sample), each with the autoencoder's config.json (AutoencoderKL or VQModel keys).
The modules are the project's own, random weights:

  kl-like     AutoencoderKL-like, 4 latent channels, factor 4 (block_out_channels of three
              blocks), GroupNorm (32 channels in 8 groups), resnet blocks, nearest upsampling,
              a mid-block self-attention over the whole latent; scaling_factor 0.08333; and
              its encoder (stride-2 downsampling, the same blocks, latent_parameters = mean
              and log variance, 8 channels)
  vq-like     VQModel-like decoder (LDM-SR's VQ-f4): 3 latent channels, factor 4, GroupNorm
  oracle-f4   a fixed linear depth-to-space decoder and space-to-depth encoder (48 latent
              channels = 3 x 4 x 4, factor 4): decode(encode(x)) = x exactly, and a tile's
              decode is that of the whole canvas (no normalisation, receptive field 0)
  overflow-f16 a float16 depth-to-space decoder times 1000 with its float32 copy
              (model_fp32.onnx), whose output overflows float16 for latents over 65.5

Run from the repository root:  /usr/bin/python3 tools/make_autoencoder_fixtures.py
"""
import json
import sys
import os

import onnx
import torch

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "testdata", "autoencoders")
OPSET = 17
AX = {0: "batch", 2: "height", 3: "width"}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export(m, x, path, inp, out):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.onnx.export(m.eval(), (x,), path, opset_version=OPSET, input_names=[inp], output_names=[out],
                      dynamic_axes={inp: AX, out: AX}, do_constant_folding=True)
    om = onnx.load(path)
    om.producer_name = "tessera-tools"
    onnx.checker.check_model(om)
    onnx.save(om, path)


class Resnet(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1, self.c1 = torch.nn.GroupNorm(8, c), torch.nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = torch.nn.GroupNorm(8, c), torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.c1(torch.nn.functional.silu(self.n1(x)))
        return x + self.c2(torch.nn.functional.silu(self.n2(h)))


class Attention(torch.nn.Module):
    """Single-head self-attention over every latent position, as the decoder's mid-block."""

    def __init__(self, c):
        super().__init__()
        self.n = torch.nn.GroupNorm(8, c)
        self.q, self.k, self.v, self.o = (torch.nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.n(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(b, c, h * w)
        v = self.v(y).reshape(b, c, h * w).transpose(1, 2)
        a = torch.softmax(q @ k / c ** 0.5, dim=-1)
        return x + self.o((a @ v).transpose(1, 2).reshape(b, c, h, w))


class Decoder(torch.nn.Module):
    def __init__(self, latent, attention, seed):
        super().__init__()
        torch.manual_seed(seed)
        c = 32
        self.inp = torch.nn.Conv2d(latent, c, 3, padding=1)
        self.mid = Resnet(c)
        self.attn = Attention(c) if attention else None
        self.up1, self.up2 = Resnet(c), Resnet(c)
        self.norm = torch.nn.GroupNorm(8, c)
        self.out = torch.nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.inp(z))
        if self.attn is not None:
            h = self.attn(h)
        h = self.up1(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up2(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(torch.nn.functional.silu(self.norm(h)))


class Encoder(torch.nn.Module):
    """AutoencoderKL-like encoder: resnet blocks, two stride-2 downsamplings, a mid-block
    attention, GroupNorm, and latent_parameters = mean and log variance (2C channels, as newer
    Optimum exports it)."""

    def __init__(self, latent, seed):
        super().__init__()
        torch.manual_seed(seed)
        c = 32
        self.inp = torch.nn.Conv2d(3, c, 3, padding=1)
        self.r1, self.r2, self.mid = Resnet(c), Resnet(c), Resnet(c)
        self.d1 = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.d2 = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.attn = Attention(c)
        self.norm = torch.nn.GroupNorm(8, c)
        self.out = torch.nn.Conv2d(c, 2 * latent, 3, padding=1)

    def forward(self, x):
        h = self.d1(self.r1(self.inp(x)))
        h = self.mid(self.d2(self.r2(h)))
        h = self.attn(h)
        return self.out(torch.nn.functional.silu(self.norm(h)))


class DepthToSpace(torch.nn.Module):
    def forward(self, z):
        return torch.nn.functional.pixel_shuffle(z, 4)


class OverflowDepthToSpace(torch.nn.Module):
    """Depth-to-space times 1000: latents of about 1e-3 decode to [-1, 1], and a latent over
    65.5 gives a value over float16's 65504, an infinity in the float16 graph's output (ONNX
    Runtime's CPU kernels widen float16 arithmetic to float32 inside a graph, so this fixture
    overflows where a CPU can show it: at the output; a GPU overflows inside as well)."""

    def forward(self, z):
        return torch.nn.functional.pixel_shuffle(z, 4) * 1000.0


class SpaceToDepth(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.pixel_unshuffle(x, 4)


def main():
    z4 = torch.randn(1, 4, 8, 8)
    export(Decoder(4, True, 31), z4, os.path.join(OUT, "kl-like", "vae_decoder", "model.onnx"), "latent_sample", "sample")
    write_json(os.path.join(OUT, "kl-like", "vae_decoder", "config.json"),
               {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [32, 32, 32], "norm_num_groups": 8, "scaling_factor": 0.08333,
                "sample_size": 256})
    export(Encoder(4, 33), torch.randn(1, 3, 32, 32), os.path.join(OUT, "kl-like", "vae_encoder", "model.onnx"),
           "sample", "latent_parameters")
    write_json(os.path.join(OUT, "kl-like", "vae_encoder", "config.json"),
               {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [32, 32, 32], "norm_num_groups": 8, "scaling_factor": 0.08333,
                "sample_size": 256})
    z3 = torch.randn(1, 3, 8, 8)
    export(Decoder(3, False, 32), z3, os.path.join(OUT, "vq-like", "vae_decoder", "model.onnx"), "latent_sample", "sample")
    write_json(os.path.join(OUT, "vq-like", "vae_decoder", "config.json"),
               {"_class_name": "VQModel", "in_channels": 3, "out_channels": 3, "latent_channels": 3,
                "block_out_channels": [32, 32, 32], "norm_num_groups": 8, "num_vq_embeddings": 8192,
                "vq_embed_dim": 3, "scaling_factor": 1.0})
    export(DepthToSpace(), torch.randn(1, 48, 8, 8), os.path.join(OUT, "oracle-f4", "vae_decoder", "model.onnx"),
           "latent_sample", "sample")
    export(SpaceToDepth(), torch.randn(1, 3, 32, 32), os.path.join(OUT, "oracle-f4", "vae_encoder", "model.onnx"),
           "sample", "latent_sample")
    for part in ("vae_decoder", "vae_encoder"):
        write_json(os.path.join(OUT, "oracle-f4", part, "config.json"),
                   {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 48,
                    "block_out_channels": [8, 8, 8], "scaling_factor": 1.0})
    # A float16 decoder that overflows on large latents, with its float32 copy
    # (tools/fp16_decoder.py --fp16), for the retry of overflowed tiles.
    tmp = os.path.join(OUT, "overflow-f16", "fp32")
    export(OverflowDepthToSpace(), torch.randn(1, 48, 8, 8), os.path.join(tmp, "model.onnx"), "latent_sample", "sample")
    write_json(os.path.join(tmp, "config.json"),
               {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 48,
                "block_out_channels": [8, 8, 8], "scaling_factor": 1.0})
    import subprocess
    import shutil
    subprocess.check_call([sys.executable, os.path.join(ROOT, "tools", "fp16_decoder.py"), "--fp16", tmp,
                           os.path.join(OUT, "overflow-f16", "vae_decoder")])
    shutil.rmtree(tmp)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(DepthToSpace()(SpaceToDepth()(x)), x)
    print("autoencoder fixtures written to", OUT)


if __name__ == "__main__":
    main()
