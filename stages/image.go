package stages

import (
	"fmt"
	"image"
	"image/color"
	"math"
)

// quantize maps v in [−1, 1] to [0, max], rounding to nearest and clamping;
// NaN maps to 0.
func quantize(v float32, maxv float64) uint32 {
	q := (float64(v) + 1) * 0.5 * maxv
	if !(q > 0) { // also NaN
		return 0
	}
	if q >= maxv {
		return uint32(maxv)
	}
	return uint32(math.Round(q))
}

func checkImageShape(name string, t []float32, c, h, w int) error {
	if c != 1 && c != 3 && c != 4 {
		return fmt.Errorf("%s: %d channels, want 1, 3 or 4", name, c)
	}
	if h < 1 || w < 1 || len(t) != c*h*w {
		return fmt.Errorf("%s: %d values, want %d×%d×%d", name, len(t), c, h, w)
	}
	return nil
}

// TensorToNRGBA converts a planar c×h×w tensor in [−1, 1] (c = 1 gray,
// 3 RGB, 4 RGBA) into an 8-bit image: u = round((v+1)/2·255), clamped.
func TensorToNRGBA(t []float32, c, h, w int) (*image.NRGBA, error) {
	if err := checkImageShape("tensor to image", t, c, h, w); err != nil {
		return nil, err
	}
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	n := h * w
	for i := 0; i < n; i++ {
		p := img.Pix[i*4 : i*4+4 : i*4+4]
		r := uint8(quantize(t[i], 255))
		g, b, a := r, r, uint8(255)
		if c >= 3 {
			g, b = uint8(quantize(t[n+i], 255)), uint8(quantize(t[2*n+i], 255))
		}
		if c == 4 {
			a = uint8(quantize(t[3*n+i], 255))
		}
		p[0], p[1], p[2], p[3] = r, g, b, a
	}
	return img, nil
}

// TensorToNRGBA64 is TensorToNRGBA with 16 bits per channel
// (u = round((v+1)/2·65535)).
func TensorToNRGBA64(t []float32, c, h, w int) (*image.NRGBA64, error) {
	if err := checkImageShape("tensor to image", t, c, h, w); err != nil {
		return nil, err
	}
	img := image.NewNRGBA64(image.Rect(0, 0, w, h))
	n := h * w
	for i := 0; i < n; i++ {
		p := img.Pix[i*8 : i*8+8 : i*8+8]
		r := quantize(t[i], 65535)
		g, b, a := r, r, uint32(65535)
		if c >= 3 {
			g, b = quantize(t[n+i], 65535), quantize(t[2*n+i], 65535)
		}
		if c == 4 {
			a = quantize(t[3*n+i], 65535)
		}
		for k, v := range [4]uint32{r, g, b, a} {
			p[2*k], p[2*k+1] = uint8(v>>8), uint8(v)
		}
	}
	return img, nil
}

// ImageToTensor converts an image into a planar c×h×w tensor in [−1, 1]
// from its non-premultiplied 16-bit colour (8-bit images scale exactly:
// v = u/255·2 − 1). c = 3 takes RGB, 4 RGBA, 1 the luminance.
func ImageToTensor(img image.Image, c int) ([]float32, int, int, error) {
	b := img.Bounds()
	w, h := b.Dx(), b.Dy()
	if c != 1 && c != 3 && c != 4 {
		return nil, 0, 0, fmt.Errorf("image to tensor: %d channels, want 1, 3 or 4", c)
	}
	if w < 1 || h < 1 {
		return nil, 0, 0, fmt.Errorf("image to tensor: empty image")
	}
	n := w * h
	t := make([]float32, c*n)
	const s8, s16 = 2.0 / 255, 2.0 / 65535
	switch m := img.(type) {
	case *image.NRGBA:
		if c != 1 {
			for y := 0; y < h; y++ {
				for x := 0; x < w; x++ {
					p := m.Pix[m.PixOffset(b.Min.X+x, b.Min.Y+y):]
					i := y*w + x
					for k := 0; k < c; k++ {
						t[k*n+i] = float32(float64(p[k])*s8 - 1)
					}
				}
			}
			return t, h, w, nil
		}
	case *image.NRGBA64:
		if c != 1 {
			for y := 0; y < h; y++ {
				for x := 0; x < w; x++ {
					p := m.Pix[m.PixOffset(b.Min.X+x, b.Min.Y+y):]
					i := y*w + x
					for k := 0; k < c; k++ {
						t[k*n+i] = float32(float64(uint16(p[2*k])<<8|uint16(p[2*k+1]))*s16 - 1)
					}
				}
			}
			return t, h, w, nil
		}
	}
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			i := y*w + x
			if c == 1 {
				g := color.Gray16Model.Convert(img.At(b.Min.X+x, b.Min.Y+y)).(color.Gray16)
				t[i] = float32(float64(g.Y)*s16 - 1)
				continue
			}
			p := color.NRGBA64Model.Convert(img.At(b.Min.X+x, b.Min.Y+y)).(color.NRGBA64)
			v := [4]uint16{p.R, p.G, p.B, p.A}
			for k := 0; k < c; k++ {
				t[k*n+i] = float32(float64(v[k])*s16 - 1)
			}
		}
	}
	return t, h, w, nil
}
