// Package jobs reads job files, expands them into work items, and stores
// finished images durably.
package jobs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"gopkg.in/yaml.v3"

	"tessera/config"
	"tessera/pipeline"
)

// DefaultOutput is the output template when a job file gives none.
const DefaultOutput = "{job}/{index:04}-{seed}.png"

// File is a job file, version 1.
type File struct {
	Version  int        `yaml:"version" json:"version" toml:"version"`
	Name     string     `yaml:"name" json:"name" toml:"name"`
	Output   string     `yaml:"output" json:"output" toml:"output"`
	Defaults ItemSpec   `yaml:"defaults" json:"defaults" toml:"defaults"`
	Items    []ItemSpec `yaml:"items" json:"items" toml:"items"`
}

// ItemSpec is one entry of items (or the defaults): any field left out takes
// the default's value.
type ItemSpec struct {
	Width  int      `yaml:"width" json:"width" toml:"width"`
	Height int      `yaml:"height" json:"height" toml:"height"`
	Seed   *uint64  `yaml:"seed" json:"seed" toml:"seed"`
	Seeds  []uint64 `yaml:"seeds" json:"seeds" toml:"seeds"`
	Count  int      `yaml:"count" json:"count" toml:"count"`
	Class  *int     `yaml:"class" json:"class" toml:"class"`
	Image  string   `yaml:"image" json:"image" toml:"image"`
	Images string   `yaml:"images" json:"images" toml:"images"`
	Scale  float64  `yaml:"scale" json:"scale" toml:"scale"`
	Output string   `yaml:"output" json:"output" toml:"output"`
	// Context and NegativeContext are text-embedding files (.npy or
	// .safetensors, [L, D] or [1, L, D]) for models that take context.
	Context         string `yaml:"context" json:"context" toml:"context"`
	NegativeContext string `yaml:"negative_context" json:"negative_context" toml:"negative_context"`
	// Prompt and NegativePrompt are text for the pipeline's text encoder;
	// Prompts expands into one item per prompt, as Seeds does per seed.
	Prompt         string               `yaml:"prompt" json:"prompt" toml:"prompt"`
	NegativePrompt string               `yaml:"negative_prompt" json:"negative_prompt" toml:"negative_prompt"`
	Prompts        []string             `yaml:"prompts" json:"prompts" toml:"prompts"`
	Base           pipeline.StageParams `yaml:"base" json:"base" toml:"base"`
	SR             pipeline.StageParams `yaml:"sr" json:"sr" toml:"sr"`
}

// Job is a parsed, validated, expanded job file.
type Job struct {
	Name  string
	Path  string
	Items []pipeline.Item
	// Plans holds each item's plan (Plans[i] is Items[i]'s), made when the
	// file was loaded with its models' manifests; nil when it was parsed
	// without them (Parse), which Enqueue refuses.
	Plans []pipeline.Plan
	// Root is the absolute output root the outputs were resolved under.
	Root string
}

// ValidationError lists every problem of a job file, each with its path.
type ValidationError struct {
	File     string
	Problems []string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("job file %s: %s", e.File, strings.Join(e.Problems, "; "))
}

// Load reads, validates and expands the job file at path. Relative image
// paths are taken relative to the job file's directory; outputs are
// resolved under outputRoot.
func Load(path string, cfg config.Config) (*Job, error) {
	data, err := readJobFile(path, cfg)
	if err != nil {
		return nil, err
	}
	return Parse(path, data, cfg, time.Now())
}

// readJobFile reads a job file whose size is within limits.max_job_bytes.
func readJobFile(path string, cfg config.Config) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", path, err)
	}
	if st.Size() > cfg.Limits.MaxJobBytes {
		return nil, fmt.Errorf("job file %s: %d bytes, limit %d (limits.max_job_bytes)", path, st.Size(), cfg.Limits.MaxJobBytes)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", path, err)
	}
	return data, nil
}

// Parse decodes job file bytes (format by the extension of name: .yaml,
// .yml, .json, .toml) strictly, merges each item over the defaults,
// validates everything and expands counts, seed lists and image globs.
// A file without a name is named after its stem.
func Parse(name string, data []byte, cfg config.Config, now time.Time) (*Job, error) {
	root, f, err := decodeStrict(name, data)
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", name, err)
	}
	return parseTree(name, "", root, f, cfg, now, nil)
}

