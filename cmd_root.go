package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/pprof"
	"sync"

	"github.com/spf13/cobra"

	"tessera/config"
)

// app is what every subcommand shares: the loaded configuration and logger.
type app struct {
	configFile string
	cfg        config.Config
	logger     *slog.Logger
	flags      []config.Flag // subcommand flags bound to config keys
	batch      int           // run's --batch: most tiles per Run, 0 = auto
	logs       logSink       // where log lines go: stderr, or through the progress display
}

func newRootCmd() *cobra.Command {
	a := &app{}
	root := &cobra.Command{
		Use:   "tessera",
		Short: "Cascaded diffusion image generation with tiled super-resolution",
		Long: `Tessera turns job files into high-resolution images with cascaded diffusion
models exported to ONNX: a base model samples a small image, super-resolution
models upscale it tile by tile into one seamless picture.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&a.configFile, "config", "", "configuration file (default: ./"+config.DefaultFile+" when present)")
	pf.String("log-level", "", "log level: debug, info, warn, error (config log.level)")
	pf.String("log-format", "", "log format: text or json (config log.format)")
	pf.String("ort-lib", "", "path to libonnxruntime (config runtime.library)")
	pf.StringSlice("providers", nil, "execution providers in order, e.g. cuda,cpu (config runtime.providers)")
	pf.Bool("fallback", false, "fall back to the next provider when one cannot attach (config runtime.fallback)")
	pf.Int("threads", 0, "intra-op threads for ONNX Runtime, 0 = all cores (config runtime.threads)")
	pf.IntSlice("devices", nil, "GPUs to run on, a session and batcher each, e.g. 0,1 (config runtime.devices)")
	var cpuprofile string
	pf.StringVar(&cpuprofile, "cpuprofile", "", "write a CPU profile of the command to this file")
	pf.MarkHidden("cpuprofile")
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		if cpuprofile != "" {
			f, err := os.Create(cpuprofile)
			if err != nil {
				return err
			}
			if err := pprof.StartCPUProfile(f); err != nil {
				f.Close()
				return err
			}
			// Finalizers run whether or not the command failed (a run with a
			// failed item returns an error, which skips PersistentPostRun).
			cobra.OnFinalize(func() {
				pprof.StopCPUProfile()
				f.Close()
			})
		}
		cfg, err := config.Load(a.configFile, append([]config.Flag{
			{Key: "log.level", Flag: pf.Lookup("log-level")},
			{Key: "log.format", Flag: pf.Lookup("log-format")},
			{Key: "runtime.library", Flag: pf.Lookup("ort-lib")},
			{Key: "runtime.providers", Flag: pf.Lookup("providers")},
			{Key: "runtime.fallback", Flag: pf.Lookup("fallback")},
			{Key: "runtime.threads", Flag: pf.Lookup("threads")},
			{Key: "runtime.devices", Flag: pf.Lookup("devices")},
		}, a.flags...)...)
		if err != nil {
			return err
		}
		a.cfg = cfg
		a.logs.set(os.Stderr)
		a.logger = newLogger(cfg.Log, &a.logs)
		slog.SetDefault(a.logger)
		return nil
	}
	root.AddCommand(newVersionCmd(a), newInspectCmd(a), newRunCmd(a), newBenchCmd(a),
		newSubmitCmd(a), newStatusCmd(a), newRetryCmd(a), newCancelCmd(a), newServeCmd(a), newTokenizeCmd(a))
	return root
}

// logSink passes log lines to a writer that may change: stderr, or the
// progress display while it draws a bar on a terminal, which clears the
// bar, prints the line and draws the bar again below it, so that log lines
// never land in the middle of the bar. slog writes a record in one Write.
type logSink struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *logSink) set(w io.Writer) {
	s.mu.Lock()
	s.w = w
	s.mu.Unlock()
}

func (s *logSink) Write(b []byte) (int, error) {
	s.mu.Lock()
	w := s.w
	s.mu.Unlock()
	if w == nil {
		w = os.Stderr
	}
	return w.Write(b)
}

func newLogger(l config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(l.Level)); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	if l.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// exitError carries a process exit code through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func fail(code int, format string, args ...any) error {
	return &exitError{code: code, err: fmt.Errorf(format, args...)}
}
