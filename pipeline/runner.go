package pipeline

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tessera/onnx"
	"tessera/stages"
)

// request is one tile (several rows for a classifier-free guidance pair)
// waiting for the model.
type request struct {
	h, w int
	// fill writes the tile's model input (C×h×w) and, for SR stages, its
	// conditioning straight into the batch buffers; lowres is nil for
	// models without a lowres input. It runs on the batcher's goroutine.
	fill       func(sample, lowres []float32) error
	t          float32
	noiseLevel float32
	classes    []int64 // one row per label; nil means one unlabelled row
	// contexts are the rows' context embeddings (L×D each, one per row as
	// classes are), nil for a model without a context input; ctxLen is L.
	contexts       [][]float32
	ctxLen, ctxDim int
	reply          chan<- response
	tile, step     int
	// batch, when positive, is the stage's own batch (sr.batch in the job),
	// which beats the runner's.
	batch int
	// ctx is the item's: once it ends the request is answered with its
	// error instead of being run.
	ctx context.Context
}

func (q *request) rows() int { return max(len(q.classes), len(q.contexts), 1) }

// response carries the model's prediction for every row of a request. The
// receiver hands pred back with runner.release once it is done with it.
type response struct {
	req  *request
	pred []float32 // rows×C×h×w
	err  error
}

// runner owns one model session and its batcher, which gathers requests
// from every item in flight into Runs of up to maxBatch rows of one tile
// shape.
type runner struct {
	ref   string
	model *onnx.Model
	// devs are the model's sessions: one per GPU of runtime.devices, else
	// one. Each has its own batcher goroutine (loop), and all of them take
	// requests from reqs, so that a device that is free takes the next tiles.
	devs []*device
	// channels is C, of the noisy sample and the prediction; lowresCh is
	// L, of the low-res conditioning (a separate input, or concatenated
	// after the sample's C when concat); outCh is the prediction output's,
	// C or 2C with a learned variance after the prediction.
	channels, lowresCh, outCh int
	concat                    bool
	reqs                      chan *request
	logger                    *slog.Logger

	maxBatch atomic.Int64
	// oomCap is the most rows a Run has fitted since one ran out of memory
	// (0: none has); it caps a stage's own batch too.
	oomCap atomic.Int64
	// auto is set when the batch is chosen from the memory budget by a
	// probe Run of each new tile shape; probed records the shapes done.
	// The first device's loop probes for all (and alone touches probed):
	// a probe reads the process's memory, which other devices' Runs move.
	auto     bool
	budget   int64
	probed   map[[2]int]bool
	runNanos atomic.Int64 // total time inside ONNX Runtime
	rowsRun  atomic.Int64

	// preds recycles prediction buffers: at a 4096² canvas a step's tiles
	// would otherwise leave hundreds of megabytes of garbage behind.
	preds sync.Pool
	// lanes is how many Runs may execute at once on each device (see
	// config runtime.lanes).
	lanes int
	// solo is the one-lane runner of the same model that a runner with
	// lanes makes, under Engine.mu, for stages of fewer tiles than lanes
	// (see Engine.stageRunner); nil until one is needed.
	solo *runner
	// schedules are the model's noise schedules by scheduler class, built
	// once (see schedulesOf) and shared with solo; read only.
	schedules map[string]schedule
	// inject, when set by tests, fails a Run before it starts (to stand in
	// for a device running out of memory, which a CPU test cannot cause).
	inject func(h, w, rows int) error
	// trace, when set by tests, sees every request as its batch is filled.
	trace func(q *request)
	// Fixed per model: whether timestep / noise level are one value per
	// Run, and whether they are integers (an integer noise level is in the
	// model's own units: see onnx.Manifest.NoiseLevelMax).
	scalarT, scalarNoise bool
	intT, intNoise       bool
	// noiseAbar is ᾱ of the schedule the low-res image is noised with
	// (the manifest's noise_scheduler_config); nil: the model's own.
	noiseAbar []float64
}

// device is one session of a runner's model with what its batcher
// goroutine (loop) owns: the prepared bindings per shape.
type device struct {
	id       int // the GPU of runtime.devices, or -1: the provider's own device_id
	sess     *onnx.Session
	bindings map[bindKey]*boundBatch
	// runs counts the device's Runs; running those executing now, and peak
	// the most that ever did at once (its lanes at most).
	runs, running, peak atomic.Int64
}

