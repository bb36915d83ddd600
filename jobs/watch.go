package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Watcher takes job files dropped into one directory: a file is taken once
// it is complete (its size and modification time unchanged for Settle),
// loaded and enqueued, then moved to accepted/ beside NAME.ids.json (the
// queue job ids of its items). A file that does not load is moved to
// rejected/ beside NAME.error.txt, which says why. Dotfiles and temporary
// names (*.tmp, *.part, NAME~, .#NAME) are left alone.
//
// With Recursive, files in subdirectories at any depth are taken too (but
// never those under the watcher's own accepted/ and rejected/, nor under
// dot-directories), and a file keeps its path relative to the watched
// directory: a/b/job.yaml moves to accepted/a/b/job.yaml.
//
// Taking a file is idempotent: a file taken twice (after a crash between
// enqueueing and moving it, or dropped again) adds no item the queue
// already holds.
type Watcher struct {
	opts     WatchOptions
	accepted atomic.Int64
	rejected atomic.Int64
	rescans  atomic.Int64
	pending  map[string]fileState // by path relative to Dir
	fw       *fsnotify.Watcher    // while Run runs
	dirs     map[string]bool      // watched subdirectories (Recursive), relative to Dir
}

// WatchOptions configure a Watcher.
type WatchOptions struct {
	Dir string
	// Settle is how long a file must stay unchanged before it is taken
	// (0 = DefaultSettle).
	Settle time.Duration
	// Rescan is how often the directory is listed as a fallback for missed
	// events (0 = DefaultRescan).
	Rescan time.Duration
	// Recursive takes files in subdirectories too, at any depth, except
	// accepted/, rejected/ and dot-directories.
	Recursive bool
	// Load reads and checks a job file; its error rejects the file.
	Load func(path string) (*Job, error)
	// Enqueue inserts the job's items (Queue.Enqueue fits); its error (the
	// queue unreachable, say) leaves the file to be tried again at the next
	// rescan.
	Enqueue func(ctx context.Context, job *Job) ([]Enqueued, error)
	Logger  *slog.Logger
}

// Defaults for WatchOptions.
const (
	DefaultSettle = 2 * time.Second
	DefaultRescan = time.Minute
)

// Subdirectories of a watched directory.
const (
	AcceptedDir = "accepted"
	RejectedDir = "rejected"
)

// fileState is what the watcher last saw of a pending file.
type fileState struct {
	size  int64
	mtime time.Time
	since time.Time // when size and mtime were first seen as they are
}

// NewWatcher checks opts and creates the directory and its accepted/ and
// rejected/ subdirectories.
func NewWatcher(opts WatchOptions) (*Watcher, error) {
	if opts.Dir == "" {
		return nil, errors.New("watch: no directory")
	}
	if opts.Load == nil || opts.Enqueue == nil {
		return nil, errors.New("watch: Load and Enqueue are required")
	}
	if opts.Settle <= 0 {
		opts.Settle = DefaultSettle
	}
	if opts.Rescan <= 0 {
		opts.Rescan = DefaultRescan
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", opts.Dir, err)
	}
	opts.Dir = dir
	for _, d := range []string{dir, filepath.Join(dir, AcceptedDir), filepath.Join(dir, RejectedDir)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("watch %s: %w", opts.Dir, err)
		}
	}
	return &Watcher{opts: opts, pending: map[string]fileState{}, dirs: map[string]bool{}}, nil
}

// Dir is the watched directory, absolute.
func (w *Watcher) Dir() string { return w.opts.Dir }

// Accepted is how many files this watcher has taken.
func (w *Watcher) Accepted() int64 { return w.accepted.Load() }

// Rejected is how many files this watcher has moved to rejected/.
func (w *Watcher) Rejected() int64 { return w.rejected.Load() }

// Rescans is how many times the directory was listed.
func (w *Watcher) Rescans() int64 { return w.rescans.Load() }

// Ignored reports whether a file name is never taken: dotfiles (which
// include editor locks, .#NAME), and temporary names: *.tmp, *.part, NAME~.
func Ignored(name string) bool {
	return name == "" || strings.HasPrefix(name, ".") || strings.HasSuffix(name, "~") ||
		strings.HasSuffix(name, ".tmp") || strings.HasSuffix(name, ".part")
}

// Run watches until ctx ends. It lists the directory at start, after an
// event overflow and every Rescan.
func (w *Watcher) Run(ctx context.Context) error {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", w.opts.Dir, err)
	}
	defer fw.Close()
	if err := fw.Add(w.opts.Dir); err != nil {
		return fmt.Errorf("watch %s: %w", w.opts.Dir, err)
	}
	w.fw = fw
	defer func() { w.fw = nil; clear(w.dirs) }()
	w.rescan()
	tick := time.NewTicker(max(w.opts.Settle/4, 10*time.Millisecond))
	defer tick.Stop()
	rescan := time.NewTicker(w.opts.Rescan)
	defer rescan.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-fw.Events:
			if !ok {
				return nil
			}
			w.event(ev)
		case err, ok := <-fw.Errors:
			if !ok {
				return nil
			}
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				w.opts.Logger.Warn("watch: events overflowed; listing the directory", "dir", w.opts.Dir)
				w.rescan()
			} else {
				w.opts.Logger.Warn("watch", "dir", w.opts.Dir, "err", err)
			}
		case <-rescan.C:
			w.rescan()
		case now := <-tick.C:
			w.settle(ctx, now)
		}
	}
}

