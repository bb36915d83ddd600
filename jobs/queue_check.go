package jobs

import (
	"fmt"
	"os"

	"tessera/config"
)

// LoadChecked is Load followed by a check that every model the file names
// exists: exists returns an error for a reference that names no model. Each
// unknown model is a problem of the file, named by its field path
// (defaults.base.model, items[2].sr.model).
func LoadChecked(path string, cfg config.Config, exists func(ref string) error) (*Job, error) {
	job, err := Load(path, cfg)
	if err != nil || exists == nil {
		return job, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("job file %s: %w", path, err)
	}
	if problems := checkModels(path, data, exists); len(problems) > 0 {
		return nil, &ValidationError{File: path, Problems: problems}
	}
	return job, nil
}

// checkModels lists the model fields of a job file that name no model.
func checkModels(name string, data []byte, exists func(ref string) error) []string {
	generic, err := decodeStrict(name, data)
	if err != nil {
		return []string{err.Error()}
	}
	root := generic.(map[string]any)
	var problems []string
	check := func(path string, spec any) {
		m, _ := spec.(map[string]any)
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
