package pipeline

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tessera/models"
	"tessera/stages"
)

func autoencoders(name string) string { return filepath.Join("..", "testdata", "autoencoders", name) }

// With the oracle autoencoder (depth-to-space, no normalisation) the tiled
// decode is exactly the whole canvas's, in every tile layout: the windows
// scaled to the output form a partition of unity and nothing is lost at
// tile edges.
func TestDecodeTiledOracleIsExact(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	const c, h, w, f = 48, 20, 28, 4
	z := make([]float32, c*h*w)
	(stages.Noise{Seed: 9}).Fill(z, 0, c, 0, 0, h, w)
	for i := range z {
		z[i] *= 0.5
	}
	// depth-to-space: pixel (ch, y, x) is latent channel ch·16 + (y%4)·4 + x%4 at (y/4, x/4).
	want := make([]float32, 3*h*f*w*f)
	for ch := 0; ch < 3; ch++ {
		for y := 0; y < h*f; y++ {
			for x := 0; x < w*f; x++ {
				k := ch*f*f + (y%f)*f + x%f
				v := z[(k*h+y/f)*w+x/f]
				want[(ch*h*f+y)*w*f+x] = min(max(v, -1), 1)
			}
		}
	}
	for _, l := range []struct{ tile, overlap, halo int }{{32, 0, 0}, {8, 2, 0}, {12, 4, 2}, {10, 2, 3}} {
		dp := &DecodePlan{Autoencoder: autoencoders("oracle-f4"), Factor: f, TileSize: l.tile, Overlap: l.overlap, Halo: l.halo}
		img, err := e.decode(context.Background(), dp, z, c, h, w)
		if err != nil {
			t.Fatal(err)
		}
		if d := maxAbsDiff(img, want); d > 1e-6 {
			t.Errorf("tiles %+v: off by %g", l, d)
		}
	}
}

