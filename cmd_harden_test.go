package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tessera/jobs"
	"tessera/jobs/pgtest"
)

// writeTestPNG writes a w×h PNG with a colour ramp.
func writeTestPNG(t *testing.T, path string, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.NRGBA{uint8(4 * x), uint8(4 * y), 128, 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// copyDir copies the files of a model directory.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o755); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, en := range entries {
		data, err := os.ReadFile(filepath.Join(from, en.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, en.Name()), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// runIn runs tessera in dir.
func runIn(t *testing.T, dir string, args ...string) result {
	t.Helper()
	return runInEnv(t, dir, nil, args...)
}

// runInEnv runs tessera in dir with env added to the environment.
func runInEnv(t *testing.T, dir string, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(tesseraBin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{out.String(), errb.String(), code}
}

// Invalid input that only shows when an item is worked fails that item at
// its first attempt, with its class and reason in status: an input image
// whose header is fine but whose pixels are cut off, and every way a model
// can break after the item was queued (truncated, random bytes, a bad
// manifest, its external data gone, a graph that no longer fits its
// contract). The good item beside them is made.
func TestInvalidInputFailsAtOnce(t *testing.T) {
	e := newServeEnv(t, "", "")
	models := filepath.Join(e.dir, "models")
	src := filepath.Join("testdata", "models")
	breaks := map[string]struct {
		from   string
		break_ func(dir string) error
		want   string
	}{
		"m-truncated": {"oracle-sr", func(dir string) error {
			data, _ := os.ReadFile(filepath.Join(dir, "model.onnx"))
			return os.WriteFile(filepath.Join(dir, "model.onnx"), data[:len(data)/2], 0o644)
		}, "not an ONNX model"},
		"m-random": {"oracle-sr", func(dir string) error {
			b := make([]byte, 4096)
			rand.Read(b)
			return os.WriteFile(filepath.Join(dir, "model.onnx"), b, 0o644)
		}, "not an ONNX model"},
		"m-manifest": {"oracle-sr", func(dir string) error {
			return os.WriteFile(filepath.Join(dir, "tessera.yaml"), []byte("version: 1\nkind: sr\nbogus: 1\n"), 0o644)
		}, "bogus"},
		"m-nodata": {"conv-sr-external", func(dir string) error {
			return os.Remove(filepath.Join(dir, "model.onnx_data"))
		}, "external data file"},
		// Found only when ONNX Runtime makes the session: the header and
		// manifest are fine, the weights are cut short.
		"m-cutdata": {"conv-sr-external", func(dir string) error {
			p := filepath.Join(dir, "model.onnx_data")
			data, _ := os.ReadFile(p)
			return os.WriteFile(p, data[:len(data)/3], 0o644)
		}, "External initializer"},
		"m-contract": {"oracle-sr", func(dir string) error {
			// A valid manifest the graph does not fit: 4 channels where the
			// graph has 3.
			p := filepath.Join(dir, "tessera.yaml")
			data, _ := os.ReadFile(p)
			return os.WriteFile(p, bytes.Replace(data, []byte("channels: 3"), []byte("channels: 4"), 1), 0o644)
		}, "does not fit the sr contract"},
	}
	for name, b := range breaks {
		copyDir(t, filepath.Join(src, b.from), filepath.Join(models, name))
	}
	// The models of this test come first; the oracle fixtures after them.
	cfg, _ := os.ReadFile(e.cfg)
	abs, _ := filepath.Abs(src)
	cfg = bytes.Replace(cfg, []byte(fmt.Sprintf("models: {dirs: [%q]}", abs)), []byte(fmt.Sprintf("models: {dirs: [%q, %q]}", models, abs)), 1)
	os.WriteFile(e.cfg, cfg, 0o644)

	full := writeTestPNG(t, filepath.Join(e.dir, "in.png"), 16, 16)
	// A PNG whose header (and size) is intact and whose pixel data is cut.
	os.WriteFile(filepath.Join(e.dir, "cut.png"), full[:len(full)/2], 0o644)
	body := "version: 1\nname: inv\ndefaults: {sr: {steps: 2, tile: {size: 32, overlap: 8}}}\nitems:\n" +
		"  - {image: in.png, sr: {model: oracle-sr}}\n" +
		"  - {image: cut.png, sr: {model: oracle-sr}}\n"
	for _, name := range []string{"m-truncated", "m-random", "m-manifest", "m-nodata", "m-cutdata", "m-contract"} {
		body += fmt.Sprintf("  - {image: in.png, output: %q, sr: {model: %s}}\n", name+".png", name)
	}
	job := filepath.Join(e.dir, "inv.yaml")
	os.WriteFile(job, []byte(body), 0o644)
	if r := tessera(t, nil, "--config", e.cfg, "submit", job); r.code != 0 || !strings.Contains(r.stdout, "8 item(s) added") {
		t.Fatalf("submit: %+v", r)
	}
	for name, b := range breaks {
		if err := b.break_(filepath.Join(models, name)); err != nil {
			t.Fatal(err)
		}
	}
	d := e.start(t)
	waitFor(t, "every item final", 60*time.Second, func() bool {
		_, h := getHealth(t, e.addr)
		return queueCount(h, "completed")+queueCount(h, "cancelled") == 8
	})
	d.stop(t)
	r := tessera(t, nil, "--config", e.cfg, "status", "--json", "--failures", "20")
	var st queueStatus
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status: %v\n%+v", err, r)
	}
	if st.Counts["completed"] != 1 || st.Counts["cancelled"] != 7 || len(st.Failures) != 7 {
		t.Fatalf("status: %+v", st)
	}
	want := map[string]string{"cut.png": "invalid input: image "}
	for name, b := range breaks {
		want[name+".png"] = "model unusable: "
		want[name+".png+"] = b.want
	}
	want["cut.png+"] = "decode png"
	for _, f := range st.Failures {
		base := filepath.Base(f.Output)
		if base == "0001-1.png" {
			base = "cut.png"
		}
		if f.Attempt != 1 {
			t.Errorf("%s: %d attempts, want 1", base, f.Attempt)
		}
		if !strings.HasPrefix(f.Error, want[base]) || !strings.Contains(f.Error, want[base+"+"]) {
			t.Errorf("%s: reason %q, want %q ... %q", base, f.Error, want[base], want[base+"+"])
		}
	}
}

// An output root that cannot take images stops run and serve at start-up,
// naming output.root, before any item is computed.
func TestUnwritableOutputRootAtStartup(t *testing.T) {
	e := newRunEnv(t, "")
	job := e.jobFile(t, "j", 1, 2)
	file := filepath.Join(e.dir, "a-file")
	os.WriteFile(file, []byte("x"), 0o644)
	for _, root := range []string{filepath.Join(file, "out"), file} {
		r := e.tessera(t, "run", "-q", "--out", root, job)
		if r.code == 0 || !strings.Contains(r.stderr, "output.root") || strings.Contains(r.stdout, "images made") {
			t.Errorf("root %s: %+v", root, r)
		}
	}
}

// Relative paths of a job file are its directory's, and the output root is
// made absolute at submit: submitting from one directory and serving from
// another makes the image where the submitter meant.
func TestSubmitHereServeThere(t *testing.T) {
	here, there := t.TempDir(), t.TempDir()
	os.MkdirAll(filepath.Join(here, "jobs", "photos"), 0o755)
	writeTestPNG(t, filepath.Join(here, "jobs", "photos", "p.png"), 16, 16)
	models, _ := filepath.Abs(filepath.Join("testdata", "models"))
	lib, _ := filepath.Abs(filepath.Join(".ort", "libonnxruntime.so.1"))
	queue := "sqlite://" + filepath.Join(t.TempDir(), "queue.db")
	cfg := func(dir, root string) string {
		p := filepath.Join(dir, "tessera.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf("models: {dirs: [%q]}\noutput: {root: %s}\nqueue: {url: %q}\nruntime: {threads: 1, library: %q}\nlog: {level: warn}\n", models, root, queue, lib)), 0o644)
		return p
	}
	os.WriteFile(filepath.Join(here, "jobs", "up.yaml"), []byte("version: 1\nitems:\n  - {image: photos/p.png, scale: 4, sr: {model: oracle-sr, steps: 2}}\n"), 0o644)
	if r := runIn(t, here, "--config", cfg(here, "out"), "submit", "jobs/up.yaml"); r.code != 0 {
		t.Fatalf("submit: %+v", r)
	}
	// serve in another directory, with an output root of its own, works
	// the item into the submitter's root.
	e := serveEnv{dir: there, cfg: filepath.Join(there, "tessera.yaml"), addr: serveFreeAddr(t)}
	os.WriteFile(e.cfg, []byte(fmt.Sprintf("models: {dirs: [%q]}\noutput: {root: elsewhere}\nqueue: {url: %q}\nruntime: {threads: 1, library: %q}\nlog: {level: info, format: json}\nserver: {addr: %q}\n", models, queue, lib, e.addr)), 0o644)
	d := e.start(t)
	out := filepath.Join(here, "out", "up", "0000-1.png")
	waitFor(t, "the image under the submitter's root", 30*time.Second, func() bool {
		_, err := os.Stat(jobs.SidecarPath(out))
		return err == nil
	})
	d.stop(t)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := png.DecodeConfig(f)
	if err != nil || c.Width != 64 || c.Height != 64 {
		t.Fatalf("image %v %+v", err, c)
	}
}

// A poison job file dropped in a watched inbox (a 193-byte file asking for
// a million-digit zero pad, a NaN scale) is moved to rejected/ with its
// reason, serve stays up with its memory bounded, and a good file dropped
// after them is made.
func TestServeRejectsPoisonFiles(t *testing.T) {
	e := newServeEnv(t, "", "watch: [{dir: in, settle: 200ms, rescan: 1s}]\n")
	in := filepath.Join(e.dir, "in")
	d := e.start(t)
	writeTestPNG(t, filepath.Join(in, "..", "p.png"), 8, 8)
	poison := map[string]string{
		"pad.yaml": "version: 1\noutput: \"{index:0999999}.png\"\n" +
			"defaults: {width: 64, height: 64, base: {model: oracle-base}, sr: {model: oracle-sr}}\nitems: [{count: 10000}]\n",
		"nan.yaml": "version: 1\nitems: [{image: ../p.png, scale: .nan, sr: {model: oracle-sr}}]\n",
	}
	for name, body := range poison {
		os.WriteFile(filepath.Join(in, name), []byte(body), 0o644)
	}
	waitFor(t, "poison files rejected", 20*time.Second, func() bool {
		return serveCountFiles(t, filepath.Join(in, "rejected"), ".error.txt") == len(poison)
	})
	for name, want := range map[string]string{"pad.yaml": "a zero-pad width is at most 32", "nan.yaml": "items[0].scale: must be a finite number, got NaN"} {
		reason, _ := os.ReadFile(filepath.Join(in, "rejected", name+".error.txt"))
		if !strings.Contains(string(reason), want) {
			t.Errorf("%s: reason %q lacks %q", name, reason, want)
		}
	}
	os.WriteFile(filepath.Join(in, "good.yaml"), []byte(tinyJob("good", "{job}/{index}.png", 1, 1)), 0o644)
	waitFor(t, "the good file made", 30*time.Second, func() bool {
		code, h := getHealth(t, e.addr)
		return code == 200 && queueCount(h, "completed") == 1
	})
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	for _, l := range strings.Split(string(status), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(l, "VmHWM: %d kB", &kb); err == nil && kb > 1<<20 {
			t.Errorf("serve peaked at %d MiB", kb>>10)
		}
	}
	if code, _ := d.stop(t); code != 0 {
		t.Errorf("serve exited %d", code)
	}
	if n := len(d.messages("watch: rejected job file")); n != len(poison) {
		t.Errorf("%d rejections logged, want %d (once each)", n, len(poison))
	}
}

// No log line, status output or health answer shows the queue database's
// password, given in the URL's user information or as a query value.
func TestNoPasswordInLogs(t *testing.T) {
	base := pgtest.SchemaURL(t) // trust auth: the server ignores the password
	withUser := strings.Replace(base, "postgres://postgres@", "postgres://postgres:s3cretpw@", 1)
	withQuery := base + "&password=s3cretq"
	e := newServeEnv(t, withUser, "")
	d := e.start(t)
	_, h := getHealth(t, e.addr)
	d.stop(t)
	if log := d.log(); strings.Contains(log, "s3cretpw") || !strings.Contains(log, "xxxxx") {
		t.Errorf("serve log shows the password or no redacted URL:\n%s", log)
	}
	if b, _ := json.Marshal(h); bytes.Contains(b, []byte("s3cret")) {
		t.Errorf("healthz: %s", b)
	}
	for _, u := range []string{withUser, withQuery} {
		r := tessera(t, nil, "--config", e.cfg, "status", "--queue", u)
		all := r.stdout + r.stderr
		if r.code != 0 || strings.Contains(all, "s3cret") || !strings.Contains(all, "xxxxx") {
			t.Errorf("status --queue %s:\n%s", strings.Replace(u, "s3cret", "S", -1), all)
		}
	}
}

// A queue URL that cannot be opened is reported without its password, by
// every command that opens the queue; no PostgreSQL server is needed.
func TestNoPasswordInErrors(t *testing.T) {
	e := newRunEnv(t, "")
	job := e.jobFile(t, "j", 1, 2)
	for _, u := range []string{"postgres://root:s3cretpw@127.0.0.1:1/test?connect_timeout=2", "postgres://root@127.0.0.1:1/test?password=s3cretpw&connect_timeout=2", "mysql://root:s3cretpw@db/x"} {
		for _, args := range [][]string{{"status"}, {"submit", job}, {"run", "-q", job}, {"serve", "--addr", "127.0.0.1:0"}} {
			r := e.tessera(t, append(args, "--queue", u)...)
			if r.code == 0 || strings.Contains(r.stdout+r.stderr, "s3cret") {
				t.Errorf("%s with %s: %+v", args[0], strings.Replace(u, "s3cretpw", "S", 1), r)
			}
		}
	}
}
