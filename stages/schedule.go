package stages

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"sort"
)

// BetaSchedule names how the training betas were laid out (diffusers'
// beta_schedule).
type BetaSchedule string

// Beta schedules understood by Betas.
const (
	BetaLinear       BetaSchedule = "linear"            // linspace(beta_start, beta_end, T)
	BetaScaledLinear BetaSchedule = "scaled_linear"     // linspace(√beta_start, √beta_end, T)²
	BetaCosine       BetaSchedule = "squaredcos_cap_v2" // betas_for_alpha_bar with the cosine ᾱ, max_beta 0.999
)

// Spacing names how inference timesteps are picked from the training range
// (diffusers' timestep_spacing).
type Spacing string

// Timestep spacings.
const (
	SpacingLeading  Spacing = "leading"
	SpacingLinspace Spacing = "linspace"
	SpacingTrailing Spacing = "trailing"
)

// PredictionType names what the model outputs (diffusers' prediction_type).
type PredictionType string

// Prediction types.
const (
	PredEpsilon PredictionType = "epsilon"      // the noise ε
	PredV       PredictionType = "v_prediction" // v = α·ε − σ·x0
	PredSample  PredictionType = "sample"       // x0 itself
)

func (p PredictionType) valid() bool {
	return p == PredEpsilon || p == PredV || p == PredSample
}

// Betas returns the T training betas of the named schedule, computed in
// float64. beta_start and beta_end are ignored by the cosine schedule.
func Betas(kind BetaSchedule, T int, betaStart, betaEnd float64) ([]float64, error) {
	if T < 2 {
		return nil, fmt.Errorf("betas: num_train_timesteps %d, want at least 2", T)
	}
	b := make([]float64, T)
	switch kind {
	case BetaLinear:
		copy(b, linspace(betaStart, betaEnd, T))
	case BetaScaledLinear:
		for i, v := range linspace(math.Sqrt(betaStart), math.Sqrt(betaEnd), T) {
			b[i] = v * v
		}
	case BetaCosine:
		// diffusers betas_for_alpha_bar(T, max_beta=0.999, alpha_transform_type="cosine").
		abar := func(t float64) float64 {
			c := math.Cos((t + 0.008) / 1.008 * math.Pi / 2)
			return c * c
		}
		for i := range b {
			t1, t2 := float64(i)/float64(T), float64(i+1)/float64(T)
			b[i] = math.Min(1-abar(t2)/abar(t1), 0.999)
		}
	default:
		return nil, fmt.Errorf("betas: unknown beta_schedule %q (want linear, scaled_linear or squaredcos_cap_v2)", kind)
	}
	for i, v := range b {
		if !(v > 0 && v < 1) {
			return nil, fmt.Errorf("betas: beta[%d] = %g is outside (0, 1)", i, v)
		}
	}
	return b, nil
}

// AlphasCumprod returns ᾱ_t = ∏_{s≤t} (1 − β_s) in float64.
func AlphasCumprod(betas []float64) []float64 {
	out := make([]float64, len(betas))
	p := 1.0
	for i, b := range betas {
		p *= 1 - b
		out[i] = p
	}
	return out
}

// linspace is numpy.linspace(start, stop, num) with endpoint=True, computed
// as numpy does (i·step + start, the last value set to stop) so that rounding
// the result matches numpy bit for bit.
func linspace(start, stop float64, num int) []float64 {
	out := make([]float64, num)
	if num == 1 {
		out[0] = start
		return out
	}
	step := (stop - start) / float64(num-1)
	for i := range out {
		out[i] = float64(i)*step + start
	}
	out[num-1] = stop
	return out
}

// arange is numpy.arange(start, stop, step) for floats: ceil((stop−start)/step)
// values start + i·delta, with delta = (start+step) − start as numpy's fill
// computes it.
func arange(start, stop, step float64) []float64 {
	n := int(math.Ceil((stop - start) / step))
	if n <= 0 {
		return nil
	}
	out := make([]float64, n)
	delta := (start + step) - start
	for i := range out {
		out[i] = start + float64(i)*delta
	}
	return out
}

func checkSteps(T, n int) error {
	if n < 1 || n > T {
		return fmt.Errorf("timesteps: %d inference steps, want 1 to num_train_timesteps (%d)", n, T)
	}
	return nil
}

