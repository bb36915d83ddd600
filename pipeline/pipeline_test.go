package pipeline

import (
	"context"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tessera/config"
	"tessera/models"
	"tessera/onnx"
)

var testEnv *onnx.Env

func TestMain(m *testing.M) {
	env, err := onnx.Open(config.Default().Runtime, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pipeline tests need ONNX Runtime:", err)
		os.Exit(1)
	}
	testEnv = env
	code := m.Run()
	env.Close()
	os.Exit(code)
}

func newEngine(t testing.TB, opts Options) *Engine {
	t.Helper()
	e := New(testEnv, models.Resolver{Dirs: []string{filepath.Join("..", "testdata", "models")}}, opts, nil)
	t.Cleanup(func() { e.Close() })
	return e
}

func intp(v int) *int { return &v }

// writeGradient writes a w×h PNG with smooth colour ramps and a bright disc.
func writeGradient(t testing.TB, w, h int) string {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			d := math.Hypot(float64(x-w/2), float64(y-h/3))
			v := uint8(0)
			if d < float64(w)/5 {
				v = 200
			}
			img.Set(x, y, color.NRGBA{uint8(255 * x / w), uint8(255 * y / h), v, 255})
		}
	}
	path := filepath.Join(t.TempDir(), "in.png")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := png.Encode(f, img); err != nil {
		t.Fatal(err)
	}
	return path
}

func maxAbsDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var m float64
	for i := range a {
		m = math.Max(m, math.Abs(float64(a[i]-b[i])))
	}
	return m
}

func TestOracleCascadeReturnsKnownImage(t *testing.T) {
	e := newEngine(t, Options{Batch: 3})
	table := [][3]float32{{0.5, -0.25, 0}, {-0.5, 0.5, 0.25}, {0.75, 0.75, -0.75}, {-0.25, -0.5, 0.5}}
	for i, sampler := range []string{"ddim", "euler", "dpm++2m"} {
		class := []int{0, 2, 3}[i]
		it := Item{
			Seed: 11, Width: 128, Height: 128, Class: class,
			Base: StageParams{Model: "oracle-base", Steps: 12, Sampler: sampler},
			SR:   StageParams{Model: "oracle-sr", Steps: 10, Strength: 1, Sampler: sampler, Tile: Tiling{Size: 48, Overlap: 8, Halo: intp(4)}},
		}
		res, err := e.Make(context.Background(), it, nil)
		if err != nil {
			t.Fatal(err)
		}
		p := res.Plan
		if len(p.Stages) != 2 || p.Stages[0].Width != 32 || p.Stages[1].Width != 128 || p.Stages[1].Tiles < 9 || p.Resample {
			t.Fatalf("plan = %+v", p)
		}
		plane := 128 * 128
		for ch := 0; ch < 3; ch++ {
			for i := 0; i < plane; i++ {
				if d := math.Abs(float64(res.Image[ch*plane+i] - table[class][ch])); d > 1e-4 {
					t.Fatalf("%s, class %d, channel %d, pixel %d: %g, want %g", sampler, class, ch, i, res.Image[ch*plane+i], table[class][ch])
				}
			}
		}
	}
}

func TestOracleGuidance(t *testing.T) {
	// With the null class at x* = 0, guidance g makes the exact epsilon that
	// of the point g·x*(c); DDIM lands there.
	e := newEngine(t, Options{})
	it := Item{Seed: 3, Width: 32, Height: 32, Class: 1, Base: StageParams{Model: "oracle-base", Steps: 10, Guidance: 1.5}, SR: StageParams{Model: "oracle-sr"}}
	e2 := it
	p, err := e.Plan(e2)
	if err != nil || len(p.Stages) != 1 {
		t.Fatalf("plan %+v, %v", p, err)
	}
	res, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []float32{-0.5 * 1.5, 0.5 * 1.5, 0.25 * 1.5}
	for ch, w := range want {
		if d := math.Abs(float64(res.Image[ch*32*32+5] - float32(math.Max(-1, math.Min(1, float64(w)))))); d > 1e-4 {
			t.Fatalf("channel %d: %g want %g", ch, res.Image[ch*32*32+5], w)
		}
	}
}

