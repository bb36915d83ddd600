package pipeline

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	f16 "github.com/x448/float16"

	"tessera/models"
	"tessera/onnx"
	"tessera/stages"
	"tessera/stages/tokenizer"
)

// The model-family fixtures (testdata/families, made by
// tools/make_family_fixtures.py) are folders as diffusers and Optimum write
// them, with no tessera.yaml.
func familyEngine(t testing.TB, opts Options) *Engine {
	t.Helper()
	e := New(testEnv, models.Resolver{Dirs: []string{filepath.Join("..", "testdata", "families")}}, opts, nil)
	t.Cleanup(func() { e.Close() })
	return e
}

// latentPlan is the item's plan where a latent oracle without a decoder
// (x4-oracle, ldm-sr-oracle) is planned as if it had a ×1 one, and the
// decode then left out, so that Generate returns the latents the closed
// form is about. MakePlan itself refuses a latent model without a decoder.
func latentPlan(e *Engine, it Item) (Plan, error) {
	describe := e.resolver.Manifests()
	p, err := MakePlan(it, func(ref string) (*onnx.Manifest, error) {
		m, err := describe(ref)
		if err != nil || m.Space != onnx.SpaceLatent || m.DecodeFactor > 0 {
			return m, err
		}
		c := *m
		c.DecodeFactor, c.LatentScaling = 1, 1
		return &c, nil
	})
	for i := range p.Stages {
		if p.Stages[i].Decode != nil && p.Stages[i].Decode.Autoencoder == "" {
			p.Stages[i].Decode = nil
		}
	}
	return p, err
}

// flatPNG writes a w×h PNG of one colour, given in [-1, 1] per channel.
func flatPNG(t testing.TB, w, h int, rgb [3]float64) string {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	to8 := func(v float64) uint8 { return uint8(math.Round((v + 1) / 2 * 255)) }
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.NRGBA{to8(rgb[0]), to8(rgb[1]), to8(rgb[2]), 255})
		}
	}
	path := filepath.Join(t.TempDir(), "flat.png")
	f, _ := os.Create(path)
	png.Encode(f, img)
	f.Close()
	return path
}

// quantised is the value an 8-bit PNG stores for v in [-1, 1], read back.
func quantised(v float64) float64 { return math.Round((v+1)/2*255)*2/255 - 1 }

// writeNPY writes an L×D float32 .npy file.
func writeNPY(t testing.TB, path string, L, D int, data []float32) {
	t.Helper()
	header := fmt.Sprintf("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }", L, D)
	for (10+len(header)+1)%64 != 0 {
		header += " "
	}
	header += "\n"
	var b bytes.Buffer
	b.WriteString("\x93NUMPY\x01\x00")
	binary.Write(&b, binary.LittleEndian, uint16(len(header)))
	b.WriteString(header)
	binary.Write(&b, binary.LittleEndian, data)
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeSafetensors writes a [1, L, D] float16 tensor named name.
func writeSafetensors(t testing.TB, path, name string, L, D int, data []float32) {
	t.Helper()
	raw := make([]byte, 2*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint16(raw[2*i:], f16.Fromfloat32(v).Bits())
	}
	hdr, _ := json.Marshal(map[string]any{name: map[string]any{"dtype": "F16", "shape": []int{1, L, D}, "data_offsets": []int{0, len(raw)}}})
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(hdr)))
	b.Write(hdr)
	b.Write(raw)
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// contextFile writes a [7, 32] context whose first four features have the
// token means given (the rest random), and returns its reference.
func contextFile(t testing.TB, name string, means [4]float64, seed uint64) *ContextRef {
	t.Helper()
	const L, D = 7, 32
	data := make([]float32, L*D)
	var noise [L * D]float32
	(stages.Noise{Seed: seed}).Fill(noise[:], 0, 1, 0, 0, L, D)
	for l := 0; l < L; l++ {
		for d := 0; d < D; d++ {
			v := 0.05 * noise[l*D+d]
			if d < 4 {
				// tokens alternate around the mean, so the mean is exact
				v = float32(means[d]) + float32(0.01*float64(1-2*(l%2)))
				if l == L-1 {
					v = float32(means[d]) // 7 tokens: three pairs cancel, the last is the mean
				}
			}
			data[l*D+d] = v
		}
	}
	path := filepath.Join(t.TempDir(), name+".npy")
	writeNPY(t, path, L, D, data)
	c, sum, err := ReadContext(path)
	if err != nil {
		t.Fatal(err)
	}
	return &ContextRef{Path: path, SHA256: sum, Tokens: c.L, Dim: c.D}
}

