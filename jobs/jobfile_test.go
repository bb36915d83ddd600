package jobs

import (
	"fmt"
	"image"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tessera/config"
)

var now = time.Date(2026, 11, 26, 3, 4, 5, 0, time.UTC)

func parse(t *testing.T, name, body string) (*Job, error) {
	t.Helper()
	cfg := config.Default()
	cfg.Output.Root = "out"
	return Parse(name, []byte(body), cfg, now)
}

const sample = `
version: 1
name: land
output: "{job}/{index:04}-{seed}.png"
defaults:
  width: 256
  height: 256
  seed: 1
  base: {model: demo-base, steps: 30}
  sr: {model: demo-sr, steps: 20, tile: {size: 128, overlap: 16}}
items:
  - {seed: 7}
  - {count: 3, seed: 100}
  - {seeds: [5, 9], width: 512, sr: {steps: 10}}
`

func TestParseExpands(t *testing.T) {
	job, err := parse(t, "land.yaml", sample)
	if err != nil {
		t.Fatal(err)
	}
	var seeds []uint64
	for _, it := range job.Items {
		seeds = append(seeds, it.Seed)
	}
	if got := fmt.Sprint(seeds); got != "[7 100 101 102 5 9]" {
		t.Fatalf("seeds = %s", got)
	}
	last := job.Items[5]
	if last.Width != 512 || last.Height != 256 || last.SR.Steps != 10 || last.SR.Tile.Size != 128 || last.SR.Model != "demo-sr" || last.Base.Steps != 30 {
		t.Fatalf("merged item = %+v", last)
	}
	abs, _ := filepath.Abs(filepath.Join("out", "land", "0002-101.png"))
	if job.Items[2].Output != abs || job.Items[0].Class != -1 {
		t.Fatalf("item 2 = %+v", job.Items[2])
	}
}

func TestFormatsAgree(t *testing.T) {
	y, err := parse(t, "a.yaml", "version: 1\ndefaults: {width: 64, height: 64, base: {model: b}, sr: {model: s}}\nitems: [{seed: 3}, {count: 2}]\n")
	if err != nil {
		t.Fatal(err)
	}
	j, err := parse(t, "a.json", `{"version": 1, "defaults": {"width": 64, "height": 64, "base": {"model": "b"}, "sr": {"model": "s"}}, "items": [{"seed": 3}, {"count": 2}]}`)
	if err != nil {
		t.Fatal(err)
	}
	tm, err := parse(t, "a.toml", "version = 1\n[defaults]\nwidth = 64\nheight = 64\nbase = {model = \"b\"}\nsr = {model = \"s\"}\n[[items]]\nseed = 3\n[[items]]\ncount = 2\n")
	if err != nil {
		t.Fatal(err)
	}
	for _, other := range []*Job{j, tm} {
		if len(other.Items) != len(y.Items) {
			t.Fatalf("%d items vs %d", len(other.Items), len(y.Items))
		}
		for i := range y.Items {
			if ItemHash(other.Items[i]) != ItemHash(y.Items[i]) || other.Items[i].Output != y.Items[i].Output {
				t.Errorf("item %d differs: %+v vs %+v", i, other.Items[i], y.Items[i])
			}
		}
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, file, body string
		want             []string
	}{
		{"unknown key with line", "a.yaml", "version: 1\nitems:\n  - {seed: 1, colour: red}\n", []string{"line 3", "colour"}},
		{"unknown key json", "a.json", `{"version": 1, "itemz": []}`, []string{"itemz"}},
		{"unknown key toml", "a.toml", "version = 1\nitemz = 2\n", []string{"itemz"}},
		{"every problem at once", "a.yaml", "version: 1\ndefaults: {base: {model: b}, sr: {model: s}}\nitems:\n  - {width: 100, height: 64}\n  - {width: 64, height: 64, sr: {steps: 5000}}\n  - {width: 64, height: 20000}\n",
			[]string{"items[0].width: must be a multiple of 8", "items[1].sr.steps", "items[2].height"}},
		{"escape by dots", "a.yaml", "version: 1\noutput: ../../etc/x.png\ndefaults: {width: 64, height: 64, base: {model: b}, sr: {model: s}}\nitems: [{}]\n", []string{"leaves output.root"}},
		{"absolute output", "a.yaml", "version: 1\noutput: /tmp/x.png\ndefaults: {width: 64, height: 64, base: {model: b}, sr: {model: s}}\nitems: [{}]\n", []string{"absolute"}},
		{"unknown template field", "a.yaml", "version: 1\noutput: \"{jobb}.png\"\ndefaults: {width: 64, height: 64, base: {model: b}, sr: {model: s}}\nitems: [{}]\n", []string{"{jobb}"}},
		{"colliding outputs", "a.yaml", "version: 1\noutput: same.png\ndefaults: {width: 64, height: 64, base: {model: b}, sr: {model: s}}\nitems: [{seed: 1}, {seed: 2}]\n", []string{"also the output of index 0"}},
		{"version", "a.yaml", "version: 2\nitems: []\n", []string{"version: 2 is not supported", "items: no items"}},
		{"format", "a.txt", "version: 1", []string{"unknown format"}},
		{"bad sampler", "a.yaml", "version: 1\ndefaults: {width: 64, height: 64, base: {model: b, sampler: heun}, sr: {model: s}}\nitems: [{}]\n", []string{"items[0].base.sampler"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(t, tt.file, tt.body)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if !strings.Contains(err.Error(), tt.file) {
				t.Errorf("error %q does not name the file", err)
			}
		})
	}
}

