package stages

import (
	"math"
	"slices"
	"testing"
)

func TestAlphasCumprodScaledLinearSD15(t *testing.T) {
	// SD 1.5: scaled_linear, beta_start 0.00085, beta_end 0.012, T 1000.
	betas, err := Betas(BetaScaledLinear, 1000, 0.00085, 0.012)
	if err != nil {
		t.Fatal(err)
	}
	abar := AlphasCumprod(betas)
	// Closed form: β_i = (√0.00085 + i·(√0.012−√0.00085)/999)², ᾱ_t = ∏_{i≤t}(1−β_i).
	want := func(t int) float64 {
		p := 1.0
		for i := 0; i <= t; i++ {
			s := math.Sqrt(0.00085) + float64(i)*(math.Sqrt(0.012)-math.Sqrt(0.00085))/999
			p *= 1 - s*s
		}
		return p
	}
	for _, i := range []int{0, 499, 999} {
		if d := math.Abs(abar[i] - want(i)); d > 1e-12 {
			t.Errorf("alphas_cumprod[%d] = %.10g, closed form %.10g", i, abar[i], want(i))
		}
	}
	// Published values: ᾱ_0 = 1 − 0.00085; ᾱ_999 ≈ 0.0046601, i.e. the
	// k-diffusion sigma range of SD 1.5, σ_max ≈ 14.6146 and σ_min ≈ 0.0292.
	literals := []struct {
		name      string
		got, want float64
		tol       float64
	}{
		{"alphas_cumprod[0]", abar[0], 0.99915, 1e-12},
		{"alphas_cumprod[999]", abar[999], 0.0046601, 5e-8},
		{"sigma_max", SigmaOf(abar[999]), 14.6146, 5e-5},
		{"sigma_min", SigmaOf(abar[0]), 0.0292, 5e-5},
	}
	for _, l := range literals {
		if math.Abs(l.got-l.want) > l.tol {
			t.Errorf("%s = %.8g, want %.8g ± %g", l.name, l.got, l.want, l.tol)
		}
	}
}

func TestAlphasCumprodCosine(t *testing.T) {
	betas, err := Betas(BetaCosine, 1000, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	abar := AlphasCumprod(betas)
	// f(t) = cos((t+0.008)/1.008·π/2)²; β_i = min(1 − f((i+1)/T)/f(i/T), 0.999)
	// telescopes to ᾱ_t = f((t+1)/T)/f(0) until the cap, which only the last
	// beta hits: ᾱ_999 = f(0.999)/f(0)·(1−0.999).
	f := func(t float64) float64 { c := math.Cos((t + 0.008) / 1.008 * math.Pi / 2); return c * c }
	for _, tc := range []struct {
		i    int
		want float64
	}{{0, f(0.001) / f(0)}, {499, f(0.5) / f(0)}, {998, f(0.999) / f(0)}, {999, f(0.999) / f(0) * 0.001}} {
		if math.Abs(abar[tc.i]-tc.want) > 1e-12*math.Max(1, tc.want) {
			t.Errorf("alphas_cumprod[%d] = %.12g, closed form %.12g", tc.i, abar[tc.i], tc.want)
		}
	}
	if betas[999] != 0.999 {
		t.Errorf("betas[999] = %g, want the 0.999 cap", betas[999])
	}
}

func TestBetasLinear(t *testing.T) {
	b, err := Betas(BetaLinear, 1000, 0.0001, 0.02)
	if err != nil {
		t.Fatal(err)
	}
	if b[0] != 0.0001 || b[999] != 0.02 || math.Abs(b[500]-(0.0001+500*(0.02-0.0001)/999)) > 1e-15 {
		t.Errorf("linear betas: %g %g %g", b[0], b[500], b[999])
	}
	if _, err := Betas("sigmoid", 1000, 0.0001, 0.02); err == nil {
		t.Error("Betas accepted an unknown schedule")
	}
}

// Timestep formulas written out independently from diffusers' set_timesteps.
func refDDIM(T, n int, sp Spacing, off int) []int {
	var out []int
	switch sp {
	case SpacingLeading:
		for i := n - 1; i >= 0; i-- {
			out = append(out, i*(T/n)+off)
		}
	case SpacingLinspace:
		for i := n - 1; i >= 0; i-- {
			v := float64(i) * (float64(T-1) / float64(n-1))
			if i == n-1 {
				v = float64(T - 1)
			}
			out = append(out, int(math.RoundToEven(v)))
		}
	case SpacingTrailing:
		r := float64(T) / float64(n)
		for i := 0; i < n; i++ {
			out = append(out, int(math.RoundToEven(float64(T)-float64(i)*r))-1)
		}
	}
	return out
}

func TestTimestepsLiteralTenSteps(t *testing.T) {
	seq := func(from, by, n int) []int {
		var s []int
		for i := 0; i < n; i++ {
			s = append(s, from-i*by)
		}
		return s
	}
	ddim := map[Spacing][]int{
		SpacingLeading:  seq(901, 100, 10), // steps_offset 1
		SpacingLinspace: {999, 888, 777, 666, 555, 444, 333, 222, 111, 0},
		SpacingTrailing: seq(999, 100, 10),
	}
	dpm := map[Spacing][]int{
		SpacingLeading:  seq(901, 90, 10), // (arange(11)·(1000//11))[::-1][:-1] + 1
		SpacingLinspace: {999, 899, 799, 699, 599, 500, 400, 300, 200, 100},
		SpacingTrailing: seq(999, 100, 10),
	}
	for sp, want := range ddim {
		got, err := TimestepsDDIM(1000, 10, sp, 1)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("DDIM %s: %v (%v), want %v", sp, got, err, want)
		}
		e, err := TimestepsEuler(1000, 10, sp, 1)
		ei := make([]int, len(e))
		for i, v := range e {
			ei[i] = int(v)
			if v != math.Trunc(v) {
				t.Errorf("Euler %s: fractional timestep %g for 10 steps", sp, v)
			}
		}
		if err != nil || !slices.Equal(ei, want) {
			t.Errorf("Euler %s: %v (%v), want %v", sp, e, err, want)
		}
	}
	for sp, want := range dpm {
		got, err := TimestepsDPMSolver(1000, 10, sp, 1)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("DPM-Solver %s: %v (%v), want %v", sp, got, err, want)
		}
	}
}