// convSR is e's runner of the conv-sr fixture.
func convSR(t *testing.T, e *Engine) *runner {
	t.Helper()
	r, err := e.runner("conv-sr")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// generateAtOnce generates n copies of it at the same time on e and
// returns their images (nil for one that failed, with the error reported).
func generateAtOnce(t *testing.T, e *Engine, it Item, n int) [][]float32 {
	t.Helper()
	images := make([][]float32, n)
	var wg sync.WaitGroup
	for k := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := e.Make(context.Background(), it, nil)
			if err != nil {
				t.Error(err)
				return
			}
			images[k] = res.Image
		}()
	}
	wg.Wait()
	return images
}

func upscaleItem(path string, tile, overlap int, halo *int) Item {
	return Item{Seed: 5, Image: path, Scale: 4, SR: StageParams{Model: "conv-sr", Steps: 6, Strength: 0.7, Tile: Tiling{Size: tile, Overlap: overlap, Halo: halo}}}
}

func TestTiledEqualsUntiledWithBoundedReceptiveField(t *testing.T) {
	in := writeGradient(t, 24, 24)
	e := newEngine(t, Options{Batch: 4})
	untiled, err := e.Make(context.Background(), upscaleItem(in, 96, 0, intp(0)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if untiled.Plan.Stages[0].Tiles != 1 || untiled.Width != 96 {
		t.Fatalf("reference plan %+v", untiled.Plan)
	}
	for _, c := range []struct{ tile, overlap, halo int }{{32, 8, 3}, {40, 4, 3}, {48, 16, 5}} {
		tiled, err := e.Make(context.Background(), upscaleItem(in, c.tile, c.overlap, intp(c.halo)), nil)
		if err != nil {
			t.Fatal(err)
		}
		if tiled.Plan.Stages[0].Tiles < 4 {
			t.Fatalf("tile %d: only %d tiles", c.tile, tiled.Plan.Stages[0].Tiles)
		}
		if d := maxAbsDiff(tiled.Image, untiled.Image); d > 1e-4 {
			t.Errorf("tile %d overlap %d halo %d: max difference %g from untiled", c.tile, c.overlap, c.halo, d)
		}
	}
	// A halo short of the receptive field shows at the seams: the test can fail.
	short, err := e.Make(context.Background(), upscaleItem(in, 32, 8, intp(0)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxAbsDiff(short.Image, untiled.Image); d < 1e-4 {
		t.Errorf("halo 0 matched the untiled run (%g): the comparison is blind", d)
	}
}

// The wavefront steps each band of rows as soon as its tiles are fused and
// sends the next step's tiles as soon as their rows are stepped. With a
// model whose receptive field the halo covers, that must give the untiled
// image exactly, for every sampler (DDIM's eta noise and DPM-Solver++'s
// per-row history included) and however many Runs are in flight.
func TestWavefrontMatchesUntiledForEverySampler(t *testing.T) {
	in := writeGradient(t, 24, 24)
	for _, smp := range []struct {
		name string
		eta  float64
	}{{"ddim", 0}, {"ddim", 0.8}, {"euler", 0}, {"dpmpp_2m", 0}} {
		item := func(tile, overlap, halo int) Item {
			it := upscaleItem(in, tile, overlap, intp(halo))
			it.SR.Steps, it.SR.Strength, it.SR.Sampler, it.SR.Eta = 10, 0.8, smp.name, smp.eta
			return it
		}
		untiled, err := newEngine(t, Options{Batch: 1, Lanes: 1}).Make(context.Background(), item(96, 0, 0), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct{ batch, lanes int }{{1, 1}, {4, 1}, {1, 3}, {2, 2}} {
			e := newEngine(t, Options{Batch: c.batch, Lanes: c.lanes})
			tiled, err := e.Make(context.Background(), item(32, 8, 3), nil)
			if err != nil {
				t.Fatal(err)
			}
			if st := tiled.Plan.Stages[0]; st.Tiles < 16 {
				t.Fatalf("only %d tiles", st.Tiles)
			}
			if d := maxAbsDiff(tiled.Image, untiled.Image); d > 1e-4 {
				t.Errorf("%s eta %g, batch %d, %d lanes: max difference %g from untiled", smp.name, smp.eta, c.batch, c.lanes, d)
			}
		}
	}
}

// The next step's first tiles reach the model before the step before it
// has finished: the model does not wait on a step barrier.
func TestWavefrontOverlapsSteps(t *testing.T) {
	in := writeGradient(t, 24, 24)
	e := newEngine(t, Options{Batch: 1, Lanes: 2})
	r := convSR(t, e)
	var mu sync.Mutex
	var events []string
	r.trace = func(q *request) {
		mu.Lock()
		events = append(events, fmt.Sprintf("run %d", q.step))
		mu.Unlock()
	}
	it := upscaleItem(in, 32, 8, intp(3))
	_, err := e.Make(context.Background(), it, func(p Progress) {
		mu.Lock()
		events = append(events, fmt.Sprintf("done %d", p.Step-1))
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	overlapped := 0
	for s := 0; ; s++ {
		done := slices.Index(events, fmt.Sprintf("done %d", s))
		next := slices.Index(events, fmt.Sprintf("run %d", s+1))
		if done < 0 || next < 0 {
			break
		}
		if next < done {
			overlapped++
		}
	}
	if overlapped == 0 {
		t.Fatalf("no step's tiles ran before the step before it was done: %v", events)
	}
}

func TestDeterministicAcrossBatchAndConcurrency(t *testing.T) {
	in := writeGradient(t, 20, 28)
	var ref []float32
	for _, c := range []struct{ batch, inFlight, lanes int }{{1, 1, 1}, {4, 1, 1}, {4, 2, 1}, {3, 3, 1}, {1, 1, 2}, {1, 3, 2}} {
		e := newEngine(t, Options{Batch: c.batch, Workers: c.inFlight, Lanes: c.lanes})
		for k, r := range generateAtOnce(t, e, upscaleItem(in, 32, 8, intp(3)), c.inFlight) {
			if ref == nil {
				ref = r
			}
			if d := maxAbsDiff(r, ref); d > 1.0/255 {
				t.Errorf("batch %d, %d in flight, %d lanes, item %d: max difference %g", c.batch, c.inFlight, c.lanes, k, d)
			}
		}
	}
}

func TestPanicFailsOnlyThatItem(t *testing.T) {
	in := writeGradient(t, 16, 16)
	// failsThenWorks expects an item to fail with want in its error, and
	// the next one, with nothing injected, to work (else it fails with unusable).
	failsThenWorks := func(e *Engine, progress func(Progress), want, unusable string) {
		t.Helper()
		_, err := e.Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), progress)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("err = %v", err)
		}
		if _, err := e.Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil); err != nil {
			t.Fatalf("%s: %v", unusable, err)
		}
	}
	e := newEngine(t, Options{Batch: 2, Workers: 2})
	failsThenWorks(e, func(Progress) { panic("boom") }, "panic", "engine unusable after a panic")
	// A panic on the batcher's goroutine, which every item shares, fails
	// the items in that batch and not the process or the batcher.
	r := convSR(t, e)
	var once sync.Once
	r.trace = func(q *request) { once.Do(func() { panic("boom in the batcher") }) }
	failsThenWorks(e, nil, "boom in the batcher", "batcher unusable after a panic")
	// Likewise a panic in a Run, on a lane's goroutine or (probing) the batcher's.
	r.trace = nil
	var twice sync.Once
	r.inject = func(h, w, rows int) error {
		twice.Do(func() { panic("boom in a Run") })
		return nil
	}
	failsThenWorks(e, nil, "boom in a Run", "batcher unusable after a panic in a Run")
	auto := newEngine(t, Options{Lanes: 1}) // its first Run is the batch probe, on the batcher's goroutine
	ra, err := auto.runner("conv-sr")
	if err != nil {
		t.Fatal(err)
	}
	var first sync.Once
	ra.inject = func(h, w, rows int) error {
		first.Do(func() { panic("boom in the probe") })
		return nil
	}
	failsThenWorks(auto, nil, "boom in the probe", "batcher unusable after a panic in the probe")
}

func TestCancelStopsItem(t *testing.T) {
	in := writeGradient(t, 32, 32)
	e := newEngine(t, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	_, err := e.Make(ctx, upscaleItem(in, 32, 8, intp(3)), func(p Progress) {
		if p.Step == 1 {
			cancel()
		}
	})
	if err == nil || !strings.Contains(err.Error(), "context canceled") {
		t.Fatalf("err = %v", err)
	}
}

func TestBaseSize(t *testing.T) {
	tests := []struct{ w, h, nw, nh, scale, mult, bw, bh, k int }{
		{1024, 1024, 64, 64, 4, 8, 64, 64, 2},
		{1024, 1024, 32, 32, 4, 8, 64, 64, 2}, // 2× native beats 0.5× native on a tie: fewer stages
		{512, 512, 32, 32, 4, 8, 32, 32, 2},
		{2048, 1024, 32, 32, 4, 8, 32, 16, 3}, // 0.71× native beats 2.8×
		{64, 64, 64, 64, 4, 8, 64, 64, 0},
		{1000, 600, 32, 32, 4, 8, 64, 40, 2},
	}
	for _, tt := range tests {
		bw, bh, k := baseSize(tt.w, tt.h, tt.nw, tt.nh, tt.scale, tt.mult)
		if bw != tt.bw || bh != tt.bh || k != tt.k {
			t.Errorf("baseSize(%dx%d, native %d) = %dx%d, %d stages; want %dx%d, %d", tt.w, tt.h, tt.nw, bw, bh, k, tt.bw, tt.bh, tt.k)
		}
	}
}

func TestAutoBatch(t *testing.T) {
	tests := []struct {
		budget, resident, growth, row int64
		want                          int
	}{
		{1 << 30, 100 << 20, 10 << 20, 1 << 20, 16},  // plenty: capped
		{1 << 30, 100 << 20, 100 << 20, 1 << 20, 9},  // (1024-100)/100
		{1 << 30, 1000 << 20, 100 << 20, 1 << 20, 1}, // nothing left
		{1 << 30, 100 << 20, 0, 50 << 20, 4},         // no growth seen: 4× the row's bytes
	}
	for _, tt := range tests {
		if got := autoBatch(tt.budget, tt.resident, tt.growth, tt.row, 16); got != tt.want {
			t.Errorf("autoBatch(%d, %d, %d, %d) = %d, want %d", tt.budget>>20, tt.resident>>20, tt.growth>>20, tt.row>>20, got, tt.want)
		}
	}
	// With auto batching the engine probes, then batches, and the result is the same.
	in := writeGradient(t, 20, 20)
	ref, err := newEngine(t, Options{Batch: 1}).Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil)
	if err != nil {
		t.Fatal(err)
	}
	// One lane: with several, the CPU runs a tile per Run on each instead.
	e := newEngine(t, Options{MemoryBudget: 2 << 30, Lanes: 1})
	res, err := e.Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxAbsDiff(res.Image, ref.Image); d > 1e-5 {
		t.Fatalf("auto batch changed the image by %g", d)
	}
	if s := e.Stats(); s.Runs >= s.Rows {
		t.Errorf("auto batching never batched: %d Runs for %d rows", s.Runs, s.Rows)
	}
}

func TestOutOfMemoryHalvesBatchThenTile(t *testing.T) {
	in := writeGradient(t, 24, 24)
	ref, err := newEngine(t, Options{Batch: 1}).Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil)
	if err != nil {
		t.Fatal(err)
	}
	e := newEngine(t, Options{Batch: 4})
	r := convSR(t, e)
	// Runs of more than two rows, and tiles above 32 pixels, "run out of memory".
	var failures atomic.Int64 // Runs on several lanes call inject at once
	r.inject = func(h, w, rows int) error {
		if rows > 2 || h > 32 {
			failures.Add(1)
			return fmt.Errorf("Failed to allocate memory for requested buffer of size %d", rows*h*w*12)
		}
		return nil
	}
	res, err := e.Make(context.Background(), upscaleItem(in, 64, 8, intp(3)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if failures.Load() == 0 || r.maxBatch.Load() > 2 {
		t.Fatalf("%d injected failures, batch limit %d", failures.Load(), r.maxBatch.Load())
	}
	// The halved tiles still cover the receptive field: the image is the same.
	if d := maxAbsDiff(res.Image, ref.Image); d > 1e-4 {
		t.Fatalf("image after halving differs by %g", d)
	}
	// A failure that is not about memory is not retried.
	r.inject = func(h, w, rows int) error { return errors.New("graph broken") }
	if _, err := e.Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil); err == nil || !strings.Contains(err.Error(), "graph broken") {
		t.Fatalf("err = %v", err)
	}
}

func TestClassify(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want ErrorClass
	}{
		{"plain", errors.New("run failed"), ClassTransient},
		{"session short of memory", fmt.Errorf("base.model: %w", &SessionError{Model: "m", Err: errors.New("failed to allocate memory")}), ClassTransient},
		{"provider", &SessionError{Model: "m", Err: &onnx.ProviderError{Provider: "cuda", Reason: "no library"}}, ClassEnvironment},
		{"session of corrupt weights", &SessionError{Model: "m", Err: errors.New("Deserialize tensor c1.bias failed")}, ClassModel},
		{"invalid, wrapped", fmt.Errorf("stage 1: %w", Invalidf("size 0x0")), ClassInvalid},
		{"model", ModelUnusable(errors.New("not ONNX")), ClassModel},
		{"first class wins", ModelUnusable(Invalidf("x")), ClassInvalid},
		{"name too long", &os.PathError{Op: "open", Path: "x", Err: syscall.ENAMETOOLONG}, ClassEnvironment},
		{"read-only", fmt.Errorf("write: %w", &os.PathError{Op: "open", Path: "x", Err: syscall.EROFS}), ClassEnvironment},
		{"disk full", &os.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}, ClassTransient},
		{"timeout beats its wrapping", Invalid(fmt.Errorf("stage: %w", context.DeadlineExceeded)), ClassTransient},
	}
	for _, c := range cases {
		if got := Classify(c.err); got != c.want {
			t.Errorf("%s: %v is %s, want %s", c.name, c.err, got, c.want)
		}
	}
	if Invalid(nil) != nil || ClassTransient.Permanent() || !ClassModel.Permanent() {
		t.Error("nil or permanence wrong")
	}
}

// MakePlan is pure: it needs only the manifests, asks for the SR model only
// where the plan has SR stages, and classifies what it refuses.
func TestMakePlanIsPure(t *testing.T) {
	r := models.Resolver{Dirs: []string{filepath.Join("..", "testdata", "models")}}
	asked := map[string]int{}
	describe := func(ref string) (*onnx.Manifest, error) {
		asked[ref]++
		return r.Manifest(ref)
	}
	// At the base model's size no SR model is needed, not even named.
	p, err := MakePlan(Item{Width: 32, Height: 32, Base: StageParams{Model: "demo-base"}}, describe)
	if err != nil || len(p.Stages) != 1 || p.Stages[0].Kind != "base" || asked["demo-sr"] != 0 {
		t.Fatalf("base-size plan %+v, %v, asked %v", p, err, asked)
	}
	if _, err := MakePlan(Item{Width: 256, Height: 256, Base: StageParams{Model: "demo-base"}}, describe); Classify(err) != ClassInvalid || !strings.Contains(err.Error(), "sr.model") {
		t.Fatalf("larger than native without SR: %v", err)
	}
	// An upscale of a 1024² input at ×4 costs what its tiles say.
	up := Item{Image: "in.png", InputWidth: 1024, InputHeight: 1024, Width: 4096, Height: 4096, SR: StageParams{Model: "demo-sr", Steps: 20, Strength: 1}}
	p, err = MakePlan(up, describe)
	if err != nil || len(p.Stages) != 1 || p.Stages[0].Width != 4096 {
		t.Fatalf("upscale plan %+v, %v", p, err)
	}
	if p.TileSteps() != p.Stages[0].Tiles*20 || p.TileSteps() <= 280 {
		t.Fatalf("tile steps %d for %d tiles", p.TileSteps(), p.Stages[0].Tiles)
	}
	// A model that is not there, or of the wrong kind, is the model's fault.
	if _, err := MakePlan(Item{Width: 64, Height: 64, Base: StageParams{Model: "nope"}}, describe); Classify(err) != ClassModel || !strings.Contains(err.Error(), "base.model") {
		t.Fatalf("unknown model: %v", err)
	}
	if _, err := MakePlan(Item{Width: 64, Height: 64, Base: StageParams{Model: "demo-sr"}}, describe); Classify(err) != ClassModel || !strings.Contains(err.Error(), "not a base model") {
		t.Fatalf("SR as base: %v", err)
	}
	if _, err := MakePlan(Item{Image: "x.png", InputWidth: 64, InputHeight: 64, Width: 256, Height: 256, SR: StageParams{Model: "demo-base"}}, describe); Classify(err) != ClassModel || !strings.Contains(err.Error(), "not an SR model") {
		t.Fatalf("base as SR: %v", err)
	}
}

// A stage's own batch (sr.batch in a job file) beats the engine's, and
// a Run that runs out of memory caps it like any other.
func TestStageBatchBeatsEngineBatch(t *testing.T) {
	in := writeGradient(t, 20, 20)
	ref, err := newEngine(t, Options{Batch: 1, Lanes: 1}).Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil)
	if err != nil {
		t.Fatal(err)
	}
	e := newEngine(t, Options{Batch: 1, Lanes: 1})
	r := convSR(t, e)
	var mu sync.Mutex
	most := 0
	r.inject = func(h, w, rows int) error {
		mu.Lock()
		defer mu.Unlock()
		most = max(most, rows)
		return nil
	}
	it := upscaleItem(in, 32, 8, intp(3))
	it.SR.Batch = 7 // more than the batcher gathers for the engine's batch of 1
	res, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	if most != 7 {
		t.Fatalf("largest Run had %d rows, want the stage's batch 7", most)
	}
	if d := maxAbsDiff(res.Image, ref.Image); d > 1e-5 {
		t.Fatalf("the stage's batch changed the image by %g", d)
	}
	// Runs of more than two rows "run out of memory": the stage's batch is capped at 2 (after the split).
	most = 0
	r.inject = func(h, w, rows int) error {
		mu.Lock()
		defer mu.Unlock()
		if rows > 2 {
			return fmt.Errorf("Failed to allocate memory for requested buffer of size %d", rows*h*w*12)
		}
		most = max(most, rows)
		return nil
	}
	if _, err := e.Make(context.Background(), it, nil); err != nil {
		t.Fatal(err)
	}
	if most != 1 && most != 2 || r.oomCap.Load() > 2 {
		t.Fatalf("after running out of memory: largest Run %d rows, cap %d", most, r.oomCap.Load())
	}
}