// TimestepsDDIM returns the n inference timesteps, descending, as
// DDIMScheduler.set_timesteps computes them (DDPMScheduler and PNDMScheduler
// use the same formulas):
//
//	leading:  (arange(n) · (T//n)).round()[::-1] + steps_offset
//	linspace: linspace(0, T−1, n).round()[::-1]
//	trailing: round(arange(T, 0, −T/n)) − 1
//
// Rounding is numpy's, half to even.
func TimestepsDDIM(T, n int, spacing Spacing, stepsOffset int) ([]int, error) {
	if err := checkSteps(T, n); err != nil {
		return nil, err
	}
	out := make([]int, n)
	switch spacing {
	case SpacingLeading:
		r := T / n
		for i := range out {
			out[i] = (n-1-i)*r + stepsOffset
		}
	case SpacingLinspace:
		v := linspace(0, float64(T-1), n)
		for i := range out {
			out[i] = int(math.RoundToEven(v[n-1-i]))
		}
	case SpacingTrailing:
		v := arange(float64(T), 0, -float64(T)/float64(n))
		if len(v) != n {
			return nil, fmt.Errorf("timesteps: trailing spacing gives %d steps for %d", len(v), n)
		}
		for i := range out {
			out[i] = int(math.RoundToEven(v[i])) - 1
		}
	default:
		return nil, fmt.Errorf("timesteps: unknown timestep_spacing %q", spacing)
	}
	return out, nil
}

// TimestepsEuler returns the n inference timesteps, descending, as
// EulerDiscreteScheduler.set_timesteps computes them. They are float32 values
// and, for linspace, not rounded (the sigma is interpolated linearly between
// training timesteps):
//
//	leading:  (arange(n) · (T//n)).round()[::-1] + steps_offset
//	linspace: linspace(0, T−1, n, dtype=float32)[::-1]
//	trailing: arange(T, 0, −T/n).round() − 1
func TimestepsEuler(T, n int, spacing Spacing, stepsOffset int) ([]float64, error) {
	if err := checkSteps(T, n); err != nil {
		return nil, err
	}
	out := make([]float64, n)
	switch spacing {
	case SpacingLeading:
		r := T / n
		for i := range out {
			out[i] = float64((n-1-i)*r + stepsOffset)
		}
	case SpacingLinspace:
		v := linspace(0, float64(T-1), n)
		for i := range out {
			out[i] = float64(float32(v[n-1-i]))
		}
	case SpacingTrailing:
		v := arange(float64(T), 0, -float64(T)/float64(n))
		if len(v) != n {
			return nil, fmt.Errorf("timesteps: trailing spacing gives %d steps for %d", len(v), n)
		}
		for i := range out {
			out[i] = math.RoundToEven(v[i]) - 1
		}
	default:
		return nil, fmt.Errorf("timesteps: unknown timestep_spacing %q", spacing)
	}
	return out, nil
}

// TimestepsDPMSolver returns the n inference timesteps, descending, as
// DPMSolverMultistepScheduler.set_timesteps computes them, with last the
// last_timestep that lambda_min_clipped leaves (T when it is −inf): n+1
// points of which the last (0) is dropped:
//
//	leading:  (arange(n+1) · (last//(n+1))).round()[::-1][:-1] + steps_offset
//	linspace: linspace(0, last−1, n+1).round()[::-1][:-1]
//	trailing: arange(last, 0, −T/n).round() − 1
func TimestepsDPMSolver(T, n int, spacing Spacing, stepsOffset int) ([]int, error) {
	return timestepsDPMSolver(T, T, n, spacing, stepsOffset)
}

// LastTimestepDPMSolver is diffusers' last_timestep: T less the number of
// training timesteps whose λ = log(√ᾱ) − log(√(1−ᾱ)) is below lambdaMin.
func LastTimestepDPMSolver(abar []float64, lambdaMin float64) int {
	n := 0
	for _, a := range abar {
		if 0.5*math.Log(a)-0.5*math.Log(1-a) < lambdaMin {
			n++
		}
	}
	return len(abar) - n
}