func TestTimestepsMatchFormulas(t *testing.T) {
	for _, n := range []int{10, 25, 50} {
		for _, sp := range []Spacing{SpacingLeading, SpacingLinspace, SpacingTrailing} {
			got, err := TimestepsDDIM(1000, n, sp, 1)
			if err != nil {
				t.Fatal(err)
			}
			if want := refDDIM(1000, n, sp, 1); !slices.Equal(got, want) {
				t.Errorf("DDIM %s %d steps: %v, want %v", sp, n, got, want)
			}
			e, err := TimestepsEuler(1000, n, sp, 1)
			if err != nil {
				t.Fatal(err)
			}
			for i, v := range e {
				var want float64
				switch sp {
				case SpacingLinspace: // unrounded float32 linspace
					want = float64(float32(float64(n-1-i) * 999 / float64(n-1)))
				default:
					want = float64(refDDIM(1000, n, sp, 1)[i])
				}
				if math.Abs(v-want) > 1e-4 {
					t.Errorf("Euler %s %d steps: [%d] = %g, want %g", sp, n, i, v, want)
				}
			}
			p, err := TimestepsDPMSolver(1000, n, sp, 1)
			if err != nil {
				t.Fatal(err)
			}
			var want []int
			switch sp {
			case SpacingLeading:
				for i := n; i >= 1; i-- {
					want = append(want, i*(1000/(n+1))+1)
				}
			case SpacingLinspace:
				want = refDDIM(1000, n+1, sp, 0)[:n]
			case SpacingTrailing:
				want = refDDIM(1000, n, sp, 0)
			}
			if !slices.Equal(p, want) {
				t.Errorf("DPM-Solver %s %d steps: %v, want %v", sp, n, p, want)
			}
		}
	}
	// numpy rounds half to even: linspace(0, 999, 25) holds 166.5 and 832.5.
	got, _ := TimestepsDDIM(1000, 25, SpacingLinspace, 0)
	if got[20] != 166 || got[4] != 832 {
		t.Errorf("DDIM linspace 25: %v, want 832 at [4] and 166 at [20]", got)
	}
	if _, err := TimestepsDDIM(1000, 0, SpacingLeading, 0); err == nil {
		t.Error("0 steps accepted")
	}
}

