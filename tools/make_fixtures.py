#!/usr/bin/env python3
"""Tiny ONNX fixture graphs for the Go tests, written to testdata/models/<name>/.

Run from the repository root:  python3 tools/make_fixtures.py
Deterministic: fixed seeds, no training. See testdata/models/README.md for the closed forms.
"""
import os
import sys

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import manifest  # noqa: E402
import schedule  # noqa: E402

torch.set_num_threads(2)
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testdata", "models")
OPSET = 17
T = 1000

ABAR = schedule.alphas_cumprod("squaredcos_cap_v2", T)            # float64
SQRT_ABAR = np.sqrt(ABAR).astype(np.float32)
SQRT_1M_ABAR = np.sqrt(1.0 - ABAR).astype(np.float32)

# oracle-base data table: class -> per-channel constant RGB image. Row 4 is the null class.
CLASS_TABLE = np.array([
    [0.50, -0.25, 0.00],
    [-0.50, 0.50, 0.25],
    [0.75, 0.75, -0.75],
    [-0.25, -0.50, 0.50],
    [0.00, 0.00, 0.00],   # null class (4): x* = 0, so guidance has an exact expected value
], dtype=np.float32)


def outdir(name):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    return d


def export(module, args, path, input_names, dynamic_axes):
    module.eval()
    torch.onnx.export(module, args, path, opset_version=OPSET, input_names=input_names,
                      output_names=["out_sample"], dynamic_axes=dynamic_axes,
                      do_constant_folding=True)
    m = onnx.load(path)
    # name the output's dims like the sample input's (the exporter invents names for some)
    out_dims = m.graph.output[0].type.tensor_type.shape.dim
    for i, d in enumerate(m.graph.input[0].type.tensor_type.shape.dim):
        out_dims[i].Clear()
        if d.dim_param:
            out_dims[i].dim_param = d.dim_param
        else:
            out_dims[i].dim_value = d.dim_value
    onnx.checker.check_model(m)
    onnx.save(m, path)
    got = [i.name for i in m.graph.input]
    assert got == input_names, (path, got, input_names)
    return m


IMG_AXES = {0: "batch", 2: "height", 3: "width"}


# ---------------------------------------------------------------- oracle-base
class OracleBase(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sqrt_abar", torch.from_numpy(SQRT_ABAR))
        self.register_buffer("sqrt_1m_abar", torch.from_numpy(SQRT_1M_ABAR))
        self.register_buffer("table", torch.from_numpy(CLASS_TABLE))

    def forward(self, sample, timestep, class_labels):
        sa = self.sqrt_abar[timestep].view(-1, 1, 1, 1)
        so = self.sqrt_1m_abar[timestep].view(-1, 1, 1, 1)
        x0 = self.table[class_labels].view(-1, 3, 1, 1)
        return (sample - sa * x0) / so


def oracle_base():
    d = outdir("oracle-base")
    m = OracleBase()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 16, generator=g)
    t = torch.tensor([0, 999], dtype=torch.int64)
    c = torch.tensor([2, 4], dtype=torch.int64)
    export(m, (x, t, c), os.path.join(d, "model.onnx"), ["sample", "timestep", "class_labels"],
           {"sample": IMG_AXES, "timestep": {0: "batch"}, "class_labels": {0: "batch"},
            "out_sample": IMG_AXES})
    # closed form in float64
    for tt in ([0, 999], [500, 17], [250, 250]):
        t = torch.tensor(tt)
        got = m(x, t, c).double().numpy()
        ab = ABAR[tt].reshape(-1, 1, 1, 1)
        xs = CLASS_TABLE[c.numpy()].astype(np.float64).reshape(-1, 3, 1, 1)
        want = (x.double().numpy() - np.sqrt(ab) * xs) / np.sqrt(1 - ab)
        err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
        assert err < 1e-5, ("oracle-base", tt, err)
    table_txt = "; ".join(f"{i}=({r[0]:g},{r[1]:g},{r[2]:g})" for i, r in enumerate(CLASS_TABLE))
    manifest.write(os.path.join(d, "tessera.yaml"), {
        "version": 1, "kind": "base", "prediction": "epsilon",
        "inputs": {"sample": "sample", "timestep": "timestep", "class": "class_labels"},
        "outputs": {"prediction": "out_sample"},
        "lowres_concat": False, "channels": 3, "native_size": [32, 32], "size_multiple": 1,
        "receptive_field": 0, "classes": 4, "null_class": 4,
        "schedule": dict(manifest.SCHEDULE_DEFAULT),
        "defaults": {"steps": 20, "sampler": "ddim", "guidance": 1.0},
        "description": "Test oracle: exact epsilon for point-mass data x*(class) = per-channel "
                       "constant RGB, table " + table_txt + " (4 = null class); "
                       "eps = (x_t - sqrt(abar[t]) x*) / sqrt(1 - abar[t]), squaredcos_cap_v2 T=1000",
        "license": "CC0-1.0",
    })


