#!/usr/bin/env python3
"""Model-family fixtures for the Go tests, written to testdata/families/<name>/.

Each is a folder as diffusers and Optimum write one, with no tessera.yaml: model.onnx
(inputs sample, timestep, [class_labels], [encoder_hidden_states]; output out_sample;
dynamic batch, height and width; opset 17), the U-Net's config.json and a
scheduler_config.json, and for the pipeline families a pipeline folder
(model_index.json, unet/, scheduler/, low_res_scheduler/ or image_noising_scheduler/).
The modules are the project's own: small convolution nets with the IO signature of
each family (random weights), and oracles whose exact prediction is a closed form of
every input they take (see testdata/families/README.md).

Run from the repository root:  /usr/bin/python3 tools/make_family_fixtures.py
Deterministic: fixed seeds, no training.
"""
import json
import os
import sys

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schedule  # noqa: E402

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "testdata", "families")
OPSET = 17
IMG = {0: "batch", 2: "height", 3: "width"}
D_CTX = 32  # context width of the text-conditioned fixtures (T5-XXL's is 4096, CLIP's 1024)

# Scheduler configs of the families, with the keys and values their repositories ship.
DDPM_CIFAR = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
              "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
              "trained_betas": None, "variance_type": "fixed_large"}
LDM_SR = {"_class_name": "DDIMScheduler", "beta_end": 0.0155, "beta_schedule": "scaled_linear",
          "beta_start": 0.0015, "clip_sample": False, "num_train_timesteps": 1000,
          "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
X4 = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
      "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
      "prediction_type": "v_prediction", "set_alpha_to_one": False, "steps_offset": 1,
      "trained_betas": None}
X4_LOW_RES = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
              "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
              "trained_betas": None, "variance_type": "fixed_small"}
IF2 = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
       "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
       "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000,
       "prediction_type": "epsilon", "sample_max_value": 1.0, "thresholding": True,
       "variance_type": "learned_range"}
IF2_NOISING = {"_class_name": "DDPMScheduler", "beta_end": 0.02,
               "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "clip_sample": True,
               "num_train_timesteps": 1000, "variance_type": "fixed_small"}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def unet_config(cls, cin, cout, sample_size, blocks, **extra):
    cfg = {"_class_name": cls, "_diffusers_version": "0.21.0", "in_channels": cin,
           "out_channels": cout, "sample_size": sample_size, "block_out_channels": blocks,
           "layers_per_block": 1, "norm_num_groups": 8}
    cfg.update(extra)
    return cfg


def export(module, args, path, names, dyn):
    module.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.onnx.export(module, args, path, opset_version=OPSET, input_names=names,
                      output_names=["out_sample"], dynamic_axes=dyn, do_constant_folding=True)
    m = onnx.load(path)
    m.producer_name = "tessera-tools"
    onnx.checker.check_model(m)
    onnx.save(m, path)
    assert [i.name for i in m.graph.input] == names, (path, [i.name for i in m.graph.input])


def tables(sched):
    ab = schedule.alphas_cumprod(sched["beta_schedule"], sched["num_train_timesteps"],
                                 sched["beta_start"], sched["beta_end"])
    return (torch.from_numpy(np.sqrt(ab).astype(np.float32)),
            torch.from_numpy(np.sqrt(1 - ab).astype(np.float32)), ab)


# ------------------------------------------------------------------ random-weight nets
class FamilyNet(torch.nn.Module):
    """Two 3x3 convolutions (receptive radius 2), tanh between; the timestep, the class
    label or noise level and the context's token mean enter as per-channel biases."""

    def __init__(self, cin, cout, seed, classes=0, context=0, scalar_t=False):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = torch.nn.Conv2d(cin, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, cout, 3, padding=1)
        self.t = torch.nn.Linear(1, 8)
        self.cls = torch.nn.Embedding(classes, 8) if classes else None
        self.ctx = torch.nn.Linear(context, 8) if context else None
        self.scalar_t = scalar_t

    def forward(self, sample, timestep, *rest):
        t = timestep.float().reshape(-1, 1) / 1000.0
        if self.scalar_t:
            t = t.expand(sample.shape[0], 1)
        e = self.t(t)
        i = 0
        if self.cls is not None:
            e = e + self.cls(rest[i])
            i += 1
        if self.ctx is not None:
            e = e + self.ctx(rest[i].mean(dim=1))
        h = torch.tanh(self.c1(sample) + e.view(-1, 8, 1, 1))
        return self.c2(h)


