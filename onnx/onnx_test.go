package onnx

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"tessera/config"
)

var testEnv *Env

func TestMain(m *testing.M) {
	env, err := Open(config.Default().Runtime, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "onnx tests need ONNX Runtime:", err)
		os.Exit(1)
	}
	testEnv = env
	code := m.Run()
	env.Close()
	os.Exit(code)
}

func fixture(name string) string { return filepath.Join("..", "testdata", "models", name) }

func loadFixture(t testing.TB, name string) *Model {
	t.Helper()
	m, err := testEnv.LoadModel(fixture(name))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func newSession(t testing.TB, m *Model, rt *config.Runtime) *Session {
	t.Helper()
	s, err := testEnv.NewSession(m, SessionOptions{Runtime: rt})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// pattern fills n values with a deterministic, input-dependent pattern in [-1, 1].
func pattern(n int, seed float64) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = float32(math.Sin(float64(i)*0.37 + seed))
	}
	return out
}

// cosineAlphaBar is diffusers' squaredcos_cap_v2 cumulative alpha for T=1000,
// computed here from the closed form the fixtures document.
func cosineAlphaBar(t int) float64 {
	f := func(u float64) float64 { return math.Pow(math.Cos((u+0.008)/1.008*math.Pi/2), 2) }
	abar := 1.0
	for i := 0; i <= t; i++ {
		beta := math.Min(1-f(float64(i+1)/1000)/f(float64(i)/1000), 0.999)
		abar *= 1 - beta
	}
	return abar
}

func TestFindLibrary(t *testing.T) {
	t.Run("configured path missing", func(t *testing.T) {
		_, err := FindLibrary("/nonexistent/libonnxruntime.so.1")
		if !errors.Is(err, ErrLibraryNotFound) || !strings.Contains(err.Error(), "/nonexistent/libonnxruntime.so.1") || !strings.Contains(err.Error(), "make ort") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("env names a directory", func(t *testing.T) {
		t.Setenv(LibraryEnv, filepath.Join("..", ".ort"))
		lib, err := FindLibrary("")
		if err != nil || lib.Source != LibraryEnv || filepath.Base(lib.Path) != "libonnxruntime.so.1" {
			t.Fatalf("lib = %+v, err = %v", lib, err)
		}
	})
	t.Run("config beats env", func(t *testing.T) {
		t.Setenv(LibraryEnv, "/nonexistent")
		lib, err := FindLibrary(filepath.Join("..", ".ort", "libonnxruntime.so.1"))
		if err != nil || lib.Source != "config runtime.library" {
			t.Fatalf("lib = %+v, err = %v", lib, err)
		}
	})
	t.Run("working directory", func(t *testing.T) {
		lib, err := FindLibrary("")
		if err != nil || lib.Source != "workdir" {
			t.Fatalf("lib = %+v, err = %v", lib, err)
		}
	})
	t.Run("nowhere", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module x\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Chdir(dir)
		t.Setenv("LD_LIBRARY_PATH", "")
		_, err := FindLibrary("")
		if !errors.Is(err, ErrLibraryNotFound) {
			t.Fatalf("err = %v", err)
		}
		for _, want := range []string{filepath.Join(dir, ".ort"), "make ort", LibraryEnv, "runtime.library"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not mention %q", err, want)
			}
		}
	})
}

func TestOpenFromManyGoroutines(t *testing.T) {
	envs := make([]*Env, 8)
	var wg sync.WaitGroup
	for i := range envs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e, err := Open(config.Default().Runtime, nil)
			if err != nil {
				t.Error(err)
			}
			envs[i] = e
		}()
	}
	wg.Wait()
	for _, e := range envs {
		if e != testEnv {
			t.Fatalf("Open returned a second environment")
		}
	}
	for _, e := range envs {
		e.Close()
	}
	// The reference TestMain holds keeps the environment alive.
	if _, err := testEnv.LoadModel(fixture("conv-sr")); err != nil {
		t.Fatalf("environment torn down early: %v", err)
	}
	if testEnv.Version == "" || !strings.HasPrefix(testEnv.Version, "1.") {
		t.Errorf("version = %q", testEnv.Version)
	}
}

