// Package jobs reads job files, expands them into work items, and stores
// finished images durably.
package jobs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
	Width  int                  `yaml:"width" json:"width" toml:"width"`
	Height int                  `yaml:"height" json:"height" toml:"height"`
	Seed   *uint64              `yaml:"seed" json:"seed" toml:"seed"`
	Seeds  []uint64             `yaml:"seeds" json:"seeds" toml:"seeds"`
	Count  int                  `yaml:"count" json:"count" toml:"count"`
	Class  *int                 `yaml:"class" json:"class" toml:"class"`
	Image  string               `yaml:"image" json:"image" toml:"image"`
	Images string               `yaml:"images" json:"images" toml:"images"`
	Scale  float64              `yaml:"scale" json:"scale" toml:"scale"`
	Output string               `yaml:"output" json:"output" toml:"output"`
	Base   pipeline.StageParams `yaml:"base" json:"base" toml:"base"`
	SR     pipeline.StageParams `yaml:"sr" json:"sr" toml:"sr"`
}

// Job is a parsed, validated, expanded job file.
type Job struct {
	Name  string
	Path  string
	Items []pipeline.Item
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
	return parseTree(name, "", root, f, cfg, now)
}

// parseTree is Parse on what decodeStrict made of the file's bytes: the
// generic tree and the typed File. defaultJob is the name a file without
// `name:` takes; "" means the file's stem.
func parseTree(name, defaultJob string, root map[string]any, f File, cfg config.Config, now time.Time) (*Job, error) {
	v := &ValidationError{File: name}
	bad := func(path, format string, args ...any) {
		v.Problems = append(v.Problems, path+": "+fmt.Sprintf(format, args...))
	}
	if f.Version != 1 {
		bad("version", "%d is not supported (want 1)", f.Version)
	}
	if f.Name == "" {
		f.Name = defaultJob
	}
	if f.Name == "" {
		f.Name = strings.TrimSuffix(filepath.Base(name), filepath.Ext(name))
	}
	if !safeName.MatchString(f.Name) {
		bad("name", "%q: use letters, digits, '.', '_' and '-'", f.Name)
	}
	if len(f.Items) == 0 {
		bad("items", "no items")
	}
	defaults, _ := root["defaults"].(map[string]any)
	rawItems, _ := root["items"].([]any)
	dir := filepath.Dir(name)
	inside := newRootCheck(cfg.Output.Root)
	job := &Job{Name: f.Name, Path: name}
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
		items, problems := expand(spec, path, dir, cfg)
		v.Problems = append(v.Problems, problems...)
		for _, it := range items {
			it.Index = index
			index++
			tmpl := firstNonEmpty(spec.Output, f.Output, DefaultOutput)
			out, err := resolveOutput(tmpl, cfg.Output.Root, f.Name, it, now)
			if err == nil {
				err = inside.check(out)
			}
			if err != nil {
				bad(path+".output", "%v", err)
				continue
			}
			it.Output = out
			job.Items = append(job.Items, it)
		}
	}
	if len(job.Items) > cfg.Limits.MaxItems {
		bad("items", "expand to %d items, limit %d (limits.max_items)", len(job.Items), cfg.Limits.MaxItems)
	}
	seen := map[string]int{}
	for _, it := range job.Items {
		if prev, ok := seen[it.Output]; ok {
			bad(fmt.Sprintf("items (index %d)", it.Index), "output %s is also the output of index %d; put {index} or {seed} in the output template", it.Output, prev)
		}
		seen[it.Output] = it.Index
	}
	if len(v.Problems) > 0 {
		return nil, v
	}
	return job, nil
}

var safeName = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

func firstNonEmpty(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}