# ---------------------------------------------------------------- oracle-sr
class OracleSR(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sqrt_abar", torch.from_numpy(SQRT_ABAR))
        self.register_buffer("sqrt_1m_abar", torch.from_numpy(SQRT_1M_ABAR))

    def forward(self, sample, low_res, timestep, noise_level):
        ti = torch.clamp(torch.round(timestep), 0, T - 1).long()
        sa = self.sqrt_abar[ti].view(-1, 1, 1, 1)
        so = self.sqrt_1m_abar[ti].view(-1, 1, 1, 1)
        eps = (sample - sa * low_res) / so
        v = sa * eps - so * low_res
        # noise_level is accepted but has no effect (kept in the graph by a zero-weight term)
        return v + 0.0 * noise_level.view(-1, 1, 1, 1)


def oracle_sr():
    d = outdir("oracle-sr")
    m = OracleSR()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 12, generator=g)
    lr = torch.rand(2, 3, 8, 12, generator=g) * 2 - 1
    t = torch.tensor([10.4, 700.6])
    nl = torch.tensor([0.0, 0.3])
    export(m, (x, lr, t, nl), os.path.join(d, "model.onnx"),
           ["sample", "low_res", "timestep", "noise_level"],
           {"sample": IMG_AXES, "low_res": IMG_AXES, "timestep": {0: "batch"},
            "noise_level": {0: "batch"}, "out_sample": IMG_AXES})
    got = m(x, lr, t, nl).double().numpy()
    ab = ABAR[[10, 701]].reshape(-1, 1, 1, 1)
    want = (np.sqrt(ab) * x.double().numpy() - lr.double().numpy()) / np.sqrt(1 - ab)
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < 1e-4, ("oracle-sr", err)
    manifest.write(os.path.join(d, "tessera.yaml"), {
        "version": 1, "kind": "sr", "prediction": "v_prediction",
        "inputs": {"sample": "sample", "lowres": "low_res", "timestep": "timestep",
                   "noise_level": "noise_level"},
        "outputs": {"prediction": "out_sample"},
        "lowres_concat": False, "channels": 3, "scale": 4, "size_multiple": 1,
        "receptive_field": 0, "classes": 0, "null_class": -1,
        "schedule": dict(manifest.SCHEDULE_DEFAULT),
        "defaults": {"steps": 10, "sampler": "ddim", "guidance": 1.0, "strength": 0.5,
                     "noise_level": 0.0},
        "description": "Test oracle: exact v for data x0 = low_res; t = clamp(round_half_even(timestep), 0, 999); "
                       "v = (sqrt(abar[t]) x_t - x0) / sqrt(1 - abar[t]); noise_level unused",
        "license": "CC0-1.0",
    })


