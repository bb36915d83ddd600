// Package pipeline runs the cascade: a base stage samples a small image, SR
// stages upscale it while denoising the canvas as overlapping tiles fused at
// every step. It owns all concurrency: per stage a tiler and a stitcher, and
// per model session one batcher that gathers tiles from every item in flight
// into Runs of one fixed tile shape.
package pipeline

import (
	"fmt"
	"math"

	"tessera/onnx"
	"tessera/stages"
)

// StageParams are the choices for one kind of stage (base or SR); zero values
// take the model manifest's defaults and then the pipeline's.
type StageParams struct {
	Model      string   `json:"model" yaml:"model" toml:"model"`
	Steps      int      `json:"steps,omitempty" yaml:"steps" toml:"steps"`
	Sampler    string   `json:"sampler,omitempty" yaml:"sampler" toml:"sampler"`
	Guidance   float64  `json:"guidance,omitempty" yaml:"guidance" toml:"guidance"`
	Eta        float64  `json:"eta,omitempty" yaml:"eta" toml:"eta"`
	NoiseLevel *float64 `json:"noise_level,omitempty" yaml:"noise_level" toml:"noise_level"`
	Strength   float64  `json:"strength,omitempty" yaml:"strength" toml:"strength"`
	Shift      float64  `json:"shift,omitempty" yaml:"shift" toml:"shift"`
	Filter     string   `json:"filter,omitempty" yaml:"filter" toml:"filter"`
	Tile       Tiling   `json:"tile" yaml:"tile" toml:"tile"`
	// Batch is the most tiles per Run; 0 or "auto" lets the pipeline choose.
	Batch int `json:"batch,omitempty" yaml:"batch" toml:"batch"`
}

// Tiling is the tile layout of an SR stage.
type Tiling struct {
	Size    int  `json:"size,omitempty" yaml:"size" toml:"size"`
	Overlap int  `json:"overlap,omitempty" yaml:"overlap" toml:"overlap"`
	Halo    *int `json:"halo,omitempty" yaml:"halo" toml:"halo"`
}

// Item is one output image to make.
type Item struct {
	Index  int    `json:"index"`
	Seed   uint64 `json:"seed"`
	Width  int    `json:"width"`
	Height int    `json:"height"`
	// Class is the class label for class-conditional base models; -1 = none.
	Class int `json:"class"`
	// Image, when set, is an input image to upscale (an absolute path): the
	// cascade runs only SR stages, from InputWidth×InputHeight (read from
	// its header when the job is expanded) to Width×Height (Scale times the
	// input, unless the job gave a size).
	Image       string      `json:"image,omitempty"`
	InputWidth  int         `json:"input_width,omitempty"`
	InputHeight int         `json:"input_height,omitempty"`
	Scale       float64     `json:"scale,omitempty"`
	Base        StageParams `json:"base"`
	SR          StageParams `json:"sr"`
	// Context and NegativeContext are the item's text embeddings, for the
	// models of its cascade that take them (SetInput reads their shape and
	// hash): each tile of the item gets the same, and classifier-free
	// guidance pairs the context with the negative one (zeros when none).
	Context         *ContextRef `json:"context,omitempty"`
	NegativeContext *ContextRef `json:"negative_context,omitempty"`
	// Prompt and NegativePrompt become the context (and the guidance's
	// negative one: the empty prompt's where none is given) through the
	// text encoder of the model's pipeline, where no context file is given.
	Prompt         string `json:"prompt,omitempty"`
	NegativePrompt string `json:"negative_prompt,omitempty"`
	// Output is the path the image is written to (resolved by the caller).
	Output string `json:"output"`
}

// ContextRef is a context file as an item names it: its absolute path, and
// its shape and SHA-256 when the item was expanded, so that the item's
// identity changes with the file's content.
type ContextRef struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	Tokens int    `json:"tokens"`
	Dim    int    `json:"dim"`
}

// DefaultScale is an upscale item's factor when it gives neither a scale
// nor a size.
const DefaultScale = 4

// UpscaleSize is the output size of an upscale of a w×h input by scale (0:
// DefaultScale).
func UpscaleSize(w, h int, scale float64) (int, int) {
	if scale == 0 {
		scale = DefaultScale
	}
	return int(math.Round(float64(w) * scale)), int(math.Round(float64(h) * scale))
}