func timestepsDPMSolver(T, last, n int, spacing Spacing, stepsOffset int) ([]int, error) {
	if err := checkSteps(T, n); err != nil {
		return nil, err
	}
	if last < n+1 {
		return nil, fmt.Errorf("timesteps: lambda_min_clipped leaves %d training timesteps for %d steps", last, n)
	}
	if last < T && spacing == SpacingTrailing {
		return nil, fmt.Errorf("timesteps: lambda_min_clipped with timestep_spacing trailing is not supported")
	}
	out := make([]int, n)
	switch spacing {
	case SpacingLeading:
		r := last / (n + 1)
		for i := range out {
			out[i] = (n-i)*r + stepsOffset
		}
	case SpacingLinspace:
		v := linspace(0, float64(last-1), n+1)
		for i := range out {
			out[i] = int(math.RoundToEven(v[n-i]))
		}
	case SpacingTrailing:
		v := arange(float64(last), 0, -float64(T)/float64(n))
		if len(v) != n {
			return nil, fmt.Errorf("timesteps: trailing spacing gives %d steps for %d", len(v), n)
		}
		for i := range out {
			out[i] = int(math.RoundToEven(v[i])) - 1
		}
	default:
		return nil, fmt.Errorf("timesteps: unknown timestep_spacing %q", spacing)
	}
	return out, nil
}

// Schedule is a trained noise schedule with the options that shape
// sampling. Samplers read it; they never change it.
type Schedule struct {
	// AlphasCumprod holds ᾱ_t for the training timesteps t = 0..T−1.
	AlphasCumprod []float64
	// TimestepSpacing and StepsOffset pick the inference timesteps.
	TimestepSpacing Spacing
	StepsOffset     int
	// Prediction is what the model outputs.
	Prediction PredictionType
	// ClipSample clamps the predicted x0 to ±ClipSampleRange (DDIM only, as
	// in diffusers).
	ClipSample      bool
	ClipSampleRange float64
	// SetAlphaToOne makes DDIM's last step go to ᾱ = 1 instead of ᾱ_0.
	SetAlphaToOne bool
	// LowerOrderFinal makes DPM-Solver++ take first-order steps at the end
	// of runs shorter than 15 steps. Its final step is first order anyway,
	// as the final sigma is zero.
	LowerOrderFinal bool
	// FinalSigmaMin makes DPM-Solver's last step go to σ_min (ᾱ[0], the
	// final_sigmas_type sigma_min of older diffusers) instead of σ = 0;
	// EulerAtFinal makes that step first order; LambdaMinClipped drops the
	// timesteps whose λ = log(α/σ) is below it (nil: none).
	FinalSigmaMin    bool
	EulerAtFinal     bool
	LambdaMinClipped *float64
	// Thresholding, when set, thresholds the predicted x0 of the whole
	// canvas at every step (the pipeline applies it: see Threshold).
	Thresholding *Thresholding
	// Shift is the resolution-dependent schedule shift s; 0 and 1 mean off.
	// It multiplies every sampling sigma σ = √((1−ᾱ)/ᾱ) by s (log-SNR
	// lowered by 2·ln s), which is the SD3 shift σ' = s·σ_f/(1+(s−1)·σ_f) of
	// σ_f = √(1−ᾱ)/(√ᾱ+√(1−ᾱ)); the model then gets the (fractional)
	// training timestep whose sigma is the shifted one. It is a plain number
	// so that pipelines can record it.
	Shift float64
}

// T returns the number of training timesteps.
func (s *Schedule) T() int { return len(s.AlphasCumprod) }

// ShiftFactor returns the effective shift (1 when Shift is 0).
func (s *Schedule) ShiftFactor() float64 {
	if s.Shift == 0 {
		return 1
	}
	return s.Shift
}

func (s *Schedule) validate() error {
	if len(s.AlphasCumprod) < 2 {
		return fmt.Errorf("schedule: %d training timesteps, want at least 2", len(s.AlphasCumprod))
	}
	prev := 1.0
	for i, a := range s.AlphasCumprod {
		if !(a > 0 && a < prev) {
			return fmt.Errorf("schedule: alphas_cumprod[%d] = %g, want decreasing values in (0, 1)", i, a)
		}
		prev = a
	}
	if !s.Prediction.valid() {
		return fmt.Errorf("schedule: unknown prediction_type %q", s.Prediction)
	}
	if sh := s.ShiftFactor(); !(sh > 0) || math.IsInf(sh, 0) {
		return fmt.Errorf("schedule: shift %g, want a positive number", s.Shift)
	}
	if s.ClipSample && !(s.ClipSampleRange > 0) {
		return fmt.Errorf("schedule: clip_sample_range %g, want > 0", s.ClipSampleRange)
	}
	return nil
}

// SigmaOf returns the k-diffusion sigma √((1−ᾱ)/ᾱ) of ᾱ.
func SigmaOf(abar float64) float64 { return math.Sqrt((1 - abar) / abar) }

