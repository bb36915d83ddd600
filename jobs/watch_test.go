package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestIgnored(t *testing.T) {
	for name, want := range map[string]bool{
		"job.yaml": false, "a.json": false, "x.toml": false, "job.yaml.txt": false,
		".hidden.yaml": true, ".#job.yaml": true, "job.yaml~": true, "job.yaml.tmp": true,
		"job.yaml.part": true, "": true,
	} {
		if got := Ignored(name); got != want {
			t.Errorf("Ignored(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestSettleRule(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m1, m2 := t0.Add(-time.Second), t0
	const settle = 200 * time.Millisecond
	var s fileState
	if s.settled(t0.Add(time.Hour), settle) {
		t.Fatal("an unseen file is settled")
	}
	s = s.seen(10, m1, t0)
	if s.settled(t0.Add(settle-time.Millisecond), settle) || !s.settled(t0.Add(settle), settle) {
		t.Fatal("settle period not measured from the first sight")
	}
	s = s.seen(10, m1, t0.Add(150*time.Millisecond)) // unchanged: the period goes on
	if !s.settled(t0.Add(settle), settle) {
		t.Fatal("an unchanged file restarted its period")
	}
	s = s.seen(20, m1, t0.Add(300*time.Millisecond)) // grew
	if s.settled(t0.Add(400*time.Millisecond), settle) || !s.settled(t0.Add(500*time.Millisecond), settle) {
		t.Fatal("a size change did not restart the period")
	}
	s = s.seen(20, m2, t0.Add(600*time.Millisecond)) // rewritten, same size
	if s.settled(t0.Add(700*time.Millisecond), settle) {
		t.Fatal("an mtime change did not restart the period")
	}
}

// watchBundle is a running Watcher whose Load accepts files whose content
// ends in "END" and rejects others, recording what it loaded.
type watchBundle struct {
	dir    string
	w      *Watcher
	mu     sync.Mutex
	loaded map[string]string // name -> content when loaded
	stop   func()
}

func setupWatch(t *testing.T) *watchBundle {
	t.Helper()
	return setupWatchOpts(t, t.TempDir(), WatchOptions{Settle: 200 * time.Millisecond, Rescan: time.Hour})
}

// setupWatchOpts is setupWatch on dir (which may hold files already) with
// opts' Settle, Rescan and Recursive; loaded is keyed by the path relative
// to dir.
func setupWatchOpts(t *testing.T, dir string, opts WatchOptions) *watchBundle {
	t.Helper()
	b := &watchBundle{dir: dir, loaded: map[string]string{}}
	w, err := NewWatcher(WatchOptions{
		Dir: b.dir, Settle: opts.Settle, Rescan: opts.Rescan, Recursive: opts.Recursive,
		Load: func(path string) (*Job, error) {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, err
			}
			rel, _ := filepath.Rel(b.dir, path)
			b.mu.Lock()
			b.loaded[filepath.ToSlash(rel)] = string(data)
			b.mu.Unlock()
			if !strings.HasSuffix(string(data), "END") {
				return nil, errors.New("items: no END")
			}
			return &Job{Name: strings.TrimSuffix(filepath.Base(path), ".yaml")}, nil
		},
		Enqueue: func(ctx context.Context, job *Job) ([]Enqueued, error) {
			return []Enqueued{{ID: int64(len(job.Name))}}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	b.w = w
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	b.stop = func() { cancel(); <-done }
	t.Cleanup(b.stop)
	return b
}

func TestWatcherTakesOnlyCompleteFiles(t *testing.T) {
	b := setupWatch(t)
	// Written slowly: each piece comes before the settle period ends.
	slow := filepath.Join(b.dir, "slow.yaml")
	f, err := os.Create(slow)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		f.WriteString("piece ")
		time.Sleep(60 * time.Millisecond)
	}
	f.WriteString("END")
	f.Close()
	// Renamed in, and temp or hidden names that are never taken.
	os.WriteFile(filepath.Join(b.dir, "moved.yaml.part"), []byte("x END"), 0o644)
	os.Rename(filepath.Join(b.dir, "moved.yaml.part"), filepath.Join(b.dir, "moved.yaml"))
	for _, n := range []string{"a.tmp", ".hidden", ".#lock", "b~", "c.part"} {
		os.WriteFile(filepath.Join(b.dir, n), []byte("END"), 0o644)
	}
	os.WriteFile(filepath.Join(b.dir, "bad.yaml"), []byte("garbage"), 0o644)

	deadline := time.Now().Add(5 * time.Second)
	for b.w.Accepted() < 2 || b.w.Rejected() < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("accepted %d, rejected %d", b.w.Accepted(), b.w.Rejected())
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.stop()
	b.mu.Lock()
	defer b.mu.Unlock()
	if got := b.loaded["slow.yaml"]; !strings.HasSuffix(got, "END") {
		t.Errorf("slow file loaded before it was complete: %q", got)
	}
	if len(b.loaded) != 3 {
		t.Errorf("loaded %v, want slow.yaml, moved.yaml, bad.yaml", b.loaded)
	}
	for _, n := range []string{"slow.yaml", "moved.yaml"} {
		var rec acceptRecord
		data, err := os.ReadFile(filepath.Join(b.dir, AcceptedDir, n+".ids.json"))
		if err != nil || json.Unmarshal(data, &rec) != nil || len(rec.IDs) != 1 {
			t.Errorf("%s: ids record %q, %v", n, data, err)
		}
		if _, err := os.Stat(filepath.Join(b.dir, AcceptedDir, n)); err != nil {
			t.Error(err)
		}
	}
	reason, err := os.ReadFile(filepath.Join(b.dir, RejectedDir, "bad.yaml.error.txt"))
	if err != nil || !strings.Contains(string(reason), "no END") {
		t.Errorf("rejection reason %q, %v", reason, err)
	}
	for _, n := range []string{"a.tmp", ".hidden", ".#lock", "b~", "c.part"} {
		if _, err := os.Stat(filepath.Join(b.dir, n)); err != nil {
			t.Errorf("ignored file %s was moved: %v", n, err)
		}
	}
}

func TestWatcherSameNameTwiceAndStartupScan(t *testing.T) {
	dir := t.TempDir()
	// Present before the watcher starts: found by the first scan.
	os.WriteFile(filepath.Join(dir, "early.yaml"), []byte("END"), 0o644)
	os.MkdirAll(filepath.Join(dir, AcceptedDir), 0o755)
	os.WriteFile(filepath.Join(dir, AcceptedDir, "early.yaml"), []byte("older END"), 0o644)
	var enq []string
	var mu sync.Mutex
	w, err := NewWatcher(WatchOptions{
		Dir: dir, Settle: 50 * time.Millisecond, Rescan: time.Hour,
		Load: func(path string) (*Job, error) { return &Job{Name: filepath.Base(path)}, nil },
		Enqueue: func(ctx context.Context, job *Job) ([]Enqueued, error) {
			mu.Lock()
			enq = append(enq, job.Name)
			mu.Unlock()
			return nil, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	deadline := time.Now().Add(3 * time.Second)
	for w.Accepted() < 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if w.Accepted() != 1 || len(enq) != 1 || enq[0] != "early.yaml" {
		t.Fatalf("accepted %d, enqueued %v", w.Accepted(), enq)
	}
	// The earlier file of the same name is kept; the new one goes beside it.
	if data, _ := os.ReadFile(filepath.Join(dir, AcceptedDir, "early.yaml")); string(data) != "older END" {
		t.Errorf("earlier accepted file overwritten: %q", data)
	}
	if _, err := os.Stat(filepath.Join(dir, AcceptedDir, "early.yaml.1")); err != nil {
		t.Error(err)
	}
}

// waitWatch waits until w has accepted and rejected at least the given
// numbers of files.
func waitWatch(t *testing.T, w *Watcher, accepted, rejected int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for w.Accepted() < accepted || w.Rejected() < rejected {
		if time.Now().After(deadline) {
			t.Fatalf("accepted %d, rejected %d; want %d, %d", w.Accepted(), w.Rejected(), accepted, rejected)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// mustExist fails unless each path (relative to dir, slash-separated)
// exists, or, with exist false, each is absent.
func mustExist(t *testing.T, dir string, exist bool, paths ...string) {
	t.Helper()
	for _, p := range paths {
		_, err := os.Stat(filepath.Join(dir, filepath.FromSlash(p)))
		if exist && err != nil {
			t.Errorf("%s: %v", p, err)
		} else if !exist && err == nil {
			t.Errorf("%s exists", p)
		}
	}
}

// TestWatcherRecursiveNewSubdirectories: with Recursive, files in nested
// subdirectories made after the watcher started (and in a tree renamed in)
// are taken and moved under accepted/ and rejected/ with their relative
// paths, so equal names in different subdirectories do not collide.
// Dot-directories and temp names are left alone.
func TestWatcherRecursiveNewSubdirectories(t *testing.T) {
	b := setupWatchOpts(t, t.TempDir(), WatchOptions{Settle: 100 * time.Millisecond, Rescan: time.Hour, Recursive: true})
	write := func(rel, body string) {
		p := filepath.Join(b.dir, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond) // the watcher is running
	write("job.yaml", "root END")
	write("a/b/c/job.yaml", "deep END") // three new directories at once
	write("a/b/c/job.yaml.tmp", "END")
	write("a/bad.yaml", "garbage")
	write(".git/objects/x.yaml", "END")
	// Written slowly inside a new subdirectory.
	if err := os.MkdirAll(filepath.Join(b.dir, "slow"), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(b.dir, "slow", "job.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		f.WriteString("piece ")
		time.Sleep(40 * time.Millisecond)
	}
	f.WriteString("END")
	f.Close()
	// A tree made elsewhere and renamed in whole.
	elsewhere := t.TempDir()
	os.MkdirAll(filepath.Join(elsewhere, "t", "u"), 0o755)
	os.WriteFile(filepath.Join(elsewhere, "t", "u", "job.yaml"), []byte("moved END"), 0o644)
	if err := os.Rename(filepath.Join(elsewhere, "t"), filepath.Join(b.dir, "t")); err != nil {
		t.Fatal(err)
	}

	waitWatch(t, b.w, 4, 1)
	time.Sleep(300 * time.Millisecond) // nothing more is taken
	b.stop()
	if b.w.Accepted() != 4 || b.w.Rejected() != 1 {
		t.Errorf("accepted %d, rejected %d; want 4, 1", b.w.Accepted(), b.w.Rejected())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	want := map[string]string{"job.yaml": "root END", "a/b/c/job.yaml": "deep END", "a/bad.yaml": "garbage",
		"slow/job.yaml": "piece piece piece piece END", "t/u/job.yaml": "moved END"}
	if len(b.loaded) != len(want) {
		t.Errorf("loaded %v, want %v", b.loaded, want)
	}
	for rel, body := range want {
		if b.loaded[rel] != body {
			t.Errorf("%s loaded as %q, want %q", rel, b.loaded[rel], body)
		}
	}
	mustExist(t, b.dir, true,
		"accepted/job.yaml", "accepted/job.yaml.ids.json",
		"accepted/a/b/c/job.yaml", "accepted/a/b/c/job.yaml.ids.json",
		"accepted/slow/job.yaml", "accepted/t/u/job.yaml.ids.json",
		"rejected/a/bad.yaml", "rejected/a/bad.yaml.error.txt",
		"a/b/c/job.yaml.tmp", ".git/objects/x.yaml")
	mustExist(t, b.dir, false, "job.yaml", "a/b/c/job.yaml", "a/bad.yaml", "slow/job.yaml", "t/u/job.yaml",
		"accepted/job.yaml.1", "accepted/a/b/c/job.yaml.1")
	if data, _ := os.ReadFile(filepath.Join(b.dir, "accepted", "a", "b", "c", "job.yaml")); string(data) != "deep END" {
		t.Errorf("accepted/a/b/c/job.yaml = %q", data)
	}

}

// TestWatcherRecursiveRenamedSubdirectory: a watched subdirectory renamed
// within the tree is watched under its new name.
func TestWatcherRecursiveRenamedSubdirectory(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "a", "b"), 0o755)
	b := setupWatchOpts(t, dir, WatchOptions{Settle: 50 * time.Millisecond, Rescan: time.Hour, Recursive: true})
	time.Sleep(50 * time.Millisecond)
	if err := os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "z")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	os.WriteFile(filepath.Join(dir, "z", "b", "job.yaml"), []byte("END"), 0o644)
	waitWatch(t, b.w, 1, 0)
	b.stop()
	mustExist(t, dir, true, "accepted/z/b/job.yaml", "accepted/z/b/job.yaml.ids.json")
	mustExist(t, dir, false, "accepted/a", "z/b/job.yaml")
}

// TestWatcherRecursiveSkipsOwnDirectories: with Recursive, neither the
// first scan, nor the rescans, nor events look into accepted/ or rejected/
// (at any depth) or dot-directories.
func TestWatcherRecursiveSkipsOwnDirectories(t *testing.T) {
	dir := t.TempDir()
	for _, rel := range []string{"accepted/old.yaml", "accepted/sub/old.yaml", "rejected/bad.yaml",
		"rejected/sub/deep/bad.yaml", ".cache/x.yaml", "sub/.hidden/x.yaml", "sub/ok.yaml"} {
		p := filepath.Join(dir, filepath.FromSlash(rel))
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte("END"), 0o644)
	}
	b := setupWatchOpts(t, dir, WatchOptions{Settle: 50 * time.Millisecond, Rescan: 30 * time.Millisecond, Recursive: true})
	waitWatch(t, b.w, 1, 0)
	// Dropped into accepted/ and rejected/ while the watcher runs.
	os.MkdirAll(filepath.Join(dir, "accepted", "new"), 0o755)
	os.WriteFile(filepath.Join(dir, "accepted", "new", "x.yaml"), []byte("END"), 0o644)
	os.WriteFile(filepath.Join(dir, "rejected", "y.yaml"), []byte("END"), 0o644)
	for start := b.w.Rescans(); b.w.Rescans() < start+5; {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	b.stop()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.loaded) != 1 || b.loaded["sub/ok.yaml"] != "END" {
		t.Errorf("loaded %v, want only sub/ok.yaml", b.loaded)
	}
	if b.w.Accepted() != 1 || b.w.Rejected() != 0 {
		t.Errorf("accepted %d, rejected %d; want 1, 0", b.w.Accepted(), b.w.Rejected())
	}
	mustExist(t, dir, true, "accepted/old.yaml", "accepted/sub/old.yaml", "rejected/bad.yaml",
		"rejected/sub/deep/bad.yaml", ".cache/x.yaml", "sub/.hidden/x.yaml", "accepted/sub/ok.yaml",
		"accepted/new/x.yaml", "rejected/y.yaml")
	mustExist(t, dir, false, "accepted/old.yaml.ids.json", "accepted/accepted", "rejected/accepted",
		"accepted/sub/old.yaml.ids.json", "rejected/rejected")
}

// TestWatcherNotRecursiveIgnoresSubdirectories: without Recursive, files
// in subdirectories are never taken, whether there at start or made later.
func TestWatcherNotRecursiveIgnoresSubdirectories(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "early.yaml"), []byte("END"), 0o644)
	b := setupWatchOpts(t, dir, WatchOptions{Settle: 50 * time.Millisecond, Rescan: 30 * time.Millisecond})
	os.MkdirAll(filepath.Join(dir, "new", "deeper"), 0o755)
	os.WriteFile(filepath.Join(dir, "new", "late.yaml"), []byte("END"), 0o644)
	os.WriteFile(filepath.Join(dir, "new", "deeper", "late.yaml"), []byte("END"), 0o644)
	os.WriteFile(filepath.Join(dir, "top.yaml"), []byte("END"), 0o644)
	waitWatch(t, b.w, 1, 0)
	for start := b.w.Rescans(); b.w.Rescans() < start+5; {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	b.stop()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.loaded) != 1 || b.loaded["top.yaml"] != "END" || b.w.Accepted() != 1 || b.w.Rejected() != 0 {
		t.Errorf("loaded %v, accepted %d, rejected %d; want only top.yaml", b.loaded, b.w.Accepted(), b.w.Rejected())
	}
	mustExist(t, dir, true, "sub/early.yaml", "new/late.yaml", "new/deeper/late.yaml", "accepted/top.yaml")
	mustExist(t, dir, false, "accepted/sub", "accepted/new", "rejected/sub", "rejected/new")
}
