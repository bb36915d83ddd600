package onnx

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	ort "github.com/yalue/onnxruntime_go"
)

// IO describes one graph input or output.
type IO struct {
	Name  string   `json:"name"`
	Type  ElemType `json:"type"`
	Shape []int64  `json:"shape"` // -1 marks a dynamic dimension
	Role  string   `json:"role,omitempty"`
}

// Dynamic reports whether dimension i is dynamic.
func (io IO) Dynamic(i int) bool { return i < len(io.Shape) && io.Shape[i] < 0 }

// ShapeString renders the shape as [B,3,H,W]-style text with ? for dynamic dims.
func (io IO) ShapeString() string {
	parts := make([]string, len(io.Shape))
	for i, d := range io.Shape {
		if d < 0 {
			parts[i] = "?"
		} else {
			parts[i] = fmt.Sprint(d)
		}
	}
	return "[" + strings.Join(parts, ",") + "]"
}

// Model is an ONNX graph with its IO description and roles. It holds no
// session; see Env.NewSession.
type Model struct {
	Name     string // the name it was asked for: a path or an embedded name
	Path     string // the file, "" when loaded from bytes
	Header   *ModelHeader
	Inputs   []IO
	Outputs  []IO
	Manifest *Manifest // nil when roles were guessed
	// Kind is base or sr, from the manifest or guessed.
	Kind string

	data []byte // the model bytes when it came from memory
}

// RolesGuessed reports whether roles come from conventional names and shapes
// rather than a manifest.
func (m *Model) RolesGuessed() bool { return m.Manifest == nil }

// Input returns the input with the given role, or nil.
func (m *Model) Input(role string) *IO {
	for i := range m.Inputs {
		if m.Inputs[i].Role == role {
			return &m.Inputs[i]
		}
	}
	return nil
}

// Output returns the output with the given role, or nil.
func (m *Model) Output(role string) *IO {
	for i := range m.Outputs {
		if m.Outputs[i].Role == role {
			return &m.Outputs[i]
		}
	}
	return nil
}

// ReadModelFile reads what Tessera can know of the model at path without
// ONNX Runtime: its header (the file is mapped, not read, and tensors are
// skipped), that its external data files exist, and tessera.yaml beside it
// when present (nil otherwise). path may be the model's directory, holding
// model.onnx; the file's path is returned. A truncated or random file, a
// bad manifest or a missing .onnx_data file is an error naming the file.
func ReadModelFile(path string) (file string, hdr *ModelHeader, man *Manifest, err error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", nil, nil, fmt.Errorf("load model %q: %w", path, err)
	}
	dir := filepath.Dir(path)
	if st.IsDir() {
		dir = path
		// A diffusers pipeline folder: its U-Net.
		if _, err := os.Stat(filepath.Join(dir, "model.onnx")); err != nil {
			if _, err := os.Stat(filepath.Join(dir, "unet", "model.onnx")); err == nil {
				dir = filepath.Join(dir, "unet")
			}
		}
		path = filepath.Join(dir, "model.onnx")
	}
	data, unmap, err := mapFile(path)
	if err != nil {
		return "", nil, nil, fmt.Errorf("load model %q: %w", path, err)
	}
	hdr, err = ParseModelHeader(data) // copies every string it keeps
	unmap()
	if err != nil {
		return "", nil, nil, fmt.Errorf("load model %q: %w", path, err)
	}
	for _, ext := range hdr.ExternalData {
		p := filepath.Join(dir, ext)
		if _, err := os.Stat(p); err != nil {
			return "", nil, nil, fmt.Errorf("load model %q: external data file %q is missing: %w", path, ext, err)
		}
	}
	derived, err := readDiffusers(dir)
	if err != nil {
		return "", nil, nil, fmt.Errorf("load model %q: %w", path, err)
	}
	mpath := filepath.Join(dir, ManifestFile)
	_, statErr := os.Stat(mpath)
	switch {
	case statErr == nil && derived != nil:
		data, err := os.ReadFile(mpath)
		if err == nil {
			man, err = overlay(derived, data, mpath)
		}
		if err != nil {
			return "", nil, nil, fmt.Errorf("load model %q: %w", path, err)
		}
	case statErr == nil:
		if man, err = ReadManifest(mpath); err != nil {
			return "", nil, nil, fmt.Errorf("load model %q: %w", path, err)
		}
	case derived != nil:
		if err := derived.validate(); err != nil {
			return "", nil, nil, fmt.Errorf("load model %q: from its diffusers configs: %w", path, err)
		}
		man = derived
	}
	aeOf := func(p string) string { // tessera.yaml's is relative to the model's folder
		if !filepath.IsAbs(p) {
			return filepath.Join(dir, p)
		}
		return filepath.Clean(p)
	}
	if man != nil && man.Autoencoder != "" && (man.DecodeFactor == 0 || derived == nil ||
		man.Autoencoder != derived.Autoencoder && aeOf(man.Autoencoder) != filepath.Clean(derived.Autoencoder)) {
		// Named by tessera.yaml, over the pipeline folder's own where it
		// has one.
		ae := aeOf(man.Autoencoder)
		if derived != nil && derived.Autoencoder != "" {
			man.Conflicts = append(man.Conflicts, fmt.Sprintf("autoencoder: %s says %s, the pipeline folder has its own; %s wins", ManifestFile, man.Autoencoder, ManifestFile))
		}
		// Forget what the pipeline folder's autoencoder said.
		man.DecodeFactor, man.DecodeSync, man.DecodeSyncLayers, man.Encoder, man.LatentScaling, man.LatentShift = 0, false, 0, false, 0, 0
		man.EncodeSync, man.EncodeSyncLayers = false, 0
		facts := man.Facts[:0:0]
		for _, f := range man.Facts {
			if f.Key != "decoder" && f.Key != "decode" && f.Key != "encoder" && f.Key != "encode" {
				facts = append(facts, f)
			}
		}
		man.Facts = facts
		if man.Space != SpaceLatent {
			return "", nil, nil, fmt.Errorf("load model %q: %s autoencoder: %s, but the model is not latent (space: latent)", path, ManifestFile, man.Autoencoder)
		}
		if err := man.attachAutoencoder(ae, ManifestFile+" autoencoder "); err != nil {
			return "", nil, nil, fmt.Errorf("load model %q: %s autoencoder: %w", path, ManifestFile, err)
		}
	}
	return path, hdr, man, nil
}

