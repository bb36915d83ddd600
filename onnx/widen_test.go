package onnx

import (
	"context"
	"os"
	"path/filepath"
	"strings"
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

// A tessera.yaml autoencoder: key wins over the pipeline folder's own,
// relative to the model's folder, with everything the folder's said
// forgotten and the contradiction kept.
func TestManifestAutoencoderOverridesPipelines(t *testing.T) {
	root := t.TempDir()
	copyDir := func(src, dst string) {
		filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(src, p)
			if d.IsDir() {
				return os.MkdirAll(filepath.Join(dst, rel), 0o755)
			}
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(dst, rel), data, 0o644)
		})
	}
	fam := filepath.Join("..", "testdata", "families")
	copyDir(filepath.Join(fam, "latent-base-oracle"), filepath.Join(root, "base"))
	copyDir(filepath.Join(fam, "img2img-oracle", "vae_decoder"), filepath.Join(root, "other", "vae_decoder"))
	copyDir(filepath.Join(fam, "img2img-oracle", "vae_encoder"), filepath.Join(root, "other", "vae_encoder"))
	os.WriteFile(filepath.Join(root, "base", "unet", ManifestFile), []byte("autoencoder: ../../other\n"), 0o644)
	_, _, man, err := ReadModelFile(filepath.Join(root, "base"))
	if err != nil {
		t.Fatal(err)
	}
	if man.Autoencoder != filepath.Join(root, "base", "unet", "..", "..", "other") || !man.Encoder || man.LatentScaling != 0.5 || man.LatentShift != 0.1 || man.DecodeFactor != 4 || len(man.Conflicts) == 0 {
		t.Fatalf("autoencoder %q encoder %v scaling %g shift %g factor %d conflicts %v", man.Autoencoder, man.Encoder, man.LatentScaling, man.LatentShift, man.DecodeFactor, man.Conflicts)
	}
	for _, f := range man.Facts {
		if f.Key == "decoder" && !strings.Contains(f.From, ManifestFile) {
			t.Errorf("decoder fact from %q, want %s", f.From, ManifestFile)
		}
	}
	// Naming the folder's own autoencoder contradicts nothing.
	os.WriteFile(filepath.Join(root, "base", "unet", ManifestFile), []byte("autoencoder: ..\n"), 0o644)
	if _, _, man, err = ReadModelFile(filepath.Join(root, "base")); err != nil || len(man.Conflicts) != 0 || man.DecodeFactor != 4 || man.Encoder {
		t.Errorf("the folder's own: %v, conflicts %v, factor %d, encoder %v", err, man.Conflicts, man.DecodeFactor, man.Encoder)
	}
}

func TestHasFloat16(t *testing.T) {
	ae := filepath.Join("..", "testdata", "autoencoders")
	for path, want := range map[string]bool{
		filepath.Join(ae, "overflow-f16", "vae_decoder", "model.onnx"):      true,
		filepath.Join(ae, "overflow-f16", "vae_decoder", "model_fp32.onnx"): false,
		filepath.Join(ae, "kl-like", "vae_decoder", "model.onnx"):           false,
	} {
		if got := HasFloat16File(path); got != want {
			t.Errorf("%s: %v, want %v", path, got, want)
		}
	}
	half, _ := os.ReadFile(filepath.Join(ae, "overflow-f16", "vae_decoder", "model.onnx"))
	wide, err := WidenFloat16(half)
	if err != nil || HasFloat16(wide) {
		t.Errorf("widened: float16 left (%v)", err)
	}
}