// AlphaBarOf returns ᾱ = 1/(1+σ²) of the k-diffusion sigma σ.
func AlphaBarOf(sigma float64) float64 { return 1 / (1 + sigma*sigma) }

// SigmaToTimestep returns the fractional training timestep whose sigma is
// sigma, interpolating log σ linearly between training timesteps and clamping
// to [0, T−1] (diffusers' _sigma_to_t).
func (s *Schedule) SigmaToTimestep(sigma float64) float64 {
	T := len(s.AlphasCumprod)
	ls := math.Log(math.Max(sigma, 1e-10))
	logSigma := func(t int) float64 { return math.Log(SigmaOf(s.AlphasCumprod[t])) }
	// First t with logSigma(t) > ls; sigmas increase with t.
	hi := sort.Search(T, func(t int) bool { return logSigma(t) > ls })
	if hi == 0 {
		return 0
	}
	if hi == T {
		return float64(T - 1)
	}
	lo := hi - 1
	a, b := logSigma(lo), logSigma(hi)
	w := (ls - a) / (b - a)
	return float64(lo) + w
}

// shifted returns the model timestep and ᾱ for training timestep t (possibly
// fractional, its sigma given) after the shift. Without a shift both come back
// unchanged.
func (s *Schedule) shifted(t, sigma float64) (float64, float64) {
	sh := s.ShiftFactor()
	if sh == 1 {
		return t, AlphaBarOf(sigma)
	}
	sig := sh * sigma
	return s.SigmaToTimestep(sig), AlphaBarOf(sig)
}

// sigmaAt interpolates the training sigmas linearly at fractional timestep t
// (numpy.interp over arange(T)).
func (s *Schedule) sigmaAt(t float64) float64 {
	T := len(s.AlphasCumprod)
	if t <= 0 {
		return SigmaOf(s.AlphasCumprod[0])
	}
	if t >= float64(T-1) {
		return SigmaOf(s.AlphasCumprod[T-1])
	}
	i := int(t)
	f := t - float64(i)
	a, b := SigmaOf(s.AlphasCumprod[i]), SigmaOf(s.AlphasCumprod[i+1])
	if f == 0 {
		return a
	}
	return a + (b-a)*f
}

// SchedulerConfig holds the keys of a diffusers scheduler_config.json that
// Tessera uses, after defaults are applied.
type SchedulerConfig struct {
	ClassName         string    `json:"_class_name"`
	NumTrainTimesteps int       `json:"num_train_timesteps"`
	BetaSchedule      string    `json:"beta_schedule"`
	BetaStart         float64   `json:"beta_start"`
	BetaEnd           float64   `json:"beta_end"`
	TrainedBetas      []float64 `json:"trained_betas"`
	PredictionType    string    `json:"prediction_type"`
	TimestepSpacing   string    `json:"timestep_spacing"`
	StepsOffset       int       `json:"steps_offset"`
	ClipSample        bool      `json:"clip_sample"`
	ClipSampleRange   float64   `json:"clip_sample_range"`
	SetAlphaToOne     bool      `json:"set_alpha_to_one"`
	LowerOrderFinal   bool      `json:"lower_order_final"`
	// Thresholding is dynamic thresholding of the predicted x0 (Imagen,
	// DeepFloyd IF): see Threshold.
	Thresholding bool `json:"thresholding"`
	// DPM-Solver's: where its last step goes (zero or sigma_min), whether
	// it is an Euler step, and the λ below which timesteps are cut.
	FinalSigmasType          string  `json:"final_sigmas_type"`
	EulerAtFinal             bool    `json:"euler_at_final"`
	LambdaMinClipped         float64 `json:"lambda_min_clipped"`
	DynamicThresholdingRatio float64 `json:"dynamic_thresholding_ratio"`
	SampleMaxValue           float64 `json:"sample_max_value"`
	// Shift is Tessera's schedule shift (key "shift"); 1 when absent.
	Shift float64 `json:"shift"`
}

// Scheduler class names whose defaults are known.
const (
	ClassDDIM       = "DDIMScheduler"
	ClassEuler      = "EulerDiscreteScheduler"
	ClassDPMSolver  = "DPMSolverMultistepScheduler"
	ClassDDPM       = "DDPMScheduler"
	ClassPNDM       = "PNDMScheduler"
	defaultClass    = ClassDDPM
	maxConfigBytes  = 1 << 20
	maxTrainedBetas = 100000
)