// close releases the runner's sessions and its solo runner's; their loops
// must have returned.
func (r *runner) close() {
	for _, d := range r.devs {
		d.sess.Close()
	}
	if r.solo != nil {
		r.solo.close()
	}
}

// session is the model's first session, for what all of them share
// (provider, threads).
func (r *runner) session() *onnx.Session { return r.devs[0].sess }

type bindKey struct{ h, w, n, ctxLen, ctxDim, slot int }

type boundBatch struct {
	dev  *device // whose session the binding belongs to
	h, w int     // tile shape and rows it was made for
	rows int
	// busy marks a binding in use (filled, or in flight); only the loop
	// goroutine reads or writes it.
	busy     bool
	bind     *onnx.Binding
	sample   []float32
	lowres   []float32
	t        []float32
	noise    []float32
	noiseInt []int64
	class    []int64
	context  []float32
	out      []float32
}

// groupKey says which requests may share a Run: one tile shape, one
// context length.
type groupKey struct {
	h, w           int
	ctxLen, ctxDim int
	t              float32
	noise          float32
}

func (r *runner) key(q *request) groupKey {
	k := groupKey{h: q.h, w: q.w, ctxLen: q.ctxLen, ctxDim: q.ctxDim}
	if r.scalarT {
		k.t = q.t
	}
	if r.scalarNoise {
		k.noise = q.noiseLevel
	}
	return k
}

// flight is a batch whose Run is executing (or about to) on its own goroutine.
type flight struct {
	batch []*request
	b     *boundBatch
	err   error
}

// loop serves requests until ctx ends. It keeps up to lanes Runs in flight,
// each on its own goroutine and binding, and fills the next batch into a
// free binding while they run, so that the copies into the batch buffers
// overlap the model's work and a lane that lands starts again at once.
//
// With several devices each runs its own loop. A loop then gathers only
// the next batch ahead of its Runs, so that it does not hold requests
// another device is free to run.
func (r *runner) loop(ctx context.Context, d *device) error {
	lanes := max(r.lanes, 1)
	landed := make(chan *flight, lanes)
	inFlight := 0
	var ready *flight // prepared, waiting for a free lane
	var pending []*request
	stageBatch := 0 // the largest stage batch (request.batch) seen
	launch := func() {
		inFlight++
		go func(f *flight) {
			f.err = r.execute(ctx, f.b)
			landed <- f
		}(ready)
		ready = nil
	}
	land := func(f *flight) {
		inFlight--
		f.b.busy = false
		// The lane works while the landed batch is copied out, unless that
		// batch ran out of memory and is about to be split and run again
		// here: a Run beside it would exceed the lanes.
		if ready != nil && ctx.Err() == nil && !(isOutOfMemory(f.err) && len(f.batch) > 1) {
			launch()
		}
		r.deliver(ctx, d, f.batch, f.b, f.err)
	}
	defer func() {
		for inFlight > 0 {
			land(<-landed)
		}
		// Whatever was accepted and not run is answered, not dropped.
		if ready != nil {
			pending = append(ready.batch, pending...)
		}
		for _, q := range pending {
			q.reply <- response{req: q, err: fmt.Errorf("model %s: engine closed", r.ref)}
		}
		for _, b := range d.bindings {
			b.bind.Close()
		}
	}()
	// There is room for requests up to four batches a lane, of the largest
	// batch asked for; with several devices, one batch, so that a loop does
	// not hold requests another device is free to run.
	ahead := 4 * lanes
	if len(r.devs) > 1 {
		ahead = 1
	}
	room := func() bool { return len(pending) < ahead*max(int(r.maxBatch.Load()), stageBatch) }
	for {
		if ready != nil && inFlight < lanes {
			launch()
			continue
		}
		if ready == nil && len(pending) > 0 {
			if pending = r.dropCanceled(pending); len(pending) == 0 {
				continue
			}
			k := r.key(pending[0])
			if r.auto && d == r.devs[0] && !r.probed[[2]int{k.h, k.w}] {
				for inFlight > 0 { // the probe measures its own Run alone
					land(<-landed)
				}
				r.probe(ctx, d, pending[0])
				pending = pending[1:]
				continue
			}
			var batch []*request
			batch, pending = r.take(pending, k)
			b, err := r.prepare(d, batch)
			if err != nil {
				r.deliver(ctx, d, batch, nil, err)
				continue
			}
			b.busy = true
			ready = &flight{batch: batch, b: b}
			continue
		}
		// Wait for a Run to land, or for requests while there is room to
		// gather them.
		var reqs <-chan *request
		if room() {
			reqs = r.reqs
		}
		select {
		case <-ctx.Done():
			return nil
		case f := <-landed:
			land(f)
		case q := <-reqs:
			pending = append(pending, q)
			stageBatch = max(stageBatch, q.batch)
			// Take whatever else is already queued, without waiting for more.
		drain:
			for room() {
				select {
				case q := <-r.reqs:
					pending = append(pending, q)
					stageBatch = max(stageBatch, q.batch)
				default:
					break drain
				}
			}
		}
	}
}

