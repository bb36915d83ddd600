package onnx

import (
	"context"
	"sort"
	"testing"
	"time"

	ort "github.com/yalue/onnxruntime_go"
)

// These benchmarks measure what the onnx package adds over a bare
// onnxruntime_go call on the same graph (conv-sr) at a 1×3×64×64 input:
//
//	go test -run '^$' -bench . -count 5 ./onnx
//
// The bare call runs the very same ONNX Runtime session with values made
// once, so the difference is the wrapper alone and not two thread pools
// competing. BenchmarkOverhead interleaves the two Run by Run and reports
// the medians, which is what to quote on a busy machine.

type benchSetup struct {
	s    *Session
	in   map[string]Tensor
	bare func() error
}

func setupBench(b *testing.B) benchSetup {
	m := loadFixture(b, "conv-sr")
	s := newSession(b, m, nil)
	in := srInputs(m, 1, 64, 64, 0, 500)
	vals := make([]ort.Value, len(m.Inputs))
	for i, io := range m.Inputs {
		t, err := ort.NewTensor(ort.Shape(in[io.Name].Shape), in[io.Name].Float)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { t.Destroy() })
		vals[i] = t
	}
	out, err := ort.NewEmptyTensor[float32](ort.NewShape(1, 3, 64, 64))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { out.Destroy() })
	outs := []ort.Value{out}
	return benchSetup{s: s, in: in, bare: func() error { return s.sess.Run(vals, outs) }}
}

func BenchmarkRunBare(b *testing.B) {
	bs := setupBench(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := bs.bare(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRunBinding(b *testing.B) {
	bs := setupBench(b)
	bind, err := bs.s.Bind(bs.in)
	if err != nil {
		b.Fatal(err)
	}
	defer bind.Close()
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := bind.Run(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRunMap(b *testing.B) {
	bs := setupBench(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := bs.s.Run(bs.in); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOverhead(b *testing.B) {
	bs := setupBench(b)
	bind, err := bs.s.Bind(bs.in)
	if err != nil {
		b.Fatal(err)
	}
	defer bind.Close()
	ctx := context.Background()
	var wrapped, bare []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if err := bind.Run(ctx); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := bs.bare(); err != nil {
			b.Fatal(err)
		}
		wrapped, bare = append(wrapped, t1.Sub(t0)), append(bare, time.Since(t1))
	}
	med := func(d []time.Duration) float64 {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return float64(d[len(d)/2].Nanoseconds())
	}
	w, r := med(wrapped), med(bare)
	b.ReportMetric(w, "wrapper-ns/run")
	b.ReportMetric(r, "bare-ns/run")
	b.ReportMetric(100*(w-r)/r, "overhead-%")
}