func TestParseSchedulerConfig(t *testing.T) {
	sd15 := []byte(`{
	  "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
	  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
	  "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
	  "steps_offset": 1, "trained_betas": null, "clip_sample": false}`)
	c, err := ParseSchedulerConfig(sd15)
	if err != nil {
		t.Fatal(err)
	}
	if c.ClassName != ClassPNDM || c.TimestepSpacing != "leading" || c.StepsOffset != 1 || c.SetAlphaToOne || c.BetaSchedule != "scaled_linear" || c.Shift != 1 {
		t.Errorf("PNDM config: %+v", c)
	}
	// Swapping in Euler keeps the file's keys and takes Euler's defaults for
	// the rest: timestep_spacing becomes linspace.
	e, err := ParseSchedulerConfigAs(sd15, ClassEuler)
	if err != nil {
		t.Fatal(err)
	}
	if e.TimestepSpacing != "linspace" || e.StepsOffset != 1 || e.BetaEnd != 0.012 {
		t.Errorf("as Euler: %+v", e)
	}
	d, err := ParseSchedulerConfigAs([]byte(`{"_class_name":"EulerDiscreteScheduler","prediction_type":"v_prediction"}`), ClassDDIM)
	if err != nil {
		t.Fatal(err)
	}
	if !d.ClipSample || !d.SetAlphaToOne || d.TimestepSpacing != "leading" || d.PredictionType != "v_prediction" {
		t.Errorf("as DDIM: %+v", d)
	}
	for class, want := range map[string][3]any{
		ClassDDIM:      {"leading", true, true},
		ClassDDPM:      {"leading", true, false},
		ClassPNDM:      {"leading", false, false},
		ClassEuler:     {"linspace", false, false},
		ClassDPMSolver: {"linspace", false, false},
	} {
		c, err := ParseSchedulerConfig([]byte(`{"_class_name":"` + class + `"}`))
		if err != nil {
			t.Fatal(err)
		}
		if got := [3]any{c.TimestepSpacing, c.ClipSample, c.SetAlphaToOne}; got != want {
			t.Errorf("%s defaults (spacing, clip_sample, set_alpha_to_one) = %v, want %v", class, got, want)
		}
	}
	s, err := c.Schedule()
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(s.AlphasCumprod[999]-0.0046601) > 5e-8 {
		t.Errorf("schedule from config: alphas_cumprod[999] = %g", s.AlphasCumprod[999])
	}
	for _, bad := range []string{
		`{"_class_name":"LMSDiscreteScheduler"}`,
		`{"beta_schedule":"quadratic"}`,
		`{"timestep_spacing":"even"}`,
		`{"num_train_timesteps":"1000"}`,
		`{"prediction_type":"flow"}`,
		`{"shift":-2}`,
		`{"rescale_betas_zero_snr":true}`,
		`{"_class_name":"DPMSolverMultistepScheduler","use_karras_sigmas":true}`,
		`[1,2]`,
	} {
		if _, err := ParseSchedulerConfig([]byte(bad)); err == nil {
			t.Errorf("config %s accepted", bad)
		}
	}
}

func TestShift(t *testing.T) {
	betas, _ := Betas(BetaScaledLinear, 1000, 0.00085, 0.012)
	s := &Schedule{AlphasCumprod: AlphasCumprod(betas), TimestepSpacing: SpacingTrailing, Prediction: PredEpsilon, Shift: 2}
	d, err := NewDDIM(s, SamplerOptions{Steps: 10})
	if err != nil {
		t.Fatal(err)
	}
	// σ' = 2σ at t = 499; the SD3 form on σ_f = σ/(1+σ) agrees.
	sig := SigmaOf(s.AlphasCumprod[499])
	lv := d.Level(5)
	if got := lv.Sigma / lv.Alpha; math.Abs(got-2*sig) > 1e-9*sig {
		t.Errorf("shifted sigma at t=499: %g, want %g", got, 2*sig)
	}
	sf := sig / (1 + sig)
	sf2 := 2 * sf / (1 + sf)
	if got := lv.Sigma / (lv.Alpha + lv.Sigma); math.Abs(got-sf2) > 1e-12 {
		t.Errorf("flow sigma %g, SD3 shift gives %g", got, sf2)
	}
	// The model gets the timestep whose training sigma is the shifted one.
	tt := d.Timestep(5)
	if tt <= 499 || tt >= 999 || math.Abs(s.sigmaAt(tt)-2*sig) > 0.01*sig {
		t.Errorf("shifted timestep %g (sigma there %g, want %g)", tt, s.sigmaAt(tt), 2*sig)
	}
	if got := s.SigmaToTimestep(SigmaOf(s.AlphasCumprod[321])); math.Abs(got-321) > 1e-9 {
		t.Errorf("SigmaToTimestep(σ_321) = %g", got)
	}
}
