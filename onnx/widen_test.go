package onnx

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestWidenFloat16 widens the overflow-f16 fixture's float16 decoder: the
// result declares float32 inputs and outputs and is byte for byte what the
// float16 graph's tensors say in float32, and ONNX Runtime runs it to the
// same values as the fixture's own float32 copy (made by
// tools/fp16_decoder.py from the float32 export: exact, since its
// constants are float16-representable).
func TestWidenFloat16(t *testing.T) {
	dir := filepath.Join("..", "testdata", "autoencoders", "overflow-f16", "vae_decoder")
	half, err := os.ReadFile(filepath.Join(dir, "model.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	wide, err := WidenFloat16(half)
	if err != nil {
		t.Fatal(err)
	}
	h16, err := ParseModelHeader(half)
	if err != nil {
		t.Fatal(err)
	}
	h32, err := ParseModelHeader(wide)
	if err != nil {
		t.Fatal(err)
	}
	if h16.Inputs[0].Type != Float16 || h32.Inputs[0].Type != Float32 || h32.Outputs[0].Type != Float32 || h32.Inputs[0].Name != h16.Inputs[0].Name {
		t.Fatalf("inputs %+v → %+v, outputs %+v", h16.Inputs, h32.Inputs, h32.Outputs)
	}
	env := testEnv
	m, err := env.LoadModelBytes("widened", wide, nil)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := env.LoadModel(filepath.Join(dir, "model_fp32.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	z := make([]float32, 48*2*2)
	for i := range z {
		z[i] = float32(i%17)*9.5 - 70 // up to ±80: over float16's range times 1000
	}
	var outs [2][]float32
	for k, mm := range []*Model{m, ref} {
		s, err := env.NewSession(mm, SessionOptions{})
		if err != nil {
			t.Fatal(err)
		}
		res, err := s.RunShaped(context.Background(), map[string]Tensor{"latent_sample": FloatTensor(z, 1, 48, 2, 2)}, map[string][]int64{"sample": {1, 3, 8, 8}})
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		outs[k] = res["sample"].Float
	}
	for i := range outs[1] {
		if outs[0][i] != outs[1][i] {
			t.Fatalf("value %d: widened %g, float32 copy %g", i, outs[0][i], outs[1][i])
		}
	}
	// What is not a float16 model is refused or passed through, never a panic.
	if _, err := WidenFloat16([]byte{0x0a, 0xff}); err == nil {
		t.Error("truncated bytes widened")
	}
}

func FuzzWidenFloat16(f *testing.F) {
	data, err := os.ReadFile(filepath.Join("..", "testdata", "autoencoders", "overflow-f16", "vae_decoder", "model.onnx"))
	if err == nil {
		f.Add(data)
	}
	f.Add([]byte{0x3a, 0x02, 0x2a, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		out, err := WidenFloat16(b)
		if err == nil {
			if _, err := WidenFloat16(out); err != nil {
				t.Fatalf("widened bytes do not widen again: %v", err)
			}
		}
	})
}