// parseTree is Parse on what decodeStrict made of the file's bytes: the
// generic tree and the typed File. defaultJob is the name a file without
// `name:` takes; "" means the file's stem. With describe set, each item is
// planned (pipeline.MakePlan) and its plan checked against the limits.
//
// Relative paths in the file (image, images, model paths) are taken
// relative to the file's directory and, like the output root, stored
// absolute, so that whichever process works an item finds its files.
func parseTree(name, defaultJob string, root map[string]any, f File, cfg config.Config, now time.Time, describe pipeline.Describe) (*Job, error) {
	v := &ValidationError{File: name}
	bad := func(path, format string, args ...any) {
		v.Problems = append(v.Problems, path+": "+fmt.Sprintf(format, args...))
	}
	checkNumbers(root, reflect.TypeOf(File{}), "", bad)
	if f.Version != 1 {
		bad("version", "%d is not supported (want 1)", f.Version)
	}
	if f.Name == "" {
		f.Name = defaultJob
	}
	if f.Name == "" {
		f.Name = strings.TrimSuffix(filepath.Base(name), filepath.Ext(name))
	}
	if !safeName.MatchString(f.Name) || len(f.Name) > maxNameBytes {
		bad("name", "%q: use letters, digits, '.', '_' and '-', at most %d of them", f.Name, maxNameBytes)
	}
	if len(f.Items) == 0 {
		bad("items", "no items")
	}
	if len(v.Problems) > 0 {
		return nil, v // a number that is not one would only be reported again below
	}
	defaults, _ := root["defaults"].(map[string]any)
	rawItems, _ := root["items"].([]any)
	dir, err := filepath.Abs(filepath.Dir(name))
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", name, err)
	}
	outRoot, err := filepath.Abs(cfg.Output.Root)
	if err != nil {
		return nil, fmt.Errorf("output.root: %w", err)
	}
	inside := newRootCheck(outRoot)
	job := &Job{Name: f.Name, Path: name, Root: outRoot}
	contexts := map[string]contextAnswer{} // each file read once per job file
	index := 0
	for i, raw := range rawItems {
		path := fmt.Sprintf("items[%d]", i)
		m, ok := raw.(map[string]any)
		if !ok {
			bad(path, "must be a mapping")
			continue
		}
		var spec ItemSpec
		if err := remarshal(merge(defaults, m), &spec); err != nil {
			bad(path, "%v", err)
			continue
		}
		// An upscale's size is its own: the defaults' width and height are
		// those of generated items, and would otherwise override its scale;
		// the defaults' scale is that of upscales.
		_, w := m["width"]
		_, h := m["height"]
		_, sc := m["scale"]
		if spec.Image != "" || spec.Images != "" {
			switch {
			case !w && !h:
				spec.Width, spec.Height = 0, 0
			case w != h:
				bad(path+".width", "an upscale gives both width and height, or neither (then scale decides)")
				continue
			case sc:
				bad(path+".scale", "give scale or width and height, not both")
				continue
			}
		} else if sc {
			bad(path+".scale", "only for upscaling (with image: or images:)")
			continue
		}
		srDefault := spec.SR.Model == ""
		ctxRef, negRef, cerr := contextRefs(spec, dir, contexts)
		if cerr != nil {
			bad(path, "%v", cerr)
			continue
		}
		items, problems, over := expand(spec, path, dir, cfg, cfg.Limits.MaxItems-index)
		v.Problems = append(v.Problems, problems...)
		if over {
			break // nothing more is expanded: every later item would be over too
		}
		for _, it := range items {
			it.Index = index
			it.Context, it.NegativeContext = ctxRef, negRef
			index++
			tmpl := firstNonEmpty(spec.Output, f.Output, DefaultOutput)
			out, err := resolveOutput(tmpl, outRoot, f.Name, it, now)
			if err == nil {
				err = inside.check(out)
			}
			if err != nil {
				bad(path+".output", "%v", err)
				continue
			}
			it.Output = out
			if describe != nil {
				plan, err := planItem(it, describe, cfg.Limits)
				if err != nil {
					where := path
					if spec.Images != "" {
						where += ".images (" + filepath.Base(it.Image) + ")"
					}
					if srDefault && strings.Contains(err.Error(), "sr.model") {
						err = fmt.Errorf("%w (the sr.model of models.default_sr)", err)
					}
					bad(where, "%v", err)
					continue
				}
				job.Plans = append(job.Plans, plan)
			}
			job.Items = append(job.Items, it)
		}
	}
	seen := map[string]int{}
	for _, it := range job.Items {
		if prev, ok := seen[it.Output]; ok {
			bad(fmt.Sprintf("items (index %d)", it.Index), "output %s is also the output of index %d; put {index} or {seed} in the output template", it.Output, prev)
		}
		seen[it.Output] = it.Index
	}
	if len(v.Problems) > 0 {
		if n := len(v.Problems); n > maxProblems {
			v.Problems = append(v.Problems[:maxProblems], fmt.Sprintf("... and %d more problems", n-maxProblems))
		}
		return nil, v
	}
	return job, nil
}

