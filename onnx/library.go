package onnx

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// LibraryEnv is the environment variable naming libonnxruntime explicitly.
const LibraryEnv = "TESSERA_ORT_LIB"

// libraryNames are the file names looked for in each directory, newest first.
var libraryNames = []string{"libonnxruntime.so.1", "libonnxruntime.so", "libonnxruntime.dylib", "onnxruntime.dll"}

// ErrLibraryNotFound is wrapped by FindLibrary's error when no candidate exists.
var ErrLibraryNotFound = errors.New("ONNX Runtime library not found")

// Library is a located ONNX Runtime shared library.
type Library struct {
	Path   string // what is passed to the loader
	Source string // config, env, workdir, executable or system
}

// FindLibrary locates libonnxruntime, in this order: the configured path, the
// TESSERA_ORT_LIB environment variable, .ort/ in the working directory and its
// parents up to the module root, .ort/ beside the executable, then the system
// loader's own search (LD_LIBRARY_PATH, ld.so.cache) by bare name. An explicit
// path that does not exist is an error rather than a reason to keep looking.
func FindLibrary(configured string) (Library, error) {
	if configured != "" {
		return explicitLibrary(configured, "config runtime.library")
	}
	if env := os.Getenv(LibraryEnv); env != "" {
		return explicitLibrary(env, LibraryEnv)
	}
	var tried []string
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; dir = filepath.Dir(dir) {
			if p, ok := findIn(filepath.Join(dir, ".ort"), &tried); ok {
				return Library{Path: p, Source: "workdir"}, nil
			}
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil || filepath.Dir(dir) == dir {
				break
			}
		}
	}
	if exe, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
		dir := filepath.Dir(exe)
		for _, d := range []string{filepath.Join(dir, ".ort"), filepath.Join(dir, "..", ".ort")} {
			if p, ok := findIn(d, &tried); ok {
				return Library{Path: p, Source: "executable"}, nil
			}
		}
	}
	if p, ok := systemLibrary(&tried); ok {
		return Library{Path: p, Source: "system"}, nil
	}
	return Library{}, fmt.Errorf("%w: looked for %s in: %s; run `make ort` in the Tessera checkout to fetch it into .ort/, or set runtime.library or %s to its path",
		ErrLibraryNotFound, libraryNames[0], strings.Join(tried, ", "), LibraryEnv)
}

func explicitLibrary(path, source string) (Library, error) {
	st, err := os.Stat(path)
	if err != nil {
		return Library{}, fmt.Errorf("%w: %s names %q: %v; run `make ort` to fetch the library into .ort/, or correct the path",
			ErrLibraryNotFound, source, path, err)
	}
	if st.IsDir() {
		if p, ok := findIn(path, new([]string)); ok {
			return Library{Path: p, Source: source}, nil
		}
		return Library{}, fmt.Errorf("%w: %s names directory %q, which holds no %s", ErrLibraryNotFound, source, path, libraryNames[0])
	}
	abs, _ := filepath.Abs(path)
	return Library{Path: abs, Source: source}, nil
}

func findIn(dir string, tried *[]string) (string, bool) {
	dir = filepath.Clean(dir)
	for _, t := range *tried {
		if t == dir {
			return "", false
		}
	}
	*tried = append(*tried, dir)
	for _, name := range libraryNames {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			abs, _ := filepath.Abs(p)
			return abs, true
		}
	}
	return "", false
}

// systemLibrary asks whether the system loader would find the library: it
// checks LD_LIBRARY_PATH and the usual library directories, so that the error
// can list where it looked.
func systemLibrary(tried *[]string) (string, bool) {
	for _, dir := range loaderDirs() {
		if _, ok := findIn(dir, tried); ok {
			// Hand the bare name to the loader so it resolves it the way it would for any program.
			for _, name := range libraryNames {
				if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
					return name, true
				}
			}
		}
	}
	return "", false
}

// loaderDirs are the directories the dynamic loader searches, as far as can be
// told without running it.
func loaderDirs() []string {
	var dirs []string
	for _, d := range filepath.SplitList(os.Getenv("LD_LIBRARY_PATH")) {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	return append(dirs, "/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu")
}
