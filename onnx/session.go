package onnx

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	ort "github.com/yalue/onnxruntime_go"

	"tessera/config"
)

// SessionOptions tune one session beyond the runtime configuration.
type SessionOptions struct {
	// Concurrent is how many sessions or Runs at once share the CPU, this
	// session's own Runs at once included. The intra-op thread budget
	// (runtime.threads, or all cores) is divided among them so that they do
	// not oversubscribe the CPU, and above 1 the session's workers do not
	// spin between operators (a spinning worker would hold a core another
	// session or Run needs). 0 means 1.
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
		sess, err := e.tryProvider(m, rt, p, threads, concurrent > 1)
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
func (e *Env) tryProvider(m *Model, rt config.Runtime, p string, threads int, noSpin bool) (*Session, error) {
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
	// Spinning workers of several sessions, or of several Runs of one,
	// would steal each other's cores. A lone session's workers spin between
	// its operators, and stop when its Run returns: left spinning, they held
	// both cores while the pipeline set up the next stage (a 512² stage's
	// noise took 34 to 41 ms instead of 18 to 19).
	spin := "1"
	if noSpin {
		spin = "0"
	}
	if err := opts.AddSessionConfigEntry("session.intra_op.allow_spinning", spin); err != nil {
		return nil, err
	}
	if err := opts.AddSessionConfigEntry("session.force_spinning_stop", "1"); err != nil {
		return nil, err
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
	h := sha256.New()
	if m.data != nil {
		h.Write(m.data)
	} else {
		f, err := os.Open(m.Path)
		if err != nil {
			return "", err
		}
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", err
		}
	}
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