// event notes a change to one file of the directory (or, with Recursive,
// of its tree).
func (w *Watcher) event(ev fsnotify.Event) {
	rel, ok := w.rel(ev.Name)
	if !ok {
		return
	}
	if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
		delete(w.pending, rel)
		if w.dirs[rel] {
			w.forgetDir(rel)
		}
		return
	}
	if w.opts.Recursive && ev.Has(fsnotify.Create) {
		if st, err := os.Lstat(ev.Name); err == nil && st.IsDir() {
			// A new subdirectory (made here or renamed in): watch it and
			// note what it holds already, written before its watch began.
			if !w.skipDir(rel) {
				w.walk(rel, time.Now(), nil)
			}
			return
		}
	}
	w.observe(rel, time.Now())
}

// rel is the path of a file of the watched tree relative to Dir; ok is
// false for paths outside it (or, without Recursive, not directly in it).
func (w *Watcher) rel(path string) (string, bool) {
	if !w.opts.Recursive {
		if filepath.Dir(path) != w.opts.Dir {
			return "", false
		}
		return filepath.Base(path), true
	}
	rel, err := filepath.Rel(w.opts.Dir, path)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return "", false
	}
	if d := filepath.Dir(rel); d != "." && w.skipDir(d) {
		return "", false
	}
	return rel, true
}

// skipDir reports whether a subdirectory (relative to Dir) is never
// descended into: accepted/, rejected/ and dot-directories, or one under
// them.
func (w *Watcher) skipDir(rel string) bool {
	parts := strings.Split(rel, string(filepath.Separator))
	if parts[0] == AcceptedDir || parts[0] == RejectedDir {
		return true
	}
	for _, p := range parts {
		if strings.HasPrefix(p, ".") {
			return true
		}
	}
	return false
}

// forgetDir drops the watches and pending files of a subdirectory that was
// removed or renamed away (nothing when rel is not a watched directory).
func (w *Watcher) forgetDir(rel string) {
	prefix := rel + string(filepath.Separator)
	for d := range w.dirs {
		if d == rel || strings.HasPrefix(d, prefix) {
			if w.fw != nil {
				w.fw.Remove(filepath.Join(w.opts.Dir, d)) // gone already, mostly
			}
			delete(w.dirs, d)
		}
	}
	for name := range w.pending {
		if strings.HasPrefix(name, prefix) {
			delete(w.pending, name)
		}
	}
}

// rescan lists the directory (with Recursive, its tree) and notes every
// file in it.
func (w *Watcher) rescan() {
	w.rescans.Add(1)
	now := time.Now()
	var present map[string]bool
	if w.opts.Recursive {
		present = map[string]bool{}
		seenDirs := map[string]bool{}
		if err := w.walk(".", now, func(rel string, dir bool) {
			if dir {
				seenDirs[rel] = true
			} else {
				present[rel] = true
			}
		}); err != nil {
			w.opts.Logger.Warn("watch: list directory", "dir", w.opts.Dir, "err", err)
			return
		}
		for d := range w.dirs {
			if !seenDirs[d] {
				w.forgetDir(d)
			}
		}
	} else {
		entries, err := os.ReadDir(w.opts.Dir)
		if err != nil {
			w.opts.Logger.Warn("watch: list directory", "dir", w.opts.Dir, "err", err)
			return
		}
		present = make(map[string]bool, len(entries))
		for _, e := range entries {
			present[e.Name()] = true
			w.observe(e.Name(), now)
		}
	}
	for name := range w.pending {
		if !present[name] {
			delete(w.pending, name)
		}
	}
}

// walk notes every file under the subdirectory start (relative to Dir, "."
// for Dir itself) and watches every subdirectory not skipped; seen, when
// not nil, is told each file and subdirectory found. Subdirectories that
// cannot be listed or watched are logged and passed over.
func (w *Watcher) walk(start string, now time.Time, seen func(rel string, dir bool)) error {
	return filepath.WalkDir(filepath.Join(w.opts.Dir, start), func(path string, d fs.DirEntry, err error) error {
		rel, rerr := filepath.Rel(w.opts.Dir, path)
		if rerr != nil {
			return nil
		}
		if err != nil {
			if rel == start {
				return err
			}
			w.opts.Logger.Warn("watch: list directory", "dir", path, "err", err)
			return nil
		}
		if rel == "." {
			return nil
		}
		if d.IsDir() {
			if w.skipDir(rel) {
				return filepath.SkipDir
			}
			if seen != nil {
				seen(rel, true)
			}
			if !w.dirs[rel] && w.fw != nil {
				if err := w.fw.Add(path); err != nil {
					w.opts.Logger.Warn("watch: watch subdirectory", "dir", path, "err", err)
				} else {
					w.dirs[rel] = true
				}
			}
			return nil
		}
		if seen != nil {
			seen(rel, false)
		}
		w.observe(rel, now)
		return nil
	})
}

