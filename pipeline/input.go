package pipeline

import (
	"fmt"
	"image"
	_ "image/jpeg" // input images may be JPEG
	"image/png"
	"os"

	"tessera/stages"
)

// MaxInputPixels bounds the input images accepted for upscaling; the size is
// checked from the header before any pixel is decoded.
const MaxInputPixels = 64 << 20

// CheckImage reads only an image's header: it must be a PNG or JPEG of an
// accepted size. It returns the width and height.
func CheckImage(path string) (int, int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, fmt.Errorf("image %s: %w", path, err)
	}
	defer f.Close()
	_, w, h, err := checkHeader(f, path)
	return w, h, err
}

func checkHeader(f *os.File, path string) (string, int, int, error) {
	cfg, format, err := image.DecodeConfig(f)
	if err != nil {
		return "", 0, 0, fmt.Errorf("image %s: not a PNG or JPEG image: %w", path, err)
	}
	if cfg.Width < 1 || cfg.Height < 1 || int64(cfg.Width)*int64(cfg.Height) > MaxInputPixels {
		return "", 0, 0, fmt.Errorf("image %s: %dx%d %s is outside the accepted size (at most %d pixels)", path, cfg.Width, cfg.Height, format, MaxInputPixels)
	}
	return format, cfg.Width, cfg.Height, nil
}

// LoadImage reads a PNG or JPEG as a planar 3-channel tensor in [-1, 1]
// and returns it with its width and height. The size is checked from the
// header before decoding.
func LoadImage(path string) ([]float32, int, int, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("image %s: %w", path, err)
	}
	defer f.Close()
	format, _, _, err := checkHeader(f, path)
	if err != nil {
		return nil, 0, 0, err
	}
	if _, err := f.Seek(0, 0); err != nil {
		return nil, 0, 0, err
	}
	img, _, err := image.Decode(f)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("image %s: decode %s: %w", path, format, err)
	}
	t, h, w, err := stages.ImageToTensor(img, 3)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("image %s: %w", path, err)
	}
	return t, w, h, nil
}

// SaveImage writes a planar 3-channel tensor in [-1, 1] as an 8-bit PNG.
func SaveImage(path string, img []float32, w, h int) error {
	rgba, err := stages.TensorToNRGBA(img, 3, h, w)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, rgba); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
