#!/usr/bin/env python3
"""Cut an exported decoder's (or encoder's) GroupNorm layers open, so that Tessera can give
every tile the statistics of the whole image (testdata/autoencoders/*/vae_decoder/model_sync.onnx;
a folder named vae_encoder is an encoder, its input pixels F times the latent).

torch exports GroupNorm as Reshape([B, G, -1]) -> InstanceNormalization -> Reshape -> Mul -> Add.
For the k-th InstanceNormalization this script
  - replaces it by (x - mean_k) * rstd_k * scale + bias, with mean_k and rstd_k new graph
    inputs of shape [1, G, 1] (the group statistics, which Tessera reduces over all tiles), and
  - adds the 4-D activation it normalises as a graph output gn_in_k,
and writes model_sync.onnx beside the model with sync.json: per layer its groups, epsilon, the
activation's channels and its scale relative to the latent (from shape inference at 8x8).

  /usr/bin/python3 tools/sync_decoder.py path/to/vae_decoder [path/to/vae_encoder ...]
"""
import copy
import json
import os
import sys

import onnx
from onnx import helper, numpy_helper, shape_inference, TensorProto


def main(folder):
    src = os.path.join(folder, "model.onnx")
    m = onnx.load(src)
    g = m.graph
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for init in g.initializer:
        consts[init.name] = numpy_helper.to_array(init)
    producer = {o: n for n in g.node for o in n.output}
    # shapes at a fixed 8x8 latent: a decoder's input, or an encoder's 8F x 8F pixels (F from
    # its config's block_out_channels), so that a layer's scale is relative to the latent
    factor = 1
    if os.path.basename(os.path.normpath(folder)) == "vae_encoder":
        with open(os.path.join(folder, "config.json")) as f:
            factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    fixed = copy.deepcopy(m)
    inp = fixed.graph.input[0].type.tensor_type.shape.dim
    latent = inp[1].dim_value
    for i, v in enumerate([1, latent, 8 * factor, 8 * factor]):
        inp[i].ClearField("dim_param")
        inp[i].dim_value = v
    inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    layers = []
    new_nodes = []
    for n in g.node:
        if n.op_type != "InstanceNormalization":
            new_nodes.append(n)
            continue
        k = len(layers)
        reshape = producer[n.input[0]]
        x4 = reshape.input[0]
        groups = int(consts[n.input[1]].shape[0])
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        shp = shapes.get(x4)
        if not shp or len(shp) != 4 or shp[2] % 8:
            raise SystemExit(f"layer {k}: no 4-D shape for {x4}: {shp}")
        mean, rstd = f"gn_mean_{k}", f"gn_rstd_{k}"
        g.input.append(helper.make_tensor_value_info(mean, TensorProto.FLOAT, [1, groups, 1]))
        g.input.append(helper.make_tensor_value_info(rstd, TensorProto.FLOAT, [1, groups, 1]))
        out = f"gn_in_{k}"
        new_nodes.append(helper.make_node("Identity", [x4], [out]))
        g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", shp[1], "h", "w"]))
        shape_g1 = f"gn_shape_{k}"
        new_nodes.append(helper.make_node("Constant", [], [shape_g1], value=numpy_helper.from_array(
            __import__("numpy").array([groups, 1], dtype="int64"))))
        sc, bi = f"gn_scale_{k}", f"gn_bias_{k}"
        new_nodes.append(helper.make_node("Reshape", [n.input[1], shape_g1], [sc]))
        new_nodes.append(helper.make_node("Reshape", [n.input[2], shape_g1], [bi]))
        a, b, c = f"gn_sub_{k}", f"gn_mul_{k}", f"gn_scaled_{k}"
        new_nodes.append(helper.make_node("Sub", [n.input[0], mean], [a]))
        new_nodes.append(helper.make_node("Mul", [a, rstd], [b]))
        new_nodes.append(helper.make_node("Mul", [b, sc], [c]))
        new_nodes.append(helper.make_node("Add", [c, bi], [n.output[0]]))
        layers.append({"index": k, "groups": groups, "epsilon": eps, "channels": shp[1], "scale": shp[2] // 8,
                       "mean": mean, "rstd": rstd, "activation": out})
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.checker.check_model(m)
    onnx.save(m, os.path.join(folder, "model_sync.onnx"))
    with open(os.path.join(folder, "sync.json"), "w") as f:
        json.dump({"layers": layers, "output": g.output[0].name, "input": g.input[0].name}, f, indent=2)
        f.write("\n")
    print(f"{folder}: {len(layers)} GroupNorm layers cut")


if __name__ == "__main__":
    for d in sys.argv[1:]:
        main(d)