func TestDescribeFixtures(t *testing.T) {
	tests := []struct {
		name    string
		kind    string
		guessed bool
		roles   map[string]string // input name -> role
		types   map[string]ElemType
	}{
		{"oracle-base", KindBase, false, map[string]string{"sample": RoleSample, "timestep": RoleTimestep, "class_labels": RoleClass}, map[string]ElemType{"timestep": Int64, "class_labels": Int64}},
		{"oracle-sr", KindSR, false, map[string]string{"sample": RoleSample, "low_res": RoleLowres, "timestep": RoleTimestep, "noise_level": RoleNoiseLevel}, map[string]ElemType{"timestep": Float32}},
		{"conv-sr", KindSR, false, map[string]string{"sample": RoleSample, "low_res": RoleLowres}, nil},
		{"sd-signature", KindBase, true, map[string]string{"sample": RoleSample, "timestep": RoleTimestep, "encoder_hidden_states": RoleContext}, map[string]ElemType{"sample": Float32}},
		{"fp16-batch", KindBase, true, map[string]string{"sample": RoleSample, "timestep": RoleTimestep, "encoder_hidden_states": RoleContext}, map[string]ElemType{"sample": Float16, "timestep": Float16}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadFixture(t, tt.name)
			if m.Kind != tt.kind || m.RolesGuessed() != tt.guessed {
				t.Errorf("kind = %s guessed = %v", m.Kind, m.RolesGuessed())
			}
			for _, in := range m.Inputs {
				if want, ok := tt.roles[in.Name]; ok && in.Role != want {
					t.Errorf("input %s: role %q, want %q", in.Name, in.Role, want)
				}
				if want, ok := tt.types[in.Name]; ok && in.Type != want {
					t.Errorf("input %s: type %s, want %s", in.Name, in.Type, want)
				}
			}
			if out := m.Output(RolePrediction); out == nil || out.Name != "out_sample" {
				t.Errorf("prediction output = %+v", out)
			}
			if s := m.Input(RoleSample); s == nil || !s.Dynamic(0) || !s.Dynamic(2) || !s.Dynamic(3) {
				t.Errorf("sample should have dynamic batch, height and width: %+v", s)
			}
			if c := m.CheckContract(); !c.Fits {
				t.Errorf("contract: %+v", c)
			}
			if m.Header.Opset() < 13 || m.Header.IRVersion < 7 {
				t.Errorf("header = %+v", m.Header)
			}
		})
	}
}

func TestContractProblems(t *testing.T) {
	fp16 := loadFixture(t, "sd-signature-fp16")
	if c := fp16.CheckContract(); c.Fits || !strings.Contains(strings.Join(c.Problems, ";"), "float16 scalar") {
		t.Fatalf("float16 scalar timestep: contract = %+v", c)
	}

	m := loadFixture(t, "sd-signature")
	m.Kind = KindSR // no lowres input
	c := m.CheckContract()
	if c.Fits || !strings.Contains(strings.Join(c.Problems, ";"), "no lowres input") {
		t.Fatalf("contract = %+v", c)
	}
}

func TestParseModelHeaderRejectsNonONNX(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty": {},
		"text":  []byte("version: 1\nkind: base\n"),
		"png":   {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13},
		"truncated": func() []byte {
			b, _ := os.ReadFile(filepath.Join(fixture("conv-sr"), "model.onnx"))
			return b[:len(b)/2]
		}(),
	} {
		if _, err := ParseModelHeader(data); !errors.Is(err, errNotONNX) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "model.onnx")
	os.WriteFile(bad, []byte("this is not a model"), 0o644)
	if _, err := testEnv.LoadModel(bad); err == nil || !strings.Contains(err.Error(), "not an ONNX model") || !strings.Contains(err.Error(), bad) {
		t.Errorf("LoadModel(non-ONNX) err = %v", err)
	}
}

func FuzzParseModelHeader(f *testing.F) {
	for _, name := range []string{"conv-sr", "oracle-base", "sd-signature-fp16", "conv-sr-external"} {
		b, err := os.ReadFile(filepath.Join(fixture(name), "model.onnx"))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0x08, 0x08, 0x3a, 0x00})
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseModelHeader(data)
		if err == nil && (h.IRVersion <= 0 || h.Opsets == nil) {
			t.Fatalf("accepted header without IR version: %+v", h)
		}
	})
}

