// Package config builds Tessera's one typed, validated Config from defaults,
// a configuration file, TESSERA_* environment variables and command-line
// flags, in rising order of precedence.
//
// Decoding is strict: a key the Config does not know is an error that names
// it, and validation reports every problem at once, each with its key.
package config

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"tessera/stages"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// DefaultFile is the configuration file read from the working directory when
// no --config is given.
const DefaultFile = "tessera.yaml"

// EnvPrefix prefixes every environment variable: runtime.threads is
// TESSERA_RUNTIME_THREADS.
const EnvPrefix = "TESSERA"

// Config is the whole configuration of one Tessera process.
type Config struct {
	Output    Output     `mapstructure:"output"`
	Queue     Queue      `mapstructure:"queue"`
	Workers   int        `mapstructure:"workers"`
	Runtime   Runtime    `mapstructure:"runtime"`
	Memory    Memory     `mapstructure:"memory"`
	Models    Models     `mapstructure:"models"`
	Limits    Limits     `mapstructure:"limits"`
	Server    Server     `mapstructure:"server"`
	Log       Log        `mapstructure:"log"`
	Watch     []Watch    `mapstructure:"watch"`
	Schedules []Schedule `mapstructure:"schedules"`

	// File is the configuration file that was read, or "" when none was.
	File string `mapstructure:"-"`
}

// Output says where images are written.
type Output struct {
	Root string `mapstructure:"root"`
	// Compression is the PNG compression: fast (the default), default,
	// best or none. The encoder is single-threaded and the model waits for
	// it between items: a 1024² image took about 0.1 s at fast and 0.45 to
	// 0.8 s at default, for files 10 to 20 % larger.
	Compression string `mapstructure:"compression"`
}

// Queue names the durable queue's database.
type Queue struct {
	URL string `mapstructure:"url"`
	// Grace is how long running items may take to finish on SIGINT or
	// SIGTERM before they are put back in the queue (run and serve --grace).
	Grace time.Duration `mapstructure:"grace"`
	// RescueAfter is River's backstop: an item running longer than this
	// and its timeout is retried (--rescue-after).
	RescueAfter time.Duration `mapstructure:"rescue_after"`
	// ReapEvery is how often items held by stopped processes are put back
	// in the queue (--reap-every).
	ReapEvery time.Duration `mapstructure:"reap_every"`
	// ItemTimeout and TileTimeout bound one attempt at an item:
	// ItemTimeout plus TileTimeout for each tile evaluation (and each
	// autoencoder tile Run) of its plan.
	ItemTimeout time.Duration `mapstructure:"item_timeout"`
	TileTimeout time.Duration `mapstructure:"tile_timeout"`
}

// Runtime configures ONNX Runtime.
type Runtime struct {
	// Library is an explicit path to libonnxruntime; "" searches (see onnx.FindLibrary).
	Library string `mapstructure:"library"`
	// Providers is the ordered list of execution providers: cpu, cuda, tensorrt.
	Providers []string `mapstructure:"providers"`
	// Fallback lets a provider that cannot attach be skipped (with its reason logged).
	Fallback bool `mapstructure:"fallback"`
	// Threads is the intra-op thread budget shared by all sessions; 0 = all cores.
	Threads int `mapstructure:"threads"`
	// InterThreads is the inter-op thread count per session; 0 = 1 (sequential execution).
	InterThreads int `mapstructure:"inter_threads"`
	// Lanes is how many Runs of one SR model may execute at once on the CPU,
	// each with its share of the threads; 0 = auto (one per thread, at most 4).
	// Many small single-threaded Runs keep the cores busier than one Run
	// split across them. GPU sessions and base models always use one lane.
	Lanes int `mapstructure:"lanes"`
	// Devices lists the GPUs to run on when the first provider is cuda or
	// tensorrt: each model gets one session and one batcher per device,
	// which take tiles from the same queue, so that every device works on
	// its own tiles. Empty: the provider's own device_id alone.
	Devices []int `mapstructure:"devices"`
	// Optimization is the graph optimisation level: disabled, basic, extended, all.
	Optimization string `mapstructure:"optimization"`
	// OptimizedCache is a directory where optimised models are cached; "" disables it.
	OptimizedCache string `mapstructure:"optimized_cache"`
	// LogLevel is ONNX Runtime's own log level: verbose, info, warning, error, fatal.
	LogLevel string   `mapstructure:"log_level"`
	CUDA     CUDA     `mapstructure:"cuda"`
	TensorRT TensorRT `mapstructure:"tensorrt"`
}

