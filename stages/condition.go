package stages

import (
	"fmt"
	"math"
	"runtime"

	"github.com/disintegration/imaging"
	"golang.org/x/sync/errgroup"
)

// Filter names the resampling filter used to bring a previous stage's image
// to the size of the next.
type Filter string

// Resampling filters: imaging's Lanczos (3 lobes) and its Catmull–Rom cubic.
const (
	FilterLanczos Filter = "lanczos"
	FilterBicubic Filter = "bicubic"
)

func (f Filter) kernel() (imaging.ResampleFilter, error) {
	switch f {
	case FilterLanczos, "":
		return imaging.Lanczos, nil
	case FilterBicubic:
		return imaging.CatmullRom, nil
	}
	return imaging.ResampleFilter{}, fmt.Errorf("unknown resampling filter %q (want lanczos or bicubic)", f)
}

// Resample resizes the planar c×h×w image src into dst (c×dh×dw) with the
// filter's kernel from github.com/disintegration/imaging, using imaging's
// own weight layout (separable, horizontal pass then vertical, kernel
// widened by the scale when shrinking, weights normalised per output pixel)
// but in float64 throughout: imaging.Resize itself would quantise to 8 bits
// (its output is always image.NRGBA). Values are clamped to [-1, 1] at the
// end, since Lanczos and Catmull–Rom overshoot at edges.
func Resample(dst, src []float32, c, h, w, dh, dw int, f Filter) error {
	k, err := f.kernel()
	if err != nil {
		return err
	}
	if c < 1 || h < 1 || w < 1 || dh < 1 || dw < 1 {
		return fmt.Errorf("resample: sizes %d×%d×%d to %d×%d, want positive", c, h, w, dh, dw)
	}
	if len(src) != c*h*w || len(dst) != c*dh*dw {
		return fmt.Errorf("resample: %d and %d values, want %d×%d×%d and %d×%d×%d", len(src), len(dst), c, h, w, c, dh, dw)
	}
	wx := resampleWeights(dw, w, k)
	wy := resampleWeights(dh, h, k)
	// Both passes run in row bands on every core: the horizontal pass into a
	// float64 buffer (per channel, h×dw), then the vertical pass from it. A
	// band of channels alone would leave a core idle for three channels on
	// two cores. Each output value sums the same terms in the same order
	// however the rows are split.
	tmp := make([]float64, c*h*dw)
	_ = InBands(c*h, 16, func(r0, r1 int) error {
		for r := r0; r < r1; r++ {
			row := src[r*w : (r+1)*w]
			t := tmp[r*dw : (r+1)*dw]
			for x, ws := range wx {
				var s float64
				for _, iw := range ws {
					s += float64(row[iw.index]) * iw.weight
				}
				t[x] = s
			}
		}
		return nil
	})
	_ = InBands(c*dh, 16, func(r0, r1 int) error {
		acc := make([]float64, dw)
		for r := r0; r < r1; r++ {
			ch, y := r/dh, r%dh
			plane := tmp[ch*h*dw : (ch+1)*h*dw]
			clear(acc)
			for _, iw := range wy[y] {
				t := plane[iw.index*dw : (iw.index+1)*dw]
				a, wt := acc[:len(t)], iw.weight
				for x, v := range t {
					a[x] += v * wt
				}
			}
			o := dst[r*dw : (r+1)*dw]
			o = o[:len(acc)]
			for x, s := range acc {
				if s > 1 { // a NaN passes, as it would through min and max
					s = 1
				} else if s < -1 {
					s = -1
				}
				o[x] = float32(s)
			}
		}
		return nil
	})
	return nil
}

// InBands runs fn over rows [0, n) split into bands of at least minRows,
// one band per core (at most 8), at the same time, and returns the first
// error. fn must only touch its own rows.
func InBands(n, minRows int, fn func(r0, r1 int) error) error {
	bands := min(runtime.NumCPU(), 8, max(n/max(minRows, 1), 1))
	if bands == 1 {
		return fn(0, n)
	}
	var g errgroup.Group
	for b := 0; b < bands; b++ {
		r0, r1 := b*n/bands, (b+1)*n/bands
		g.Go(func() error { return fn(r0, r1) })
	}
	return g.Wait()
}

type indexWeight struct {
	index  int
	weight float64
}

// resampleWeights mirrors imaging's precomputeWeights.
func resampleWeights(dstSize, srcSize int, filter imaging.ResampleFilter) [][]indexWeight {
	du := float64(srcSize) / float64(dstSize)
	scale := max(du, 1)
	ru := math.Ceil(scale * filter.Support)
	out := make([][]indexWeight, dstSize)
	for v := range out {
		fu := (float64(v)+0.5)*du - 0.5
		begin := max(int(math.Ceil(fu-ru)), 0)
		end := min(int(math.Floor(fu+ru)), srcSize-1)
		var ws []indexWeight
		var sum float64
		for u := begin; u <= end; u++ {
			if wt := filter.Kernel((float64(u) - fu) / scale); wt != 0 {
				sum += wt
				ws = append(ws, indexWeight{u, wt})
			}
		}
		if sum != 0 {
			for i := range ws {
				ws[i].weight /= sum
			}
		}
		out[v] = ws
	}
	return out
}

// AugmentTimestep returns the training timestep of the noise-conditioning
// level f in [0, 1]: round(f·(T−1)), rounding halves away from zero.
func AugmentTimestep(level float64, T int) (int, error) {
	if !(level >= 0 && level <= 1) {
		return 0, fmt.Errorf("noise augmentation: level %g outside [0, 1]", level)
	}
	if T < 1 {
		return 0, fmt.Errorf("noise augmentation: %d training timesteps", T)
	}
	return int(math.Round(level * float64(T-1))), nil
}

// NoiseAugment writes the noise-augmented low-resolution conditioning into
// dst: with level f = 0 a copy of lowres (clean); otherwise, with
// t = AugmentTimestep(f, T) and ᾱ = alphasCumprod[t],
//
//	dst = √ᾱ·lowres + √(1−ᾱ)·noise
//
// where noise comes from its own stream (Noise{Seed, StreamAug}). The model's
// noise_level input gets f. dst may alias lowres.
func NoiseAugment(dst, lowres, noise []float32, alphasCumprod []float64, level float64) error {
	if len(dst) != len(lowres) || len(noise) != len(lowres) {
		return fmt.Errorf("noise augmentation: lengths %d, %d, %d differ", len(dst), len(lowres), len(noise))
	}
	t, err := AugmentTimestep(level, len(alphasCumprod))
	if err != nil {
		return err
	}
	if level == 0 {
		copy(dst, lowres)
		return nil
	}
	ab := alphasCumprod[t]
	a, b := float32(math.Sqrt(ab)), float32(math.Sqrt(1-ab))
	for i := range dst {
		dst[i] = a*lowres[i] + b*noise[i]
	}
	return nil
}
