package onnx

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// ManifestFile is the manifest's name beside a model file.
const ManifestFile = "tessera.yaml"

// Roles of a model's inputs and outputs.
const (
	RoleSample     = "sample"      // noisy input
	RoleTimestep   = "timestep"    // diffusion timestep, scalar or [B]
	RoleLowres     = "lowres"      // SR conditioning image, upsampled to the sample's size
	RoleNoiseLevel = "noise_level" // SR augmentation level
	RoleClass      = "class"       // int64 class labels
	RoleContext    = "context"     // embeddings [B, L, D]
	RolePrediction = "prediction"  // output
)

var inputRoles = []string{RoleSample, RoleTimestep, RoleLowres, RoleNoiseLevel, RoleClass, RoleContext}

// Model kinds.
const (
	KindBase = "base"
	KindSR   = "sr"
)

// Prediction types.
const (
	PredEpsilon = "epsilon"
	PredV       = "v_prediction"
	PredSample  = "sample"
)

// Manifest is a model's tessera.yaml: the roles of its inputs and outputs and
// what the sampler must know about it. Decoding is strict.
type Manifest struct {
	Version        int               `yaml:"version" json:"version,omitempty"`
	Kind           string            `yaml:"kind" json:"kind,omitempty"`
	Prediction     string            `yaml:"prediction" json:"prediction,omitempty"`
	Inputs         map[string]string `yaml:"inputs" json:"inputs,omitempty"`
	Outputs        map[string]string `yaml:"outputs" json:"outputs,omitempty"`
	LowresConcat   bool              `yaml:"lowres_concat" json:"lowres_concat,omitempty"`
	Channels       int               `yaml:"channels" json:"channels,omitempty"`
	NativeSize     []int             `yaml:"native_size" json:"native_size,omitempty"`
	Scale          int               `yaml:"scale" json:"scale,omitempty"`
	SizeMultiple   int               `yaml:"size_multiple" json:"size_multiple,omitempty"`
	ReceptiveField int               `yaml:"receptive_field" json:"receptive_field,omitempty"`
	Classes        int               `yaml:"classes" json:"classes,omitempty"`
	NullClass      int               `yaml:"null_class" json:"null_class,omitempty"`
	Schedule       Schedule          `yaml:"schedule" json:"schedule,omitempty"`
	// SchedulerConfig names a diffusers scheduler_config.json, relative to the manifest.
	SchedulerConfig string   `yaml:"scheduler_config" json:"scheduler_config,omitempty"`
	Defaults        Defaults `yaml:"defaults" json:"defaults,omitempty"`
	Description     string   `yaml:"description" json:"description,omitempty"`
	License         string   `yaml:"license" json:"license,omitempty"`
}

// Schedule holds diffusers-style noise schedule keys.
type Schedule struct {
	NumTrainTimesteps int     `yaml:"num_train_timesteps" json:"num_train_timesteps"`
	BetaSchedule      string  `yaml:"beta_schedule" json:"beta_schedule"`
	BetaStart         float64 `yaml:"beta_start" json:"beta_start"`
	BetaEnd           float64 `yaml:"beta_end" json:"beta_end"`
	TimestepSpacing   string  `yaml:"timestep_spacing" json:"timestep_spacing"`
	StepsOffset       int     `yaml:"steps_offset" json:"steps_offset"`
}

// Defaults are a model's sampling defaults.
type Defaults struct {
	Steps      int     `yaml:"steps" json:"steps"`
	Sampler    string  `yaml:"sampler" json:"sampler"`
	Guidance   float64 `yaml:"guidance" json:"guidance"`
	Strength   float64 `yaml:"strength" json:"strength"`
	NoiseLevel float64 `yaml:"noise_level" json:"noise_level"`
}

// ReadManifest reads and validates path strictly; the error names the file
// and the offending key.
func ReadManifest(path string) (*Manifest, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m, err := ParseManifest(data)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", path, err)
	}
	if m.SchedulerConfig != "" && !filepath.IsAbs(m.SchedulerConfig) {
		m.SchedulerConfig = filepath.Join(filepath.Dir(path), m.SchedulerConfig)
	}
	return m, nil
}

