package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tessera/jobs/pgtest"
)

// serveWatchFiles is how many good job files TestServeWatch drops at once
// (100 with -short).
func serveWatchFiles() int {
	if testing.Short() {
		return 100
	}
	return 500
}

// serveEnv is a working directory for `tessera serve`: a config with the
// oracle test models, JSON logs, a free port and extra config lines.
type serveEnv struct {
	dir, cfg, out, addr string
}

func newServeEnv(t *testing.T, queueURL, extra string) serveEnv {
	t.Helper()
	dir := t.TempDir()
	models, _ := filepath.Abs(filepath.Join("testdata", "models"))
	lib, _ := filepath.Abs(filepath.Join(".ort", "libonnxruntime.so.1"))
	e := serveEnv{dir: dir, cfg: filepath.Join(dir, "tessera.yaml"), out: filepath.Join(dir, "out"), addr: serveFreeAddr(t)}
	if queueURL == "" {
		queueURL = "sqlite://" + filepath.Join(dir, "queue.db")
	}
	cfg := fmt.Sprintf("models: {dirs: [%q]}\noutput: {root: %q}\nqueue: {url: %q}\nruntime: {threads: 1, library: %q}\n"+
		"log: {level: info, format: json}\nserver: {addr: %q}\n%s", models, e.out, queueURL, lib, e.addr, extra)
	if err := os.WriteFile(e.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

func serveFreeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// tinyJob is a job file of n 64x64 items made with the oracle models.
func tinyJob(name, output string, n, seed int) string {
	return fmt.Sprintf(`version: 1
name: %s
output: %q
defaults: {width: 64, height: 64, base: {model: oracle-base, steps: 4}, sr: {model: oracle-sr, steps: 2, tile: {size: 48, overlap: 8}}}
items: [{count: %d, seed: %d}]
`, name, output, n, seed)
}

// serveDaemon is a running `tessera serve`; its JSON log lines are collected.
type serveDaemon struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []map[string]any
	raw  bytes.Buffer
	done chan struct{}
	code int
}

func (e serveEnv) start(t *testing.T, args ...string) *serveDaemon {
	t.Helper()
	d := &serveDaemon{done: make(chan struct{})}
	d.cmd = exec.Command(tesseraBin, append([]string{"--config", e.cfg, "serve"}, args...)...)
	d.cmd.Dir = e.dir
	stderr, _ := d.cmd.StderrPipe()
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var m map[string]any
			d.mu.Lock()
			d.raw.Write(sc.Bytes())
			d.raw.WriteByte('\n')
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				d.logs = append(d.logs, m)
			}
			d.mu.Unlock()
		}
		d.cmd.Wait()
		d.code = d.cmd.ProcessState.ExitCode()
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("serve log:\n%s", d.log())
		}
	})
	waitFor(t, "serve to listen", 20*time.Second, func() bool {
		select {
		case <-d.done:
			t.Fatalf("serve exited with %d:\n%s", d.code, d.log())
		default:
		}
		_, err := http.Get("http://" + e.addr + "/healthz")
		return err == nil
	})
	return d
}

func (d *serveDaemon) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.raw.String()
}

// messages returns the log records whose msg is msg.
func (d *serveDaemon) messages(msg string) []map[string]any {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []map[string]any
	for _, m := range d.logs {
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// stop sends SIGTERM and returns the exit code and how long the exit took.
func (d *serveDaemon) stop(t *testing.T) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s of SIGTERM")
	}
	return d.code, time.Since(start)
}

// health fetches /healthz.
func getHealth(t *testing.T, addr string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var body map[string]any
	json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body
}

func queueCount(body map[string]any, state string) int {
	q, _ := body["queue"].(map[string]any)
	n, _ := q[state].(float64)
	return int(n)
}

// metric returns the value of the first sample of /metrics whose line
// starts with prefix (name and labels).
func serveMetric(t *testing.T, addr, prefix string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, prefix) {
			var v float64
			fmt.Sscanf(l[strings.LastIndexByte(l, ' ')+1:], "%g", &v)
			return v
		}
	}
	return -1
}

func serveCountFiles(t *testing.T, dir, suffix string) int {
	t.Helper()
	n := 0
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, suffix) {
			n++
		}
		return nil
	})
	return n
}

