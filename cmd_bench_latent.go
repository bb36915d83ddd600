package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"tessera/models"
	"tessera/onnx"
	"tessera/pipeline"
	"tessera/stages"
)

// latentReport is bench --latent: a latent SR pipeline folder's decoder,
// tiled against whole (the colour shift), and with --memory its ×4 upscale
// to two sizes (peak memory, the decoder's share, growth per pixel).
type latentReport struct {
	Model      string                `json:"model"`
	Drift      *pipeline.DecodeDrift `json:"drift"`
	NaivePSNR  dB                    `json:"drift_naive_psnr_db"`
	SyncedPSNR dB                    `json:"drift_synced_psnr_db"` // null when exact or not synchronised
	Items      []latentItem          `json:"items,omitempty"`
	// Growth per output pixel between the two sizes: of the item's peak
	// resident set, and of the decode's own growth above what was resident
	// when it began.
	PeakBytesPerPixel        float64 `json:"peak_rss_bytes_per_output_pixel,omitempty"`
	DecodeBytesPerPixel      float64 `json:"decode_growth_bytes_per_output_pixel,omitempty"`
	DecoderWorkBytesPerPixel float64 `json:"decoder_work_bytes_per_output_pixel,omitempty"`
}

// latentItem is one measured latent ×4 upscale.
type latentItem struct {
	benchItem
	DecodeSeconds   float64 `json:"decode_seconds"`
	DecodeTiles     int     `json:"decode_tiles"`
	DecodeGrowthMiB float64 `json:"decode_growth_mib"` // the decode's peak above the resident set when it began
	// DecodeCanvasMiB is the part of that growth the output needs whatever
	// the tiling (pipeline.DecodeCanvasBytes); DecoderWorkMiB the rest: the
	// decoder's Runs, the tiles' latents, and garbage not yet collected.
	DecodeCanvasMiB float64 `json:"decode_canvas_mib"`
	DecoderWorkMiB  float64 `json:"decoder_work_mib"`
}

// Bench's latent measurements: the drift on a 64² latent (256² pixels at
// ×4) in tiles of 32 latent pixels, the upscale to 2048² and to 4096²
// with one denoising step (the decode is what is measured).
const (
	latentDriftSize = 64
	latentDriftTile = 32
)

var latentSizes = []int{2048, 4096}

// latentBench is --latent and --latent-context, checked before anything
// runs: a latent pipeline folder with its decoder (found by res as name),
// and the context file its U-Net's context input takes, where it takes one.
type latentBench struct {
	res  models.Resolver
	name string
	man  *onnx.Manifest
	cref *pipeline.ContextRef
}

func checkLatent(dir, contextFile string, memory bool) (*latentBench, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	lb := &latentBench{res: models.Resolver{Dirs: []string{filepath.Dir(abs)}}, name: filepath.Base(abs)}
	if lb.man, err = lb.res.Manifest(lb.name); err != nil {
		return nil, fmt.Errorf("--latent %s: %w", dir, err)
	}
	if lb.man.Space != onnx.SpaceLatent || lb.man.Autoencoder == "" {
		return nil, fmt.Errorf("--latent %s: not a latent pipeline folder with a vae_decoder/", dir)
	}
	in := lb.man.Inputs[onnx.RoleContext]
	switch {
	case contextFile != "" && !memory:
		return nil, fmt.Errorf("--latent-context: only the --memory items denoise; without --memory it would be ignored")
	case contextFile != "" && in == "":
		return nil, fmt.Errorf("--latent-context: %s takes no text embeddings", dir)
	case contextFile == "" && in != "" && memory:
		return nil, fmt.Errorf("--latent %s takes text embeddings (%s): give --latent-context FILE (.npy or .safetensors, [L, D])", dir, in)
	case contextFile == "":
		return lb, nil
	}
	p, err := filepath.Abs(contextFile)
	if err != nil {
		return nil, err
	}
	c, sum, err := pipeline.ReadContext(p)
	if err != nil {
		return nil, fmt.Errorf("--latent-context: %w", err)
	}
	if d := lb.man.ContextDim; d > 0 && c.D != d {
		return nil, fmt.Errorf("--latent-context: %s is [%d, %d]; %s takes D = %d", contextFile, c.L, c.D, dir, d)
	}
	lb.cref = &pipeline.ContextRef{Path: p, SHA256: sum, Tokens: c.L, Dim: c.D}
	return lb, nil
}

