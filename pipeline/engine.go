package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"tessera/models"
	"tessera/onnx"
	"tessera/stages"
)

// Options configure an Engine.
type Options struct {
	// Workers is how many items the caller runs at once; sessions divide the
	// CPU threads among min(Workers, models) so they do not oversubscribe.
	Workers int
	// Batch is the most tile rows per Run; 0 picks it per model and tile
	// shape from MemoryBudget with one probe Run.
	Batch int
	// MemoryBudget bounds what auto batching may use, in bytes; 0 means
	// half of the machine's available memory.
	MemoryBudget int64
	// Lanes, when positive, overrides runtime.lanes for CPU sessions.
	Lanes int
	// TextCache is a directory where text encoders' embeddings are kept
	// between processes, by the encoder's hash and the token ids; "" for none.
	TextCache string
	// Devices, when set, overrides runtime.devices: one session and batcher
	// per device for every model. Tests use it on the CPU, where the
	// sessions stand in for GPUs.
	Devices []int
	// MeasureDecode makes Generate measure each decode's time and memory
	// (Result.Decodes). It restarts the process's peak resident count at
	// each decode, so it is for one item at a time (bench).
	MeasureDecode bool
}

// Engine runs items through cascades. It keeps one session and batcher per
// model for its whole life; Generate may be called from many goroutines.
type Engine struct {
	env      *onnx.Env
	resolver models.Resolver
	opts     Options
	logger   *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	group  *errgroup.Group

	mu       sync.Mutex
	runners  map[string]*runner
	texts    map[string]*textEncoder // by text encoder path
	decoders map[string]*decoder     // by autoencoder folder
	encoders map[string]*encoder     // by autoencoder folder
	closed   bool
}

// New returns an engine; Close releases its sessions.
func New(env *onnx.Env, resolver models.Resolver, opts Options, logger *slog.Logger) *Engine {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, ctx := errgroup.WithContext(ctx)
	return &Engine{env: env, resolver: resolver, opts: opts, logger: logger, ctx: ctx, cancel: cancel, group: g, runners: map[string]*runner{}, texts: map[string]*textEncoder{}, decoders: map[string]*decoder{}, encoders: map[string]*encoder{}}
}

// Close stops the batchers and releases the sessions. It is safe to call
// more than once.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	e.mu.Unlock()
	e.cancel()
	err := e.group.Wait()
	for _, r := range e.runners {
		r.close()
	}
	for _, t := range e.texts {
		t.mu.Lock() // a Run on a caller's goroutine finishes first
		t.sess.Close()
		t.mu.Unlock()
	}
	for _, d := range e.decoders {
		d.close()
	}
	for _, x := range e.encoders {
		x.close()
	}
	return err
}

// Stats are the engine's totals so far.
type Stats struct {
	RunSeconds float64 // time inside ONNX Runtime, all models, summed over Runs
	// BusySeconds is RunSeconds with each model's Run time divided by its
	// lanes: the wall time the models would have taken with every lane busy.
	// With one lane it is RunSeconds; wall ÷ BusySeconds is the pipeline's
	// overhead either way.
	BusySeconds float64
	Rows        int64 // tile rows evaluated
	Runs        int64
}

func (s *Stats) add(o Stats) {
	s.RunSeconds += o.RunSeconds
	s.BusySeconds += o.BusySeconds
	s.Rows += o.Rows
	s.Runs += o.Runs
}

// SessionError is a model's session that could not be created. Unless it
// wraps an *onnx.ProviderError (the configured providers cannot attach),
// it may pass (a device short of memory, say), so callers retry the item.
type SessionError struct {
	Model string
	Err   error
}

func (e *SessionError) Error() string { return e.Err.Error() }
func (e *SessionError) Unwrap() error { return e.Err }

// ModelStats are one model's counters.
type ModelStats struct {
	Model    string
	Provider string
	Lanes    int // Runs at once, on all devices
	Devices  int // sessions: one per GPU of runtime.devices, else 1
	Threads  int // intra-op threads of each Run
	Stats
}

// ModelStats returns the counters of each model the engine has loaded.
func (e *Engine) ModelStats() []ModelStats {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]ModelStats, 0, len(e.runners))
	for _, r := range e.runners {
		out = append(out, ModelStats{Model: r.ref, Provider: r.session().Provider(), Lanes: r.totalLanes(), Devices: len(r.devs), Threads: r.session().Threads(), Stats: r.stats()})
	}
	for _, t := range e.texts {
		run := time.Duration(t.nanos.Load()).Seconds()
		out = append(out, ModelStats{Model: t.path, Provider: t.sess.Provider(), Lanes: 1, Devices: 1, Threads: t.sess.Threads(),
			Stats: Stats{RunSeconds: run, BusySeconds: run, Runs: t.runs.Load()}})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Model < out[j].Model })
	return out
}

// Stats sums the counters of every model.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	var s Stats
	for _, r := range e.runners {
		s.add(r.stats())
	}
	return s
}