# ------------------------------------------------------------------ oracles
def context_term(ctx, c):
    """Per channel: the token mean of the context's first c features."""
    return ctx[:, :, :c].mean(dim=1).view(-1, c, 1, 1)


LEVEL_GAIN = torch.tensor([0.1, -0.2, 0.3, 0.05])  # per channel, times level/1000


class OracleDDPM(torch.nn.Module):
    """Exact epsilon for point-mass data x* = (0.25, -0.5, 0.75) per channel."""

    def __init__(self, sched):
        super().__init__()
        sa, so, _ = tables(sched)
        self.register_buffer("sa", sa)
        self.register_buffer("so", so)
        self.register_buffer("x", torch.tensor([0.25, -0.5, 0.75]).view(1, 3, 1, 1))

    def forward(self, sample, timestep):
        ti = torch.clamp(torch.round(timestep.float()), 0, 999).long().reshape(-1)
        sa, so = self.sa[ti].view(-1, 1, 1, 1), self.so[ti].view(-1, 1, 1, 1)
        return (sample - sa * self.x) / so


class OracleSR(torch.nn.Module):
    """Exact prediction for x0* = [low-res | 0...] + context term + level term.

    c noisy channels, l low-res channels concatenated after them. pred is "epsilon" or
    "v_prediction"; learned doubles the output with a constant variance half (7.0) that
    the samplers must not read."""

    def __init__(self, sched, c, l, pred, learned, context, level):
        super().__init__()
        sa, so, _ = tables(sched)
        self.register_buffer("sa", sa)
        self.register_buffer("so", so)
        self.c, self.l, self.pred, self.learned = c, l, pred, learned
        self.context, self.level = context, level
        self.register_buffer("gain", LEVEL_GAIN[:c].view(1, c, 1, 1))

    def forward(self, sample, timestep, *rest):
        c, l = self.c, self.l
        x, low = sample[:, :c], sample[:, c:c + l]
        ti = torch.clamp(torch.round(timestep.float()), 0, 999).long().reshape(-1)
        sa, so = self.sa[ti].view(-1, 1, 1, 1), self.so[ti].view(-1, 1, 1, 1)
        x0 = low[:, :min(c, l)]
        if c > l:
            x0 = torch.cat([x0, torch.zeros_like(x[:, l:])], dim=1)
        i = 0
        if self.level:
            x0 = x0 + self.gain * (rest[i].float().view(-1, 1, 1, 1) / 1000.0)
            i += 1
        if self.context:
            x0 = x0 + context_term(rest[i], c)
        if self.pred == "v_prediction":
            out = (sa * x - x0) / so
        else:
            out = (x - sa * x0) / so
        if self.learned:
            out = torch.cat([out, torch.full_like(out, 7.0)], dim=1)
        return out


# ------------------------------------------------------------------ the families
def ddpm(name, net, scalar_t):
    d = os.path.join(OUT, name)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor(500.0) if scalar_t else torch.tensor([999, 10], dtype=torch.int64)
    dyn = {"sample": IMG, "out_sample": IMG}
    if not scalar_t:
        dyn["timestep"] = {0: "batch"}
    export(net, (x, t), os.path.join(d, "model.onnx"), ["sample", "timestep"], dyn)
    write_json(os.path.join(d, "config.json"), unet_config("UNet2DModel", 3, 3, 32, [8, 16]))
    write_json(os.path.join(d, "scheduler_config.json"), DDPM_CIFAR)


