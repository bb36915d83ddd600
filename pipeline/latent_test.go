package pipeline

import (
	"context"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"testing"

	"tessera/onnx"
	"tessera/stages"
)

// aeLayout is a tile layout of a plan's encode or decode, in latents.
type aeLayout struct{ tile, overlap, halo int }

var aeLayouts = []aeLayout{{64, 8, 8}, {4, 1, 1}, {6, 2, 1}}

// withAELayout is plan with its encodes and decodes retiled to l.
func withAELayout(t *testing.T, plan Plan, l aeLayout) Plan {
	t.Helper()
	plan.Stages = append([]StagePlan(nil), plan.Stages...)
	for i := range plan.Stages {
		sp := &plan.Stages[i]
		for _, dp := range []**DecodePlan{&sp.Decode, &sp.Encode} {
			if *dp == nil {
				continue
			}
			d := **dp
			d.TileSize, d.Overlap, d.Halo = l.tile, l.overlap, l.halo
			g, err := decodeGrid(sp.Height, sp.Width, &d)
			if err != nil {
				t.Fatal(err)
			}
			d.Tiles = len(g.Tiles)
			*dp = &d
		}
	}
	return plan
}

// planned is the item with its input's size read, and its plan.
func planned(t *testing.T, e *Engine, it Item) (Item, Plan) {
	t.Helper()
	if err := it.SetInput(); err != nil {
		t.Fatal(err)
	}
	plan, err := e.Plan(it)
	if err != nil {
		t.Fatal(err)
	}
	return it, plan
}

// depthToSpace is the oracle decoder: latents C·16 × h × w → C × 4h × 4w.
func depthToSpace(z []float32, c, h, w int) []float32 {
	out := make([]float32, c*16*h*w)
	W := 4 * w
	for ch := 0; ch < c; ch++ {
		for j := 0; j < 16; j++ {
			dy, dx := j/4, j%4
			for y := 0; y < h; y++ {
				for x := 0; x < w; x++ {
					out[ch*16*h*w+(4*y+dy)*W+4*x+dx] = z[((ch*16+j)*h+y)*w+x]
				}
			}
		}
	}
	return out
}

// spaceToDepth is its inverse, the oracle encoder's mean.
func spaceToDepth(img []float32, c, H, W int) []float32 {
	h, w := H/4, W/4
	out := make([]float32, len(img))
	for ch := 0; ch < c; ch++ {
		for j := 0; j < 16; j++ {
			dy, dx := j/4, j%4
			for y := 0; y < h; y++ {
				for x := 0; x < w; x++ {
					out[((ch*16+j)*h+y)*w+x] = img[ch*H*W+(4*y+dy)*W+4*x+dx]
				}
			}
		}
	}
	return out
}

func worstDiff(got, want []float32) float64 {
	worst := 0.0
	for i := range want {
		worst = max(worst, math.Abs(float64(got[i])-float64(want[i])))
	}
	return worst
}