// runner returns the model's runner, creating its session and batcher on first use.
func (e *Engine) runner(ref string) (*runner, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, errors.New("engine closed")
	}
	if r, ok := e.runners[ref]; ok {
		return r, nil
	}
	m, err := e.resolver.Resolve(e.env, ref)
	if err != nil {
		return nil, ModelUnusable(err)
	}
	if c := m.CheckContract(); !c.Fits {
		return nil, ModelUnusable(fmt.Errorf("model %s does not fit the %s contract: %v", ref, c.Kind, c.Problems))
	}
	if m.Manifest == nil {
		return nil, ModelUnusable(fmt.Errorf("model %s has neither a tessera.yaml nor a diffusers config.json: the pipeline needs its kind, schedule and prediction type", ref))
	}
	for _, c := range m.Manifest.Conflicts {
		e.logger.Warn("model: tessera.yaml contradicts the diffusers configs", "model", ref, "conflict", c)
	}
	schedules, err := schedulesOf(m)
	if err == nil {
		err = schedules[stages.ClassDDIM].err // reject a bad schedule before any work
	}
	if err != nil {
		return nil, ModelUnusable(fmt.Errorf("model %s: %w", ref, err))
	}
	r, err := e.newRunner(ref, m, e.lanes(m), schedules)
	if err != nil {
		return nil, err
	}
	e.runners[ref] = r
	return r, nil
}

// stageRunner is the runner for a stage: the model's, or where the stage
// has fewer tiles a step than the model's lanes (a small canvas in one
// tile), its solo runner, one lane with all of the lanes' threads, made
// on first use. A lone single-threaded Run would leave the other lanes'
// cores idle; on two cores a 256² stage of one tile took twice its Run time.
func (e *Engine) stageRunner(sp StagePlan) (*runner, error) {
	r, err := e.runner(sp.Model)
	if err != nil || r.lanes <= 1 || sp.Tiles >= r.lanes {
		return r, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, errors.New("engine closed")
	}
	if r.solo == nil {
		solo, err := e.newRunner(r.ref, r.model, 1, r.schedules)
		if err != nil {
			return nil, err
		}
		r.solo = solo
	}
	return r.solo, nil
}

// newRunner creates a runner of the given lanes (on each device) for the
// resolved model m, with its sessions, and starts its batchers. The caller
// holds e.mu.
func (e *Engine) newRunner(ref string, m *onnx.Model, lanes int, schedules map[string]schedule) (*runner, error) {
	// With several items in flight a base and an SR session may run at once;
	// they share the CPU threads between them, and each lane is a Run at once.
	concurrent := 1
	if e.opts.Workers > 1 {
		concurrent = 2
	}
	ids := e.devices()
	if len(ids) == 0 {
		ids = []int{-1} // the provider's own device_id
	}
	r := &runner{
		ref: ref, model: m, channels: m.Channels(), lanes: lanes, schedules: schedules,
		reqs: make(chan *request, 64), logger: e.logger,
	}
	r.lowresCh, r.outCh = r.channels, r.channels
	if man := m.Manifest; man != nil && man.NoiseScheduler != "" {
		// The low-res image is noised on the pipeline's noising schedule.
		abar, err := noiseSchedule(man.NoiseScheduler)
		if err != nil {
			return nil, ModelUnusable(fmt.Errorf("model %s: noise_scheduler_config: %w", ref, err))
		}
		r.noiseAbar = abar
	}
	if man := m.Manifest; man != nil {
		r.lowresCh, r.concat = man.Lowres(), man.LowresConcat
		if man.LearnedVariance() {
			r.outCh = 2 * r.channels
		}
	}
	for _, id := range ids {
		o := onnx.SessionOptions{Concurrent: concurrent * lanes * len(ids)}
		if id >= 0 {
			rt := e.env.Config()
			rt.CUDA.DeviceID, rt.TensorRT.DeviceID = id, id
			o.Runtime = &rt
		}
		sess, err := e.env.NewSession(m, o)
		if err != nil {
			r.close()
			if id >= 0 {
				err = fmt.Errorf("device %d: %w", id, err)
			}
			return nil, &SessionError{Model: ref, Err: err}
		}
		r.devs = append(r.devs, &device{id: id, sess: sess, bindings: map[bindKey]*boundBatch{}})
	}
	if t := m.Input(onnx.RoleTimestep); t != nil {
		r.scalarT = len(t.Shape) == 0 || t.Shape[0] == 1
		r.intT = t.Type == onnx.Int64 || t.Type == onnx.Int32
	}
	if nl := m.Input(onnx.RoleNoiseLevel); nl != nil {
		r.scalarNoise = len(nl.Shape) == 0 || nl.Shape[0] == 1
		r.intNoise = nl.Type == onnx.Int64 || nl.Type == onnx.Int32
	}
	switch {
	case e.opts.Batch > 0:
		r.maxBatch.Store(int64(e.opts.Batch))
	case lanes > 1:
		// Lanes keep the cores busy, and a step's tiles spread evenly over
		// them one by one: auto is one tile a Run, without a probe.
		r.maxBatch.Store(1)
	default:
		r.auto, r.budget, r.probed = true, memoryBudget(e.opts.MemoryBudget), map[[2]int]bool{}
		r.maxBatch.Store(1)
	}
	for _, d := range r.devs {
		e.group.Go(func() error { return r.loop(e.ctx, d) })
		e.logger.Debug("model session ready", "model", ref, "provider", d.sess.Provider(), "device", d.id, "lanes", lanes, "threads_per_run", d.sess.Threads())
	}
	return r, nil
}

// noiseSchedule reads a noising scheduler's config (low_res_scheduler,
// image_noising_scheduler) and returns its ᾱ.
func noiseSchedule(path string) ([]float64, error) {
	data, err := onnx.ReadConfigFile(path)
	if err != nil {
		return nil, err
	}
	c, err := stages.ParseSchedulerConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s, err := c.Schedule()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s.AlphasCumprod, nil
}