func TestReadContextFormats(t *testing.T) {
	dir := t.TempDir()
	data := []float32{1, -2, 0.5, 3, 0.25, -1}
	writeNPY(t, filepath.Join(dir, "a.npy"), 2, 3, data)
	writeSafetensors(t, filepath.Join(dir, "b.safetensors"), "prompt_embeds", 2, 3, data)
	for _, f := range []string{"a.npy", "b.safetensors"} {
		c, sum, err := ReadContext(filepath.Join(dir, f))
		if err != nil || c.L != 2 || c.D != 3 || len(sum) != 64 {
			t.Fatalf("%s: %+v %v", f, c, err)
		}
		for i, v := range data {
			if c.Data[i] != v {
				t.Errorf("%s: value %d = %g, want %g", f, i, c.Data[i], v)
			}
		}
	}
	// Wrong rank, a NaN, an unknown format: refused, naming the file.
	writeNPY(t, filepath.Join(dir, "nan.npy"), 1, 2, []float32{1, float32(math.NaN())})
	os.WriteFile(filepath.Join(dir, "x.pt"), []byte("x"), 0o644)
	// A link to /dev/zero (whose size says 0) and a header claiming far
	// more data than the file holds are refused before anything is read.
	os.Symlink("/dev/zero", filepath.Join(dir, "zero.npy"))
	hdr := "{'descr': '<f4', 'fortran_order': False, 'shape': (4096, 16384), }"
	for (10+len(hdr)+1)%64 != 0 {
		hdr += " "
	}
	os.WriteFile(filepath.Join(dir, "big.npy"), []byte("\x93NUMPY\x01\x00"+string([]byte{byte(len(hdr) + 1), 0})+hdr+"\n"), 0o644)
	for _, f := range []string{"nan.npy", "x.pt", "missing.npy", "zero.npy", "big.npy"} {
		if _, _, err := ReadContext(filepath.Join(dir, f)); err == nil || Classify(err) != ClassInvalid || !strings.Contains(err.Error(), f) {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// The DDPM pixel base (UNet2DModel): its config says kind, native size and
// schedule; an int64 [B] timestep and a float scalar one make the same
// image, and the oracle lands on its data point exactly.
func TestFamilyDDPM(t *testing.T) {
	e := familyEngine(t, Options{})
	it := Item{Seed: 4, Width: 32, Height: 32, Class: -1, Base: StageParams{Model: "ddpm-oracle", Steps: 10}}
	res, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []float64{0.25, -0.5, 0.75}
	for i, v := range res.Image {
		if d := math.Abs(float64(v) - want[i/(32*32)]); d > 1e-4 {
			t.Fatalf("pixel %d: %g, want %g", i, v, want[i/(32*32)])
		}
	}
	it.Base.Model = "ddpm-like"
	a, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	it.Base.Model = "ddpm-like-scalar"
	b, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxAbsDiff(a.Image, b.Image); d > 1e-6 {
		t.Errorf("int64 and scalar timesteps differ by %g", d)
	}
}

// augmented is the low-res conditioning the pipeline feeds a stage: the
// input resampled to the stage, noised at the model's level on its noising
// schedule with the item's own augmentation noise.
func augmented(t testing.TB, e *Engine, it Item, plan Plan, si int, img []float32, iw, ih int) []float32 {
	t.Helper()
	sp := plan.Stages[si]
	r, err := e.runner(sp.Model)
	if err != nil {
		t.Fatal(err)
	}
	L, H, W := r.lowresCh, sp.Height, sp.Width
	up := make([]float32, L*H*W)
	if err := stages.Resample(up, img, L, ih, iw, H, W, stages.Filter(sp.Filter)); err != nil {
		t.Fatal(err)
	}
	noise := make([]float32, L*H*W)
	(stages.Noise{Seed: it.Seed, Stream: stages.StageStream(stages.StreamAug, si)}).Fill(noise, 0, L, 0, 0, H, W)
	// ᾱ from the config files themselves, not from the runner: the
	// pipeline's noising scheduler where it has one, else the model's own.
	man := r.model.Manifest
	cfgPath := man.SchedulerConfig
	if man.NoiseScheduler != "" {
		cfgPath = man.NoiseScheduler
	}
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := stages.ParseSchedulerConfigAs(data, stages.ClassDDPM)
	if err != nil {
		t.Fatal(err)
	}
	schedule, err := sc.Schedule()
	if err != nil {
		t.Fatal(err)
	}
	abar := schedule.AlphasCumprod
	level := sp.NoiseLevel
	if man.NoiseLevelMax > 0 {
		level = sp.NoiseLevelModel / float64(len(abar)-1)
	}
	out := make([]float32, len(up))
	if err := stages.NoiseAugment(out, up, noise, abar, level); err != nil {
		t.Fatal(err)
	}
	return out
}

// familyCase is one run of an SR family oracle and the image its closed
// form says it lands on.
type familyCase struct {
	model    string
	scale    int     // output / input
	channels int     // C
	level    float64 // the job's noise_level
	guidance float64
	pos, neg [4]float64 // context token means (neg: the negative context's; zeros when none)
	hasNeg   bool
	tiles    []Tiling
}

// TestFamilyOracles runs the SR family oracles through the pipeline, tiled
// in several layouts and with classifier-free guidance, and checks each
// against its closed form: x0* = [low-res | 0] + gain·level/1000 + the
// context's token means, guided as eps_u + g(eps_c − eps_u). The
// low-res half, the noise level (an integer in the model's units), the
// context and its negative, and the timestep all enter, so a wrong feed
// of any of them moves the image.
func TestFamilyOracles(t *testing.T) {
	gain := []float64{0.1, -0.2, 0.3, 0.05}
	rgb := [3]float64{0.2, -0.3, 0.1}
	small, large := flatPNG(t, 16, 16, rgb), flatPNG(t, 64, 64, rgb) // pixel SR ×4, latent SR ×1: 64² canvases
	q := [3]float64{quantised(rgb[0]), quantised(rgb[1]), quantised(rgb[2])}
	tilings := []Tiling{{Size: 64}, {Size: 32, Overlap: 8, Halo: intp(4)}, {Size: 24, Overlap: 4, Halo: intp(2)}}
	cases := []familyCase{
		{model: "ldm-sr-oracle", scale: 1, channels: 3, tiles: tilings[:2]},
		{model: "x4-oracle", scale: 1, channels: 4, level: 0.4, guidance: 1, pos: [4]float64{0.05, 0.1, -0.05, 0.2}, tiles: tilings[:2]},
		{model: "x4-oracle", scale: 1, channels: 4, level: 0.1, guidance: 3, pos: [4]float64{0.05, 0.1, -0.05, 0.2}, neg: [4]float64{0.02, -0.04, 0, 0.1}, hasNeg: true, tiles: tilings[1:2]},
		{model: "if2-oracle", scale: 4, channels: 3, level: 0.25, guidance: 1, pos: [4]float64{-0.1, 0.05, 0.15, 0}, tiles: tilings},
		{model: "if2-oracle", scale: 4, channels: 3, level: 0.25, guidance: 2.5, pos: [4]float64{-0.1, 0.05, 0.15, 0}, tiles: tilings[1:2]},
		{model: "if2-oracle", scale: 4, channels: 3, level: 0.25, guidance: 2, pos: [4]float64{0.1, 0.05, 0.15, 0}, neg: [4]float64{0.05, 0.1, 0.1, 0}, hasNeg: true, tiles: tilings[1:]},
	}
	e := familyEngine(t, Options{Lanes: 2})
	for ci, c := range cases {
		in := small
		if c.scale == 1 {
			in = large
		}
		src, iw, ih, err := LoadImage(in)
		if err != nil {
			t.Fatal(err)
		}
		for _, tl := range c.tiles {
			name := fmt.Sprintf("%d-%s-tile%d-g%g", ci, c.model, tl.Size, c.guidance)
			t.Run(name, func(t *testing.T) {
				nl := c.level
				it := Item{Seed: 7, Class: -1, Image: in, Scale: float64(c.scale), SR: StageParams{Model: c.model, Steps: 8, Strength: 1, NoiseLevel: &nl, Guidance: c.guidance, Tile: tl}}
				if c.pos != [4]float64{} || c.hasNeg {
					it.Context = contextFile(t, "pos", c.pos, 1)
				}
				if c.hasNeg {
					it.NegativeContext = contextFile(t, "neg", c.neg, 2)
				}
				if err := it.SetInput(); err != nil {
					t.Fatal(err)
				}
				plan, err := latentPlan(e, it)
				if err != nil {
					t.Fatal(err)
				}
				res, err := e.Generate(context.Background(), it, plan, nil)
				if err != nil {
					t.Fatal(err)
				}
				sp := res.Plan.Stages[0]
				if tl.Size < 64 && sp.Tiles < 4 {
					t.Fatalf("plan %+v: not tiled", sp)
				}
				cond := augmented(t, e, it, plan, 0, src, iw, ih)
				H, W := sp.Height, sp.Width
				man, _ := e.resolver.Manifest(c.model)
				level := 0.0
				if man.NoiseLevelMax > 0 {
					level = sp.NoiseLevelModel / 1000
				}
				g := c.guidance
				if g == 0 {
					g = 1
				}
				worst := 0.0
				for ch := 0; ch < c.channels; ch++ {
					ctx := c.neg[ch] + g*(c.pos[ch]-c.neg[ch])
					for i := 0; i < H*W; i++ {
						low := 0.0
						if ch < 3 {
							low = float64(cond[ch*H*W+i])
						}
						// A pixel stage ends clamped to [-1, 1] (IF's thresholding,
						// sample_max_value 1, is that clamp too); latents are not.
						want := low + gain[ch]*level + ctx
						if man.Space != onnx.SpaceLatent {
							want = min(max(want, -1), 1)
						}
						worst = max(worst, math.Abs(float64(res.Image[ch*H*W+i])-want))
					}
				}
				if worst > 1e-4 {
					t.Errorf("largest error %g against the closed form (level %g, q %v)", worst, sp.NoiseLevelModel, q)
				}
			})
		}
	}
}

// A deliberately mis-fed input moves the image away from the closed form:
// with the noise level fed as 0 (a trace hook rewrites it), the if2 oracle
// misses by the level's term, so the oracle test above can fail.
func TestFamilyOracleCatchesMisfeed(t *testing.T) {
	e := familyEngine(t, Options{Lanes: 1})
	in := flatPNG(t, 16, 16, [3]float64{0, 0, 0})
	nl := 0.5
	it := Item{Seed: 7, Class: -1, Image: in, Scale: 4, SR: StageParams{Model: "if2-oracle", Steps: 4, Strength: 1, NoiseLevel: &nl, Tile: Tiling{Size: 64}}}
	it.Context = contextFile(t, "pos", [4]float64{}, 1)
	ref, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	r, err := e.runner("if2-oracle")
	if err != nil {
		t.Fatal(err)
	}
	r.trace = func(q *request) { q.noiseLevel = 0 }
	defer func() { r.trace = nil }()
	bad, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The level term of channel 2 is 0.3 × 500/1000.
	if d := maxAbsDiff(ref.Image, bad.Image); d < 0.1 {
		t.Fatalf("a mis-fed noise level moved the image by %g only", d)
	}
}

// The random-weight families give the same image tiled and untiled (their
// receptive field is 2 and the halo covers it), IF II's dynamic
// thresholding included, which is taken over the whole canvas.
func TestFamilyTiledEqualsUntiled(t *testing.T) {
	e := familyEngine(t, Options{Lanes: 2})
	small, large := writeGradient(t, 24, 24), writeGradient(t, 96, 96) // 96² canvases
	for _, c := range []struct {
		model string
		scale float64
		ctx   bool
	}{{"if2-like", 4, true}, {"ldm-sr-like", 1, false}, {"x4-like", 1, true}} {
		t.Run(c.model, func(t *testing.T) {
			in := small
			if c.scale == 1 {
				in = large
			}
			item := func(tl Tiling) Item {
				it := Item{Seed: 3, Class: -1, Image: in, Scale: c.scale, SR: StageParams{Model: c.model, Steps: 4, Strength: 1, Guidance: 1.5, Tile: tl}}
				if c.ctx {
					it.Context = contextFile(t, "pos", [4]float64{0.1, 0.2, 0.3, 0.4}, 5)
				}
				return it
			}
			untiled, err := e.Make(context.Background(), item(Tiling{Size: 96}), nil)
			if err != nil {
				t.Fatal(err)
			}
			tiled, err := e.Make(context.Background(), item(Tiling{Size: 32, Overlap: 8, Halo: intp(4)}), nil)
			if err != nil {
				t.Fatal(err)
			}
			if tiled.Plan.Stages[0].Tiles < 4 || untiled.Plan.Stages[0].Tiles != 1 {
				t.Fatalf("plans %+v / %+v", tiled.Plan.Stages[0], untiled.Plan.Stages[0])
			}
			if p := PSNR(tiled.Image, untiled.Image); p < 40 {
				t.Errorf("tiled vs untiled %.1f dB", p)
			}
		})
	}
}

// What the derivation reads from the folders, with no tessera.yaml.
func TestFamilyManifests(t *testing.T) {
	r := models.Resolver{Dirs: []string{filepath.Join("..", "testdata", "families")}}
	for _, c := range []struct {
		model, kind, space    string
		c, l, scale, noiseMax int
		variance, pred, ctxIn string
		contextDim, native    int
		schedulerFolderOrFile string
	}{
		{"ddpm-like", "base", "pixel", 3, 3, 0, 0, "fixed_large", "epsilon", "", 0, 32, "scheduler_config.json"},
		{"ldm-sr-like", "sr", "latent", 3, 3, 1, 0, "", "epsilon", "", 0, 64, "scheduler"},
		{"x4-like", "sr", "latent", 4, 3, 1, 350, "", "v_prediction", "encoder_hidden_states", 32, 128, "scheduler"},
		{"if2-like", "sr", "pixel", 3, 3, 4, 999, "learned_range", "epsilon", "encoder_hidden_states", 32, 256, "scheduler"},
	} {
		m, err := r.Manifest(c.model)
		if err != nil {
			t.Fatalf("%s: %v", c.model, err)
		}
		if m.Kind != c.kind || m.Space != c.space || m.Channels != c.c || m.Lowres() != c.l || m.Scale != c.scale ||
			m.NoiseLevelMax != c.noiseMax || m.VarianceType != c.variance || m.Prediction != c.pred ||
			m.Inputs[onnx.RoleContext] != c.ctxIn || m.ContextDim != c.contextDim || m.NativeSize[0] != c.native ||
			!strings.Contains(m.SchedulerConfig, c.schedulerFolderOrFile) {
			t.Errorf("%s: %+v", c.model, m)
		}
		if len(m.Facts) < 4 {
			t.Errorf("%s: facts %v", c.model, m.Facts)
		}
	}
}

// With a threshold that bites (sample_max_value 3, ratio 0.9, so s moves
// with the image), the level is the whole canvas's: tiled equals untiled.
// A per-tile quantile would give every tile its own s.
func TestFamilyThresholdingIsWholeCanvas(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join("..", "testdata", "families", "if2-like")
	for _, sub := range []string{"unet", "scheduler", "image_noising_scheduler", ""} {
		os.MkdirAll(filepath.Join(dir, "if2-bite", sub), 0o755)
		entries, _ := os.ReadDir(filepath.Join(src, sub))
		for _, en := range entries {
			if en.IsDir() {
				continue
			}
			data, _ := os.ReadFile(filepath.Join(src, sub, en.Name()))
			if en.Name() == "scheduler_config.json" && sub == "scheduler" {
				data = bytes.Replace(data, []byte(`"sample_max_value": 1.0`), []byte(`"sample_max_value": 3.0`), 1)
				data = bytes.Replace(data, []byte(`"dynamic_thresholding_ratio": 0.95`), []byte(`"dynamic_thresholding_ratio": 0.9`), 1)
			}
			os.WriteFile(filepath.Join(dir, "if2-bite", sub, en.Name()), data, 0o644)
		}
	}
	e := New(testEnv, models.Resolver{Dirs: []string{dir}}, Options{Lanes: 2}, nil)
	defer e.Close()
	in := writeGradient(t, 24, 24)
	ctx := contextFile(t, "pos", [4]float64{0.5, -0.5, 0.5, 0}, 5)
	item := func(tl Tiling) Item {
		return Item{Seed: 3, Class: -1, Image: in, Scale: 4, Context: ctx, SR: StageParams{Model: "if2-bite", Steps: 6, Strength: 1, Guidance: 3, Tile: tl}}
	}
	r, err := e.runner("if2-bite")
	if err != nil {
		t.Fatal(err)
	}
	s, _ := r.schedule("ddim")
	if s.Thresholding == nil || s.Thresholding.MaxValue != 3 {
		t.Fatalf("schedule %+v", s)
	}
	untiled, err := e.Make(context.Background(), item(Tiling{Size: 96}), nil)
	if err != nil {
		t.Fatal(err)
	}
	tiled, err := e.Make(context.Background(), item(Tiling{Size: 32, Overlap: 8, Halo: intp(4)}), nil)
	if err != nil {
		t.Fatal(err)
	}
	if p := PSNR(tiled.Image, untiled.Image); p < 40 {
		t.Errorf("tiled vs untiled %.1f dB with thresholding", p)
	}
	// The threshold bites: the same weights with IF's own config (s = 1
	// always) make another image.
	ifOwn := familyEngine(t, Options{Lanes: 2})
	it := item(Tiling{Size: 96})
	it.SR.Model = "if2-like"
	own, err := ifOwn.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxAbsDiff(own.Image, untiled.Image); d < 1e-3 {
		t.Errorf("thresholding at sample_max_value 3 changed the image by %g only", d)
	}
}

// promptTerm is the if2-text oracle's context term of a prompt: the mean
// over its 77 input ids of the text encoder oracle's
// 0.2·((id·(ch+1)) mod 97)/97 − 0.1, per channel.
func promptTerm(t *testing.T, prompt string) [4]float64 {
	t.Helper()
	tok, err := tokenizer.LoadCLIPDir(filepath.Join("..", "testdata", "families", "if2-text", "tokenizer"))
	if err != nil {
		t.Fatal(err)
	}
	var out [4]float64
	ids := tok.Encode(prompt).IDs
	for ch := range out {
		for _, id := range ids {
			out[ch] += (0.2*float64((id*int64(ch+1))%97)/97 - 0.1) / float64(len(ids))
		}
	}
	return out
}

// A prompt runs through the pipeline's own tokenizer and text encoder: the
// image is the closed form of the prompt's token ids, changing one word
// changes it as the closed form says, guidance with a negative prompt lands
// where the formula puts it, and the encoder runs once for every distinct
// prompt however many items share it.
func TestFamilyPrompt(t *testing.T) {
	e := familyEngine(t, Options{Lanes: 2})
	in := flatPNG(t, 16, 16, [3]float64{0, 0, 0})
	nl := 0.0 // the level term is zero: the context term alone moves the image
	run := func(prompt, neg string, g float64, seed uint64) []float32 {
		it := Item{Seed: seed, Class: -1, Image: in, Scale: 4, Prompt: prompt, NegativePrompt: neg,
			SR: StageParams{Model: "if2-text", Steps: 3, Strength: 1, NoiseLevel: &nl, Guidance: g, Tile: Tiling{Size: 32, Overlap: 8, Halo: intp(2)}}}
		res, err := e.Make(context.Background(), it, nil)
		if err != nil {
			t.Fatal(err)
		}
		return res.Image
	}
	check := func(name string, img []float32, want [4]float64) {
		t.Helper()
		n := len(img) / 3
		for ch := 0; ch < 3; ch++ {
			for i := 0; i < n; i++ {
				// the flat input, black as an 8-bit PNG stores it, plus the context term
				if d := math.Abs(float64(img[ch*n+i]) - quantised(0) - want[ch]); d > 1e-4 {
					t.Fatalf("%s: channel %d pixel %d: %g, want %g", name, ch, i, img[ch*n+i], want[ch])
				}
			}
		}
	}
	red, blue := run("a red fox in the snow", "", 1, 1), run("a blue fox in the snow", "", 1, 1)
	check("red", red, promptTerm(t, "a red fox in the snow"))
	check("blue", blue, promptTerm(t, "a blue fox in the snow"))
	if maxAbsDiff(red, blue) < 1e-3 {
		t.Error("changing one word did not change the image")
	}
	pos, neg := promptTerm(t, "a red fox in the snow"), promptTerm(t, "blurry")
	var want [4]float64
	for ch := range want {
		want[ch] = neg[ch] + 2.5*(pos[ch]-neg[ch])
	}
	check("guided", run("a red fox in the snow", "blurry", 2.5, 1), want)
	// Fifty items of one prompt: the encoder has run once per distinct prompt.
	runsBefore := textRuns(e)
	for i := 0; i < 50; i++ {
		run("fifty of the same", "", 1, uint64(i))
	}
	if got := textRuns(e) - runsBefore; got != 1 {
		t.Errorf("the text encoder ran %d times for 50 items of one prompt", got)
	}
}

func textRuns(e *Engine) int64 {
	for _, m := range e.ModelStats() {
		if strings.Contains(m.Model, "text_encoder") {
			return m.Runs
		}
	}
	return 0
}

// The on-disk cache keeps each embedding by the encoder's hash and the
// token ids: a second process (a second engine) makes the same image
// without running the encoder, and a cache file that is not one is a miss.
func TestTextEncoderDiskCache(t *testing.T) {
	dir := t.TempDir()
	in := flatPNG(t, 16, 16, [3]float64{0, 0, 0})
	it := Item{Seed: 1, Class: -1, Image: in, Scale: 4, Prompt: "a fox in a cache",
		SR: StageParams{Model: "if2-text", Steps: 2, Strength: 1, Tile: Tiling{Size: 64}}}
	mk := func() (*Engine, []float32) {
		e := New(testEnv, models.Resolver{Dirs: []string{filepath.Join("..", "testdata", "families")}}, Options{Lanes: 1, TextCache: dir}, nil)
		t.Cleanup(func() { e.Close() })
		res, err := e.Make(context.Background(), it, nil)
		if err != nil {
			t.Fatal(err)
		}
		return e, res.Image
	}
	e1, a := mk()
	files, _ := filepath.Glob(filepath.Join(dir, "*.emb"))
	if textRuns(e1) != 2 || len(files) != 2 { // the prompt and the empty one
		t.Fatalf("first engine: %d runs, %d cache files", textRuns(e1), len(files))
	}
	e2, b := mk()
	if textRuns(e2) != 0 || maxAbsDiff(a, b) != 0 {
		t.Fatalf("second engine: %d runs, images differ by %g", textRuns(e2), maxAbsDiff(a, b))
	}
	for _, f := range files {
		os.WriteFile(f, []byte("TEMBgarbage"), 0o644)
	}
	e3, c := mk()
	if textRuns(e3) != 2 || maxAbsDiff(a, c) != 0 {
		t.Fatalf("after corrupt files: %d runs, images differ by %g", textRuns(e3), maxAbsDiff(a, c))
	}
}

// The T5-like text side: SentencePiece's tokenizer/ and an encoder that
// takes an attention mask (padding embeds to zero). The image is the closed
// form of the prompt's ids under the mask.
func TestFamilyPromptT5(t *testing.T) {
	e := familyEngine(t, Options{Lanes: 1})
	in := flatPNG(t, 16, 16, [3]float64{0, 0, 0})
	nl := 0.0
	prompt := "a red fox in the snow"
	it := Item{Seed: 1, Class: -1, Image: in, Scale: 4, Prompt: prompt,
		SR: StageParams{Model: "if2-t5", Steps: 2, Strength: 1, NoiseLevel: &nl, Tile: Tiling{Size: 64}}}
	res, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.LoadDir(filepath.Join("..", "testdata", "families", "if2-t5", "tokenizer"))
	if err != nil {
		t.Fatal(err)
	}
	enc := tok.Encode(prompt)
	n := len(res.Image) / 3
	for ch := 0; ch < 3; ch++ {
		want := 0.0
		for i, id := range enc.IDs {
			want += float64(enc.Mask[i]) * (0.2*float64((id*int64(ch+1))%97)/97 - 0.1) / float64(len(enc.IDs))
		}
		if d := math.Abs(float64(res.Image[ch*n]) - quantised(0) - want); d > 1e-4 {
			t.Errorf("channel %d: %g, want %g", ch, res.Image[ch*n], quantised(0)+want)
		}
	}
	if enc.IDs[len(enc.Tokens)] != 1 || enc.Mask[len(enc.Tokens)] != 1 || enc.Mask[len(enc.Tokens)+1] != 0 {
		t.Errorf("T5 sequence: %v / %v", enc.IDs[:len(enc.Tokens)+2], enc.Mask[:len(enc.Tokens)+2])
	}
}
