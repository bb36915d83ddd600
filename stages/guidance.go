package stages

import (
	"fmt"
	"math"
)

// Guide applies classifier-free guidance to a batched model output that
// holds the unconditional half first and the conditional half second (the
// order diffusers batches them): dst = uncond + scale·(cond − uncond). dst
// has half the length of batch and may alias its first half. Because the
// weights sum to one, guidance commutes with PredToX0 and with tile fusion.
func Guide(dst, batch []float32, scale float64) error {
	if len(batch)%2 != 0 || len(dst) != len(batch)/2 {
		return fmt.Errorf("guidance: batch of %d values and dst of %d, want an even batch twice dst", len(batch), len(dst))
	}
	n := len(dst)
	return GuidePair(dst, batch[:n], batch[n:], scale)
}

// GuidePair is Guide over separate unconditional and conditional outputs.
func GuidePair(dst, uncond, cond []float32, scale float64) error {
	if len(uncond) != len(cond) || len(dst) != len(cond) {
		return fmt.Errorf("guidance: lengths %d, %d, %d differ", len(dst), len(uncond), len(cond))
	}
	g := float32(scale)
	for i := range dst {
		u := uncond[i]
		dst[i] = u + g*(cond[i]-u)
	}
	return nil
}

// RescaleGuidance applies guidance rescale (Lin et al. 2023, diffusers'
// rescale_noise_cfg) to the guided prediction of one image in place:
//
//	rescaled = guided · std(cond)/std(guided)
//	guided  ← phi·rescaled + (1 − phi)·guided
//
// with standard deviations over all elements of the image (channels and
// pixels). phi = 0 leaves guided unchanged. The statistics are global: a
// tiled pipeline should rescale canvas-level fused predictions (or accept
// per-tile statistics as an approximation).
func RescaleGuidance(guided, cond []float32, phi float64) error {
	if len(guided) != len(cond) {
		return fmt.Errorf("guidance rescale: lengths %d and %d differ", len(guided), len(cond))
	}
	if phi == 0 || len(guided) < 2 {
		return nil
	}
	sc, sg := stdDev(cond), stdDev(guided)
	if sg == 0 {
		return nil
	}
	f := float32(phi*sc/sg + (1 - phi))
	for i := range guided {
		guided[i] *= f
	}
	return nil
}

// stdDev is the standard deviation with Bessel's correction (torch.std);
// the correction cancels in RescaleGuidance's ratio.
func stdDev(x []float32) float64 {
	var s float64
	for _, v := range x {
		s += float64(v)
	}
	m := s / float64(len(x))
	var ss float64
	for _, v := range x {
		d := float64(v) - m
		ss += d * d
	}
	return math.Sqrt(ss / float64(len(x)-1))
}