// ReadModelBytes is ReadModelFile for a model held in memory with its
// manifest's bytes (nil when it has none).
func ReadModelBytes(name string, data, manifest []byte) (*ModelHeader, *Manifest, error) {
	hdr, err := ParseModelHeader(data)
	if err != nil {
		return nil, nil, fmt.Errorf("load model %q: %w", name, err)
	}
	if len(hdr.ExternalData) > 0 {
		return nil, nil, fmt.Errorf("load model %q: it keeps weights in external data (%s), which needs loading from a path", name, strings.Join(hdr.ExternalData, ", "))
	}
	var man *Manifest
	if manifest != nil {
		if man, err = ParseManifest(manifest); err != nil {
			return nil, nil, fmt.Errorf("load model %q: manifest: %w", name, err)
		}
	}
	return hdr, man, nil
}

// LoadModel describes the model at path (external data files beside it are
// found by ONNX Runtime) and reads tessera.yaml beside it when present.
// The environment must be open.
func (e *Env) LoadModel(path string) (*Model, error) {
	path, hdr, man, err := ReadModelFile(path)
	if err != nil {
		return nil, err
	}
	in, out, err := ioInfo(func(o *ort.SessionOptions) ([]ort.InputOutputInfo, []ort.InputOutputInfo, error) {
		return ort.GetInputOutputInfoWithOptions(path, o)
	})
	if err != nil {
		return nil, fmt.Errorf("load model %q: onnx runtime: %w", path, err)
	}
	m := &Model{Name: path, Path: path, Header: hdr, Manifest: man}
	if err := m.describe(in, out); err != nil {
		return nil, fmt.Errorf("load model %q: %w", path, err)
	}
	return m, nil
}

// LoadModelBytes describes a model held in memory (an embedded model); the
// manifest bytes may be nil. External data cannot be used this way.
func (e *Env) LoadModelBytes(name string, data, manifest []byte) (*Model, error) {
	hdr, man, err := ReadModelBytes(name, data, manifest)
	if err != nil {
		return nil, err
	}
	in, out, err := ioInfo(func(o *ort.SessionOptions) ([]ort.InputOutputInfo, []ort.InputOutputInfo, error) {
		// GetInputOutputInfoWithONNXData takes no options; it is cheap for the small models embedded.
		return ort.GetInputOutputInfoWithONNXData(data)
	})
	if err != nil {
		return nil, fmt.Errorf("load model %q: onnx runtime: %w", name, err)
	}
	m := &Model{Name: name, Header: hdr, Manifest: man, data: data}
	if err := m.describe(in, out); err != nil {
		return nil, fmt.Errorf("load model %q: %w", name, err)
	}
	return m, nil
}