// dropCanceled answers the requests whose item has given up with its
// error, and returns the others.
func (r *runner) dropCanceled(pending []*request) []*request {
	kept := pending[:0]
	for _, q := range pending {
		if q.ctx != nil && q.ctx.Err() != nil {
			q.reply <- response{req: q, err: q.ctx.Err()}
			continue
		}
		kept = append(kept, q)
	}
	return kept
}

// take splits off the next batch: the requests of key k, in order, up to the
// batch limit in rows (a request is never split, so the first one always goes).
func (r *runner) take(pending []*request, k groupKey) (batch, rest []*request) {
	limit := int(r.maxBatch.Load())
	if b := pending[0].batch; b > 0 {
		limit = b
		if c := int(r.oomCap.Load()); c > 0 && c < limit {
			limit = c
		}
	}
	rows := 0
	for _, q := range pending {
		if r.key(q) == k && (rows == 0 || rows+q.rows() <= limit) {
			batch = append(batch, q)
			rows += q.rows()
			continue
		}
		rest = append(rest, q)
	}
	return batch, rest
}

// deliver answers the requests of a batch that ran (b) or failed (err). A
// Run that failed for lack of memory is retried in halves, and the batch
// limit is lowered.
func (r *runner) deliver(ctx context.Context, d *device, batch []*request, b *boundBatch, err error) {
	if err != nil && isOutOfMemory(err) && len(batch) > 1 {
		r.splitServe(ctx, d, batch, err)
		return
	}
	var preds [][]float32
	if err == nil {
		preds = r.collect(batch, b)
	}
	for i, q := range batch {
		resp := response{req: q, err: err}
		if err == nil {
			resp.pred = preds[i]
		}
		q.reply <- resp // the reply channel is buffered for every tile of the step
	}
}

// serve runs a batch now, on the loop's goroutine, and answers it.
func (r *runner) serve(ctx context.Context, d *device, batch []*request) {
	b, err := r.prepare(d, batch)
	if err == nil {
		b.busy = true
		err = r.execute(ctx, b)
		b.busy = false
	}
	r.deliver(ctx, d, batch, b, err)
}

// splitServe serves a batch that ran out of memory as two halves, and
// lowers the batch limit to the first half's rows.
func (r *runner) splitServe(ctx context.Context, d *device, batch []*request, err error) {
	half := len(batch) / 2
	rows := 0
	for _, q := range batch[:half] {
		rows += q.rows()
	}
	lowerTo(&r.oomCap, int64(max(rows, 1)), true)
	if lowerTo(&r.maxBatch, int64(max(rows, 1)), false) {
		r.logger.Warn("model ran out of memory; batch halved", "model", r.ref, "batch", rows, "err", err)
	}
	r.serve(ctx, d, batch[:half])
	r.serve(ctx, d, batch[half:])
}

