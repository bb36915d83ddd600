package stages

import (
	"fmt"
	"math"
)

// Level is the noise level of a model input in variance-preserving form:
// input = Alpha·x0 + Sigma·ε with Alpha² + Sigma² = 1.
type Level struct {
	Alpha, Sigma float64
}

// LevelFromAlphaBar returns the level of ᾱ: Alpha = √ᾱ, Sigma = √(1−ᾱ).
func LevelFromAlphaBar(abar float64) Level {
	return Level{Alpha: math.Sqrt(abar), Sigma: math.Sqrt(1 - abar)}
}

// LevelFromSigma returns the level of a k-diffusion sigma σ (x = x0 + σ·ε,
// model input x/√(σ²+1)): Alpha = 1/√(σ²+1), Sigma = σ/√(σ²+1).
func LevelFromSigma(sigma float64) Level {
	a := 1 / math.Sqrt(sigma*sigma+1)
	return Level{Alpha: a, Sigma: sigma * a}
}

// PredToX0 converts a model output pred for the model input xIn at level lv
// into the predicted clean sample x0, element by element:
//
//	epsilon: x0 = (xIn − Sigma·pred)/Alpha
//	v:       x0 = Alpha·xIn − Sigma·pred
//	sample:  x0 = pred
//
// The map is affine in pred with coefficients that depend only on the level,
// so fusing converted tile outputs with weights that sum to one equals
// converting the fused raw outputs. dst may alias pred.
func PredToX0(pt PredictionType, lv Level, xIn, pred, dst []float32) error {
	if len(xIn) != len(pred) || len(dst) != len(pred) {
		return fmt.Errorf("pred to x0: lengths %d, %d, %d differ", len(xIn), len(pred), len(dst))
	}
	switch pt {
	case PredEpsilon:
		a, b := float32(1/lv.Alpha), float32(lv.Sigma/lv.Alpha)
		for i := range dst {
			dst[i] = a*xIn[i] - b*pred[i]
		}
	case PredV:
		a, b := float32(lv.Alpha), float32(lv.Sigma)
		for i := range dst {
			dst[i] = a*xIn[i] - b*pred[i]
		}
	case PredSample:
		copy(dst, pred)
	default:
		return fmt.Errorf("pred to x0: unknown prediction type %q", pt)
	}
	return nil
}

// PredToEps converts a model output into the predicted noise ε:
//
//	epsilon: ε = pred
//	v:       ε = Sigma·xIn + Alpha·pred
//	sample:  ε = (xIn − Alpha·pred)/Sigma
//
// dst may alias pred.
func PredToEps(pt PredictionType, lv Level, xIn, pred, dst []float32) error {
	if len(xIn) != len(pred) || len(dst) != len(pred) {
		return fmt.Errorf("pred to eps: lengths %d, %d, %d differ", len(xIn), len(pred), len(dst))
	}
	switch pt {
	case PredEpsilon:
		copy(dst, pred)
	case PredV:
		a, b := float32(lv.Sigma), float32(lv.Alpha)
		for i := range dst {
			dst[i] = a*xIn[i] + b*pred[i]
		}
	case PredSample:
		a, b := float32(1/lv.Sigma), float32(lv.Alpha/lv.Sigma)
		for i := range dst {
			dst[i] = a*xIn[i] - b*pred[i]
		}
	default:
		return fmt.Errorf("pred to eps: unknown prediction type %q", pt)
	}
	return nil
}

// ScaleInput writes the model input scale·x into dst (dst may alias x).
func ScaleInput(dst, x []float32, scale float64) {
	if scale == 1 {
		copy(dst, x)
		return
	}
	s := float32(scale)
	for i := range dst {
		dst[i] = s * x[i]
	}
}