// ioInfo asks ONNX Runtime for the IO description with graph optimisation
// off, which keeps this extra session cheap.
func ioInfo(get func(*ort.SessionOptions) ([]ort.InputOutputInfo, []ort.InputOutputInfo, error)) ([]ort.InputOutputInfo, []ort.InputOutputInfo, error) {
	if !ort.IsInitialized() {
		return nil, nil, errors.New("environment not initialised (call onnx.Open first)")
	}
	opts, err := ort.NewSessionOptions()
	if err != nil {
		return nil, nil, err
	}
	defer opts.Destroy()
	if err := opts.SetGraphOptimizationLevel(ort.GraphOptimizationLevelDisableAll); err != nil {
		return nil, nil, err
	}
	return get(opts)
}

func (m *Model) describe(in, out []ort.InputOutputInfo) error {
	convert := func(infos []ort.InputOutputInfo) []IO {
		ios := make([]IO, len(infos))
		for i, info := range infos {
			ios[i] = IO{Name: info.Name, Type: elemType(info.DataType), Shape: []int64(info.Dimensions.Clone())}
			if info.OrtValueType != ort.ONNXTypeTensor {
				ios[i].Type = ElemType(info.OrtValueType.String())
			}
		}
		return ios
	}
	m.Inputs, m.Outputs = convert(in), convert(out)
	if m.Manifest != nil {
		return m.applyManifest()
	}
	guessRoles(m)
	return nil
}

func (m *Model) applyManifest() error {
	var p []string
	find := func(ios []IO, name string) *IO {
		for i := range ios {
			if ios[i].Name == name {
				return &ios[i]
			}
		}
		return nil
	}
	for _, role := range sortedKeys(m.Manifest.Inputs) {
		name := m.Manifest.Inputs[role]
		io := find(m.Inputs, name)
		if io == nil {
			p = append(p, fmt.Sprintf("manifest inputs.%s names %q, which the graph does not have (inputs: %s)", role, name, names(m.Inputs)))
			continue
		}
		io.Role = role
	}
	for _, role := range sortedKeys(m.Manifest.Outputs) {
		name := m.Manifest.Outputs[role]
		io := find(m.Outputs, name)
		if io == nil {
			p = append(p, fmt.Sprintf("manifest outputs.%s names %q, which the graph does not have (outputs: %s)", role, name, names(m.Outputs)))
			continue
		}
		io.Role = role
	}
	m.Kind = m.Manifest.Kind
	if len(p) > 0 {
		return errors.New(strings.Join(p, "; "))
	}
	return nil
}

func names(ios []IO) string {
	n := make([]string, len(ios))
	for i, io := range ios {
		n[i] = io.Name
	}
	return strings.Join(n, ", ")
}

// conventionalNames maps input names seen in diffusers, k-diffusion and
// DeepFloyd IF exports to roles.
var conventionalNames = map[string]string{
	"sample": RoleSample, "x": RoleSample, "x_t": RoleSample, "noisy_sample": RoleSample, "latent_model_input": RoleSample, "input": RoleSample,
	"timestep": RoleTimestep, "timesteps": RoleTimestep, "t": RoleTimestep, "sigma": RoleTimestep,
	"low_res": RoleLowres, "lowres": RoleLowres, "low_res_image": RoleLowres, "image": RoleLowres, "lr": RoleLowres, "cond_image": RoleLowres,
	"noise_level": RoleNoiseLevel, "noise_labels": RoleNoiseLevel, "aug_level": RoleNoiseLevel,
	"class_labels": RoleClass, "class": RoleClass, "labels": RoleClass, "y": RoleClass,
	"encoder_hidden_states": RoleContext, "context": RoleContext, "text_embeds": RoleContext, "cond": RoleContext,
}

var conventionalOutputs = map[string]bool{"out_sample": true, "sample": true, "out": true, "output": true, "prediction": true, "noise_pred": true, "pred": true}

