package onnx

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"gopkg.in/yaml.v3"
)

// Fact is one thing Tessera knows about a model, with where it came from:
// a key of a diffusers config, of tessera.yaml, or a convention.
type Fact struct {
	Key   string `json:"key"`
	Value string `json:"value"`
	From  string `json:"from"`
}

// diffusersUNet is what Tessera reads of a diffusers U-Net config.json
// (UNet2DModel, UNet2DConditionModel).
type diffusersUNet struct {
	ClassName         string          `json:"_class_name"`
	InChannels        *int            `json:"in_channels"`
	OutChannels       *int            `json:"out_channels"`
	SampleSize        json.RawMessage `json:"sample_size"`
	BlockOutChannels  []int           `json:"block_out_channels"`
	ClassEmbedType    *string         `json:"class_embed_type"`
	NumClassEmbeds    *int            `json:"num_class_embeds"`
	CrossAttentionDim json.RawMessage `json:"cross_attention_dim"`
}

// diffusersPipeline is what Tessera reads of a pipeline's model_index.json.
type diffusersPipeline struct {
	ClassName     string `json:"_class_name"`
	MaxNoiseLevel *int   `json:"max_noise_level"`
	// Components present: a latent pipeline names its autoencoder.
	VAE   json.RawMessage `json:"vae"`
	VQVAE json.RawMessage `json:"vqvae"`
}

// pipelineFacts are what the reference pipelines fix in code rather than in
// a config: an SR pipeline's factor and space, and its default noise level
// in the model's units.
var pipelineFacts = map[string]struct {
	scale      int
	space      string
	noiseLevel int // default augmentation level, model units
}{
	"IFSuperResolutionPipeline":      {4, SpacePixel, 250},
	"StableDiffusionUpscalePipeline": {1, SpaceLatent, 20},
	"LDMSuperResolutionPipeline":     {1, SpaceLatent, 0},
}

// maxConfigBytes bounds a diffusers config file.
const maxConfigBytes = 1 << 20

// ReadConfigFile reads a config file of at most maxConfigBytes, which must
// be a regular file (not /dev/zero or a FIFO a link leads to).
func ReadConfigFile(path string) ([]byte, error) {
	return ReadRegular(path, maxConfigBytes)
}

// ReadRegular reads path, which must be a regular file of at most limit
// bytes; the limit holds while reading, whatever the file grows to.
func ReadRegular(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%s: %d bytes, limit %d", path, st.Size(), limit)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s: more than %d bytes", path, limit)
	}
	return data, nil
}

func readJSON(path string, dst any) (bool, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	data, err := ReadConfigFile(path)
	if err != nil {
		return true, err
	}
	if err := json.Unmarshal(data, dst); err != nil {
		return true, fmt.Errorf("%s: %w", path, err)
	}
	return true, nil
}

// firstFile returns the first of paths that exists, or "".
func firstFile(paths ...string) string {
	for _, p := range paths {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p
		}
	}
	return ""
}

// schedulerHead is what the derivation reads of a scheduler config itself;
// the schedule is built from the file by stages.
type schedulerHead struct {
	ClassName         string   `json:"_class_name"`
	PredictionType    *string  `json:"prediction_type"`
	VarianceType      *string  `json:"variance_type"`
	NumTrainTimesteps *int     `json:"num_train_timesteps"`
	Thresholding      *bool    `json:"thresholding"`
	ThresholdingRatio *float64 `json:"dynamic_thresholding_ratio"`
}

// thresholding is the dynamic-thresholding ratio a scheduler config sets,
// 0 when it does not threshold (diffusers' default ratio is 0.995).
func (h schedulerHead) thresholding() float64 {
	if h.Thresholding == nil || !*h.Thresholding {
		return 0
	}
	if h.ThresholdingRatio != nil {
		return *h.ThresholdingRatio
	}
	return 0.995
}