// devices are the GPUs every model gets a session on: Options.Devices, else
// runtime.devices where the first provider is a GPU's; none means one
// session on the provider's own device_id.
func (e *Engine) devices() []int {
	if len(e.opts.Devices) > 0 {
		return e.opts.Devices
	}
	if rt := e.env.Config(); rt.GPU() {
		return rt.Devices
	}
	return nil
}

// lanes is how many Runs of m may execute at once: Options.Lanes, else
// runtime.lanes, else (auto) on the CPU for an SR model one per thread, at
// most maxAutoLanes. Each Run gets its share of the threads. On two cores,
// two single-threaded Runs at once did demo-sr's 256² tiles in 19 ms a
// tile where one two-threaded Run at a time did 22: a small model's
// operators are too short to split across threads without the threads
// waiting on each other. A stage of fewer tiles than lanes goes to the
// model's solo runner (stageRunner). A base stage has one tile a step, so
// a base model keeps one lane; so does a GPU, which runs one kernel stream.
//
// Auto lanes are not divided among the items in flight: the SR model
// still has tiles enough for every core, and a base Run beside it only
// oversubscribes for a moment. Four 512² images, two at a time on two
// cores, took 9.3 s with one SR lane and 5.6 to 5.9 s with two (one at a
// time: 6.2 s).
func (e *Engine) lanes(m *onnx.Model) int {
	rt := e.env.Config()
	if rt.GPU() || len(e.opts.Devices) > 1 {
		return 1
	}
	if e.opts.Lanes > 0 {
		return e.opts.Lanes
	}
	if rt.Lanes > 0 {
		return rt.Lanes
	}
	if m.Kind != onnx.KindSR && !(m.Manifest != nil && m.Manifest.Space == onnx.SpaceLatent && m.Manifest.Encoder) {
		return 1 // a base model's stage is one tile; one that can img2img has many
	}
	return min(max(rt.IntraOpThreads(), 1), maxAutoLanes)
}

// maxAutoLanes bounds auto lanes: each lane needs a tile of its own in
// flight, and the last tiles of a stage leave lanes idle.
const maxAutoLanes = 4

// schedule is a model's noise schedule for one diffusers scheduler class,
// or why it has none.
type schedule struct {
	s   *stages.Schedule
	err error
}

// schedulesOf builds the model's noise schedule for each scheduler class a
// sampler stands for (stages.SamplerClass), from its manifest (or the
// diffusers scheduler_config.json it names, read once), over the defaults
// of that class. Only a scheduler_config that cannot be read fails all of them.
func schedulesOf(m *onnx.Model) (map[string]schedule, error) {
	var data []byte
	if m.Manifest.SchedulerConfig != "" {
		var err error
		if data, err = os.ReadFile(m.Manifest.SchedulerConfig); err != nil {
			return nil, fmt.Errorf("scheduler_config: %w", err)
		}
	}
	out := map[string]schedule{}
	for _, class := range []string{stages.ClassDDIM, stages.ClassEuler, stages.ClassDPMSolver} {
		s, err := scheduleOf(m.Manifest, data, class)
		out[class] = schedule{s, err}
	}
	return out, nil
}

// scheduleOf builds one class's schedule; data is the scheduler_config
// the manifest names, if it names one.
func scheduleOf(man *onnx.Manifest, data []byte, class string) (*stages.Schedule, error) {
	if man.SchedulerConfig != "" {
		cfg, err := stages.ParseSchedulerConfigAs(data, class)
		if err != nil {
			return nil, fmt.Errorf("scheduler_config %s: %w", man.SchedulerConfig, err)
		}
		cfg.PredictionType = man.Prediction
		return cfg.Schedule()
	}
	cfg, err := stages.SchedulerDefaults(class)
	if err != nil {
		return nil, err
	}
	s := man.Schedule
	cfg.NumTrainTimesteps, cfg.BetaSchedule, cfg.BetaStart, cfg.BetaEnd = s.NumTrainTimesteps, s.BetaSchedule, s.BetaStart, s.BetaEnd
	if s.TimestepSpacing != "" {
		cfg.TimestepSpacing = s.TimestepSpacing
	}
	cfg.StepsOffset = s.StepsOffset
	cfg.PredictionType = man.Prediction
	return cfg.Schedule()
}

// largeCanvas is the canvas size in bytes above which a stage returns freed
// memory to the system between its setup and its steps.
const largeCanvas = 64 << 20

// Result is a finished image.
type Result struct {
	Image    []float32 // C×Height×Width in [-1, 1]
	Channels int
	Width    int
	Height   int
	Plan     Plan
	Seconds  float64
	// Decodes are the decodes' measurements, with Options.MeasureDecode.
	Decodes []DecodeStats
}

// DecodeStats is one decode's time and memory: the process's resident set
// when it began, its peak before (since the caller's last
// ResetPeakResident) and its peak during the decode.
type DecodeStats struct {
	Stage          int
	Seconds        float64
	ResidentBefore int64
	PeakBefore     int64
	Peak           int64
}

// Growth is what the decode added to the resident set at its peak: the
// decoder's own share of the item's memory.
func (d DecodeStats) Growth() int64 { return max(d.Peak-d.ResidentBefore, 0) }

// Progress reports one finished sampler step of one stage.
type Progress struct {
	Item       int
	Stage      int
	Stages     int
	Step       int // 1-based
	Steps      int
	TileSteps  int // done so far in this item
	TotalTiles int // the item's TileSteps
}

