package jobs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tessera/pipeline"
	"tessera/stages"
)

// A symbolic link made inside the output root after the item was queued
// (its output checked) must not carry the image out of the root: nothing
// is written outside, and the item fails as invalid, at once.
func TestWriteRefusesLinkMadeAfterSubmit(t *testing.T) {
	root, outside := t.TempDir(), t.TempDir()
	it := pipeline.Item{Seed: 1, Width: 8, Height: 4, Class: -1, Output: filepath.Join(root, "job", "sub", "0000-1.png")}
	res := &pipeline.Result{Image: make([]float32, 3*4*8), Channels: 3, Width: 8, Height: 4}
	// The link appears at two depths: the output's own directory, and one above it.
	for _, link := range []string{filepath.Join(root, "job", "sub"), filepath.Join(root, "job")} {
		os.RemoveAll(filepath.Join(root, "job"))
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, link); err != nil {
			t.Fatal(err)
		}
		err := Write(root, "job", it, res, WriteOptions{Version: "test"})
		if err == nil || pipeline.Classify(err) != pipeline.ClassInvalid || !strings.Contains(err.Error(), "leaves output.root") {
			t.Fatalf("link %s: err = %v (%s)", link, err, pipeline.Classify(err))
		}
		var left []string
		filepath.WalkDir(outside, func(p string, d os.DirEntry, err error) error {
			if p != outside {
				left = append(left, p)
			}
			return nil
		})
		if len(left) > 0 {
			t.Fatalf("link %s: written outside the root: %v", link, left)
		}
	}
	// An output that is not under the root at all is refused too.
	it.Output = filepath.Join(outside, "x.png")
	if err := Write(root, "job", it, res, WriteOptions{}); pipeline.Classify(err) != pipeline.ClassInvalid {
		t.Fatalf("output outside the root: %v", err)
	}
}

