#!/usr/bin/python3
"""Fixtures for the onnx package's IO tests, built with the onnx helper API.

  testdata/models/fp16-batch/        float16 in and out, timestep [B]:
        out = float16(float32(sample) * timestep[b] + mean(encoder_hidden_states[b]))
  testdata/models/conv-sr-external/  conv-sr with its weights in model.onnx_data

Run from the repository root after tools/make_fixtures.py: /usr/bin/python3 tools/make_io_fixtures.py
"""
import os
import shutil

import onnx
from onnx import TensorProto, helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "models")


def fp16_batch():
    F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("sample", F16, ["batch", 4, "height", "width"]),
        helper.make_tensor_value_info("timestep", F16, ["batch"]),
        helper.make_tensor_value_info("encoder_hidden_states", F16, ["batch", 77, 32]),
    ]
    outputs = [helper.make_tensor_value_info("out_sample", F16, ["batch", 4, "height", "width"])]
    shape = helper.make_tensor("bshape", TensorProto.INT64, [4], [-1, 1, 1, 1])
    nodes = [
        helper.make_node("Cast", ["sample"], ["s32"], to=F32),
        helper.make_node("Cast", ["timestep"], ["t32"], to=F32),
        helper.make_node("Reshape", ["t32", "bshape"], ["t4"]),
        helper.make_node("Cast", ["encoder_hidden_states"], ["c32"], to=F32),
        helper.make_node("ReduceMean", ["c32"], ["cm"], axes=[1, 2], keepdims=0),
        helper.make_node("Reshape", ["cm", "bshape"], ["c4"]),
        helper.make_node("Mul", ["s32", "t4"], ["st"]),
        helper.make_node("Add", ["st", "c4"], ["y"]),
        helper.make_node("Cast", ["y"], ["out_sample"], to=F16),
    ]
    graph = helper.make_graph(nodes, "fp16_batch", inputs, outputs, initializer=[shape])
    model = helper.make_model(graph, producer_name="tessera-tools", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    d = os.path.join(ROOT, "fp16-batch")
    os.makedirs(d, exist_ok=True)
    onnx.save(model, os.path.join(d, "model.onnx"))


def conv_sr_external():
    src = os.path.join(ROOT, "conv-sr")
    d = os.path.join(ROOT, "conv-sr-external")
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model = onnx.load(os.path.join(src, "model.onnx"))
    onnx.save_model(model, os.path.join(d, "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    shutil.copy(os.path.join(src, "tessera.yaml"), os.path.join(d, "tessera.yaml"))


if __name__ == "__main__":
    fp16_batch()
    conv_sr_external()
    print("wrote fp16-batch and conv-sr-external")