// CUDA holds the CUDA execution provider's options, passed to ONNX Runtime as given.
type CUDA struct {
	DeviceID            int    `mapstructure:"device_id"`
	GPUMemLimit         int64  `mapstructure:"gpu_mem_limit"`
	ArenaExtendStrategy string `mapstructure:"arena_extend_strategy"`
	CUDNNConvAlgoSearch string `mapstructure:"cudnn_conv_algo_search"`
}

// TensorRT holds the TensorRT execution provider's options.
type TensorRT struct {
	DeviceID        int    `mapstructure:"device_id"`
	FP16            bool   `mapstructure:"fp16"`
	EngineCache     bool   `mapstructure:"engine_cache"`
	EngineCachePath string `mapstructure:"engine_cache_path"`
	TimingCache     bool   `mapstructure:"timing_cache"`
	TimingCachePath string `mapstructure:"timing_cache_path"`
	WorkspaceSize   int64  `mapstructure:"workspace_size"`
}

// Memory bounds what the pipeline may hold at once.
type Memory struct {
	// Budget in bytes; 0 derives it from the machine.
	Budget int64 `mapstructure:"budget"`
}

// Models lists where named models are looked up besides the embedded demos.
type Models struct {
	Dirs       []string `mapstructure:"dirs"`
	AllowPaths bool     `mapstructure:"allow_paths"`
	// DefaultBase and DefaultSR are the models of a job file that names
	// none (base.model, sr.model); "" makes the field required.
	DefaultBase string `mapstructure:"default_base"`
	DefaultSR   string `mapstructure:"default_sr"`
}

// Limits bound what one job file may ask for.
type Limits struct {
	MaxPixels   int64 `mapstructure:"max_pixels"`
	MaxItems    int   `mapstructure:"max_items"`
	MaxSteps    int   `mapstructure:"max_steps"`
	MaxJobBytes int64 `mapstructure:"max_job_bytes"`
}

// Server configures the HTTP endpoint of `tessera serve`.
type Server struct {
	Addr string `mapstructure:"addr"`
}

// Log configures Tessera's own logging.
type Log struct {
	Level  string `mapstructure:"level"`
	Format string `mapstructure:"format"`
}

// Watch is one watched directory.
type Watch struct {
	Dir       string        `mapstructure:"dir"`
	Recursive bool          `mapstructure:"recursive"`
	Settle    time.Duration `mapstructure:"settle"`
	Rescan    time.Duration `mapstructure:"rescan"`
}

// Schedule is one cron-triggered job.
type Schedule struct {
	Name string `mapstructure:"name"`
	Cron string `mapstructure:"cron"`
	TZ   string `mapstructure:"tz"`
	Job  string `mapstructure:"job"`
}

// Providers the runtime knows.
const (
	ProviderCPU      = "cpu"
	ProviderCUDA     = "cuda"
	ProviderTensorRT = "tensorrt"
)

// Default returns the configuration used when nothing overrides it.
func Default() Config {
	return Config{
		Output:  Output{Root: "./out", Compression: "fast"},
		Queue:   Queue{URL: "sqlite://.tessera/queue.db", Grace: 30 * time.Second, RescueAfter: time.Hour, ReapEvery: 2 * time.Second, ItemTimeout: time.Minute, TileTimeout: time.Second},
		Workers: 1,
		Runtime: Runtime{
			Providers:    []string{ProviderCPU},
			Optimization: "all",
			LogLevel:     "error",
			CUDA: CUDA{
				ArenaExtendStrategy: "kNextPowerOfTwo",
				CUDNNConvAlgoSearch: "EXHAUSTIVE",
			},
			TensorRT: TensorRT{
				FP16:            true,
				EngineCache:     true,
				EngineCachePath: ".tessera/trt",
				TimingCache:     true,
				TimingCachePath: ".tessera/trt",
			},
		},
		Models: Models{Dirs: []string{"./models"}, DefaultBase: "demo-base", DefaultSR: "demo-sr"},
		Limits: Limits{
			MaxPixels:   64 << 20,
			MaxItems:    10000,
			MaxSteps:    1000,
			MaxJobBytes: 1 << 20,
		},
		Server: Server{Addr: "127.0.0.1:9090"},
		Log:    Log{Level: "info", Format: "text"},
	}
}

