package onnx

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"unsafe"

	ort "github.com/yalue/onnxruntime_go"

	"tessera/config"
)

// SessionOptions tune one session beyond the runtime configuration.
type SessionOptions struct {
	// Concurrent is how many sessions this process runs at the same time; the
	// intra-op thread budget (runtime.threads, or all cores) is divided among
	// them so that they do not oversubscribe the CPU. 0 means 1.
	Concurrent int
	// Runtime, when set, replaces the environment's runtime configuration for
	// this session (providers, fallback, threads, provider options).
	Runtime *config.Runtime
}

// Session runs one model. Its Run is safe for concurrent use by many
// goroutines: ONNX Runtime's session Run is thread-safe and every call
// brings its own tensors.
type Session struct {
	model    *Model
	sess     *ort.DynamicAdvancedSession
	inNames  []string
	outNames []string
	provider string
	skipped  []*ProviderError
	threads  int
	gpu      bool
	firstRun sync.Once
	closeMu  sync.Mutex
}

// Model is the model the session runs.
func (s *Session) Model() *Model { return s.model }

// Provider is the execution provider that leads the session (cpu, cuda or tensorrt).
func (s *Session) Provider() string { return s.provider }

// Skipped lists providers that could not attach and were passed over because
// runtime.fallback allowed it, with ONNX Runtime's reasons.
func (s *Session) Skipped() []*ProviderError { return s.skipped }

// Threads is the intra-op thread count the session was given.
func (s *Session) Threads() int { return s.threads }

// NewSession creates a session for m with the configured execution providers
// in order. A provider that cannot attach is an error naming it, ONNX
// Runtime's reason and the missing libraries, unless runtime.fallback is set:
// then the reason is logged and the next provider is tried.
func (e *Env) NewSession(m *Model, o SessionOptions) (*Session, error) {
	rt := e.cfg
	if o.Runtime != nil {
		rt = *o.Runtime
	}
	concurrent := max(o.Concurrent, 1)
	threads := max(rt.IntraOpThreads()/concurrent, 1)
	providers := rt.Providers
	if len(providers) == 0 {
		providers = []string{config.ProviderCPU}
	}
	var skipped []*ProviderError
	for start := 0; start < len(providers); start++ {
		p := providers[start]
		sess, err := e.tryProvider(m, rt, p, threads, concurrent)
		if err == nil {
			sess.skipped = skipped
			return sess, nil
		}
		var perr *ProviderError
		if !errors.As(err, &perr) {
			return nil, fmt.Errorf("create session for %q on %s: %w", m.Name, p, err)
		}
		if !rt.Fallback || start == len(providers)-1 {
			return nil, fmt.Errorf("create session for %q: %w", m.Name, err)
		}
		e.logger.Warn("execution provider unavailable, falling back", "provider", p, "next", providers[start+1], "reason", perr.Reason, "missing", perr.Missing)
		skipped = append(skipped, perr)
	}
	return nil, fmt.Errorf("create session for %q: no execution provider configured", m.Name)
}

// tryProvider builds a session led by provider p (with ONNX Runtime's CPU
// provider behind it for nodes p cannot run). Failures that are the
// provider's are returned as *ProviderError.
func (e *Env) tryProvider(m *Model, rt config.Runtime, p string, threads, concurrent int) (*Session, error) {
	opts, err := ort.NewSessionOptions()
	if err != nil {
		return nil, err
	}
	defer opts.Destroy()
	if err := opts.SetIntraOpNumThreads(threads); err != nil {
		return nil, err
	}
	if err := opts.SetInterOpNumThreads(max(rt.InterThreads, 1)); err != nil {
		return nil, err
	}
	if concurrent > 1 {
		// Spinning workers of several sessions would steal each other's cores.
		if err := opts.AddSessionConfigEntry("session.intra_op.allow_spinning", "0"); err != nil {
			return nil, err
		}
	}
	level := optimizationLevel(rt.Optimization)
	gpu := p != config.ProviderCPU
	source := m.Path
	var cacheTmp, cacheFile string
	if rt.OptimizedCache != "" && !gpu && len(m.Header.ExternalData) == 0 {
		cacheFile, err = optimizedCachePath(m, rt)
		if err != nil {
			return nil, err
		}
		if _, err := os.Stat(cacheFile); err == nil {
			source, level = cacheFile, ort.GraphOptimizationLevelDisableAll
		} else {
			cacheTmp = cacheFile + fmt.Sprintf(".tmp%d", os.Getpid())
			if err := opts.SetOptimizedModelFilePath(cacheTmp); err != nil {
				return nil, err
			}
		}
	}
	if err := opts.SetGraphOptimizationLevel(level); err != nil {
		return nil, err
	}
	if p == config.ProviderTensorRT {
		for _, dir := range []string{rt.TensorRT.EngineCachePath, rt.TensorRT.TimingCachePath} {
			if dir != "" {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					return nil, fmt.Errorf("tensorrt cache directory: %w", err)
				}
			}
		}
	}
	provErr := func(err error) error {
		return &ProviderError{Provider: p, Reason: err.Error(), Missing: missingLibraries(p, e.Library.Path)}
	}
	inNames, outNames := ioNames(m.Inputs), ioNames(m.Outputs)
	var sess *ort.DynamicAdvancedSession
	create := func() error {
		if err := attachProvider(opts, p, rt); err != nil {
			return provErr(err)
		}
		var err error
		if source != "" {
			sess, err = ort.NewDynamicAdvancedSession(source, inNames, outNames, opts)
		} else {
			sess, err = ort.NewDynamicAdvancedSessionWithONNXData(m.data, inNames, outNames, opts)
		}
		if err != nil && gpu {
			return provErr(err)
		}
		return err
	}
	if gpu {
		if n, err := guardSignals(create); err != nil {
			return nil, err
		} else if n > 0 {
			e.logger.Debug("restored signal handlers replaced during session creation", "count", n, "provider", p)
		}
	} else if err := create(); err != nil {
		return nil, err
	}
	if cacheTmp != "" {
		if err := os.Rename(cacheTmp, cacheFile); err != nil {
			e.logger.Warn("optimized model cache not written", "path", cacheFile, "err", err)
			os.Remove(cacheTmp)
		}
	}
	return &Session{model: m, sess: sess, inNames: inNames, outNames: outNames, provider: p, threads: threads, gpu: gpu}, nil
}