func TestWriteAndDone(t *testing.T) {
	dir := t.TempDir()
	it := pipeline.Item{Index: 3, Seed: 42, Width: 8, Height: 4, Class: -1, Output: filepath.Join(dir, "job", "0003-42.png"), SR: pipeline.StageParams{Model: "demo-sr"}}
	img := make([]float32, 3*4*8)
	for i := range img {
		img[i] = float32(i%17)/8 - 1
	}
	res := &pipeline.Result{Image: img, Channels: 3, Width: 8, Height: 4, Plan: pipeline.Plan{Width: 8, Height: 4, Stages: []pipeline.StagePlan{{Kind: "sr", Model: "demo-sr", Steps: 5, Sampler: "ddim"}}}}
	if Done(dir, it) {
		t.Fatal("done before writing")
	}
	if err := Write(dir, "job", it, res, WriteOptions{Version: "test"}); err != nil {
		t.Fatal(err)
	}
	if !Done(dir, it) {
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
	if Done(dir, other) {
		t.Error("a different item counts as done")
	}
	os.WriteFile(it.Output, data[:len(data)/2], 0o644)
	if Done(dir, it) {
		t.Error("a truncated PNG counts as done")
	}
}

func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "a"), 0o755)
	me := sanitizeHost(hostname())
	// A process of this machine that has exited: its PID is a child's
	// that has been waited for.
	child := exec.Command("true")
	if err := child.Run(); err != nil {
		t.Fatal(err)
	}
	dead := child.Process.Pid
	files := map[string]bool{ // name -> removed
		".x.png.tmp-" + strconv.Itoa(dead) + "@" + me + "-123":         true,  // dead process here: at once
		".y.png.tmp-" + strconv.Itoa(os.Getppid()) + "@" + me + "-456": false, // live process here
		".z.png.tmp-" + strconv.Itoa(os.Getpid()) + "@" + me + "-789":  false, // this process
		".w.png.tmp-" + strconv.Itoa(dead) + "@elsewhere.example-1":    false, // another machine, young
		".v.png.tmp-42@elsewhere.example-2":                            true,  // another machine, old
		".u.png.tmp-314":                                               true,  // an older version's name, old
		".t.png.tmp-315":                                               false, // an older version's name, young
		"x.png":                                                        false, // not a temp file
	}
	old := time.Now().Add(-2 * StaleTempAge)
	for name := range files {
		p := filepath.Join(dir, "a", name)
		os.WriteFile(p, []byte("data"), 0o644)
		if strings.HasPrefix(name, ".v.") || strings.HasPrefix(name, ".u.") {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	n, err := RemoveStaleTemps(dir)
	if err != nil || n != 3 {
		t.Fatalf("removed %d, %v", n, err)
	}
	for name, removed := range files {
		_, err := os.Stat(filepath.Join(dir, "a", name))
		if gone := os.IsNotExist(err); gone != removed {
			t.Errorf("%s: removed %v, want %v", name, gone, removed)
		}
	}
	if n, err := RemoveStaleTemps(filepath.Join(dir, "missing")); err != nil || n != 0 {
		t.Errorf("missing dir: %d, %v", n, err)
	}
	// WriteFileAtomic's temp names carry this process as their owner.
	if pid, host, ok := tempOwnerOf(".a.png.tmp-" + tempOwner + "-99"); !ok || pid != os.Getpid() || host != me {
		t.Errorf("owner of our own temp name: %d %q %v", pid, host, ok)
	}
}

// Done reads the sidecar and PNG inside the root and as regular files only:
// a sidecar that is a link out of the root (here to /dev/zero, which would
// never end) makes the item not done, at once.
func TestDoneReadsOnlyRegularFilesInTheRoot(t *testing.T) {
	root := t.TempDir()
	it := pipeline.Item{Seed: 1, Width: 8, Height: 4, Class: -1, Output: filepath.Join(root, "x.png")}
	res := &pipeline.Result{Image: make([]float32, 3*4*8), Channels: 3, Width: 8, Height: 4}
	if err := Write(root, "job", it, res, WriteOptions{}); err != nil || !Done(root, it) {
		t.Fatalf("write: %v, done %v", err, Done(root, it))
	}
	os.Remove(SidecarPath(it.Output))
	if err := os.Symlink("/dev/zero", SidecarPath(it.Output)); err != nil {
		t.Skip(err)
	}
	done := make(chan bool)
	go func() { done <- Done(root, it) }()
	select {
	case d := <-done:
		if d {
			t.Fatal("done through a link to /dev/zero")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Done reads /dev/zero through a link")
	}
}

// TestRemoveStaleTempsOf removes a dead attempt's temp files of one item's
// PNG and sidecar, and nothing else in the directory.
func TestRemoveStaleTempsOf(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "batch")
	os.MkdirAll(dir, 0o755)
	child := exec.Command("true")
	if err := child.Run(); err != nil {
		t.Fatal(err)
	}
	dead := strconv.Itoa(child.Process.Pid) + "@" + tempHost
	files := map[string]bool{ // name -> removed
		".0001.png.tmp-" + dead + "-a1":                                        true,
		".0001.json.tmp-" + dead + "-a2":                                       true,
		".0001.png.tmp-" + strconv.Itoa(os.Getppid()) + "@" + tempHost + "-a3": false, // alive
		".0002.png.tmp-" + dead + "-a4":                                        false, // another item
		"0001.png":                                                             false,
	}
	for name := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	it := pipeline.Item{Output: filepath.Join(dir, "0001.png")}
	if n := RemoveStaleTempsOf(root, it); n != 2 {
		t.Errorf("removed %d, want 2", n)
	}
	for name, removed := range files {
		_, err := os.Stat(filepath.Join(dir, name))
		if gone := os.IsNotExist(err); gone != removed {
			t.Errorf("%s: removed %v, want %v", name, gone, removed)
		}
	}
	if n := RemoveStaleTempsOf(root, pipeline.Item{Output: filepath.Join(root, "..", "x.png")}); n != 0 {
		t.Errorf("an output outside the root: removed %d", n)
	}
}
