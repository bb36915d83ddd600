package jobs

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"image/png"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"tessera/pipeline"
	"tessera/stages"
)

// Sidecar is the JSON written beside each PNG (NAME.json): the item, its
// plan, and hashes that tie the two files together.
type Sidecar struct {
	Version   int           `json:"version"`
	Job       string        `json:"job"`
	Item      pipeline.Item `json:"item"`
	ItemHash  string        `json:"item_hash"`
	Plan      pipeline.Plan `json:"plan"`
	Seconds   float64       `json:"seconds"`
	PNGSHA256 string        `json:"png_sha256"`
	Tessera   string        `json:"tessera"`
}

// ItemHash is the SHA-256 of the item's JSON, which names everything that
// determines its pixels.
func ItemHash(it pipeline.Item) string {
	it.Index = 0 // where an item sits in its file does not change its pixels
	b, _ := json.Marshal(it)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// SidecarPath is the JSON file beside an output PNG.
func SidecarPath(pngPath string) string {
	return strings.TrimSuffix(pngPath, filepath.Ext(pngPath)) + ".json"
}

// Done reports whether the item's PNG and sidecar both exist and agree: the
// sidecar names this item and the PNG's hash. A rerun skips such items.
// Both are read inside root, as Write writes them (no link out of it is
// followed), and only as regular files; the sidecar is read up to
// maxSidecarBytes and the PNG is hashed as it streams.
func Done(root string, it pipeline.Item) bool {
	rel, err := filepath.Rel(root, it.Output)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return false
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return false
	}
	defer r.Close()
	open := func(name string) (*os.File, bool) {
		f, err := r.Open(name)
		if err != nil {
			return nil, false
		}
		if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
			f.Close()
			return nil, false
		}
		return f, true
	}
	f, ok := open(SidecarPath(rel))
	if !ok {
		return false
	}
	data, err := io.ReadAll(io.LimitReader(f, maxSidecarBytes+1))
	f.Close()
	var sc Sidecar
	if err != nil || len(data) > maxSidecarBytes || json.Unmarshal(data, &sc) != nil || sc.ItemHash != ItemHash(it) {
		return false
	}
	if f, ok = open(rel); !ok {
		return false
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	return hex.EncodeToString(h.Sum(nil)) == sc.PNGSHA256
}

// maxSidecarBytes bounds the sidecar Done reads: Tessera's own are a few kB.
const maxSidecarBytes = 1 << 20

// WriteOptions are what Write needs besides the image.
type WriteOptions struct {
	Version     string               // tessera's, recorded in the sidecar
	Compression png.CompressionLevel // see stages.PNGCompression
}

// Write stores a finished image under root: the PNG (with an A1111
// `parameters` chunk and a `tessera` chunk holding the sidecar's JSON) and
// then the sidecar, each atomically. The sidecar goes last, so an image
// whose sidecar exists and matches is complete.
//
// Every directory and file is opened relative to root with os.Root, which
// follows no link out of it: a symbolic link made inside the output root
// after the item was queued cannot send the image elsewhere. Such a link,
// and an output outside root, are pipeline.ClassInvalid; an unwritable
// root or a name too long for the file system are ClassEnvironment.
func Write(root, job string, it pipeline.Item, res *pipeline.Result, o WriteOptions) error {
	rel, err := filepath.Rel(root, it.Output)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) || filepath.IsAbs(rel) {
		return pipeline.Invalidf("output %s is not under the output root %s", it.Output, root)
	}
	img, err := stages.TensorToNRGBA(res.Image, res.Channels, res.Height, res.Width)
	if err != nil {
		return err
	}
	sc := Sidecar{Version: 1, Job: job, Item: it, ItemHash: ItemHash(it), Plan: res.Plan, Seconds: res.Seconds, Tessera: o.Version}
	meta, err := json.Marshal(sc)
	if err != nil {
		return err
	}
	params, err := stages.FormatParameters(parametersOf(it, res.Plan))
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := stages.EncodePNG(&buf, img, o.Compression, stages.ParametersChunk(params), stages.TesseraChunk(meta)); err != nil {
		return fmt.Errorf("encode %s: %w", it.Output, err)
	}
	// The root itself was checked when the item was queued; it may not
	// exist yet where another process submitted the item.
	if err := os.MkdirAll(root, 0o755); err != nil {
		return pipeline.Environment(fmt.Errorf("output.root: %w", err))
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return pipeline.Environment(fmt.Errorf("output.root: %w", err))
	}
	defer r.Close()
	if err := r.MkdirAll(filepath.Dir(rel), 0o755); err != nil {
		return rootError(root, it.Output, err)
	}
	if err := writeInRoot(r, rel, buf.Bytes()); err != nil {
		return rootError(root, it.Output, err)
	}
	sum := sha256.Sum256(buf.Bytes())
	sc.PNGSHA256 = hex.EncodeToString(sum[:])
	side, err := json.MarshalIndent(sc, "", "  ")
	if err != nil {
		return err
	}
	if err := writeInRoot(r, SidecarPath(rel), append(side, '\n')); err != nil {
		return rootError(root, SidecarPath(it.Output), err)
	}
	return nil
}