func optimizedCachePath(m *Model, rt config.Runtime) (string, error) {
	data := m.data
	if data == nil {
		var err error
		if data, err = os.ReadFile(m.Path); err != nil {
			return "", err
		}
	}
	h := sha256.New()
	h.Write(data)
	fmt.Fprintf(h, "|%s|%s", rt.Optimization, ort.GetVersion())
	if err := os.MkdirAll(rt.OptimizedCache, 0o755); err != nil {
		return "", fmt.Errorf("runtime.optimized_cache: %w", err)
	}
	return filepath.Join(rt.OptimizedCache, hex.EncodeToString(h.Sum(nil))[:24]+".onnx"), nil
}

func optimizationLevel(s string) ort.GraphOptimizationLevel {
	switch s {
	case "disabled":
		return ort.GraphOptimizationLevelDisableAll
	case "basic":
		return ort.GraphOptimizationLevelEnableBasic
	case "extended":
		return ort.GraphOptimizationLevelEnableExtended
	}
	return ort.GraphOptimizationLevelEnableAll
}

func ioNames(ios []IO) []string {
	n := make([]string, len(ios))
	for i, io := range ios {
		n[i] = io.Name
	}
	return n
}

// Close releases the session. It is safe to call more than once.
func (s *Session) Close() error {
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.sess == nil {
		return nil
	}
	err := s.sess.Destroy()
	s.sess = nil
	return err
}

// Run evaluates the graph on inputs keyed by graph input name and returns
// the outputs keyed by name. Shapes and types are checked against the graph
// before anything reaches ONNX Runtime.
func (s *Session) Run(inputs map[string]Tensor) (map[string]Tensor, error) {
	return s.RunContext(context.Background(), inputs)
}

// RunContext is Run with cancellation: when ctx ends, ONNX Runtime is asked
// to terminate the Run, which then returns ctx's error.
func (s *Session) RunContext(ctx context.Context, inputs map[string]Tensor) (map[string]Tensor, error) {
	m := s.model
	if len(inputs) != len(m.Inputs) {
		for name := range inputs {
			if !hasIO(m.Inputs, name) {
				return nil, fmt.Errorf("model %q has no input %q (inputs: %s)", m.Name, name, names(m.Inputs))
			}
		}
	}
	vals := make([]ort.Value, 0, len(m.Inputs)+len(m.Outputs))
	defer func() {
		for _, v := range vals {
			v.Destroy()
		}
	}()
	in := make([]ort.Value, len(m.Inputs))
	for i, io := range m.Inputs {
		t, ok := inputs[io.Name]
		if !ok {
			return nil, fmt.Errorf("model %q: input %q (%s) not given", m.Name, io.Name, roleOr(io.Role))
		}
		if err := checkShape(io, t); err != nil {
			return nil, err
		}
		v, err := toValue(io, t)
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", io.Name, err)
		}
		vals = append(vals, v)
		in[i] = v
	}
	out := make([]ort.Value, len(m.Outputs))
	outF32 := make([][]float32, len(m.Outputs))
	for i, io := range m.Outputs {
		shape, ok := s.outputShape(io, inputs)
		if !ok {
			if io.Type == Float16 {
				return nil, fmt.Errorf("output %q: float16 output shape %s cannot be inferred from the inputs", io.Name, io.ShapeString())
			}
			continue // ONNX Runtime allocates it
		}
		v, buf, err := newOutput(io, shape)
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", io.Name, err)
		}
		vals = append(vals, v)
		out[i], outF32[i] = v, buf
	}
	run := func() error { return s.run(ctx, in, out) }
	var err error
	if s.gpu {
		ran := false
		s.firstRun.Do(func() {
			ran = true
			_, err = guardSignals(run)
		})
		if !ran {
			err = run()
		}
	} else {
		err = run()
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("model %q: run on %s: %w", m.Name, s.provider, err)
	}
	res := make(map[string]Tensor, len(out))
	for i, io := range m.Outputs {
		v := out[i]
		if outF32[i] == nil && v != nil && !containsValue(vals, v) {
			vals = append(vals, v) // allocated by ONNX Runtime: destroy after reading
		}
		t, err := fromValue(io, v, outF32[i])
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", io.Name, err)
		}
		res[io.Name] = t
	}
	return res, nil
}

