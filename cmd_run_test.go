package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image/png"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tessera/config"
	"tessera/jobs"
)

// runEnv is a working directory for queue tests: a config with the oracle
// test models, an output root and a queue of its own.
type runEnv struct {
	dir, cfg, out, queue string
}

func newRunEnv(t *testing.T, queueURL string) runEnv {
	t.Helper()
	dir := t.TempDir()
	models, err := filepath.Abs(filepath.Join("testdata", "models"))
	if err != nil {
		t.Fatal(err)
	}
	lib, err := filepath.Abs(filepath.Join(".ort", "libonnxruntime.so.1"))
	if err != nil {
		t.Fatal(err)
	}
	e := runEnv{dir: dir, cfg: filepath.Join(dir, "tessera.yaml"), out: filepath.Join(dir, "out"), queue: queueURL}
	if e.queue == "" {
		e.queue = "sqlite://" + filepath.Join(dir, "queue.db")
	}
	cfg := fmt.Sprintf("models: {dirs: [%q]}\noutput: {root: %q}\nqueue: {url: %q}\nruntime: {threads: 1, library: %q}\nlog: {level: warn}\n", models, e.out, e.queue, lib)
	if err := os.WriteFile(e.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

// jobFile writes a job file of n 128x128 items made with the oracle models.
func (e runEnv) jobFile(t *testing.T, name string, n, steps int) string {
	t.Helper()
	path := filepath.Join(e.dir, name+".yaml")
	body := fmt.Sprintf(`version: 1
defaults:
  width: 128
  height: 128
  base: {model: oracle-base, steps: %d}
  sr: {model: oracle-sr, steps: %d, tile: {size: 48, overlap: 8}}
items:
  - {count: %d, seed: 1}
`, steps, steps, n)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func (e runEnv) command(args ...string) *exec.Cmd {
	cmd := exec.Command(tesseraBin, append([]string{"--config", e.cfg}, args...)...)
	cmd.Dir = e.dir
	return cmd
}

func (e runEnv) tessera(t *testing.T, args ...string) result {
	t.Helper()
	return tessera(t, nil, append([]string{"--config", e.cfg}, args...)...)
}

// checkOutputs checks that every item of the job file is done exactly
// once: its PNG decodes at the right size and matches its sidecar, and the
// output tree holds nothing else (no temp file).
func (e runEnv) checkOutputs(t *testing.T, jobPath string) {
	t.Helper()
	cfg, err := config.Load(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	job, err := jobs.Load(jobPath, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, it := range job.Items {
		want[it.Output] = true
		want[jobs.SidecarPath(it.Output)] = true
		f, err := os.Open(it.Output)
		if err != nil {
			t.Errorf("item %d: %v", it.Index, err)
			continue
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil {
			t.Errorf("item %d: %s does not decode: %v", it.Index, it.Output, err)
			continue
		}
		if b := img.Bounds(); b.Dx() != it.Width || b.Dy() != it.Height {
			t.Errorf("item %d: %dx%d, want %dx%d", it.Index, b.Dx(), b.Dy(), it.Width, it.Height)
		}
		if !jobs.Done(job.Root, it) {
			t.Errorf("item %d: PNG and sidecar disagree", it.Index)
		}
	}
	var extra []string
	filepath.WalkDir(e.out, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !want[p] {
			extra = append(extra, p)
		}
		return nil
	})
	sort.Strings(extra)
	if len(extra) > 0 {
		t.Errorf("unexpected files under the output root: %v", extra)
	}
}

func (e runEnv) status(t *testing.T) queueStatus {
	t.Helper()
	r := e.tessera(t, "status", "--json")
	if r.code != 0 {
		t.Fatalf("status: %+v", r)
	}
	var st queueStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, r.stdout)
	}
	return st
}

// TestRunCrashResume kills tessera run with SIGKILL at random moments,
// restarting it each time, and checks that the batch ends with every image
// made exactly once and no temp file left.
func TestRunCrashResume(t *testing.T) {
	const items, minKills = 40, 12
	e := newRunEnv(t, "")
	job := e.jobFile(t, "crash", items, 40)
	seed := time.Now().UnixNano()
	t.Logf("random seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 1))
	start := time.Now()
	kills, finished := 0, false
	for attempt := 0; kills < minKills || !finished; attempt++ {
		if attempt > 60 {
			t.Fatalf("after %d starts and %d kills the batch has not finished", attempt, kills)
		}
		cmd := e.command("run", "--workers", "2", "--reap-every", "100ms", job)
		var out, errb bytes.Buffer
		started := make(chan struct{})
		cmd.Stdout = &out
		cmd.Stderr = &lineWatcher{w: &errb, want: []byte(": started"), seen: started}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		// Kill until minKills, one time in four during start-up and
		// otherwise while items are being made; then let one run finish.
		var timer <-chan time.Time
		if kills < minKills {
			if rng.IntN(4) == 0 {
				timer = time.After(time.Duration(rng.IntN(300)) * time.Millisecond)
			} else {
				delay := time.Duration(rng.IntN(400)) * time.Millisecond
				c := make(chan time.Time, 1)
				timer = c
				go func() {
					select {
					case <-started:
						time.Sleep(delay)
						c <- time.Now()
					case <-time.After(10 * time.Second):
					}
				}()
			}
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("run exited with %v:\n%s%s", err, out.String(), errb.String())
			}
			if !strings.Contains(out.String(), "images made") {
				t.Fatalf("run printed no summary:\n%s", out.String())
			}
			finished = true
			if kills < minKills {
				// The batch ended before enough kills: make it again.
				os.RemoveAll(e.out)
				t.Logf("batch finished after %d kills; removed the outputs to go on", kills)
				finished = false
			}
		case <-timer:
			cmd.Process.Signal(syscall.SIGKILL)
			<-done
			kills++
			pngs, _ := filepath.Glob(filepath.Join(e.out, "crash", "*.png"))
			temps, _ := filepath.Glob(filepath.Join(e.out, "crash", ".*.tmp-*"))
			t.Logf("kill %d: %d images, %d temp files", kills, len(pngs), len(temps))
		}
	}
	t.Logf("%d items, %d kills, %s", items, kills, time.Since(start).Round(time.Millisecond))
	e.checkOutputs(t, job)
	st := e.status(t)
	if st.Counts["completed"] != items || st.Counts["running"] != 0 || st.Counts["available"] != 0 {
		t.Errorf("queue counts after the batch: %v", st.Counts)
	}
	// Running it again does no work and says so.
	r := e.tessera(t, "run", job)
	if r.code != 0 || !strings.Contains(r.stdout, "nothing to do") || !strings.Contains(r.stdout, fmt.Sprintf("0 images made, %d already done", items)) {
		t.Fatalf("rerun: %+v", r)
	}
}

// lineWatcher copies to w and closes seen the first time want appears.
type lineWatcher struct {
	mu   sync.Mutex
	w    *bytes.Buffer
	want []byte
	seen chan struct{}
	done bool
}

func (l *lineWatcher) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.w.Write(p)
	if !l.done && bytes.Contains(l.w.Bytes(), l.want) {
		l.done = true
		close(l.seen)
	}
	return len(p), nil
}

// startRun starts tessera run in the background; its stderr is watched for
// the first item started.
type bgRun struct {
	cmd     *exec.Cmd
	out     bytes.Buffer
	errw    *lineWatcher
	started chan struct{}
	done    chan error
}

func (e runEnv) startRun(t *testing.T, args ...string) *bgRun {
	t.Helper()
	b := &bgRun{started: make(chan struct{}), done: make(chan error, 1)}
	b.cmd = e.command(append([]string{"run"}, args...)...)
	b.errw = &lineWatcher{w: &bytes.Buffer{}, want: []byte(": started"), seen: b.started}
	b.cmd.Stdout, b.cmd.Stderr = &b.out, b.errw
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { b.done <- b.cmd.Wait() }()
	t.Cleanup(func() {
		b.cmd.Process.Kill()
		<-b.done
		b.done <- nil
	})
	return b
}

func (b *bgRun) stderr() string {
	b.errw.mu.Lock()
	defer b.errw.mu.Unlock()
	return b.errw.w.String()
}

// wait waits for the run to exit and returns its exit code.
func (b *bgRun) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case err := <-b.done:
		b.done <- err
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(timeout):
		t.Fatalf("run did not exit within %s:\n%s%s", timeout, b.out.String(), b.stderr())
	}
	return -1
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRunGracefulStop interrupts a run: it finishes its running item (or,
// past the grace period, puts it back), exits 0, says how many items remain
// queued, and the next run finishes the batch.
func TestRunGracefulStop(t *testing.T) {
	for _, tc := range []struct {
		name  string
		grace string
	}{{"finish", "30s"}, {"release", "1ms"}} {
		t.Run(tc.name, func(t *testing.T) {
			const items = 10
			e := newRunEnv(t, "")
			job := e.jobFile(t, "stop", items, 60)
			r := e.startRun(t, "--grace", tc.grace, job)
			<-r.started
			time.Sleep(50 * time.Millisecond)
			r.cmd.Process.Signal(os.Interrupt)
			if code := r.wait(t, 30*time.Second); code != 0 {
				t.Fatalf("exit %d after SIGINT:\n%s%s", code, r.out.String(), r.stderr())
			}
			if !strings.Contains(r.out.String(), "remain queued") || !strings.Contains(r.stderr(), "stopping") {
				t.Fatalf("no remaining count:\n%s%s", r.out.String(), r.stderr())
			}
			st := e.status(t)
			if st.Counts["running"] != 0 || st.Counts["retryable"] != 0 || st.Counts["available"] == 0 ||
				st.Counts["available"]+st.Counts["completed"] != items {
				t.Fatalf("after the stop: %v", st.Counts)
			}
			if tc.name == "release" && st.Counts["completed"] != 0 {
				t.Logf("an item finished before the interrupt: %v", st.Counts)
			}
			// An item put back by the stop is said to be requeued, not failed.
			if out := r.out.String() + r.stderr(); strings.Contains(out, "FAILED") || tc.name == "release" && !strings.Contains(out, "stopped, requeued") {
				t.Errorf("a requeued item reported as failed, or not at all:\n%s", out)
			}
			res := e.tessera(t, "run", "-q", job)
			if res.code != 0 || !strings.Contains(res.stdout, fmt.Sprintf("%d images made, %d already done", st.Counts["available"], st.Counts["completed"])) {
				t.Fatalf("resume: %+v", res)
			}
			e.checkOutputs(t, job)
		})
	}
}

// TestSubmitStatusRetryCancel drives the queue commands.
func TestSubmitStatusRetryCancel(t *testing.T) {
	e := newRunEnv(t, "")
	job := e.jobFile(t, "q", 3, 4)
	r := e.tessera(t, "submit", job)
	if r.code != 0 || !strings.Contains(r.stdout, "3 item(s) added, 0 already queued, 0 already done") {
		t.Fatalf("submit: %+v", r)
	}
	r = e.tessera(t, "submit", job)
	if r.code != 0 || !strings.Contains(r.stdout, "0 item(s) added, 3 already queued") {
		t.Fatalf("resubmit: %+v", r)
	}
	st := e.status(t)
	if st.Counts["available"] != 3 {
		t.Fatalf("status: %+v", st)
	}
	out := filepath.Join(e.out, "q", "0001-2.png")
	if r = e.tessera(t, "cancel", out); r.code != 0 || !strings.Contains(r.stdout, "available -> cancelled") {
		t.Fatalf("cancel by output: %+v", r)
	}
	if r = e.tessera(t, "status"); r.code != 0 || !strings.Contains(r.stdout, "cancelled  1") || !strings.Contains(r.stdout, "last failures:") || !strings.Contains(r.stdout, "0001-2.png") {
		t.Fatalf("status text: %+v", r)
	}
	if r = e.tessera(t, "retry", "q"); r.code != 0 || !strings.Contains(r.stdout, "1 item(s) retried") {
		t.Fatalf("retry by job name: %+v", r)
	}
	r = e.tessera(t, "run", "-q", job)
	if r.code != 0 || !strings.Contains(r.stdout, "3 images made, 0 already done, 0 failed") {
		t.Fatalf("run after retry: %+v", r)
	}
	if r = e.tessera(t, "cancel", "1"); r.code != 0 || !strings.Contains(r.stdout, "is already completed") {
		t.Fatalf("cancel of a finished item: %+v", r)
	}
	e.checkOutputs(t, job)
	if r = e.tessera(t, "retry", "no-such-job"); r.code == 0 || !strings.Contains(r.stderr, "no-such-job") {
		t.Fatalf("retry of nothing: %+v", r)
	}
}

// badJobFiles maps each file of testdata/jobs/bad to a piece of the message
// that must reject it.
var badJobFiles = map[string]string{
	"alias-bomb.yaml":                      "cannot unmarshal !!seq into uint64",
	"count-enormous.yaml":                  "items[0].count: must be between 1 and 10000, got 1000000",
	"count-negative.yaml":                  "items[0].count: must be between 1 and 10000, got -3",
	"count-too-many-items.yaml":            "items[1]: expands to 6000 more items, over limits.max_items (10000)",
	"images-times-count.yaml":              "items[0]: expands to 20000 more items, over limits.max_items (10000)",
	"pad-width-huge.yaml":                  "items[0].output: {index:0999999}: a zero-pad width is at most 32",
	"scale-nan.yaml":                       "items[0].scale: must be a finite number, got NaN",
	"guidance-infinite.toml":               "defaults.base.guidance: must be a finite number, got +Inf",
	"width-fraction.yaml":                  "items[0].width: must be a whole number, got 8.5",
	"seed-fraction.json":                   "cannot unmarshal number 1.7 into Go struct field ItemSpec.items.seed of type uint64",
	"path-name-too-long.yaml":              "is 306 bytes; at most",
	"upscale-over-max-pixels.yaml":         "items[0].image: upscaled to 32768x32768, over limits.max_pixels",
	"upscale-scale16-over-max-pixels.yaml": "items[0].image: upscaled to 131072x131072, over limits.max_pixels",
	"upscale-scale-tiny.yaml":              "scale: 0.001 makes 0x0",
	"image-is-directory.yaml":              "is a directory, not an image file",
	"image-garbage-jpeg.yaml":              "garbage.jpg: not an image Tessera reads",
	"model-sr-as-base.yaml":                "items[0]: base.model: oracle-sr is a sr model, not a base model",
	"strength-no-step.yaml":                "items[0]: sr.strength: strength 0.01 leaves no step of 20",
	"scale-without-image.yaml":             "items[0].scale: only for upscaling",
	"upscale-width-only.yaml":              "items[0].width: an upscale gives both width and height, or neither",
	"tile-huge.yaml":                       "items[0].sr.tile: size and overlap must be in [0, 4096], got 100000",
	"count-zero.yaml":                      "items[0].count: must be between 1 and 10000, got 0",
	"duplicate-key.yaml":                   `mapping key "version" already defined`,
	"empty.yaml":                           "empty.yaml: empty",
	"format-unknown.ini":                   `unknown format ".ini"`,
	"image-and-images.yaml":                "items[0].image: give image or images, not both",
	"images-match-nothing.yaml":            `items[0].images: "no-such-dir/*.png" matches no file`,
	"invalid-utf8.json":                    "line 1: not valid UTF-8",
	"invalid-utf8.yaml":                    "line 2: not valid UTF-8",
	"items-empty.yaml":                     "items: no items",
	"model-unknown-base.yaml":              `items[1].base.model: unknown model "no-such-base"`,
	"model-unknown-sr.json":                `defaults.sr.model: unknown model "demo-sr-xl"`,
	"noise-level-negative.yaml":            "items[0].sr.noise_level: must be in [0, 1], got -0.5",
	"output-duplicate.yaml":                "is also the output of index 0",
	"path-absolute-output.yaml":            "is absolute; outputs go under output.root",
	"path-escape-output.yaml":              `"../../{job}-{seed}.png" leaves output.root`,
	"path-model-not-allowed.yaml":          `items[0].sr.model: model "/etc/passwd": paths to models are not allowed`,
	"path-name-escape.yaml":                `name: "../evil": use letters, digits`,
	"sampler-unknown.yaml":                 `items[0].base.sampler: "plms"`,
	"seeds-and-count.yaml":                 "items[0].seeds: give seeds or count, not both",
	"size-huge.yaml":                       "items[0].width: must be a multiple of 8 and at most 16384, got 100000",
	"size-negative.yaml":                   "items[0].height: must be a multiple of 8 and at most 16384, got -8",
	"size-not-multiple.yaml":               "items[0].width: must be a multiple of 8 and at most 16384, got 100",
	"size-over-max-pixels.yaml":            "16384x16384 is over limits.max_pixels",
	"steps-over-limit.yaml":                "items[0].sr.steps: must be between 1 and 1000 (limits.max_steps), got 5000",
	"strength-over-one.yaml":               "items[0].sr.strength: must be in (0, 1], got 2",
	"syntax-indent.yaml":                   "line 9: mapping values are not allowed in this context",
	"syntax-trailing-comma.json":           "line 2: invalid character ']'",
	"syntax-unclosed.yaml":                 "line 7: did not find expected ',' or '}'",
	"syntax.toml":                          "toml: expected character ]",
	"template-unknown-field.yaml":          "unknown template field {jobb}",
	"too-large.yaml":                       "bytes, limit 16384 (limits.max_job_bytes)",
	"top-level-list.yaml":                  "cannot unmarshal !!seq into jobs.File",
	"type-item-scalar.yaml":                "line 8: cannot unmarshal !!int `7` into jobs.ItemSpec",
	"type-items-scalar.yaml":               "line 7: cannot unmarshal !!int `5` into []jobs.ItemSpec",
	"type-seed-negative.json":              "cannot unmarshal number -1 into Go struct field ItemSpec.items.seed of type uint64",
	"type-steps-float.toml":                "toml: float cannot be assigned to int",
	"type-width-string.yaml":               "line 8: cannot unmarshal !!str `big` into int",
	"unknown-key-item.yaml":                "line 8: field sede not found in type jobs.ItemSpec",
	"unknown-key-stage.toml":               "modle",
	"unknown-key-top.yaml":                 "line 2: field colour not found in type jobs.File",
	"version-2.yaml":                       "version: 2 is not supported (want 1)",
	"version-missing.yaml":                 "version: 0 is not supported (want 1)",
}

// TestRunBadJobFiles runs every bad job file together with a good one:
// each bad file is rejected with its own message and the good one is made.
func TestRunBadJobFiles(t *testing.T) {
	e := newRunEnv(t, "")
	f, err := os.OpenFile(e.cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("limits: {max_job_bytes: 16384}\n")
	f.Close()
	good := e.jobFile(t, "good", 2, 4)
	dir, err := filepath.Abs(filepath.Join("testdata", "jobs", "bad"))
	if err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"run", "-q", good}
	for _, en := range entries {
		if _, ok := badJobFiles[en.Name()]; !ok {
			t.Errorf("%s has no expected message in badJobFiles", en.Name())
		}
		args = append(args, filepath.Join(dir, en.Name()))
	}
	if len(entries) < 30 || len(entries) != len(badJobFiles) {
		t.Fatalf("%d bad job files, %d expected messages", len(entries), len(badJobFiles))
	}
	r := e.tessera(t, args...)
	if r.code != 1 || !strings.Contains(r.stdout, "2 images made, 0 already done, 0 failed") || !strings.Contains(r.stdout, "job files with errors: ") {
		t.Fatalf("run: code %d\nstdout:\n%s", r.code, r.stdout)
	}
	// Each file's report runs from its "tessera: job file PATH:" to the next.
	reports := map[string]string{}
	for _, block := range strings.Split(r.stderr, "tessera: job file ")[1:] {
		for name := range badJobFiles {
			if strings.HasPrefix(block, filepath.Join(dir, name)+":") {
				reports[name] = block
			}
		}
	}
	names := make([]string, 0, len(badJobFiles))
	for name := range badJobFiles {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			rep, ok := reports[name]
			if !ok {
				t.Fatalf("not rejected")
			}
			if !strings.Contains(rep, badJobFiles[name]) {
				t.Errorf("report lacks %q:\n%s", badJobFiles[name], rep)
			}
		})
	}
	e.checkOutputs(t, good)
}