// rootError classifies an error of an os.Root operation: a path that
// escapes the root (through a link) is the item's fault, the rest as
// pipeline.Classify says.
func rootError(root, out string, err error) error {
	if strings.Contains(err.Error(), "escapes from parent") {
		return pipeline.Invalidf("output %s leaves output.root %s through a symbolic link: %w", out, root, err)
	}
	return fmt.Errorf("write %s: %w", out, err)
}

// writeInRoot is WriteFileAtomic inside r: a temp file beside rel, written,
// checked, synced, closed and renamed over rel, then the directory synced.
func writeInRoot(r *os.Root, rel string, data []byte) (err error) {
	var rnd [6]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(filepath.Dir(rel), "."+filepath.Base(rel)+".tmp-"+tempOwner+"-"+hex.EncodeToString(rnd[:]))
	f, err := r.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			r.Remove(tmp)
		}
	}()
	n, err := f.Write(data)
	if err == nil && n != len(data) {
		err = errors.New("short write")
	}
	if err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = r.Rename(tmp, rel); err != nil {
		return err
	}
	d, err := r.Open(filepath.Dir(rel))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// parametersOf renders the A1111 key/value line.
func parametersOf(it pipeline.Item, p pipeline.Plan) stages.Parameters {
	kv := func(k string, v any) stages.Param { return stages.Param{Key: k, Value: fmt.Sprint(v)} }
	var ps []stages.Param
	var last pipeline.StagePlan
	if len(p.Stages) > 0 {
		last = p.Stages[0]
	}
	ps = append(ps, kv("Steps", last.Steps), kv("Sampler", last.Sampler), kv("Seed", it.Seed), kv("Size", fmt.Sprintf("%dx%d", p.Width, p.Height)), kv("Model", last.Model))
	if last.Guidance != 0 {
		ps = append(ps, kv("CFG scale", last.Guidance))
	}
	if it.Class >= 0 {
		ps = append(ps, kv("Class", it.Class))
	}
	for i, s := range p.Stages {
		var v string
		switch s.Kind {
		case "sr":
			noise := fmt.Sprintf("noise %g", s.NoiseLevel)
			if s.NoiseLevelModel > 0 {
				noise += fmt.Sprintf(" (model's %g)", s.NoiseLevelModel)
			}
			v = fmt.Sprintf("%s %dx%d steps %d %s strength %g %s tile %d/%d/%d", s.Model, s.Width, s.Height, s.Steps, s.Sampler, s.Strength, noise, s.TileSize, s.Overlap, s.Halo)
		case pipeline.KindImg2Img:
			v = fmt.Sprintf("img2img %s %dx%d steps %d %s strength %g tile %d/%d/%d", s.Model, s.Width, s.Height, s.Steps, s.Sampler, s.Strength, s.TileSize, s.Overlap, s.Halo)
		}
		// A latent stage: its space, factor and scaling.
		if d := s.Decode; d != nil {
			if v == "" {
				v = s.Model
			}
			v += fmt.Sprintf(" latent ×%d scaling %g", d.Factor, d.Scaling)
			if d.Shift != 0 {
				v += fmt.Sprintf(" shift %g", d.Shift)
			}
			v += " statistics " + d.Statistics
		}
		if v == "" {
			continue
		}
		key := "SR " + strconv.Itoa(i)
		if s.Kind == "base" {
			key = "Base"
		}
		ps = append(ps, stages.Param{Key: key, Value: v})
	}
	if it.Image != "" {
		ps = append(ps, kv("Upscaled from", filepath.Base(it.Image)))
	}
	if it.Context != nil {
		ps = append(ps, kv("Context", filepath.Base(it.Context.Path)+" "+it.Context.SHA256[:12]))
	}
	if p.PromptCut != "" {
		ps = append(ps, kv("Prompt cut", p.PromptCut))
	}
	if it.NegativeContext != nil {
		ps = append(ps, kv("Negative context", filepath.Base(it.NegativeContext.Path)+" "+it.NegativeContext.SHA256[:12]))
	}
	return stages.Parameters{Prompt: it.Prompt, NegativePrompt: it.NegativePrompt, Params: ps}
}

