package jobs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tessera/pipeline"
	"tessera/stages"
)

func TestWriteAndDone(t *testing.T) {
	dir := t.TempDir()
	it := pipeline.Item{Index: 3, Seed: 42, Width: 8, Height: 4, Class: -1, Output: filepath.Join(dir, "job", "0003-42.png"), SR: pipeline.StageParams{Model: "demo-sr"}}
	img := make([]float32, 3*4*8)
	for i := range img {
		img[i] = float32(i%17)/8 - 1
	}
	res := &pipeline.Result{Image: img, Channels: 3, Width: 8, Height: 4, Plan: pipeline.Plan{Width: 8, Height: 4, Stages: []pipeline.StagePlan{{Kind: "sr", Model: "demo-sr", Steps: 5, Sampler: "ddim"}}}}
	if Done(it) {
		t.Fatal("done before writing")
	}
	if err := Write("job", it, res, WriteOptions{Version: "test"}); err != nil {
		t.Fatal(err)
	}
	if !Done(it) {
		t.Fatal("not done after writing")
	}
	data, err := os.ReadFile(it.Output)
	if err != nil {
		t.Fatal(err)
	}
	params, meta, err := stages.ReadPNGMetadata(data)
	if err != nil || !strings.Contains(params, "Seed: 42") || !strings.Contains(string(meta), `"item_hash"`) {
		t.Fatalf("metadata %q %q %v", params, meta, err)
	}
	st, _ := os.Stat(it.Output)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v", st.Mode())
	}
	// A changed item is not done; a damaged PNG is not done.
	other := it
	other.Seed = 43
	if Done(other) {
		t.Error("a different item counts as done")
	}
	os.WriteFile(it.Output, data[:len(data)/2], 0o644)
	if Done(it) {
		t.Error("a truncated PNG counts as done")
	}
}

func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "a"), 0o755)
	stale := filepath.Join(dir, "a", ".x.png.tmp-123")
	keep := filepath.Join(dir, "a", "x.png")
	os.WriteFile(stale, []byte("half"), 0o644)
	os.WriteFile(keep, []byte("whole"), 0o644)
	n, err := RemoveStaleTemps(dir)
	if err != nil || n != 1 {
		t.Fatalf("removed %d, %v", n, err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Error("stale temp kept")
	}
	if _, err := os.Stat(keep); err != nil {
		t.Error("real file removed")
	}
	if n, err := RemoveStaleTemps(filepath.Join(dir, "missing")); err != nil || n != 0 {
		t.Errorf("missing dir: %d, %v", n, err)
	}
}