// TestLatentSROracle runs a latent ×4 SR stage (48 latent channels with the
// low-res image concatenated, decoded by the depth-to-space oracle) tiled
// in several U-Net and decoder layouts: the oracle's x0* decodes to the
// input upscaled ×4 by nearest neighbours, which the image must be within
// 1e-4.
func TestLatentSROracle(t *testing.T) {
	e := familyEngine(t, Options{Lanes: 2})
	in := writeGradient(t, 16, 12)
	src, iw, ih, err := LoadImage(in)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]float32, 3*16*iw*ih)
	for ch := 0; ch < 3; ch++ {
		for y := 0; y < 4*ih; y++ {
			for x := 0; x < 4*iw; x++ {
				want[(ch*4*ih+y)*4*iw+x] = src[(ch*ih+y/4)*iw+x/4]
			}
		}
	}
	for _, tl := range []Tiling{{Size: 16, Overlap: 2, Halo: intp(2)}, {Size: 8, Overlap: 2, Halo: intp(2)}} {
		for _, l := range aeLayouts {
			t.Run(fmt.Sprintf("unet%d-decode%d", tl.Size, l.tile), func(t *testing.T) {
				it := Item{Seed: 3, Class: -1, Image: in, Scale: 4, SR: StageParams{Model: "latent-sr-oracle", Steps: 6, Tile: tl}}
				it, plan := planned(t, e, it)
				sp := plan.Stages[0]
				if sp.Space != onnx.SpaceLatent || sp.Decode == nil || sp.Decode.Factor != 4 || sp.Width != 16 || sp.Height != 12 || plan.Resample {
					t.Fatalf("plan %+v", plan)
				}
				plan = withAELayout(t, plan, l)
				if l.tile < 8 && plan.Stages[0].Decode.Tiles < 4 {
					t.Fatalf("decode not tiled: %+v", plan.Stages[0].Decode)
				}
				res, err := e.Generate(context.Background(), it, plan, nil)
				if err != nil {
					t.Fatal(err)
				}
				if res.Width != 64 || res.Height != 48 || res.Channels != 3 {
					t.Fatalf("result %dx%d×%d", res.Width, res.Height, res.Channels)
				}
				if d := worstDiff(res.Image, want); d > 1e-4 {
					t.Errorf("largest error %g against the nearest-neighbour ×4 of the input", d)
				}
			})
		}
	}
}

// TestLatentBaseOracle samples latents at the base model's native size
// and decodes them: x0* = K per latent channel decodes to a 4×4 pattern,
// K[16c + 4dy + dx] at (dy, dx) of channel c, in every decoder layout.
func TestLatentBaseOracle(t *testing.T) {
	e := familyEngine(t, Options{})
	k := func(i int) float32 { return float32(-0.6 + 1.2*float64((7*i)%48)/47) }
	for _, l := range aeLayouts {
		t.Run(fmt.Sprintf("decode%d", l.tile), func(t *testing.T) {
			it := Item{Seed: 5, Class: -1, Width: 32, Height: 24, Base: StageParams{Model: "latent-base-oracle", Steps: 5}}
			plan, err := e.Plan(it)
			if err != nil {
				t.Fatal(err)
			}
			sp := plan.Stages[0]
			if len(plan.Stages) != 1 || sp.Space != onnx.SpaceLatent || sp.Width != 8 || sp.Height != 6 || sp.Decode == nil || plan.Resample {
				t.Fatalf("plan %+v", plan)
			}
			plan = withAELayout(t, plan, l)
			res, err := e.Generate(context.Background(), it, plan, nil)
			if err != nil {
				t.Fatal(err)
			}
			want := make([]float32, 3*32*24)
			for ch := 0; ch < 3; ch++ {
				for y := 0; y < 24; y++ {
					for x := 0; x < 32; x++ {
						want[(ch*24+y)*32+x] = k(16*ch + 4*(y%4) + x%4)
					}
				}
			}
			if d := worstDiff(res.Image, want); d > 1e-4 {
				t.Errorf("largest error %g against the decoded constants", d)
			}
		})
	}
}