// Sampler steps a whole canvas from noise to an image. A pipeline drives it
// like this, for i in 0..Len()−1:
//
//	t := s.Timestep(i)           // feed the model this timestep
//	lv := s.Level(i)             // the model input is lv.Alpha·x0 + lv.Sigma·ε
//	scale := s.InputScale(i)     // model input = scale·x
//	for each tile: extract x, ScaleInput, run the model (with CFG), then
//	    PredToX0(s.Prediction(), lv, input, output, x0tile) and add x0tile to
//	    an Accumulator with the tile's window
//	normalise the Accumulator into x0 (canvas-sized)
//	s.Step(i, x, x0)             // x advances to step i+1 in place
//
// The canvas x starts as InitNoiseSigma()·noise (txt2img) or AddNoise of an
// image (img2img, with the Strength option). Step must be called for
// i = 0, 1, … in order; Reset starts over. A pipeline that does not wait
// for a whole step (tessera's wavefront) steps bands of rows with StepRows
// instead, each row through the steps in order.
type Sampler interface {
	// Len is the number of steps to run.
	Len() int
	// Timestep is the training timestep in [0, T−1] fed to the model at step
	// i; it may be fractional (Euler linspace, shifted schedules).
	Timestep(i int) float64
	// InputScale is the factor from the sampler's state x to the model input.
	InputScale(i int) float64
	// Level is the variance-preserving level of the model input at step i.
	Level(i int) Level
	// Prediction is the model's prediction type.
	Prediction() PredictionType
	// InitNoiseSigma scales unit noise into the state at step 0 (txt2img).
	InitNoiseSigma() float64
	// AddNoise writes into dst the state at step 0 for the clean image x0
	// and unit noise (img2img).
	AddNoise(dst, x0, noise []float32) error
	// Step advances x from step i to step i+1 in place, given the fused
	// prediction of x0 for the whole canvas.
	Step(i int, x, x0 []float32) error
	// StepRows is Step for rows [y0, y1) of every channel of the planar
	// c×h×w canvas x only, given x0 for those rows (x and x0 are whole
	// canvases; nothing outside the rows is read or written). Each row must
	// be stepped once per step, in step order, but different rows may be at
	// different steps: a tiled pipeline steps the part of the canvas whose
	// tiles are done while the model works on the rest. Stepping every row
	// gives exactly what Step gives. Not safe for concurrent use.
	StepRows(i int, x, x0 []float32, c, h, w, y0, y1 int) error
	// Reset forgets the history of multistep samplers.
	Reset()
}

var (
	_ Sampler = (*DDIM)(nil)
	_ Sampler = (*Euler)(nil)
	_ Sampler = (*DPMSolver2M)(nil)
)

// SamplerOptions are the per-run choices of a sampler.
type SamplerOptions struct {
	// Steps is the number of inference steps before any img2img truncation.
	Steps int
	// Strength in (0, 1] runs only the last part of the schedule (img2img),
	// as diffusers does: init = min(int(Steps·Strength), Steps), start at
	// Steps − init. 0 means 1 (the whole schedule).
	Strength float64
	// Eta is DDIM's stochasticity (0 = deterministic).
	Eta float64
	// EtaNoise fills dst (canvas-sized) with unit normals for step i; DDIM's
	// Step calls it when Eta > 0. Use Noise{Seed, StreamEta}.CanvasFiller(c, h, w).
	EtaNoise func(i int, dst []float32) error
	// EtaNoiseRows fills dst with the same normals for rows [y0, y1) of
	// every channel (c×(y1−y0)×w values); DDIM's StepRows calls it when
	// Eta > 0. Use Noise{Seed, StreamEta}.RowsFiller(c, w).
	EtaNoiseRows func(i int, dst []float32, y0, y1 int) error
}

// checkRows validates a StepRows call and returns the plane size.
func checkRows(name string, x, x0 []float32, c, h, w, y0, y1 int) error {
	if c < 1 || h < 1 || w < 1 || len(x) != c*h*w || len(x0) != len(x) {
		return fmt.Errorf("%s: canvas %d×%d×%d with %d and %d values", name, c, h, w, len(x), len(x0))
	}
	if y0 < 0 || y1 > h || y0 > y1 {
		return fmt.Errorf("%s: rows [%d, %d) outside [0, %d)", name, y0, y1, h)
	}
	return nil
}

// Img2ImgStart returns the index of the first step to run for an img2img
// strength, as diffusers' get_timesteps computes it.
func Img2ImgStart(steps int, strength float64) (int, error) {
	if strength == 0 {
		strength = 1
	}
	if !(strength > 0 && strength <= 1) {
		return 0, fmt.Errorf("strength %g, want a value in (0, 1]", strength)
	}
	init := min(int(float64(steps)*strength), steps)
	if init < 1 {
		return 0, fmt.Errorf("strength %g leaves no step of %d", strength, steps)
	}
	return steps - init, nil
}