// contextAnswer is a context file read for a job file: its reference or
// why it cannot be used.
type contextAnswer struct {
	ref *pipeline.ContextRef
	err error
}

// contextRefs reads the item's context files (relative to the job file's
// directory), each once per job file: their shape and hash become part of
// the item.
func contextRefs(s ItemSpec, dir string, seen map[string]contextAnswer) (ctx, neg *pipeline.ContextRef, err error) {
	read := func(field, p string) (*pipeline.ContextRef, error) {
		if p == "" {
			return nil, nil
		}
		p = joinDir(dir, p)
		a, ok := seen[p]
		if !ok {
			c, sum, err := pipeline.ReadContext(p)
			if err == nil {
				a.ref = &pipeline.ContextRef{Path: p, SHA256: sum, Tokens: c.L, Dim: c.D}
			}
			a.err = err
			seen[p] = a
		}
		if a.err != nil {
			return nil, fmt.Errorf("%s: %w", field, a.err)
		}
		return a.ref, nil
	}
	if ctx, err = read("context", s.Context); err != nil {
		return nil, nil, err
	}
	neg, err = read("negative_context", s.NegativeContext)
	return ctx, neg, err
}

// maxProblems bounds the problems a rejection lists: a file of thousands of
// bad items says what is wrong with the first ones.
const maxProblems = 50

// planItem makes an item's plan and checks it against the limits: the
// output and every stage's canvas within limits.max_pixels.
func planItem(it pipeline.Item, describe pipeline.Describe, lim config.Limits) (pipeline.Plan, error) {
	p, err := pipeline.MakePlan(it, describe)
	if err != nil {
		return p, err
	}
	for i, st := range p.Stages {
		if int64(st.Width)*int64(st.Height) > lim.MaxPixels {
			return p, fmt.Errorf("stage %d (%s) works a %dx%d canvas, over limits.max_pixels (%d)", i, st.Kind, st.Width, st.Height, lim.MaxPixels)
		}
		if d := st.Decode; d != nil && int64(st.Width*d.Factor)*int64(st.Height*d.Factor) > lim.MaxPixels {
			return p, fmt.Errorf("stage %d (%s) decodes to %dx%d, over limits.max_pixels (%d)", i, st.Kind, st.Width*d.Factor, st.Height*d.Factor, lim.MaxPixels)
		}
		if st.Steps > lim.MaxSteps {
			return p, fmt.Errorf("%s.steps: %d (from the model's defaults) is over limits.max_steps (%d)", st.Kind, st.Steps, lim.MaxSteps)
		}
	}
	return p, nil
}

// Bounds on what a job file may ask for that no limit in the configuration
// covers, checked before anything of that size is made.
const (
	maxPad = 32 // zero-pad width of a template field, {index:032}
	// maxPromptBytes bounds a prompt: the encoders read 77 tokens of it.
	maxPromptBytes = 16 << 10
	// maxOutputName bounds a name in an output path, leaving 255 - 160
	// bytes for a temp file's ".NAME.tmp-PID@HOST-RANDOM" around it.
	maxOutputName = 160
	maxNameBytes  = 255  // a job name, and each part of an output path (NAME_MAX)
	maxPathBytes  = 4000 // a whole output path, below PATH_MAX
	maxTile       = 4096 // tile.size, tile.overlap, tile.halo
	maxBatch      = 1024 // tiles in one Run
)

var safeName = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

func firstNonEmpty(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}