// StagePlan is one stage of a cascade, fully resolved.
type StagePlan struct {
	Kind  string `json:"kind"` // base, sr or img2img
	Model string `json:"model"`
	Space string `json:"space,omitempty"` // latent, or pixel when empty
	// Variance is the model's variance_type (a learned variance is not used
	// by the samplers); Thresholding its dynamic thresholding ratio, 0 none.
	Variance     string  `json:"variance_type,omitempty"`
	Thresholding float64 `json:"thresholding_ratio,omitempty"`
	// Decode, for a latent stage, is how its latents become pixels: the
	// autoencoder's decoder, run in tiles of the latent canvas; Encode, for
	// a latent img2img stage, how the input image becomes latents (the
	// same latent tiles, F times as large in pixels).
	Decode     *DecodePlan `json:"decode,omitempty"`
	Encode     *DecodePlan `json:"encode,omitempty"`
	Width      int         `json:"width"`
	Height     int         `json:"height"`
	Steps      int         `json:"steps"`
	Sampler    string      `json:"sampler"`
	Guidance   float64     `json:"guidance,omitempty"`
	Eta        float64     `json:"eta,omitempty"`
	Strength   float64     `json:"strength,omitempty"`
	NoiseLevel float64     `json:"noise_level,omitempty"`
	// NoiseLevelModel is the level in the model's own units, where it takes
	// one (an integer in [0, noise_level_max]): what the model is fed.
	NoiseLevelModel float64 `json:"noise_level_model,omitempty"`
	Shift           float64 `json:"shift,omitempty"`
	Filter          string  `json:"filter,omitempty"`
	TileSize        int     `json:"tile_size,omitempty"`
	Overlap         int     `json:"overlap,omitempty"`
	Halo            int     `json:"halo,omitempty"`
	Tiles           int     `json:"tiles"`
	Batch           int     `json:"batch"`
}

// DecodePlan is a latent stage's tiled decode (or encode): the
// autoencoder, its factor and latent scaling, and the latent tiles (size,
// overlap and halo in latent pixels).
type DecodePlan struct {
	Autoencoder string `json:"autoencoder"`
	Factor      int    `json:"factor"`
	// Scaling and Shift map the autoencoder's latents to the U-Net's:
	// z = (latent − Shift) · Scaling (its config's scaling_factor and
	// shift_factor); the decoder gets z / Scaling + Shift.
	Scaling  float64 `json:"scaling"`
	Shift    float64 `json:"shift,omitempty"`
	TileSize int     `json:"tile_size"`
	Overlap  int     `json:"overlap"`
	Halo     int     `json:"halo"`
	Tiles    int     `json:"tiles"`
	// Batch is the most tiles per decoder Run; 0: the default (4), halved
	// while a Run runs out of memory.
	Batch int `json:"batch,omitempty"`
	// Runs is how many tile Runs of the graph it costs: a Run a tile, and
	// with the whole image's statistics one more a tile per GroupNorm
	// layer. The item's timeout counts them as tile evaluations.
	Runs int `json:"runs,omitempty"`
	// Statistics is where the decoder's GroupNorm statistics come from:
	// "tile" (each tile's own, the naive decode) or "image" (the whole
	// image's, shared over the tiles: see decodeSynced).
	Statistics string `json:"statistics"`
}

// KindImg2Img is the kind of an upscale stage whose model takes no
// low-res image (a base model): it starts from the input, encoded and
// noised to the strength (see planImg2Img).
const KindImg2Img = "img2img"

// Decode statistics.
const (
	StatisticsTile  = "tile"
	StatisticsImage = "image"
)

// Decode tiles, in latent pixels: 64 (256 output pixels at factor 4), an
// overlap of 8 with a cosine ramp, and a halo of 8 for the decoder's
// receptive field.
const (
	decodeTile    = 64
	decodeOverlap = 8
	decodeHalo    = 8
)

// Plan is the cascade for one item.
type Plan struct {
	Stages []StagePlan `json:"stages"`
	// Width×Height is the final size; when the last stage's canvas differs,
	// a Lanczos resample brings it there.
	Width    int  `json:"width"`
	Height   int  `json:"height"`
	Resample bool `json:"resample"`
	// PromptCut is what the text encoder's limit cut off the prompt, as
	// its tokenizer decodes it (set when the item is made).
	PromptCut string `json:"prompt_cut,omitempty"`
}