// TestImg2ImgOracle upscales an image ×2 as img2img: resized, encoded in
// tiles (latent_parameters' mean, shifted by 0.1 and scaled by 0.5),
// noised to the strength, denoised in fused tiles by an oracle whose x0*
// is x_t/√ᾱ_t, decoded. DDIM then ends on x_start/√ᾱ_start = z0 +
// √((1−ᾱ)/ᾱ)·noise at the strength's first timestep: the image is the
// decoded closed form within 1e-4, for every U-Net, encoder and decoder
// layout, and moves with the strength.
func TestImg2ImgOracle(t *testing.T) {
	e := familyEngine(t, Options{Lanes: 2})
	in := writeGradient(t, 24, 20)
	src, iw, ih, err := LoadImage(in)
	if err != nil {
		t.Fatal(err)
	}
	const W, H = 48, 40 // ×2; latents 12×10
	resized := make([]float32, 3*W*H)
	if err := stages.Resample(resized, src, 3, ih, iw, H, W, stages.Filter(defaultFilter)); err != nil {
		t.Fatal(err)
	}
	r, err := e.runner("img2img-oracle")
	if err != nil {
		t.Fatal(err)
	}
	expect := func(strength float64, seed uint64) []float32 {
		z0 := spaceToDepth(resized, 3, H, W)
		for i := range z0 {
			z0[i] = (z0[i] - 0.1) * 0.5
		}
		sched, err := r.schedule("ddim")
		if err != nil {
			t.Fatal(err)
		}
		s, err := stages.NewSampler("ddim", sched, stages.SamplerOptions{Steps: 10, Strength: strength})
		if err != nil {
			t.Fatal(err)
		}
		noise := make([]float32, len(z0))
		if err := (stages.Noise{Seed: seed, Stream: stages.StageStream(stages.StreamSR, 0)}).Fill(noise, 0, 48, 0, 0, H/4, W/4); err != nil {
			t.Fatal(err)
		}
		xs := make([]float32, len(z0))
		if err := s.AddNoise(xs, z0, noise); err != nil {
			t.Fatal(err)
		}
		one := []float32{0}
		if err := s.AddNoise(one, []float32{1}, []float32{0}); err != nil { // √ᾱ at the start
			t.Fatal(err)
		}
		for i := range xs {
			xs[i] = xs[i]/one[0]/0.5 + 0.1
		}
		img := depthToSpace(xs, 3, H/4, W/4)
		for i, v := range img {
			img[i] = min(max(v, -1), 1)
		}
		return img
	}
	want := expect(0.3, 9)
	if d := worstDiff(want, resized); d < 0.01 {
		t.Fatalf("the closed form is %g from the resized input: the noise term is too small to tell", d)
	}
	for _, tl := range []Tiling{{Size: 12, Overlap: 2}, {Size: 6, Overlap: 2, Halo: intp(0)}} {
		for _, l := range aeLayouts {
			t.Run(fmt.Sprintf("unet%d-ae%d", tl.Size, l.tile), func(t *testing.T) {
				it := Item{Seed: 9, Class: -1, Image: in, Width: W, Height: H, SR: StageParams{Model: "img2img-oracle", Steps: 10, Tile: tl}}
				it, plan := planned(t, e, it)
				sp := plan.Stages[0]
				if sp.Kind != KindImg2Img || sp.Strength != DefaultImg2ImgStrength || sp.Encode == nil || sp.Decode == nil ||
					sp.Encode.Scaling != 0.5 || sp.Encode.Shift != 0.1 || sp.Width != 12 || sp.Height != 10 || plan.Resample {
					t.Fatalf("plan %+v", sp)
				}
				if tl.Size < 12 && sp.Tiles < 4 {
					t.Fatalf("not tiled: %+v", sp)
				}
				plan = withAELayout(t, plan, l)
				res, err := e.Generate(context.Background(), it, plan, nil)
				if err != nil {
					t.Fatal(err)
				}
				if d := worstDiff(res.Image, want); d > 1e-4 {
					t.Errorf("largest error %g against the closed form", d)
				}
			})
		}
	}
	// A tile that does not fit in memory even alone is halved, as in an SR
	// stage, and the image is the same (the encode is made once).
	eh := familyEngine(t, Options{Lanes: 1})
	rh, err := eh.runner("img2img-oracle")
	if err != nil {
		t.Fatal(err)
	}
	var failures atomic.Int64
	rh.inject = func(h, w, rows int) error {
		if h > 8 {
			failures.Add(1)
			return fmt.Errorf("Failed to allocate memory for requested buffer of size %d", rows*h*w*4)
		}
		return nil
	}
	hit := Item{Seed: 9, Class: -1, Image: in, Width: W, Height: H, SR: StageParams{Model: "img2img-oracle", Steps: 10, Tile: Tiling{Size: 12, Overlap: 2}}}
	hres, err := eh.Make(context.Background(), hit, nil)
	if err != nil {
		t.Fatal(err)
	}
	if failures.Load() == 0 || hres.Plan.Stages[0].TileSize > 8 {
		t.Fatalf("%d injected failures, tile %d", failures.Load(), hres.Plan.Stages[0].TileSize)
	}
	if d := worstDiff(hres.Image, want); d > 1e-4 {
		t.Errorf("halved tiles: largest error %g against the closed form", d)
	}
	// Another strength starts from another timestep: another image, its own closed form.
	it := Item{Seed: 9, Class: -1, Image: in, Width: W, Height: H, SR: StageParams{Model: "img2img-oracle", Steps: 10, Strength: 0.6}}
	res, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := worstDiff(res.Image, expect(0.6, 9)); d > 1e-4 {
		t.Errorf("strength 0.6: largest error %g against its closed form", d)
	}
	if d := worstDiff(res.Image, want); d < 1e-3 {
		t.Errorf("strength 0.6 gave strength 0.3's image (%g apart)", d)
	}
}

