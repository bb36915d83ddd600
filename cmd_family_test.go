package main

import (
	"bytes"
	"fmt"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tessera/stages"
)

// familyEnv is a run environment whose models are the family fixtures, as
// diffusers and Optimum lay them out, with no tessera.yaml.
func familyEnv(t *testing.T) (runEnv, string) {
	t.Helper()
	e := newRunEnv(t, "")
	families, _ := filepath.Abs(filepath.Join("testdata", "families"))
	cfg, _ := os.ReadFile(e.cfg)
	models, _ := filepath.Abs(filepath.Join("testdata", "models"))
	cfg = bytes.Replace(cfg, []byte(fmt.Sprintf("models: {dirs: [%q]}", models)), []byte(fmt.Sprintf("models: {dirs: [%q, %q]}", families, models)), 1)
	os.WriteFile(e.cfg, cfg, 0o644)
	return e, families
}

// An IF II-like pipeline folder runs from a job file with a context file
// and its negative: the image is made, and its metadata records the
// model's own noise level and the contexts.
func TestRunFamilyFromFolder(t *testing.T) {
	e, families := familyEnv(t)
	writeTestPNG(t, filepath.Join(e.dir, "in.png"), 16, 16)
	ctx := filepath.Join(families, "contexts")
	job := filepath.Join(e.dir, "if.yaml")
	os.WriteFile(job, []byte(fmt.Sprintf(`version: 1
defaults:
  context: %s
  sr: {model: if2-like, steps: 3, guidance: 2, tile: {size: 32, overlap: 8}}
items:
  - {image: in.png, negative_context: %s}
  - {image: in.png, seed: 2, context: %s}
`, filepath.Join(ctx, "prompt-7x32.npy"), filepath.Join(ctx, "negative-7x32.npy"), filepath.Join(ctx, "prompt-7x32.safetensors"))), 0o644)
	r := e.tessera(t, "run", "-q", job)
	if r.code != 0 || !strings.Contains(r.stdout, "2 images made") {
		t.Fatalf("run: %+v", r)
	}
	e.checkOutputs(t, job)
	data, err := os.ReadFile(filepath.Join(e.out, "if", "0000-1.png"))
	if err != nil {
		t.Fatal(err)
	}
	params, meta, err := stages.ReadPNGMetadata(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"(model's 250)", "Context: prompt-7x32.npy", "Negative context: negative-7x32.npy", "Size: 64x64"} {
		if !strings.Contains(params, want) {
			t.Errorf("parameters lack %q: %s", want, params)
		}
	}
	for _, want := range []string{`"variance_type":"learned_range"`, `"thresholding_ratio":0.95`, `"noise_level_model":250`} {
		if !strings.Contains(string(meta), want) {
			t.Errorf("plan lacks %s: %s", want, meta)
		}
	}
}

