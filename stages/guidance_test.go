package stages

import (
	"math"
	"testing"
)

func TestGuide(t *testing.T) {
	batch := []float32{1, 2, 3, 5, 2, 0} // uncond {1,2,3}, cond {5,2,0}
	dst := make([]float32, 3)
	if err := Guide(dst, batch, 7.5); err != nil {
		t.Fatal(err)
	}
	want := []float32{1 + 7.5*4, 2, 3 + 7.5*-3}
	for i := range want {
		if dst[i] != want[i] {
			t.Fatalf("Guide = %v, want %v", dst, want)
		}
	}
	// Scale 1 returns the conditional output.
	if err := Guide(dst, batch, 1); err != nil || dst[0] != 5 || dst[2] != 0 {
		t.Fatalf("Guide scale 1 = %v, %v", dst, err)
	}
	if err := Guide(dst, batch[:5], 2); err == nil {
		t.Error("odd batch accepted")
	}
}

func TestRescaleGuidance(t *testing.T) {
	cond := []float32{1, -1, 2, -2}
	guided := []float32{4, -4, 8, -8} // std 4× cond's
	g := append([]float32(nil), guided...)
	if err := RescaleGuidance(g, cond, 0.7); err != nil {
		t.Fatal(err)
	}
	// diffusers: rescaled = guided·std(cond)/std(guided) = guided/4;
	// result = 0.7·rescaled + 0.3·guided.
	for i := range g {
		want := 0.7*float64(guided[i])/4 + 0.3*float64(guided[i])
		if math.Abs(float64(g[i])-want) > 1e-6 {
			t.Fatalf("rescaled = %v, want %g at %d", g, want, i)
		}
	}
	g = append(g[:0], guided...)
	if err := RescaleGuidance(g, cond, 0); err != nil || g[0] != 4 {
		t.Errorf("phi 0 changed the prediction: %v", g)
	}
}
