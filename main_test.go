package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// tesseraBin is the binary under test, built once by TestMain.
var tesseraBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tessera-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tesseraBin = filepath.Join(dir, "tessera")
	if out, err := exec.Command("go", "build", "-o", tesseraBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build tessera: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	stdout, stderr string
	code           int
}

// tessera runs the binary in the repository root with extra environment.
func tessera(t *testing.T, env []string, args ...string) result {
	t.Helper()
	return runInEnv(t, "", env, args...)
}

func TestVersion(t *testing.T) {
	r := tessera(t, nil, "version")
	if r.code != 0 || !strings.Contains(r.stdout, "onnx runtime 1.30.0") {
		t.Fatalf("version: %+v", r)
	}
}

func TestVersionWithoutLibrary(t *testing.T) {
	r := tessera(t, []string{"TESSERA_ORT_LIB=/nonexistent/libonnxruntime.so.1"}, "version")
	if r.code == 0 || !strings.Contains(r.stderr, "make ort") || !strings.Contains(r.stderr, "/nonexistent/libonnxruntime.so.1") {
		t.Fatalf("version without library: %+v", r)
	}
}

func TestInspectJSON(t *testing.T) {
	for _, name := range []string{"demo-base", "demo-sr", "oracle-base", "oracle-sr", "conv-sr", "sd-signature", "fp16-batch", "conv-sr-external"} {
		t.Run(name, func(t *testing.T) {
			ref := filepath.Join("testdata", "models", name)
			if strings.HasPrefix(name, "demo-") {
				ref = name // embedded
			}
			r := tessera(t, nil, "inspect", "--json", ref)
			if r.code != 0 {
				t.Fatalf("%+v", r)
			}
			var ins inspection
			if err := json.Unmarshal([]byte(r.stdout), &ins); err != nil {
				t.Fatal(err)
			}
			if !ins.Contract.Fits || len(ins.Inputs) == 0 || ins.Opsets[""] == 0 {
				t.Fatalf("inspection: %+v", ins)
			}
			wantRoles := "manifest"
			if strings.HasPrefix(name, "sd-") || name == "fp16-batch" {
				wantRoles = "guessed"
			}
			if ins.RolesFrom != wantRoles {
				t.Errorf("roles from %s, want %s", ins.RolesFrom, wantRoles)
			}
		})
	}
}

func TestInspectText(t *testing.T) {
	r := tessera(t, nil, "inspect", "testdata/models/sd-signature-fp16")
	if r.code != 0 {
		t.Fatalf("%+v", r)
	}
	for _, want := range []string{"guessed", "encoder_hidden_states", "float16", "context", "does not fit the base contract", "float16 scalar"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, r.stdout)
		}
	}
}

func TestInspectBadFiles(t *testing.T) {
	dir := t.TempDir()
	notONNX := filepath.Join(dir, "notes.onnx")
	os.WriteFile(notONNX, []byte("these are not weights\n"), 0o644)
	truncated := filepath.Join(dir, "half.onnx")
	full, _ := os.ReadFile("testdata/models/conv-sr/model.onnx")
	os.WriteFile(truncated, full[:len(full)/3], 0o644)
	for _, path := range []string{notONNX, truncated, filepath.Join(dir, "missing.onnx")} {
		r := tessera(t, nil, "inspect", path)
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		if r.code == 0 || len(lines) != 1 || !strings.Contains(r.stderr, filepath.Base(path)) {
			t.Errorf("inspect %s: code %d, stderr %q", path, r.code, r.stderr)
		}
	}
}

func TestBadConfigNamesKey(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "tessera.yaml")
	os.WriteFile(cfg, []byte("runtime:\n  providers: [gpu]\n"), 0o644)
	r := tessera(t, nil, "version", "--config", cfg)
	if r.code == 0 || !strings.Contains(r.stderr, "runtime.providers[0]") {
		t.Fatalf("%+v", r)
	}
}

func TestCUDARequestedOnCPUMachine(t *testing.T) {
	if _, err := os.Stat(".ort/libonnxruntime_providers_cuda.so"); err == nil {
		t.Skip("CUDA provider library present")
	}
	model := "testdata/models/conv-sr"
	r := tessera(t, nil, "inspect", "--probe", "--providers", "cuda,cpu", model)
	if r.code != 1 || !strings.Contains(r.stderr, "execution provider cuda could not attach") || !strings.Contains(r.stderr, "libonnxruntime_providers_cuda.so") {
		t.Fatalf("cuda without fallback: %+v", r)
	}
	r = tessera(t, []string{"TESSERA_RUNTIME_FALLBACK=true"}, "inspect", "--probe", "--json", "--providers", "cuda,cpu", model)
	var ins inspection
	if err := json.Unmarshal([]byte(r.stdout), &ins); err != nil || r.code != 0 {
		t.Fatalf("%+v: %v", r, err)
	}
	if ins.Probe == nil || ins.Probe.Provider != "cpu" || len(ins.Probe.Skipped) != 1 || !strings.HasPrefix(ins.Probe.Skipped[0], "cuda: ") {
		t.Fatalf("probe = %+v", ins.Probe)
	}
}