// ParseManifest decodes manifest bytes: unknown keys are errors, and every
// problem of the content is reported at once.
func ParseManifest(data []byte) (*Manifest, error) {
	m := &Manifest{NullClass: -1, SizeMultiple: 1, Channels: 3}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(m); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty manifest")
		}
		return nil, fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if err := m.validate(); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *Manifest) validate() error {
	var p []string
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }
	if m.Version != 1 {
		add("version: %d is not supported (want 1)", m.Version)
	}
	if m.Kind != KindBase && m.Kind != KindSR {
		add("kind: %q (want base or sr)", m.Kind)
	}
	switch m.Prediction {
	case PredEpsilon, PredV, PredSample:
	default:
		add("prediction: %q (want epsilon, v_prediction or sample)", m.Prediction)
	}
	known := map[string]bool{}
	for _, r := range inputRoles {
		known[r] = true
	}
	for _, role := range sortedKeys(m.Inputs) {
		if !known[role] {
			add("inputs.%s: unknown role (want one of %s)", role, strings.Join(inputRoles, ", "))
		}
		if m.Inputs[role] == "" {
			add("inputs.%s: empty input name", role)
		}
	}
	for _, role := range sortedKeys(m.Outputs) {
		if role != RolePrediction {
			add("outputs.%s: unknown role (want prediction)", role)
		}
	}
	if m.Inputs[RoleSample] == "" {
		add("inputs.sample: required")
	}
	if m.Inputs[RoleTimestep] == "" {
		add("inputs.timestep: required")
	}
	if m.Outputs[RolePrediction] == "" {
		add("outputs.prediction: required")
	}
	if m.Channels < 1 {
		add("channels: must be positive")
	}
	if m.SizeMultiple < 1 {
		add("size_multiple: must be positive")
	}
	if m.ReceptiveField < 0 {
		add("receptive_field: must not be negative")
	}
	if m.Kind == KindBase && len(m.NativeSize) != 2 {
		add("native_size: a base model needs [height, width]")
	}
	for i, s := range m.NativeSize {
		if s <= 0 {
			add("native_size[%d]: must be positive", i)
		}
	}
	if m.Kind == KindSR {
		if m.Scale < 2 {
			add("scale: an sr model needs a scale of at least 2")
		}
		if m.LowresConcat && m.Inputs[RoleLowres] != "" {
			add("inputs.lowres: must be absent when lowres_concat is true")
		}
		if !m.LowresConcat && m.Inputs[RoleLowres] == "" {
			add("inputs.lowres: an sr model needs a lowres input or lowres_concat: true")
		}
	}
	if m.Classes < 0 {
		add("classes: must not be negative")
	}
	if m.NullClass < -1 || (m.Classes > 0 && m.NullClass > m.Classes) {
		add("null_class: %d out of range", m.NullClass)
	}
	if m.SchedulerConfig == "" {
		s := m.Schedule
		if s.NumTrainTimesteps <= 0 {
			add("schedule.num_train_timesteps: must be positive (or give scheduler_config)")
		}
		switch s.BetaSchedule {
		case "linear", "scaled_linear", "squaredcos_cap_v2":
		default:
			add("schedule.beta_schedule: %q (want linear, scaled_linear or squaredcos_cap_v2)", s.BetaSchedule)
		}
		switch s.TimestepSpacing {
		case "", "leading", "linspace", "trailing":
		default:
			add("schedule.timestep_spacing: %q (want leading, linspace or trailing)", s.TimestepSpacing)
		}
	}
	d := m.Defaults
	if d.Steps < 0 {
		add("defaults.steps: must not be negative")
	}
	if d.Strength < 0 || d.Strength > 1 {
		add("defaults.strength: %g not in (0, 1]", d.Strength)
	}
	if d.NoiseLevel < 0 || d.NoiseLevel > 1 {
		add("defaults.noise_level: %g not in [0, 1]", d.NoiseLevel)
	}
	if len(p) > 0 {
		return errors.New(strings.Join(p, "; "))
	}
	return nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