// TestLatentPlanRefusals: what the latent stages cannot do is refused when
// the item is planned, naming the field.
func TestLatentPlanRefusals(t *testing.T) {
	e := familyEngine(t, Options{})
	in := writeGradient(t, 16, 16)
	up := func(model string, p StageParams) Item {
		p.Model = model
		it := Item{Class: -1, Image: in, Scale: 2, SR: p}
		if err := it.SetInput(); err != nil {
			t.Fatal(err)
		}
		return it
	}
	level := 0.1
	for _, c := range []struct {
		name  string
		it    Item
		class ErrorClass
		says  string
	}{
		{"latent SR without a decoder", up("ldm-sr-oracle", StageParams{}), ClassModel, "without an autoencoder"},
		{"img2img without an encoder", up("latent-base-oracle", StageParams{}), ClassModel, "no vae_encoder"},
		{"img2img with a noise level", up("img2img-oracle", StageParams{NoiseLevel: &level}), ClassInvalid, "sr.noise_level"},
		{"pixel base model as sr.model", up("ddpm-oracle", StageParams{}), ClassModel, "not an SR model"},
	} {
		_, err := e.Plan(c.it)
		if err == nil || Classify(err) != c.class || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%s: %v (class %v), want %v saying %q", c.name, err, Classify(err), c.class, c.says)
		}
	}
	// A latent base stage followed by a pixel SR stage: the SR stage gets
	// the decoded pixels.
	it := Item{Class: -1, Width: 128, Height: 128, Base: StageParams{Model: "latent-base-oracle"}, SR: StageParams{Model: "if2-oracle"}}
	it.Context = contextFile(t, "pos", [4]float64{0.1, 0, 0, 0}, 1)
	plan, err := e.Plan(it)
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Stages) != 2 || plan.Stages[0].Decode == nil || plan.Stages[0].Width != 8 || plan.Stages[1].Width != 128 || plan.Stages[1].Space != "" {
		t.Fatalf("latent base then pixel SR: %+v", plan.Stages)
	}
	res, err := e.Generate(context.Background(), it, plan, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Width != 128 || res.Channels != 3 {
		t.Fatalf("result %dx%d×%d", res.Width, res.Height, res.Channels)
	}
}

// The plan counts the autoencoder's tile Runs, which the item's timeout
// adds to its tile evaluations: a Run a tile, and for a synchronised
// decode one more a tile per GroupNorm layer.
func TestPlanCountsAutoencoderRuns(t *testing.T) {
	e := familyEngine(t, Options{})
	in := writeGradient(t, 96, 96)
	it := Item{Class: -1, Image: in, Scale: 4, SR: StageParams{Model: "x4-like"}}
	it.Context = contextFile(t, "pos", [4]float64{}, 1)
	_, p := planned(t, e, it)
	man, _ := e.resolver.Manifest("x4-like")
	d := p.Stages[0].Decode
	if man.DecodeSyncLayers < 2 || d.Statistics != StatisticsImage || d.Tiles < 4 || d.Runs != d.Tiles*(1+man.DecodeSyncLayers) || p.AutoencoderRuns() != d.Runs {
		t.Fatalf("synchronised decode of %d layers: %+v, %d runs in all", man.DecodeSyncLayers, d, p.AutoencoderRuns())
	}
	it = Item{Class: -1, Image: in, Width: 384, Height: 384, SR: StageParams{Model: "img2img-oracle"}}
	_, p = planned(t, e, it)
	sp := p.Stages[0]
	if sp.Encode.Runs != sp.Encode.Tiles || sp.Decode.Runs != sp.Decode.Tiles || p.AutoencoderRuns() != sp.Encode.Tiles+sp.Decode.Tiles || sp.Encode.Tiles < 4 {
		t.Fatalf("img2img: encode %+v decode %+v, %d runs", sp.Encode, sp.Decode, p.AutoencoderRuns())
	}
}