// SchedulerDefaults returns the constructor defaults of a diffusers
// scheduler class. They differ: DDIM and DDPM clip x0 by default
// (clip_sample=True) while the others do not; DDIM sets the final ᾱ to one
// (set_alpha_to_one=True) while PNDM does not; DDIM, DDPM and PNDM space
// timesteps "leading" while Euler and DPM-Solver use "linspace".
func SchedulerDefaults(class string) (SchedulerConfig, error) {
	c := SchedulerConfig{
		DynamicThresholdingRatio: 0.995,
		SampleMaxValue:           1.0,
		ClassName:                class,
		NumTrainTimesteps:        1000,
		BetaSchedule:             string(BetaLinear),
		BetaStart:                0.0001,
		BetaEnd:                  0.02,
		PredictionType:           string(PredEpsilon),
		ClipSampleRange:          1,
		Shift:                    1,
		FinalSigmasType:          "zero",
		LambdaMinClipped:         math.Inf(-1),
	}
	switch class {
	case ClassDDIM:
		c.TimestepSpacing, c.ClipSample, c.SetAlphaToOne = string(SpacingLeading), true, true
	case ClassDDPM:
		c.TimestepSpacing, c.ClipSample = string(SpacingLeading), true
	case ClassPNDM:
		c.TimestepSpacing = string(SpacingLeading)
	case ClassEuler:
		c.TimestepSpacing = string(SpacingLinspace)
	case ClassDPMSolver:
		c.TimestepSpacing, c.LowerOrderFinal = string(SpacingLinspace), true
	default:
		return SchedulerConfig{}, fmt.Errorf("scheduler config: unsupported _class_name %q (want %s, %s, %s, %s or %s)",
			class, ClassDDIM, ClassEuler, ClassDPMSolver, ClassDDPM, ClassPNDM)
	}
	return c, nil
}

// ParseSchedulerConfig reads a diffusers scheduler_config.json. Keys it
// lacks take the defaults of the class named by _class_name (DDPMScheduler
// when absent); unknown keys are ignored, as diffusers does, except options
// that change the schedule and are not implemented (rescale_betas_zero_snr,
// use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, thresholding),
// which are errors when true.
func ParseSchedulerConfig(data []byte) (SchedulerConfig, error) {
	return ParseSchedulerConfigAs(data, "")
}

// ParseSchedulerConfigAs reads a diffusers scheduler_config.json the way
// diffusers' Class.from_config does when a pipeline swaps schedulers: keys
// present in the file win, missing keys take the defaults of class (or of the
// file's own _class_name when class is empty).
func ParseSchedulerConfigAs(data []byte, class string) (SchedulerConfig, error) {
	if len(data) > maxConfigBytes {
		return SchedulerConfig{}, fmt.Errorf("scheduler config: %d bytes, limit %d", len(data), maxConfigBytes)
	}
	var raw map[string]json.RawMessage
	// Python's json writes -Infinity, Infinity and NaN (lambda_min_clipped
	// is -Infinity in many shipped configs); JSON has no such literals.
	if err := json.Unmarshal(pythonJSON(data), &raw); err != nil {
		return SchedulerConfig{}, fmt.Errorf("scheduler config: %w", err)
	}
	if class == "" {
		class = defaultClass
		if v, ok := raw["_class_name"]; ok {
			if err := json.Unmarshal(v, &class); err != nil {
				return SchedulerConfig{}, fmt.Errorf("scheduler config: key _class_name: %w", err)
			}
		}
	}
	c, err := SchedulerDefaults(class)
	if err != nil {
		return SchedulerConfig{}, err
	}
	fields := map[string]any{
		"num_train_timesteps":        &c.NumTrainTimesteps,
		"beta_schedule":              &c.BetaSchedule,
		"beta_start":                 &c.BetaStart,
		"beta_end":                   &c.BetaEnd,
		"trained_betas":              &c.TrainedBetas,
		"prediction_type":            &c.PredictionType,
		"timestep_spacing":           &c.TimestepSpacing,
		"steps_offset":               &c.StepsOffset,
		"clip_sample":                &c.ClipSample,
		"clip_sample_range":          &c.ClipSampleRange,
		"set_alpha_to_one":           &c.SetAlphaToOne,
		"lower_order_final":          &c.LowerOrderFinal,
		"thresholding":               &c.Thresholding,
		"final_sigmas_type":          &c.FinalSigmasType,
		"euler_at_final":             &c.EulerAtFinal,
		"lambda_min_clipped":         (*pyFloat)(&c.LambdaMinClipped),
		"dynamic_thresholding_ratio": &c.DynamicThresholdingRatio,
		"sample_max_value":           &c.SampleMaxValue,
		"shift":                      &c.Shift,
	}
	for key, dst := range fields {
		v, ok := raw[key]
		if !ok || bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
			continue
		}
		if err := json.Unmarshal(v, dst); err != nil {
			return SchedulerConfig{}, fmt.Errorf("scheduler config: key %s: %w", key, err)
		}
	}
	// Options that would change the numbers but are not implemented are
	// refused rather than ignored.
	for _, key := range []string{"rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"} {
		var on bool
		if v, ok := raw[key]; ok && json.Unmarshal(v, &on) == nil && on {
			return SchedulerConfig{}, fmt.Errorf("scheduler config: key %s: true is not supported", key)
		}
	}
	if err := c.checkClassKeys(raw, class); err != nil {
		return SchedulerConfig{}, err
	}
	if c.Thresholding && class == ClassEuler {
		return SchedulerConfig{}, fmt.Errorf("scheduler config: key thresholding: true, which the euler sampler does not do (diffusers' EulerDiscreteScheduler has no thresholding): use ddim or dpm++2m")
	}
	if _, err := c.Schedule(); err != nil {
		return SchedulerConfig{}, err
	}
	return c, nil
}

