// Package onnx runs ONNX graphs with ONNX Runtime for Tessera: it finds and
// loads the runtime library, keeps the one environment of the process,
// attaches execution providers (CPU, CUDA, TensorRT) in the configured order,
// describes a model's inputs and outputs and their diffusion roles, converts
// tensors at the boundary (float32, float16, int64) and runs sessions that
// many goroutines may share.
//
// The package imports nothing of the project but config.
package onnx