// TestRunPermanentFailures: invalid input that only shows when the item is
// worked (an image whose header is fine and whose pixels are cut off) fails
// its item at once, with the reason and without retries, while the other
// items are made; invalid input that the header or the models show (a
// file that is not an image, an SR model as the base) rejects the job
// file before anything is queued.
func TestRunPermanentFailures(t *testing.T) {
	e := newRunEnv(t, "")
	full := writeTestPNG(t, filepath.Join(e.dir, "in.png"), 16, 16)
	if err := os.WriteFile(filepath.Join(e.dir, "cut.png"), full[:len(full)-40], 0o644); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(e.dir, "broken.png"), []byte("\x89PNG\r\n\x1a\nthis is not the rest of a PNG"), 0o644)
	head := `version: 1
defaults:
  width: 128
  height: 128
  base: {model: oracle-base, steps: 4}
  sr: {model: oracle-sr, steps: 4, tile: {size: 48, overlap: 8}}
items:
  - {seed: 1}
`
	job := filepath.Join(e.dir, "mixed.yaml")
	os.WriteFile(job, []byte(head+"  - {seed: 2, image: cut.png, scale: 4}\n"), 0o644)
	r := e.tessera(t, "run", "-q", job)
	if r.code != 1 || !strings.Contains(r.stdout, "1 images made, 0 already done, 1 failed") || !strings.Contains(r.stdout, "cut.png") {
		t.Fatalf("run: %+v", r)
	}
	st := e.status(t)
	if st.Counts["cancelled"] != 1 || st.Counts["completed"] != 1 || len(st.Failures) != 1 {
		t.Fatalf("status: %+v", st)
	}
	if f := st.Failures[0]; f.Attempt != 1 || !strings.HasPrefix(f.Error, "invalid input: image ") {
		t.Errorf("failure retried or without reason: %+v", f)
	}
	rejected := filepath.Join(e.dir, "rejected.yaml")
	os.WriteFile(rejected, []byte(head+"  - {seed: 2, image: broken.png, scale: 4}\n  - {seed: 3, base: {model: oracle-sr}}\n"), 0o644)
	r = e.tessera(t, "run", "-q", rejected)
	for _, want := range []string{"items[1].image: image ", "broken.png: not an image", "items[2]: base.model: oracle-sr is a sr model"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("rejection lacks %q: %+v", want, r)
		}
	}
	if st := e.status(t); r.code != 1 || st.Counts["cancelled"]+st.Counts["completed"] != 2 {
		t.Errorf("the rejected file queued items: %+v, %+v", r, st)
	}
}

// runtime.devices on a machine without the GPU build: the items fail with
// the provider's reason and the device named; with fallback every device's
// session falls back to the CPU and the images are made.
func TestRunOnDevicesWithoutGPU(t *testing.T) {
	if _, err := os.Stat(".ort/libonnxruntime_providers_cuda.so"); err == nil {
		t.Skip("CUDA provider library present")
	}
	e := newRunEnv(t, "")
	job := e.jobFile(t, "gpus", 2, 2)
	r := e.tessera(t, "run", "-q", "--providers", "cuda,cpu", "--devices", "0,1", job)
	if r.code != 1 || !strings.Contains(r.stdout, "device 0: ") || !strings.Contains(r.stdout, "execution provider cuda could not attach") {
		t.Fatalf("devices without the GPU build: %+v", r)
	}
	r = tessera(t, []string{"TESSERA_RUNTIME_FALLBACK=true", "TESSERA_RUNTIME_DEVICES=0,1"}, "--config", e.cfg, "run", "-q", "--providers", "cuda,cpu", job)
	if r.code != 0 || !strings.Contains(r.stdout, "2 images made") {
		t.Fatalf("devices with fallback: %+v", r)
	}
	e.checkOutputs(t, job)
}
