package stages

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

func sd15Schedule(t *testing.T, pt PredictionType, sp Spacing) *Schedule {
	t.Helper()
	betas, err := Betas(BetaScaledLinear, 1000, 0.00085, 0.012)
	if err != nil {
		t.Fatal(err)
	}
	return &Schedule{
		AlphasCumprod:   AlphasCumprod(betas),
		TimestepSpacing: sp,
		StepsOffset:     1,
		Prediction:      pt,
		SetAlphaToOne:   true,
		LowerOrderFinal: true,
		ClipSampleRange: 1,
	}
}

// exactModel is the ideal denoiser of a point mass at target, in the
// parametrisation pt: the model input is α·x* + σ·ε, so ε = (in − α·x*)/σ,
// v = α·ε − σ·x* and the sample prediction is x* itself.
func exactModel(pt PredictionType, lv Level, in []float32, target []float64) []float32 {
	out := make([]float32, len(in))
	for i := range in {
		eps := (float64(in[i]) - lv.Alpha*target[i]) / lv.Sigma
		switch pt {
		case PredEpsilon:
			out[i] = float32(eps)
		case PredV:
			out[i] = float32(lv.Alpha*eps - lv.Sigma*target[i])
		case PredSample:
			out[i] = float32(target[i])
		}
	}
	return out
}