// probe serves one request alone and sets the batch limit from how much the
// resident set grew for it (ONNX Runtime's arena sizing itself for the shape).
func (r *runner) probe(ctx context.Context, d *device, q *request) {
	before := residentBytes()
	r.serve(ctx, d, []*request{q})
	growth := residentBytes() - before
	rowBytes := int64(3 * 4 * r.channels * q.h * q.w) // sample, lowres and prediction, float32
	limit := maxAutoBatchCPU
	if d.sess.Provider() != "cpu" {
		limit = maxAutoBatchGPU
	}
	n := autoBatch(r.budget, residentBytes(), growth/int64(q.rows()), rowBytes, limit)
	r.probed[[2]int{q.h, q.w}] = true
	if c := int(r.oomCap.Load()); c > 0 {
		n = min(n, c) // a Run of more rows has run out of memory already
	}
	r.maxBatch.Store(int64(n))
	r.logger.Debug("batch chosen from the memory budget", "model", r.ref, "tile", fmt.Sprintf("%dx%d", q.w, q.h), "batch", n,
		"budget_mib", r.budget>>20, "probe_growth_mib", growth>>20)
}

func isOutOfMemory(err error) bool {
	if err == nil {
		return false
	}
	s := strings.ToLower(err.Error())
	return strings.Contains(s, "out of memory") || strings.Contains(s, "failed to allocate") || strings.Contains(s, "bad_alloc")
}

// prepare fills a free binding for the batch's shape and size with the
// batch's tiles and per-row inputs, so that it may fill one while others
// (the busy ones) run.
//
// A panic while filling (a bug, but one that runs on the batcher's
// goroutine, which every item shares) fails this batch's items only, with
// the stack in the log, and the batcher goes on serving the others.
func (r *runner) prepare(d *device, batch []*request) (b *boundBatch, err error) {
	defer func() {
		if p := recover(); p != nil {
			b, err = nil, r.panicked("while filling a batch", p)
		}
	}()
	q0 := batch[0]
	n := 0
	for _, q := range batch {
		n += q.rows()
	}
	b, err = r.bound(d, q0.h, q0.w, n, q0.ctxLen, q0.ctxDim)
	if err != nil {
		return nil, err
	}
	hw := q0.h * q0.w
	plane, lowPlane := r.samplePlane(hw), r.lowresCh*hw
	row := 0
	for _, q := range batch {
		if r.trace != nil {
			r.trace(q)
		}
		for j := 0; j < q.rows(); j++ {
			var lowres []float32
			sample := b.sample[row*plane : (row+1)*plane]
			switch {
			case r.concat: // [C noisy | L low-res] in one input
				sample, lowres = sample[:r.channels*hw], sample[r.channels*hw:]
			case b.lowres != nil:
				lowres = b.lowres[row*lowPlane : (row+1)*lowPlane]
			}
			if j == 0 {
				if err := q.fill(sample, lowres); err != nil {
					return nil, err
				}
			} else { // the other rows of a guidance pair see the same tile
				copy(b.sample[row*plane:(row+1)*plane], b.sample[(row-1)*plane:row*plane])
				if b.lowres != nil {
					copy(lowres, b.lowres[(row-1)*lowPlane:row*lowPlane])
				}
			}
			t := q.t
			if r.intT {
				t = float32(math.Round(float64(t)))
			}
			if len(b.t) == 1 {
				b.t[0] = t
			} else {
				b.t[row] = t
			}
			if b.noise != nil {
				if len(b.noise) == 1 {
					b.noise[0] = q.noiseLevel
				} else {
					b.noise[row] = q.noiseLevel
				}
			}
			if b.noiseInt != nil {
				v := int64(math.Round(float64(q.noiseLevel)))
				if len(b.noiseInt) == 1 {
					b.noiseInt[0] = v
				} else {
					b.noiseInt[row] = v
				}
			}
			if b.class != nil {
				if q.classes != nil {
					b.class[row] = q.classes[j]
				} else {
					b.class[row] = 0
				}
			}
			if b.context != nil {
				per := len(b.context) / b.rows
				if len(q.contexts) != q.rows() || len(q.contexts[j]) != per {
					return nil, fmt.Errorf("model %s: %d contexts for %d rows, or of other than %d values", r.ref, len(q.contexts), q.rows(), per)
				}
				copy(b.context[row*per:(row+1)*per], q.contexts[j])
			}
			row++
		}
	}
	return b, nil
}

