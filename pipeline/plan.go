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
	// Image, when set, is an input image to upscale: the cascade runs only
	// SR stages, to Scale times its size (or to Width×Height when given).
	Image string      `json:"image,omitempty"`
	Scale float64     `json:"scale,omitempty"`
	Base  StageParams `json:"base"`
	SR    StageParams `json:"sr"`
	// Output is the path the image is written to (resolved by the caller).
	Output string `json:"output"`

	inputW, inputH int // the input image's size once loaded
}

// StagePlan is one stage of a cascade, fully resolved.
type StagePlan struct {
	Kind       string  `json:"kind"` // base or sr
	Model      string  `json:"model"`
	Width      int     `json:"width"`
	Height     int     `json:"height"`
	Steps      int     `json:"steps"`
	Sampler    string  `json:"sampler"`
	Guidance   float64 `json:"guidance,omitempty"`
	Eta        float64 `json:"eta,omitempty"`
	Strength   float64 `json:"strength,omitempty"`
	NoiseLevel float64 `json:"noise_level,omitempty"`
	Shift      float64 `json:"shift,omitempty"`
	Filter     string  `json:"filter,omitempty"`
	TileSize   int     `json:"tile_size,omitempty"`
	Overlap    int     `json:"overlap,omitempty"`
	Halo       int     `json:"halo,omitempty"`
	Tiles      int     `json:"tiles"`
	Batch      int     `json:"batch"`
}

// Plan is the cascade for one item.
type Plan struct {
	Stages []StagePlan `json:"stages"`
	// Width×Height is the final size; when the last stage's canvas differs,
	// a Lanczos resample brings it there.
	Width    int  `json:"width"`
	Height   int  `json:"height"`
	Resample bool `json:"resample"`
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
func planStage(kind string, p StageParams, m *onnx.Model, w, h int) (StagePlan, error) {
	sp := StagePlan{Kind: kind, Model: p.Model, Width: w, Height: h}
	var d onnx.Defaults
	man := m.Manifest
	if man != nil {
		d = man.Defaults
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
	if kind == onnx.KindSR {
		sp.Strength = firstFloat(p.Strength, d.Strength, defaultStrength)
		sp.NoiseLevel = d.NoiseLevel
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
		// The base canvas is one tile: the model sees the whole image.
		sp.TileSize = max(w, h)
	}
	if sp.Strength < 0 || sp.Strength > 1 {
		return sp, fmt.Errorf("%s.strength: %g not in (0, 1]", kind, sp.Strength)
	}
	if sp.NoiseLevel < 0 || sp.NoiseLevel > 1 {
		return sp, fmt.Errorf("%s.noise_level: %g not in [0, 1]", kind, sp.NoiseLevel)
	}
	if sp.Steps < 1 || sp.Steps > 10000 {
		return sp, fmt.Errorf("%s.steps: %d not in [1, 10000]", kind, sp.Steps)
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