func (a *app) benchLatent(ctx context.Context, lb *latentBench, memory bool, log io.Writer) (*latentReport, error) {
	res, name, man := lb.res, lb.name, lb.man
	abs := filepath.Join(res.Dirs[0], name)
	env, err := onnx.Open(a.cfg.Runtime, a.logger)
	if err != nil {
		return nil, err
	}
	defer env.Close()
	eng := pipeline.New(env, res, pipeline.Options{Workers: 1, MeasureDecode: true}, a.logger)
	defer eng.Close()
	rep := &latentReport{Model: abs}
	fmt.Fprintf(log, "bench: %s decoder, tiled and whole, on a %d² latent ...\n", name, latentDriftSize)
	if rep.Drift, err = eng.MeasureDecodeDrift(ctx, man.Autoencoder, latentDriftSize, latentDriftSize, latentDriftTile); err != nil {
		return nil, fmt.Errorf("--latent %s: %w", abs, err)
	}
	rep.NaivePSNR, rep.SyncedPSNR = dB(rep.Drift.NaivePSNR), dB(rep.Drift.SyncedPSNR)
	if !memory {
		return rep, nil
	}
	tmp, err := os.MkdirTemp("", "tessera-bench")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	photo := filepath.Join(tmp, models.BenchPhotoName)
	if err := os.WriteFile(photo, models.BenchPhoto, 0o644); err != nil {
		return nil, err
	}
	src, pw, ph, err := pipeline.LoadImage(photo)
	if err != nil {
		return nil, err
	}
	for _, size := range latentSizes {
		in := size / 4
		low := make([]float32, 3*in*in)
		if err := stages.Resample(low, src, 3, ph, pw, in, in, stages.FilterLanczos); err != nil {
			return nil, err
		}
		path := filepath.Join(tmp, fmt.Sprintf("in-%d.png", in))
		if err := pipeline.SaveImage(path, low, in, in); err != nil {
			return nil, err
		}
		it := pipeline.Item{Seed: 1, Class: -1, Image: path, Scale: 4, Context: lb.cref,
			SR: pipeline.StageParams{Model: name, Steps: 1}}
		label := fmt.Sprintf("latent ×4 %d²", size)
		fmt.Fprintf(log, "bench: %s ...\n", label)
		bi, r, err := measure(ctx, eng, label, it)
		if err != nil {
			return nil, err
		}
		li := latentItem{benchItem: *bi}
		for _, d := range r.Decodes {
			li.DecodeSeconds += d.Seconds
			li.DecodeGrowthMiB = max(li.DecodeGrowthMiB, float64(d.Growth())/(1<<20))
			// measure read the peak after the decode restarted it.
			li.PeakRSSMiB = max(li.PeakRSSMiB, float64(d.PeakBefore)/(1<<20))
		}
		for _, sp := range r.Plan.Stages {
			if sp.Decode != nil {
				li.DecodeTiles += sp.Decode.Tiles
				li.DecodeCanvasMiB = float64(pipeline.DecodeCanvasBytes(sp.Width*sp.Decode.Factor, sp.Height*sp.Decode.Factor)) / (1 << 20)
			}
		}
		li.DecoderWorkMiB = li.DecodeGrowthMiB - li.DecodeCanvasMiB
		li.Overhead = 0 // wall ÷ the U-Net's busy time says nothing here: the decode is the item
		rep.Items = append(rep.Items, li)
	}
	if n := len(rep.Items); n >= 2 {
		a, b := rep.Items[0], rep.Items[n-1]
		px := float64(b.Width*b.Height - a.Width*a.Height)
		rep.PeakBytesPerPixel = (b.PeakRSSMiB - a.PeakRSSMiB) * (1 << 20) / px
		rep.DecodeBytesPerPixel = (b.DecodeGrowthMiB - a.DecodeGrowthMiB) * (1 << 20) / px
		rep.DecoderWorkBytesPerPixel = (b.DecoderWorkMiB - a.DecoderWorkMiB) * (1 << 20) / px
	}
	return rep, nil
}

func printLatent(w io.Writer, l *latentReport) {
	d := l.Drift
	synced := "no model_sync.onnx"
	if d.Synced {
		synced = fmt.Sprintf("%.1f dB, tile mean colour off by %.4f", d.SyncedPSNR, d.SyncedColour)
	}
	fmt.Fprintf(w, "latent %s: decode of a %s latent in %d tiles of %d (halo %d) against whole: naive %.1f dB, tile mean colour off by %.4f; synchronised %s\n",
		filepath.Base(l.Model), d.Latent, d.Tiles, d.TileSize, d.Halo, d.NaivePSNR, d.NaiveColour, synced)
	if len(l.Items) == 0 {
		return
	}
	fmt.Fprintf(w, "%-16s %9s %9s %12s %9s %11s %11s %11s\n", "item", "wall s", "decode s", "decode tiles", "peak MiB", "decode MiB", "canvas MiB", "decoder MiB")
	for _, it := range l.Items {
		fmt.Fprintf(w, "%-16s %9.2f %9.2f %12d %9.0f %11.1f %11.1f %11.1f\n", it.Name, it.WallSeconds, it.DecodeSeconds, it.DecodeTiles, it.PeakRSSMiB, it.DecodeGrowthMiB, it.DecodeCanvasMiB, it.DecoderWorkMiB)
	}
	fmt.Fprintf(w, "growth per output pixel: peak %.1f bytes, decode %.1f bytes (its canvases %d), the decoder's own %.2f bytes\n",
		l.PeakBytesPerPixel, l.DecodeBytesPerPixel, pipeline.DecodeCanvasBytes(1, 1), l.DecoderWorkBytesPerPixel)
}