// Schedule builds the Schedule the config describes.
func (c SchedulerConfig) Schedule() (*Schedule, error) {
	var betas []float64
	if len(c.TrainedBetas) > 0 {
		if len(c.TrainedBetas) > maxTrainedBetas {
			return nil, fmt.Errorf("scheduler config: %d trained_betas, limit %d", len(c.TrainedBetas), maxTrainedBetas)
		}
		betas = append([]float64(nil), c.TrainedBetas...)
	} else {
		if c.NumTrainTimesteps < 2 || c.NumTrainTimesteps > maxTrainedBetas {
			return nil, fmt.Errorf("scheduler config: num_train_timesteps %d, want 2 to %d", c.NumTrainTimesteps, maxTrainedBetas)
		}
		var err error
		if betas, err = Betas(BetaSchedule(c.BetaSchedule), c.NumTrainTimesteps, c.BetaStart, c.BetaEnd); err != nil {
			return nil, fmt.Errorf("scheduler config: %w", err)
		}
	}
	switch Spacing(c.TimestepSpacing) {
	case SpacingLeading, SpacingLinspace, SpacingTrailing:
	default:
		return nil, fmt.Errorf("scheduler config: unknown timestep_spacing %q", c.TimestepSpacing)
	}
	if c.StepsOffset < 0 {
		return nil, fmt.Errorf("scheduler config: steps_offset %d, want >= 0", c.StepsOffset)
	}
	s := &Schedule{
		AlphasCumprod:   AlphasCumprod(betas),
		TimestepSpacing: Spacing(c.TimestepSpacing),
		StepsOffset:     c.StepsOffset,
		Prediction:      PredictionType(c.PredictionType),
		ClipSample:      c.ClipSample,
		ClipSampleRange: c.ClipSampleRange,
		SetAlphaToOne:   c.SetAlphaToOne,
		LowerOrderFinal: c.LowerOrderFinal,
		Shift:           c.Shift,
		FinalSigmaMin:   c.FinalSigmasType == "sigma_min",
		EulerAtFinal:    c.EulerAtFinal,
	}
	if !math.IsInf(c.LambdaMinClipped, -1) {
		v := c.LambdaMinClipped
		s.LambdaMinClipped = &v
	}
	if c.Thresholding {
		// As in diffusers: thresholding replaces clipping.
		s.ClipSample = false
		s.Thresholding = &Thresholding{Ratio: c.DynamicThresholdingRatio, MaxValue: c.SampleMaxValue}
		if !(s.Thresholding.Ratio > 0 && s.Thresholding.Ratio <= 1) || !(s.Thresholding.MaxValue > 0) {
			return nil, fmt.Errorf("scheduler config: thresholding needs dynamic_thresholding_ratio in (0, 1] and sample_max_value > 0, got %g and %g", c.DynamicThresholdingRatio, c.SampleMaxValue)
		}
	}
	if err := s.validate(); err != nil {
		return nil, fmt.Errorf("scheduler config: %w", err)
	}
	return s, nil
}

