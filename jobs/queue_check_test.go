package jobs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tessera/config"
)

// FuzzCheckBytes feeds job files (seeded with the bad-file corpus) to the
// checks LoadChecked adds: they never panic, and a rejection names the file.
func FuzzCheckBytes(f *testing.F) {
	paths, _ := filepath.Glob(filepath.Join("..", "testdata", "jobs", "bad", "*"))
	for _, p := range paths {
		if data, err := os.ReadFile(p); err == nil && len(data) < 4096 {
			f.Add(filepath.Ext(p), data)
		}
	}
	cfg := config.Default()
	f.Fuzz(func(t *testing.T, ext string, data []byte) {
		name := "job" + ext
		err := CheckBytes(name, data, cfg, func(ref string) error {
			if ref == "missing" {
				return os.ErrNotExist
			}
			return nil
		})
		if err != nil && !strings.Contains(err.Error(), name) {
			t.Fatalf("error does not name the file: %v", err)
		}
	})
}