// plan is what the samplers share: per step the model timestep and ᾱ (after
// the shift) of the state.
type plan struct {
	sched *Schedule
	ts    []float64 // model timesteps, from the start step on
	abar  []float64 // ᾱ of each step's state, len(ts)+1: the last is the target of the final step
}

func (p *plan) Len() int                   { return len(p.ts) }
func (p *plan) Timestep(i int) float64     { return p.ts[i] }
func (p *plan) Level(i int) Level          { return LevelFromAlphaBar(p.abar[i]) }
func (p *plan) Prediction() PredictionType { return p.sched.Prediction }

func newPlan(s *Schedule, o SamplerOptions, ts, sigmas []float64) (plan, error) {
	start, err := Img2ImgStart(o.Steps, o.Strength)
	if err != nil {
		return plan{}, err
	}
	p := plan{sched: s}
	for i := start; i < len(ts); i++ {
		t, a := s.shifted(ts[i], sigmas[i])
		p.ts = append(p.ts, t)
		p.abar = append(p.abar, a)
	}
	return p, nil
}

// checkStep validates the step index of a Step or StepRows call.
func (p *plan) checkStep(name string, i int) error {
	if i < 0 || i >= len(p.ts) {
		return fmt.Errorf("%s: step %d outside [0, %d)", name, i, len(p.ts))
	}
	return nil
}

func checkCanvas(name string, xs ...[]float32) error {
	for _, x := range xs[1:] {
		if len(x) != len(xs[0]) {
			return fmt.Errorf("%s: slice lengths %d and %d differ", name, len(xs[0]), len(x))
		}
	}
	return nil
}

// DDIM is the DDIM sampler (diffusers DDIMScheduler.step) in
// variance-preserving form; the model input is the state itself.
type DDIM struct {
	plan
	eta          float64
	etaNoise     func(int, []float32) error
	etaNoiseRows func(int, []float32, int, int) error
	noise        []float32
	threshold    float64 // dynamic thresholding's s for the step; 0: none
}

// NewDDIM returns a DDIM sampler over s. The previous level of the step at
// timestep t is ᾱ[t − T//Steps] (or the final ᾱ: 1 with SetAlphaToOne,
// else ᾱ[0]), exactly as diffusers computes it.
func NewDDIM(s *Schedule, o SamplerOptions) (*DDIM, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if o.Eta < 0 {
		return nil, fmt.Errorf("ddim: eta %g, want >= 0", o.Eta)
	}
	if o.Eta > 0 && o.EtaNoise == nil && o.EtaNoiseRows == nil {
		return nil, fmt.Errorf("ddim: eta %g needs an EtaNoise source", o.Eta)
	}
	T := s.T()
	its, err := TimestepsDDIM(T, o.Steps, s.TimestepSpacing, s.StepsOffset)
	if err != nil {
		return nil, fmt.Errorf("ddim: %w", err)
	}
	ts := make([]float64, len(its))
	sig := make([]float64, len(its))
	for i, t := range its {
		if t < 0 || t >= T {
			return nil, fmt.Errorf("ddim: timestep %d outside [0, %d) (steps_offset %d)", t, T, s.StepsOffset)
		}
		ts[i], sig[i] = float64(t), SigmaOf(s.AlphasCumprod[t])
	}
	p, err := newPlan(s, o, ts, sig)
	if err != nil {
		return nil, fmt.Errorf("ddim: %w", err)
	}
	final := 1.0
	if !s.SetAlphaToOne {
		final = s.AlphasCumprod[0]
		if s.ShiftFactor() != 1 {
			_, final = s.shifted(0, SigmaOf(final))
		}
	}
	ratio := T / o.Steps
	start := len(its) - len(p.ts)
	for _, t := range its[start:] {
		a := final
		if prev := t - ratio; prev >= 0 {
			_, a = s.shifted(float64(prev), SigmaOf(s.AlphasCumprod[prev]))
		}
		p.abar = append(p.abar, a)
	}
	// p.abar now holds the current levels followed by the previous levels.
	d := &DDIM{plan: p, eta: o.Eta, etaNoise: o.EtaNoise, etaNoiseRows: o.EtaNoiseRows}
	return d, nil
}