// readDiffusers derives a manifest from the diffusers configs of the model
// in dir, as diffusers and Optimum write a model folder: the U-Net's
// config.json beside model.onnx, its scheduler_config.json beside it or in
// ../scheduler/, and, in a pipeline folder, ../model_index.json and the
// low-res noising scheduler (../low_res_scheduler/ or
// ../image_noising_scheduler/). It returns nil when dir has no config.json.
// The graph's IO names are Optimum's (sample, timestep, class_labels,
// encoder_hidden_states, out_sample); tessera.yaml renames them.
func readDiffusers(dir string) (*Manifest, error) {
	var u diffusersUNet
	cfgPath := filepath.Join(dir, "config.json")
	ok, err := readJSON(cfgPath, &u)
	if err != nil || !ok {
		return nil, err
	}
	if u.ClassName != "" && !strings.HasPrefix(u.ClassName, "UNet") {
		return nil, nil // a text encoder's or an autoencoder's config: not a denoiser
	}
	m := &Manifest{Version: 1, NullClass: -1, SizeMultiple: 1, Prediction: PredEpsilon, Space: SpacePixel,
		Inputs: map[string]string{RoleSample: "sample", RoleTimestep: "timestep"}, Outputs: map[string]string{RolePrediction: "out_sample"}}
	fact := func(key, value, from string) { m.Facts = append(m.Facts, Fact{key, value, from}) }
	if u.InChannels == nil || u.OutChannels == nil {
		return nil, fmt.Errorf("%s: in_channels and out_channels are required", cfgPath)
	}
	// The scheduler says the prediction type and whether half the output
	// is a learned variance. The folders beside this one are looked at only
	// in a pipeline folder (model_index.json above), so that a sibling model
	// in a flat models.dirs is never taken for a pipeline's part.
	_, err = os.Stat(filepath.Join(dir, "..", "model_index.json"))
	inPipeline := err == nil
	up := func(parts ...string) string {
		if !inPipeline {
			return ""
		}
		return filepath.Join(append([]string{dir, ".."}, parts...)...)
	}
	var sh schedulerHead
	schedPath := firstFile(filepath.Join(dir, "scheduler_config.json"), up("scheduler", "scheduler_config.json"))
	if schedPath == "" {
		return nil, fmt.Errorf("%s: no scheduler_config.json beside it or in ../scheduler/: the schedule and prediction type are unknown", cfgPath)
	}
	if _, err := readJSON(schedPath, &sh); err != nil {
		return nil, err
	}
	m.SchedulerConfig = schedPath
	if m.ThresholdingRatio = sh.thresholding(); m.ThresholdingRatio > 0 {
		defer fact("thresholding", fmt.Sprintf("dynamic, ratio %g, of the whole canvas's x0", m.ThresholdingRatio), "scheduler_config.json thresholding")
	}
	rel := func(p string) string {
		if r, err := filepath.Rel(dir, p); err == nil {
			return r
		}
		return p
	}
	fact("schedule", filepath.Base(filepath.Dir(schedPath))+"/"+filepath.Base(schedPath), rel(schedPath))
	if sh.PredictionType != nil {
		m.Prediction = *sh.PredictionType
		fact("prediction", m.Prediction, rel(schedPath)+" prediction_type")
	} else {
		fact("prediction", m.Prediction, "diffusers' default (no prediction_type)")
	}
	out := *u.OutChannels
	if sh.VarianceType != nil {
		m.VarianceType = *sh.VarianceType
	}
	m.Channels = out
	if m.LearnedVariance() {
		if out%2 != 0 {
			return nil, fmt.Errorf("%s: out_channels %d with variance_type %s: want an even count (prediction and variance)", cfgPath, out, m.VarianceType)
		}
		m.Channels = out / 2
		fact("variance", m.VarianceType+": output = prediction + learned variance", rel(schedPath)+" variance_type")
	} else if m.VarianceType != "" {
		fact("variance", m.VarianceType, rel(schedPath)+" variance_type")
	}
	// A pipeline folder says the family.
	var pl diffusersPipeline
	indexPath := filepath.Join(dir, "..", "model_index.json")
	hasIndex, err := readJSON(indexPath, &pl)
	if !inPipeline {
		hasIndex = false
	}
	if err != nil {
		return nil, err
	}
	pf, knownPipeline := pipelineFacts[pl.ClassName]
	lowres := *u.InChannels - m.Channels
	switch {
	case lowres < 0:
		return nil, fmt.Errorf("%s: in_channels %d is less than the prediction's %d channels", cfgPath, *u.InChannels, m.Channels)
	case lowres > 0:
		m.Kind, m.LowresConcat, m.LowresChannels = KindSR, true, lowres
		fact("kind", "sr", fmt.Sprintf("config.json in_channels %d = %d noisy + %d low-res (out_channels %d)", *u.InChannels, m.Channels, lowres, out))
		fact("split", fmt.Sprintf("sample = [%d noisy | %d low-res]", m.Channels, lowres), "config.json in_channels, out_channels")
	case knownPipeline && pf.scale > 0:
		m.Kind = KindSR
		fact("kind", "sr", "model_index.json _class_name "+pl.ClassName)
	default:
		m.Kind = KindBase
		fact("kind", "base", fmt.Sprintf("config.json in_channels %d = out_channels: no low-res input", *u.InChannels))
	}
	if hasIndex && (len(pl.VAE) > 0 || len(pl.VQVAE) > 0) || knownPipeline && pf.space == SpaceLatent {
		m.Space = SpaceLatent
		fact("space", "latent", "model_index.json names an autoencoder ("+pl.ClassName+")")
	}
	if m.Kind == KindSR {
		switch {
		case m.Space == SpaceLatent:
			m.Scale = 1
			fact("scale", "1 on the latent canvas (the decoder's factor gives the upscale)", "model_index.json "+pl.ClassName)
		case knownPipeline:
			m.Scale = pf.scale
			fact("scale", fmt.Sprint(pf.scale), "the reference pipeline "+pl.ClassName)
		default:
			fact("scale", "unknown", "no pipeline class says it: give scale in tessera.yaml")
		}
	}
	if len(u.SampleSize) > 0 && string(u.SampleSize) != "null" {
		var n int
		var hw []int
		switch {
		case json.Unmarshal(u.SampleSize, &n) == nil && n > 0:
			m.NativeSize = []int{n, n}
		case json.Unmarshal(u.SampleSize, &hw) == nil && len(hw) == 2 && hw[0] > 0 && hw[1] > 0:
			m.NativeSize = hw
		default:
			return nil, fmt.Errorf("%s: sample_size %s: want a size or [height, width]", cfgPath, u.SampleSize)
		}
		fact("native_size", fmt.Sprintf("%dx%d", m.NativeSize[1], m.NativeSize[0]), "config.json sample_size")
	}
	if n := len(u.BlockOutChannels); n > 1 {
		m.SizeMultiple = 1 << (n - 1) // every block but the last halves the size
		fact("size_multiple", fmt.Sprint(m.SizeMultiple), fmt.Sprintf("config.json block_out_channels (%d blocks)", n))
	}
	if len(u.CrossAttentionDim) > 0 && string(u.CrossAttentionDim) != "null" {
		m.Inputs[RoleContext] = "encoder_hidden_states"
		var d int
		var ds []int
		if json.Unmarshal(u.CrossAttentionDim, &d) != nil {
			if json.Unmarshal(u.CrossAttentionDim, &ds) != nil || len(ds) == 0 {
				return nil, fmt.Errorf("%s: cross_attention_dim %s: want a width or a list of them", cfgPath, u.CrossAttentionDim)
			}
			d = ds[0] // one per block; the embedding's is the same for all
		}
		if d < 1 || d > 1<<16 {
			return nil, fmt.Errorf("%s: cross_attention_dim %d out of range", cfgPath, d)
		}
		m.ContextDim = d
		fact("context", fmt.Sprintf("encoder_hidden_states [B,L,%d]", d), "config.json cross_attention_dim")
	}
	classed := u.ClassEmbedType != nil || u.NumClassEmbeds != nil
	switch {
	case classed && m.Kind == KindSR:
		// The SR families feed the augmentation level through class_labels.
		m.Inputs[RoleNoiseLevel] = "class_labels"
		m.NoiseLevelMax = 999
		from := "config.json class_embed_type on an SR model (a timestep)"
		if u.NumClassEmbeds != nil && *u.NumClassEmbeds >= 2 {
			m.NoiseLevelMax, from = min(999, *u.NumClassEmbeds-1), "config.json num_class_embeds"
		}
		if pl.MaxNoiseLevel != nil {
			m.NoiseLevelMax, from = *pl.MaxNoiseLevel, "model_index.json max_noise_level"
		}
		noise := firstFile(up("low_res_scheduler", "scheduler_config.json"), up("image_noising_scheduler", "scheduler_config.json"))
		if noise != "" {
			m.NoiseScheduler = noise
			var nh schedulerHead
			if _, err := readJSON(noise, &nh); err != nil {
				return nil, err
			}
			if pl.MaxNoiseLevel == nil && nh.NumTrainTimesteps != nil {
				m.NoiseLevelMax, from = *nh.NumTrainTimesteps-1, rel(noise)+" num_train_timesteps"
			}
			fact("noise_schedule", rel(noise), "the pipeline's noising scheduler")
		}
		fact("noise_level", fmt.Sprintf("class_labels, an integer in [0, %d]", m.NoiseLevelMax), from)
		if knownPipeline && pf.noiseLevel > 0 && m.NoiseLevelMax > 0 {
			m.Defaults.NoiseLevel = float64(pf.noiseLevel) / float64(m.NoiseLevelMax)
			fact("defaults.noise_level", fmt.Sprintf("%d (%.4g of %d)", pf.noiseLevel, m.Defaults.NoiseLevel, m.NoiseLevelMax), "the reference pipeline "+pl.ClassName)
		}
	case classed:
		m.Inputs[RoleClass] = "class_labels"
		if u.NumClassEmbeds != nil {
			m.Classes = *u.NumClassEmbeds
		}
		fact("class", fmt.Sprintf("class_labels, %d classes", m.Classes), "config.json num_class_embeds")
	}
	if m.Kind == KindSR && !m.LowresConcat {
		m.Inputs[RoleLowres] = "low_res"
	}
	if m.Space == SpaceLatent && inPipeline {
		if _, err := os.Stat(up("vae_decoder", "model.onnx")); err == nil {
			if err := m.attachAutoencoder(filepath.Join(dir, ".."), "../"); err != nil {
				return nil, err
			}
		}
	}
	if m.Inputs[RoleContext] != "" && inPipeline {
		te := firstFile(up("text_encoder", "model.onnx"))
		tk := up("tokenizer")
		kind := ""
		if _, err := os.Stat(filepath.Join(tk, "vocab.json")); err == nil {
			kind = "CLIP BPE"
		} else if _, err := os.Stat(filepath.Join(tk, "spiece.model")); err == nil {
			kind = "SentencePiece"
		}
		if _, err := os.Stat(up("text_encoder_2")); err == nil {
			te, kind = "", ""
			fact("text", "two text encoders (text_encoder_2/): not supported; give context: FILE", "the pipeline folder")
		}
		if te != "" && kind != "" {
			m.TextEncoder, m.Tokenizer = te, tk
			fact("text", "prompts through ../text_encoder/ and ../tokenizer/ ("+kind+")", "the pipeline folder")
		}
	}
	return m, nil
}