// Flag binds a command-line flag to a configuration key.
type Flag struct {
	Key  string
	Flag *pflag.Flag
}

// Load builds the Config. file is the --config value ("" reads DefaultFile
// when it exists); flags bind command-line flags that were set to keys.
func Load(file string, flags ...Flag) (Config, error) {
	v := viper.New()
	setDefaults(v, "", reflect.ValueOf(Default()))
	v.SetEnvPrefix(EnvPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	explicit := file != ""
	if !explicit {
		if _, err := os.Stat(DefaultFile); err == nil {
			file = DefaultFile
		}
	}
	if file != "" {
		v.SetConfigFile(file)
		if err := v.ReadInConfig(); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", file, err)
		}
	}
	for _, f := range flags {
		if f.Flag != nil && f.Flag.Changed {
			if err := v.BindPFlag(f.Key, f.Flag); err != nil {
				return Config{}, fmt.Errorf("bind flag --%s: %w", f.Flag.Name, err)
			}
		}
	}
	var cfg Config
	hook := mapstructure.ComposeDecodeHookFunc(
		mapstructure.StringToTimeDurationHookFunc(),
		mapstructure.StringToWeakSliceHookFunc(","), // "0,1" from the env is a list; weak typing reads its ints
		byteSizeHook,
	)
	if err := v.UnmarshalExact(&cfg, viper.DecodeHook(hook)); err != nil {
		where := "configuration"
		if file != "" {
			where = "config " + file
		}
		return Config{}, fmt.Errorf("%s: %w", where, cleanDecodeError(err))
	}
	cfg.File = file
	if err := cfg.Validate(); err != nil {
		if file != "" {
			return Config{}, fmt.Errorf("config %s: %w", file, err)
		}
		return Config{}, err
	}
	return cfg, nil
}

// setDefaults registers every leaf of the default Config with viper, so that
// AutomaticEnv finds TESSERA_* variables for each key.
func setDefaults(v *viper.Viper, prefix string, val reflect.Value) {
	t := val.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("mapstructure")
		if tag == "" || tag == "-" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		fv := val.Field(i)
		if fv.Kind() == reflect.Struct && f.Type != reflect.TypeOf(time.Duration(0)) {
			setDefaults(v, key, fv)
			continue
		}
		v.SetDefault(key, fv.Interface())
	}
}

// byteSizeHook lets int64 byte counts be written as "8GiB", "512MB" or "0".
func byteSizeHook(from, to reflect.Type, data any) (any, error) {
	if from.Kind() != reflect.String || to.Kind() != reflect.Int64 {
		return data, nil
	}
	n, err := ParseBytes(data.(string))
	if err != nil {
		return nil, err
	}
	return n, nil
}

// ParseBytes parses a byte count with an optional unit (B, KB, MB, GB, TB
// for powers of 1000; KiB, MiB, GiB, TiB for powers of 1024).
func ParseBytes(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1},
	}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("invalid byte size %q (want e.g. 8GiB, 512MB or a number of bytes)", s)
	}
	return int64(f * float64(mult)), nil
}

// cleanDecodeError rewrites mapstructure's errors into one line per problem,
// each starting with the full key: "unknown key runtime.treads".
func cleanDecodeError(err error) error {
	msg := strings.TrimPrefix(err.Error(), "decoding failed due to the following error(s):\n\n")
	var out []string
	for _, l := range strings.Split(msg, "\n") {
		l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "*"))
		if l == "" {
			continue
		}
		if m := unknownKeys.FindStringSubmatch(l); m != nil {
			for _, k := range strings.Split(m[2], ",") {
				k = strings.TrimSpace(k)
				if m[1] != "" {
					k = m[1] + "." + k
				}
				out = append(out, "unknown key "+k)
			}
			continue
		}
		if m := keyPrefix.FindStringSubmatch(l); m != nil {
			l = m[1] + ": " + m[2]
		}
		out = append(out, l)
	}
	sort.Strings(out)
	return errors.New(strings.Join(out, "; "))
}