// Plan is MakePlan with the engine's models: what a caller that has not
// queued the item (bench, tests) uses to make the plan Generate takes.
func (e *Engine) Plan(it Item) (Plan, error) {
	return MakePlan(it, e.resolver.Manifests())
}

// Make is what the queue does for an item, for a caller without a queue
// (bench, tests): the input's header read (SetInput), the plan made
// (Plan), then Generate by that plan.
func (e *Engine) Make(ctx context.Context, it Item, progress func(Progress)) (*Result, error) {
	if err := it.SetInput(); err != nil {
		return nil, err
	}
	plan, err := e.Plan(it)
	if err != nil {
		return nil, err
	}
	return e.Generate(ctx, it, plan, progress)
}

// tileGrid lays the stage's tiles: sizes and origins on the model's size
// multiple, so that a U-Net that downsamples by it sees each tile on the
// same pixel grid as the whole canvas.
func tileGrid(sp StagePlan, man *onnx.Manifest) (*stages.TileGrid, error) {
	return stages.NewTileGrid(sp.Height, sp.Width, stages.TileOptions{
		Size: sp.TileSize, Multiple: man.SizeMultiple, Align: man.SizeMultiple,
		Overlap: sp.Overlap, Halo: sp.Halo, Pad: stages.PadReflect,
	})
}

func lcm(a, b int) int {
	g := a
	for x := b; x != 0; {
		g, x = x, g%x
	}
	return a / g * b
}

// Generate makes the item's image by its plan (MakePlan, made when the
// item was queued). Errors are classified (see Classify). A panic inside is recovered and
// returned as this item's error, with the stack in the log.
func (e *Engine) Generate(ctx context.Context, it Item, plan Plan, progress func(Progress)) (res *Result, err error) {
	defer func() {
		if p := recover(); p != nil {
			e.logger.Error("panic while generating item", "item", it.Index, "panic", p, "stack", string(debug.Stack()))
			res, err = nil, fmt.Errorf("internal error (panic): %v", p)
		}
	}()
	start := time.Now()
	if len(plan.Stages) == 0 {
		return nil, Invalidf("the item has no plan: it was queued by an older tessera; submit its job file again")
	}
	if plan.Width != it.Width || plan.Height != it.Height {
		return nil, Invalidf("plan: %d stages to %dx%d do not make the item's %dx%d", len(plan.Stages), plan.Width, plan.Height, it.Width, it.Height)
	}
	plan.Stages = append([]StagePlan(nil), plan.Stages...) // the caller's stays as it was
	for i := range plan.Stages {
		if plan.Stages[i].Batch == 0 {
			plan.Stages[i].Batch = e.opts.Batch // recorded; 0 is the runner's own choice
		}
	}
	files, err := loadContexts(it) // context files, read once for every stage
	if err != nil {
		return nil, err
	}
	var img []float32
	var decodes []DecodeStats
	w, h := it.InputWidth, it.InputHeight
	if it.Image != "" {
		var iw, ih int
		var translucent bool
		if img, iw, ih, translucent, err = loadImage(it.Image); err != nil {
			return nil, err // classified by loadImage
		}
		if translucent {
			e.logger.Warn("input image has transparency; composited on black", "item", it.Index, "image", it.Image)
		}
		if iw != w || ih != h {
			return nil, Invalidf("image %s: %dx%d now, %dx%d when the item was queued (submit it again)", it.Image, iw, ih, w, h)
		}
	}
	e.logger.Debug("cascade plan", "item", it.Index, "plan", plan)
	total := plan.TileSteps()
	done := 0
	report := func(stage, step, steps, tiles int) {
		done += tiles
		if progress != nil {
			progress(Progress{Item: it.Index, Stage: stage, Stages: len(plan.Stages), Step: step, Steps: steps, TileSteps: done, TotalTiles: total})
		}
	}
	c := 3
	for si, sp := range plan.Stages {
		r, err := e.stageRunner(sp)
		if err != nil {
			return nil, err
		}
		if want := modelKind(sp.Kind); r.model.Kind != want {
			field := want
			if sp.Kind == KindImg2Img {
				field = "sr" // an img2img stage's model is the job's sr.model
			}
			return nil, ModelUnusable(fmt.Errorf("%s.model: %s is a %s model now (it was queued for a %s stage, which needs a %s model; submit it again)", field, sp.Model, r.model.Kind, sp.Kind, want))
		}
		ctxs, err := e.stageContexts(ctx, it, sp, r, files)
		if err != nil {
			return nil, err
		}
		if ctxs != nil && ctxs.cut != "" {
			plan.PromptCut = ctxs.cut // recorded in the sidecar with the plan
		}
		switch sp.Kind {
		case onnx.KindBase:
			img, err = e.runStage(ctx, it, si, sp, r, nil, nil, ctxs, report)
		default:
			// An SR stage upsamples the previous image as its low-res
			// conditioning; an img2img stage starts from the input
			// encoded (once: the tiling does not change it).
			var start []float32
			if sp.Kind == KindImg2Img {
				if start, err = e.img2imgStart(ctx, sp, img, c, h, w); err != nil {
					return nil, fmt.Errorf("stage %d (img2img): %w", si, err)
				}
			} else if c != r.lowresCh {
				return nil, ModelUnusable(fmt.Errorf("sr.model: %s takes a %d-channel low-res image; stage %d gets %d channels", sp.Model, r.lowresCh, si, c))
			}
			prev, stageStart := img, done
			for {
				up, init := []float32(nil), start
				if sp.Kind != KindImg2Img {
					up = make([]float32, c*sp.Height*sp.Width)
					if err := stages.Resample(up, prev, c, h, w, sp.Height, sp.Width, stages.Filter(sp.Filter)); err != nil {
						return nil, fmt.Errorf("stage %d: upsample: %w", si, err)
					}
					// A sample of the low-res image's channels starts from
					// it, noised to the strength; latents beside pixels start
					// from noise (MakePlan holds their strength to 1).
					if r.channels == r.lowresCh {
						init = up
					}
				}
				img, err = e.runStage(ctx, it, si, sp, r, up, init, ctxs, report)
				var big *tileTooLarge
				if !errors.As(err, &big) {
					break
				}
				// Even one tile per Run did not fit: start the stage over
				// with half the tile. The noise does not depend on the
				// tiling, so the image is the one that tile would have given.
				smaller := sp
				smaller.TileSize = big.tile / 2
				g, gerr := tileGrid(smaller, r.model.Manifest)
				if gerr != nil {
					break // reported below
				}
				smaller.Tiles = len(g.Tiles)
				e.logger.Warn("tile too large for memory; stage restarted with half the tile", "item", it.Index, "stage", si, "tile", g.TileHeight, "tiles", len(g.Tiles), "err", big.err)
				sp, plan.Stages[si] = smaller, smaller
				done, total = stageStart, plan.TileSteps()
				// Enough tiles now for every lane, perhaps, where the
				// larger tile went to the solo runner.
				if r, err = e.stageRunner(sp); err != nil {
					break
				}
			}
		}
		if err != nil {
			var big *tileTooLarge
			if errors.As(err, &big) {
				err = fmt.Errorf("%w (no smaller tile possible)", big.err)
			}
			return nil, fmt.Errorf("stage %d (%s, %dx%d): %w", si, sp.Kind, sp.Width, sp.Height, err)
		}
		w, h, c = sp.Width, sp.Height, r.channels
		if sp.Decode != nil {
			var ds DecodeStats
			if e.opts.MeasureDecode {
				ds = DecodeStats{Stage: si, PeakBefore: PeakResidentBytes(), ResidentBefore: residentBytes()}
				ResetPeakResident()
			}
			t0 := time.Now()
			if img, err = e.decode(ctx, sp.Decode, img, c, h, w); err != nil {
				return nil, fmt.Errorf("stage %d: decode: %w", si, err)
			}
			if e.opts.MeasureDecode {
				ds.Seconds, ds.Peak = time.Since(t0).Seconds(), PeakResidentBytes()
				decodes = append(decodes, ds)
			}
			w, h, c = w*sp.Decode.Factor, h*sp.Decode.Factor, 3
		}
	}
	if plan.Resample {
		out := make([]float32, c*it.Height*it.Width)
		if err := stages.Resample(out, img, c, h, w, it.Height, it.Width, stages.FilterLanczos); err != nil {
			return nil, fmt.Errorf("final resample: %w", err)
		}
		img = out
	}
	return &Result{Image: img, Channels: c, Width: it.Width, Height: it.Height, Plan: plan, Seconds: time.Since(start).Seconds(), Decodes: decodes}, nil
}

