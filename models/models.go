// Package models holds the demo models embedded in the binary and resolves
// a model reference (an embedded name, a name in a configured model
// directory, or a path) to a described onnx.Model.
package models

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"tessera/onnx"
	"tessera/stages/tokenizer"
)

// Embedded is one model compiled into the binary.
type Embedded struct {
	Name     string
	ONNX     []byte
	Manifest []byte
}

// embedded is filled by embed.go.
var embedded = map[string]Embedded{}

// Names lists the embedded models.
func Names() []string {
	names := make([]string, 0, len(embedded))
	for n := range embedded {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Lookup returns the embedded model called name.
func Lookup(name string) (Embedded, bool) {
	e, ok := embedded[name]
	return e, ok
}

// ErrUnknownModel is wrapped when a reference names no model.
var ErrUnknownModel = errors.New("unknown model")

// Resolver finds models by reference.
type Resolver struct {
	Dirs       []string // configured model directories, searched in order
	AllowPaths bool     // whether a reference may be a file system path
}

// Find locates the model ref names without loading it: the embedded model
// of that name, or the file to load. A ref is, in order: an embedded model's
// name, a directory <dir>/<ref>/ holding model.onnx, or a file
// <dir>/<ref>.onnx in a configured directory, or (when paths are allowed) a
// path to a model file or its directory.
func (r Resolver) Find(ref string) (embedded *Embedded, path string, err error) {
	if e, ok := Lookup(ref); ok {
		return &e, "", nil
	}
	if isPlainName(ref) {
		for _, dir := range r.Dirs {
			for _, p := range []string{filepath.Join(dir, ref, "model.onnx"), filepath.Join(dir, ref, "unet", "model.onnx"), filepath.Join(dir, ref+".onnx")} {
				if _, err := os.Stat(p); err == nil {
					return nil, p, nil
				}
			}
		}
	}
	if _, err := os.Stat(ref); err == nil {
		if !r.AllowPaths {
			return nil, "", fmt.Errorf("model %q: paths to models are not allowed here (set models.allow_paths, or put it in a directory of models.dirs)", ref)
		}
		return nil, ref, nil
	}
	return nil, "", fmt.Errorf("%w %q: not an embedded model (%s), not found in models.dirs (%s), and no such file",
		ErrUnknownModel, ref, strings.Join(Names(), ", "), strings.Join(r.Dirs, ", "))
}

// Resolve finds the model ref names (see Find) and describes it.
func (r Resolver) Resolve(env *onnx.Env, ref string) (*onnx.Model, error) {
	e, path, err := r.Find(ref)
	if err != nil {
		return nil, err
	}
	if e != nil {
		return env.LoadModelBytes(e.Name, e.ONNX, e.Manifest)
	}
	return env.LoadModel(path)
}

func isPlainName(ref string) bool {
	return ref != "" && !strings.ContainsAny(ref, `/\`) && ref != "." && ref != ".."
}

// Manifest reads the manifest of the model ref names without ONNX Runtime,
// after checking what can be checked without it: that the file is ONNX,
// that its external data files exist and that its manifest is valid. The
// planner needs it; a model without one is an error.
func (r Resolver) Manifest(ref string) (*onnx.Manifest, error) {
	e, path, err := r.Find(ref)
	if err != nil {
		return nil, err
	}
	var man *onnx.Manifest
	var hdr *onnx.ModelHeader
	if e != nil {
		hdr, man, err = onnx.ReadModelBytes(e.Name, e.ONNX, e.Manifest)
	} else {
		_, hdr, man, err = onnx.ReadModelFile(path)
	}
	if err != nil {
		return nil, err
	}
	if man == nil {
		return nil, fmt.Errorf("model %s has neither a %s nor a diffusers config.json: the pipeline needs its kind, schedule and prediction type", ref, onnx.ManifestFile)
	}
	if c := onnx.FileContract(hdr, man); !c.Fits {
		return nil, fmt.Errorf("model %s does not fit the %s contract: %s", ref, c.Kind, strings.Join(c.Problems, "; "))
	}
	return man, nil
}

// Manifests returns Manifest with each reference's answer kept, for the
// many items of one job file.
func (r Resolver) Manifests() func(ref string) (*onnx.Manifest, error) {
	type answer struct {
		m   *onnx.Manifest
		err error
	}
	seen := map[string]answer{}
	return func(ref string) (*onnx.Manifest, error) {
		if a, ok := seen[ref]; ok {
			return a.m, a.err
		}
		m, err := r.Manifest(ref)
		seen[ref] = answer{m, err}
		return m, err
	}
}

// Tokenizer returns the tokenizer of the model ref names: the tokenizer/
// folder of its pipeline (beside the model's folder, or in it), or ref
// itself when it is a tokenizer folder (vocab.json and merges.txt) or
// CLIP's merge list (.txt.gz).
func (r Resolver) Tokenizer(ref string) (tokenizer.Tokenizer, string, error) {
	if strings.HasSuffix(ref, ".txt.gz") {
		t, err := tokenizer.LoadCLIPMerges(ref)
		return t, ref, err
	}
	var dirs []string
	if st, err := os.Stat(ref); err == nil && st.IsDir() {
		dirs = append(dirs, ref, filepath.Join(ref, "tokenizer"))
	}
	if _, path, err := r.Find(ref); err == nil && path != "" {
		d := filepath.Dir(path)
		dirs = append(dirs, filepath.Join(d, "tokenizer"), filepath.Join(d, "..", "tokenizer"))
	}
	for _, d := range dirs {
		_, e1 := os.Stat(filepath.Join(d, "vocab.json"))
		_, e2 := os.Stat(filepath.Join(d, "spiece.model"))
		if e1 == nil || e2 == nil {
			t, err := tokenizer.LoadDir(d)
			return t, d, err
		}
	}
	return nil, "", fmt.Errorf("model %q: no tokenizer/ folder (vocab.json and merges.txt) beside it or in its pipeline folder", ref)
}