// expand turns one merged item spec into work items and reports its
// problems. room is how many items the job may still expand to; a spec
// that would make more is refused before any of them is made.
func expand(s ItemSpec, path, dir string, cfg config.Config, room int) (items []pipeline.Item, p []string, over bool) {
	bad := func(field, format string, args ...any) {
		p = append(p, path+"."+field+": "+fmt.Sprintf(format, args...))
	}
	upscale := s.Image != "" || s.Images != ""
	if s.Image != "" && s.Images != "" {
		bad("image", "give image or images, not both")
	}
	if s.Base.Model == "" && !upscale {
		s.Base.Model = cfg.Models.DefaultBase
	}
	if s.SR.Model == "" {
		s.SR.Model = cfg.Models.DefaultSR
	}
	if !upscale {
		if s.Width <= 0 || s.Width%8 != 0 || s.Width > 16384 {
			bad("width", "must be a multiple of 8 and at most 16384, got %d", s.Width)
		}
		if s.Height <= 0 || s.Height%8 != 0 || s.Height > 16384 {
			bad("height", "must be a multiple of 8 and at most 16384, got %d", s.Height)
		}
		if s.Base.Model == "" {
			bad("base.model", "required to generate (or give image: to upscale; models.default_base is empty)")
		}
	} else {
		if s.Scale < 0 || s.Scale > 16 {
			bad("scale", "must be in (0, 16], got %g", s.Scale)
		}
		if (s.Width == 0) != (s.Height == 0) || s.Width < 0 || s.Height < 0 || s.Width > 16384 || s.Height > 16384 {
			bad("width", "an upscale gives both width and height (at most 16384) or neither, got %dx%d", s.Width, s.Height)
		}
		if s.SR.Model == "" {
			bad("sr.model", "required to upscale (models.default_sr is empty)")
		}
	}
	if int64(s.Width)*int64(s.Height) > cfg.Limits.MaxPixels {
		bad("width", "%dx%d is over limits.max_pixels (%d)", s.Width, s.Height, cfg.Limits.MaxPixels)
	}
	for _, st := range []struct {
		name string
		p    *pipeline.StageParams
	}{{"base", &s.Base}, {"sr", &s.SR}} {
		if st.p.Steps < 0 || st.p.Steps > cfg.Limits.MaxSteps {
			bad(st.name+".steps", "must be between 1 and %d (limits.max_steps), got %d", cfg.Limits.MaxSteps, st.p.Steps)
		}
		if st.p.Strength < 0 || st.p.Strength > 1 {
			bad(st.name+".strength", "must be in (0, 1], got %g", st.p.Strength)
		}
		if nl := st.p.NoiseLevel; nl != nil && (*nl < 0 || *nl > 1) {
			bad(st.name+".noise_level", "must be in [0, 1], got %g", *nl)
		}
		if st.p.Guidance < 0 || st.p.Guidance > 100 || st.p.Eta < 0 || st.p.Eta > 1 {
			bad(st.name, "guidance must be in [0, 100] and eta in [0, 1], got %g and %g", st.p.Guidance, st.p.Eta)
		}
		if st.p.Shift < 0 || st.p.Shift > 100 {
			bad(st.name+".shift", "must be in [0, 100], got %g", st.p.Shift)
		}
		if st.p.Batch < 0 || st.p.Batch > maxBatch {
			bad(st.name+".batch", "must be between 0 (auto) and %d, got %d", maxBatch, st.p.Batch)
		}
		tl := st.p.Tile
		if tl.Size < 0 || tl.Size > maxTile || tl.Overlap > maxTile || tl.Overlap < -1 {
			bad(st.name+".tile", "size and overlap must be in [0, %d], got %d and %d", maxTile, tl.Size, tl.Overlap)
		}
		if tl.Halo != nil && (*tl.Halo < 0 || *tl.Halo > maxTile) {
			bad(st.name+".tile.halo", "must be in [0, %d], got %d", maxTile, *tl.Halo)
		}
		switch st.p.Sampler {
		case "", "ddim", "euler", "dpm++2m", "dpmpp_2m":
		default:
			bad(st.name+".sampler", "%q (want ddim, euler or dpm++2m)", st.p.Sampler)
		}
		switch st.p.Filter {
		case "", "lanczos", "bicubic":
		default:
			bad(st.name+".filter", "%q (want lanczos or bicubic)", st.p.Filter)
		}
		st.p.Model = modelRef(dir, st.p.Model)
	}
	if s.Count < 0 || s.Count > cfg.Limits.MaxItems {
		bad("count", "must be between 1 and %d, got %d", cfg.Limits.MaxItems, s.Count)
	}
	if len(s.Seeds) > cfg.Limits.MaxItems {
		bad("seeds", "%d seeds, limit %d (limits.max_items)", len(s.Seeds), cfg.Limits.MaxItems)
	}
	if len(s.Seeds) > 0 && s.Count > 0 {
		bad("seeds", "give seeds or count, not both")
	}
	if len(s.Prompts) > cfg.Limits.MaxItems {
		bad("prompts", "%d prompts, limit %d (limits.max_items)", len(s.Prompts), cfg.Limits.MaxItems)
	}
	if len(s.Prompts) > 0 {
		s.Prompt = "" // an item's prompts: replace the defaults' prompt
	}
	for field, pr := range map[string]string{"prompt": s.Prompt, "negative_prompt": s.NegativePrompt} {
		if len(pr) > maxPromptBytes {
			bad(field, "%d bytes, at most %d", len(pr), maxPromptBytes)
		}
	}
	for k, pr := range s.Prompts {
		if len(pr) > maxPromptBytes {
			bad(fmt.Sprintf("prompts[%d]", k), "%d bytes, at most %d", len(pr), maxPromptBytes)
		}
		if strings.TrimSpace(pr) == "" {
			bad(fmt.Sprintf("prompts[%d]", k), "empty")
		}
	}
	if (s.Prompt != "" || len(s.Prompts) > 0) && s.Context != "" {
		bad("prompt", "give prompt or context, not both (a context file would win, and the prompt be recorded but unused)")
	}
	if len(p) > 0 {
		return nil, p, false
	}
	seed := uint64(1)
	if s.Seed != nil {
		seed = *s.Seed
	}
	nSeeds := len(s.Seeds)
	if nSeeds == 0 {
		nSeeds = max(s.Count, 1)
	}
	images := []string{""}
	if s.Image != "" {
		images = []string{joinDir(dir, s.Image)}
	}
	if s.Images != "" {
		matches, err := filepath.Glob(joinDir(dir, s.Images))
		if err != nil || len(matches) == 0 {
			return nil, []string{path + ".images: " + fmt.Sprintf("%q matches no file", s.Images)}, false
		}
		sort.Strings(matches)
		images = matches
	}
	prompts := s.Prompts
	if len(prompts) == 0 {
		prompts = []string{s.Prompt}
	}
	if n := int64(len(images)) * int64(nSeeds) * int64(len(prompts)); n > int64(room) {
		return nil, []string{fmt.Sprintf("%s: expands to %d more items, over limits.max_items (%d) with the items before it", path, n, cfg.Limits.MaxItems)}, true
	}
	class := -1
	if s.Class != nil {
		class = *s.Class
	}
	for _, img := range images {
		it := pipeline.Item{Width: s.Width, Height: s.Height, Class: class, Image: img, Scale: s.Scale, Base: s.Base, SR: s.SR}
		if img != "" {
			field := "image"
			if s.Images != "" {
				field = "images (" + filepath.Base(img) + ")"
			}
			if err := it.SetInput(); err != nil {
				bad(field, "%v", err)
				continue
			}
			if int64(it.Width)*int64(it.Height) > cfg.Limits.MaxPixels {
				bad(field, "upscaled to %dx%d, over limits.max_pixels (%d)", it.Width, it.Height, cfg.Limits.MaxPixels)
				continue
			}
		}
		it.NegativePrompt = s.NegativePrompt
		for _, pr := range prompts {
			it.Prompt = pr
			for k := 0; k < nSeeds; k++ {
				it.Seed = seed + uint64(k)
				if len(s.Seeds) > 0 {
					it.Seed = s.Seeds[k]
				}
				items = append(items, it)
			}
		}
	}
	if len(p) > 0 {
		return nil, p, false
	}
	return items, nil, false
}