func TestImagesGlobStableOrder(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"c.png", "a.png", "b.jpg", "notes.txt"} {
		writePNG(t, filepath.Join(dir, n), 4, 4)
	}
	cfg := config.Default()
	job, err := Parse(filepath.Join(dir, "up.yaml"), []byte("version: 1\noutput: \"{name}-x4.png\"\nitems:\n  - {images: \"*.png\", scale: 4, sr: {model: demo-sr}}\n"), cfg, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(job.Items) != 2 || filepath.Base(job.Items[0].Image) != "a.png" || filepath.Base(job.Items[1].Output) != "c-x4.png" ||
		job.Items[0].InputWidth != 4 || job.Items[0].Width != 16 {
		t.Fatalf("items = %+v", job.Items)
	}
}

// writePNG writes a w×h grey PNG.
func writePNG(t testing.TB, path string, w, h int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := png.Encode(f, image.NewGray(image.Rect(0, 0, w, h))); err != nil {
		t.Fatal(err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add("a.yaml", []byte(sample))
	f.Add("a.json", []byte(`{"version":1,"items":[{"count":2}]}`))
	f.Add("a.toml", []byte("version = 1\n[[items]]\nseed = 3\n"))
	cfg := config.Default()
	root, _ := filepath.Abs(cfg.Output.Root)
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		job, err := Parse(name, data, cfg, now)
		if err == nil && len(job.Items) == 0 {
			t.Fatal("accepted a job without items")
		}
		if err == nil {
			for _, it := range job.Items {
				if !strings.HasPrefix(it.Output, root+string(filepath.Separator)) {
					t.Fatalf("output %q outside the root", it.Output)
				}
			}
		}
	})
}

func TestOutputThroughSymlinkRejected(t *testing.T) {
	root := filepath.Join(t.TempDir(), "out")
	elsewhere := t.TempDir()
	os.MkdirAll(filepath.Join(root, "inside"), 0o755)
	if err := os.Symlink(elsewhere, filepath.Join(root, "escape")); err != nil {
		t.Skip("no symlinks here:", err)
	}
	os.Symlink(filepath.Join(root, "inside"), filepath.Join(root, "alias"))
	cfg := config.Default()
	cfg.Output.Root = root
	body := func(out string) []byte {
		return []byte("version: 1\noutput: " + out + "\ndefaults: {width: 64, height: 64, base: {model: b}, sr: {model: s}}\nitems: [{}]\n")
	}
	_, err := Parse("a.yaml", body("escape/x/{seed}.png"), cfg, now)
	if err == nil || !strings.Contains(err.Error(), "items[0].output") || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("escape through a link: %v", err)
	}
	// A link that stays inside the root is fine, as is a directory not made yet.
	for _, out := range []string{"alias/{seed}.png", "new/dir/{seed}.png"} {
		if _, err := Parse("a.yaml", body(out), cfg, now); err != nil {
			t.Errorf("%s: %v", out, err)
		}
	}
}

// models.default_sr fills an item that names no SR model, but a job at the
// base model's size needs none and never asks for it; one that does names
// the setting where the model it names is missing.
func TestDefaultModels(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Output.Root = filepath.Join(dir, "out")
	cfg.Models.DefaultSR = "no-such-sr"
	path := filepath.Join(dir, "j.yaml")
	os.WriteFile(path, []byte("version: 1\nitems:\n  - {width: 32, height: 32}\n"), 0o644)
	job, err := LoadChecked(path, cfg, testModels())
	if err != nil || len(job.Plans) != 1 || len(job.Plans[0].Stages) != 1 || job.Items[0].Base.Model != "demo-base" {
		t.Fatalf("base-size job: %+v, %v", job, err)
	}
	os.WriteFile(path, []byte("version: 1\nitems:\n  - {width: 256, height: 256}\n"), 0o644)
	if _, err := LoadChecked(path, cfg, testModels()); err == nil || !strings.Contains(err.Error(), "models.default_sr") || !strings.Contains(err.Error(), "no-such-sr") {
		t.Fatalf("a missing default SR model: %v", err)
	}
}

// A file of many bad items is reported by its first problems, and a file
// over limits.max_items stops expanding at the first item over it.
func TestRejectionsAreBounded(t *testing.T) {
	var b strings.Builder
	b.WriteString("version: 1\ndefaults: {width: 64, height: 64}\nitems:\n")
	for i := 0; i < 20000; i++ {
		b.WriteString("  - {width: 63}\n")
	}
	_, err := Parse("bad.yaml", []byte(b.String()), config.Default(), now)
	if err == nil || len(err.Error()) > 20000 || !strings.Contains(err.Error(), "more problems") {
		t.Fatalf("%d bytes of error: %.300s", len(fmt.Sprint(err)), err)
	}
	b.Reset()
	b.WriteString("version: 1\ndefaults: {width: 64, height: 64}\nitems:\n")
	for i := 0; i < 20000; i++ {
		b.WriteString("  - {}\n")
	}
	cfg := config.Default()
	cfg.Limits.MaxItems = 100
	_, err = Parse("many.yaml", []byte(b.String()), cfg, now)
	if err == nil || strings.Count(err.Error(), "limits.max_items") != 1 || !strings.Contains(err.Error(), "items[100]") {
		t.Fatalf("over max_items: %.300s", err)
	}
}