// guessRoles assigns roles from conventional names, then from shapes for
// what is left: a 4-D float input is the sample (then the lowres), a scalar
// or [B] float the timestep (then the noise level), an integer [B] the class,
// a 3-D float the context. The first 4-D float output is the prediction.
func guessRoles(m *Model) {
	taken := map[string]bool{}
	for i := range m.Inputs {
		io := &m.Inputs[i]
		if r, ok := conventionalNames[strings.ToLower(io.Name)]; ok && !taken[r] {
			io.Role, taken[r] = r, true
		}
	}
	for i := range m.Inputs {
		io := &m.Inputs[i]
		if io.Role != "" {
			continue
		}
		var candidates []string
		switch {
		case io.Type.isFloat() && len(io.Shape) == 4:
			candidates = []string{RoleSample, RoleLowres}
		case io.Type.isFloat() && len(io.Shape) <= 1:
			candidates = []string{RoleTimestep, RoleNoiseLevel}
		case io.Type.isInt() && len(io.Shape) <= 1:
			candidates = []string{RoleTimestep, RoleClass}
			if taken[RoleTimestep] {
				candidates = []string{RoleClass}
			}
		case io.Type.isFloat() && len(io.Shape) == 3:
			candidates = []string{RoleContext}
		}
		for _, r := range candidates {
			if !taken[r] {
				io.Role, taken[r] = r, true
				break
			}
		}
	}
	for i := range m.Outputs {
		if conventionalOutputs[strings.ToLower(m.Outputs[i].Name)] {
			m.Outputs[i].Role = RolePrediction
			break
		}
	}
	if m.Output(RolePrediction) == nil {
		for i := range m.Outputs {
			if m.Outputs[i].Type.isFloat() && len(m.Outputs[i].Shape) == 4 {
				m.Outputs[i].Role = RolePrediction
				break
			}
		}
	}
	m.Kind = KindBase
	if taken[RoleLowres] {
		m.Kind = KindSR
	}
	// A sample of more channels than the prediction carries the low-res
	// image concatenated (LDM-SR, the ×4 upscaler, IF II): an SR model,
	// never a base one.
	if in, out := m.Input(RoleSample), m.Output(RolePrediction); in != nil && out != nil && len(in.Shape) == 4 && len(out.Shape) == 4 &&
		in.Shape[1] > 0 && out.Shape[1] > 0 && in.Shape[1] > out.Shape[1] {
		m.Kind = KindSR
	}
}

func (t ElemType) isFloat() bool { return t == Float32 || t == Float16 || t == Float64 }
func (t ElemType) isInt() bool   { return t == Int64 || t == Int32 }

func elemType(t ort.TensorElementDataType) ElemType {
	switch t {
	case ort.TensorElementDataTypeFloat:
		return Float32
	case ort.TensorElementDataTypeFloat16:
		return Float16
	case ort.TensorElementDataTypeDouble:
		return Float64
	case ort.TensorElementDataTypeInt64:
		return Int64
	case ort.TensorElementDataTypeInt32:
		return Int32
	}
	return ElemType(strings.ToLower(strings.TrimPrefix(t.String(), "ONNX_TENSOR_ELEMENT_DATA_TYPE_")))
}

// Channels is the number of image channels of sample and prediction: from
// the manifest, else the prediction output's static channel dimension, else 3.
func (m *Model) Channels() int {
	if m.Manifest != nil {
		return m.Manifest.Channels
	}
	if out := m.Output(RolePrediction); out != nil && len(out.Shape) == 4 && out.Shape[1] > 0 {
		return int(out.Shape[1])
	}
	return 3
}

// FileContract checks the contract of a model from what its file declares
// (its header's inputs and outputs) and its manifest, without ONNX Runtime:
// what a job can be refused for at submit. A file that declares no inputs
// fits (ONNX Runtime will say more when it loads it).
func FileContract(hdr *ModelHeader, man *Manifest) Contract {
	if hdr == nil || man == nil || len(hdr.Inputs) == 0 {
		return Contract{Kind: kindOf(man), Fits: true}
	}
	m := &Model{Header: hdr, Manifest: man, Inputs: append([]IO(nil), hdr.Inputs...), Outputs: append([]IO(nil), hdr.Outputs...)}
	if err := m.applyManifest(); err != nil {
		return Contract{Kind: man.Kind, Problems: []string{err.Error()}}
	}
	return m.CheckContract()
}

func kindOf(man *Manifest) string {
	if man == nil {
		return ""
	}
	return man.Kind
}

// Contract is the verdict on whether a model can serve as a base or SR stage.
type Contract struct {
	Kind     string   `json:"kind"`
	Fits     bool     `json:"fits"`
	Problems []string `json:"problems,omitempty"`
}