func (d *DDIM) prevAlphaBar(i int) float64 { return d.abar[len(d.ts)+i] }

// Level returns the level of the state at step i.
func (d *DDIM) Level(i int) Level { return LevelFromAlphaBar(d.abar[i]) }

// InputScale is 1: the DDIM state is the model input.
func (d *DDIM) InputScale(int) float64 { return 1 }

// InitNoiseSigma is 1.
func (d *DDIM) InitNoiseSigma() float64 { return 1 }

// AddNoise writes √ᾱ·x0 + √(1−ᾱ)·noise at the first step's level.
func (d *DDIM) AddNoise(dst, x0, noise []float32) error { return addNoise(d, dst, x0, noise) }

// Reset does nothing: DDIM keeps no history.
func (d *DDIM) Reset() {}

// Step applies diffusers' DDIM update with ᾱ_t, ᾱ_prev and ε = (x − √ᾱ_t·x0)/√(1−ᾱ_t):
//
//	x0c  = clip(x0) if ClipSample
//	σ_t  = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))
//	x    ← √ᾱ_prev·x0c + √(1−ᾱ_prev−σ_t²)·ε + σ_t·z
func (d *DDIM) Step(i int, x, x0 []float32) error {
	if err := d.checkStep("ddim", i); err != nil {
		return err
	}
	if err := checkCanvas("ddim", x, x0); err != nil {
		return err
	}
	var noise []float32
	if d.eta > 0 {
		if d.etaNoise == nil {
			return fmt.Errorf("ddim: eta %g needs an EtaNoise source for Step", d.eta)
		}
		noise = d.noiseBuffer(len(x))
		if err := d.etaNoise(i, noise); err != nil {
			return fmt.Errorf("ddim: eta noise at step %d: %w", i, err)
		}
	}
	d.step(i, x, x0, noise)
	return nil
}

// StepRows is Step for rows [y0, y1) of every channel.
// SetThreshold sets the dynamic-thresholding level s of the next steps'
// x0 (0: none); see Thresholding.
func (d *DDIM) SetThreshold(s float64) { d.threshold = s }

var _ Thresholder = (*DDIM)(nil)

func (d *DDIM) StepRows(i int, x, x0 []float32, c, h, w, y0, y1 int) error {
	if err := d.checkStep("ddim", i); err != nil {
		return err
	}
	if err := checkRows("ddim", x, x0, c, h, w, y0, y1); err != nil {
		return err
	}
	band := (y1 - y0) * w
	var noise []float32
	if d.eta > 0 {
		if d.etaNoiseRows == nil {
			return fmt.Errorf("ddim: eta %g needs an EtaNoiseRows source for StepRows", d.eta)
		}
		noise = d.noiseBuffer(c * band)
		if err := d.etaNoiseRows(i, noise, y0, y1); err != nil {
			return fmt.Errorf("ddim: eta noise at step %d: %w", i, err)
		}
	}
	for ch := 0; ch < c; ch++ {
		lo := ch*h*w + y0*w
		var z []float32
		if noise != nil {
			z = noise[ch*band : (ch+1)*band]
		}
		d.step(i, x[lo:lo+band], x0[lo:lo+band], z)
	}
	return nil
}

func (d *DDIM) noiseBuffer(n int) []float32 {
	if cap(d.noise) < n {
		d.noise = make([]float32, n)
	}
	return d.noise[:n]
}

