#!/usr/bin/env python3
"""Latent-stage oracle fixtures, written to testdata/families/<name>/: pipeline folders as
diffusers and Optimum write them (model_index.json, unet/, scheduler/, vae_decoder/ and
vae_encoder/), whose U-Net and autoencoder make an image that is a closed form of the input.

The autoencoder is the oracle of tools/make_autoencoder_fixtures.py: a depth-to-space decoder
(48 latent channels -> 3 x 4 x 4 pixels, pixel_shuffle) and its inverse as the encoder, so
that decode(encode(x)) = x exactly, tiled or not. The U-Nets predict epsilon for a data point
x0* that is a closed form of what they take:

  latent-sr-oracle    LDMSuperResolutionPipeline-like (VQModel, scaling 1): sample = 48 latent
                      + 3 low-res; x0*[16c + j] = low-res[c], which decodes to the low-res image
                      upscaled by 4 with nearest neighbours.
  latent-base-oracle  LDMPipeline-like (VQModel): sample = 48 latents, x0* = K, 48 constants
                      K[i] = -0.6 + 1.2 * (7i mod 48) / 47; decodes to a 4 x 4 pattern repeated,
                      K[16c + 4dy + dx] at (dy, dx) of channel c.
  img2img-oracle      the latent side of an img2img pipeline (AutoencoderKL with
                      scaling_factor 0.5 and shift_factor 0.1, an encoder giving
                      latent_parameters = mean and log variance, as newer Optimum exports it):
                      x0* = x_t / sqrt(abar_t), "the sample is already clean", so that DDIM
                      ends on x_start / sqrt(abar_start) = z0 + sqrt((1 - abar_s) / abar_s) * noise.

The schedulers are DDIM with set_alpha_to_one, so that DDIM lands on x0* exactly.

  sd-like             a Stable Diffusion-like pipeline folder for the img2img upscale end to end:
                      a random-weight U-Net (tools/make_family_fixtures.py's FamilyNet: sample
                      [B,4,H,W], timestep, encoder_hidden_states [B,L,32] -> 4 channels), SD 1.5's
                      DDIM betas, and the KL-like autoencoder (tools/make_autoencoder_fixtures.py,
                      run first) as vae_decoder/ and vae_encoder/.

Run from the repository root, after tools/make_autoencoder_fixtures.py:
  /usr/bin/python3 tools/make_latent_fixtures.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_family_fixtures as fam  # noqa: E402

OUT = fam.OUT
SCHED = {"_class_name": "DDIMScheduler", "beta_end": 0.0155, "beta_schedule": "scaled_linear",
         "beta_start": 0.0015, "clip_sample": False, "num_train_timesteps": 1000,
         "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0,
         "trained_betas": None}
LATENT = 48


class Tables(torch.nn.Module):
    def __init__(self):
        super().__init__()
        sa, so, _ = fam.tables(SCHED)
        self.register_buffer("sa", sa)
        self.register_buffer("so", so)

    def at(self, timestep):
        ti = torch.clamp(torch.round(timestep.float()), 0, 999).long().reshape(-1)
        return self.sa[ti].view(-1, 1, 1, 1), self.so[ti].view(-1, 1, 1, 1)


class LatentSROracle(Tables):
    def forward(self, sample, timestep):
        x, low = sample[:, :LATENT], sample[:, LATENT:LATENT + 3]
        sa, so = self.at(timestep)
        x0 = torch.cat([low[:, c:c + 1] for c in range(3) for _ in range(16)], dim=1)
        return (x - sa * x0) / so


class LatentBaseOracle(Tables):
    def __init__(self):
        super().__init__()
        i = torch.arange(LATENT, dtype=torch.float64)
        k = -0.6 + 1.2 * torch.remainder(7 * i, LATENT) / (LATENT - 1)
        self.register_buffer("k", k.float().view(1, LATENT, 1, 1))

    def forward(self, sample, timestep):
        sa, so = self.at(timestep)
        return (sample - sa * self.k) / so


class Img2ImgOracle(Tables):
    def forward(self, sample, timestep):
        sa, so = self.at(timestep)
        x0 = sample / sa
        return (sample - sa * x0) / so


class DepthToSpace(torch.nn.Module):
    def forward(self, z):
        return torch.nn.functional.pixel_shuffle(z, 4)


class ParamsEncoder(torch.nn.Module):
    """latent_parameters: the mean (space-to-depth) and a log variance of -30."""

    def forward(self, x):
        m = torch.nn.functional.pixel_unshuffle(x, 4)
        return torch.cat([m, torch.full_like(m, -30.0)], dim=1)


class SpaceToDepth(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.pixel_unshuffle(x, 4)


def autoencoder(d, config, encoder=None, enc_out="latent_sample"):
    for part in ("vae_decoder", "vae_encoder") if encoder is not None else ("vae_decoder",):
        fam.write_json(os.path.join(d, part, "config.json"), config)
    ae_export(DepthToSpace(), torch.randn(1, LATENT, 8, 8), os.path.join(d, "vae_decoder", "model.onnx"),
              "latent_sample", "sample")
    if encoder is not None:
        ae_export(encoder, torch.randn(1, 3, 32, 32), os.path.join(d, "vae_encoder", "model.onnx"), "sample", enc_out)


def ae_export(module, x, path, inp, out):
    import onnx
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.onnx.export(module, x, path, opset_version=fam.OPSET, input_names=[inp], output_names=[out],
                      dynamic_axes={inp: fam.IMG, out: fam.IMG})
    m = onnx.load(path)
    m.producer_name = "tessera-tools"
    onnx.checker.check_model(m)
    onnx.save(m, path)


def main():
    t = torch.tensor([999, 10], dtype=torch.int64)
    g = torch.Generator().manual_seed(14)
    vq = {"_class_name": "VQModel", "in_channels": 3, "out_channels": 3, "latent_channels": LATENT,
          "vq_embed_dim": LATENT, "block_out_channels": [8, 8, 8], "num_vq_embeddings": 8192,
          "scaling_factor": 1.0}
    x51 = torch.randn(2, LATENT + 3, 8, 8, generator=g)
    fam.pipeline("latent-sr-oracle", "LDMSuperResolutionPipeline",
                 fam.unet_config("UNet2DModel", LATENT + 3, LATENT, 16, [8, 16]), SCHED, LatentSROracle(),
                 (x51, t), ["sample", "timestep"], index_extra={"vqvae": ["diffusers", "VQModel"]})
    autoencoder(os.path.join(OUT, "latent-sr-oracle"), vq)

    x48 = torch.randn(2, LATENT, 8, 8, generator=g)
    fam.pipeline("latent-base-oracle", "LDMPipeline", fam.unet_config("UNet2DModel", LATENT, LATENT, 8, [8, 16]),
                 SCHED, LatentBaseOracle(), (x48, t), ["sample", "timestep"],
                 index_extra={"vqvae": ["diffusers", "VQModel"]})
    autoencoder(os.path.join(OUT, "latent-base-oracle"), vq)

    kl = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": LATENT,
          "block_out_channels": [8, 8, 8], "scaling_factor": 0.5, "shift_factor": 0.1}
    fam.pipeline("img2img-oracle", "StableDiffusionImg2ImgPipeline",
                 fam.unet_config("UNet2DModel", LATENT, LATENT, 16, [8, 16]), SCHED, Img2ImgOracle(),
                 (x48, t), ["sample", "timestep"], index_extra={"vae": ["diffusers", "AutoencoderKL"]})
    autoencoder(os.path.join(OUT, "img2img-oracle"), kl, ParamsEncoder(), "latent_parameters")

    sd = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
          "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
          "trained_betas": None}
    x4 = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, fam.D_CTX, generator=g)
    fam.pipeline("sd-like", "StableDiffusionPipeline",
                 fam.unet_config("UNet2DConditionModel", 4, 4, 16, [8, 16], cross_attention_dim=fam.D_CTX), sd,
                 fam.FamilyNet(4, 4, 25, context=fam.D_CTX), (x4, t, ctx), ["sample", "timestep", "encoder_hidden_states"],
                 index_extra={"vae": ["diffusers", "AutoencoderKL"]})
    import shutil
    for part in ("vae_decoder", "vae_encoder"):
        dst = os.path.join(OUT, "sd-like", part)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(fam.ROOT, "testdata", "autoencoders", "kl-like", part), dst)

    # Closed-form checks.
    with torch.no_grad():
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        z = ParamsEncoder()(x)[:, :LATENT]
        assert torch.equal(DepthToSpace()(z), x)
        low = torch.rand(1, 3, 8, 8) * 2 - 1
        x0 = low.repeat_interleave(16, dim=1)
        near = torch.nn.functional.interpolate(low, scale_factor=4.0, mode="nearest")
        assert torch.equal(DepthToSpace()(x0), near)
    print("latent fixtures written to", OUT)


if __name__ == "__main__":
    main()
