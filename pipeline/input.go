package pipeline

import (
	"errors"
	"fmt"
	"image"
	"image/draw"
	_ "image/jpeg" // input images may be JPEG
	"image/png"
	"io/fs"
	"os"

	"tessera/stages"
)

// MaxInputPixels bounds the input images accepted for upscaling; the size is
// checked from the header before any pixel is decoded.
const MaxInputPixels = 64 << 20

// CheckImage reads only an image's header: it must be an image of a
// format Tessera reads (PNG, JPEG, GIF, BMP or TIFF) and of an accepted
// size. It returns the width and height.
func CheckImage(path string) (int, int, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return 0, 0, fmt.Errorf("image %s: is a directory, not an image file (use images: \"DIR/*.png\" for every image in it)", path)
	}
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
		return "", 0, 0, fmt.Errorf("image %s: not an image Tessera reads (PNG, JPEG, GIF, BMP or TIFF): %w", path, err)
	}
	if cfg.Width < 1 || cfg.Height < 1 || int64(cfg.Width)*int64(cfg.Height) > MaxInputPixels {
		return "", 0, 0, fmt.Errorf("image %s: %dx%d %s is outside the accepted size (at most %d pixels)", path, cfg.Width, cfg.Height, format, MaxInputPixels)
	}
	return format, cfg.Width, cfg.Height, nil
}

// LoadImage reads an image (see CheckImage) as a planar 3-channel tensor
// in [-1, 1] and returns it with its width and height. The size is checked
// from the header before decoding. An image with transparency is
// composited on black (see loadImage).
func LoadImage(path string) ([]float32, int, int, error) {
	t, w, h, _, err := loadImage(path)
	return t, w, h, err
}

// loadImage is LoadImage that also says whether the image had transparent
// or translucent pixels. Those are composited on black, as their colour
// premultiplied by their alpha: a transparent pixel is black, whatever
// colour the file stores under it.
//
// Errors are classified: an image that is gone or does not decode is
// ClassInvalid; one that cannot be read for another reason (EIO, too many
// open files) is left to Classify, and may be retried.
func loadImage(path string) (t []float32, w, h int, translucent bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		err = fmt.Errorf("image %s: %w", path, err)
		if errors.Is(err, fs.ErrNotExist) {
			err = Invalid(err)
		}
		return nil, 0, 0, false, err
	}
	defer f.Close()
	format, _, _, err := checkHeader(f, path)
	if err != nil {
		return nil, 0, 0, false, Invalid(err)
	}
	if _, err := f.Seek(0, 0); err != nil {
		return nil, 0, 0, false, err
	}
	img, _, err := image.Decode(f)
	if err != nil {
		return nil, 0, 0, false, Invalidf("image %s: decode %s: %w", path, format, err)
	}
	if o, ok := img.(interface{ Opaque() bool }); ok && !o.Opaque() {
		translucent = true
		flat := image.NewRGBA(img.Bounds())
		draw.Draw(flat, flat.Bounds(), image.Black, image.Point{}, draw.Src)
		draw.Draw(flat, flat.Bounds(), img, img.Bounds().Min, draw.Over)
		img = flat
	}
	t, h, w, err = stages.ImageToTensor(img, 3)
	if err != nil {
		return nil, 0, 0, false, fmt.Errorf("image %s: %w", path, err)
	}
	return t, w, h, translucent, nil
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

// SetInput reads the header of an upscale item's input image into
// InputWidth×InputHeight and, where the item gives no size, sets
// Width×Height to Scale times it. It reads no pixels. An image that is
// missing, a directory, not an image, or outside the accepted size, and a
// scale that leaves nothing, are ClassInvalid.
func (it *Item) SetInput() error {
	if it.Image == "" {
		return nil
	}
	w, h, err := CheckImage(it.Image)
	if err != nil {
		return Invalid(err)
	}
	it.InputWidth, it.InputHeight = w, h
	if it.Width == 0 || it.Height == 0 {
		it.Width, it.Height = UpscaleSize(w, h, it.Scale)
		if it.Width < 1 || it.Height < 1 {
			return Invalidf("scale: %g makes %dx%d of %s's %dx%d", it.Scale, it.Width, it.Height, it.Image, w, h)
		}
	}
	return nil
}