// With several devices (CPU sessions stand in for GPUs here) every model
// gets a session and batcher per device, they share the tiles of the items
// in flight, each runs one Run at a time, and the image is the one a
// single session makes.
func TestDevicesShareTheTiles(t *testing.T) {
	in := writeGradient(t, 20, 28)
	ref, err := newEngine(t, Options{Batch: 1, Lanes: 1}).Make(context.Background(), upscaleItem(in, 32, 8, intp(3)), nil)
	if err != nil {
		t.Fatal(err)
	}
	e := newEngine(t, Options{Batch: 1, Workers: 2, Devices: []int{0, 1, 2}})
	for k, img := range generateAtOnce(t, e, upscaleItem(in, 32, 8, intp(3)), 2) {
		if d := maxAbsDiff(img, ref.Image); d > 1.0/255 {
			t.Errorf("item %d: max difference %g from one session", k, d)
		}
	}
	r := e.runners["conv-sr"]
	if len(r.devs) != 3 {
		t.Fatalf("%d sessions, want one per device (3)", len(r.devs))
	}
	var total int64
	for _, d := range r.devs {
		t.Logf("device %d: %d Runs, at most %d at once", d.id, d.runs.Load(), d.peak.Load())
		if d.runs.Load() == 0 {
			t.Errorf("device %d ran nothing", d.id)
		}
		if p := d.peak.Load(); p != 1 {
			t.Errorf("device %d ran %d Runs at once, want 1", d.id, p)
		}
		total += d.runs.Load()
	}
	if s := e.Stats(); total != s.Runs {
		t.Errorf("devices ran %d Runs, the engine counted %d", total, s.Runs)
	}
	if ms := e.ModelStats(); len(ms) != 1 || ms[0].Devices != 3 || ms[0].Lanes != 3 {
		t.Errorf("model stats %+v, want 3 devices of one lane", ms)
	}
}

