package onnx

import (
	"fmt"
	"log/slog"
	"sync"

	ort "github.com/yalue/onnxruntime_go"

	"tessera/config"
)

// Env is the process's one ONNX Runtime environment. Open returns the same
// Env to every caller (safe from many goroutines); it is torn down when the
// last caller closes it.
type Env struct {
	Library Library
	Version string

	cfg    config.Runtime
	logger *slog.Logger
}

var (
	envMu   sync.Mutex
	envCur  *Env
	envRefs int
)

// Open initialises ONNX Runtime from cfg (library discovery, log level) or,
// when it is already initialised, returns the existing environment. Each
// successful Open must be matched by one Close.
func Open(cfg config.Runtime, logger *slog.Logger) (*Env, error) {
	if logger == nil {
		logger = slog.Default()
	}
	envMu.Lock()
	defer envMu.Unlock()
	if envCur != nil {
		if cfg.Library != "" && cfg.Library != envCur.cfg.Library && cfg.Library != envCur.Library.Path {
			return nil, fmt.Errorf("onnx runtime already initialised from %s; cannot switch to %s in one process", envCur.Library.Path, cfg.Library)
		}
		envRefs++
		return envCur, nil
	}
	lib, err := FindLibrary(cfg.Library)
	if err != nil {
		return nil, err
	}
	ort.SetSharedLibraryPath(lib.Path)
	if err := ort.InitializeEnvironment(logLevelOption(cfg.LogLevel)); err != nil {
		return nil, fmt.Errorf("load ONNX Runtime from %s (found via %s): %w; run `make ort` to fetch a working copy into .ort/", lib.Path, lib.Source, err)
	}
	envCur = &Env{Library: lib, Version: ort.GetVersion(), cfg: cfg, logger: logger}
	envRefs = 1
	logger.Debug("onnx runtime loaded", "version", envCur.Version, "library", lib.Path, "source", lib.Source)
	return envCur, nil
}

// Close releases one reference; the last one destroys the environment.
// Closing a nil Env, or closing more often than opening, does nothing.
func (e *Env) Close() error {
	if e == nil {
		return nil
	}
	envMu.Lock()
	defer envMu.Unlock()
	if envCur != e || envRefs == 0 {
		return nil
	}
	envRefs--
	if envRefs > 0 {
		return nil
	}
	envCur = nil
	return ort.DestroyEnvironment()
}

// Config is the runtime configuration the environment was opened with.
func (e *Env) Config() config.Runtime { return e.cfg }

func logLevelOption(level string) ort.EnvironmentOption {
	switch level {
	case "verbose":
		return ort.WithLogLevelVerbose()
	case "info":
		return ort.WithLogLevelInfo()
	case "warning":
		return ort.WithLogLevelWarning()
	case "fatal":
		return ort.WithLogLevelFatal()
	default:
		return ort.WithLogLevelError()
	}
}