var (
	unknownKeys = regexp.MustCompile(`^'([^']*)' has invalid keys: (.*)$`)
	keyPrefix   = regexp.MustCompile(`^'([^']*)' (.*)$`)
)

// ValidationError lists every problem found in a Config, each with its key.
type ValidationError struct {
	Problems []string
}

func (e *ValidationError) Error() string {
	return "invalid configuration: " + strings.Join(e.Problems, "; ")
}

// Validate checks the Config and reports every problem at once.
func (c *Config) Validate() error {
	var p []string
	add := func(key, format string, args ...any) {
		p = append(p, key+": "+fmt.Sprintf(format, args...))
	}
	if _, err := stages.PNGCompression(c.Output.Compression); err != nil {
		add("output.compression", "%v", err)
	}
	if c.Output.Root == "" {
		add("output.root", "must not be empty")
	}
	if c.Queue.ItemTimeout <= 0 {
		add("queue.item_timeout", "must be positive, got %s", c.Queue.ItemTimeout)
	}
	if c.Queue.TileTimeout <= 0 {
		add("queue.tile_timeout", "must be positive, got %s", c.Queue.TileTimeout)
	}
	if c.Queue.Grace < 0 {
		add("queue.grace", "must not be negative, got %s", c.Queue.Grace)
	}
	if c.Queue.RescueAfter <= 0 {
		add("queue.rescue_after", "must be positive, got %s", c.Queue.RescueAfter)
	}
	if c.Queue.ReapEvery <= 0 {
		add("queue.reap_every", "must be positive, got %s", c.Queue.ReapEvery)
	}
	if c.Queue.URL == "" {
		add("queue.url", "must not be empty")
	} else if !strings.HasPrefix(c.Queue.URL, "sqlite://") && !strings.HasPrefix(c.Queue.URL, "postgres://") && !strings.HasPrefix(c.Queue.URL, "postgresql://") {
		add("queue.url", "%q: want sqlite://PATH or postgres://USER@HOST/DB", RedactURL(c.Queue.URL))
	}
	if c.Workers < 1 || c.Workers > 256 {
		add("workers", "must be between 1 and 256, got %d", c.Workers)
	}
	r := &c.Runtime
	if len(r.Providers) == 0 {
		add("runtime.providers", "must name at least one provider (cpu, cuda, tensorrt)")
	}
	seen := map[string]bool{}
	for i, name := range r.Providers {
		n := strings.ToLower(strings.TrimSpace(name))
		r.Providers[i] = n
		switch n {
		case ProviderCPU, ProviderCUDA, ProviderTensorRT:
		default:
			add(fmt.Sprintf("runtime.providers[%d]", i), "unknown provider %q (want cpu, cuda or tensorrt)", name)
		}
		if seen[n] {
			add(fmt.Sprintf("runtime.providers[%d]", i), "provider %q listed twice", n)
		}
		seen[n] = true
	}
	if r.Threads < 0 {
		add("runtime.threads", "must be 0 (all cores) or positive, got %d", r.Threads)
	}
	if r.InterThreads < 0 {
		add("runtime.inter_threads", "must be 0 or positive, got %d", r.InterThreads)
	}
	if r.Lanes < 0 {
		add("runtime.lanes", "must be 0 (auto) or positive, got %d", r.Lanes)
	}
	if len(r.Devices) > 0 && !r.GPU() {
		add("runtime.devices", "lists GPUs, so the first provider must be cuda or tensorrt (runtime.providers is %v)", r.Providers)
	}
	seenDev := map[int]bool{}
	for i, d := range r.Devices {
		if d < 0 {
			add(fmt.Sprintf("runtime.devices[%d]", i), "must not be negative, got %d", d)
		}
		if seenDev[d] {
			add(fmt.Sprintf("runtime.devices[%d]", i), "device %d listed twice", d)
		}
		seenDev[d] = true
	}
	if !oneOf(r.Optimization, "disabled", "basic", "extended", "all") {
		add("runtime.optimization", "%q: want disabled, basic, extended or all", r.Optimization)
	}
	if !oneOf(r.LogLevel, "verbose", "info", "warning", "error", "fatal") {
		add("runtime.log_level", "%q: want verbose, info, warning, error or fatal", r.LogLevel)
	}
	if r.CUDA.DeviceID < 0 {
		add("runtime.cuda.device_id", "must not be negative")
	}
	if r.CUDA.GPUMemLimit < 0 {
		add("runtime.cuda.gpu_mem_limit", "must not be negative")
	}
	if !oneOf(r.CUDA.ArenaExtendStrategy, "kNextPowerOfTwo", "kSameAsRequested") {
		add("runtime.cuda.arena_extend_strategy", "%q: want kNextPowerOfTwo or kSameAsRequested", r.CUDA.ArenaExtendStrategy)
	}
	if !oneOf(r.CUDA.CUDNNConvAlgoSearch, "EXHAUSTIVE", "HEURISTIC", "DEFAULT") {
		add("runtime.cuda.cudnn_conv_algo_search", "%q: want EXHAUSTIVE, HEURISTIC or DEFAULT", r.CUDA.CUDNNConvAlgoSearch)
	}
	if r.TensorRT.DeviceID < 0 {
		add("runtime.tensorrt.device_id", "must not be negative")
	}
	if r.TensorRT.WorkspaceSize < 0 {
		add("runtime.tensorrt.workspace_size", "must not be negative")
	}
	if c.Memory.Budget < 0 {
		add("memory.budget", "must be 0 (derive from the machine) or positive")
	}
	if c.Limits.MaxPixels <= 0 {
		add("limits.max_pixels", "must be positive")
	}
	if c.Limits.MaxItems <= 0 {
		add("limits.max_items", "must be positive")
	}
	if c.Limits.MaxSteps <= 0 {
		add("limits.max_steps", "must be positive")
	}
	if c.Limits.MaxJobBytes <= 0 {
		add("limits.max_job_bytes", "must be positive")
	}
	if !oneOf(c.Log.Level, "debug", "info", "warn", "error") {
		add("log.level", "%q: want debug, info, warn or error", c.Log.Level)
	}
	if !oneOf(c.Log.Format, "text", "json") {
		add("log.format", "%q: want text or json", c.Log.Format)
	}
	for i, w := range c.Watch {
		if w.Dir == "" {
			add(fmt.Sprintf("watch[%d].dir", i), "must not be empty")
		}
		if w.Settle < 0 || w.Rescan < 0 {
			add(fmt.Sprintf("watch[%d]", i), "settle and rescan must not be negative")
		}
	}
	names := map[string]bool{}
	for i, s := range c.Schedules {
		key := fmt.Sprintf("schedules[%d]", i)
		if s.Name == "" {
			add(key+".name", "must not be empty")
		} else if names[s.Name] {
			add(key+".name", "%q used twice", s.Name)
		}
		names[s.Name] = true
		if s.Cron == "" {
			add(key+".cron", "must not be empty")
		}
		if s.Job == "" {
			add(key+".job", "must name a job file")
		}
		if s.TZ != "" {
			if _, err := time.LoadLocation(s.TZ); err != nil {
				add(key+".tz", "unknown time zone %q", s.TZ)
			}
		}
	}
	if len(p) > 0 {
		sort.Strings(p)
		return &ValidationError{Problems: p}
	}
	return nil
}

// GPU says whether a GPU provider (cuda or tensorrt) leads the providers.
func (r Runtime) GPU() bool {
	return len(r.Providers) > 0 && r.Providers[0] != ProviderCPU
}

// IntraOpThreads is the intra-op thread budget: Threads, or all cores when 0.
func (r Runtime) IntraOpThreads() int {
	if r.Threads > 0 {
		return r.Threads
	}
	return runtime.NumCPU()
}

func oneOf(s string, allowed ...string) bool {
	for _, a := range allowed {
		if s == a {
			return true
		}
	}
	return false
}