func (s *Session) run(ctx context.Context, in, out []ort.Value) error {
	s.closeMu.Lock()
	sess := s.sess
	s.closeMu.Unlock()
	if sess == nil {
		return errors.New("session closed")
	}
	if ctx.Done() == nil {
		return sess.Run(in, out)
	}
	opts, err := ort.NewRunOptions()
	if err != nil {
		return err
	}
	defer opts.Destroy()
	stop := context.AfterFunc(ctx, func() { opts.Terminate() })
	defer stop()
	return sess.RunWithOptions(in, out, opts)
}

func containsValue(vals []ort.Value, v ort.Value) bool {
	for _, x := range vals {
		if x == v {
			return true
		}
	}
	return false
}

func hasIO(ios []IO, name string) bool {
	for _, io := range ios {
		if io.Name == name {
			return true
		}
	}
	return false
}

func roleOr(role string) string {
	if role == "" {
		return "no role"
	}
	return "role " + role
}

// checkShape compares a tensor with the graph's declaration.
func checkShape(io IO, t Tensor) error {
	if len(t.Shape) != len(io.Shape) {
		if len(io.Shape) == 0 {
			return fmt.Errorf("input %q: expected a scalar, got shape %v", io.Name, t.Shape)
		}
		return fmt.Errorf("input %q: expected %d dimensions %s, got shape %v", io.Name, len(io.Shape), io.ShapeString(), t.Shape)
	}
	for i, d := range io.Shape {
		got := t.Shape[i]
		if got <= 0 {
			return fmt.Errorf("input %q: dimension %d is %d, must be positive", io.Name, i, got)
		}
		if d >= 0 && d != got {
			what := fmt.Sprintf("dimension %d to be %d", i, d)
			if len(io.Shape) == 4 {
				what = fmt.Sprintf("%d %s", d, [...]string{"batch items", "channels", "rows", "columns"}[i])
			}
			return fmt.Errorf("input %q: expected %s, got %d", io.Name, what, got)
		}
	}
	if n := t.Len(); int64(t.dataLen()) != n {
		return fmt.Errorf("input %q: shape %v holds %d values, got %d", io.Name, t.Shape, n, t.dataLen())
	}
	if t.Float == nil && t.Int == nil {
		return fmt.Errorf("input %q: no data", io.Name)
	}
	return nil
}

// toValue converts a Go tensor into an ONNX Runtime value of the declared type.
func toValue(io IO, t Tensor) (ort.Value, error) {
	scalar := len(io.Shape) == 0
	shape := ort.Shape(t.Shape)
	switch io.Type {
	case Float32:
		data := t.Float
		if data == nil {
			data = intsToFloats(t.Int)
		}
		if scalar {
			return ort.NewScalar(data[0])
		}
		return ort.NewTensor(shape, data)
	case Float64:
		data := make([]float64, t.dataLen())
		for i := range data {
			if t.Float != nil {
				data[i] = float64(t.Float[i])
			} else {
				data[i] = float64(t.Int[i])
			}
		}
		if scalar {
			return ort.NewScalar(data[0])
		}
		return ort.NewTensor(shape, data)
	case Float16:
		if scalar {
			return nil, errors.New("float16 scalar inputs cannot be passed through onnxruntime_go; re-export the graph with this input as shape [1] or [batch]")
		}
		data := t.Float
		if data == nil {
			data = intsToFloats(t.Int)
		}
		bits := make([]uint16, len(data))
		Float16Bits(bits, data)
		return ort.NewCustomDataTensor(shape, unsafe.Slice((*byte)(unsafe.Pointer(&bits[0])), 2*len(bits)), ort.TensorElementDataTypeFloat16)
	case Int64, Int32:
		data := t.Int
		if data == nil {
			var err error
			if data, err = toInt64(t.Float); err != nil {
				return nil, fmt.Errorf("the graph takes %s: %w", io.Type, err)
			}
		}
		if io.Type == Int32 {
			d32 := make([]int32, len(data))
			for i, v := range data {
				d32[i] = int32(v)
			}
			if scalar {
				return ort.NewScalar(d32[0])
			}
			return ort.NewTensor(shape, d32)
		}
		if scalar {
			return ort.NewScalar(data[0])
		}
		return ort.NewTensor(shape, data)
	}
	return nil, fmt.Errorf("element type %s is not supported", io.Type)
}