// The naive per-tile decode of a decoder with GroupNorm and a mid-block
// self-attention drifts from the whole-canvas decode: each tile normalises
// by its own statistics and attends to its own latents. This measures how
// far (as PSNR and as the largest difference of a tile's mean colour), the
// figure that synchronised statistics will have to beat.
func TestDecodeNaiveTilingDrift(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	const c, h, w = 4, 32, 32
	z := make([]float32, c*h*w)
	(stages.Noise{Seed: 4}).Fill(z, 0, c, 0, 0, h, w)
	// A latent with structure: a ramp across the canvas, so tiles differ.
	for ch := 0; ch < c; ch++ {
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				z[(ch*h+y)*w+x] = 0.08333 * (0.3*z[(ch*h+y)*w+x] + float32(x-y)/float32(w))
			}
		}
	}
	dir := autoencoders("kl-like")
	whole, err := e.decode(context.Background(), &DecodePlan{Autoencoder: dir, Factor: 4, TileSize: 32}, z, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	dp := &DecodePlan{Autoencoder: dir, Factor: 4, TileSize: 16, Overlap: 4, Halo: 4}
	tiled, err := e.decode(context.Background(), dp, z, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	g, _ := decodeGrid(h, w, dp)
	psnr, worst := driftOf(whole, tiled, g, h, w, 4)
	t.Logf("naive tiled decode (%d tiles of 16 latent px, halo 4) vs whole: %.1f dB, largest tile mean colour difference %.4f", len(g.Tiles), psnr, worst)
	if math.IsInf(psnr, 1) || psnr < 10 || worst == 0 {
		t.Errorf("a decoder with GroupNorm and attention should drift a little per tile, not %.1f dB / %g", psnr, worst)
	}
}

// Tiles go to the decoder several to a Run; a Run that runs out of memory
// is halved and the image is the same.
func TestDecodeBatchesAndHalves(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	const c, h, w = 48, 24, 24
	z := make([]float32, c*h*w)
	(stages.Noise{Seed: 2}).Fill(z, 0, c, 0, 0, h, w)
	dp := func(batch int) *DecodePlan {
		return &DecodePlan{Autoencoder: autoencoders("oracle-f4"), Factor: 4, TileSize: 8, Overlap: 2, Halo: 1, Batch: batch}
	}
	ref, err := e.decode(context.Background(), dp(1), z, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := e.decoderOf(autoencoders("oracle-f4"))
	before := d.runs.Load()
	var seen []int
	d.inject = func(n int) error {
		seen = append(seen, n)
		if n > 2 {
			return errors.New("onnxruntime: Failed to allocate memory for requested buffer")
		}
		return nil
	}
	got, err := e.decode(context.Background(), dp(8), z, c, h, w)
	d.inject = nil
	if err != nil {
		t.Fatal(err)
	}
	if maxAbsDiff(got, ref) != 0 || len(seen) < 3 || seen[0] != 8 || seen[1] != 4 || slices.Max(seen[2:]) > 2 {
		t.Fatalf("halving: runs of %v, images differ by %g", seen, maxAbsDiff(got, ref))
	}
	if runs := d.runs.Load() - before; runs >= int64(len(seen)) {
		t.Errorf("%d Runs counted for %d attempts (the failed ones do not run)", runs, len(seen))
	}
}

// MeasureDecodeDrift, what `tessera bench --latent` reports, finds what
// the test below finds by hand: the synchronised decode of the decoder
// without attention is exact, the naive one drifts.
func TestMeasureDecodeDrift(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	dr, err := e.MeasureDecodeDrift(context.Background(), autoencoders("vq-like"), 32, 32, 24)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", *dr)
	if !dr.Synced || dr.Tiles != 4 || dr.SyncedPSNR < 60 || dr.NaivePSNR > 40 || dr.NaiveColour <= dr.SyncedColour {
		t.Errorf("vq-like drift %+v: want 4 tiles, synchronised above 60 dB, naive below 40 dB", *dr)
	}
	if _, err := e.MeasureDecodeDrift(context.Background(), autoencoders("vq-like"), 32, 32, 32); err == nil {
		t.Error("one tile covering the latent: want an error (nothing to measure)")
	}
}

// GroupNorm statistics of the whole image, gathered over the tiles
// (tools/sync_decoder.py cuts the decoders open): one tile covering the
// canvas reproduces the decoder exactly (the cut graph and the statistics
// are right); tiled, the decoder without attention (vq-like) comes back to
// the whole-canvas decode where its halo covers the receptive field, and
// the one with a mid-block self-attention (kl-like, attending within each
// tile) much nearer than the naive decode.
func TestDecodeSyncedStatistics(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	for _, c := range []struct {
		name           string
		latent         int
		minGain, minDB float64
	}{{"vq-like", 3, 20, 60}, {"kl-like", 4, 0.5, 20}} { // measured: 137.5 against 25.8 dB, and 27.7 against 26.4 (attention within tiles)
		const h, w, f = 32, 32, 4
		z := make([]float32, c.latent*h*w)
		(stages.Noise{Seed: 4}).Fill(z, 0, c.latent, 0, 0, h, w)
		for ch := 0; ch < c.latent; ch++ {
			for y := 0; y < h; y++ {
				for x := 0; x < w; x++ {
					z[(ch*h+y)*w+x] = 0.3*z[(ch*h+y)*w+x] + float32(x-y)/float32(w)
				}
			}
		}
		dir := autoencoders(c.name)
		scale := map[string]float32{"vq-like": 1, "kl-like": 0.08333}[c.name]
		for i := range z {
			z[i] *= scale
		}
		whole, err := e.decode(context.Background(), &DecodePlan{Autoencoder: dir, Factor: f, TileSize: 32, Statistics: StatisticsTile}, z, c.latent, h, w)
		if err != nil {
			t.Fatal(err)
		}
		one, err := e.decode(context.Background(), &DecodePlan{Autoencoder: dir, Factor: f, TileSize: 32, Statistics: StatisticsImage}, z, c.latent, h, w)
		if err != nil {
			t.Fatal(err)
		}
		if d := maxAbsDiff(one, whole); d > 1e-4 {
			t.Errorf("%s: one synchronised tile differs from the decoder by %g", c.name, d)
		}
		tiles := func(stats string) *DecodePlan {
			return &DecodePlan{Autoencoder: dir, Factor: f, TileSize: 24, Overlap: 4, Halo: 6, Statistics: stats}
		}
		naive, err := e.decode(context.Background(), tiles(StatisticsTile), z, c.latent, h, w)
		if err != nil {
			t.Fatal(err)
		}
		synced, err := e.decode(context.Background(), tiles(StatisticsImage), z, c.latent, h, w)
		if err != nil {
			t.Fatal(err)
		}
		g, _ := decodeGrid(h, w, tiles(StatisticsTile))
		pn, cn := driftOf(whole, naive, g, h, w, f)
		ps, cs := driftOf(whole, synced, g, h, w, f)
		t.Logf("%s, %d tiles of 24 latent px, halo 6: naive %.1f dB (tile mean colour off by %.4f), synchronised %.1f dB (%.4f)", c.name, len(g.Tiles), pn, cn, ps, cs)
		if ps-pn < c.minGain || ps < c.minDB {
			t.Errorf("%s: synchronised %.1f dB against naive %.1f dB: want at least %.0f dB and %.0f dB better", c.name, ps, pn, c.minDB, c.minGain)
		}
	}
}

// TestDecodeFloat16RetriesOverflowInFloat32: a float16 decoder (the
// overflow-f16 fixture: depth-to-space times 1000, whose float16 output
// overflows to infinity where a latent exceeds 65.5) decodes every tile in
// float16, and only the tiles whose output is not finite again in its
// float32 copy. Unretried, an infinity in a tile's halo (window weight 0)
// would make NaN of the fused image. The image is 1000·depth-to-space,
// clamped, within float16's precision, and the overflowed corner exact.
// Without model_fp32.onnx Tessera widens the float16 graph in memory
// (onnx.WidenFloat16), to the same image.
func TestDecodeFloat16RetriesOverflowInFloat32(t *testing.T) {
	const c, h, w = 48, 16, 16
	z := make([]float32, c*h*w)
	for ch := 0; ch < c; ch++ {
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				v := float32(0.9e-3 * math.Sin(float64(3*ch+y)*0.37+float64(x)*0.21))
				if y < 3 && x < 3 {
					v = 100 // over float16's range once times 1000
				}
				z[(ch*h+y)*w+x] = v
			}
		}
	}
	want := depthToSpace(z, 3, h, w)
	for i, v := range want {
		want[i] = min(max(1000*v, -1), 1)
	}
	dp := &DecodePlan{Autoencoder: autoencoders("overflow-f16"), Factor: 4, TileSize: 8, Overlap: 2, Halo: 1, Statistics: StatisticsTile}
	e := newEngine(t, Options{})
	img, err := e.decode(context.Background(), dp, z, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := e.decoderOf(dp.Autoencoder)
	g, _ := decodeGrid(h, w, dp)
	if !d.half || d.fp32 == nil || !strings.HasSuffix(d.fp32.path, "model_fp32.onnx") || d.retried.Load() < 1 || d.retried.Load() >= int64(len(g.Tiles)) {
		t.Fatalf("half %v, float32 copy %v, %d of %d tiles retried: want only the overflowed ones", d.half, d.fp32 != nil, d.retried.Load(), len(g.Tiles))
	}
	if diff := worstDiff(img, want); diff > 2e-3 {
		t.Errorf("largest error %g against 1000·depth-to-space", diff)
	}
	// The corner the float16 Run could not make is exact: float32 made it.
	for ch := 0; ch < 3; ch++ {
		for y := 0; y < 8; y++ {
			for x := 0; x < 8; x++ {
				if i := (ch*4*h+y)*4*w + x; img[i] != want[i] {
					t.Fatalf("corner pixel (%d, %d, %d): %g, want %g exactly", ch, y, x, img[i], want[i])
				}
			}
		}
	}
	// The same decoder without its float32 copy: Tessera widens the
	// float16 graph itself, to the same image.
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "vae_decoder"), 0o755)
	for _, f := range []string{"model.onnx", "config.json"} {
		data, err := os.ReadFile(filepath.Join(dp.Autoencoder, "vae_decoder", f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, "vae_decoder", f), data, 0o644)
	}
	alone := *dp
	alone.Autoencoder = dir
	img2, err := e.decode(context.Background(), &alone, z, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	d2, _ := e.decoderOf(dir)
	if d2.retried.Load() != d.retried.Load() || !strings.Contains(d2.fp32.path, "widened") {
		t.Errorf("widened in memory: %d tiles retried (with the file: %d), copy %q", d2.retried.Load(), d.retried.Load(), d2.fp32.path)
	}
	if !slices.Equal(img2, img) {
		t.Errorf("the widened graph's image differs from the float32 copy's (%g)", worstDiff(img2, img))
	}
}

