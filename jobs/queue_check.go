package jobs

import (
	"bytes"
	"fmt"
	"os"
	"unicode/utf8"

	"tessera/config"
)

// LoadChecked is Load followed by a check that every model the file names
// exists: exists returns an error for a reference that names no model. Each
// unknown model is a problem of the file, named by its field path
// (defaults.base.model, items[2].sr.model).
func LoadChecked(path string, cfg config.Config, exists func(ref string) error) (*Job, error) {
	if st, err := os.Stat(path); err == nil && st.Size() <= cfg.Limits.MaxJobBytes {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("job file %s: %w", path, err)
		}
		if len(bytes.TrimSpace(data)) == 0 {
			return nil, fmt.Errorf("job file %s: empty", path)
		}
		if !utf8.Valid(data) {
			off := 0
			for off < len(data) {
				r, n := utf8.DecodeRune(data[off:])
				if r == utf8.RuneError && n <= 1 {
					break
				}
				off += n
			}
			return nil, fmt.Errorf("job file %s: line %d: not valid UTF-8 (byte %d)", path, 1+bytes.Count(data[:off], []byte("\n")), off)
		}
	}
	job, err := Load(path, cfg)
	if err != nil || exists == nil {
		return job, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", path, err)
	}
	if problems := checkModels(path, data, cfg, exists); len(problems) > 0 {
		return nil, &ValidationError{File: path, Problems: problems}
	}
	return job, nil
}

// checkModels lists the model fields of a job file that name no model,
// and explicit counts of zero (which Parse cannot tell from an absent count).
func checkModels(name string, data []byte, cfg config.Config, exists func(ref string) error) []string {
	generic, err := decodeStrict(name, data)
	if err != nil {
		return []string{err.Error()}
	}
	root := generic.(map[string]any)
	var problems []string
	check := func(path string, spec any) {
		m, _ := spec.(map[string]any)
		if c, ok := m["count"]; ok && fmt.Sprint(c) == "0" {
			problems = append(problems, fmt.Sprintf("%s.count: must be between 1 and %d, got 0", path, cfg.Limits.MaxItems))
		}
		for _, stage := range []string{"base", "sr"} {
			sm, _ := m[stage].(map[string]any)
			ref, ok := sm["model"].(string)
			if !ok || ref == "" {
				continue
			}
			if err := exists(ref); err != nil {
				problems = append(problems, fmt.Sprintf("%s.%s.model: %v", path, stage, err))
			}
		}
	}
	check("defaults", root["defaults"])
	items, _ := root["items"].([]any)
	for i, it := range items {
		check(fmt.Sprintf("items[%d]", i), it)
	}
	return problems
}