// step updates x elementwise; noise is nil when eta is 0.
func (d *DDIM) step(i int, x, x0, noise []float32) {
	at, ap := d.abar[i], d.prevAlphaBar(i)
	std := 0.0
	if d.eta > 0 {
		std = d.eta * math.Sqrt((1-ap)/(1-at)*(1-at/ap))
	}
	sa, sb := math.Sqrt(at), math.Sqrt(1-at)
	cx0 := float32(math.Sqrt(ap))
	ceps := float32(math.Sqrt(math.Max(0, 1-ap-std*std)))
	ia, rb := float32(sa), float32(1/sb)
	clip := d.sched.ClipSample
	lo, hi := float32(-d.sched.ClipSampleRange), float32(d.sched.ClipSampleRange)
	thr := float32(d.threshold)
	fstd := float32(std)
	x0 = x0[:len(x)]
	for j := range x {
		p0 := x0[j]
		eps := (x[j] - ia*p0) * rb
		switch {
		case thr > 0: // thresholding replaces clipping, as in diffusers
			p0 = min(max(p0, -thr), thr) / thr
		case clip:
			p0 = min(max(p0, lo), hi)
		}
		v := cx0*p0 + ceps*eps
		if std > 0 {
			v += fstd * noise[j]
		}
		x[j] = v
	}
}

// Euler is the Euler discrete sampler in k-diffusion sigma space (diffusers
// EulerDiscreteScheduler without churn): the state is x = x0 + σ·ε and the
// model input is x/√(σ²+1).
type Euler struct {
	plan
	sigmas []float64 // len(ts)+1, the last 0
	init   float64
}

// NewEuler returns an Euler sampler over s. Sigmas are interpolated linearly
// in σ at the (float) timesteps; the final sigma is zero.
func NewEuler(s *Schedule, o SamplerOptions) (*Euler, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	T := s.T()
	ts, err := TimestepsEuler(T, o.Steps, s.TimestepSpacing, s.StepsOffset)
	if err != nil {
		return nil, fmt.Errorf("euler: %w", err)
	}
	sig := make([]float64, len(ts))
	maxSigma := 0.0
	for i, t := range ts {
		if t < 0 || t > float64(T-1) {
			return nil, fmt.Errorf("euler: timestep %g outside [0, %d] (steps_offset %d)", t, T-1, s.StepsOffset)
		}
		sig[i] = s.sigmaAt(t)
	}
	p, err := newPlan(s, o, ts, sig)
	if err != nil {
		return nil, fmt.Errorf("euler: %w", err)
	}
	e := &Euler{plan: p}
	for _, a := range p.abar {
		e.sigmas = append(e.sigmas, SigmaOf(a))
	}
	e.sigmas = append(e.sigmas, 0)
	// diffusers: init_noise_sigma is max σ for linspace and trailing
	// spacing, √(max σ² + 1) for leading.
	for _, v := range sig {
		maxSigma = math.Max(maxSigma, v*s.ShiftFactor())
	}
	e.init = maxSigma
	if s.TimestepSpacing == SpacingLeading {
		e.init = math.Sqrt(maxSigma*maxSigma + 1)
	}
	return e, nil
}

// Sigmas returns the k-diffusion sigmas of the steps run, followed by 0.
func (e *Euler) Sigmas() []float64 { return append([]float64(nil), e.sigmas...) }

// InputScale is 1/√(σ_i²+1).
func (e *Euler) InputScale(i int) float64 { return 1 / math.Sqrt(e.sigmas[i]*e.sigmas[i]+1) }

// InitNoiseSigma is diffusers' init_noise_sigma.
func (e *Euler) InitNoiseSigma() float64 { return e.init }

// AddNoise writes x0 + σ_0·noise.
func (e *Euler) AddNoise(dst, x0, noise []float32) error { return addNoise(e, dst, x0, noise) }

// Reset does nothing: Euler keeps no history.
func (e *Euler) Reset() {}

// Step applies x ← x + (σ_{i+1} − σ_i)·(x − x0)/σ_i.
// The canvas is stepped as one row of one channel.
func (e *Euler) Step(i int, x, x0 []float32) error {
	return e.StepRows(i, x, x0, 1, 1, len(x), 0, 1)
}

// StepRows is Step for rows [y0, y1) of every channel.
func (e *Euler) StepRows(i int, x, x0 []float32, c, h, w, y0, y1 int) error {
	if err := e.checkStep("euler", i); err != nil {
		return err
	}
	if err := checkRows("euler", x, x0, c, h, w, y0, y1); err != nil {
		return err
	}
	for ch := 0; ch < c; ch++ {
		lo, hi := ch*h*w+y0*w, ch*h*w+y1*w
		e.step(i, x[lo:hi], x0[lo:hi])
	}
	return nil
}

