package stages

import (
	"bytes"
	"image"
	"image/png"
	"math"
	"testing"
)

func TestImageRoundTrip8And16Bit(t *testing.T) {
	// Every 8-bit level survives tensor and back, through a PNG file.
	const w = 256
	t8 := make([]float32, 3*w)
	for i := 0; i < w; i++ {
		t8[i], t8[w+i], t8[2*w+i] = float32(i)/255*2-1, float32(255-i)/255*2-1, float32(i*7%256)/255*2-1
	}
	img, err := TensorToNRGBA(t8, 3, 1, w)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < w; i++ {
		if img.Pix[4*i] != uint8(i) || img.Pix[4*i+1] != uint8(255-i) || img.Pix[4*i+3] != 255 {
			t.Fatalf("pixel %d = %v", i, img.Pix[4*i:4*i+4])
		}
	}
	var buf bytes.Buffer
	if err := EncodePNG(&buf, img, png.DefaultCompression); err != nil {
		t.Fatal(err)
	}
	dec, err := png.Decode(&buf)
	if err != nil {
		t.Fatal(err)
	}
	back, h, bw, err := ImageToTensor(dec, 3)
	if err != nil || h != 1 || bw != w {
		t.Fatal(err, h, bw)
	}
	again, err := TensorToNRGBA(back, 3, 1, w)
	if err != nil {
		t.Fatal(err)
	}
	for i := range t8 {
		if math.Abs(float64(back[i]-t8[i])) > 1e-7 {
			t.Fatalf("8-bit value %d: %g became %g", i, t8[i], back[i])
		}
	}
	if !bytes.Equal(again.Pix, img.Pix) {
		t.Fatal("8-bit levels changed on the way back")
	}
	// Every 16-bit level survives too.
	const n = 65536
	t16 := make([]float32, n)
	for i := range t16 {
		t16[i] = float32(float64(i)*(2.0/65535) - 1)
	}
	img16, err := TensorToNRGBA64(t16, 1, 256, 256)
	if err != nil {
		t.Fatal(err)
	}
	buf.Reset()
	if err := EncodePNG(&buf, img16, png.BestSpeed); err != nil {
		t.Fatal(err)
	}
	dec, err = png.Decode(&buf)
	if err != nil {
		t.Fatal(err)
	}
	back, _, _, err = ImageToTensor(dec, 1)
	if err != nil {
		t.Fatal(err)
	}
	again16, err := TensorToNRGBA64(back, 1, 256, 256)
	if err != nil {
		t.Fatal(err)
	}
	for i := range t16 {
		if math.Abs(float64(back[i]-t16[i])) > 1e-7 {
			t.Fatalf("16-bit level %d: %g became %g", i, t16[i], back[i])
		}
		if got := uint16(again16.Pix[8*i])<<8 | uint16(again16.Pix[8*i+1]); got != uint16(i) {
			t.Fatalf("16-bit level %d came back as %d", i, got)
		}
	}
}

func TestQuantizeRoundsAndClamps(t *testing.T) {
	for _, tc := range []struct {
		v    float32
		want uint8
	}{{-1, 0}, {1, 255}, {-2, 0}, {3, 255}, {float32(math.NaN()), 0}, {float32(math.Inf(1)), 255},
		{0, 128}, // 127.5 rounds half away from zero
		{float32(2*(10.49/255) - 1), 10}, {float32(2*(10.51/255) - 1), 11}} {
		img, err := TensorToNRGBA([]float32{tc.v}, 1, 1, 1)
		if err != nil {
			t.Fatal(err)
		}
		if img.Pix[0] != tc.want {
			t.Errorf("quantize(%g) = %d, want %d", tc.v, img.Pix[0], tc.want)
		}
	}
	if _, err := TensorToNRGBA(make([]float32, 5), 2, 1, 1); err == nil {
		t.Error("2 channels accepted")
	}
	if _, _, _, err := ImageToTensor(image.NewNRGBA(image.Rect(0, 0, 0, 0)), 3); err == nil {
		t.Error("empty image accepted")
	}
}
