package stages

import (
	"math"
	"slices"
	"strings"
	"testing"
)

// Level is torch.quantile of |x0| (linear interpolation at q·(n−1)),
// clamped to [1, max]; checked against a sort on random images.
func TestThresholdLevelIsTheQuantile(t *testing.T) {
	for _, n := range []int{1, 2, 7, 100, 1001} {
		x := make([]float32, n)
		(Noise{Seed: uint64(n)}).Fill(x, 0, 1, 0, 0, 1, n)
		for i := range x {
			x[i] *= 3
		}
		for _, ratio := range []float64{0.5, 0.9, 0.95, 0.995, 1} {
			th := Thresholding{Ratio: ratio, MaxValue: 2.5}
			abs := make([]float64, n)
			for i, v := range x {
				abs[i] = math.Abs(float64(v))
			}
			slices.Sort(abs)
			pos := ratio * float64(n-1)
			lo := int(math.Floor(pos))
			q := abs[lo]
			if lo+1 < n {
				q += (pos - float64(lo)) * (abs[lo+1] - abs[lo])
			}
			want := math.Min(math.Max(q, 1), 2.5)
			got, err := th.Level(x)
			if err != nil || math.Abs(got-want) > 1e-6 {
				t.Errorf("n %d ratio %g: level %g, want %g (%v)", n, ratio, got, want, err)
			}
			y := slices.Clone(x)
			th.Apply(y, got)
			for i, v := range y {
				if w := math.Min(math.Max(float64(x[i]), -got), got) / got; math.Abs(float64(v)-w) > 1e-6 {
					t.Fatalf("apply: %g, want %g", v, w)
				}
			}
		}
	}
	if _, err := (Thresholding{Ratio: 0, MaxValue: 1}).Level([]float32{1}); err == nil {
		t.Error("ratio 0 accepted")
	}
}

// A scheduler config with thresholding is read (IF's), the euler sampler
// refuses it by name, and thresholding replaces clipping.
func TestSchedulerConfigThresholding(t *testing.T) {
	cfg := []byte(`{"_class_name": "DDPMScheduler", "thresholding": true, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5, "clip_sample": true, "variance_type": "learned_range", "beta_schedule": "squaredcos_cap_v2"}`)
	c, err := ParseSchedulerConfigAs(cfg, ClassDDIM)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Schedule()
	if err != nil || s.Thresholding == nil || s.Thresholding.Ratio != 0.95 || s.Thresholding.MaxValue != 1.5 || s.ClipSample {
		t.Fatalf("schedule %+v, %v", s, err)
	}
	if _, err := ParseSchedulerConfigAs(cfg, ClassEuler); err == nil || !strings.Contains(err.Error(), "thresholding") {
		t.Errorf("euler with thresholding: %v", err)
	}
}
