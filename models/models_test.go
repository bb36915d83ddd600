package models

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tessera/config"
	"tessera/onnx"
)

var testEnv *onnx.Env

func TestMain(m *testing.M) {
	env, err := onnx.Open(config.Default().Runtime, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "models tests need ONNX Runtime:", err)
		os.Exit(1)
	}
	testEnv = env
	code := m.Run()
	env.Close()
	os.Exit(code)
}

func TestEmbeddedModelsRun(t *testing.T) {
	if got := strings.Join(Names(), ","); got != "demo-base,demo-sr" {
		t.Fatalf("embedded = %s", got)
	}
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			m, err := Resolver{}.Resolve(testEnv, name)
			if err != nil {
				t.Fatal(err)
			}
			if m.RolesGuessed() {
				t.Fatal("embedded model without manifest")
			}
			if c := m.CheckContract(); !c.Fits || c.Kind != m.Manifest.Kind {
				t.Fatalf("contract %+v", c)
			}
			s, err := testEnv.NewSession(m, onnx.SessionOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			mult := int64(m.Manifest.SizeMultiple)
			for _, shape := range [][3]int64{{1, 8 * mult, 8 * mult}, {3, 4 * mult, 12 * mult}} {
				b, h, w := shape[0], shape[1], shape[2]
				n := int(b * 3 * h * w)
				in := map[string]onnx.Tensor{}
				for _, io := range m.Inputs {
					switch io.Role {
					case onnx.RoleSample, onnx.RoleLowres:
						v := make([]float32, n)
						for i := range v {
							v[i] = float32(math.Sin(float64(i) * 0.1))
						}
						in[io.Name] = onnx.FloatTensor(v, b, 3, h, w)
					case onnx.RoleTimestep:
						in[io.Name] = onnx.FloatTensor(fill(int(b), 500), b)
					case onnx.RoleNoiseLevel:
						in[io.Name] = onnx.FloatTensor(fill(int(b), 0.1), b)
					}
				}
				out, err := s.Run(in)
				if err != nil {
					t.Fatalf("%v: %v", shape, err)
				}
				pred := out[m.Output(onnx.RolePrediction).Name]
				if fmt.Sprint(pred.Shape) != fmt.Sprint([]int64{b, 3, h, w}) {
					t.Fatalf("%v: output shape %v", shape, pred.Shape)
				}
				for i, v := range pred.Float {
					if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
						t.Fatalf("%v: value %d is %g", shape, i, v)
					}
				}
			}
		})
	}
}

func fill(n int, v float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func TestResolveOrder(t *testing.T) {
	dir := t.TempDir()
	fixture := filepath.Join("..", "testdata", "models", "conv-sr")
	os.MkdirAll(filepath.Join(dir, "mine"), 0o755)
	for _, f := range []string{"model.onnx", "tessera.yaml"} {
		b, err := os.ReadFile(filepath.Join(fixture, f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, "mine", f), b, 0o644)
	}
	r := Resolver{Dirs: []string{dir}}
	if m, err := r.Resolve(testEnv, "mine"); err != nil || m.Kind != onnx.KindSR {
		t.Fatalf("by directory name: %v", err)
	}
	if _, err := r.Resolve(testEnv, filepath.Join(fixture, "model.onnx")); err == nil || !strings.Contains(err.Error(), "paths to models are not allowed") {
		t.Fatalf("path without allow_paths: %v", err)
	}
	r.AllowPaths = true
	if _, err := r.Resolve(testEnv, filepath.Join(fixture, "model.onnx")); err != nil {
		t.Fatalf("path with allow_paths: %v", err)
	}
	_, err := r.Resolve(testEnv, "nope")
	if !errors.Is(err, ErrUnknownModel) || !strings.Contains(err.Error(), "demo-base") || !strings.Contains(err.Error(), dir) {
		t.Fatalf("unknown: %v", err)
	}
}