func (e *Euler) step(i int, x, x0 []float32) {
	r := float32((e.sigmas[i+1] - e.sigmas[i]) / e.sigmas[i])
	x0 = x0[:len(x)]
	for j := range x {
		x[j] += r * (x[j] - x0[j])
	}
}

// DPMSolver2M is DPM-Solver++(2M), the multistep second-order solver in
// data-prediction form with the midpoint update (diffusers
// DPMSolverMultistepScheduler with algorithm_type dpmsolver++, solver_order
// 2). The state is variance preserving, as with DDIM.
type DPMSolver2M struct {
	plan
	prev            []float32 // x0 of the previous step
	havePrev        bool
	firstOrderFinal bool // see NewDPMSolver2M
}

// NewDPMSolver2M returns a DPM-Solver++(2M) sampler over s. The first step
// run and the final step (to σ = 0) are first order; with LowerOrderFinal
// set and fewer than 15 steps the final step is first order too (it is
// anyway, as the final sigma is zero).
func NewDPMSolver2M(s *Schedule, o SamplerOptions) (*DPMSolver2M, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	T := s.T()
	last := T
	if s.LambdaMinClipped != nil {
		last = LastTimestepDPMSolver(s.AlphasCumprod, *s.LambdaMinClipped)
	}
	its, err := timestepsDPMSolver(T, last, o.Steps, s.TimestepSpacing, s.StepsOffset)
	if err != nil {
		return nil, fmt.Errorf("dpm-solver++ 2m: %w", err)
	}
	ts := make([]float64, len(its))
	sig := make([]float64, len(its))
	for i, t := range its {
		if t < 0 || t >= T {
			return nil, fmt.Errorf("dpm-solver++ 2m: timestep %d outside [0, %d) (steps_offset %d)", t, T, s.StepsOffset)
		}
		ts[i], sig[i] = float64(t), SigmaOf(s.AlphasCumprod[t])
	}
	p, err := newPlan(s, o, ts, sig)
	if err != nil {
		return nil, fmt.Errorf("dpm-solver++ 2m: %w", err)
	}
	// The last step goes to σ = 0 (ᾱ = 1), or with final_sigmas_type
	// sigma_min to the training schedule's first ᾱ.
	final := 1.0
	if s.FinalSigmaMin {
		final = s.AlphasCumprod[0]
	}
	p.abar = append(p.abar, final)
	// The last step is first order with a zero final sigma, at
	// euler_at_final, and with lower_order_final below 15 steps, as in
	// diffusers (which counts every step of the schedule).
	firstOrderFinal := !s.FinalSigmaMin || s.EulerAtFinal || s.LowerOrderFinal && len(its) < 15
	return &DPMSolver2M{plan: p, firstOrderFinal: firstOrderFinal}, nil
}

// InputScale is 1: the state is the model input.
func (d *DPMSolver2M) InputScale(int) float64 { return 1 }

// InitNoiseSigma is 1.
func (d *DPMSolver2M) InitNoiseSigma() float64 { return 1 }

// AddNoise writes α_0·x0 + σ_0·noise.
func (d *DPMSolver2M) AddNoise(dst, x0, noise []float32) error { return addNoise(d, dst, x0, noise) }

// Reset forgets the previous x0.
func (d *DPMSolver2M) Reset() { d.havePrev = false }

// Step applies the DPM-Solver++ update from λ_s = log(α_s/σ_s) to λ_t with
// h = λ_t − λ_s:
//
//	first order:  x ← (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·x0
//	second order: r = h_prev/h, D1 = (x0 − x0_prev)/r,
//	              x ← (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·(x0 + D1/2)
//
// where h_prev = λ_s − λ_{s−1}. The canvas is stepped as one row of one
// channel.
func (d *DPMSolver2M) Step(i int, x, x0 []float32) error {
	return d.StepRows(i, x, x0, 1, 1, len(x), 0, 1)
}