// TileSteps is the number of tile evaluations the plan costs (CFG pairs count twice).
func (p Plan) TileSteps() int {
	n := 0
	for _, s := range p.Stages {
		k := s.Tiles * s.Steps
		if s.Strength > 0 && s.Strength < 1 {
			k = s.Tiles * min(int(float64(s.Steps)*s.Strength), s.Steps)
		}
		if s.Guidance > 1 {
			k *= 2
		}
		n += k
	}
	return n
}

// AutoencoderRuns is the number of encoder and decoder tile Runs the plan
// costs (DecodePlan.Runs).
func (p Plan) AutoencoderRuns() int {
	n := 0
	for _, s := range p.Stages {
		for _, d := range []*DecodePlan{s.Encode, s.Decode} {
			if d != nil {
				n += max(d.Runs, d.Tiles)
			}
		}
	}
	return n
}

// Describe returns the manifest of the model a reference names, without
// ONNX Runtime (models.Resolver.Manifest).
type Describe func(ref string) (*onnx.Manifest, error)

// MakePlan is the cascade for an item: its stages, their sizes, tile grids
// and tile steps. It is a pure function of the item and its models'
// manifests: it creates no session and starts no goroutine, so that the
// plan can be made once, when the item is queued, and carried with it.
// The SR model is needed only where the target is larger than the base
// canvas (or for an upscale). Errors are classified: a model that cannot
// be described is ClassModel, everything else ClassInvalid.
func MakePlan(it Item, describe Describe) (Plan, error) {
	if it.Width < 1 || it.Height < 1 {
		return Plan{}, Invalidf("size %dx%d: width and height must be positive", it.Width, it.Height)
	}
	p := Plan{Width: it.Width, Height: it.Height}
	model := func(field, ref string) (*onnx.Manifest, error) {
		if ref == "" {
			return nil, Invalidf("%s: no model given", field)
		}
		m, err := describe(ref)
		if err != nil {
			return nil, ModelUnusable(fmt.Errorf("%s: %w", field, err))
		}
		return m, nil
	}
	usesContext := false
	// contextFor checks the item's context against a model of its cascade.
	contextFor := func(field, ref string, m *onnx.Manifest) error {
		in := m.Inputs[onnx.RoleContext]
		if in == "" {
			return nil
		}
		usesContext = true
		if it.Context == nil {
			switch {
			case it.Prompt != "" && m.TextEncoder != "":
				return nil // encoded at work, by the pipeline's own text encoder
			case it.Prompt != "":
				return Invalidf("prompt: %s %s has no text_encoder/ and tokenizer/ in its pipeline folder; give context: FILE", field, ref)
			}
			return Invalidf("context: %s %s takes text embeddings (%s); give prompt: TEXT or context: FILE (.npy or .safetensors, [L, D])", field, ref, in)
		}
		for _, c := range []struct {
			name string
			c    *ContextRef
		}{{"context", it.Context}, {"negative_context", it.NegativeContext}} {
			if c.c != nil && m.ContextDim > 0 && c.c.Dim != m.ContextDim {
				return Invalidf("%s: %s is [%d, %d]; %s %s takes D = %d", c.name, c.c.Path, c.c.Tokens, c.c.Dim, field, ref, m.ContextDim)
			}
		}
		return nil
	}
	var srMan *onnx.Manifest
	// needSR checks the SR model (m, when the caller has described it).
	needSR := func(m *onnx.Manifest) error {
		if srMan != nil {
			return nil
		}
		if m == nil {
			var err error
			if m, err = model("sr.model", it.SR.Model); err != nil {
				return err
			}
		}
		if m.Kind != onnx.KindSR {
			return ModelUnusable(fmt.Errorf("sr.model: %s is a %s model, not an SR model (nor a latent model with an encoder, which would upscale as img2img)", it.SR.Model, m.Kind))
		}
		if m.Scale < 2 && m.Space != onnx.SpaceLatent {
			return ModelUnusable(fmt.Errorf("sr.model: %s has scale %d; an SR model upscales by 2 or more", it.SR.Model, m.Scale))
		}
		if err := contextFor("sr.model", it.SR.Model, m); err != nil {
			return err
		}
		srMan = m
		return nil
	}
	var w, h, k int
	if it.Image == "" {
		bm, err := model("base.model", it.Base.Model)
		if err != nil {
			return p, err
		}
		if bm.Kind != onnx.KindBase {
			return p, ModelUnusable(fmt.Errorf("base.model: %s is a %s model, not a base model", it.Base.Model, bm.Kind))
		}
		if err := contextFor("base.model", it.Base.Model, bm); err != nil {
			return p, err
		}
		if len(bm.NativeSize) != 2 {
			return p, ModelUnusable(fmt.Errorf("base.model: %s has no native_size", it.Base.Model))
		}
		// A latent base model's native size and size multiple are in
		// latents: in pixels they are F times as large.
		bf := 1
		if bm.Space == onnx.SpaceLatent {
			if bm.DecodeFactor < 1 {
				return p, noDecoder("base.model", it.Base.Model)
			}
			bf = bm.DecodeFactor
		}
		nh, nw, bmult := bm.NativeSize[0]*bf, bm.NativeSize[1]*bf, bm.SizeMultiple*bf
		if it.Width*it.Height <= nw*nh {
			// At or below the base model's size: the base stage alone,
			// whatever SR model the item names (it is not asked for).
			w, h, k = baseSize(it.Width, it.Height, nw, nh, 2, bmult) // k = 0
		} else if it.SR.Model == "" {
			return p, Invalidf("sr.model: none given, and %dx%d is larger than the base model's native %dx%d (set sr.model or models.default_sr)", it.Width, it.Height, nw, nh)
		} else {
			if err := needSR(nil); err != nil {
				return p, err
			}
			// Every later canvas is the base times a power of the scale; a base on
			// both models' size multiples keeps all of them on theirs.
			mult := lcm(bmult, srMan.SizeMultiple)
			if srMan.Scale < 2 {
				// A latent SR model: one stage at the base's size, whose
				// decoder's factor makes the target; the base is the target
				// divided by it.
				f := float64(max(srMan.DecodeFactor, 1))
				round := func(v float64) int { return max(mult, int(math.Round(v/float64(mult)))*mult) }
				w, h, k = round(float64(it.Width)/f), round(float64(it.Height)/f), 1
			} else {
				w, h, k = baseSize(it.Width, it.Height, nw, nh, srMan.Scale, mult)
			}
		}
		sp, err := planStage(onnx.KindBase, it.Base, bm, w/bf, h/bf)
		if err != nil {
			return p, Invalid(err)
		}
		sp.Tiles = 1
		if bf > 1 {
			if sp.Decode, err = decodePlanOf(bm, sp.Height, sp.Width); err != nil {
				return p, err
			}
		}
		p.Stages = append(p.Stages, sp)
	} else if it.InputWidth < 1 || it.InputHeight < 1 {
		return p, Invalidf("image: input size %dx%d unknown", it.InputWidth, it.InputHeight)
	} else if m, err := model("sr.model", it.SR.Model); err != nil {
		return p, err
	} else if m.Kind == onnx.KindBase && m.Space == onnx.SpaceLatent {
		// A latent model without a low-res input upscales as img2img: the
		// input resized to the target, encoded, noised to the strength and
		// denoised in tiles.
		if err := contextFor("sr.model", it.SR.Model, m); err != nil {
			return p, err
		}
		sp, err := planImg2Img(it, m)
		if err != nil {
			return p, err
		}
		p.Stages = append(p.Stages, sp)
		w, h = sp.Width, sp.Height
		if sp.Decode != nil {
			w, h = w*sp.Decode.Factor, h*sp.Decode.Factor
		}
	} else {
		if err := needSR(m); err != nil {
			return p, err
		}
		w, h = it.InputWidth, it.InputHeight
		k = 1 // a latent SR model: one stage at the input's size
		if srMan.Scale >= 2 {
			ratio := math.Sqrt(float64(it.Width*it.Height) / float64(w*h))
			k = max(1, int(math.Ceil(math.Log(ratio)/math.Log(float64(srMan.Scale))-1e-9)))
		}
	}
	for i := 0; i < k; i++ {
		w, h = w*srMan.Scale, h*srMan.Scale
		if int64(w)*int64(h) > MaxCanvasPixels {
			return p, Invalidf("sr stage %d: a %dx%d canvas is over the %d pixels any canvas may have", i+1, w, h, MaxCanvasPixels)
		}
		sp, err := planStage(onnx.KindSR, it.SR, srMan, w, h)
		if err != nil {
			return p, Invalid(err)
		}
		g, err := tileGrid(sp, srMan)
		if err != nil {
			return p, Invalidf("sr.tile: %w", err)
		}
		sp.TileSize, sp.Tiles = g.TileHeight, len(g.Tiles)
		if srMan.Space == onnx.SpaceLatent {
			if srMan.DecodeFactor < 1 {
				return p, noDecoder("sr.model", it.SR.Model)
			}
			if sp.Decode, err = decodePlanOf(srMan, sp.Height, sp.Width); err != nil {
				return p, err
			}
			w, h = w*sp.Decode.Factor, h*sp.Decode.Factor
		}
		p.Stages = append(p.Stages, sp)
	}
	p.Resample = w != it.Width || h != it.Height
	if it.Context != nil && !usesContext {
		return p, Invalidf("context: no model of this item's cascade takes text embeddings")
	}
	if (it.Prompt != "" || it.NegativePrompt != "") && !usesContext {
		return p, Invalidf("prompt: no model of this item's cascade takes text")
	}
	if it.NegativePrompt != "" && it.Prompt == "" {
		return p, Invalidf("negative_prompt: give prompt too")
	}
	if it.NegativeContext != nil && it.Context == nil {
		return p, Invalidf("negative_context: give context too")
	}
	if n, c := it.NegativeContext, it.Context; n != nil && (n.Tokens != c.Tokens || n.Dim != c.Dim) {
		return p, Invalidf("negative_context: %s is [%d, %d], context %s [%d, %d]: a guidance pair shares one shape", n.Path, n.Tokens, n.Dim, c.Path, c.Tokens, c.Dim)
	}
	return p, nil
}