// A batch that runs out of memory is split and run again on the batcher's
// goroutine; no other Run may start beside it on a one-lane session.
func TestOutOfMemorySplitStaysInItsLane(t *testing.T) {
	in := writeGradient(t, 20, 20)
	e := newEngine(t, Options{Batch: 1, Lanes: 1})
	r := convSR(t, e)
	r.inject = func(h, w, rows int) error {
		if rows > 2 {
			time.Sleep(30 * time.Millisecond) // the next batch is ready by now
			return fmt.Errorf("Failed to allocate memory for requested buffer of size %d", rows*h*w*12)
		}
		return nil
	}
	it := upscaleItem(in, 32, 8, intp(3))
	it.SR.Batch = 3
	if _, err := e.Make(context.Background(), it, nil); err != nil {
		t.Fatal(err)
	}
	if p := r.devs[0].peak.Load(); p != 1 {
		t.Errorf("%d Runs at once on a one-lane session", p)
	}
	if c := r.oomCap.Load(); c != 1 {
		t.Errorf("batch cap after the split %d, want 1 (the first half of 3 rows)", c)
	}
}

// An input with transparency is composited on black, and the loader says
// it had some: a transparent pixel is black whatever colour it stores, a
// half-transparent one half its colour, an opaque one its own.
func TestLoadImageCompositesAlphaOnBlack(t *testing.T) {
	img := image.NewNRGBA(image.Rect(0, 0, 3, 1))
	img.Set(0, 0, color.NRGBA{255, 0, 0, 0})
	img.Set(1, 0, color.NRGBA{255, 0, 0, 128})
	img.Set(2, 0, color.NRGBA{0, 255, 0, 255})
	path := filepath.Join(t.TempDir(), "a.png")
	f, _ := os.Create(path)
	png.Encode(f, img)
	f.Close()
	px, w, h, translucent, err := loadImage(path)
	if err != nil || w != 3 || h != 1 || !translucent {
		t.Fatalf("load: %v %dx%d translucent %v", err, w, h, translucent)
	}
	red := px[0:3]
	if red[0] != -1 || math.Abs(float64(red[1])-(2*128.0/255-1)) > 0.01 || red[2] != -1 {
		t.Errorf("red channel %v, want black, half, none", red)
	}
	if g := px[3+2]; g != 1 {
		t.Errorf("opaque green %v", g)
	}
	if _, _, _, translucent, _ := loadImage(writeGradient(t, 4, 4)); translucent {
		t.Error("an opaque image reported translucent")
	}
}
