package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"tessera/models"
	"tessera/onnx"
	"tessera/pipeline"
	"tessera/stages"
)

// benchItem is one measured generation.
type benchItem struct {
	Name        string  `json:"name"`
	Width       int     `json:"width"`
	Height      int     `json:"height"`
	WallSeconds float64 `json:"wall_seconds"`
	RunSeconds  float64 `json:"run_seconds"`  // sum of ONNX Runtime Run time
	BusySeconds float64 `json:"busy_seconds"` // Run sum ÷ lanes, per model
	Overhead    float64 `json:"overhead"`     // wall ÷ busy (wall ÷ Run sum with one lane)
	TileSteps   int     `json:"tile_steps"`
	TilesPerSec float64 `json:"tiles_per_second"`
	PeakRSSMiB  float64 `json:"peak_rss_mib"`
	SeamScore   float64 `json:"seam_score,omitempty"`
}

type upscaleReport struct {
	Image              string  `json:"image"`
	From               string  `json:"from"`
	To                 string  `json:"to"`
	PSNRTessera        float64 `json:"psnr_tessera_db"`
	PSNRLanczos        float64 `json:"psnr_lanczos_db"`
	PSNRBicubic        float64 `json:"psnr_bicubic_db"`
	PSNRTiledVsUntiled dB      `json:"psnr_tiled_vs_untiled_db"` // null when identical
	TiledIdentical     bool    `json:"tiled_identical"`
	SeamScore          float64 `json:"seam_score"`
	Seconds            float64 `json:"seconds"`
}

type benchReport struct {
	ONNXRuntime   string         `json:"onnx_runtime"`
	Provider      string         `json:"provider"`
	Items         []benchItem    `json:"items"`
	Repeat        int            `json:"repeat"`          // rounds of the two items; each figure is the median
	ScalingRatio  float64        `json:"scaling_ratio"`   // t(1024²) ÷ t(512²)
	TileStepRatio float64        `json:"tile_step_ratio"` // tile-steps(1024²) ÷ tile-steps(512²)
	BusyRatio     float64        `json:"busy_ratio"`      // busy(1024²) ÷ busy(512²): the ratio of model work
	Upscale       *upscaleReport `json:"upscale,omitempty"`
	Memory        *benchItem     `json:"memory,omitempty"`
	Latent        *latentReport  `json:"latent,omitempty"`
	Models        []benchModel   `json:"models"`
}

// benchModel is how a model's session ran: Runs at once and threads each.
type benchModel struct {
	Model    string `json:"model"`
	Provider string `json:"provider"`
	Lanes    int    `json:"lanes"`   // Runs at once, on all devices
	Devices  int    `json:"devices"` // sessions, one per GPU of runtime.devices
	Threads  int    `json:"threads_per_run"`
}