// What the pipeline cannot do yet, and bad variants of the family folders,
// are refused at submit, naming the field, before anything is queued; and
// inspect says what is wrong with each variant.
func TestFamilyRefusals(t *testing.T) {
	e, families := familyEnv(t)
	writeTestPNG(t, filepath.Join(e.dir, "in.png"), 16, 16)
	ctx := filepath.Join(families, "contexts")
	variants := filepath.Join(e.dir, "variants")
	variant := func(name string, edit func(dir string)) {
		copyTree(t, filepath.Join(families, "if2-like"), filepath.Join(variants, name))
		edit(filepath.Join(variants, name))
	}
	edit := func(path, old, new string) {
		data, _ := os.ReadFile(path)
		if !bytes.Contains(data, []byte(old)) {
			t.Fatalf("%s lacks %q", path, old)
		}
		os.WriteFile(path, bytes.Replace(data, []byte(old), []byte(new), 1), 0o644)
	}
	variant("bad-split", func(d string) { edit(filepath.Join(d, "unet", "config.json"), `"in_channels": 6`, `"in_channels": 7`) })
	copyTree(t, filepath.Join(families, "x4-like"), filepath.Join(variants, "x4-no-decoder"))
	os.RemoveAll(filepath.Join(variants, "x4-no-decoder", "vae_decoder"))
	variant("no-scheduler", func(d string) { os.RemoveAll(filepath.Join(d, "scheduler")) })
	variant("bad-variance", func(d string) {
		edit(filepath.Join(d, "scheduler", "scheduler_config.json"), `"variance_type": "learned_range"`, `"variance_type": "bogus"`)
	})
	cfg, _ := os.ReadFile(e.cfg)
	cfg = bytes.Replace(cfg, []byte("models: {dirs: ["), []byte(fmt.Sprintf("models: {dirs: [%q, ", variants)), 1)
	os.WriteFile(e.cfg, cfg, 0o644)
	for _, c := range []struct{ name, item, want string }{
		{"latent without a decoder", fmt.Sprintf(`{image: in.png, context: %s, sr: {model: x4-no-decoder}}`, filepath.Join(ctx, "prompt-7x32.npy")), "items[0]: sr.model: x4-no-decoder is a latent model without an autoencoder (no vae_decoder/ in its pipeline folder"},
		{"no context", `{image: in.png, sr: {model: if2-like}}`, "items[0]: context: sr.model if2-like takes text embeddings"},
		{"context of the wrong width", fmt.Sprintf(`{image: in.png, context: %s, sr: {model: if2-like}}`, filepath.Join(ctx, "wrong-width-7x16.npy")), "items[0]: context: " + filepath.Join(ctx, "wrong-width-7x16.npy") + " is [7, 16]; sr.model if2-like takes D = 32"},
		{"context nobody takes", fmt.Sprintf(`{image: in.png, context: %s, sr: {model: oracle-sr}}`, filepath.Join(ctx, "prompt-7x32.npy")), "items[0]: context: no model of this item's cascade takes text embeddings"},
		{"wrong channel split", fmt.Sprintf(`{image: in.png, context: %s, sr: {model: bad-split}}`, filepath.Join(ctx, "prompt-7x32.npy")), `items[0].sr.model: model bad-split does not fit the sr contract: input "sample" (sample): 6 channels, want 7`},
		{"missing scheduler config", `{image: in.png, sr: {model: no-scheduler}}`, "items[0].sr.model: load model"},
		{"unknown variance_type", `{image: in.png, sr: {model: bad-variance}}`, `variance_type: "bogus"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			job := filepath.Join(e.dir, strings.ReplaceAll(c.name, " ", "-")+".yaml")
			os.WriteFile(job, []byte("version: 1\nitems:\n  - "+c.item+"\n"), 0o644)
			r := e.tessera(t, "submit", job)
			if r.code != 1 || !strings.Contains(r.stderr, c.want) {
				t.Errorf("submit: code %d, stderr lacks %q:\n%s", r.code, c.want, r.stderr)
			}
		})
	}
	st := e.status(t)
	for state, n := range st.Counts {
		if n != 0 {
			t.Errorf("%d items %s after refusals", n, state)
		}
	}
	for name, want := range map[string]string{
		"bad-split":    "6 channels, want 7",
		"no-scheduler": "no scheduler_config.json",
		"bad-variance": `variance_type: "bogus"`,
	} {
		r := e.tessera(t, "inspect", filepath.Join(variants, name))
		if !strings.Contains(r.stdout+r.stderr, want) {
			t.Errorf("inspect %s lacks %q: %+v", name, want, r)
		}
	}
}

// copyTree copies a directory tree of regular files.
func copyTree(t *testing.T, from, to string) {
	t.Helper()
	filepath.WalkDir(from, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o755)
		}
		data, err := os.ReadFile(p)
		if err == nil {
			err = os.WriteFile(filepath.Join(to, rel), data, 0o644)
		}
		return err
	})
}

// A job file's prompts: one item per prompt, each encoded by the
// pipeline's own text encoder, recorded the A1111 way (the prompt on the
// first line, the negative one on the second); tessera tokenize shows the
// ids the encoder is fed and where a long prompt is cut.
func TestRunPrompts(t *testing.T) {
	e, families := familyEnv(t)
	writeTestPNG(t, filepath.Join(e.dir, "in.png"), 16, 16)
	job := filepath.Join(e.dir, "p.yaml")
	os.WriteFile(job, []byte(`version: 1
output: "{job}/{index}.png"
defaults:
  negative_prompt: blurry, low quality
  sr: {model: if2-text, steps: 3, guidance: 3, tile: {size: 32, overlap: 8}}
items:
  - {image: in.png, prompts: ["a red fox in the snow", "a blue fox in the snow"]}
`), 0o644)
	r := e.tessera(t, "run", "-q", job)
	if r.code != 0 || !strings.Contains(r.stdout, "2 images made") {
		t.Fatalf("run: %+v", r)
	}
	e.checkOutputs(t, job)
	for i, prompt := range []string{"a red fox in the snow", "a blue fox in the snow"} {
		data, err := os.ReadFile(filepath.Join(e.out, "p", fmt.Sprintf("%d.png", i)))
		if err != nil {
			t.Fatal(err)
		}
		params, _, err := stages.ReadPNGMetadata(data)
		if err != nil || !strings.HasPrefix(params, prompt+"\nNegative prompt: blurry, low quality\n") {
			t.Errorf("item %d parameters: %q %v", i, params, err)
		}
	}
	// A prompt for a model without a text encoder is refused at submit.
	os.WriteFile(job, []byte("version: 1\nitems:\n  - {image: in.png, prompt: a fox, sr: {model: if2-like}}\n"), 0o644)
	if r := e.tessera(t, "submit", job); r.code != 1 || !strings.Contains(r.stderr, "prompt: sr.model if2-like has no text_encoder/") {
		t.Errorf("prompt without an encoder: %+v", r)
	}
	// A prompt over the encoder's 77 tokens is cut where the tokenizer
	// says, and the cut is recorded.
	os.WriteFile(job, []byte("version: 1\noutput: long.png\nitems:\n  - {image: in.png, prompt: \""+strings.Repeat("red fox ", 60)+"\", sr: {model: if2-text, steps: 2}}\n"), 0o644)
	if r := e.tessera(t, "run", "-q", job); r.code != 0 {
		t.Fatalf("long prompt: %+v", r)
	}
	data, _ := os.ReadFile(filepath.Join(e.out, "long.png"))
	if params, _, _ := stages.ReadPNGMetadata(data); !strings.Contains(params, "Prompt cut: ") {
		t.Errorf("the cut is not recorded: %q", params)
	}
	long := strings.Repeat("red fox ", 60)
	r = e.tessera(t, "tokenize", "--json", filepath.Join(families, "if2-text"), "a red fox", long)
	if r.code != 0 || !strings.Contains(r.stdout, `"truncated_at": 75`) || !strings.Contains(r.stdout, `"truncated_at": -1`) {
		t.Errorf("tokenize: %+v", r)
	}
}

// The latent SR families run end to end: the U-Net denoises the latent
// canvas at the low-res size with the low-res image concatenated, and the
// pipeline's decoder (run in tiles of the latent canvas) makes the 4×
// image; the plan records the decode.
func TestRunLatentFamilies(t *testing.T) {
	e, families := familyEnv(t)
	writeTestPNG(t, filepath.Join(e.dir, "in.png"), 24, 24)
	ctx := filepath.Join(families, "contexts", "prompt-7x32.npy")
	job := filepath.Join(e.dir, "latent.yaml")
	os.WriteFile(job, []byte(fmt.Sprintf(`version: 1
output: "{job}/{index}.png"
items:
  - {image: in.png, context: %s, sr: {model: x4-like, steps: 3, guidance: 2, tile: {size: 16, overlap: 4}}}
  - {image: in.png, sr: {model: ldm-sr-like, steps: 3}}
  - {image: in.png, scale: 4, context: %s, sr: {model: sd-like, steps: 4, strength: 0.5, guidance: 2, tile: {size: 16, overlap: 4}}}
`, ctx, ctx)), 0o644)
	r := e.tessera(t, "run", "-q", job)
	if r.code != 0 || !strings.Contains(r.stdout, "3 images made") {
		t.Fatalf("run: %+v", r)
	}
	e.checkOutputs(t, job)
	// The img2img upscale with the KL-like autoencoder: encoded, denoised
	// in 4 tiles of the 24² latent canvas, decoded to 96².
	data, _ := os.ReadFile(filepath.Join(e.out, "latent", "2.png"))
	if _, meta, err := stages.ReadPNGMetadata(data); err != nil || !strings.Contains(string(meta), `"kind":"img2img"`) || !strings.Contains(string(meta), `"encode":{"autoencoder":`) || !strings.Contains(string(meta), `"tiles":4`) {
		t.Errorf("img2img item: %v %s", err, meta)
	}
	if c, err := png.DecodeConfig(bytes.NewReader(data)); err != nil || c.Width != 96 {
		t.Errorf("img2img item: %v %dx%d", err, c.Width, c.Height)
	}
	for i := 0; i < 2; i++ {
		data, _ := os.ReadFile(filepath.Join(e.out, "latent", fmt.Sprintf("%d.png", i)))
		_, meta, err := stages.ReadPNGMetadata(data)
		if err != nil || !strings.Contains(string(meta), `"decode":{"autoencoder":`) || !strings.Contains(string(meta), `"statistics":"image"`) {
			t.Errorf("item %d: %v %s", i, err, meta)
		}
		// The image itself is the decoder's 4×: 96², not the 24² latent canvas.
		c, err := png.DecodeConfig(bytes.NewReader(data))
		if err != nil || c.Width != 96 || c.Height != 96 {
			t.Errorf("item %d: %v %dx%d", i, err, c.Width, c.Height)
		}
	}
}

// An img2img upscale and a latent base stage run end to end from a job
// file: the sidecar's plan records the encode and the decode with the
// autoencoder's scaling and shift, and the A1111 parameters say so.
func TestRunImg2ImgAndLatentBase(t *testing.T) {
	e, _ := familyEnv(t)
	writeTestPNG(t, filepath.Join(e.dir, "in.png"), 24, 24)
	job := filepath.Join(e.dir, "img2img.yaml")
	os.WriteFile(job, []byte(`version: 1
output: "{job}/{index}.png"
items:
  - {image: in.png, scale: 2, sr: {model: img2img-oracle, steps: 4, strength: 0.5, tile: {size: 8, overlap: 2}}}
  - {width: 32, height: 32, base: {model: latent-base-oracle, steps: 3}}
`), 0o644)
	r := e.tessera(t, "run", "-q", job)
	if r.code != 0 || !strings.Contains(r.stdout, "2 images made") {
		t.Fatalf("run: %+v", r)
	}
	e.checkOutputs(t, job)
	for i, want := range []struct {
		size  int
		meta  []string
		param string
	}{
		{48, []string{`"kind":"img2img"`, `"encode":{"autoencoder":`, `"scaling":0.5,"shift":0.1`, `"strength":0.5`}, "img2img img2img-oracle 12x12 steps 4 ddim strength 0.5 tile 8/2/0 latent ×4 scaling 0.5 shift 0.1 statistics tile"},
		{32, []string{`"kind":"base"`, `"space":"latent"`, `"decode":{"autoencoder":`, `"scaling":1`}, "Base: latent-base-oracle latent ×4 scaling 1 statistics tile"},
	} {
		data, _ := os.ReadFile(filepath.Join(e.out, "img2img", fmt.Sprintf("%d.png", i)))
		params, meta, err := stages.ReadPNGMetadata(data)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range want.meta {
			if !strings.Contains(string(meta), s) {
				t.Errorf("item %d: metadata lacks %s: %s", i, s, meta)
			}
		}
		if !strings.Contains(params, want.param) {
			t.Errorf("item %d: parameters lack %q: %s", i, want.param, params)
		}
		c, err := png.DecodeConfig(bytes.NewReader(data))
		if err != nil || c.Width != want.size || c.Height != want.size {
			t.Errorf("item %d: %v %dx%d", i, err, c.Width, c.Height)
		}
	}
}