// attachAutoencoder describes the latent model's autoencoder in dir (a
// folder holding vae_decoder/ and perhaps vae_encoder/): its factor, whether
// it can encode, whether its decoder has a cut-open copy. rel is how the
// facts name dir.
func (m *Manifest) attachAutoencoder(dir, rel string) error {
	a, err := ReadAutoencoder(dir)
	if err != nil {
		return err
	}
	if a.LatentChannels != m.Channels {
		return fmt.Errorf("%s: the decoder takes %d latent channels, the U-Net makes %d", a.Decoder, a.LatentChannels, m.Channels)
	}
	m.Autoencoder, m.DecodeFactor, m.Encoder = dir, a.Factor, a.Encoder != ""
	m.LatentScaling, m.LatentShift = a.ScalingFactor, a.ShiftFactor
	n, err := syncLayers(filepath.Dir(a.Decoder))
	if err != nil {
		return err
	}
	if n > 0 {
		m.DecodeSync, m.DecodeSyncLayers = true, n
		m.Facts = append(m.Facts, Fact{"decode", fmt.Sprintf("GroupNorm statistics of the whole image (vae_decoder/model_sync.onnx, %d layers)", n), "tools/sync_decoder.py"})
	}
	if a.Encoder != "" {
		if n, err = syncLayers(filepath.Dir(a.Encoder)); err != nil {
			return err
		}
		if n > 0 {
			m.EncodeSync, m.EncodeSyncLayers = true, n
			m.Facts = append(m.Facts, Fact{"encode", fmt.Sprintf("GroupNorm statistics of the whole image (vae_encoder/model_sync.onnx, %d layers)", n), "tools/sync_decoder.py"})
		}
	}
	shift := ""
	if a.ShiftFactor != 0 {
		shift = fmt.Sprintf(", shift %g", a.ShiftFactor)
	}
	m.Facts = append(m.Facts, Fact{"decoder", fmt.Sprintf("%s ×%d, %d latent channels, scaling %g%s", a.Class, a.Factor, a.LatentChannels, a.ScalingFactor, shift), rel + "vae_decoder/config.json"})
	if a.Encoder != "" {
		m.Facts = append(m.Facts, Fact{"encoder", "vae_encoder/model.onnx: images can be encoded (img2img)", rel + "vae_encoder/"})
	}
	return nil
}

