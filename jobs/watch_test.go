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
	b := &watchBundle{dir: t.TempDir(), loaded: map[string]string{}}
	w, err := NewWatcher(WatchOptions{
		Dir: b.dir, Settle: 200 * time.Millisecond, Rescan: time.Hour,
		Load: func(path string) (*Job, error) {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, err
			}
			b.mu.Lock()
			b.loaded[filepath.Base(path)] = string(data)
			b.mu.Unlock()
			if !strings.HasSuffix(string(data), "END") {
				return nil, errors.New("items: no END")
			}
			return &Job{Name: strings.TrimSuffix(filepath.Base(path), ".yaml")}, nil
		},
		Enqueue: func(ctx context.Context, job *Job) ([]int64, error) { return []int64{int64(len(job.Name))}, nil },
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
		Enqueue: func(ctx context.Context, job *Job) ([]int64, error) {
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
