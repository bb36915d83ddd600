package stages

import (
	"fmt"
	"math"
	"strings"
	"testing"
)

var sprintf = fmt.Sprintf

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// diffusers' scheduler tests run each scheduler on a deterministic sample
// (dummy_sample_deter: the 4×3×8×8 values (767 − i)/768) with a dummy
// model, residual = sample · t/(t + 1), for 10 steps, and check the mean
// of |x| at the end. Every update is elementwise, so the values' order does
// not matter. These are their published expectations (tests/schedulers/
// test_scheduler_ddim.py and test_scheduler_dpm_multi.py), from the configs
// those tests build, read here as scheduler_config.json would give them.
func diffusersLoop(t *testing.T, class, config string, thresh *Thresholding) float64 {
	t.Helper()
	c, err := ParseSchedulerConfigAs([]byte(config), class)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Schedule()
	if err != nil {
		t.Fatal(err)
	}
	kind := map[string]string{ClassDDIM: "ddim", ClassDPMSolver: "dpm++2m"}[class]
	smp, err := NewSampler(kind, s, SamplerOptions{Steps: 10})
	if err != nil {
		t.Fatal(err)
	}
	const n = 4 * 3 * 8 * 8
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(n-1-i) / n
	}
	res, x0 := make([]float32, n), make([]float32, n)
	for i := 0; i < smp.Len(); i++ {
		tt := smp.Timestep(i)
		for j, v := range x {
			res[j] = float32(float64(v) * tt / (tt + 1))
		}
		if err := PredToX0(smp.Prediction(), smp.Level(i), x, res, x0); err != nil {
			t.Fatal(err)
		}
		if thresh != nil {
			if _, err := thresh.Threshold(x0); err != nil {
				t.Fatal(err)
			}
		}
		if err := smp.Step(i, x, x0); err != nil {
			t.Fatal(err)
		}
	}
	sum := 0.0
	for _, v := range x {
		sum += math.Abs(float64(v))
	}
	return sum / n
}

func TestDiffusersFullLoops(t *testing.T) {
	const ddim = `{"num_train_timesteps": 1000, "beta_start": %s, "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": true %s}`
	const dpm = `{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
		"solver_order": 2, "prediction_type": "%s", "thresholding": false, "sample_max_value": 1.0,
		"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": false,
		"final_sigmas_type": "%s", "lambda_min_clipped": -Infinity, "variance_type": null}`
	for _, c := range []struct {
		name, class, config string
		thresh              *Thresholding
		want                float64
	}{
		{"ddim", ClassDDIM, sprintf(ddim, "0.0001", ""), nil, 0.223967},
		{"ddim v_prediction", ClassDDIM, sprintf(ddim, "0.0001", `, "prediction_type": "v_prediction"`), nil, 0.0684},
		{"ddim set_alpha_to_one", ClassDDIM, sprintf(ddim, "0.01", `, "set_alpha_to_one": true`), nil, 0.1951},
		{"ddim no set_alpha_to_one", ClassDDIM, sprintf(ddim, "0.01", `, "set_alpha_to_one": false`), nil, 0.1941},
		// final_sigmas_type sigma_min: the last step goes to σ_min, second order.
		{"dpm++2m sigma_min", ClassDPMSolver, sprintf(dpm, "epsilon", "sigma_min"), nil, 0.3301},
		{"dpm++2m sigma_min v_prediction", ClassDPMSolver, sprintf(dpm, "v_prediction", "sigma_min"), nil, 0.2251},
		{"dpm++2m sigma_min thresholding", ClassDPMSolver, sprintf(dpm, "epsilon", "sigma_min"), &Thresholding{Ratio: 0.87, MaxValue: 0.5}, 1.1364},
		// zero (today's default): the last step goes to x0, first order.
		{"dpm++2m zero", ClassDPMSolver, sprintf(dpm, "epsilon", "zero"), nil, 0.2409},
		{"dpm++2m zero v_prediction", ClassDPMSolver, sprintf(dpm, "v_prediction", "zero"), nil, 0.0985},
	} {
		if got := diffusersLoop(t, c.class, c.config, c.thresh); math.Abs(got-c.want) > 1e-3 {
			t.Errorf("%s: mean |x| %.4f, want %.4f", c.name, got, c.want)
		}
	}
}

// The keys of a shipped config that would change the numbers and that the
// sampler does not implement are refused by name.
func TestSchedulerConfigRefusesByName(t *testing.T) {
	for _, c := range []struct{ class, config, key string }{
		{ClassDPMSolver, `{"solver_type": "heun"}`, "solver_type"},
		{ClassDPMSolver, `{"algorithm_type": "sde-dpmsolver++"}`, "algorithm_type"},
		{ClassDPMSolver, `{"solver_order": 3}`, "solver_order"},
		{ClassDPMSolver, `{"final_sigmas_type": "denoise_to_zero"}`, "final_sigmas_type"},
		{ClassDPMSolver, `{"use_lu_lambdas": true}`, "use_lu_lambdas"},
		{ClassEuler, `{"final_sigmas_type": "sigma_min"}`, "final_sigmas_type"},
		{ClassEuler, `{"timestep_type": "continuous"}`, "timestep_type"},
		{ClassEuler, `{"interpolation_type": "log_linear"}`, "interpolation_type"},
		{ClassDDIM, `{"rescale_betas_zero_snr": true}`, "rescale_betas_zero_snr"},
		{ClassDDIM, `{"use_karras_sigmas": true}`, "use_karras_sigmas"},
	} {
		_, err := ParseSchedulerConfigAs([]byte(c.config), c.class)
		if err == nil || !contains(err.Error(), c.key) {
			t.Errorf("%s %s: %v", c.class, c.config, err)
		}
	}
	// lambda_min_clipped cuts the timesteps whose λ is below it, as IF's
	// cosine configs need: with −5.1 on squaredcos_cap_v2 the first
	// timestep is below 999.
	c, err := ParseSchedulerConfigAs([]byte(`{"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}`), ClassDPMSolver)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := c.Schedule()
	d, err := NewDPMSolver2M(s, SamplerOptions{Steps: 10})
	if err != nil {
		t.Fatal(err)
	}
	last := LastTimestepDPMSolver(s.AlphasCumprod, -5.1)
	if last >= 1000 || d.Timestep(0) != float64(int(math.RoundToEven(float64(last-1)))) {
		t.Errorf("last timestep %d, first step at %g", last, d.Timestep(0))
	}
}

// euler_at_final makes the sigma_min final step first order: the same
// update lower_order_final gives it below 15 steps, and not the
// second-order one it has without either.
func TestDPMSolverEulerAtFinal(t *testing.T) {
	const base = `{"beta_schedule": "linear", "final_sigmas_type": "sigma_min", "lower_order_final": %s, "euler_at_final": %s}`
	euler := diffusersLoop(t, ClassDPMSolver, sprintf(base, "false", "true"), nil)
	lower := diffusersLoop(t, ClassDPMSolver, sprintf(base, "true", "false"), nil)
	second := diffusersLoop(t, ClassDPMSolver, sprintf(base, "false", "false"), nil)
	if math.Abs(euler-lower) > 1e-7 || math.Abs(euler-second) < 1e-4 {
		t.Errorf("euler_at_final %.6f, lower_order_final %.6f, neither %.6f", euler, lower, second)
	}
}