// syncLayers is how many GroupNorm layers the cut-open copy of the graph
// in dir has (model_sync.onnx and its sync.json), 0 when it has none.
func syncLayers(dir string) (int, error) {
	if _, err := os.Stat(filepath.Join(dir, "model_sync.onnx")); err != nil {
		return 0, nil
	}
	data, err := ReadConfigFile(filepath.Join(dir, "sync.json"))
	if err != nil {
		return 0, fmt.Errorf("%s: model_sync.onnx without a readable sync.json: %w", dir, err)
	}
	var sj struct {
		Layers []json.RawMessage `json:"layers"`
	}
	if err := json.Unmarshal(data, &sj); err != nil || len(sj.Layers) == 0 || len(sj.Layers) > 1000 {
		return 0, fmt.Errorf("%s: sync.json: want 1 to 1000 layers (%v)", dir, err)
	}
	return len(sj.Layers), nil
}

// overlay decodes tessera.yaml over a manifest derived from the diffusers
// configs: the keys it gives win, and where one contradicts the configs
// the contradiction is kept (Conflicts) for the log to say once, and the
// fact's source says so.
func overlay(base *Manifest, data []byte, path string) (*Manifest, error) {
	m := *base
	m.Inputs, m.Outputs = copyMap(base.Inputs), copyMap(base.Outputs)
	m.NativeSize = append([]int(nil), base.NativeSize...)
	m.Facts = append([]Fact(nil), base.Facts...)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("manifest %s: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if m.SchedulerConfig != base.SchedulerConfig && m.SchedulerConfig != "" && !filepath.IsAbs(m.SchedulerConfig) {
		m.SchedulerConfig = filepath.Join(filepath.Dir(path), m.SchedulerConfig)
	}
	for _, c := range []struct {
		key       string
		was, now  any
		factKey   string
		fromLabel string
	}{
		{"kind", base.Kind, m.Kind, "kind", ""},
		{"prediction", base.Prediction, m.Prediction, "prediction", ""},
		{"channels", base.Channels, m.Channels, "split", ""},
		{"lowres_channels", base.LowresChannels, m.LowresChannels, "split", ""},
		{"variance_type", base.VarianceType, m.VarianceType, "variance", ""},
		{"scale", base.Scale, m.Scale, "scale", ""},
		{"size_multiple", base.SizeMultiple, m.SizeMultiple, "size_multiple", ""},
		{"native_size", fmt.Sprint(base.NativeSize), fmt.Sprint(m.NativeSize), "native_size", ""},
		{"noise_level_max", base.NoiseLevelMax, m.NoiseLevelMax, "noise_level", ""},
	} {
		if fmt.Sprint(c.was) == fmt.Sprint(c.now) {
			continue
		}
		from := ManifestFile + " " + c.key
		if fmt.Sprint(c.was) != "" && fmt.Sprint(c.was) != "0" && fmt.Sprint(c.was) != "[]" {
			m.Conflicts = append(m.Conflicts, fmt.Sprintf("%s: %s says %v, the diffusers configs %v; %s wins", c.key, ManifestFile, c.now, c.was, ManifestFile))
			from += fmt.Sprintf(" (over the configs' %v)", c.was)
		}
		replaced := false
		for i := range m.Facts {
			if m.Facts[i].Key == c.factKey {
				m.Facts[i] = Fact{c.factKey, fmt.Sprint(c.now), from}
				replaced = true
			}
		}
		if !replaced {
			m.Facts = append(m.Facts, Fact{c.factKey, fmt.Sprint(c.now), from})
		}
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("manifest %s over the diffusers configs: %w", path, err)
	}
	return &m, nil
}

func copyMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