// noDecoder is the error for a latent model that has no decoder.
func noDecoder(field, ref string) error {
	return ModelUnusable(fmt.Errorf("%s: %s is a latent model without an autoencoder (no vae_decoder/ in its pipeline folder, no autoencoder: in its %s): its latents cannot become an image", field, ref, onnx.ManifestFile))
}

// decodePlanOf is the tiled decode of a latent model's h×w canvas, and
// (encodePlanOf) the tiled encode of an image into it: the same latent
// tiles, the encoder's pixel tiles F times as large.
func decodePlanOf(m *onnx.Manifest, h, w int) (*DecodePlan, error) {
	d := &DecodePlan{Autoencoder: m.Autoencoder, Factor: m.DecodeFactor, Scaling: m.LatentScaling, Shift: m.LatentShift,
		TileSize: decodeTile, Overlap: decodeOverlap, Halo: decodeHalo, Statistics: StatisticsTile}
	if m.DecodeSync {
		d.Statistics = StatisticsImage
	}
	dg, err := decodeGrid(h, w, d)
	if err != nil {
		return nil, Invalidf("decode: %w", err)
	}
	d.TileSize, d.Tiles, d.Runs = dg.TileHeight, len(dg.Tiles), len(dg.Tiles)
	if d.Statistics == StatisticsImage {
		d.Runs *= 1 + max(m.DecodeSyncLayers, 1)
	}
	return d, nil
}