// expand turns one merged item spec into work items and reports its problems.
func expand(s ItemSpec, path, dir string, cfg config.Config) ([]pipeline.Item, []string) {
	var p []string
	bad := func(field, format string, args ...any) {
		p = append(p, path+"."+field+": "+fmt.Sprintf(format, args...))
	}
	upscale := s.Image != "" || s.Images != ""
	if s.Image != "" && s.Images != "" {
		bad("image", "give image or images, not both")
	}
	if !upscale {
		if s.Width <= 0 || s.Width%8 != 0 || s.Width > 16384 {
			bad("width", "must be a multiple of 8 and at most 16384, got %d", s.Width)
		}
		if s.Height <= 0 || s.Height%8 != 0 || s.Height > 16384 {
			bad("height", "must be a multiple of 8 and at most 16384, got %d", s.Height)
		}
		if s.Base.Model == "" {
			bad("base.model", "required to generate (or give image: to upscale)")
		}
	} else if s.Scale < 0 || s.Scale > 16 {
		bad("scale", "must be in (0, 16], got %g", s.Scale)
	}
	if int64(s.Width)*int64(s.Height) > cfg.Limits.MaxPixels {
		bad("width", "%dx%d is over limits.max_pixels (%d)", s.Width, s.Height, cfg.Limits.MaxPixels)
	}
	if s.SR.Model == "" {
		bad("sr.model", "required")
	}
	for _, st := range []struct {
		name string
		p    pipeline.StageParams
	}{{"base", s.Base}, {"sr", s.SR}} {
		if st.p.Steps < 0 || st.p.Steps > cfg.Limits.MaxSteps {
			bad(st.name+".steps", "must be between 1 and %d (limits.max_steps), got %d", cfg.Limits.MaxSteps, st.p.Steps)
		}
		if st.p.Strength < 0 || st.p.Strength > 1 {
			bad(st.name+".strength", "must be in (0, 1], got %g", st.p.Strength)
		}
		if nl := st.p.NoiseLevel; nl != nil && (*nl < 0 || *nl > 1) {
			bad(st.name+".noise_level", "must be in [0, 1], got %g", *nl)
		}
		if st.p.Guidance < 0 || st.p.Eta < 0 || st.p.Batch < 0 {
			bad(st.name, "guidance, eta and batch must not be negative")
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
	}
	if s.Count < 0 || s.Count > cfg.Limits.MaxItems {
		bad("count", "must be between 1 and %d, got %d", cfg.Limits.MaxItems, s.Count)
	}
	if len(s.Seeds) > 0 && s.Count > 0 {
		bad("seeds", "give seeds or count, not both")
	}
	if len(p) > 0 {
		return nil, p
	}
	seed := uint64(1)
	if s.Seed != nil {
		seed = *s.Seed
	}
	seeds := s.Seeds
	if len(seeds) == 0 {
		n := max(s.Count, 1)
		for i := 0; i < n; i++ {
			seeds = append(seeds, seed+uint64(i))
		}
	}
	images := []string{""}
	if s.Image != "" {
		images = []string{joinDir(dir, s.Image)}
	}
	if s.Images != "" {
		matches, err := filepath.Glob(joinDir(dir, s.Images))
		if err != nil || len(matches) == 0 {
			return nil, []string{path + ".images: " + fmt.Sprintf("%q matches no file", s.Images)}
		}
		sort.Strings(matches)
		images = matches
	}
	class := -1
	if s.Class != nil {
		class = *s.Class
	}
	var items []pipeline.Item
	for _, img := range images {
		for _, sd := range seeds {
			items = append(items, pipeline.Item{Seed: sd, Width: s.Width, Height: s.Height, Class: class, Image: img, Scale: s.Scale, Base: s.Base, SR: s.SR})
		}
	}
	return items, nil
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
			if n, ok := v.(int); ok {
				width, _ := strconv.Atoi(sub[2])
				return fmt.Sprintf("%0*d", width, n)
			}
			if n, ok := v.(uint64); ok {
				width, _ := strconv.Atoi(sub[2])
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
	return filepath.Join(root, clean), nil
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
		if err := json.Unmarshal(data, &generic); err != nil {
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
// keys, but possible for others) into map[string]any throughout.
func normalize(v any) any {
	switch t := v.(type) {
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