// execute runs a prepared binding. It touches nothing but b and the
// counters, so it may run on its own goroutine. A panic fails the batch
// only, with the stack in the log.
func (r *runner) execute(ctx context.Context, b *boundBatch) (err error) {
	// The device's Runs at once are counted from here, the injected
	// failures of tests included, since those stand in for the device.
	d := b.dev
	for now := d.running.Add(1); ; {
		if p := d.peak.Load(); now <= p || d.peak.CompareAndSwap(p, now) {
			break
		}
	}
	defer func() {
		d.running.Add(-1)
		if p := recover(); p != nil {
			err = r.panicked("in a Run", p)
		}
	}()
	if r.inject != nil {
		if err := r.inject(b.h, b.w, b.rows); err != nil {
			return err
		}
	}
	start := time.Now()
	err = b.bind.Run(ctx)
	r.runNanos.Add(int64(time.Since(start)))
	if err != nil {
		return err
	}
	d.runs.Add(1)
	r.rowsRun.Add(int64(b.rows))
	return nil
}

// panicked logs a panic recovered where says (while filling a batch, in a
// Run) with its stack, and returns it as the error of the batch.
func (r *runner) panicked(where string, p any) error {
	r.logger.Error("panic "+where, "model", r.ref, "panic", p, "stack", string(debug.Stack()))
	return fmt.Errorf("internal error (panic) %s of %s: %v", where, r.ref, p)
}

// schedule returns a copy of the model's noise schedule for the sampler,
// for the caller to set its shift on.
func (r *runner) schedule(sampler string) (*stages.Schedule, error) {
	class, err := stages.SamplerClass(samplerKind(sampler))
	if err != nil {
		return nil, err
	}
	sc := r.schedules[class]
	if sc.err != nil {
		return nil, sc.err
	}
	s := *sc.s // AlphasCumprod is shared: samplers only read it
	return &s, nil
}

// lowerTo lowers a to v where a is above v (or, with unset, 0: none yet),
// atomically against the other devices' loops, and says whether it did.
func lowerTo(a *atomic.Int64, v int64, unset bool) bool {
	for {
		c := a.Load()
		if c <= v && !(unset && c == 0) {
			return false
		}
		if a.CompareAndSwap(c, v) {
			return true
		}
	}
}

// totalLanes is how many Runs of the model may execute at once, on all
// its devices.
func (r *runner) totalLanes() int { return max(r.lanes, 1) * len(r.devs) }

func (r *runner) stats() Stats {
	run := time.Duration(r.runNanos.Load()).Seconds()
	s := Stats{RunSeconds: run, BusySeconds: run / float64(r.totalLanes()), Rows: r.rowsRun.Load()}
	for _, d := range r.devs {
		s.Runs += d.runs.Load()
	}
	if r.solo != nil { // the solo runner's Runs count with the model's (r.solo is set under Engine.mu, which callers hold)
		s.add(r.solo.stats())
	}
	return s
}

// samplePlane is one row of the sample input: C channels, or C+L when the
// low-res image is concatenated after them.
func (r *runner) samplePlane(hw int) int {
	if r.concat {
		return (r.channels + r.lowresCh) * hw
	}
	return r.channels * hw
}

// collect copies each request's rows out of a binding that has run: of
// each row's output the prediction, the first C channels (a learned
// variance after them is not used by the samplers).
func (r *runner) collect(batch []*request, b *boundBatch) [][]float32 {
	plane := r.channels * b.h * b.w
	outPlane := r.outCh * b.h * b.w
	out := make([][]float32, len(batch))
	row := 0
	for i, q := range batch {
		k := q.rows()
		out[i] = r.predBuffer(k * plane)
		for j := 0; j < k; j++ {
			copy(out[i][j*plane:(j+1)*plane], b.out[(row+j)*outPlane:(row+j)*outPlane+plane])
		}
		row += k
	}
	return out
}

// predBuffer returns a buffer of n values, recycled where one is free.
func (r *runner) predBuffer(n int) []float32 {
	if p, ok := r.preds.Get().(*[]float32); ok && cap(*p) >= n {
		return (*p)[:n]
	}
	return make([]float32, n)
}