// observe records a file's size and modification time; a change restarts
// its settle period. name is relative to Dir.
func (w *Watcher) observe(name string, now time.Time) {
	if Ignored(filepath.Base(name)) {
		return
	}
	st, err := os.Lstat(filepath.Join(w.opts.Dir, name))
	if err != nil || !st.Mode().IsRegular() {
		delete(w.pending, name)
		return
	}
	w.pending[name] = w.pending[name].seen(st.Size(), st.ModTime(), now)
}

// seen is the settle rule: the state after seeing a file of size and mtime
// at now. A change of either restarts the settle period.
func (prev fileState) seen(size int64, mtime, now time.Time) fileState {
	if !prev.since.IsZero() && prev.size == size && prev.mtime.Equal(mtime) {
		return prev
	}
	return fileState{size: size, mtime: mtime, since: now}
}

// settled reports whether a file seen as s has been unchanged for settle.
func (s fileState) settled(now time.Time, settle time.Duration) bool {
	return !s.since.IsZero() && now.Sub(s.since) >= settle
}

// settle takes every pending file that has stayed unchanged for Settle.
func (w *Watcher) settle(ctx context.Context, now time.Time) {
	for name := range w.pending {
		if ctx.Err() != nil {
			return
		}
		w.observe(name, now) // catches writes whose events were missed
		s, ok := w.pending[name]
		if !ok || !s.settled(now, w.opts.Settle) {
			continue
		}
		if w.take(ctx, name) {
			delete(w.pending, name)
		}
	}
}

// take loads and enqueues one file and moves it aside. It reports whether
// the file is done with (false: try again later).
func (w *Watcher) take(ctx context.Context, name string) bool {
	path := filepath.Join(w.opts.Dir, name)
	log := w.opts.Logger.With("dir", w.opts.Dir, "file", name)
	reject := func(err error) bool {
		if _, serr := os.Stat(path); errors.Is(serr, os.ErrNotExist) {
			return true // gone meanwhile
		}
		if err := w.moveAside(name, RejectedDir, ".error.txt", []byte(err.Error()+"\n")); err != nil {
			log.Error("watch: move rejected file", "err", err)
			return false
		}
		w.rejected.Add(1)
		log.Warn("watch: rejected job file", "reason", err)
		return true
	}
	job, err := w.opts.Load(path)
	if err != nil {
		return reject(err)
	}
	res, err := w.opts.Enqueue(ctx, job)
	var verr *ValidationError
	if errors.As(err, &verr) {
		return reject(err) // the file's fault: trying again cannot help
	}
	if err != nil {
		log.Error("watch: enqueue; will try again", "err", err)
		return false
	}
	ids := IDs(res)
	rec, _ := json.MarshalIndent(acceptRecord{Job: job.Name, IDs: ids, At: time.Now().UTC()}, "", "  ")
	if err := w.moveAside(name, AcceptedDir, ".ids.json", append(rec, '\n')); err != nil {
		log.Error("watch: move accepted file", "err", err)
		return false
	}
	w.accepted.Add(1)
	log.Info("watch: accepted job file", "job", job.Name, "items", len(ids))
	return true
}

// acceptRecord is NAME.ids.json beside an accepted file.
type acceptRecord struct {
	Job string    `json:"job"`
	IDs []int64   `json:"ids"`
	At  time.Time `json:"accepted_at"`
}

// moveAside writes the note NAME+suffix into sub/ and then renames the file
// there, under a name not yet taken (NAME, NAME.1, ...). A file of a
// subdirectory (rel a/b/NAME) goes to sub/a/b/.
func (w *Watcher) moveAside(rel, sub, suffix string, note []byte) error {
	dir := filepath.Join(w.opts.Dir, sub, filepath.Dir(rel))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := filepath.Base(rel)
	target := name
	for i := 1; ; i++ {
		_, err1 := os.Lstat(filepath.Join(dir, target))
		_, err2 := os.Lstat(filepath.Join(dir, target+suffix))
		if errors.Is(err1, os.ErrNotExist) && errors.Is(err2, os.ErrNotExist) {
			break
		}
		target = fmt.Sprintf("%s.%d", name, i)
	}
	if err := WriteFileAtomic(filepath.Join(dir, target+suffix), note); err != nil {
		return err
	}
	return os.Rename(filepath.Join(w.opts.Dir, rel), filepath.Join(dir, target))
}
