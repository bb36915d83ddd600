package onnx

import (
	"fmt"
	"math"

	"github.com/x448/float16"
)

// ElemType is a tensor element type as ONNX declares it.
type ElemType string

// Element types Tessera converts at the boundary. Others are described by
// inspect but cannot be fed.
const (
	Float32 ElemType = "float32"
	Float16 ElemType = "float16"
	Float64 ElemType = "float64"
	Int64   ElemType = "int64"
	Int32   ElemType = "int32"
)

// Tensor is a dense row-major tensor on the Go side. Floating-point data lives
// in Float whatever the graph's float type; integer data in Int. A scalar has
// an empty Shape and one element.
type Tensor struct {
	Shape []int64
	Float []float32
	Int   []int64
}

// FloatTensor returns a float tensor of the given shape over data (not copied).
func FloatTensor(data []float32, shape ...int64) Tensor {
	return Tensor{Shape: shape, Float: data}
}

// IntTensor returns an integer tensor of the given shape over data (not copied).
func IntTensor(data []int64, shape ...int64) Tensor {
	return Tensor{Shape: shape, Int: data}
}

// Len is the number of elements the shape holds (1 for a scalar).
func (t Tensor) Len() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

func (t Tensor) dataLen() int {
	if t.Float != nil {
		return len(t.Float)
	}
	return len(t.Int)
}

// Float16Bits converts float32 values to IEEE 754 binary16 bits with
// round-to-nearest-even, as ONNX Runtime's own conversion does; values beyond
// the float16 range become ±Inf and NaN stays NaN.
func Float16Bits(dst []uint16, src []float32) {
	for i, v := range src {
		dst[i] = float16.Fromfloat32(v).Bits()
	}
}

// Float16ToFloat32 converts binary16 bits to float32 exactly.
func Float16ToFloat32(dst []float32, src []uint16) {
	for i, b := range src {
		dst[i] = float16.Frombits(b).Float32()
	}
}

// toInt64 converts float data to int64 by rounding to nearest, for graphs that
// take integer timesteps or labels; a value that is not within 1e-3 of an
// integer is an error, since truncating it would silently change the input.
func toInt64(src []float32) ([]int64, error) {
	out := make([]int64, len(src))
	for i, v := range src {
		r := math.Round(float64(v))
		if math.Abs(float64(v)-r) > 1e-3 || math.IsNaN(float64(v)) {
			return nil, fmt.Errorf("value %g at index %d is not an integer", v, i)
		}
		out[i] = int64(r)
	}
	return out, nil
}
