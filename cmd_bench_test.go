package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"tessera/config"
)

// bench runs its fixed workload end to end and reports numbers that hang
// together: every item measured, the overhead at least 1 (wall covers the
// busy time), busy time the Run sum over lanes, and the SR model on lanes.
func TestBenchJSON(t *testing.T) {
	if testing.Short() {
		t.Skip("bench takes several seconds")
	}
	// From a directory that holds nothing of the project: the photograph
	// comes from the binary. demo-sr's tiled upscale equals its untiled
	// one, a PSNR of +Inf, which JSON carries as null.
	lib, _ := filepath.Abs(filepath.Join(".ort", "libonnxruntime.so.1"))
	r := runInEnv(t, t.TempDir(), []string{"TESSERA_ORT_LIB=" + lib}, "bench", "--json")
	if r.code != 0 {
		t.Fatalf("bench: %+v", r)
	}
	if !strings.Contains(r.stdout, `"psnr_tiled_vs_untiled_db": null`) {
		t.Errorf("tiled vs untiled not null:\n%s", r.stdout)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("bench --json: %v\n%s", err, r.stdout)
	}
	if len(rep.Items) != 2 || rep.Items[0].Width != 512 || rep.Items[1].Width != 1024 {
		t.Fatalf("items %+v", rep.Items)
	}
	for _, it := range rep.Items {
		if it.Overhead < 1 || it.BusySeconds <= 0 || it.BusySeconds > it.RunSeconds || it.TileSteps <= 0 || it.PeakRSSMiB <= 0 {
			t.Errorf("%s: %+v", it.Name, it)
		}
	}
	if s := rep.Items[1].SeamScore; s <= 0 || s > 1.10 {
		t.Errorf("seam score %v", s)
	}
	if rep.TileStepRatio <= 1 || rep.ScalingRatio <= 1 || rep.BusyRatio <= 1 || rep.Repeat != 1 {
		t.Errorf("scaling %v, tile-step ratio %v, busy ratio %v, repeat %d", rep.ScalingRatio, rep.TileStepRatio, rep.BusyRatio, rep.Repeat)
	}
	lanes := map[string]int{}
	for _, m := range rep.Models {
		lanes[m.Model] = m.Lanes
		if m.Threads < 1 || m.Devices != 1 {
			t.Errorf("%s: %d threads, %d devices", m.Model, m.Threads, m.Devices)
		}
	}
	if lanes["demo-base"] != 1 || lanes["demo-sr"] < 1 {
		t.Errorf("lanes %v", lanes)
	}
	up := rep.Upscale
	if up == nil || filepath.Base(up.Image) != "chelsea-256.png" || !up.TiledIdentical || up.PSNRTessera < 20 || up.PSNRLanczos < 20 {
		t.Errorf("upscale %+v", up)
	}
}

func TestBenchMedians(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	rounds := []benchItem{
		{Name: "a", TileSteps: 60, WallSeconds: 3, Overhead: 1.2},
		{Name: "a", TileSteps: 60, WallSeconds: 1, Overhead: 1.0},
		{Name: "a", TileSteps: 60, WallSeconds: 2, Overhead: 1.1},
	}
	m := medianItem(rounds)
	if m.WallSeconds != 2 || m.Overhead != 1.1 || m.TileSteps != 60 || m.Name != "a" {
		t.Errorf("medianItem = %+v", m)
	}
	if rounds[0].WallSeconds != 3 {
		t.Errorf("medianItem changed its input: %+v", rounds[0])
	}
}

func TestBenchRepeatMustBePositive(t *testing.T) {
	r := tessera(t, nil, "bench", "--repeat", "0")
	if r.code == 0 || !strings.Contains(r.stderr, "--repeat must be at least 1") {
		t.Errorf("bench --repeat 0: %+v", r)
	}
}

// bench --latent on the x4-like pipeline folder: its decoder, tiled, with
// the whole image's GroupNorm statistics is nearer the whole decode than
// the naive tiled decode (the figure the README quotes for the fixture).
func TestBenchLatentDrift(t *testing.T) {
	a := &app{cfg: config.Default()}
	a.cfg.Runtime.Library, _ = filepath.Abs(filepath.Join(".ort", "libonnxruntime.so.1"))
	a.logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	lb, err := checkLatent(filepath.Join("testdata", "families", "x4-like"), "", false)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := a.benchLatent(context.Background(), lb, false, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d := rep.Drift
	t.Logf("%+v", *d)
	if !d.Synced || d.Tiles < 4 || d.SyncedPSNR <= d.NaivePSNR || len(rep.Items) != 0 {
		t.Errorf("x4-like decoder drift %+v: want several tiles, synchronised nearer the whole decode than naive, no memory items without --memory", *d)
	}
	var out strings.Builder
	printLatent(&out, rep)
	if !strings.Contains(out.String(), "synchronised") || strings.Contains(out.String(), "peak MiB") {
		t.Errorf("printed: %s", out.String())
	}
}

// --latent names a latent pipeline folder; a pixel model is refused before
// anything runs, naming the flag.
func TestBenchLatentRefusesPixelModels(t *testing.T) {
	r := tessera(t, nil, "bench", "--latent", filepath.Join("testdata", "families", "ddpm-like"))
	if r.code == 0 || !strings.Contains(r.stderr, "--latent testdata/families/ddpm-like: not a latent pipeline folder") {
		t.Errorf("bench --latent ddpm-like: %+v", r)
	}
	r = tessera(t, nil, "bench", "--latent-context", "x.npy")
	if r.code == 0 || !strings.Contains(r.stderr, "--latent-context needs --latent") {
		t.Errorf("bench --latent-context alone: %+v", r)
	}
	// The flags that would be ignored or fail minutes later are refused at once.
	x4 := filepath.Join("testdata", "families", "x4-like")
	ctx := filepath.Join("testdata", "families", "contexts")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--memory"}, "--latent " + x4 + " takes text embeddings (encoder_hidden_states): give --latent-context FILE"},
		{[]string{"--latent-context", filepath.Join(ctx, "prompt-7x32.npy")}, "--latent-context: only the --memory items denoise"},
		{[]string{"--memory", "--latent-context", filepath.Join(ctx, "wrong-width-7x16.npy")}, "is [7, 16]; " + x4 + " takes D = 32"},
	} {
		r := tessera(t, nil, append([]string{"bench", "--latent", x4}, c.args...)...)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("bench --latent x4-like %v: want %q, got %+v", c.args, c.want, r)
		}
	}
}