func encodePlanOf(m *onnx.Manifest, h, w int) (*DecodePlan, error) {
	d, err := decodePlanOf(m, h, w)
	if err != nil {
		return nil, err
	}
	d.Statistics, d.Runs = StatisticsTile, d.Tiles
	if m.EncodeSync {
		d.Statistics, d.Runs = StatisticsImage, d.Tiles*(1+m.EncodeSyncLayers)
	}
	return d, nil
}

// DefaultImg2ImgStrength is an img2img stage's strength where neither the
// job nor the model's manifest gives one: the low end of what tiled
// img2img upscales are run at (0.2 to 0.4), which keeps the input's
// composition and colours while the model adds detail.
const DefaultImg2ImgStrength = 0.3

// planImg2Img is the img2img upscale of an item's image with a latent
// model that takes no low-res input: the canvas is the target over the
// decoder's factor (on the model's size multiple), the image is resized
// to its size in pixels, encoded, noised to the strength, denoised in
// fused tiles and decoded.
func planImg2Img(it Item, m *onnx.Manifest) (StagePlan, error) {
	if m.DecodeFactor < 1 {
		return StagePlan{}, noDecoder("sr.model", it.SR.Model)
	}
	if !m.Encoder {
		return StagePlan{}, ModelUnusable(fmt.Errorf("sr.model: %s has no vae_encoder/ in its pipeline folder: an img2img upscale needs the encoder to turn the image into latents", it.SR.Model))
	}
	f := m.DecodeFactor
	mult := m.SizeMultiple
	round := func(v int) int { return max(mult, int(math.Round(float64(v)/float64(f)/float64(mult)))*mult) }
	w, h := round(it.Width), round(it.Height)
	if int64(w*f)*int64(h*f) > MaxCanvasPixels {
		return StagePlan{}, Invalidf("sr stage 1: a %dx%d canvas is over the %d pixels any canvas may have", w*f, h*f, MaxCanvasPixels)
	}
	p := it.SR
	if p.Strength == 0 && m.Defaults.Strength == 0 {
		p.Strength = DefaultImg2ImgStrength
	}
	// Tiles of the size the model was trained at (its sample_size), an
	// eighth of it overlapping, where the job gives none.
	if p.Tile.Size == 0 && len(m.NativeSize) == 2 {
		p.Tile.Size = max(m.NativeSize[0], m.NativeSize[1])
		if p.Tile.Overlap == 0 {
			p.Tile.Overlap = max(p.Tile.Size/8, mult)
		}
	}
	sp, err := planStage(KindImg2Img, p, m, w, h)
	if err != nil {
		return sp, Invalid(err)
	}
	g, err := tileGrid(sp, m)
	if err != nil {
		return sp, Invalidf("sr.tile: %w", err)
	}
	sp.TileSize, sp.Tiles = g.TileHeight, len(g.Tiles)
	if sp.Encode, err = encodePlanOf(m, h, w); err != nil {
		return sp, err
	}
	if sp.Decode, err = decodePlanOf(m, h, w); err != nil {
		return sp, err
	}
	return sp, nil
}

