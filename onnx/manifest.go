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

// Spaces a model's canvas may be in.
const (
	SpacePixel  = "pixel"
	SpaceLatent = "latent"
)

// LearnedVariance reports whether the prediction output carries a learned
// variance after the prediction (2C channels).
func (m *Manifest) LearnedVariance() bool {
	return m.VarianceType == "learned" || m.VarianceType == "learned_range"
}

// splitString renders the channels of sample and prediction.
func (m *Manifest) splitString() string {
	s := fmt.Sprintf("%d channels", m.Channels)
	if m.LowresConcat {
		s = fmt.Sprintf("sample = [%d noisy | %d low-res]", m.Channels, m.Lowres())
	}
	if m.LearnedVariance() {
		s += ", output + learned variance"
	}
	return s
}

// Lowres is L, the channels of the low-res conditioning: those of a
// concatenated sample's second part, or of a separate lowres input (C).
func (m *Manifest) Lowres() int {
	if m.LowresConcat && m.LowresChannels > 0 {
		return m.LowresChannels
	}
	return m.Channels
}

// Prediction types.
const (
	PredEpsilon = "epsilon"
	PredV       = "v_prediction"
	PredSample  = "sample"
)

// Manifest is a model's tessera.yaml: the roles of its inputs and outputs and
// what the sampler must know about it. Decoding is strict.
type Manifest struct {
	Version      int               `yaml:"version" json:"version,omitempty"`
	Kind         string            `yaml:"kind" json:"kind,omitempty"`
	Prediction   string            `yaml:"prediction" json:"prediction,omitempty"`
	Inputs       map[string]string `yaml:"inputs" json:"inputs,omitempty"`
	Outputs      map[string]string `yaml:"outputs" json:"outputs,omitempty"`
	LowresConcat bool              `yaml:"lowres_concat" json:"lowres_concat,omitempty"`
	// LowresChannels is L of a concatenated sample [C noisy | L low-res]
	// (lowres_concat); 0 means L = channels.
	LowresChannels int `yaml:"lowres_channels" json:"lowres_channels,omitempty"`
	// Channels is C, the channels of the noisy sample and of the prediction.
	Channels int `yaml:"channels" json:"channels,omitempty"`
	// VarianceType is the scheduler's variance_type: with learned or
	// learned_range the prediction output has 2C channels, prediction then
	// variance, and the samplers use the first C (as diffusers' DDIM, Euler
	// and DPM-Solver do).
	VarianceType string `yaml:"variance_type" json:"variance_type,omitempty"`
	// NoiseLevelMax, when positive, says the noise_level input takes the
	// augmentation level in the model's own units, an integer in
	// [0, noise_level_max] (the ×4 upscaler's class_labels: 350, DeepFloyd
	// IF II's: 1000): a job's noise_level in [0, 1] is fed as that fraction
	// of it, rounded, and the low-res image is noised at that timestep of
	// NoiseScheduler's schedule (the model's own when empty).
	NoiseLevelMax  int    `yaml:"noise_level_max" json:"noise_level_max,omitempty"`
	NoiseScheduler string `yaml:"noise_scheduler_config" json:"noise_scheduler_config,omitempty"`
	// TextEncoder and Tokenizer are the pipeline's text side
	// (../text_encoder/model.onnx and ../tokenizer/ of a pipeline folder),
	// which turn an item's prompt into its context; "" when it has none.
	TextEncoder string `yaml:"text_encoder" json:"text_encoder,omitempty"`
	Tokenizer   string `yaml:"tokenizer" json:"tokenizer,omitempty"`
	// Autoencoder is the folder of a latent model's autoencoder (its
	// pipeline folder, or in tessera.yaml a folder relative to it, holding
	// vae_decoder/ and perhaps vae_encoder/), "" when it has none;
	// DecodeFactor is its decoder's factor.
	Autoencoder  string `yaml:"autoencoder" json:"autoencoder,omitempty"`
	DecodeFactor int    `yaml:"-" json:"decode_factor,omitempty"`
	// DecodeSync says the decoder has a cut-open copy (model_sync.onnx)
	// for GroupNorm statistics of the whole image.
	DecodeSync bool `yaml:"-" json:"decode_sync,omitempty"`
	// DecodeSyncLayers is how many GroupNorm layers it has (sync.json).
	DecodeSyncLayers int `yaml:"-" json:"decode_sync_layers,omitempty"`
	// EncodeSync and EncodeSyncLayers are the same for the encoder.
	EncodeSync       bool `yaml:"-" json:"encode_sync,omitempty"`
	EncodeSyncLayers int  `yaml:"-" json:"encode_sync_layers,omitempty"`
	// Encoder says the autoencoder has an encoder (vae_encoder/), which an
	// img2img stage needs.
	Encoder bool `yaml:"-" json:"encoder,omitempty"`
	// LatentScaling and LatentShift are the autoencoder's scaling_factor
	// and shift_factor (see Autoencoder).
	LatentScaling float64 `yaml:"-" json:"latent_scaling,omitempty"`
	LatentShift   float64 `yaml:"-" json:"latent_shift,omitempty"`
	// ContextDim is D of the context input [B, L, D] where known (the
	// U-Net config's cross_attention_dim); a context file must match it.
	ContextDim int `yaml:"context_dim" json:"context_dim,omitempty"`
	// Space is pixel (the default) or latent; a latent model's canvas needs
	// its autoencoder to become an image.
	Space          string   `yaml:"space" json:"space,omitempty"`
	NativeSize     []int    `yaml:"native_size" json:"native_size,omitempty"`
	Scale          int      `yaml:"scale" json:"scale,omitempty"`
	SizeMultiple   int      `yaml:"size_multiple" json:"size_multiple,omitempty"`
	ReceptiveField int      `yaml:"receptive_field" json:"receptive_field,omitempty"`
	Classes        int      `yaml:"classes" json:"classes,omitempty"`
	NullClass      int      `yaml:"null_class" json:"null_class,omitempty"`
	Schedule       Schedule `yaml:"schedule" json:"schedule,omitempty"`
	// SchedulerConfig names a diffusers scheduler_config.json, relative to the manifest.
	SchedulerConfig string   `yaml:"scheduler_config" json:"scheduler_config,omitempty"`
	Defaults        Defaults `yaml:"defaults" json:"defaults,omitempty"`
	Description     string   `yaml:"description" json:"description,omitempty"`
	License         string   `yaml:"license" json:"license,omitempty"`

	// ThresholdingRatio is the scheduler config's dynamic thresholding
	// ratio, 0 when it does not threshold (read from the config, recorded
	// in plans).
	ThresholdingRatio float64 `yaml:"-" json:"thresholding_ratio,omitempty"`

	// Facts say where each thing Tessera knows of the model came from (the
	// diffusers configs, tessera.yaml), for inspect.
	Facts []Fact `yaml:"-" json:"facts,omitempty"`
	// Conflicts are where tessera.yaml contradicts the diffusers configs
	// (tessera.yaml wins); the engine logs them once.
	Conflicts []string `yaml:"-" json:"conflicts,omitempty"`
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
	if m.SchedulerConfig != "" {
		var sh schedulerHead
		if _, err := readJSON(m.SchedulerConfig, &sh); err == nil {
			if sh.PredictionType != nil && *sh.PredictionType != m.Prediction {
				m.Conflicts = append(m.Conflicts, fmt.Sprintf("prediction: %s says %s, %s prediction_type %s; %s wins", ManifestFile, m.Prediction, filepath.Base(m.SchedulerConfig), *sh.PredictionType, ManifestFile))
			}
			m.ThresholdingRatio = sh.thresholding()
		}
	}
	for _, f := range []Fact{{"kind", m.Kind, ""}, {"prediction", m.Prediction, ""}, {"split", m.splitString(), ""}, {"scale", fmt.Sprint(m.Scale), ""}} {
		f.From = ManifestFile
		m.Facts = append(m.Facts, f)
	}
	if m.NoiseScheduler != "" && !filepath.IsAbs(m.NoiseScheduler) {
		m.NoiseScheduler = filepath.Join(filepath.Dir(path), m.NoiseScheduler)
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
	if m.Channels < 1 || m.Channels > 64 {
		add("channels: must be in [1, 64]")
	}
	if m.LowresChannels < 0 || m.LowresChannels > 64 || m.LowresChannels > 0 && !m.LowresConcat {
		add("lowres_channels: %d: give it with lowres_concat: true, at most 64", m.LowresChannels)
	}
	switch m.VarianceType {
	case "", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range":
	default:
		add("variance_type: %q (want fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned or learned_range)", m.VarianceType)
	}
	if m.NoiseLevelMax < 0 {
		add("noise_level_max: must not be negative")
	}
	switch m.Space {
	case "", SpacePixel, SpaceLatent:
	default:
		add("space: %q (want pixel or latent)", m.Space)
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
		if m.Scale < 2 && m.Space != SpaceLatent {
			add("scale: an sr model needs a scale of at least 2")
		}
		if m.Space == SpaceLatent && m.Scale != 1 && m.Scale != 0 {
			add("scale: a latent sr model denoises at the low-res size; its factor is its decoder's")
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
