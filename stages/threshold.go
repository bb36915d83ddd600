package stages

import (
	"fmt"
	"math"
)

// Thresholding is dynamic thresholding of the predicted x0 (Saharia et al.
// 2022, "Imagen"; diffusers' _threshold_sample): at every step the
// Ratio-quantile s of |x0| over the whole image, clamped to
// [1, MaxValue], bounds x0, which is then divided by s.
type Thresholding struct {
	Ratio    float64 // dynamic_thresholding_ratio
	MaxValue float64 // sample_max_value
}

// Thresholder is a sampler that thresholds x0 inside its step, given the
// level s (DDIM: diffusers takes its ε from the model's output, before
// thresholding, and only the x0 term thresholded). For other samplers the
// caller thresholds x0 itself (Apply), as DPM-Solver++ uses the data
// prediction alone.
type Thresholder interface {
	SetThreshold(s float64)
}

// Apply clamps x0 to [−s, s] and divides it by s, in place.
func (t Thresholding) Apply(x0 []float32, s float64) {
	fs := float32(s)
	for i, v := range x0 {
		x0[i] = min(max(v, -fs), fs) / fs
	}
}

// Threshold computes the level s of x0 (Level) and applies it in place.
func (t Thresholding) Threshold(x0 []float32) (float64, error) {
	s, err := t.Level(x0)
	if err == nil {
		t.Apply(x0, s)
	}
	return s, err
}

// Level is s for one image (every channel and pixel of one sample, as
// diffusers reduces over all but the batch axis): the Ratio-quantile of
// |x0| clamped to [1, MaxValue]. The quantile interpolates linearly
// between order statistics, as torch.quantile does: position q·(n−1). It
// runs in linear time (selection), on a copy of |x0|.
func (t Thresholding) Level(x0 []float32) (float64, error) {
	if len(x0) == 0 {
		return 0, fmt.Errorf("threshold: empty image")
	}
	if !(t.Ratio > 0 && t.Ratio <= 1) || !(t.MaxValue > 0) {
		return 0, fmt.Errorf("threshold: ratio %g, max %g", t.Ratio, t.MaxValue)
	}
	abs := make([]float32, len(x0))
	for i, v := range x0 {
		abs[i] = float32(math.Abs(float64(v)))
	}
	pos := t.Ratio * float64(len(abs)-1)
	lo := int(math.Floor(pos))
	a := float64(selectKth(abs, lo))
	q := a
	if frac := pos - float64(lo); frac > 0 && lo+1 < len(abs) {
		// The next order statistic is the least of what selection left above lo.
		b := abs[lo+1]
		for _, v := range abs[lo+1:] {
			b = min(b, v)
		}
		q = a + frac*(float64(b)-a)
	}
	return math.Min(math.Max(q, 1), t.MaxValue), nil
}

// selectKth reorders v so that v[k] is the k-th smallest (0-based), every
// value before it no greater and every value after it no less, and
// returns it (Hoare's selection with the median of three as pivot).
func selectKth(v []float32, k int) float32 {
	lo, hi := 0, len(v)-1
	for lo < hi {
		mid := lo + (hi-lo)/2
		// median of three into v[mid]
		if v[mid] < v[lo] {
			v[mid], v[lo] = v[lo], v[mid]
		}
		if v[hi] < v[lo] {
			v[hi], v[lo] = v[lo], v[hi]
		}
		if v[hi] < v[mid] {
			v[hi], v[mid] = v[mid], v[hi]
		}
		p := v[mid]
		i, j := lo, hi
		for i <= j {
			for v[i] < p {
				i++
			}
			for v[j] > p {
				j--
			}
			if i <= j {
				v[i], v[j] = v[j], v[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return v[k]
		}
	}
	return v[k]
}