// checkClassKeys refuses, by name, the keys of the file that would change
// the numbers of class's sampler and that it does not implement; keys of
// other classes are ignored, as diffusers' from_config ignores them.
func (c SchedulerConfig) checkClassKeys(raw map[string]json.RawMessage, class string) error {
	str := func(key string) (string, bool) {
		var v string
		b, ok := raw[key]
		if !ok || json.Unmarshal(b, &v) != nil {
			return "", false
		}
		return v, true
	}
	refuse := func(key, value, why string) error {
		return fmt.Errorf("scheduler config: key %s: %s is not supported by the %s sampler (%s)", key, value, class, why)
	}
	switch class {
	case ClassDPMSolver:
		if v, ok := str("algorithm_type"); ok && v != "dpmsolver++" && v != "deis" {
			return refuse("algorithm_type", v, "Tessera's is dpmsolver++")
		}
		if v, ok := str("solver_type"); ok && v != "midpoint" && v != "logrho" && v != "bh1" && v != "bh2" {
			return refuse("solver_type", v, "Tessera's is midpoint")
		}
		if b, ok := raw["solver_order"]; ok {
			var n int
			if json.Unmarshal(b, &n) != nil || n != 2 {
				return refuse("solver_order", string(b), "Tessera's is 2")
			}
		}
		if c.FinalSigmasType != "zero" && c.FinalSigmasType != "sigma_min" {
			return refuse("final_sigmas_type", c.FinalSigmasType, "want zero or sigma_min")
		}
		var on bool
		if b, ok := raw["use_lu_lambdas"]; ok && json.Unmarshal(b, &on) == nil && on {
			return refuse("use_lu_lambdas", "true", "uniform log-SNR steps are not implemented")
		}
	case ClassEuler:
		if v, ok := str("final_sigmas_type"); ok && v != "zero" {
			return refuse("final_sigmas_type", v, "its last step goes to sigma 0")
		}
		if v, ok := str("timestep_type"); ok && v != "discrete" {
			return refuse("timestep_type", v, "its timesteps are discrete")
		}
		if v, ok := str("interpolation_type"); ok && v != "linear" {
			return refuse("interpolation_type", v, "its sigmas are interpolated linearly")
		}
		for _, key := range []string{"sigma_min", "sigma_max"} {
			if b, ok := raw[key]; ok && string(bytes.TrimSpace(b)) != "null" {
				return refuse(key, string(b), "its sigmas come from the training schedule")
			}
		}
	}
	return nil
}

// pythonJSON turns the literals Python's json module writes and JSON lacks
// (NaN, Infinity, -Infinity), outside strings, into strings, which the
// fields that may hold them (lambda_min_clipped) read back.
func pythonJSON(data []byte) []byte {
	if !bytes.Contains(data, []byte("Infinity")) && !bytes.Contains(data, []byte("NaN")) {
		return data
	}
	var out bytes.Buffer
	inString, escaped := false, false
	for i := 0; i < len(data); i++ {
		b := data[i]
		if inString {
			out.WriteByte(b)
			switch {
			case escaped:
				escaped = false
			case b == '\\':
				escaped = true
			case b == '"':
				inString = false
			}
			continue
		}
		if b == '"' {
			inString = true
			out.WriteByte(b)
			continue
		}
		replaced := false
		for _, lit := range []string{"-Infinity", "Infinity", "NaN"} {
			if bytes.HasPrefix(data[i:], []byte(lit)) {
				out.WriteString(`"` + lit + `"`)
				i += len(lit) - 1
				replaced = true
				break
			}
		}
		if !replaced {
			out.WriteByte(b)
		}
	}
	return out.Bytes()
}

// pyFloat is a float a Python-written config may give as -Infinity,
// Infinity or NaN (strings after pythonJSON).
type pyFloat float64

func (f *pyFloat) UnmarshalJSON(b []byte) error {
	var s string
	if json.Unmarshal(b, &s) == nil {
		switch s {
		case "-Infinity":
			*f = pyFloat(math.Inf(-1))
		case "Infinity":
			*f = pyFloat(math.Inf(1))
		default:
			return fmt.Errorf("%q is not a number", s)
		}
		return nil
	}
	var v float64
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*f = pyFloat(v)
	return nil
}