func TestManifestStrict(t *testing.T) {
	good, err := os.ReadFile(filepath.Join(fixture("conv-sr"), ManifestFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseManifest(good); err != nil {
		t.Fatalf("fixture manifest rejected: %v", err)
	}
	tests := []struct{ name, body, want string }{
		{"unknown key", string(good) + "colour: red\n", "colour"},
		{"bad kind", strings.Replace(string(good), `kind: "sr"`, `kind: "upscaler"`, 1), `kind: "upscaler"`},
		{"bad prediction", strings.Replace(string(good), `prediction: "epsilon"`, `prediction: "eps"`, 1), "prediction"},
		{"unknown role", strings.Replace(string(good), "  sample: sample", "  noisy: sample", 1), "inputs.noisy: unknown role"},
		{"bad schedule", strings.Replace(string(good), `beta_schedule: "linear"`, `beta_schedule: "cosine"`, 1), "schedule.beta_schedule"},
		{"empty", "", "empty manifest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseManifest([]byte(tt.body))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want mention of %q", err, tt.want)
			}
		})
	}
	t.Run("line number", func(t *testing.T) {
		_, err := ParseManifest([]byte("version: 1\nkind: base\nbogus: 1\n"))
		if err == nil || !strings.Contains(err.Error(), "line 3") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("name not in graph", func(t *testing.T) {
		dir := t.TempDir()
		copyFile(t, filepath.Join(fixture("conv-sr"), "model.onnx"), filepath.Join(dir, "model.onnx"))
		body := strings.Replace(string(good), "lowres: low_res", "lowres: low_resolution", 1)
		os.WriteFile(filepath.Join(dir, ManifestFile), []byte(body), 0o644)
		_, err := testEnv.LoadModel(dir)
		if err == nil || !strings.Contains(err.Error(), `"low_resolution"`) {
			t.Fatalf("err = %v", err)
		}
	})
}

func copyFile(t testing.TB, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func srInputs(m *Model, b, h, w int64, seed float64, t float32) map[string]Tensor {
	n := int(b * 3 * h * w)
	ts := make([]float32, b)
	nl := make([]float32, b)
	for i := range ts {
		ts[i] = t + float32(i)
		nl[i] = 0.1
	}
	return map[string]Tensor{
		"sample":      FloatTensor(pattern(n, seed), b, 3, h, w),
		"low_res":     FloatTensor(pattern(n, seed+1), b, 3, h, w),
		"timestep":    FloatTensor(ts, b),
		"noise_level": FloatTensor(nl, b),
	}
}

func finite(xs []float32) bool {
	for _, x := range xs {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return false
		}
	}
	return true
}

func TestDynamicShapes(t *testing.T) {
	m := loadFixture(t, "conv-sr")
	s := newSession(t, m, nil)
	for _, size := range [][3]int64{{1, 16, 24}, {3, 40, 8}, {1, 64, 64}} {
		out, err := s.Run(srInputs(m, size[0], size[1], size[2], 0, 500))
		if err != nil {
			t.Fatalf("%v: %v", size, err)
		}
		got := out["out_sample"]
		want := []int64{size[0], 3, size[1], size[2]}
		if fmt.Sprint(got.Shape) != fmt.Sprint(want) || len(got.Float) != int(size[0]*3*size[1]*size[2]) || !finite(got.Float) {
			t.Fatalf("%v: output shape %v (%d values)", size, got.Shape, len(got.Float))
		}
	}
}

func TestOracleBaseInt64Inputs(t *testing.T) {
	m := loadFixture(t, "oracle-base")
	s := newSession(t, m, nil)
	table := [][3]float64{{0.5, -0.25, 0}, {-0.5, 0.5, 0.25}, {0.75, 0.75, -0.75}, {-0.25, -0.5, 0.5}, {0, 0, 0}}
	const b, h, w = 3, 5, 7
	x := pattern(b*3*h*w, 2)
	ts := []int64{0, 499, 999}
	classes := []int64{2, 4, 1}
	out, err := s.Run(map[string]Tensor{
		"sample": FloatTensor(x, b, 3, h, w), "timestep": IntTensor(ts, b), "class_labels": IntTensor(classes, b),
	})
	if err != nil {
		t.Fatal(err)
	}
	got := out["out_sample"].Float
	for i := 0; i < b; i++ {
		abar := cosineAlphaBar(int(ts[i]))
		for c := 0; c < 3; c++ {
			for p := 0; p < h*w; p++ {
				k := (i*3+c)*h*w + p
				want := (float64(x[k]) - math.Sqrt(abar)*table[classes[i]][c]) / math.Sqrt(1-abar)
				if d := math.Abs(float64(got[k]) - want); d > 1e-5*math.Max(1, math.Abs(want)) {
					t.Fatalf("item %d channel %d: got %g want %g", i, c, got[k], want)
				}
			}
		}
	}
	// Float timesteps are rounded into the graph's int64 when they are integers...
	if _, err := s.Run(map[string]Tensor{"sample": FloatTensor(x, b, 3, h, w), "timestep": FloatTensor([]float32{0, 499, 999}, b), "class_labels": IntTensor(classes, b)}); err != nil {
		t.Fatal(err)
	}
	// ...and refused when they are not.
	_, err = s.Run(map[string]Tensor{"sample": FloatTensor(x, b, 3, h, w), "timestep": FloatTensor([]float32{0, 499.5, 999}, b), "class_labels": IntTensor(classes, b)})
	if err == nil || !strings.Contains(err.Error(), `input "timestep"`) || !strings.Contains(err.Error(), "not an integer") {
		t.Fatalf("err = %v", err)
	}
}

func TestOracleSRFloatTimestep(t *testing.T) {
	m := loadFixture(t, "oracle-sr")
	s := newSession(t, m, nil)
	in := srInputs(m, 2, 6, 4, 3, 250)
	out, err := s.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	x, lr, got := in["sample"].Float, in["low_res"].Float, out["out_sample"].Float
	for i := range got {
		tstep := 250 + i/(3*6*4)
		abar := cosineAlphaBar(tstep)
		want := (math.Sqrt(abar)*float64(x[i]) - float64(lr[i])) / math.Sqrt(1-abar)
		if d := math.Abs(float64(got[i]) - want); d > 1e-5*math.Max(1, math.Abs(want)) {
			t.Fatalf("value %d: got %g want %g", i, got[i], want)
		}
	}
}

func TestFloat16Boundary(t *testing.T) {
	m := loadFixture(t, "fp16-batch")
	if m.Input(RoleSample).Type != Float16 || m.Output(RolePrediction).Type != Float16 {
		t.Fatalf("fixture is not float16: %+v", m.Inputs)
	}
	s := newSession(t, m, nil)
	const b, h, w = 2, 3, 5
	x := pattern(b*4*h*w, 1)
	ctx := pattern(b*77*32, 4)
	ts := []float32{0.5, 3}
	out, err := s.Run(map[string]Tensor{
		"sample":                FloatTensor(x, b, 4, h, w),
		"timestep":              FloatTensor(ts, b),
		"encoder_hidden_states": FloatTensor(ctx, b, 77, 32),
	})
	if err != nil {
		t.Fatal(err)
	}
	got := out["out_sample"]
	if fmt.Sprint(got.Shape) != fmt.Sprint([]int64{b, 4, h, w}) {
		t.Fatalf("shape %v", got.Shape)
	}
	// The graph sees the float16-rounded inputs, computes in float32 and rounds once more.
	r16 := func(v float32) float32 {
		var bits [1]uint16
		var f [1]float32
		Float16Bits(bits[:], []float32{v})
		Float16ToFloat32(f[:], bits[:])
		return f[0]
	}
	for i := 0; i < b; i++ {
		var mean float64
		for _, v := range ctx[i*77*32 : (i+1)*77*32] {
			mean += float64(r16(v))
		}
		mean /= 77 * 32
		for p := 0; p < 4*h*w; p++ {
			k := i*4*h*w + p
			want := r16(float32(float64(r16(x[k]))*float64(r16(ts[i])) + mean))
			if d := math.Abs(float64(got.Float[k] - want)); d > 1e-3*math.Max(1, math.Abs(float64(want))) {
				t.Fatalf("value %d: got %g want %g", k, got.Float[k], want)
			}
		}
	}
}

func TestFloat16ScalarIsAClearError(t *testing.T) {
	m := loadFixture(t, "sd-signature-fp16")
	s := newSession(t, m, nil)
	_, err := s.Run(map[string]Tensor{
		"sample": FloatTensor(pattern(4*8*8, 0), 1, 4, 8, 8), "timestep": FloatTensor([]float32{10}),
		"encoder_hidden_states": FloatTensor(pattern(77*32, 1), 1, 77, 32),
	})
	if err == nil || !strings.Contains(err.Error(), `input "timestep"`) || !strings.Contains(err.Error(), "float16 scalar") {
		t.Fatalf("err = %v", err)
	}
}

func TestScalarTimestepFloat32(t *testing.T) {
	m := loadFixture(t, "sd-signature")
	s := newSession(t, m, nil)
	ts, err := m.BatchValues(RoleTimestep, []float32{10, 10})
	if err != nil || len(ts.Shape) != 0 {
		t.Fatalf("BatchValues = %+v, %v", ts, err)
	}
	out, err := s.Run(map[string]Tensor{
		"sample": FloatTensor(pattern(2*4*8*8, 0), 2, 4, 8, 8), "timestep": ts,
		"encoder_hidden_states": FloatTensor(pattern(2*77*32, 1), 2, 77, 32),
	})
	if err != nil || !finite(out["out_sample"].Float) {
		t.Fatalf("run: %v", err)
	}
	if _, err := m.BatchValues(RoleTimestep, []float32{10, 20}); err == nil || !strings.Contains(err.Error(), "one timestep for the whole batch") {
		t.Fatalf("mixed scalar timesteps: %v", err)
	}
}

func TestFloat16Conversion(t *testing.T) {
	tests := []struct {
		in   float32
		bits uint16
	}{
		{0, 0x0000}, {float32(math.Copysign(0, -1)), 0x8000}, {1, 0x3c00}, {-2, 0xc000},
		{65504, 0x7bff},                  // largest finite
		{65519.99, 0x7bff},               // rounds down to max
		{65520, 0x7c00},                  // halfway to 2^16 rounds to even: +Inf
		{1 + 1.0/2048, 0x3c00},           // halfway between 1 and 1+2^-10: even is 1
		{1 + 3.0/2048, 0x3c02},           // halfway between 1+2^-10 and 1+2^-9: even is 1+2^-9
		{float32(math.Ldexp(1, -24)), 1}, // smallest subnormal
		{float32(math.Ldexp(1, -25)), 0}, // halfway to the smallest subnormal: even is 0
		{float32(math.Ldexp(3, -26)), 1}, // above halfway
		{float32(math.Inf(-1)), 0xfc00},
	}
	for _, tt := range tests {
		var got [1]uint16
		Float16Bits(got[:], []float32{tt.in})
		if got[0] != tt.bits {
			t.Errorf("Float16Bits(%g) = %#04x, want %#04x", tt.in, got[0], tt.bits)
		}
	}
	var nan [1]uint16
	Float16Bits(nan[:], []float32{float32(math.NaN())})
	if nan[0]&0x7c00 != 0x7c00 || nan[0]&0x3ff == 0 {
		t.Errorf("NaN became %#04x", nan[0])
	}
	// Every float16 value survives a round trip exactly.
	for b := 0; b < 1<<16; b++ {
		if b&0x7c00 == 0x7c00 && b&0x3ff != 0 {
			continue // NaN payloads
		}
		var f [1]float32
		var back [1]uint16
		Float16ToFloat32(f[:], []uint16{uint16(b)})
		Float16Bits(back[:], f[:])
		if back[0] != uint16(b) {
			t.Fatalf("%#04x -> %g -> %#04x", b, f[0], back[0])
		}
	}
}

func TestWrongInputs(t *testing.T) {
	m := loadFixture(t, "conv-sr")
	s := newSession(t, m, nil)
	good := func() map[string]Tensor { return srInputs(m, 1, 8, 8, 0, 100) }
	tests := []struct {
		name   string
		mutate func(map[string]Tensor)
		want   string
	}{
		{"channels", func(in map[string]Tensor) { in["sample"] = FloatTensor(pattern(6*64, 0), 1, 6, 8, 8) }, `input "sample": expected 3 channels, got 6`},
		{"rank", func(in map[string]Tensor) { in["sample"] = FloatTensor(pattern(3*64, 0), 3, 8, 8) }, `input "sample": expected 4 dimensions`},
		{"data length", func(in map[string]Tensor) { in["low_res"] = FloatTensor(pattern(10, 0), 1, 3, 8, 8) }, `input "low_res": shape [1 3 8 8] holds 192 values, got 10`},
		{"missing", func(in map[string]Tensor) { delete(in, "noise_level") }, `input "noise_level" (role noise_level) not given`},
		{"unknown", func(in map[string]Tensor) { in["bogus"] = FloatTensor([]float32{1}, 1) }, `has no input "bogus"`},
		{"zero dim", func(in map[string]Tensor) { in["sample"] = FloatTensor(nil, 1, 3, 0, 8) }, `dimension 2 is 0`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := good()
			tt.mutate(in)
			_, err := s.Run(in)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	// The session still serves good input after bad.
	if _, err := s.Run(good()); err != nil {
		t.Fatal(err)
	}
}

func TestGPUProviderUnavailable(t *testing.T) {
	if _, err := os.Stat(filepath.Join("..", ".ort", "libonnxruntime_providers_cuda.so")); err == nil {
		t.Skip("a CUDA provider library is present; this test checks the CPU-only build")
	}
	m := loadFixture(t, "conv-sr")
	t.Run("cuda without fallback", func(t *testing.T) {
		rt := config.Default().Runtime
		rt.Providers = []string{"cuda", "cpu"}
		_, err := testEnv.NewSession(m, SessionOptions{Runtime: &rt})
		var perr *ProviderError
		if !errors.As(err, &perr) || perr.Provider != "cuda" {
			t.Fatalf("err = %v", err)
		}
		msg := err.Error()
		for _, want := range []string{"execution provider cuda could not attach", "libonnxruntime_providers_cuda.so", "runtime.fallback"} {
			if !strings.Contains(msg, want) {
				t.Errorf("error does not mention %q: %s", want, msg)
			}
		}
		if perr.Reason == "" || len(perr.Missing) == 0 {
			t.Errorf("reason %q, missing %v", perr.Reason, perr.Missing)
		}
	})
	t.Run("tensorrt then cuda with fallback", func(t *testing.T) {
		rt := config.Default().Runtime
		rt.Providers = []string{"tensorrt", "cuda", "cpu"}
		rt.Fallback = true
		rt.TensorRT.EngineCachePath = t.TempDir()
		rt.TensorRT.TimingCachePath = rt.TensorRT.EngineCachePath
		s := newSession(t, m, &rt)
		if s.Provider() != "cpu" || len(s.Skipped()) != 2 || s.Skipped()[0].Provider != "tensorrt" || s.Skipped()[1].Provider != "cuda" {
			t.Fatalf("provider %s, skipped %v", s.Provider(), s.Skipped())
		}
		if _, err := s.Run(srInputs(m, 1, 8, 8, 0, 10)); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("cuda only with fallback has nowhere to go", func(t *testing.T) {
		rt := config.Default().Runtime
		rt.Providers = []string{"cuda"}
		rt.Fallback = true
		_, err := testEnv.NewSession(m, SessionOptions{Runtime: &rt})
		if err == nil || !strings.Contains(err.Error(), "cuda") {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestConcurrentRunsMatchSequential(t *testing.T) {
	m := loadFixture(t, "conv-sr")
	s := newSession(t, m, nil)
	const workers, perWorker = 8, 6
	inputs := make([]map[string]Tensor, workers*perWorker)
	want := make([][]float32, len(inputs))
	for i := range inputs {
		inputs[i] = srInputs(m, 2, 24, 16, float64(i), float32(10*i))
		out, err := s.Run(inputs[i])
		if err != nil {
			t.Fatal(err)
		}
		want[i] = out["out_sample"].Float
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(inputs))
	for g := 0; g < workers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < perWorker; j++ {
				i := j*workers + g
				out, err := s.Run(inputs[i])
				if err != nil {
					errs <- err
					return
				}
				for k, v := range out["out_sample"].Float {
					if v != want[i][k] {
						errs <- fmt.Errorf("run %d value %d: concurrent %g, sequential %g", i, k, v, want[i][k])
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestExternalDataAndBytes(t *testing.T) {
	ref := newSession(t, loadFixture(t, "conv-sr"), nil)
	in := srInputs(nil, 1, 12, 12, 5, 321)
	want, err := ref.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	check := func(t *testing.T, s *Session) {
		got, err := s.Run(in)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range got["out_sample"].Float {
			if v != want["out_sample"].Float[k] {
				t.Fatalf("value %d: %g, want %g", k, v, want["out_sample"].Float[k])
			}
		}
	}
	t.Run("external data by path", func(t *testing.T) {
		m := loadFixture(t, "conv-sr-external")
		if len(m.Header.ExternalData) != 1 || m.Header.ExternalData[0] != "model.onnx_data" {
			t.Fatalf("external data = %v", m.Header.ExternalData)
		}
		check(t, newSession(t, m, nil))
	})
	t.Run("external data missing", func(t *testing.T) {
		dir := t.TempDir()
		copyFile(t, filepath.Join(fixture("conv-sr-external"), "model.onnx"), filepath.Join(dir, "model.onnx"))
		_, err := testEnv.LoadModel(filepath.Join(dir, "model.onnx"))
		if err == nil || !strings.Contains(err.Error(), `external data file "model.onnx_data" is missing`) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("from bytes", func(t *testing.T) {
		data, _ := os.ReadFile(filepath.Join(fixture("conv-sr"), "model.onnx"))
		man, _ := os.ReadFile(filepath.Join(fixture("conv-sr"), ManifestFile))
		m, err := testEnv.LoadModelBytes("conv-sr-bytes", data, man)
		if err != nil || m.Manifest == nil || m.Kind != KindSR {
			t.Fatalf("m = %+v, err = %v", m, err)
		}
		check(t, newSession(t, m, nil))
	})
	t.Run("bytes with external data", func(t *testing.T) {
		data, _ := os.ReadFile(filepath.Join(fixture("conv-sr-external"), "model.onnx"))
		_, err := testEnv.LoadModelBytes("ext", data, nil)
		if err == nil || !strings.Contains(err.Error(), "external data") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("optimized model cache", func(t *testing.T) {
		rt := config.Default().Runtime
		rt.OptimizedCache = t.TempDir()
		m := loadFixture(t, "conv-sr")
		check(t, newSession(t, m, &rt))
		files, _ := filepath.Glob(filepath.Join(rt.OptimizedCache, "*.onnx"))
		if len(files) != 1 {
			t.Fatalf("cache holds %v", files)
		}
		check(t, newSession(t, m, &rt)) // now served from the cache
		if tmp, _ := filepath.Glob(filepath.Join(rt.OptimizedCache, "*.tmp*")); len(tmp) != 0 {
			t.Fatalf("temp files left: %v", tmp)
		}
	})
}

func TestRunCancelled(t *testing.T) {
	m := loadFixture(t, "conv-sr")
	s := newSession(t, m, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.RunContext(ctx, srInputs(m, 1, 64, 64, 0, 1)); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	s.Close()
	s.Close()
	if _, err := s.Run(srInputs(m, 1, 8, 8, 0, 1)); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("run after close: %v", err)
	}
}

func TestSignalGuardRestoresGoHandlers(t *testing.T) {
	sig := int(syscall.SIGUSR2)
	if !handlerOnStack(sig) {
		t.Skip("Go has not installed a SIGUSR2 handler in this process")
	}
	n, err := guardSignals(func() error { return installBareHandler(sig) })
	if err != nil {
		t.Fatal(err)
	}
	if n < 1 || !handlerOnStack(sig) {
		t.Fatalf("restored %d handlers; SIGUSR2 on alternate stack: %v", n, handlerOnStack(sig))
	}
}

// The header's inputs and outputs, read without ONNX Runtime, are the ones
// ONNX Runtime reports: names, element types and shapes.
func TestHeaderIOMatchesRuntime(t *testing.T) {
	models := []*Model{}
	for _, name := range []string{"conv-sr", "oracle-base", "oracle-sr", "sd-signature", "sd-signature-fp16", "fp16-batch", "conv-sr-external"} {
		models = append(models, loadFixture(t, name))
	}
	for _, f := range []string{"ddpm-like", "ddpm-like-scalar", "if2-like/unet", "x4-like/unet", "ldm-sr-like/unet", "if2-text/text_encoder"} {
		m, err := testEnv.LoadModel(filepath.Join("..", "testdata", "families", f))
		if err != nil {
			t.Fatal(err)
		}
		models = append(models, m)
	}
	for _, m := range models {
		name := m.Name
		for _, side := range []struct {
			what      string
			hdr, real []IO
		}{{"inputs", m.Header.Inputs, m.Inputs}, {"outputs", m.Header.Outputs, m.Outputs}} {
			if len(side.hdr) != len(side.real) {
				t.Fatalf("%s %s: header %v, runtime %v", name, side.what, side.hdr, side.real)
			}
			for i, io := range side.real {
				h := side.hdr[i]
				if h.Name != io.Name || h.Type != io.Type || h.ShapeString() != io.ShapeString() {
					t.Errorf("%s %s[%d]: header %s %s %s, runtime %s %s %s", name, side.what, i, h.Name, h.Type, h.ShapeString(), io.Name, io.Type, io.ShapeString())
				}
			}
		}
	}
}