// TestEncodeTilingDrift measures the tiled encode of the KL-like encoder
// (GroupNorm, mid-block attention within the tile) against the
// whole-image encode of a 128² gradient: the relative RMS error of the
// latents, by tile size, for the naive encode (each tile's own
// statistics) and the synchronised one (the whole image's, through the
// cut-open vae_encoder/model_sync.onnx). The oracle encoder's tiled encode
// is exact (TestImg2ImgOracle). Both drifts shrink as the tiles grow, and
// the synchronised one is the smaller at every tile size.
func TestEncodeTilingDrift(t *testing.T) {
	e := newEngine(t, Options{})
	in := writeGradient(t, 128, 128)
	img, _, _, err := LoadImage(in)
	if err != nil {
		t.Fatal(err)
	}
	const h, w = 32, 32
	enc := func(tile, overlap, halo int, stats string) []float32 {
		dp := &DecodePlan{Autoencoder: autoencoders("kl-like"), Factor: 4, Scaling: 0.08333, TileSize: tile, Overlap: overlap, Halo: halo, Statistics: stats}
		z, err := e.encode(context.Background(), dp, img, h, w)
		if err != nil {
			t.Fatal(err)
		}
		return z
	}
	whole := enc(32, 8, 8, StatisticsTile) // one tile, the image exactly: no padding
	if d := worstDiff(enc(32, 8, 8, StatisticsImage), whole); d > 1e-4 {
		t.Fatalf("one tile: the synchronised encode is %g from the plain one", d)
	}
	rel := func(z []float32) float64 {
		var se, ss float64
		for i := range z {
			d := float64(z[i] - whole[i])
			se, ss = se+d*d, ss+float64(whole[i])*float64(whole[i])
		}
		return math.Sqrt(se / ss)
	}
	var naive, synced []float64
	for _, l := range []aeLayout{{8, 2, 2}, {16, 4, 4}, {24, 4, 6}} {
		n, s := rel(enc(l.tile, l.overlap, l.halo, StatisticsTile)), rel(enc(l.tile, l.overlap, l.halo, StatisticsImage))
		t.Logf("encode in tiles of %d latents (overlap %d, halo %d): relative RMS error naive %.4f, synchronised %.4f", l.tile, l.overlap, l.halo, n, s)
		naive, synced = append(naive, n), append(synced, s)
	}
	for i := range naive {
		if !(synced[i] < naive[i]) || naive[i] >= 1 || (i > 0 && !(naive[i] < naive[i-1] && synced[i] < synced[i-1])) {
			t.Errorf("relative errors naive %v, synchronised %v: want drifts below 1 that shrink with the tile, the synchronised smaller", naive, synced)
			break
		}
	}
}

// A base stage refuses the SR stage's keys, naming them, rather than
// ignoring them.
func TestBaseStageRefusesSRKeys(t *testing.T) {
	e := familyEngine(t, Options{})
	level := 0.2
	for field, p := range map[string]StageParams{
		"base.strength":    {Strength: 0.5},
		"base.noise_level": {NoiseLevel: &level},
		"base.filter":      {Filter: "lanczos"},
		"base.tile":        {Tile: Tiling{Size: 16}},
	} {
		p.Model = "ddpm-oracle"
		_, err := e.Plan(Item{Class: -1, Width: 32, Height: 32, Base: p})
		if Classify(err) != ClassInvalid || err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: %v", field, err)
		}
	}
	if _, err := e.Plan(Item{Class: -1, Width: 32, Height: 32, Base: StageParams{Model: "ddpm-oracle", Steps: 3, Guidance: 1}}); err != nil {
		t.Errorf("a plain base stage: %v", err)
	}
}