// modelKind is the kind of model a stage of kind k runs: an img2img
// stage's is a base model.
func modelKind(k string) string {
	if k == KindImg2Img {
		return onnx.KindBase
	}
	return k
}

// img2imgStart is an img2img stage's starting point: the previous image
// (c×h×w pixels: the input) resized to the stage's canvas in pixels and,
// for a latent stage, encoded in tiles.
func (e *Engine) img2imgStart(ctx context.Context, sp StagePlan, img []float32, c, h, w int) ([]float32, error) {
	if sp.Encode == nil {
		return nil, Invalidf("img2img: the plan has no encode (it was queued by an older tessera; submit it again)")
	}
	f := sp.Encode.Factor
	if c != 3 {
		return nil, Invalidf("img2img: the input has %d channels, want 3", c)
	}
	H, W := sp.Height*f, sp.Width*f
	up := img
	if H != h || W != w {
		up = make([]float32, 3*H*W)
		if err := stages.Resample(up, img, 3, h, w, H, W, stages.Filter(sp.Filter)); err != nil {
			return nil, fmt.Errorf("img2img: resize: %w", err)
		}
	}
	z, err := e.encode(ctx, sp.Encode, up, sp.Height, sp.Width)
	if err != nil {
		return nil, fmt.Errorf("encode: %w", err)
	}
	return z, nil
}