// runSampler drives a sampler the way the pipeline does (model input, model,
// PredToX0, Step), without tiles.
func runSampler(t *testing.T, s Sampler, x []float32, target []float64) {
	t.Helper()
	in := make([]float32, len(x))
	x0 := make([]float32, len(x))
	for i := 0; i < s.Len(); i++ {
		ScaleInput(in, x, s.InputScale(i))
		pred := exactModel(s.Prediction(), s.Level(i), in, target)
		if err := PredToX0(s.Prediction(), s.Level(i), in, pred, x0); err != nil {
			t.Fatal(err)
		}
		if err := s.Step(i, x, x0); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSamplersLandOnPointMass(t *testing.T) {
	const n = 257
	rng := rand.New(rand.NewPCG(1, 2))
	target := make([]float64, n)
	for i := range target {
		target[i] = rng.Float64()*1.8 - 0.9
	}
	noise := make([]float32, n)
	if err := (Noise{Seed: 3, Stream: StreamBase}).Fill(noise, 0, 1, 0, 0, 1, n); err != nil {
		t.Fatal(err)
	}
	etaNoise := Noise{Seed: 3, Stream: StreamEta}.CanvasFiller(1, 1, n)
	for _, pt := range []PredictionType{PredEpsilon, PredV, PredSample} {
		for _, sp := range []Spacing{SpacingLeading, SpacingLinspace, SpacingTrailing} {
			for _, kind := range []string{"ddim", "ddim-eta", "euler", "dpm++2m"} {
				for _, strength := range []float64{1, 0.6} {
					name := fmt.Sprintf("%s/%s/%s/strength=%g", pt, sp, kind, strength)
					t.Run(name, func(t *testing.T) {
						s := sd15Schedule(t, pt, sp)
						o := SamplerOptions{Steps: 25, Strength: strength}
						k := kind
						if kind == "ddim-eta" {
							k, o.Eta, o.EtaNoise = "ddim", 1, etaNoise
						}
						smp, err := NewSampler(k, s, o)
						if err != nil {
							t.Fatal(err)
						}
						if want := 25 - int(25*strength); smp.Len() != 25-want {
							t.Fatalf("Len = %d, want %d", smp.Len(), 25-want)
						}
						x := make([]float32, n)
						if strength == 1 {
							for i := range x {
								x[i] = noise[i] * float32(smp.InitNoiseSigma())
							}
						} else {
							// img2img from a different image.
							img := make([]float32, n)
							for i := range img {
								img[i] = float32(-target[i] / 2)
							}
							if err := smp.AddNoise(x, img, noise); err != nil {
								t.Fatal(err)
							}
						}
						runSampler(t, smp, x, target)
						var worst float64
						for i := range x {
							worst = math.Max(worst, math.Abs(float64(x[i])-target[i]))
						}
						if worst > 1e-4 {
							t.Errorf("max |x − x*| = %g after %d steps, want ≤ 1e-4", worst, smp.Len())
						}
					})
				}
			}
		}
	}
}

func TestDDIMStepMatchesDiffusers(t *testing.T) {
	s := sd15Schedule(t, PredEpsilon, SpacingLeading)
	rng := rand.New(rand.NewPCG(5, 6))
	const n = 64
	x := make([]float32, n)
	eps := make([]float32, n)
	z := make([]float32, n)
	for i := range x {
		x[i], eps[i], z[i] = float32(rng.NormFloat64()), float32(rng.NormFloat64()), float32(rng.NormFloat64())
	}
	for _, eta := range []float64{0, 0.5} {
		d, err := NewDDIM(s, SamplerOptions{Steps: 10, Eta: eta, EtaNoise: func(i int, dst []float32) error { copy(dst, z); return nil }})
		if err != nil {
			t.Fatal(err)
		}
		// Step 1 of leading/offset-1 with 10 steps: t = 801, prev = t − 1000//10 = 701.
		if d.Timestep(1) != 801 {
			t.Fatalf("timestep(1) = %g, want 801", d.Timestep(1))
		}
		at, ap := s.AlphasCumprod[801], s.AlphasCumprod[701]
		xs := append([]float32(nil), x...)
		x0 := make([]float32, n)
		if err := PredToX0(PredEpsilon, d.Level(1), xs, eps, x0); err != nil {
			t.Fatal(err)
		}
		if err := d.Step(1, xs, x0); err != nil {
			t.Fatal(err)
		}
		for i := range x {
			// diffusers DDIMScheduler.step:
			//   pred_x0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t
			//   variance = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), std = η·√variance
			//   x_prev = √ᾱ_prev·pred_x0 + √(1−ᾱ_prev−std²)·ε + std·z
			px0 := (float64(x[i]) - math.Sqrt(1-at)*float64(eps[i])) / math.Sqrt(at)
			std := eta * math.Sqrt((1-ap)/(1-at)*(1-at/ap))
			want := math.Sqrt(ap)*px0 + math.Sqrt(1-ap-std*std)*float64(eps[i]) + std*float64(z[i])
			if math.Abs(float64(xs[i])-want) > 2e-5*math.Max(1, math.Abs(want)) {
				t.Fatalf("eta %g: x_prev[%d] = %g, want %g", eta, i, xs[i], want)
			}
		}
	}
	// The last step goes to ᾱ = 1 with set_alpha_to_one, to ᾱ_0 without.
	d, _ := NewDDIM(s, SamplerOptions{Steps: 10})
	if got := d.prevAlphaBar(9); got != 1 {
		t.Errorf("final ᾱ = %g, want 1", got)
	}
	s.SetAlphaToOne = false
	d, _ = NewDDIM(s, SamplerOptions{Steps: 10})
	if got := d.prevAlphaBar(9); got != s.AlphasCumprod[0] {
		t.Errorf("final ᾱ = %g, want ᾱ_0 = %g", got, s.AlphasCumprod[0])
	}
}

func TestDPMSolver2MStepMatchesDiffusers(t *testing.T) {
	s := sd15Schedule(t, PredEpsilon, SpacingLinspace)
	d, err := NewDPMSolver2M(s, SamplerOptions{Steps: 10})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	const n = 64
	x := make([]float32, n)
	xa := make([]float32, n)
	xb := make([]float32, n)
	for i := range x {
		x[i], xa[i], xb[i] = float32(rng.NormFloat64()), float32(rng.Float64()*2-1), float32(rng.Float64()*2-1)
	}
	// Timesteps 999, 899, 799 (linspace): σ = √((1−ᾱ)/ᾱ), α_t = 1/√(σ²+1),
	// σ_t = σ·α_t, λ = ln α_t − ln σ_t.
	alphaSigma := func(t int) (float64, float64) {
		sig := SigmaOf(s.AlphasCumprod[t])
		a := 1 / math.Sqrt(sig*sig+1)
		return a, sig * a
	}
	a0, s0 := alphaSigma(999)
	a1, s1 := alphaSigma(899)
	a2, s2 := alphaSigma(799)
	l0, l1, l2 := math.Log(a0/s0), math.Log(a1/s1), math.Log(a2/s2)
	// Step 0, first order: x1 = (σ_1/σ_0)·x − α_1·(e^{−h}−1)·x0_a, h = λ_1 − λ_0.
	x1 := make([]float64, n)
	for i := range x {
		x1[i] = s1/s0*float64(x[i]) - a1*(math.Exp(-(l1-l0))-1)*float64(xa[i])
	}
	// Step 1, second order (midpoint): h = λ_2 − λ_1, r0 = (λ_1 − λ_0)/h,
	// D0 = x0_b, D1 = (x0_b − x0_a)/r0,
	// x2 = (σ_2/σ_1)·x1 − α_2·(e^{−h}−1)·D0 − ½·α_2·(e^{−h}−1)·D1.
	h := l2 - l1
	r0 := (l1 - l0) / h
	x2 := make([]float64, n)
	for i := range x {
		d0 := float64(xb[i])
		d1 := (float64(xb[i]) - float64(xa[i])) / r0
		x2[i] = s2/s1*x1[i] - a2*(math.Exp(-h)-1)*d0 - 0.5*a2*(math.Exp(-h)-1)*d1
	}
	if err := d.Step(0, x, xa); err != nil {
		t.Fatal(err)
	}
	for i := range x {
		if math.Abs(float64(x[i])-x1[i]) > 2e-5*math.Max(1, math.Abs(x1[i])) {
			t.Fatalf("step 0: x[%d] = %g, want %g", i, x[i], x1[i])
		}
	}
	if err := d.Step(1, x, xb); err != nil {
		t.Fatal(err)
	}
	for i := range x {
		if math.Abs(float64(x[i])-x2[i]) > 2e-5*math.Max(1, math.Abs(x2[i])) {
			t.Fatalf("step 1: x[%d] = %g, want %g", i, x[i], x2[i])
		}
	}
	// Out-of-order use is an error.
	d.Reset()
	if err := d.Step(3, x, xb); err == nil {
		t.Error("Step(3) after Reset accepted")
	}
}

func TestEulerInputScaleAndStep(t *testing.T) {
	s := sd15Schedule(t, PredEpsilon, SpacingLinspace)
	e, err := NewEuler(s, SamplerOptions{Steps: 25})
	if err != nil {
		t.Fatal(err)
	}
	// Step 1 is at t = 957.375: σ interpolated linearly between σ_957 and σ_958.
	sig := SigmaOf(s.AlphasCumprod[957])*0.625 + SigmaOf(s.AlphasCumprod[958])*0.375
	if math.Abs(e.Timestep(1)-957.375) > 1e-9 || math.Abs(e.InputScale(1)-1/math.Sqrt(sig*sig+1)) > 1e-12 {
		t.Errorf("step 1: timestep %g, input scale %g, want 957.375 and %g", e.Timestep(1), e.InputScale(1), 1/math.Sqrt(sig*sig+1))
	}
	if math.Abs(e.InitNoiseSigma()-14.6146) > 1e-3 {
		t.Errorf("init noise sigma %g, want σ_max ≈ 14.6146", e.InitNoiseSigma())
	}
	// Euler: d = (x − x0)/σ_i, x ← x + (σ_{i+1} − σ_i)·d.
	sg := e.Sigmas()
	x := []float32{3, -2}
	x0 := []float32{0.5, 0.25}
	want := []float64{3 + (sg[2]-sg[1])*(3-0.5)/sg[1], -2 + (sg[2]-sg[1])*(-2-0.25)/sg[1]}
	if err := e.Step(1, x, x0); err != nil {
		t.Fatal(err)
	}
	for i := range x {
		if math.Abs(float64(x[i])-want[i]) > 1e-5 {
			t.Errorf("euler step: x[%d] = %g, want %g", i, x[i], want[i])
		}
	}
}

func TestPredConversionsAgree(t *testing.T) {
	// For every type, PredToX0 and PredToEps satisfy in = α·x0 + σ·ε.
	lv := LevelFromSigma(1.7)
	in := []float32{0.3, -1.2, 2.5}
	pred := []float32{0.1, 0.9, -0.4}
	for _, pt := range []PredictionType{PredEpsilon, PredV, PredSample} {
		x0 := make([]float32, 3)
		eps := make([]float32, 3)
		if err := PredToX0(pt, lv, in, pred, x0); err != nil {
			t.Fatal(err)
		}
		if err := PredToEps(pt, lv, in, pred, eps); err != nil {
			t.Fatal(err)
		}
		for i := range in {
			if got := lv.Alpha*float64(x0[i]) + lv.Sigma*float64(eps[i]); math.Abs(got-float64(in[i])) > 1e-5 {
				t.Errorf("%s: α·x0+σ·ε = %g, want input %g", pt, got, in[i])
			}
		}
	}
	if err := PredToX0("flow", lv, in, pred, pred); err == nil {
		t.Error("unknown prediction type accepted")
	}
}

func TestImg2ImgStart(t *testing.T) {
	for _, tc := range []struct {
		steps    int
		strength float64
		want     int
	}{{25, 1, 0}, {25, 0.6, 10}, {25, 0.3, 18}, {50, 0.75, 13}, {10, 0.7, 3}} {
		got, err := Img2ImgStart(tc.steps, tc.strength)
		if err != nil || got != tc.want {
			t.Errorf("Img2ImgStart(%d, %g) = %d, %v; want %d", tc.steps, tc.strength, got, err, tc.want)
		}
	}
	for _, bad := range []float64{-0.1, 1.5, 0.01} {
		if _, err := Img2ImgStart(25, bad); err == nil {
			t.Errorf("strength %g accepted", bad)
		}
	}
}

// TestTiledSamplingEqualsUntiled drives a sampler over a tiled canvas the way
// the pipeline does (extract, scale, model, PredToX0, accumulate, Step) with a
// model of bounded receptive field, and compares with the untiled run.
func TestTiledSamplingEqualsUntiled(t *testing.T) {
	const c, h, w, r = 2, 40, 57, 2
	kw := 2*r + 1
	k := make([]float32, c*c*kw*kw)
	for i := range k {
		k[i] = float32(math.Sin(float64(i))) * 0.1
	}
	// A "v-prediction model": a convolution of the input plus a timestep term.
	model := func(in []float32, th, tw int, ts float64) []float32 {
		out := conv(in, c, th, tw, r, k)
		for i := range out {
			out[i] += float32(ts / 1000)
		}
		return out
	}
	for _, kind := range []string{"ddim", "euler", "dpm++2m"} {
		t.Run(kind, func(t *testing.T) {
			s := sd15Schedule(t, PredV, SpacingTrailing)
			g, err := NewTileGrid(h, w, TileOptions{Size: 20, Multiple: 8, Overlap: 5, Halo: r})
			if err != nil {
				t.Fatal(err)
			}
			init := make([]float32, c*h*w)
			if err := (Noise{Seed: 9, Stream: StreamBase}).Fill(init, 0, c, 0, 0, h, w); err != nil {
				t.Fatal(err)
			}
			run := func(tiled bool) []float32 {
				smp, err := NewSampler(kind, s, SamplerOptions{Steps: 8})
				if err != nil {
					t.Fatal(err)
				}
				x := make([]float32, len(init))
				for i := range x {
					x[i] = init[i] * float32(smp.InitNoiseSigma())
				}
				x0 := make([]float32, len(x))
				in := make([]float32, c*g.TileHeight*g.TileWidth)
				acc := NewAccumulator(c, h, w)
				for i := 0; i < smp.Len(); i++ {
					lv, ts := smp.Level(i), smp.Timestep(i)
					if !tiled {
						xin := make([]float32, len(x))
						ScaleInput(xin, x, smp.InputScale(i))
						if err := PredToX0(smp.Prediction(), lv, xin, model(xin, h, w, ts), x0); err != nil {
							t.Fatal(err)
						}
					} else {
						acc.Reset()
						for _, tl := range g.Tiles {
							if err := g.Extract(in, x, c, tl); err != nil {
								t.Fatal(err)
							}
							ScaleInput(in, in, smp.InputScale(i))
							out := model(in, tl.Height, tl.Width, ts)
							if err := PredToX0(smp.Prediction(), lv, in, out, out); err != nil {
								t.Fatal(err)
							}
							if err := acc.Add(tl, out); err != nil {
								t.Fatal(err)
							}
						}
						if err := acc.Result(x0); err != nil {
							t.Fatal(err)
						}
					}
					if err := smp.Step(i, x, x0); err != nil {
						t.Fatal(err)
					}
				}
				return x
			}
			if len(g.Tiles) < 4 {
				t.Fatalf("only %d tiles", len(g.Tiles))
			}
			a, b := run(false), run(true)
			for i := range a {
				if d := math.Abs(float64(a[i] - b[i])); d > 1e-4*math.Max(1, math.Abs(float64(a[i]))) {
					t.Fatalf("tiled %g, untiled %g at %d", b[i], a[i], i)
				}
			}
		})
	}
}

// StepRows over any partition of the rows into bands, with rows of later
// steps stepped before other rows finish earlier ones (as the pipeline's
// wavefront does), gives exactly what whole-canvas Step gives, for every
// sampler, DDIM with eta noise included.
func TestStepRowsEqualsStep(t *testing.T) {
	const c, h, w = 3, 23, 7
	n := c * h * w
	noise := Noise{Seed: 5, Stream: StreamEta}
	x0At := func(step int, dst []float32) { // a prediction that depends on the step
		for j := range dst {
			dst[j] = float32(0.9 * math.Sin(float64(j)*0.37+float64(step)*1.3))
		}
	}
	for _, kind := range []string{"ddim", "ddim-eta", "euler", "dpm++2m"} {
		for seed := uint64(0); seed < 8; seed++ {
			t.Run(fmt.Sprintf("%s/%d", kind, seed), func(t *testing.T) {
				mk := func() Sampler {
					o := SamplerOptions{Steps: 12}
					k := kind
					if kind == "ddim-eta" {
						k, o.Eta = "ddim", 0.7
						o.EtaNoise, o.EtaNoiseRows = noise.CanvasFiller(c, h, w), noise.RowsFiller(c, w)
					}
					s, err := NewSampler(k, sd15Schedule(t, PredEpsilon, SpacingTrailing), o)
					if err != nil {
						t.Fatal(err)
					}
					return s
				}
				whole, rows := mk(), mk()
				want := make([]float32, n)
				if err := (Noise{Seed: seed}).Fill(want, 0, c, 0, 0, h, w); err != nil {
					t.Fatal(err)
				}
				got := append([]float32(nil), want...)
				// The final step lands on x0 whatever the history, so stop
				// one short of it: the state then depends on every step.
				steps := whole.Len() - 1
				x0 := make([]float32, n)
				for i := 0; i < steps; i++ {
					x0At(i, x0)
					if err := whole.Step(i, want, x0); err != nil {
						t.Fatal(err)
					}
				}
				// Per step a random partition into bands; bands run in a random
				// order that only keeps each row's steps in sequence.
				rng := rand.New(rand.NewPCG(seed, 99))
				type band struct{ step, y0, y1 int }
				queues := make([][]band, steps)
				for i := range queues {
					for y := 0; y < h; {
						y1 := min(h, y+1+rng.IntN(6))
						queues[i] = append(queues[i], band{i, y, y1})
						y = y1
					}
				}
				at := make([]int, h) // the step each row is at
				for left := true; left; {
					left = false
					var ready []int
					for i, q := range queues {
						if len(q) == 0 {
							continue
						}
						left = true
						ok := true
						for y := q[0].y0; y < q[0].y1; y++ {
							ok = ok && at[y] == i
						}
						if ok {
							ready = append(ready, i)
						}
					}
					if !left {
						break
					}
					if len(ready) == 0 {
						t.Fatal("no band can run")
					}
					i := ready[rng.IntN(len(ready))]
					b := queues[i][0]
					queues[i] = queues[i][1:]
					x0At(i, x0)
					if err := rows.StepRows(i, got, x0, c, h, w, b.y0, b.y1); err != nil {
						t.Fatal(err)
					}
					for y := b.y0; y < b.y1; y++ {
						at[y]++
					}
				}
				x0At(steps-1, x0)
				for j := range want {
					if math.Abs(float64(want[j]-x0[j])) < 1e-6 {
						t.Fatalf("value %d is the last prediction: the comparison would not see the history", j)
					}
					if got[j] != want[j] {
						t.Fatalf("value %d: StepRows %v, Step %v", j, got[j], want[j])
					}
				}
			})
		}
	}
}

func TestStepRowsRejectsBadRows(t *testing.T) {
	s, err := NewSampler("euler", sd15Schedule(t, PredEpsilon, SpacingTrailing), SamplerOptions{Steps: 4})
	if err != nil {
		t.Fatal(err)
	}
	x := make([]float32, 2*3*4)
	for _, tc := range []struct{ c, h, w, y0, y1 int }{{2, 3, 4, 2, 4}, {2, 3, 4, 2, 1}, {2, 4, 4, 0, 1}, {0, 3, 4, 0, 1}} {
		if err := s.StepRows(0, x, x, tc.c, tc.h, tc.w, tc.y0, tc.y1); err == nil {
			t.Errorf("StepRows(%+v) accepted", tc)
		}
	}
}
