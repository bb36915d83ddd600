#!/usr/bin/env python3
"""Float16 decoders and their float32 copies.

  /usr/bin/python3 tools/fp16_decoder.py --fp32 DIR
      DIR/model.onnx is a float16 decoder (Optimum's --dtype fp16): write DIR/model_fp32.onnx,
      the same graph in float32 (the main graph's float16 weights, constants, values and Cast
      nodes widened; exact; no subgraphs).
      Tessera decodes with the float16 graph and retries in model_fp32.onnx each tile whose
      float16 output overflowed (a NaN or an infinity). Without the file Tessera widens the
      graph in memory itself; the file is for graphs with external data, which it cannot.
  /usr/bin/python3 tools/fp16_decoder.py --fp16 SRC DST
      SRC/model.onnx is a float32 decoder: write DST/model.onnx in float16 (the scales of Resize
      stay float32, as ONNX requires) with SRC's config.json, and DST/model_fp32.onnx.

Graph inputs and outputs change type with the graph; Tessera converts its float32 tensors at
the boundary.
"""
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def convert(m, src_type, dst_type, dst_np):
    g = m.graph
    keep = {n.input[2] for n in g.node if n.op_type == "Resize" and len(n.input) > 2}
    for init in g.initializer:
        if init.name not in keep and init.data_type == src_type:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(dst_np), init.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == src_type:
            v.type.tensor_type.elem_type = dst_type
    for n in g.node:
        if n.output and n.output[0] in keep:
            continue
        for a in n.attribute:
            if a.name == "value" and a.t.data_type == src_type:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(dst_np)))
            if n.op_type == "Cast" and a.name == "to" and a.i == src_type:
                a.i = dst_type
    onnx.checker.check_model(m)
    return m


def main(argv):
    if len(argv) == 2 and argv[0] == "--fp32":
        d = argv[1]
        m = convert(onnx.load(os.path.join(d, "model.onnx")), TensorProto.FLOAT16, TensorProto.FLOAT, np.float32)
        onnx.save(m, os.path.join(d, "model_fp32.onnx"))
    elif len(argv) == 3 and argv[0] == "--fp16":
        src, dst = argv[1], argv[2]
        os.makedirs(dst, exist_ok=True)
        shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
        shutil.copy(os.path.join(src, "model.onnx"), os.path.join(dst, "model_fp32.onnx"))
        m = convert(onnx.load(os.path.join(src, "model.onnx")), TensorProto.FLOAT, TensorProto.FLOAT16, np.float16)
        onnx.save(m, os.path.join(dst, "model.onnx"))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