// release hands a prediction buffer back for reuse.
func (r *runner) release(buf []float32) {
	r.preds.Put(&buf)
}

// bound returns a binding for n rows of h×w tiles that is not busy: of
// those kept for that shape (one per lane, one being filled and one for a
// retry), the first free one.
func (r *runner) bound(d *device, h, w, n, ctxLen, ctxDim int) (*boundBatch, error) {
	key := bindKey{h, w, n, ctxLen, ctxDim, 0}
	for {
		b, ok := d.bindings[key]
		if !ok {
			break
		}
		if !b.busy {
			return b, nil
		}
		key.slot++
	}
	m := r.model
	plane := r.samplePlane(h * w)
	b := &boundBatch{dev: d, h: h, w: w, rows: n, sample: make([]float32, n*plane)}
	inputs := map[string]onnx.Tensor{}
	for _, io := range m.Inputs {
		switch io.Role {
		case onnx.RoleSample:
			inputs[io.Name] = onnx.FloatTensor(b.sample, int64(n), int64(plane/(h*w)), int64(h), int64(w))
		case onnx.RoleLowres:
			b.lowres = make([]float32, n*r.lowresCh*h*w)
			inputs[io.Name] = onnx.FloatTensor(b.lowres, int64(n), int64(r.lowresCh), int64(h), int64(w))
		case onnx.RoleTimestep:
			b.t, inputs[io.Name] = perRow(io, n)
		case onnx.RoleNoiseLevel:
			if r.intNoise {
				b.noiseInt, inputs[io.Name] = perRowInt(io, n)
			} else {
				b.noise, inputs[io.Name] = perRow(io, n)
			}
		case onnx.RoleClass:
			b.class = make([]int64, n)
			inputs[io.Name] = onnx.IntTensor(b.class, int64(n))
		case onnx.RoleContext:
			if ctxLen < 1 || ctxDim < 1 {
				return nil, fmt.Errorf("model %s: input %q (context) needs the item's context", r.ref, io.Name)
			}
			b.context = make([]float32, n*ctxLen*ctxDim)
			inputs[io.Name] = onnx.FloatTensor(b.context, int64(n), int64(ctxLen), int64(ctxDim))
		default:
			return nil, fmt.Errorf("model %s: input %q (%s) cannot be fed by the pipeline", r.ref, io.Name, io.Role)
		}
	}
	bind, err := d.sess.Bind(inputs)
	if err != nil {
		return nil, err
	}
	out, ok := bind.Output(m.Output(onnx.RolePrediction).Name)
	if want := n * r.outCh * h * w; !ok || len(out.Float) != want {
		bind.Close()
		return nil, fmt.Errorf("model %s: prediction output has %d values, want %d (%d rows of %d channels)", r.ref, len(out.Float), want, n, r.outCh)
	}
	b.bind, b.out = bind, out.Float
	if len(d.bindings) > 16+2*r.lanes {
		for k, old := range d.bindings {
			if !old.busy {
				old.bind.Close()
				delete(d.bindings, k)
			}
		}
	}
	d.bindings[key] = b
	return b, nil
}

// perRowInt is perRow for an integer input.
func perRowInt(io onnx.IO, n int) ([]int64, onnx.Tensor) {
	if len(io.Shape) == 0 {
		buf := make([]int64, 1)
		return buf, onnx.Tensor{Int: buf}
	}
	if io.Shape[0] == 1 {
		buf := make([]int64, 1)
		return buf, onnx.IntTensor(buf, 1)
	}
	buf := make([]int64, n)
	return buf, onnx.IntTensor(buf, int64(n))
}

// perRow makes the buffer of a per-row scalar input: [n], or one value when
// the graph takes a scalar or [1].
func perRow(io onnx.IO, n int) ([]float32, onnx.Tensor) {
	if len(io.Shape) == 0 {
		buf := make([]float32, 1)
		return buf, onnx.Tensor{Float: buf}
	}
	if io.Shape[0] == 1 {
		buf := make([]float32, 1)
		return buf, onnx.FloatTensor(buf, 1)
	}
	buf := make([]float32, n)
	return buf, onnx.FloatTensor(buf, int64(n))
}