// runStage samples one stage. lowres is the previous image upsampled to
// this stage's size (nil for the base stage), the model's low-res
// conditioning; init, where the stage does not start from noise, is what
// it starts from, noised to the stage's strength (the upsampled image of a
// pixel SR stage, an img2img stage's image or latents). Per step the canvas is cut
// into tiles, the tiles go to the model's batcher, their predictions are
// converted to x0 and fused with the windows, and the sampler steps the
// whole canvas once.
func (e *Engine) runStage(ctx context.Context, it Item, si int, sp StagePlan, r *runner, lowres, init []float32, ctxs *itemContexts, report func(stage, step, steps, tiles int)) ([]float32, error) {
	c, H, W := r.channels, sp.Height, sp.Width
	n := c * H * W
	sched, err := r.schedule(sp.Sampler)
	if err != nil {
		return nil, ModelUnusable(err)
	}
	sched.Shift = sp.Shift
	stream := stages.StreamBase
	if sp.Kind != onnx.KindBase {
		stream = stages.StreamSR
	}
	etaNoise := stages.Noise{Seed: it.Seed, Stream: stages.StageStream(stages.StreamEta, si)}
	sampler, err := stages.NewSampler(samplerKind(sp.Sampler), sched, stages.SamplerOptions{
		Steps: sp.Steps, Strength: sp.Strength, Eta: sp.Eta,
		EtaNoiseRows: etaNoise.RowsFiller(c, W),
	})
	if err != nil {
		return nil, Invalid(fmt.Errorf("%s.sampler: %w", sp.Kind, err))
	}
	// The initial noise is drawn straight into x and the augmentation noise
	// into cond, and both are combined in place (the updates are elementwise),
	// so that no canvas-sized noise buffer outlives this setup.
	// The two noise canvases are independent streams: draw them at once.
	x := make([]float32, n)
	L := r.lowresCh
	var cond []float32 // the augmented conditioning the model sees, L channels
	var setup errgroup.Group
	setup.Go(func() error {
		return (stages.Noise{Seed: it.Seed, Stream: stages.StageStream(stream, si)}).Fill(x, 0, c, 0, 0, H, W)
	})
	if lowres != nil {
		cond = make([]float32, L*H*W)
		setup.Go(func() error {
			return (stages.Noise{Seed: it.Seed, Stream: stages.StageStream(stages.StreamAug, si)}).Fill(cond, 0, L, 0, 0, H, W)
		})
	}
	if err := setup.Wait(); err != nil {
		return nil, err
	}
	fromNoise := init == nil
	if !fromNoise && len(init) != n {
		return nil, fmt.Errorf("stage %d: starts from %d values, its canvas has %d", si, len(init), n)
	}
	if fromNoise {
		s := float32(sampler.InitNoiseSigma())
		for i := range x {
			x[i] *= s
		}
	}
	if init != nil {
		err := stages.InBands(H, 64, func(y0, y1 int) error {
			for ch := 0; ch < c; ch++ {
				lo, hi := ch*H*W+y0*W, ch*H*W+y1*W
				if err := sampler.AddNoise(x[lo:hi], init[lo:hi], x[lo:hi]); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if lowres != nil {
		// The augmentation level: the job's fraction, or in the model's
		// own units (an integer timestep of its noising schedule).
		abar, level := sched.AlphasCumprod, sp.NoiseLevel
		if man := r.model.Manifest; man.NoiseLevelMax > 0 {
			if r.noiseAbar != nil {
				abar = r.noiseAbar
			}
			level = math.Min(sp.NoiseLevelModel/float64(len(abar)-1), 1)
		}
		// Elementwise: each band of rows (in every channel) on its own core.
		err := stages.InBands(H, 64, func(y0, y1 int) error {
			for ch := 0; ch < L; ch++ {
				lo, hi := ch*H*W+y0*W, ch*H*W+y1*W
				if err := stages.NoiseAugment(cond[lo:hi], lowres[lo:hi], cond[lo:hi], abar, level); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if 4*n > largeCanvas {
		// The upsampled input is garbage now; give its pages back before the
		// fusion buffers are allocated, so that peak memory is the working
		// set and not the working set plus what the collector has not reached.
		debug.FreeOSMemory()
	}
	man := r.model.Manifest
	grid, err := tileGrid(sp, man)
	if err != nil {
		return nil, err
	}
	// The rows of each tile: the conditional one, and before it, where
	// guidance asks for one and the model has it, the unconditional one (the
	// null class, the negative context or zeros).
	var classes []int64
	var contexts [][]float32
	guidance := sp.Guidance
	pair := false
	if r.model.Input(onnx.RoleClass) != nil {
		label := int64(it.Class)
		if it.Class < 0 {
			label = int64(man.NullClass)
		}
		if label < 0 {
			return nil, Invalidf("class: the model is class-conditional and has no null class; give a class")
		}
		classes = []int64{label, label}
		if man.NullClass >= 0 && label != int64(man.NullClass) {
			classes[0], pair = int64(man.NullClass), true
		}
	}
	ctxLen, ctxDim := 0, 0
	if io := r.model.Input(onnx.RoleContext); io != nil {
		if ctxs == nil {
			return nil, Invalidf("context: %s takes text embeddings; give prompt: TEXT or context: FILE", sp.Model)
		}
		ctxLen, ctxDim = ctxs.cond.L, ctxs.cond.D
		if (io.Shape[1] > 0 && int(io.Shape[1]) != ctxLen) || (io.Shape[2] > 0 && int(io.Shape[2]) != ctxDim) {
			from := "the prompt's embedding"
			if it.Context != nil {
				from = it.Context.Path
			}
			return nil, Invalidf("context: %s is [%d, %d]; %s's input %q takes %s", from, ctxLen, ctxDim, sp.Model, io.Name, io.ShapeString())
		}
		contexts, pair = [][]float32{ctxs.uncond.Data, ctxs.cond.Data}, true
		if ctxs.zeros && guidance != 1 {
			e.logger.Warn("guidance without a negative context or a text encoder: zeros are the unconditional context", "item", it.Index, "model", sp.Model)
		}
	}
	switch {
	case guidance != 1 && pair: // uncond, cond
	default:
		guidance = 1
		if classes != nil {
			classes = classes[1:]
		}
		if contexts != nil {
			contexts = contexts[1:]
		}
	}
	noiseLevel := sp.NoiseLevel
	if man.NoiseLevelMax > 0 {
		noiseLevel = sp.NoiseLevelModel
	}
	in := stepInputs{batch: sp.Batch, noiseLevel: float32(noiseLevel), classes: classes, guidance: guidance,
		contexts: contexts, ctxLen: ctxLen, ctxDim: ctxDim, thresholding: sched.Thresholding}
	err = wavefront(ctx, r, grid, sampler, x, cond, in, func(step, rows int) { report(si, step, sampler.Len(), rows) })
	if err != nil {
		if isOutOfMemory(err) {
			return nil, &tileTooLarge{tile: grid.TileHeight, err: err}
		}
		return nil, err
	}
	if sp.Space == onnx.SpaceLatent {
		return x, nil // latents are not images: their decoder bounds the pixels
	}
	err = stages.InBands(H, 64, func(y0, y1 int) error {
		for ch := 0; ch < c; ch++ {
			band := x[ch*H*W+y0*W : ch*H*W+y1*W]
			for i, v := range band {
				band[i] = min(max(v, -1), 1)
			}
		}
		return nil
	})
	return x, err
}

// itemContexts are an item's context embeddings, read once for all its
// stages and tiles: the conditional one and the unconditional one of a
// guidance pair (the negative context, or zeros of the same shape).
type itemContexts struct {
	cond, uncond *Context
	zeros        bool   // uncond is zeros: no negative context and no text encoder
	cut          string // what the text encoder's limit cut off the prompt
}

// loadContexts reads the item's context files, checking that each is the
// file that was hashed when the item was expanded; nil when it has none.
func loadContexts(it Item) (*itemContexts, error) {
	if it.Context == nil {
		return nil, nil
	}
	read := func(field string, ref *ContextRef) (*Context, error) {
		c, sum, err := ReadContext(ref.Path)
		if err != nil {
			return nil, err
		}
		if sum != ref.SHA256 {
			return nil, Invalidf("%s: %s changed since the item was queued; submit it again", field, ref.Path)
		}
		return c, nil
	}
	cond, err := read("context", it.Context)
	if err != nil {
		return nil, err
	}
	out := &itemContexts{cond: cond, uncond: &Context{L: cond.L, D: cond.D, Data: make([]float32, len(cond.Data))}, zeros: true}
	if it.NegativeContext != nil {
		if out.uncond, err = read("negative_context", it.NegativeContext); err != nil {
			return nil, err
		}
		out.zeros = false
	}
	return out, nil
}

// tileTooLarge is a stage whose Run ran out of memory with one tile alone:
// Generate starts the stage over with smaller tiles.
type tileTooLarge struct {
	tile int
	err  error
}

func (e *tileTooLarge) Error() string { return e.err.Error() }
func (e *tileTooLarge) Unwrap() error { return e.err }

// stepInputs are what every tile of a stage shares.
type stepInputs struct {
	batch          int // the stage's own batch; 0 = the runner's
	noiseLevel     float32
	classes        []int64
	contexts       [][]float32 // per row, as classes
	ctxLen, ctxDim int
	guidance       float64
	thresholding   *stages.Thresholding // of the whole canvas's x0, each step
}

// rows is how many rows each tile is: two for a guidance pair.
func (in stepInputs) rows() int { return max(len(in.classes), len(in.contexts), 1) }

// wavefront samples a stage on the canvas x, from its state at step 0 to
// the last step, with the conditioning cond (nil for a base stage).
//
// Every step's tiles go to the model's batcher (the tiler side), each
// prediction is fused into the accumulator as it lands (the stitcher
// side), and as soon as a band of rows has every tile of a step fused,
// that band alone is converted to x0 and stepped. A tile of the next step
// goes to the model as soon as the rows it sees are stepped, so the model
// keeps working across step boundaries: a step's first tiles run while its
// predecessor's last ones do, and one image alone keeps every lane busy
// except at the end of the stage.
//
// Rows [0, edge(k)) are final for a step once its tile rows 0..k are fused,
// since later tile rows start at or below edge(k). A tile row of step s+1
// that ends at row e needs step s stepped down to e. Tiles of different
// steps in flight at once thus never touch the same rows, so one
// accumulator serves them all, and a band of x is never stepped while a
// tile that reads it is waiting for the model.
func wavefront(ctx context.Context, r *runner, grid *stages.TileGrid, smp stages.Sampler, x, cond []float32, in stepInputs, report func(step, rows int)) error {
	ctx, cancel := context.WithCancel(ctx) // the runner drops what is left when this returns
	defer cancel()
	c, H, W := r.channels, grid.Height, grid.Width
	R, C, L := grid.Rows, grid.Cols, smp.Len()
	tiles := grid.Tiles
	tileLen := c * grid.TileHeight * grid.TileWidth
	rowY := make([]int, R)
	for k := range rowY {
		rowY[k] = tiles[k*C].Y0
	}
	edge := func(k int) int {
		if k+1 < R {
			return rowY[k+1]
		}
		return H
	}
	need := make([]int, R) // tile row k of step s+1 waits for step s's tile rows 0..need[k]
	for k := range need {
		for end := min(rowY[k]+grid.TileHeight, H); edge(need[k]) < end; {
			need[k]++
		}
	}
	acc := stages.NewAccumulator(c, H, W)
	x0 := make([]float32, len(x))
	pt := smp.Prediction()
	// The tiles are cut from xin: x itself, or x scaled to the model's
	// input where the sampler asks for it (Euler), kept band by band.
	xin := x
	var scaled []float32
	scale := func(step, y0, y1 int) {
		f := smp.InputScale(step)
		for ch := 0; ch < c; ch++ {
			lo, hi := ch*H*W+y0*W, ch*H*W+y1*W
			stages.ScaleInput(scaled[lo:hi], x[lo:hi], f)
		}
	}
	for i := 0; i < L; i++ {
		if smp.InputScale(i) != 1 {
			scaled = make([]float32, len(x))
			xin = scaled
			scale(0, 0, H)
			break
		}
	}
	// stepBand converts the fused prediction of rows [y0, y1) to x0 and
	// steps those rows from step s to s+1. The raw predictions are fused
	// and then converted once: the conversion is affine in the prediction
	// and the window weights sum to one, so this equals fusing converted
	// tiles.
	//
	// With dynamic thresholding the bands are converted as they are fused,
	// but stepped only once the whole canvas is: the threshold is a quantile
	// of the whole image's x0 (per tile, tiles would disagree), so each
	// step is a barrier and its successor's tiles wait for all of it.
	convertBand := func(s, y0, y1 int) error {
		if err := acc.ResultRows(x0, y0, y1); err != nil {
			return err
		}
		lv := smp.Level(s)
		for ch := 0; ch < c; ch++ {
			lo, hi := ch*H*W+y0*W, ch*H*W+y1*W
			if err := stages.PredToX0(pt, lv, xin[lo:hi], x0[lo:hi], x0[lo:hi]); err != nil {
				return err
			}
		}
		acc.ResetRows(y0, y1)
		return nil
	}
	advanceBand := func(s, y0, y1 int) error {
		if err := smp.StepRows(s, x, x0, c, H, W, y0, y1); err != nil {
			return err
		}
		if scaled != nil && s+1 < L {
			scale(s+1, y0, y1)
		}
		return nil
	}
	total := L * len(tiles)
	// At most two steps' tiles are out at once, and the reply channel holds
	// them all, so the batcher never waits on this item.
	maxOut := 2 * len(tiles)
	replies := make(chan response, maxOut)
	newRequest := func(s, ti int) *request {
		tile := tiles[ti]
		q := &request{h: grid.TileHeight, w: grid.TileWidth, t: float32(smp.Timestep(s)), noiseLevel: in.noiseLevel,
			classes: in.classes, contexts: in.contexts, ctxLen: in.ctxLen, ctxDim: in.ctxDim,
			reply: replies, tile: ti, step: s, batch: in.batch, ctx: ctx}
		q.fill = func(sample, lowres []float32) error {
			if err := grid.Extract(sample, xin, c, tile); err != nil {
				return err
			}
			if lowres != nil {
				return grid.Extract(lowres, cond, r.lowresCh, tile)
			}
			return nil
		}
		return q
	}
	left := make([][]int, L)    // per step, tiles of each tile row not yet fused
	stepped := make([]int, L)   // per step, tile rows stepped
	converted := make([]int, L) // per step, tile rows converted to x0
	rowsPerTile := in.rows()
	sent, landed := 0, 0
	var next *request // the next tile's request, made once, until it is sent
	for landed < total {
		var send chan<- *request
		if next == nil && sent < total && sent-landed < maxOut {
			s, ti := sent/len(tiles), sent%len(tiles)
			if s == 0 || stepped[s-1] > need[ti/C] {
				next = newRequest(s, ti)
			}
		}
		if next != nil {
			send = r.reqs
		}
		select {
		case send <- next:
			next = nil
			sent++
		case resp := <-replies:
			landed++
			if resp.err != nil {
				return resp.err
			}
			pred := resp.pred[:tileLen]
			if in.guidance != 1 {
				if err := stages.GuidePair(pred, resp.pred[:tileLen], resp.pred[tileLen:2*tileLen], in.guidance); err != nil {
					return err
				}
			} else if len(resp.pred) > tileLen {
				pred = resp.pred[len(resp.pred)-tileLen:]
			}
			err := acc.Add(tiles[resp.req.tile], pred)
			r.release(resp.pred)
			if err != nil {
				return err
			}
			s := resp.req.step
			if left[s] == nil {
				left[s] = make([]int, R)
				for k := range left[s] {
					left[s][k] = C
				}
			}
			left[s][resp.req.tile/C]--
			for converted[s] < R && left[s][converted[s]] == 0 {
				k := converted[s]
				y0 := 0
				if k > 0 {
					y0 = edge(k - 1)
				}
				if err := convertBand(s, y0, edge(k)); err != nil {
					return err
				}
				converted[s]++
				if in.thresholding == nil {
					if err := advanceBand(s, y0, edge(k)); err != nil {
						return err
					}
					stepped[s]++
				}
			}
			if in.thresholding != nil && converted[s] == R && stepped[s] < R {
				lvl, err := in.thresholding.Level(x0)
				if err != nil {
					return err
				}
				if th, ok := smp.(stages.Thresholder); ok {
					th.SetThreshold(lvl) // DDIM thresholds its x0 term itself
				} else {
					in.thresholding.Apply(x0, lvl)
				}
				if err := advanceBand(s, 0, H); err != nil {
					return err
				}
				stepped[s] = R
			}
			if stepped[s] == R { // only once: every tile of step s has landed
				left[s] = nil
				report(s+1, len(tiles)*rowsPerTile)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func samplerKind(s string) string {
	switch s {
	case "dpmpp_2m", "dpm++_2m", "dpmpp2m":
		return "dpm++2m"
	}
	return s
}
