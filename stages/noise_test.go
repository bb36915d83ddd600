package stages

import (
	"math"
	"slices"
	"testing"
)

func TestPhilox4x32KnownAnswers(t *testing.T) {
	// Known-answer vectors of Random123's kat_vectors for philox4x32 with 10 rounds.
	tests := []struct {
		ctr  [4]uint32
		key  [2]uint32
		want [4]uint32
	}{
		{[4]uint32{0, 0, 0, 0}, [2]uint32{0, 0}, [4]uint32{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
		{[4]uint32{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, [2]uint32{0xffffffff, 0xffffffff}, [4]uint32{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
		{[4]uint32{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, [2]uint32{0xa4093822, 0x299f31d0}, [4]uint32{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
	}
	for _, tc := range tests {
		if got := Philox4x32(tc.ctr, tc.key); got != tc.want {
			t.Errorf("Philox4x32(%08x, %08x) = %08x, want %08x", tc.ctr, tc.key, got, tc.want)
		}
	}
}

func TestFastLog(t *testing.T) {
	for _, x := range []float64{1.0 / 8589934592, 1e-9, 0.001, 0.1, 0.5, 0.70710678, 0.7072, 0.9999, 1} {
		got, want := fastLog(x), math.Log(x)
		if math.Abs(got-want) > 1e-13*math.Max(1, math.Abs(want)) {
			t.Errorf("fastLog(%g) = %.17g, want %.17g", x, got, want)
		}
	}
}

func TestNoiseTileEqualsCanvasCrop(t *testing.T) {
	n := Noise{Seed: 0x1234_5678_9abc_def0, Stream: StreamSR}
	const c, h, w, step = 3, 37, 53, 5
	canvas := make([]float32, c*h*w)
	if err := n.Fill(canvas, step, c, 0, 0, h, w); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][4]int{{0, 0, h, w}, {3, 5, 10, 11}, {1, 1, 1, 1}, {20, 6, 17, 47}, {36, 52, 1, 1}, {7, 2, 9, 3}} {
		y0, x0, th, tw := r[0], r[1], r[2], r[3]
		tile := make([]float32, c*th*tw)
		if err := n.Fill(tile, step, c, y0, x0, th, tw); err != nil {
			t.Fatal(err)
		}
		for ch := 0; ch < c; ch++ {
			for y := 0; y < th; y++ {
				for x := 0; x < tw; x++ {
					got := tile[(ch*th+y)*tw+x]
					want := canvas[(ch*h+y0+y)*w+x0+x]
					if got != want || n.At(step, ch, y0+y, x0+x) != want {
						t.Fatalf("tile %v: value at (%d,%d,%d) = %v, canvas %v", r, ch, y, x, got, want)
					}
				}
			}
		}
	}
	// Streams, seeds and steps give different values.
	other := make([]float32, c*h*w)
	for _, m := range []struct {
		n    Noise
		step int
	}{{Noise{Seed: n.Seed, Stream: StreamAug}, step}, {Noise{Seed: n.Seed + 1, Stream: StreamSR}, step}, {n, step + 1}, {Noise{Seed: n.Seed, Stream: StageStream(StreamSR, 1)}, step}} {
		if err := m.n.Fill(other, m.step, c, 0, 0, h, w); err != nil {
			t.Fatal(err)
		}
		same := 0
		for i := range other {
			if other[i] == canvas[i] {
				same++
			}
		}
		if same > 2 {
			t.Errorf("noise %+v step %d shares %d values with the reference", m.n, m.step, same)
		}
	}
}

func TestNoiseFillRejectsBadShapes(t *testing.T) {
	n := Noise{Seed: 1, Stream: StreamBase}
	if err := n.Fill(make([]float32, 5), 0, 1, 0, 0, 2, 3); err == nil {
		t.Error("Fill accepted a dst of the wrong length")
	}
	if err := n.Fill(nil, 0, 1, -1, 0, 0, 0); err == nil {
		t.Error("Fill accepted a negative origin")
	}
}

// TestNoiseStatistics checks moments, lag-1 correlations along every axis of
// the key and a Kolmogorov–Smirnov test against N(0,1) over 1,048,576 values.
func TestNoiseStatistics(t *testing.T) {
	steps, c, h, w := 2, 4, 256, 512 // 1,048,576 values
	if testing.Short() {
		h, w = 64, 128
	}
	n := Noise{Seed: 20260101, Stream: StreamBase}
	plane := c * h * w
	v := make([]float32, steps*plane)
	for s := 0; s < steps; s++ {
		if err := n.Fill(v[s*plane:(s+1)*plane], s, c, 0, 0, h, w); err != nil {
			t.Fatal(err)
		}
	}
	N := float64(len(v))
	var sum, sum2 float64
	for _, x := range v {
		sum += float64(x)
		sum2 += float64(x) * float64(x)
	}
	mean := sum / N
	variance := sum2/N - mean*mean
	// Standard errors: 1/√N for the mean, √(2/N) for the variance; allow 5σ.
	if tol := 5 / math.Sqrt(N); math.Abs(mean) > tol {
		t.Errorf("mean = %g, want |mean| < %g", mean, tol)
	}
	if tol := 5 * math.Sqrt(2/N); math.Abs(variance-1) > tol {
		t.Errorf("variance = %g, want within %g of 1", variance, tol)
	}
	idx := func(s, ch, y, x int) int { return s*plane + (ch*h+y)*w + x }
	lags := []struct {
		name           string
		ds, dc, dy, dx int
	}{{"x", 0, 0, 0, 1}, {"y", 0, 0, 1, 0}, {"channel", 0, 1, 0, 0}, {"step", 1, 0, 0, 0}}
	for _, lag := range lags {
		var sxy float64
		var m int
		for s := 0; s+lag.ds < steps; s++ {
			for ch := 0; ch+lag.dc < c; ch++ {
				for y := 0; y+lag.dy < h; y++ {
					for x := 0; x+lag.dx < w; x++ {
						sxy += float64(v[idx(s, ch, y, x)]) * float64(v[idx(s+lag.ds, ch+lag.dc, y+lag.dy, x+lag.dx)])
						m++
					}
				}
			}
		}
		r := (sxy/float64(m) - mean*mean) / variance
		if tol := 5 / math.Sqrt(float64(m)); math.Abs(r) > tol {
			t.Errorf("lag-1 correlation along %s = %g over %d pairs, want |r| < %g", lag.name, r, m, tol)
		}
	}
	// Kolmogorov–Smirnov against the N(0,1) CDF.
	sorted := slices.Clone(v)
	slices.Sort(sorted)
	var d float64
	for i, x := range sorted {
		f := 0.5 * math.Erfc(-float64(x)/math.Sqrt2)
		d = math.Max(d, math.Max(math.Abs(float64(i+1)/N-f), math.Abs(f-float64(i)/N)))
	}
	// Critical value at α = 0.001: sqrt(-ln(α/2)/2)/√N ≈ 1.949/√N.
	crit := math.Sqrt(-math.Log(0.001/2)/2) / math.Sqrt(N)
	t.Logf("N = %d, mean %.3g, variance %.5f, KS D = %.5f (critical %.5f)", len(v), mean, variance, d, crit)
	if d > crit {
		t.Errorf("KS statistic D = %g exceeds the α=0.001 critical value %g", d, crit)
	}
}

func BenchmarkNoiseFill(b *testing.B) {
	n := Noise{Seed: 7, Stream: StreamSR}
	const c, h, w = 3, 256, 256
	dst := make([]float32, c*h*w)
	b.SetBytes(int64(len(dst) * 4))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := n.Fill(dst, i, c, 0, 0, h, w); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)*float64(len(dst))/b.Elapsed().Seconds()/1e6, "Msamples/s")
}