def pipeline(name, pipe_cls, unet_cfg, sched, net, args, names, extra_sched=None, index_extra=None):
    d = os.path.join(OUT, name)
    dyn = {n: IMG for n in ("sample", "out_sample")}
    for n in names[1:]:
        dyn[n] = {0: "batch"}
    if "encoder_hidden_states" in names:
        dyn["encoder_hidden_states"] = {0: "batch", 1: "sequence_length"}  # as Optimum exports it
    export(net, args, os.path.join(d, "unet", "model.onnx"), names, dyn)
    write_json(os.path.join(d, "unet", "config.json"), unet_cfg)
    write_json(os.path.join(d, "scheduler", "scheduler_config.json"), sched)
    index = {"_class_name": pipe_cls, "_diffusers_version": "0.21.0",
             "scheduler": ["diffusers", sched["_class_name"]], "unet": ["diffusers", "UNet2DConditionModel"]}
    for folder, cfg in (extra_sched or {}).items():
        write_json(os.path.join(d, folder, "scheduler_config.json"), cfg)
        index[folder] = ["diffusers", cfg["_class_name"]]
    index.update(index_extra or {})
    write_json(os.path.join(d, "model_index.json"), index)


class OracleTextEncoder(torch.nn.Module):
    """last_hidden_state[b, l, d] = 0.2 * ((id * (d + 1)) mod 97) / 97 - 0.1: every token's id,
    at every position, enters the embedding in closed form."""

    def forward(self, input_ids):
        d = torch.arange(1, D_CTX + 1, dtype=torch.int64).view(1, 1, -1)
        v = torch.remainder(input_ids.unsqueeze(-1) * d, 97).float()
        return 0.2 * v / 97.0 - 0.1


class OracleT5Encoder(torch.nn.Module):
    """As OracleTextEncoder, times the attention mask (T5's input_ids [B, L] and
    attention_mask [B, L]): padding embeds to zero."""

    def forward(self, input_ids, attention_mask):
        d = torch.arange(1, D_CTX + 1, dtype=torch.int64).view(1, 1, -1)
        v = torch.remainder(input_ids.unsqueeze(-1) * d, 97).float()
        return (0.2 * v / 97.0 - 0.1) * attention_mask.unsqueeze(-1).float()


def t5_text_encoder(d):
    ids = torch.tensor([[35, 95, 1] + [0] * 74], dtype=torch.int64)
    mask = torch.tensor([[1, 1, 1] + [0] * 74], dtype=torch.int64)
    path = os.path.join(d, "text_encoder", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.onnx.export(OracleT5Encoder().eval(), (ids, mask), path, opset_version=OPSET,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"},
                                    "last_hidden_state": {0: "batch", 1: "sequence"}})
    om = onnx.load(path)
    om.producer_name = "tessera-tools"
    onnx.save(om, path)
    write_json(os.path.join(d, "text_encoder", "config.json"),
               {"_class_name": "T5EncoderModel", "architectures": ["T5EncoderModel"], "d_model": D_CTX,
                "model_type": "t5"})
    tdir = os.path.join(d, "tokenizer")
    os.makedirs(tdir, exist_ok=True)
    import shutil
    shutil.copy(os.path.join(ROOT, "testdata", "tokenizer", "t5-like", "spiece.model"), os.path.join(tdir, "spiece.model"))
    write_json(os.path.join(tdir, "tokenizer_config.json"),
               {"tokenizer_class": "T5Tokenizer", "model_max_length": 77, "eos_token": "</s>",
                "pad_token": "<pad>", "unk_token": "<unk>"})


SMALL_MERGES = 2000  # of CLIP's merge list, for a small tokenizer/ folder