// modelRef is a model reference as the job file at dir means it: a path
// (it holds a separator) relative to the file's directory, made absolute;
// a name as it is.
func modelRef(dir, ref string) string {
	if ref == "" || !strings.ContainsAny(ref, `/\`) {
		return ref
	}
	return joinDir(dir, ref)
}

func joinDir(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

var field = regexp.MustCompile(`\{([a-z]+)(?::(0?\d+))?\}`)

// resolveOutput fills the template and places it under root; a result that
// would leave root is an error.
func resolveOutput(tmpl, root, job string, it pipeline.Item, now time.Time) (string, error) {
	var ferr error
	out := field.ReplaceAllStringFunc(tmpl, func(m string) string {
		sub := field.FindStringSubmatch(m)
		var v any
		switch sub[1] {
		case "job":
			v = job
		case "index":
			v = it.Index
		case "seed":
			v = it.Seed
		case "width":
			v = it.Width
		case "height":
			v = it.Height
		case "class":
			v = it.Class
		case "date":
			v = now.Format("2006-01-02")
		case "time":
			v = now.Format("150405")
		case "name":
			v = strings.TrimSuffix(filepath.Base(it.Image), filepath.Ext(it.Image))
			if it.Image == "" {
				v = "gen"
			}
		default:
			ferr = fmt.Errorf("unknown template field {%s} (want job, index, seed, width, height, class, date, time, name)", sub[1])
			return m
		}
		if sub[2] != "" {
			// Bounded before anything is padded: {index:0999999} would
			// otherwise make a megabyte of zeros for every item.
			width, err := strconv.Atoi(sub[2])
			if err != nil || width > maxPad {
				ferr = fmt.Errorf("{%s:%s}: a zero-pad width is at most %d", sub[1], sub[2], maxPad)
				return m
			}
			switch n := v.(type) {
			case int:
				return fmt.Sprintf("%0*d", width, n)
			case uint64:
				return fmt.Sprintf("%0*d", width, n)
			}
		}
		return fmt.Sprint(v)
	})
	if ferr != nil {
		return "", ferr
	}
	if filepath.IsAbs(out) {
		return "", fmt.Errorf("%q is absolute; outputs go under output.root", tmpl)
	}
	clean := filepath.Clean(out)
	if clean == "." || clean == ".." || strings.HasPrefix(clean, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("%q leaves output.root", tmpl)
	}
	if !strings.EqualFold(filepath.Ext(clean), ".png") {
		clean += ".png"
	}
	for _, part := range strings.Split(clean, string(filepath.Separator)) {
		// The temp files' names are longer than the PNG's, by a suffix
		// that names the writing process and its host.
		if len(part) > maxOutputName {
			return "", fmt.Errorf("%q: the file name %.40q... is %d bytes; at most %d leave room for the temp file's suffix", tmpl, part, len(part), maxOutputName)
		}
	}
	out = filepath.Join(root, clean)
	if len(out) > maxPathBytes {
		return "", fmt.Errorf("%q: the output path is %d bytes, at most %d", tmpl, len(out), maxPathBytes)
	}
	return out, nil
}

// rootCheck checks that an output, once symbolic links in the part of its
// directory that exists are followed, still lies under the output root: a
// link inside the output root must not lead outside it. A root that does
// not exist yet has no links to follow. The root is resolved once, and each
// output directory once.
type rootCheck struct {
	realRoot string             // "" when the root does not exist: nothing to check
	dirs     map[string]realDir // by filepath.Dir of an output
}

// realDir is an output directory, or its deepest ancestor that exists, with
// links followed: real is "" when none exists, err says why it could not
// be resolved.
type realDir struct {
	real string
	err  error
}

func newRootCheck(root string) *rootCheck {
	realRoot, err := filepath.EvalSymlinks(root)
	if err != nil {
		return &rootCheck{}
	}
	return &rootCheck{realRoot: realRoot, dirs: map[string]realDir{}}
}

// check returns an error when out leaves the root through a link.
func (c *rootCheck) check(out string) error {
	if c.realRoot == "" {
		return nil
	}
	dir := filepath.Dir(out)
	d, ok := c.dirs[dir]
	if !ok {
		d = resolveDir(dir)
		c.dirs[dir] = d
	}
	if d.err != nil || d.real == "" {
		return d.err
	}
	rel, err := filepath.Rel(c.realRoot, d.real)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return fmt.Errorf("%s leaves output.root through a symbolic link (it leads to %s)", out, d.real)
	}
	return nil
}

// resolveDir follows the links of dir's deepest ancestor (or dir itself)
// that exists.
func resolveDir(dir string) realDir {
	for {
		if _, err := os.Lstat(dir); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return realDir{}
		}
		dir = parent
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return realDir{err: fmt.Errorf("%s: %v", dir, err)}
	}
	return realDir{real: real}
}

// decodeStrict decodes into the typed File, rejecting unknown keys with
// the line they are on, and into a generic tree, whose top level must be a
// mapping.
func decodeStrict(name string, data []byte) (map[string]any, File, error) {
	var generic any
	var f File
	switch strings.ToLower(filepath.Ext(name)) {
	case ".yaml", ".yml":
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&f); err != nil {
			return nil, f, errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
		}
		if err := yaml.Unmarshal(data, &generic); err != nil {
			return nil, f, err
		}
	case ".json":
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			return nil, f, jsonError(data, err)
		}
		// Numbers as written, so that a seed above 2^53 keeps its digits.
		gen := json.NewDecoder(bytes.NewReader(data))
		gen.UseNumber()
		if err := gen.Decode(&generic); err != nil {
			return nil, f, err
		}
	case ".toml":
		dec := toml.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			var sm *toml.StrictMissingError
			if errors.As(err, &sm) {
				return nil, f, errors.New(strings.TrimSpace(sm.String()))
			}
			return nil, f, err
		}
		if err := toml.Unmarshal(data, &generic); err != nil {
			return nil, f, err
		}
	default:
		return nil, f, fmt.Errorf("unknown format %q (want .yaml, .yml, .json or .toml)", filepath.Ext(name))
	}
	root, ok := generic.(map[string]any)
	if !ok {
		return nil, f, errors.New("the top level must be a mapping")
	}
	normalize(root)
	return root, f, nil
}

// checkNumbers walks the decoded tree beside the type it decodes into (t,
// a struct with yaml tags) and reports numbers the typed decode would take
// silently: NaN or an infinity anywhere (`scale: .nan`), and a fraction
// where a whole number goes (`width: 8.5`, which YAML would truncate).
func checkNumbers(v any, t reflect.Type, path string, bad func(path, format string, args ...any)) {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	at := func(key string) string {
		if path == "" {
			return key
		}
		return path + "." + key
	}
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			var ft reflect.Type
			if t != nil && t.Kind() == reflect.Struct {
				for i := 0; i < t.NumField(); i++ {
					if strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0] == k {
						ft = t.Field(i).Type
					}
				}
			}
			checkNumbers(e, ft, at(k), bad)
		}
	case []any:
		var et reflect.Type
		if t != nil && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) {
			et = t.Elem()
		}
		for i, e := range x {
			p := fmt.Sprintf("%s[%d]", path, i)
			if path == "" {
				p = fmt.Sprintf("[%d]", i)
			}
			checkNumbers(e, et, p, bad)
		}
	case float64:
		switch {
		case math.IsNaN(x) || math.IsInf(x, 0):
			bad(path, "must be a finite number, got %v", x)
		case t != nil && isWhole(t.Kind()) && x != math.Trunc(x):
			bad(path, "must be a whole number, got %v", x)
		}
	}
}

func isWhole(k reflect.Kind) bool {
	switch k {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	}
	return false
}

// jsonError adds the line of a JSON syntax error.
func jsonError(data []byte, err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		line := 1 + bytes.Count(data[:se.Offset], []byte("\n"))
		return fmt.Errorf("line %d: %v", line, err)
	}
	return err
}

// normalize turns yaml's map[any]any (not produced by yaml.v3 for string
// keys, but possible for others) into map[string]any throughout, and
// JSON's numbers into int64 or uint64 where they are whole, else float64.
func normalize(v any) any {
	switch t := v.(type) {
	case json.Number:
		if i, err := strconv.ParseInt(string(t), 10, 64); err == nil {
			return i
		}
		if u, err := strconv.ParseUint(string(t), 10, 64); err == nil {
			return u
		}
		f, _ := t.Float64()
		return f
	case map[string]any:
		for k, x := range t {
			t[k] = normalize(x)
		}
		return t
	case map[any]any:
		m := make(map[string]any, len(t))
		for k, x := range t {
			m[fmt.Sprint(k)] = normalize(x)
		}
		return m
	case []any:
		for i, x := range t {
			t[i] = normalize(x)
		}
	}
	return v
}

// merge returns base overlaid with over, recursively for mappings.
func merge(base, over map[string]any) map[string]any {
	out := make(map[string]any, len(base)+len(over))
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		if bm, ok := out[k].(map[string]any); ok {
			if om, ok := v.(map[string]any); ok {
				out[k] = merge(bm, om)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// remarshal decodes a generic tree into a typed value strictly, via YAML
// (which every format's scalars survive).
func remarshal(v any, dst any) error {
	data, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(dst); err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
	}
	return nil
}