// decodeGrid is the latent tile grid of a decode.
func decodeGrid(h, w int, d *DecodePlan) (*stages.TileGrid, error) {
	return stages.NewTileGrid(h, w, stages.TileOptions{Size: d.TileSize, Overlap: d.Overlap, Halo: d.Halo, Pad: stages.PadReflect})
}

// MaxCanvasPixels bounds any stage's canvas whatever limits.max_pixels
// says (which jobs checks against the plan): 2^31 pixels, so that no size
// computed from a canvas overflows.
const MaxCanvasPixels = 1 << 31

// Defaults of the pipeline where neither the item nor the manifest says.
const (
	defaultSteps    = 20
	defaultSampler  = "ddim"
	defaultTile     = 256
	defaultOverlap  = 32
	defaultStrength = 1.0
	defaultFilter   = "bicubic"
)

// baseSize picks the base canvas and the number of SR stages for a target:
// k stages of scale s with the base near the model's native size (the k that
// makes base/native closest to 1 in log scale, fewer stages on a tie), the
// base in the target's aspect ratio and a multiple of the model's size
// multiple.
func baseSize(width, height, nativeW, nativeH, scale, mult int) (bw, bh, k int) {
	ratio := math.Sqrt(float64(width*height) / float64(nativeW*nativeH))
	k = 0
	if ratio > 1 {
		k = max(0, int(math.Ceil(math.Log(ratio)/math.Log(float64(scale))-0.5-1e-9)))
	}
	f := math.Pow(float64(scale), float64(k))
	round := func(v float64) int { return max(mult, int(math.Round(v/float64(mult)))*mult) }
	return round(float64(width) / f), round(float64(height) / f), k
}

