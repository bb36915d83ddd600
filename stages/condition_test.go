package stages

import (
	"math"
	"testing"

	"github.com/disintegration/imaging"
)

func TestResampleMatchesImaging(t *testing.T) {
	// A smooth 8-bit RGB image (no overshoot past the range, which imaging
	// clamps between its passes), resampled by imaging.Resize and by
	// Resample; imaging rounds to 8 bits after each pass, so allow 1.5 levels.
	const h, w, dh, dw = 13, 17, 40, 51
	src := make([]float32, 3*h*w)
	for c := 0; c < 3; c++ {
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				v := 0.6 * math.Sin(0.4*float64(x)+0.3*float64(y)+float64(c))
				src[(c*h+y)*w+x] = float32(math.Round((v+1)/2*255)/255*2 - 1) // 8-bit levels
			}
		}
	}
	img, err := TensorToNRGBA(src, 3, h, w)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		f Filter
		k imaging.ResampleFilter
	}{{FilterLanczos, imaging.Lanczos}, {FilterBicubic, imaging.CatmullRom}} {
		ref, _, _, err := ImageToTensor(imaging.Resize(img, dw, dh, tc.k), 3)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]float32, 3*dh*dw)
		if err := Resample(got, src, 3, h, w, dh, dw, tc.f); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			if d := math.Abs(float64(got[i] - ref[i])); d > 1.5*2/255 {
				t.Fatalf("%s: value %d = %g, imaging %g", tc.f, i, got[i], ref[i])
			}
		}
	}
	// A constant image stays constant (weights are normalised).
	cst := make([]float32, 2*5*5)
	for i := range cst {
		cst[i] = 0.25
	}
	out := make([]float32, 2*9*11)
	if err := Resample(out, cst, 2, 5, 5, 9, 11, FilterLanczos); err != nil {
		t.Fatal(err)
	}
	for _, v := range out {
		if math.Abs(float64(v)-0.25) > 1e-6 {
			t.Fatalf("constant resampled to %g", v)
		}
	}
	if err := Resample(out, cst, 2, 5, 5, 9, 11, "nearest"); err == nil {
		t.Error("unknown filter accepted")
	}
}

func TestNoiseAugment(t *testing.T) {
	betas, _ := Betas(BetaLinear, 1000, 0.0001, 0.02)
	abar := AlphasCumprod(betas)
	low := []float32{0.5, -0.25, 1, 0}
	noise := []float32{1, 2, -1, 0.5}
	dst := make([]float32, 4)
	if err := NoiseAugment(dst, low, noise, abar, 0); err != nil {
		t.Fatal(err)
	}
	for i := range low {
		if dst[i] != low[i] {
			t.Fatalf("level 0 changed the image: %v", dst)
		}
	}
	// f = 0.25: t_aug = round(0.25·999) = round(249.75) = 250.
	if tt, _ := AugmentTimestep(0.25, 1000); tt != 250 {
		t.Fatalf("AugmentTimestep(0.25) = %d, want 250", tt)
	}
	if err := NoiseAugment(dst, low, noise, abar, 0.25); err != nil {
		t.Fatal(err)
	}
	for i := range low {
		want := math.Sqrt(abar[250])*float64(low[i]) + math.Sqrt(1-abar[250])*float64(noise[i])
		if math.Abs(float64(dst[i])-want) > 1e-6 {
			t.Fatalf("augmented[%d] = %g, want %g", i, dst[i], want)
		}
	}
	if err := NoiseAugment(dst, low, noise, abar, 1.5); err == nil {
		t.Error("level 1.5 accepted")
	}
}

// BenchmarkResample upsamples a 256² three-channel image 4× with the
// bicubic filter, as an SR stage of a 1024² image does.
func BenchmarkResample(b *testing.B) {
	const c, h, w = 3, 256, 256
	src := make([]float32, c*h*w)
	for i := range src {
		src[i] = float32(i%509)/254.5 - 1
	}
	dst := make([]float32, c*4*h*4*w)
	for b.Loop() {
		if err := Resample(dst, src, c, h, w, 4*h, 4*w, FilterBicubic); err != nil {
			b.Fatal(err)
		}
	}
}