def text_encoder(d):
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73], dtype=torch.int64)
    m = OracleTextEncoder()
    path = os.path.join(d, "text_encoder", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    m.eval()
    torch.onnx.export(m, (ids,), path, opset_version=OPSET, input_names=["input_ids"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "last_hidden_state": {0: "batch", 1: "sequence"}})
    om = onnx.load(path)
    om.producer_name = "tessera-tools"
    onnx.save(om, path)
    write_json(os.path.join(d, "text_encoder", "config.json"),
               {"_class_name": "CLIPTextModel", "architectures": ["CLIPTextModel"], "hidden_size": D_CTX,
                "max_position_embeddings": 77, "model_type": "clip_text_model"})
    # tokenizer/: vocab.json and merges.txt from the first SMALL_MERGES of CLIP's merge list
    # (../shared/data/clip, MIT), the byte symbols in CLIP's order, then the special tokens.
    import gzip
    src = os.path.join(ROOT, "..", "shared", "data", "clip", "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(src).read().decode("utf-8").split("\n")[1:SMALL_MERGES + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    sym = [chr(c) for c in cs]
    vocab = sym + [s + "</w>" for s in sym] + ["".join(mm.split()) for mm in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tdir = os.path.join(d, "tokenizer")
    write_json(os.path.join(tdir, "vocab.json"), {v: i for i, v in enumerate(vocab)})
    with open(os.path.join(tdir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json(os.path.join(tdir, "special_tokens_map.json"),
               {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"})
    write_json(os.path.join(tdir, "tokenizer_config.json"),
               {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True})


def main():
    # DDPM pixel base (UNet2DModel): int64 [B] timestep, and a float scalar variant.
    ddpm("ddpm-like", FamilyNet(3, 3, 21), False)
    ddpm("ddpm-like-scalar", FamilyNet(3, 3, 21, scalar_t=True), True)
    ddpm("ddpm-oracle", OracleDDPM(DDPM_CIFAR), False)

    g = torch.Generator().manual_seed(12)
    lab = torch.tensor([20, 250], dtype=torch.int64)
    ctx = torch.randn(2, 7, D_CTX, generator=g)
    t = torch.tensor([999, 10], dtype=torch.int64)

    # LDM 4x SR (latent VQ-f4): sample = 3 latent + 3 low-res -> 3.
    x6 = torch.randn(2, 6, 16, 16, generator=g)
    for name, net in (("ldm-sr-like", FamilyNet(6, 3, 22)),
                      ("ldm-sr-oracle", OracleSR(LDM_SR, 3, 3, "epsilon", False, False, False))):
        pipeline(name, "LDMSuperResolutionPipeline", unet_config("UNet2DModel", 6, 3, 64, [8, 16]),
                 LDM_SR, net, (x6, t), ["sample", "timestep"],
                 index_extra={"vqvae": ["diffusers", "VQModel"]})

    # SD x4 upscaler (latent VAE-f4): sample = 4 latent + 3 low-res, class_labels = noise
    # level 0..350, context -> 4 channels, v-prediction.
    x7 = torch.randn(2, 7, 16, 16, generator=g)
    x4cfg = unet_config("UNet2DConditionModel", 7, 4, 128, [8, 16], num_class_embeds=1000,
                        cross_attention_dim=D_CTX)
    # The oracle's DDIM ends at alpha = 1 (set_alpha_to_one), so that it lands on x0 exactly.
    # Its low-res noising schedule differs from its own (linear against scaled_linear), so that
    # a test tells which one noised the low-res image.
    x4_oracle = dict(X4, set_alpha_to_one=True)
    for name, net, sched, low in (("x4-like", FamilyNet(7, 4, 23, classes=1000, context=D_CTX), X4, X4_LOW_RES),
                                  ("x4-oracle", OracleSR(x4_oracle, 4, 3, "v_prediction", False, True, True), x4_oracle,
                                   dict(X4_LOW_RES, beta_schedule="linear", beta_end=0.03))):
        pipeline(name, "StableDiffusionUpscalePipeline", x4cfg, sched, net, (x7, t, lab, ctx),
                 ["sample", "timestep", "class_labels", "encoder_hidden_states"],
                 extra_sched={"low_res_scheduler": low},
                 index_extra={"vae": ["diffusers", "AutoencoderKL"], "max_noise_level": 350})

    # DeepFloyd IF stage II (pixels): sample = 3 noisy + 3 upsampled low-res, class_labels =
    # augmentation level, T5 context -> 6 channels (epsilon + learned variance).
    if2cfg = unet_config("UNet2DConditionModel", 6, 6, 256, [8, 16], class_embed_type="timestep",
                         cross_attention_dim=D_CTX)
    for name, net in (("if2-like", FamilyNet(6, 6, 24, classes=1001, context=D_CTX)),
                      ("if2-oracle", OracleSR(IF2, 3, 3, "epsilon", True, True, True))):
        pipeline(name, "IFSuperResolutionPipeline", if2cfg, IF2, net, (x6, t, lab, ctx),
                 ["sample", "timestep", "class_labels", "encoder_hidden_states"],
                 extra_sched={"image_noising_scheduler": IF2_NOISING})

    # IF II-like oracle pipeline with its own text side: a CLIP-like text encoder oracle
    # (input_ids int64 [B,77] -> last_hidden_state [B,77,32]) and a tokenizer/ folder.
    pipeline("if2-text", "IFSuperResolutionPipeline", if2cfg, IF2,
             OracleSR(IF2, 3, 3, "epsilon", True, True, True), (x6, t, lab, ctx),
             ["sample", "timestep", "class_labels", "encoder_hidden_states"],
             extra_sched={"image_noising_scheduler": IF2_NOISING},
             index_extra={"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]})
    text_encoder(os.path.join(OUT, "if2-text"))
    # The same with a T5-like text side: the encoder oracle with an attention_mask input,
    # as Optimum exports T5, and SentencePiece's spiece.model (tools/make_tokenizer_fixtures.py).
    pipeline("if2-t5", "IFSuperResolutionPipeline", if2cfg, IF2,
             OracleSR(IF2, 3, 3, "epsilon", True, True, True), (x6, t, lab, ctx),
             ["sample", "timestep", "class_labels", "encoder_hidden_states"],
             extra_sched={"image_noising_scheduler": IF2_NOISING},
             index_extra={"text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"]})
    t5_text_encoder(os.path.join(OUT, "if2-t5"))

    # The latent pipelines' decoders (tools/make_autoencoder_fixtures.py, run first): the
    # KL-like VAE for x4-like, the VQ-like one for ldm-sr-like.
    import shutil
    for name, ae in (("x4-like", "kl-like"), ("ldm-sr-like", "vq-like")):
        src = os.path.join(ROOT, "testdata", "autoencoders", ae, "vae_decoder")
        dst = os.path.join(OUT, name, "vae_decoder")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)

    # Context files as a user would give them: a T5-like [7, 32] embedding as .npy
    # (float32) and as .safetensors (float16, [1, 7, 32], named prompt_embeds).
    cdir = os.path.join(OUT, "contexts")
    os.makedirs(cdir, exist_ok=True)
    emb = (torch.randn(7, D_CTX, generator=torch.Generator().manual_seed(13)) * 0.1).numpy().astype(np.float32)
    np.save(os.path.join(cdir, "prompt-7x32.npy"), emb)
    np.save(os.path.join(cdir, "negative-7x32.npy"), np.zeros_like(emb))
    np.save(os.path.join(cdir, "wrong-width-7x16.npy"), emb[:, :16].copy())
    raw = emb.astype(np.float16).tobytes()
    header = json.dumps({"prompt_embeds": {"dtype": "F16", "shape": [1, 7, D_CTX],
                                           "data_offsets": [0, len(raw)]}}).encode()
    with open(os.path.join(cdir, "prompt-7x32.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw)

    # Closed-form checks of the oracles against numpy, in float64.
    _, _, ab = tables(LDM_SR)
    with torch.no_grad():
        o = OracleSR(IF2, 3, 3, "epsilon", True, True, True)
        got = o(x6, t, lab, ctx).double().numpy()
        _, _, abi = tables(IF2)
        a = abi[t.numpy()].reshape(-1, 1, 1, 1)
        x0 = x6[:, 3:].double().numpy() + LEVEL_GAIN[:3].double().numpy().reshape(1, 3, 1, 1) * \
            (lab.double().numpy().reshape(-1, 1, 1, 1) / 1000) + \
            ctx[:, :, :3].double().numpy().mean(axis=1).reshape(-1, 3, 1, 1)
        want = (x6[:, :3].double().numpy() - np.sqrt(a) * x0) / np.sqrt(1 - a)
        err = np.abs(got[:, :3] - want).max() / max(1, np.abs(want).max())
        assert err < 1e-5 and np.all(got[:, 3:] == 7.0), ("if2-oracle", err)
    print("family fixtures written to", OUT)


if __name__ == "__main__":
    main()