// WriteFileAtomic writes data to path so that path holds either its old
// content or all of data, even across a crash (see writeInRoot, in path's
// directory).
func WriteFileAtomic(path string, data []byte) error {
	r, err := os.OpenRoot(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer r.Close()
	if err := writeInRoot(r, filepath.Base(path), data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// StaleTempAge is how old a temp file of another machine (or of an older
// version, whose names carry no owner) must be before RemoveStaleTemps
// takes it for a crash's leftover: WriteFileAtomic holds one only for the
// time of a write and an fsync, so a younger one may belong to a live
// process on an output root shared between machines.
const StaleTempAge = 10 * time.Minute

// tempOwner names the process in its temp files, PID@host, so that a later
// start on the same machine can tell a dead process's leftovers from a
// live one's.
var tempOwner = fmt.Sprintf("%d@%s", os.Getpid(), tempHost)

// tempHost is this machine's name as temp files carry it.
var tempHost = sanitizeHost(hostname())

func hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "unknown"
	}
	return h
}

// sanitizeHost keeps a host name to letters, digits, dots and dashes.
func sanitizeHost(h string) string {
	return strings.Map(func(r rune) rune {
		if r == '.' || r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' {
			return r
		}
		return '_'
	}, h)
}

// tempOwnerOf reads PID@host back out of a temp file's name
// (.NAME.tmp-PID@HOST-RANDOM); ok is false for names without one.
func tempOwnerOf(name string) (pid int, host string, ok bool) {
	i := strings.LastIndex(name, ".tmp-")
	if i < 0 {
		return 0, "", false
	}
	rest := name[i+len(".tmp-"):]
	at := strings.IndexByte(rest, '@')
	dash := strings.LastIndexByte(rest, '-')
	if at <= 0 || dash <= at+1 {
		return 0, "", false
	}
	pid, err := strconv.Atoi(rest[:at])
	if err != nil || pid <= 0 {
		return 0, "", false
	}
	return pid, rest[at+1 : dash], true
}

// RemoveStaleTemps deletes temp files left in dir (recursively) by a crash
// in WriteFileAtomic, and returns how many it removed: those of processes
// of this machine that are no longer running, and any older than
// StaleTempAge. Those of live processes, or of other machines while young,
// are left alone.
func RemoveStaleTemps(dir string) (int, error) {
	cutoff := time.Now().Add(-StaleTempAge)
	n := 0
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() && staleTemp(d, cutoff) && os.Remove(p) == nil {
			n++
		}
		return nil
	})
	return n, err
}

// RemoveStaleTempsOf deletes, as RemoveStaleTemps does, the temp files of
// one item's PNG and sidecar: those a killed earlier attempt of the item
// left beside its output. A worker calls it when it takes an item over
// (attempt > 1), so that a crash mid-write leaves nothing behind once the
// item is done, however long the process that finds it keeps running.
func RemoveStaleTempsOf(root string, it pipeline.Item) int {
	rel, err := filepath.Rel(root, it.Output)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return 0
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return 0
	}
	defer r.Close()
	d, err := r.Open(filepath.Dir(rel))
	if err != nil {
		return 0
	}
	entries, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return 0
	}
	prefixes := []string{"." + filepath.Base(rel) + ".tmp-", "." + filepath.Base(SidecarPath(rel)) + ".tmp-"}
	cutoff := time.Now().Add(-StaleTempAge)
	n := 0
	for _, e := range entries {
		mine := false
		for _, p := range prefixes {
			mine = mine || strings.HasPrefix(e.Name(), p)
		}
		if mine && !e.IsDir() && staleTemp(e, cutoff) && r.Remove(filepath.Join(filepath.Dir(rel), e.Name())) == nil {
			n++
		}
	}
	return n
}

// staleTemp reports whether d is a WriteFileAtomic temp file left by a
// crash: of a process of this machine that is no longer running, or older
// than cutoff.
func staleTemp(d os.DirEntry, cutoff time.Time) bool {
	name := d.Name()
	if !strings.HasPrefix(name, ".") || !strings.Contains(name, ".tmp-") {
		return false
	}
	if pid, host, ok := tempOwnerOf(name); ok && host == tempHost && pid != os.Getpid() && !processAlive(pid) {
		return true
	}
	info, err := d.Info()
	return err == nil && info.ModTime().Before(cutoff)
}

// CheckRoot makes the output root if it is missing and checks that a file
// can be created, written and removed in it, so that a root that cannot
// take images is found at start-up rather than after an item is computed.
func CheckRoot(root string) error {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return pipeline.Environment(err)
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return pipeline.Environment(err)
	}
	defer r.Close()
	probe := ".tessera-write-check.tmp-" + tempOwner + "-0"
	f, err := r.OpenFile(probe, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return pipeline.Environment(fmt.Errorf("%s is not writable: %w", root, err))
	}
	_, werr := f.Write([]byte("ok"))
	cerr := f.Close()
	r.Remove(probe)
	if werr != nil || cerr != nil {
		return pipeline.Environment(fmt.Errorf("%s is not writable: %v", root, errors.Join(werr, cerr)))
	}
	return nil
}