// StepRows is Step for rows [y0, y1) of every channel; the previous x0 is
// kept per row, so rows may be at different steps.
func (d *DPMSolver2M) StepRows(i int, x, x0 []float32, c, h, w, y0, y1 int) error {
	if err := d.checkStep("dpm-solver++ 2m", i); err != nil {
		return err
	}
	if i > 0 && !d.havePrev {
		return fmt.Errorf("dpm-solver++ 2m: step %d without step %d before it", i, i-1)
	}
	if err := checkRows("dpm-solver++ 2m", x, x0, c, h, w, y0, y1); err != nil {
		return err
	}
	prev := d.prevBuffer(len(x))
	for ch := 0; ch < c; ch++ {
		lo, hi := ch*h*w+y0*w, ch*h*w+y1*w
		d.step(i, x[lo:hi], x0[lo:hi], prev[lo:hi])
	}
	return nil
}

// prevBuffer is the canvas-sized store of the previous step's x0.
func (d *DPMSolver2M) prevBuffer(n int) []float32 {
	if len(d.prev) != n {
		d.prev = make([]float32, n)
	}
	return d.prev
}

// step updates x elementwise and leaves x0 in prev for the next step.
func (d *DPMSolver2M) step(i int, x, x0, prev []float32) {
	ls, lt := LevelFromAlphaBar(d.abar[i]), LevelFromAlphaBar(d.abar[i+1])
	final := i == len(d.ts)-1
	// First order on the first step run and, where NewDPMSolver2M says so,
	// on the final one.
	firstOrder := i == 0 || final && d.firstOrderFinal
	x0, prev = x0[:len(x)], prev[:len(x)]
	if lt.Sigma == 0 {
		// σ_t = 0: λ_t = ∞, e^{−h} = 0 and the update is x ← x0.
		copy(x, x0)
	} else {
		lambda := func(l Level) float64 { return math.Log(l.Alpha) - math.Log(l.Sigma) }
		h := lambda(lt) - lambda(ls)
		cx := float32(lt.Sigma / ls.Sigma)
		c0 := float32(-lt.Alpha * math.Expm1(-h))
		if firstOrder {
			for j := range x {
				x[j] = cx*x[j] + c0*x0[j]
			}
		} else {
			lp := LevelFromAlphaBar(d.abar[i-1])
			r := (lambda(ls) - lambda(lp)) / h
			c1 := float32(0.5 / r)
			for j := range x {
				d1 := x0[j] - prev[j]
				x[j] = cx*x[j] + c0*(x0[j]+c1*d1)
			}
		}
	}
	copy(prev, x0)
	d.havePrev = true
}

// addNoise writes the state at step 0 for a clean image and unit noise:
// (α·x0 + σ·noise)/InputScale(0).
func addNoise(s Sampler, dst, x0, noise []float32) error {
	if err := checkCanvas("add noise", dst, x0, noise); err != nil {
		return err
	}
	if s.Len() == 0 {
		return fmt.Errorf("add noise: sampler has no steps")
	}
	lv := s.Level(0)
	sc := s.InputScale(0)
	a, b := float32(lv.Alpha/sc), float32(lv.Sigma/sc)
	for j := range dst {
		dst[j] = a*x0[j] + b*noise[j]
	}
	return nil
}

// NewSampler returns the sampler named kind: "ddim", "euler" or
// "dpm++2m" (also "dpmsolver++2m", "dpm_solver_2m").
func NewSampler(kind string, s *Schedule, o SamplerOptions) (Sampler, error) {
	switch kind {
	case "ddim":
		return NewDDIM(s, o)
	case "euler":
		return NewEuler(s, o)
	case "dpm++2m", "dpmsolver++2m", "dpm_solver_2m":
		return NewDPMSolver2M(s, o)
	}
	return nil, fmt.Errorf("unknown sampler %q (want ddim, euler or dpm++2m)", kind)
}

// SamplerClass returns the diffusers scheduler class whose defaults apply to
// a sampler kind, for ParseSchedulerConfigAs.
func SamplerClass(kind string) (string, error) {
	switch kind {
	case "ddim":
		return ClassDDIM, nil
	case "euler":
		return ClassEuler, nil
	case "dpm++2m", "dpmsolver++2m", "dpm_solver_2m":
		return ClassDPMSolver, nil
	}
	return "", fmt.Errorf("unknown sampler %q (want ddim, euler or dpm++2m)", kind)
}
