package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tessera.yaml")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestDefaultIsValid(t *testing.T) {
	cfg := Default()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("default config invalid: %v", err)
	}
}

func TestLoadFileEnvFlagPrecedence(t *testing.T) {
	path := writeConfig(t, `
workers: 3
runtime:
  providers: [cuda, cpu]
  fallback: true
  threads: 2
  cuda: {device_id: 1, gpu_mem_limit: 2GiB}
memory: {budget: 512MiB}
watch:
  - {dir: ./inbox, settle: 2s}
`)
	t.Setenv("TESSERA_RUNTIME_THREADS", "5")
	flags := pflag.NewFlagSet("t", pflag.ContinueOnError)
	flags.Int("workers", 1, "")
	if err := flags.Parse([]string{"--workers=7"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path, Flag{Key: "workers", Flag: flags.Lookup("workers")})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Workers != 7 {
		t.Errorf("workers = %d, want 7 (flag beats file)", cfg.Workers)
	}
	if cfg.Runtime.Threads != 5 {
		t.Errorf("runtime.threads = %d, want 5 (env beats file)", cfg.Runtime.Threads)
	}
	if got := strings.Join(cfg.Runtime.Providers, ","); got != "cuda,cpu" {
		t.Errorf("providers = %s", got)
	}
	if !cfg.Runtime.Fallback || cfg.Runtime.CUDA.DeviceID != 1 || cfg.Runtime.CUDA.GPUMemLimit != 2<<30 {
		t.Errorf("runtime = %+v", cfg.Runtime)
	}
	if cfg.Memory.Budget != 512<<20 {
		t.Errorf("memory.budget = %d", cfg.Memory.Budget)
	}
	if len(cfg.Watch) != 1 || cfg.Watch[0].Settle.Seconds() != 2 {
		t.Errorf("watch = %+v", cfg.Watch)
	}
	if cfg.Output.Root != "./out" {
		t.Errorf("output.root default lost: %q", cfg.Output.Root)
	}
}

func TestEnvList(t *testing.T) {
	t.Setenv("TESSERA_RUNTIME_PROVIDERS", "tensorrt,cuda,cpu")
	cfg, err := Load(writeConfig(t, "workers: 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.Runtime.Providers, ","); got != "tensorrt,cuda,cpu" {
		t.Errorf("providers from env = %s", got)
	}
}

func TestLoadErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name, body string
		want       []string
	}{
		{"unknown top-level key", "wokers: 2\n", []string{"wokers"}},
		{"unknown nested key", "runtime:\n  treads: 2\n", []string{"treads"}},
		{"bad provider", "runtime:\n  providers: [cpu, cdua]\n", []string{`runtime.providers[1]`, `"cdua"`}},
		{"several problems at once", "workers: 0\nruntime:\n  threads: -1\n  optimization: max\n", []string{"workers:", "runtime.threads:", "runtime.optimization:"}},
		{"bad queue url", "queue: {url: mysql://x}\n", []string{"queue.url"}},
		{"bad time zone", "schedules:\n  - {name: n, cron: '* * * * *', tz: Mars/Base, job: j.yaml}\n", []string{"schedules[0].tz"}},
		{"bad byte size", "memory: {budget: lots}\n", []string{"lots"}},
		{"bad png compression", "output: {compression: zopfli}\n", []string{"output.compression", `"zopfli"`}},
		{"negative lanes", "runtime: {lanes: -1}\n", []string{"runtime.lanes"}},
		{"devices without a GPU provider", "runtime: {devices: [0, 1]}\n", []string{"runtime.devices", "cuda or tensorrt"}},
		{"bad devices", "runtime: {providers: [cuda, cpu], devices: [0, -1, 0]}\n", []string{"runtime.devices[1]", "runtime.devices[2]: device 0 listed twice"}},
		{"bad duration", "queue: {rescue_after: soon}\n", []string{"queue.rescue_after"}},
		{"non-positive reaper", "queue: {grace: -1s, reap_every: 0s}\n", []string{"queue.grace", "queue.reap_every"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, tt.body)
			_, err := Load(path)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the file", err)
			}
		})
	}
}

func TestQueueTimingsFromFile(t *testing.T) {
	cfg, err := Load(writeConfig(t, "queue: {grace: 5s, rescue_after: 2h, reap_every: 500ms}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if q := cfg.Queue; q.Grace != 5*time.Second || q.RescueAfter != 2*time.Hour || q.ReapEvery != 500*time.Millisecond {
		t.Fatalf("queue timings %+v", q)
	}
	if d := Default().Queue; d.Grace != 30*time.Second || d.RescueAfter != time.Hour || d.ReapEvery != 2*time.Second {
		t.Fatalf("default queue timings %+v", d)
	}
}

func TestMissingExplicitFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("err = %v", err)
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "1024": 1024, "8GiB": 8 << 30, "1.5 KiB": 1536, "2MB": 2e6} {
		got, err := ParseBytes(in)
		if err != nil || got != want {
			t.Errorf("ParseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "x", "1QB"} {
		if _, err := ParseBytes(bad); err == nil {
			t.Errorf("ParseBytes(%q) accepted", bad)
		}
	}
}

func TestDevicesFromFileAndEnv(t *testing.T) {
	cfg, err := Load(writeConfig(t, "runtime: {providers: [cuda, cpu], devices: [0, 2]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(cfg.Runtime.Devices) != "[0 2]" {
		t.Errorf("devices from file = %v", cfg.Runtime.Devices)
	}
	t.Setenv("TESSERA_RUNTIME_PROVIDERS", "tensorrt,cpu")
	t.Setenv("TESSERA_RUNTIME_DEVICES", "1,3")
	cfg, err = Load(writeConfig(t, "workers: 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(cfg.Runtime.Devices) != "[1 3]" {
		t.Errorf("devices from env = %v", cfg.Runtime.Devices)
	}
}