// CheckContract says whether the model fits the contract of its kind and,
// when it does not, every reason why.
func (m *Model) CheckContract() Contract {
	c := Contract{Kind: m.Kind}
	bad := func(format string, args ...any) { c.Problems = append(c.Problems, fmt.Sprintf(format, args...)) }
	ch := int64(m.Channels())
	for _, io := range m.Inputs {
		if io.Role == "" {
			bad("input %q has no role, so Tessera cannot feed it (add it to the manifest's inputs)", io.Name)
		}
	}
	image := func(io *IO, role string, channels int64) {
		if io == nil {
			bad("no %s input", role)
			return
		}
		if !io.Type.isFloat() {
			bad("input %q (%s): type %s, want float32 or float16", io.Name, role, io.Type)
		}
		if len(io.Shape) != 4 {
			bad("input %q (%s): shape %s, want 4-D [B,C,H,W]", io.Name, role, io.ShapeString())
			return
		}
		if io.Shape[1] > 0 && io.Shape[1] != channels {
			bad("input %q (%s): %d channels, want %d", io.Name, role, io.Shape[1], channels)
		}
	}
	sampleCh, outCh := ch, ch
	if m.Kind == KindSR && m.Manifest != nil && m.Manifest.LowresConcat {
		sampleCh = ch + int64(m.Manifest.Lowres())
	}
	if m.Manifest != nil && m.Manifest.LearnedVariance() {
		outCh = 2 * ch
	}
	image(m.Input(RoleSample), RoleSample, sampleCh)
	scalarOrBatch := func(role string, required bool) {
		io := m.Input(role)
		if io == nil {
			if required {
				bad("no %s input", role)
			}
			return
		}
		if len(io.Shape) > 1 {
			bad("input %q (%s): shape %s, want a scalar or [B]", io.Name, role, io.ShapeString())
		}
		if !io.Type.isFloat() && !io.Type.isInt() {
			bad("input %q (%s): type %s, want float or integer", io.Name, role, io.Type)
		}
	}
	scalarOrBatch(RoleTimestep, true)
	for _, io := range m.Inputs {
		if io.Type == Float16 && len(io.Shape) == 0 {
			bad("input %q: a float16 scalar cannot be fed through onnxruntime_go (re-export it as shape [1] or [batch])", io.Name)
		}
	}
	if io := m.Input(RoleClass); io != nil {
		if !io.Type.isInt() || len(io.Shape) > 1 {
			bad("input %q (class): %s %s, want int64 [B]", io.Name, io.Type, io.ShapeString())
		}
	}
	if io := m.Input(RoleContext); io != nil {
		switch {
		case !io.Type.isFloat() || len(io.Shape) != 3:
			bad("input %q (context): %s %s, want float [B,L,D]", io.Name, io.Type, io.ShapeString())
		case m.Manifest != nil && m.Manifest.ContextDim > 0 && io.Shape[2] > 0 && io.Shape[2] != int64(m.Manifest.ContextDim):
			bad("input %q (context): D = %d, the config says %d", io.Name, io.Shape[2], m.Manifest.ContextDim)
		}
	}
	switch m.Kind {
	case KindBase:
		if io := m.Input(RoleLowres); io != nil {
			bad("input %q is a lowres input, which a base model does not take", io.Name)
		}
	case KindSR:
		if m.Manifest == nil || !m.Manifest.LowresConcat {
			image(m.Input(RoleLowres), RoleLowres, ch)
		}
		if io := m.Input(RoleNoiseLevel); io != nil && io.Type.isInt() && (m.Manifest == nil || m.Manifest.NoiseLevelMax <= 0) {
			bad("input %q (noise_level) is an integer: the manifest must say noise_level_max, the level in the model's units", io.Name)
		}
		scalarOrBatch(RoleNoiseLevel, false)
	default:
		bad("unknown kind %q", m.Kind)
	}
	out := m.Output(RolePrediction)
	switch {
	case out == nil:
		bad("no prediction output (a 4-D float output, or one named in the manifest)")
	case !out.Type.isFloat() || len(out.Shape) != 4:
		bad("output %q (prediction): %s %s, want float [B,C,H,W]", out.Name, out.Type, out.ShapeString())
	case out.Shape[1] > 0 && out.Shape[1] != outCh:
		why := ""
		if outCh == 2*ch {
			why = " (prediction and learned variance)"
		} else if out.Shape[1] == 2*ch {
			why = " (2C channels: set variance_type: learned_range if the second half is a learned variance)"
		}
		bad("output %q (prediction): %d channels, want %d%s", out.Name, out.Shape[1], outCh, why)
	}
	c.Fits = len(c.Problems) == 0
	return c
}