// TestServeWatch drops many job files at once into a watched directory of
// a running serve: written at once, written slowly in pieces, renamed in,
// and bad ones. Every good file is accepted and made, every bad one is
// rejected with its reason, and dropping files again adds no item.
func TestServeWatch(t *testing.T) {
	good, bad := serveWatchFiles(), 20
	e := newServeEnv(t, "", "workers: 2\nwatch: [{dir: in, settle: 300ms, rescan: 2s}]\n")
	in := filepath.Join(e.dir, "in")
	d := e.start(t)

	start := time.Now()
	var wg sync.WaitGroup
	for i := range good {
		name := fmt.Sprintf("w%03d.yaml", i)
		body := tinyJob(fmt.Sprintf("w%03d", i), "{job}/{index}.png", 1, i+1)
		switch {
		case i%10 == 1: // written slowly in three pieces
			wg.Add(1)
			go func() {
				defer wg.Done()
				f, err := os.Create(filepath.Join(in, name))
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				third := len(body) / 3
				for _, piece := range []string{body[:third], body[third : 2*third], body[2*third:]} {
					f.WriteString(piece)
					time.Sleep(150 * time.Millisecond)
				}
			}()
		case i%10 == 2: // written elsewhere under a temp name and renamed in
			tmp := filepath.Join(in, name+".tmp")
			os.WriteFile(tmp, []byte(body), 0o644)
			os.Rename(tmp, filepath.Join(in, name))
		default:
			os.WriteFile(filepath.Join(in, name), []byte(body), 0o644)
		}
	}
	badBodies := []string{
		"garbage: [",
		"",
		strings.Replace(tinyJob("b", "{job}/{index}.png", 1, 1), "oracle-base", "no-such-model", 1),
		strings.Replace(tinyJob("b", "{job}/{index}.png", 1, 1), "width: 64", "width: 63", 1),
		strings.Replace(tinyJob("b", "{job}/{index}.png", 1, 1), "version: 1", "version: 2", 1),
		tinyJob("b", "{job}/{index}.png", 1, 1) + "colour: red\n",
		tinyJob("b", "/abs/{index}.png", 1, 1),
	}
	for i := range bad {
		os.WriteFile(filepath.Join(in, fmt.Sprintf("bad%02d.yaml", i)), []byte(badBodies[i%len(badBodies)]), 0o644)
	}
	wg.Wait()

	var midItems float64
	waitFor(t, "every item made", 60*time.Second, func() bool {
		if midItems <= 0 {
			midItems = serveMetric(t, e.addr, `tessera_item_duration_seconds_count{outcome="ok"}`)
		}
		_, body := getHealth(t, e.addr)
		return queueCount(body, "completed") == good
	})
	took := time.Since(start)
	if got := serveCountFiles(t, filepath.Join(in, "accepted"), ".ids.json"); got != good {
		t.Errorf("%d files accepted, want %d", got, good)
	}
	waitFor(t, "bad files rejected", 10*time.Second, func() bool {
		return serveCountFiles(t, filepath.Join(in, "rejected"), ".error.txt") == bad
	})
	for i := range bad {
		reason, err := os.ReadFile(filepath.Join(in, "rejected", fmt.Sprintf("bad%02d.yaml.error.txt", i)))
		if err != nil || len(bytes.TrimSpace(reason)) == 0 {
			t.Errorf("bad%02d: no reason (%v)", i, err)
		}
	}
	if got := serveCountFiles(t, e.out, ".png"); got != good {
		t.Errorf("%d images, want %d", got, good)
	}
	if left, _ := filepath.Glob(filepath.Join(in, "*.yaml")); len(left) != 0 {
		t.Errorf("files left in the watched directory: %v", left)
	}
	endItems := serveMetric(t, e.addr, `tessera_item_duration_seconds_count{outcome="ok"}`)
	if endItems != float64(good) || midItems >= endItems {
		t.Errorf("item counter %v during the run, %v at the end; want it moving up to %d", midItems, endItems, good)
	}
	for prefix, want := range map[string]float64{"tessera_watch_accepted_total": float64(good), "tessera_watch_rejected_total": float64(bad)} {
		if got := serveMetric(t, e.addr, prefix); got != want {
			t.Errorf("%s = %v, want %v", prefix, got, want)
		}
	}
	// 64x64 items are the base stage alone: the base model worked; the SR
	// model was never loaded (plans need only its manifest), so it has no
	// series at all.
	if got := serveMetric(t, e.addr, `tessera_tiles_total{model="oracle-base",provider="cpu"}`); got <= 0 {
		t.Errorf("base model tiles = %v", got)
	}
	if got := serveMetric(t, e.addr, `tessera_tiles_total{model="oracle-sr",provider="cpu"}`); got != -1 {
		t.Errorf("SR model tiles = %v, want no series (-1)", got)
	}
	// One lane for a base model; busy time is Run time over the lanes.
	if got := serveMetric(t, e.addr, `tessera_model_lanes{model="oracle-base",provider="cpu"}`); got != 1 {
		t.Errorf("base model lanes = %v, want 1", got)
	}
	busy := serveMetric(t, e.addr, `tessera_ort_busy_seconds_total{model="oracle-base",provider="cpu"}`)
	if run := serveMetric(t, e.addr, `tessera_ort_run_seconds_total{model="oracle-base",provider="cpu"}`); busy <= 0 || busy != run {
		t.Errorf("base model busy %v s, run %v s: want equal with one lane", busy, run)
	}
	t.Logf("%d files (%d bad) dropped at once: all images made in %s", good+bad, bad, took.Round(10*time.Millisecond))

	// The same files dropped again: accepted, nothing new queued.
	for i := range 5 {
		os.WriteFile(filepath.Join(in, fmt.Sprintf("w%03d.yaml", i)), []byte(tinyJob(fmt.Sprintf("w%03d", i), "{job}/{index}.png", 1, i+1)), 0o644)
	}
	waitFor(t, "files dropped again taken", 10*time.Second, func() bool {
		return serveMetric(t, e.addr, "tessera_watch_accepted_total") == float64(good+5)
	})
	_, body := getHealth(t, e.addr)
	total := 0
	for _, n := range body["queue"].(map[string]any) {
		total += int(n.(float64))
	}
	if total != good {
		t.Errorf("queue holds %d items after dropping files again, want %d", total, good)
	}
	if code, _ := d.stop(t); code != 0 {
		t.Errorf("exit %d after SIGTERM", code)
	}
}

