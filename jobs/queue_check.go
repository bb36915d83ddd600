package jobs

import (
	"bytes"
	"fmt"
	"path/filepath"
	"time"
	"unicode/utf8"

	"tessera/config"
	"tessera/pipeline"
)

// LoadChecked is Load followed by the checks of CheckBytes and the plan of
// every item: every model the file names must be usable (describe returns
// its manifest, or why it has none), each bad model reported with its
// field path (defaults.base.model, items[2].sr.model), and every item's
// plan (pipeline.MakePlan) must be made and fit the limits. The job's
// Plans are what Enqueue stores with its items.
func LoadChecked(path string, cfg config.Config, describe pipeline.Describe) (*Job, error) {
	return LoadCheckedAt(path, "", cfg, time.Now(), describe)
}

// LoadCheckedAt is LoadChecked with the time that fills {date} and {time}
// and the name a file without `name:` takes ("" = its stem). The file is
// read, checked for encoding and decoded once.
func LoadCheckedAt(path, defaultJob string, cfg config.Config, now time.Time, describe pipeline.Describe) (*Job, error) {
	data, err := readJobFile(path, cfg)
	if err != nil {
		return nil, err
	}
	// Invalid UTF-8 first: JSON decoding would silently replace bad bytes.
	if err := checkEncoding(path, data); err != nil {
		return nil, err
	}
	root, f, err := decodeStrict(path, data)
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", path, err)
	}
	// The models first: a bad one would fail every item's plan again.
	if err := checkTree(path, root, cfg, existsOf(describe)); err != nil {
		return nil, err
	}
	return parseTree(path, defaultJob, root, f, cfg, now, describe)
}

// CheckBytes checks what Parse does not about a job file's bytes: that it
// is not empty, is valid UTF-8 (JSON would silently replace bad bytes),
// sets no count to zero explicitly (Parse cannot tell it from an absent
// one), and, with exists set, names only models that exist.
func CheckBytes(path string, data []byte, cfg config.Config, exists func(ref string) error) error {
	if err := checkEncoding(path, data); err != nil {
		return err
	}
	root, _, err := decodeStrict(path, data)
	if err != nil {
		return &ValidationError{File: path, Problems: []string{err.Error()}}
	}
	return checkTree(path, root, cfg, exists)
}

// existsOf is the check of checkTree that a model is usable, from describe.
func existsOf(describe pipeline.Describe) func(ref string) error {
	if describe == nil {
		return nil
	}
	return func(ref string) error {
		_, err := describe(ref)
		return err
	}
}

func checkEncoding(path string, data []byte) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return fmt.Errorf("job file %s: empty", path)
	}
	if utf8.Valid(data) {
		return nil
	}
	off := 0
	for off < len(data) {
		r, n := utf8.DecodeRune(data[off:])
		if r == utf8.RuneError && n <= 1 {
			break
		}
		off += n
	}
	return fmt.Errorf("job file %s: line %d: not valid UTF-8 (byte %d)", path, 1+bytes.Count(data[:off], []byte("\n")), off)
}

// checkTree checks the decoded job file in one walk of its defaults and
// items: explicit counts of zero and, with exists set, model fields that
// name no model (listed after the counts).
func checkTree(path string, root map[string]any, cfg config.Config, exists func(ref string) error) error {
	var counts, models []string
	specs(root, func(field string, m map[string]any) {
		if c, ok := m["count"]; ok && fmt.Sprint(c) == "0" {
			counts = append(counts, fmt.Sprintf("%s.count: must be between 1 and %d, got 0", field, cfg.Limits.MaxItems))
		}
		if exists == nil {
			return
		}
		for _, stage := range []string{"base", "sr"} {
			sm, _ := m[stage].(map[string]any)
			ref, ok := sm["model"].(string)
			if !ok || ref == "" {
				continue
			}
			if dir, err := filepath.Abs(filepath.Dir(path)); err == nil {
				ref = modelRef(dir, ref) // as expand resolves it
			}
			if err := exists(ref); err != nil {
				models = append(models, fmt.Sprintf("%s.%s.model: %v", field, stage, err))
			}
		}
	})
	if problems := append(counts, models...); len(problems) > 0 {
		return &ValidationError{File: path, Problems: problems}
	}
	return nil
}

// specs calls fn with the path and raw mapping of defaults and each item.
func specs(root map[string]any, fn func(path string, m map[string]any)) {
	if m, ok := root["defaults"].(map[string]any); ok {
		fn("defaults", m)
	}
	items, _ := root["items"].([]any)
	for i, it := range items {
		if m, ok := it.(map[string]any); ok {
			fn(fmt.Sprintf("items[%d]", i), m)
		}
	}
}