func newBenchCmd(a *app) *cobra.Command {
	var asJSON, memory bool
	var image, latent, latentContext string
	var repeat int
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure the pipeline on a fixed workload with the demo models",
		Long: `Bench runs a fixed workload on the demo models (one 512² and one 1024² image,
10 base steps, 10 SR steps at strength 0.5) and reports wall time, the sum of
ONNX Runtime Run time, the model's busy time (that sum divided by the Runs a
model may have in flight at once, its lanes), the overhead ratio (wall ÷
busy: wall ÷ Run sum with one lane), tiles per second,
peak RSS, the scaling ratio t(1024²) ÷ t(512²) next to the ratio of
tile-steps and to the ratio of busy time (model work: a base tile-step
costs a tenth of an SR one), and the seam score of the 1024² image.
--repeat N measures the two items N times, alternating, and reports the
median of each figure (the scaling ratio is the median of each round's).
It then upscales a
photograph 4× (downscaled first) tiled and untiled and reports PSNR against
the original next to Lanczos and bicubic. --memory adds a 4096² item with one
SR step per stage to report peak RSS at that size.

--latent DIR measures a latent SR pipeline folder (a vae_decoder/ beside its
unet/): its decoder's tiled decode of a 64² latent against the whole decode,
naive and with the whole image's GroupNorm statistics (PSNR and the largest
tile mean colour difference); with --memory also its ×4 upscale of the
photograph to 2048² and to 4096² (one denoising step), with the peak RSS,
the decode's own growth above what was resident when it began, and both
per output pixel. --latent-context FILE gives the context file of a model
that takes text embeddings.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if repeat < 1 {
				return fmt.Errorf("--repeat must be at least 1, got %d", repeat)
			}
			if latentContext != "" && latent == "" {
				return fmt.Errorf("--latent-context needs --latent")
			}
			var lb *latentBench
			if latent != "" { // before minutes of the demo items
				var err error
				if lb, err = checkLatent(latent, latentContext, memory); err != nil {
					return err
				}
				// One ONNX Runtime environment for both parts.
				env, err := onnx.Open(a.cfg.Runtime, a.logger)
				if err != nil {
					return err
				}
				defer env.Close()
			}
			rep, err := a.bench(cmd.Context(), image, memory, repeat, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			if lb != nil {
				if rep.Latent, err = a.benchLatent(cmd.Context(), lb, memory, cmd.ErrOrStderr()); err != nil {
					return err
				}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			printBench(cmd.OutOrStdout(), rep)
			if rep.Latent != nil {
				printLatent(cmd.OutOrStdout(), rep.Latent)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&memory, "memory", false, "add a 4096² item to measure peak memory")
	cmd.Flags().IntVar(&repeat, "repeat", 1, "measure the 512² and 1024² items this many times and report medians")
	cmd.Flags().StringVar(&latent, "latent", "", "latent SR pipeline folder to measure its tiled decode (and, with --memory, its ×4 upscale to 2048² and 4096²)")
	cmd.Flags().StringVar(&latentContext, "latent-context", "", "context file (.npy or .safetensors) for the --latent model, when it takes text embeddings")
	cmd.Flags().StringVar(&image, "image", benchPhoto, "photograph for the upscaling measurement (default: the embedded "+models.BenchPhotoName+"; \"\" skips it)")
	return cmd
}

func (a *app) bench(ctx context.Context, image string, memory bool, repeat int, log io.Writer) (*benchReport, error) {
	env, err := onnx.Open(a.cfg.Runtime, a.logger)
	if err != nil {
		return nil, err
	}
	defer env.Close()
	eng := pipeline.New(env, models.Resolver{Dirs: a.cfg.Models.Dirs}, pipeline.Options{Workers: 1}, a.logger)
	defer eng.Close()
	rep := &benchReport{ONNXRuntime: env.Version, Provider: strings.Join(a.cfg.Runtime.Providers, ","), Repeat: repeat}
	gen := func(name string, size, srSteps int) (*benchItem, *pipeline.Result, error) {
		it := pipeline.Item{Seed: 1, Width: size, Height: size, Class: -1,
			Base: pipeline.StageParams{Model: "demo-base", Steps: 10},
			SR:   pipeline.StageParams{Model: "demo-sr", Steps: srSteps, Strength: 0.5}}
		fmt.Fprintf(log, "bench: %s %dx%d ...\n", name, size, size)
		return measure(ctx, eng, name, it)
	}
	// Warm up: sessions, memory plans and the first Runs are not what is measured.
	// 512² with 2 SR steps reaches every session the measured items use:
	// the base, the one-lane SR session (its 128² stage fits one tile) and
	// the SR lanes at the full 256² tile.
	if _, _, err := gen("warm-up", 512, 2); err != nil {
		return nil, err
	}
	// Rounds alternate the sizes, so that a machine that speeds up or slows
	// down over the run moves both alike; each round's scaling ratio pairs
	// neighbours.
	var small, large []benchItem
	var scaling []float64
	for round := 0; round < repeat; round++ {
		sm, _, err := gen("generate 512²", 512, 10)
		if err != nil {
			return nil, err
		}
		lg, res, err := gen("generate 1024²", 1024, 10)
		if err != nil {
			return nil, err
		}
		if round == 0 { // a property of the seeded image, the same every round
			last := res.Plan.Stages[len(res.Plan.Stages)-1]
			if g, err := eng.Grid(last); err == nil {
				lg.SeamScore = pipeline.SeamScore(res.Image, res.Channels, res.Height, res.Width, g)
			}
		}
		small, large = append(small, *sm), append(large, *lg)
		if sm.WallSeconds > 0 {
			scaling = append(scaling, lg.WallSeconds/sm.WallSeconds)
		}
	}
	rep.Items = []benchItem{medianItem(small), medianItem(large)}
	rep.ScalingRatio = median(scaling)
	rep.TileStepRatio = float64(rep.Items[1].TileSteps) / float64(rep.Items[0].TileSteps)
	if b := rep.Items[0].BusySeconds; b > 0 {
		rep.BusyRatio = rep.Items[1].BusySeconds / b
	}
	if image != "" {
		up, err := benchUpscale(ctx, eng, image, log)
		if err != nil {
			return nil, err
		}
		rep.Upscale = up
	}
	if memory {
		bi, _, err := gen("memory 4096²", 4096, 2)
		if err != nil {
			return nil, err
		}
		rep.Memory = bi
	}
	for _, m := range eng.ModelStats() {
		rep.Models = append(rep.Models, benchModel{Model: m.Model, Provider: m.Provider, Lanes: m.Lanes, Devices: m.Devices, Threads: m.Threads})
	}
	return rep, nil
}

// measure runs one item and reads the engine's Run time and the process's
// peak RSS around it.
func measure(ctx context.Context, eng *pipeline.Engine, name string, it pipeline.Item) (*benchItem, *pipeline.Result, error) {
	// Give back what the previous item left (a 1024² item before a 512²
	// one, in rounds), so that the peak is this item's own.
	debug.FreeOSMemory()
	pipeline.ResetPeakResident()
	before := eng.Stats()
	start := time.Now()
	res, err := eng.Make(ctx, it, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", name, err)
	}
	wall := time.Since(start).Seconds()
	after := eng.Stats()
	run, busy := after.RunSeconds-before.RunSeconds, after.BusySeconds-before.BusySeconds
	bi := &benchItem{Name: name, Width: res.Width, Height: res.Height, WallSeconds: wall, RunSeconds: run, BusySeconds: busy,
		TileSteps: int(after.Rows - before.Rows), PeakRSSMiB: float64(pipeline.PeakResidentBytes()) / (1 << 20)}
	if busy > 0 {
		bi.Overhead = wall / busy
	}
	bi.TilesPerSec = float64(bi.TileSteps) / wall
	return bi, res, nil
}

// medianItem is the item of the first round with every timing and memory
// figure replaced by its median over the rounds (the seam score is the
// first round's: the image is the same every round).
func medianItem(rounds []benchItem) benchItem {
	out := rounds[0]
	pick := func(f func(*benchItem) *float64) {
		v := make([]float64, len(rounds))
		for i := range rounds {
			v[i] = *f(&rounds[i])
		}
		*f(&out) = median(v)
	}
	pick(func(b *benchItem) *float64 { return &b.WallSeconds })
	pick(func(b *benchItem) *float64 { return &b.RunSeconds })
	pick(func(b *benchItem) *float64 { return &b.BusySeconds })
	pick(func(b *benchItem) *float64 { return &b.Overhead })
	pick(func(b *benchItem) *float64 { return &b.TilesPerSec })
	pick(func(b *benchItem) *float64 { return &b.PeakRSSMiB })
	return out
}

// median is the middle value of v (the mean of the two middle ones for an
// even count), 0 for none.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// benchPhoto is --image's default: the embedded photograph.
const benchPhoto = "embedded"

// dB is a PSNR in decibels. JSON has no infinity, so +Inf (identical
// images) is written as null; tiled_identical says so in words.
type dB float64

func (d dB) MarshalJSON() ([]byte, error) {
	if math.IsInf(float64(d), 0) || math.IsNaN(float64(d)) {
		return []byte("null"), nil
	}
	return json.Marshal(float64(d))
}

func benchUpscale(ctx context.Context, eng *pipeline.Engine, path string, log io.Writer) (*upscaleReport, error) {
	tmp, err := os.MkdirTemp("", "tessera-bench")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if path == benchPhoto {
		path = filepath.Join(tmp, models.BenchPhotoName)
		if err := os.WriteFile(path, models.BenchPhoto, 0o644); err != nil {
			return nil, err
		}
	}
	orig, fw, fh, err := pipeline.LoadImage(path)
	if err != nil {
		return nil, err
	}
	w, h := fw/16*16, fh/16*16
	ref := crop(orig, w, h, fw)
	lw, lh := w/4, h/4
	small := make([]float32, 3*lh*lw)
	if err := stages.Resample(small, ref, 3, h, w, lh, lw, stages.FilterLanczos); err != nil {
		return nil, err
	}
	lowPath := filepath.Join(tmp, "low.png")
	if err := pipeline.SaveImage(lowPath, small, lw, lh); err != nil {
		return nil, err
	}
	low, _, _, err := pipeline.LoadImage(lowPath) // 8-bit, as a user's file would be
	if err != nil {
		return nil, err
	}
	up := &upscaleReport{Image: path, From: fmt.Sprintf("%dx%d", lw, lh), To: fmt.Sprintf("%dx%d", w, h)}
	for _, f := range []stages.Filter{stages.FilterLanczos, stages.FilterBicubic} {
		out := make([]float32, 3*h*w)
		if err := stages.Resample(out, low, 3, lh, lw, h, w, f); err != nil {
			return nil, err
		}
		if f == stages.FilterLanczos {
			up.PSNRLanczos = pipeline.PSNR(out, ref)
		} else {
			up.PSNRBicubic = pipeline.PSNR(out, ref)
		}
	}
	item := func(tile int) pipeline.Item {
		return pipeline.Item{Seed: 1, Class: -1, Image: lowPath, Scale: 4, SR: pipeline.StageParams{Model: "demo-sr", Tile: pipeline.Tiling{Size: tile, Overlap: 16}}}
	}
	fmt.Fprintf(log, "bench: upscale %s 4x, tiled and untiled ...\n", filepath.Base(path))
	start := time.Now()
	tiled, err := eng.Make(ctx, item(160), nil)
	if err != nil {
		return nil, err
	}
	up.Seconds = time.Since(start).Seconds()
	untiled, err := eng.Make(ctx, item(max(w, h)), nil)
	if err != nil {
		return nil, err
	}
	up.PSNRTessera = pipeline.PSNR(tiled.Image, ref)
	up.PSNRTiledVsUntiled = dB(pipeline.PSNR(tiled.Image, untiled.Image))
	up.TiledIdentical = math.IsInf(float64(up.PSNRTiledVsUntiled), 1)
	if g, err := eng.Grid(tiled.Plan.Stages[0]); err == nil {
		up.SeamScore = pipeline.SeamScore(tiled.Image, 3, h, w, g)
	}
	return up, nil
}

// crop takes the top-left w×h of a planar 3-channel image of width fullW.
func crop(img []float32, w, h, fullW int) []float32 {
	fullH := len(img) / 3 / fullW
	out := make([]float32, 3*h*w)
	for c := 0; c < 3; c++ {
		for y := 0; y < h; y++ {
			copy(out[(c*h+y)*w:(c*h+y+1)*w], img[(c*fullH+y)*fullW:(c*fullH+y)*fullW+w])
		}
	}
	return out
}

func printBench(w io.Writer, r *benchReport) {
	fmt.Fprintf(w, "ONNX Runtime %s on %s\n", r.ONNXRuntime, r.Provider)
	for _, m := range r.Models {
		devices := ""
		if m.Devices > 1 {
			devices = fmt.Sprintf(" on %d devices", m.Devices)
		}
		fmt.Fprintf(w, "%s: %d lane(s) of %d thread(s)%s\n", m.Model, m.Lanes, m.Threads, devices)
	}
	if r.Repeat > 1 {
		fmt.Fprintf(w, "512² and 1024²: medians of %d rounds\n", r.Repeat)
	}
	fmt.Fprintf(w, "%-16s %9s %9s %9s %8s %10s %9s %9s %6s\n", "item", "wall s", "run s", "busy s", "overhead", "tile-steps", "tiles/s", "peak MiB", "seam")
	rows := r.Items
	if r.Memory != nil {
		rows = append(rows, *r.Memory)
	}
	for _, it := range rows {
		seam := "-"
		if it.SeamScore > 0 {
			seam = fmt.Sprintf("%.3f", it.SeamScore)
		}
		fmt.Fprintf(w, "%-16s %9.2f %9.2f %9.2f %8.3f %10d %9.1f %9.0f %6s\n", it.Name, it.WallSeconds, it.RunSeconds, it.BusySeconds, it.Overhead, it.TileSteps, it.TilesPerSec, it.PeakRSSMiB, seam)
	}
	if r.ScalingRatio > 0 {
		fmt.Fprintf(w, "scaling t(1024²)/t(512²) = %.2f, tile-step ratio %.2f (%.1f%% apart), busy ratio %.2f (%.1f%% apart)\n",
			r.ScalingRatio, r.TileStepRatio, 100*math.Abs(r.ScalingRatio/r.TileStepRatio-1), r.BusyRatio, 100*math.Abs(r.ScalingRatio/r.BusyRatio-1))
	}
	if u := r.Upscale; u != nil {
		fmt.Fprintf(w, "upscale %s %s -> %s: demo-sr %.2f dB, Lanczos %.2f dB, bicubic %.2f dB; tiled vs untiled %.2f dB, seam %.3f (%.1fs)\n",
			filepath.Base(u.Image), u.From, u.To, u.PSNRTessera, u.PSNRLanczos, u.PSNRBicubic, u.PSNRTiledVsUntiled, u.SeamScore, u.Seconds)
	}
}