func intsToFloats(src []int64) []float32 {
	out := make([]float32, len(src))
	for i, v := range src {
		out[i] = float32(v)
	}
	return out
}

// outputShape infers an output's concrete shape: static dimensions as
// declared, dynamic ones from the same axis of an input of equal rank (the
// sample first), which is how image-to-image graphs are shaped.
func (s *Session) outputShape(io IO, inputs map[string]Tensor) ([]int64, bool) {
	if len(io.Shape) == 0 {
		return nil, false
	}
	var ref []int64
	if in := s.model.Input(RoleSample); in != nil && len(in.Shape) == len(io.Shape) {
		ref = inputs[in.Name].Shape
	}
	shape := make([]int64, len(io.Shape))
	for i, d := range io.Shape {
		switch {
		case d >= 0:
			shape[i] = d
		case ref != nil:
			shape[i] = ref[i]
		default:
			return nil, false
		}
	}
	return shape, true
}

func newOutput(io IO, shape []int64) (ort.Value, []float32, error) {
	switch io.Type {
	case Float32:
		n := int64(1)
		for _, d := range shape {
			n *= d
		}
		buf := make([]float32, n)
		v, err := ort.NewTensor(ort.Shape(shape), buf)
		return v, buf, err
	case Float16:
		n := ort.Shape(shape).FlattenedSize()
		cv, err := ort.NewCustomDataTensor(ort.Shape(shape), make([]byte, 2*n), ort.TensorElementDataTypeFloat16)
		return cv, nil, err
	}
	return nil, nil, nil
}

// fromValue converts an output value to a Go tensor.
func fromValue(io IO, v ort.Value, f32 []float32) (Tensor, error) {
	if v == nil {
		return Tensor{}, errors.New("no value returned")
	}
	shape := []int64(v.GetShape())
	if f32 != nil {
		return Tensor{Shape: shape, Float: f32}, nil
	}
	switch t := v.(type) {
	case *ort.Tensor[float32]:
		return Tensor{Shape: shape, Float: t.GetData()}, nil
	case *ort.Tensor[float64]:
		d := t.GetData()
		out := make([]float32, len(d))
		for i, x := range d {
			out[i] = float32(x)
		}
		return Tensor{Shape: shape, Float: out}, nil
	case *ort.Tensor[int64]:
		return Tensor{Shape: shape, Int: t.GetData()}, nil
	case *ort.CustomDataTensor:
		if io.Type != Float16 {
			return Tensor{}, fmt.Errorf("element type %s is not supported", io.Type)
		}
		b := t.GetData()
		bits := unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(b)/2)
		out := make([]float32, len(bits))
		Float16ToFloat32(out, bits)
		return Tensor{Shape: shape, Float: out}, nil
	}
	return Tensor{}, fmt.Errorf("output type %T is not supported", v)
}

// BatchValues builds the tensor for a per-item scalar input (timestep,
// noise level, class): shape [B] when the graph takes [B] or [1], a scalar
// when it takes a scalar, in which case every item must share the value.
func (m *Model) BatchValues(role string, values []float32) (Tensor, error) {
	io := m.Input(role)
	if io == nil {
		return Tensor{}, fmt.Errorf("model %q has no %s input", m.Name, role)
	}
	if len(values) == 0 {
		return Tensor{}, fmt.Errorf("model %q: no values for input %q", m.Name, io.Name)
	}
	if len(io.Shape) == 0 || (len(io.Shape) == 1 && io.Shape[0] == 1 && len(values) > 1) {
		for _, v := range values[1:] {
			if v != values[0] {
				return Tensor{}, fmt.Errorf("model %q: input %q takes one %s for the whole batch, got different values %g and %g", m.Name, io.Name, role, values[0], v)
			}
		}
		if len(io.Shape) == 0 {
			return Tensor{Float: values[:1]}, nil
		}
		return Tensor{Shape: []int64{1}, Float: values[:1]}, nil
	}
	return Tensor{Shape: []int64{int64(len(values))}, Float: values}, nil
}