# ---------------------------------------------------------------- conv-sr
class ConvSR(torch.nn.Module):
    """Three 3x3 convolutions, tanh between, zero padding: receptive radius exactly 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1 = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.emb = torch.nn.Linear(2, 8)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, sample, low_res, timestep, noise_level):
        e = self.emb(torch.stack([timestep / 1000.0, noise_level], dim=1)).view(-1, 8, 1, 1)
        h = torch.tanh(self.c1(torch.cat([sample, low_res], dim=1)) + e)
        h = torch.tanh(self.c2(h))
        return self.c3(h)


def conv_sr():
    d = outdir("conv-sr")
    m = ConvSR().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, 48, generator=g)
    lr = torch.rand(2, 3, 40, 48, generator=g) * 2 - 1
    t = torch.tensor([999.0, 37.0])
    nl = torch.tensor([0.1, 0.0])
    export(m, (x, lr, t, nl), os.path.join(d, "model.onnx"),
           ["sample", "low_res", "timestep", "noise_level"],
           {"sample": IMG_AXES, "low_res": IMG_AXES, "timestep": {0: "batch"},
            "noise_level": {0: "batch"}, "out_sample": IMG_AXES})
    with torch.no_grad():
        full = m(x, lr, t, nl)
        # receptive field check: a crop with a halo of 3 reproduces the interior exactly,
        # and a halo of 2 does not.
        y0, y1, x0, x1 = 10, 26, 12, 30
        for halo, same in ((3, True), (2, False)):
            sub = m(x[..., y0 - halo:y1 + halo, x0 - halo:x1 + halo],
                    lr[..., y0 - halo:y1 + halo, x0 - halo:x1 + halo], t, nl)
            err = (sub[..., halo:-halo, halo:-halo] - full[..., y0:y1, x0:x1]).abs().max().item()
            assert (err < 1e-6) == same, ("conv-sr halo", halo, err)
    manifest.write(os.path.join(d, "tessera.yaml"), {
        "version": 1, "kind": "sr", "prediction": "epsilon",
        "inputs": {"sample": "sample", "lowres": "low_res", "timestep": "timestep",
                   "noise_level": "noise_level"},
        "outputs": {"prediction": "out_sample"},
        "lowres_concat": False, "channels": 3, "scale": 4, "size_multiple": 1,
        "receptive_field": 3, "classes": 0, "null_class": -1,
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear",
                     "beta_start": 0.0001, "beta_end": 0.02, "timestep_spacing": "leading",
                     "steps_offset": 1},
        "defaults": {"steps": 4, "sampler": "ddim", "guidance": 1.0, "strength": 0.5,
                     "noise_level": 0.1},
        "description": "Test fixture: 3 conv3x3 layers (zero padding, tanh), fixed random weights, "
                       "timestep/1000 and noise_level enter as a per-channel bias; receptive radius 3",
        "license": "CC0-1.0",
    })


# ---------------------------------------------------------------- sd-signature
def sd_signature(fp16):
    name = "sd-signature-fp16" if fp16 else "sd-signature"
    d = outdir(name)
    rng = np.random.default_rng(5)   # same weights for both precisions
    W = (rng.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32)
    B = (rng.standard_normal(4) * 0.1).astype(np.float32)
    P = (rng.standard_normal((32, 4)) * 0.2).astype(np.float32)
    et = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    npt = np.float16 if fp16 else np.float32
    inits = [numpy_helper.from_array(W.astype(npt), "conv_w"),
             numpy_helper.from_array(B.astype(npt), "conv_b"),
             numpy_helper.from_array(P.astype(npt), "ctx_proj"),
             numpy_helper.from_array(np.array(1000.0, np.float32), "t_scale"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "unsq_axes")]
    nodes = []
    names = {}
    for n in ("sample", "timestep", "encoder_hidden_states", "conv_w", "conv_b", "ctx_proj"):
        if fp16:
            nodes.append(helper.make_node("Cast", [n], [n + "_f32"], to=TensorProto.FLOAT))
            names[n] = n + "_f32"
        else:
            names[n] = n
    nodes += [
        helper.make_node("Conv", [names["sample"], names["conv_w"], names["conv_b"]], ["conv"],
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("ReduceMean", [names["encoder_hidden_states"]], ["ctx_mean"], axes=[1],
                         keepdims=0),
        helper.make_node("MatMul", ["ctx_mean", names["ctx_proj"]], ["ctx_bias2"]),
        helper.make_node("Unsqueeze", ["ctx_bias2", "unsq_axes"], ["ctx_bias"]),
        helper.make_node("Div", [names["timestep"], "t_scale"], ["t_div"]),
        helper.make_node("Add", ["t_div", "one"], ["t_gain"]),
        helper.make_node("Mul", ["conv", "t_gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "ctx_bias"], ["out_f32" if fp16 else "out_sample"]),
    ]
    if fp16:
        nodes.append(helper.make_node("Cast", ["out_f32"], ["out_sample"], to=TensorProto.FLOAT16))
    graph = helper.make_graph(
        nodes, name.replace("-", "_"),
        [helper.make_tensor_value_info("sample", et, ["batch", 4, "height", "width"]),
         helper.make_tensor_value_info("timestep", et, []),
         helper.make_tensor_value_info("encoder_hidden_states", et, ["batch", 77, 32])],
        [helper.make_tensor_value_info("out_sample", et, ["batch", 4, "height", "width"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tessera-tools")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, os.path.join(d, "model.onnx"))
    # reference implementation (numpy), used by the README's closed form
    x = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    ehs = rng.standard_normal((1, 77, 32)).astype(np.float32)
    out = reference_sd(x, np.float32(500), ehs, W, B, P)
    assert out.shape == (1, 4, 5, 6)
    np.savez(os.path.join("/tmp", name + "-weights.npz"), W=W, B=B, P=P)


def reference_sd(x, t, ehs, W, B, P):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    H, Wd = x.shape[2:]
    conv = np.zeros((x.shape[0], 4, H, Wd), np.float64)
    for dy in range(3):
        for dx in range(3):
            conv += np.einsum("oi,bihw->bohw", W[:, :, dy, dx], xp[:, :, dy:dy + H, dx:dx + Wd])
    conv += B.reshape(1, 4, 1, 1)
    bias = ehs.mean(axis=1) @ P
    return conv * (1 + t / 1000.0) + bias[:, :, None, None]


if __name__ == "__main__":
    oracle_base()
    oracle_sr()
    conv_sr()
    sd_signature(False)
    sd_signature(True)
    total = 0
    for root, _, files in os.walk(OUT):
        for f in files:
            if f.endswith(".onnx"):
                total += os.path.getsize(os.path.join(root, f))
    print(f"fixtures written to {OUT}, {total} bytes of ONNX")