// TestServeWatchRecursive watches a directory with recursive: true: job
// files dropped into nested subdirectories made while serve runs are taken
// and made, and moved under accepted/ and rejected/ with their relative
// paths, equal file names in different subdirectories included.
func TestServeWatchRecursive(t *testing.T) {
	e := newServeEnv(t, "", "workers: 2\nwatch: [{dir: in, recursive: true, settle: 200ms, rescan: 1s}]\n")
	in := filepath.Join(e.dir, "in")
	d := e.start(t)
	drop := func(rel, body string) {
		p := filepath.Join(in, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Two files of the same name and no `name:` in different subdirectories:
	// their jobs are named after their relative paths, so outputs differ.
	unnamed := func(seed int) string {
		return strings.Replace(tinyJob("x", "{job}/{index}.png", 1, seed), "name: x\n", "", 1)
	}
	drop("a/b/job.yaml", unnamed(1))
	drop("c/job.yaml", unnamed(2))
	drop("c/bad.yaml", "garbage: [")
	drop(".hidden/job.yaml", tinyJob("r3", "{job}/{index}.png", 1, 3))
	waitFor(t, "both items made", 30*time.Second, func() bool {
		_, body := getHealth(t, e.addr)
		return queueCount(body, "completed") == 2
	})
	waitFor(t, "the bad file rejected", 10*time.Second, func() bool {
		return serveMetric(t, e.addr, "tessera_watch_rejected_total") == 1
	})
	for _, rel := range []string{"accepted/a/b/job.yaml", "accepted/a/b/job.yaml.ids.json", "accepted/c/job.yaml",
		"accepted/c/job.yaml.ids.json", "rejected/c/bad.yaml", "rejected/c/bad.yaml.error.txt", ".hidden/job.yaml"} {
		if _, err := os.Stat(filepath.Join(in, filepath.FromSlash(rel))); err != nil {
			t.Error(err)
		}
	}
	if got := serveMetric(t, e.addr, "tessera_watch_accepted_total"); got != 2 {
		t.Errorf("tessera_watch_accepted_total = %v, want 2", got)
	}
	if got := serveCountFiles(t, e.out, ".png"); got != 2 {
		t.Errorf("%d images, want 2", got)
	}
	for _, p := range []string{"a-b-job/0.png", "c-job/0.png"} {
		if _, err := os.Stat(filepath.Join(e.out, p)); err != nil {
			t.Error(err)
		}
	}
	if code, _ := d.stop(t); code != 0 {
		t.Errorf("exit %d after SIGTERM", code)
	}
}

func TestWatchedJobName(t *testing.T) {
	for path, want := range map[string]string{
		"/in/job.yaml":          "",
		"/in/a/b/job.yaml":      "a-b-job",
		"/in/my photos/x.json":  "my_photos-x",
		"/in/2026/11/night.yml": "2026-11-night",
	} {
		if got := watchedJobName("/in", path); got != want {
			t.Errorf("watchedJobName(%q) = %q, want %q", path, got, want)
		}
	}
}

// firings returns the firing times logged by daemons, and fails on a time
// fired twice.
func firings(t *testing.T, ds ...*serveDaemon) map[string]bool {
	t.Helper()
	at := map[string]bool{}
	for _, d := range ds {
		for _, m := range d.messages("schedule: fired") {
			s, _ := m["at"].(string)
			if at[s] {
				t.Errorf("firing at %s made twice", s)
			}
			at[s] = true
		}
	}
	return at
}

const tickSchedule = "schedules: [{name: tick, cron: \"@every 1s\", job: tick.yaml}]\n"

// TestServeScheduleAcrossRestart fires a schedule every second, restarts
// serve and fires on: every second the daemon ran fires once, none twice,
// and each firing's outputs are under its own {time}.
func TestServeScheduleAcrossRestart(t *testing.T) {
	e := newServeEnv(t, "", tickSchedule)
	os.WriteFile(filepath.Join(e.dir, "tick.yaml"), []byte(tinyJob("tick", "{job}/{date}/{time}/{index}.png", 1, 7)), 0o644)
	var ds []*serveDaemon
	var ran time.Duration
	for range 2 {
		d := e.start(t)
		start := time.Now()
		time.Sleep(3500 * time.Millisecond)
		if code, _ := d.stop(t); code != 0 {
			t.Fatalf("exit %d", code)
		}
		ran += time.Since(start)
		ds = append(ds, d)
		if n := len(d.messages("schedule: fired")); n < 2 || n > 5 {
			t.Errorf("%d firings in 3.5s", n)
		}
		if n := len(d.messages("schedule: skipped; an earlier firing is unfinished")); n > 0 {
			t.Logf("%d firings skipped (an earlier one was unfinished)", n)
		}
	}
	at := firings(t, ds...)
	dirs, _ := filepath.Glob(filepath.Join(e.out, "tick", "*", "*"))
	// Never more outputs than firings; the last firing before a stop may
	// still be queued, unmade, when the daemon exits (that is graceful stop).
	if len(dirs) > len(at) || len(dirs) < len(at)-1 {
		t.Errorf("%d output directories for %d firings", len(dirs), len(at))
	}
	t.Logf("%d firings in %s of two runs", len(at), ran.Round(100*time.Millisecond))
}

// TestServeScheduleTwoProcessesPostgres runs two serve processes with the
// same schedule on one PostgreSQL queue: each time fires once between them.
func TestServeScheduleTwoProcessesPostgres(t *testing.T) {
	url := pgtest.SchemaURL(t)
	a := newServeEnv(t, url, tickSchedule)
	b := newServeEnv(t, url, tickSchedule)
	b.out = a.out
	cfg, _ := os.ReadFile(b.cfg)
	os.WriteFile(b.cfg, bytes.Replace(cfg, []byte(filepath.Join(b.dir, "out")), []byte(a.out), 1), 0o644)
	for _, e := range []serveEnv{a, b} {
		os.WriteFile(filepath.Join(e.dir, "tick.yaml"), []byte(tinyJob("tick", "{job}/{date}/{time}/{index}.png", 1, 7)), 0o644)
	}
	da, db := a.start(t), b.start(t)
	time.Sleep(4 * time.Second)
	for _, d := range []*serveDaemon{da, db} {
		if code, _ := d.stop(t); code != 0 {
			t.Errorf("exit %d", code)
		}
	}
	at := firings(t, da, db)
	dupes := len(da.messages("schedule: this firing was already queued (by another process or before a restart)")) +
		len(db.messages("schedule: this firing was already queued (by another process or before a restart)"))
	skips := len(da.messages("schedule: skipped; an earlier firing is unfinished")) + len(db.messages("schedule: skipped; an earlier firing is unfinished"))
	dirs, _ := filepath.Glob(filepath.Join(a.out, "tick", "*", "*"))
	// As above: the last firing may be queued and unmade when both stop.
	if len(at) < 2 || len(dirs) > len(at) || len(dirs) < len(at)-1 {
		t.Errorf("%d firings, %d output directories", len(at), len(dirs))
	}
	t.Logf("%d firings between two processes; the other process found %d already queued and skipped %d", len(at), dupes, skips)
}

// TestServeSIGTERM stops serve while it works: it exits 0 within the grace
// period, the items it did not finish stay queued, and a restarted serve
// makes them.
func TestServeSIGTERM(t *testing.T) {
	e := newServeEnv(t, "", "watch: [{dir: in, settle: 100ms}]\n")
	const n = 12
	job := strings.Replace(strings.Replace(tinyJob("slow", "{job}/{index}.png", n, 1), "width: 64, height: 64", "width: 128, height: 128", 1), "steps: 4", "steps: 30", 1)
	d := e.start(t, "--grace", "300ms")
	os.WriteFile(filepath.Join(e.dir, "in", "slow.yaml"), []byte(job), 0o644)
	waitFor(t, "a first image", 30*time.Second, func() bool { return serveCountFiles(t, e.out, ".png") > 0 })
	code, took := d.stop(t)
	made := serveCountFiles(t, e.out, ".png")
	if code != 0 || took > 5*time.Second {
		t.Fatalf("exit %d after %s", code, took)
	}
	if made >= n {
		t.Skipf("all %d items finished before the stop; nothing to resume", n)
	}
	d = e.start(t)
	waitFor(t, "every item made after the restart", 60*time.Second, func() bool {
		_, body := getHealth(t, e.addr)
		return queueCount(body, "completed") == n
	})
	if got := serveCountFiles(t, e.out, ".png"); got != n {
		t.Errorf("%d images, want %d", got, n)
	}
	d.stop(t)
	t.Logf("SIGTERM with %d of %d made: exit 0 in %s; the rest made after a restart", made, n, took.Round(10*time.Millisecond))
}

// TestServeHealthzQueueUnreachable reaches PostgreSQL through a proxy
// that the test then cuts: /healthz turns 503 and /metrics says
// tessera_queue_up 0.
func TestServeHealthzQueueUnreachable(t *testing.T) {
	url := pgtest.SchemaURL(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	cut := false
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", "127.0.0.1:5432")
			mu.Lock()
			if err != nil || cut {
				mu.Unlock()
				c.Close()
				continue
			}
			conns = append(conns, c, up)
			mu.Unlock()
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
	defer ln.Close()
	proxied := strings.Replace(url, "127.0.0.1:5432", ln.Addr().String(), 1)
	e := newServeEnv(t, proxied, "")
	d := e.start(t)
	if code, body := getHealth(t, e.addr); code != http.StatusOK || body["status"] != "ok" {
		t.Fatalf("healthz %d %v with the database up", code, body)
	}
	// Cut early, while the queue may still be starting: serve must keep
	// running (retrying the start) and report itself unhealthy.
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	cut = true
	ln.Close()
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	waitFor(t, "healthz to report the database down", 10*time.Second, func() bool {
		code, body := getHealth(t, e.addr)
		return code == http.StatusServiceUnavailable && body["status"] == "unhealthy"
	})
	if up := serveMetric(t, e.addr, "tessera_queue_up"); up != 0 {
		t.Errorf("tessera_queue_up = %v with the database down", up)
	}
	d.cmd.Process.Kill()
}