// TestDecodeBatchesAcrossItems: tiles of items decoding at the same time
// share Runs. While one item's Run is held, two items of two tiles each
// queue theirs; the held Run's caller then runs all four in one Run, and
// each image is the one it decodes to alone.
func TestDecodeBatchesAcrossItems(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	const c, h, w = 48, 8, 12 // two tiles of 8 (overlap 2, halo 1)
	dp := &DecodePlan{Autoencoder: autoencoders("oracle-f4"), Factor: 4, TileSize: 8, Overlap: 2, Halo: 1, Batch: 4}
	if g, _ := decodeGrid(h, w, dp); len(g.Tiles) != 2 {
		t.Fatalf("%d tiles, want 2", len(g.Tiles))
	}
	zs := make([][]float32, 3)
	for i := range zs {
		zs[i] = make([]float32, c*h*w)
		(stages.Noise{Seed: uint64(10 + i)}).Fill(zs[i], 0, c, 0, 0, h, w)
	}
	d, err := e.decoderOf(dp.Autoencoder)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var mu sync.Mutex
	var seen []int
	d.inject = func(n int) error {
		mu.Lock()
		first := len(seen) == 0
		seen = append(seen, n)
		mu.Unlock()
		if first {
			<-release
		}
		return nil
	}
	imgs := make([][]float32, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	decode := func(i int) {
		defer wg.Done()
		imgs[i], errs[i] = e.decode(context.Background(), dp, zs[i], c, h, w)
	}
	wg.Add(1)
	go decode(0)
	for d.runs.Load() == 0 && func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == 0 }() {
		time.Sleep(time.Millisecond) // item 0's Run is held
	}
	wg.Add(2)
	go decode(1)
	go decode(2)
	for func() bool { d.batcher.mu.Lock(); defer d.batcher.mu.Unlock(); return len(d.batcher.pending) < 4 }() {
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	d.inject = nil
	for i := range zs {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		alone, err := e.decode(context.Background(), dp, zs[i], c, h, w)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(imgs[i], alone) {
			t.Errorf("item %d: its image differs from its decode alone by %g", i, maxAbsDiff(imgs[i], alone))
		}
	}
	if !slices.Equal(seen, []int{2, 4}) {
		t.Errorf("Runs of %v tiles, want [2 4]: item 0's two, then the other items' four in one", seen)
	}
}

// A panic in an autoencoder Run fails the tiles of that Run with the
// panic, and the graph's batcher goes on: the next decode works.
func TestDecodePanicDoesNotWedgeTheBatcher(t *testing.T) {
	e := New(testEnv, models.Resolver{}, Options{}, nil)
	defer e.Close()
	const c, h, w = 48, 8, 12
	z := make([]float32, c*h*w)
	dp := &DecodePlan{Autoencoder: autoencoders("oracle-f4"), Factor: 4, TileSize: 8, Overlap: 2, Halo: 1}
	d, err := e.decoderOf(dp.Autoencoder)
	if err != nil {
		t.Fatal(err)
	}
	d.inject = func(n int) error { panic("injected") }
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.decode(ctx, dp, z, c, h, w); err == nil || !strings.Contains(err.Error(), "panic") {
		t.Fatalf("decode with a panicking Run: %v", err)
	}
	d.inject = nil
	if _, err := e.decode(ctx, dp, z, c, h, w); err != nil {
		t.Fatalf("the decode after the panic: %v", err)
	}
}