// planStage fills a stage's parameters from the item, the manifest and the defaults.
func planStage(kind string, p StageParams, man *onnx.Manifest, w, h int) (StagePlan, error) {
	sp := StagePlan{Kind: kind, Model: p.Model, Width: w, Height: h}
	var d onnx.Defaults
	if man != nil {
		d = man.Defaults
		if man.Space == onnx.SpaceLatent {
			sp.Space = onnx.SpaceLatent
		}
		sp.Variance, sp.Thresholding = man.VarianceType, man.ThresholdingRatio
	}
	sp.Steps = firstInt(p.Steps, d.Steps, defaultSteps)
	sp.Sampler = firstString(p.Sampler, d.Sampler, defaultSampler)
	sp.Guidance = firstFloat(p.Guidance, d.Guidance, 1)
	sp.Eta = p.Eta
	sp.Shift = p.Shift
	mult := 1
	if man != nil {
		mult = man.SizeMultiple
	}
	if kind == KindImg2Img && p.NoiseLevel != nil {
		return sp, fmt.Errorf("sr.noise_level: %s takes no low-res image to augment (an img2img stage: give strength)", p.Model)
	}
	if kind != onnx.KindBase {
		sp.Strength = firstFloat(p.Strength, d.Strength, defaultStrength)
		if kind == onnx.KindSR {
			sp.NoiseLevel = d.NoiseLevel
		}
		if p.NoiseLevel != nil {
			sp.NoiseLevel = *p.NoiseLevel
		}
		sp.Filter = firstString(p.Filter, defaultFilter)
		sp.TileSize = firstInt(p.Tile.Size, defaultTile)
		sp.Overlap = firstInt(p.Tile.Overlap, defaultOverlap)
		if p.Tile.Overlap < 0 {
			sp.Overlap = 0
		}
		rf := 0
		if man != nil {
			rf = man.ReceptiveField
		}
		switch {
		case p.Tile.Halo != nil:
			sp.Halo = *p.Tile.Halo
		case rf > 0:
			sp.Halo = (rf + mult - 1) / mult * mult // whole downsampling cells
		default:
			sp.Halo = sp.Overlap / 4
		}
	} else {
		// The base canvas is one tile: the model sees the whole image. It
		// starts from noise, with no image to resample or augment: the SR
		// stage's keys mean nothing here.
		switch {
		case p.Strength != 0:
			return sp, fmt.Errorf("base.strength: a base stage starts from noise (strength is for sr)")
		case p.NoiseLevel != nil:
			return sp, fmt.Errorf("base.noise_level: a base stage has no low-res image to augment (noise_level is for sr)")
		case p.Filter != "":
			return sp, fmt.Errorf("base.filter: a base stage resamples nothing (filter is for sr)")
		case p.Tile != (Tiling{}):
			return sp, fmt.Errorf("base.tile: a base stage is one tile, the whole canvas (tile is for sr)")
		}
		sp.TileSize = max(w, h)
	}
	if sp.Strength < 0 || sp.Strength > 1 {
		return sp, fmt.Errorf("%s.strength: %g not in (0, 1]", kind, sp.Strength)
	}
	if sp.NoiseLevel < 0 || sp.NoiseLevel > 1 {
		return sp, fmt.Errorf("%s.noise_level: %g not in [0, 1]", kind, sp.NoiseLevel)
	}
	if man != nil && kind == onnx.KindSR {
		if man.NoiseLevelMax > 0 {
			sp.NoiseLevelModel = math.Round(sp.NoiseLevel * float64(man.NoiseLevelMax))
		}
		if man.Lowres() != man.Channels && sp.Strength != 1 {
			return sp, fmt.Errorf("%s.strength: %g, but the model's sample has %d channels and its low-res image %d, so the stage starts from noise: strength must be 1", kind, sp.Strength, man.Channels, man.Lowres())
		}
	}
	if sp.Steps < 1 || sp.Steps > 10000 {
		return sp, fmt.Errorf("%s.steps: %d not in [1, 10000]", kind, sp.Steps)
	}
	if kind != onnx.KindBase {
		if _, err := stages.Img2ImgStart(sp.Steps, sp.Strength); err != nil {
			return sp, fmt.Errorf("%s.strength: %w", kind, err)
		}
	}
	if w%mult != 0 || h%mult != 0 {
		return sp, fmt.Errorf("%s stage: %dx%d is not a multiple of the model's size multiple %d", kind, w, h, mult)
	}
	sp.Batch = p.Batch
	return sp, nil
}

func firstInt(vs ...int) int {
	for _, v := range vs {
		if v != 0 {
			return v
		}
	}
	return 0
}

func firstFloat(vs ...float64) float64 {
	for _, v := range vs {
		if v != 0 {
			return v
		}
	}
	return 0
}

func firstString(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}
