package pipeline

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tessera/onnx"
	"tessera/stages/tokenizer"
)

// textEncoder is a pipeline's text side: its tokenizer and a session of its
// text encoder graph (input_ids [B, L] → last_hidden_state [B, L, D]), with
// every prompt it has encoded kept by its token ids, so that each distinct
// (encoder, prompt) is encoded once per process whatever the items.
type textEncoder struct {
	path  string
	hash  string // SHA-256 of the graph file, the on-disk cache's key with the ids
	dir   string // the on-disk cache, "" for none
	tok   tokenizer.Tokenizer
	sess  *onnx.Session
	input string // the input_ids input
	mask  string // the attention_mask input, "" where the graph takes none
	out   string // last_hidden_state
	// outs are the graph's outputs, whose shapes a Run is told: the batch
	// is 1, a 3-D output's second axis the sequence, the rest as declared.
	outs []onnx.IO
	// lower makes the text lower case and trimmed before tokenizing, as
	// DeepFloyd IF's pipeline does for its T5 prompts (without its caption
	// cleaning).
	lower bool
	bytes int64 // of the embeddings in cache

	mu    sync.Mutex
	cache map[string]*Context
	runs  atomic.Int64
	nanos atomic.Int64
}

// maxCachedPrompts and maxCachedBytes bound the in-memory cache of encoded
// prompts (a T5-XXL embedding of 77 tokens is 1.2 MB).
const (
	maxCachedPrompts = 4096
	maxCachedBytes   = 256 << 20
)

// textEncoderOf returns the text encoder of a model's pipeline, loading it
// on first use.
func (e *Engine) textEncoderOf(man *onnx.Manifest) (*textEncoder, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, fmt.Errorf("engine closed")
	}
	if t, ok := e.texts[man.TextEncoder]; ok {
		return t, nil
	}
	tok, err := tokenizer.LoadDir(man.Tokenizer)
	if err != nil {
		return nil, ModelUnusable(fmt.Errorf("tokenizer %s: %w", man.Tokenizer, err))
	}
	m, err := e.env.LoadModel(man.TextEncoder)
	if err != nil {
		return nil, ModelUnusable(fmt.Errorf("text encoder: %w", err))
	}
	t := &textEncoder{path: man.TextEncoder, tok: tok, cache: map[string]*Context{}, dir: e.opts.TextCache}
	if t.dir != "" {
		// The graph and its external weights: the cache's key changes with either.
		files := []string{man.TextEncoder}
		for _, x := range m.Header.ExternalData {
			files = append(files, filepath.Join(filepath.Dir(man.TextEncoder), x))
		}
		if t.hash, err = filesSHA256(files); err != nil {
			return nil, ModelUnusable(fmt.Errorf("text encoder: %w", err))
		}
	}
	for _, io := range m.Inputs {
		if (io.Type == onnx.Int64 || io.Type == onnx.Int32) && len(io.Shape) == 2 {
			if io.Name == "attention_mask" {
				t.mask = io.Name
			} else {
				t.input = io.Name
			}
		}
	}
	for _, io := range m.Outputs {
		if len(io.Shape) == 3 && (t.out == "" || io.Name == "last_hidden_state") {
			t.out = io.Name
		}
		for i, d := range io.Shape {
			if d < 0 && i > 1 || d < 0 && i == 1 && len(io.Shape) != 3 {
				return nil, ModelUnusable(fmt.Errorf("text encoder %s: output %q has a dynamic axis %d (%s) that is neither the batch nor the sequence", man.TextEncoder, io.Name, i, io.ShapeString()))
			}
		}
		t.outs = append(t.outs, io)
	}
	_, t.lower = tok.(*tokenizer.SentencePiece)
	want := 1
	if t.mask != "" {
		want = 2
	}
	if t.input == "" || t.out == "" || len(m.Inputs) != want {
		return nil, ModelUnusable(fmt.Errorf("text encoder %s: want an input_ids input [B, L] (and an attention_mask), and a last_hidden_state output [B, L, D]", man.TextEncoder))
	}
	if t.sess, err = e.env.NewSession(m, onnx.SessionOptions{}); err != nil {
		return nil, &SessionError{Model: man.TextEncoder, Err: err}
	}
	e.texts[man.TextEncoder] = t
	return t, nil
}

// encode returns the prompt's embedding [L, D], from the cache or one Run,
// and the tokenizer's cut where the prompt is longer than the encoder
// takes (logged).
func (t *textEncoder) encode(ctx context.Context, e *Engine, prompt string) (*Context, error) {
	c, _, err := t.encodeCut(ctx, e, prompt)
	return c, err
}

// encodeCut is encode that also returns what truncation cut ("" nothing).
func (t *textEncoder) encodeCut(ctx context.Context, e *Engine, prompt string) (*Context, string, error) {
	if t.lower {
		prompt = strings.ToLower(strings.TrimSpace(prompt))
	}
	enc := t.tok.Encode(prompt)
	c, err := t.encodeIDs(ctx, e, enc)
	return c, enc.CutText, err
}

func (t *textEncoder) encodeIDs(ctx context.Context, e *Engine, enc tokenizer.Encoding) (*Context, error) {
	var key strings.Builder
	for _, id := range enc.IDs {
		fmt.Fprintf(&key, "%d,", id)
	}
	if t.mask != "" {
		key.WriteString("mask:")
		for _, m := range enc.Mask {
			fmt.Fprintf(&key, "%d", m)
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock() // one Run at a time per encoder: items sharing a prompt wait for it
	if c, ok := t.cache[key.String()]; ok {
		return c, nil
	}
	if enc.Truncated >= 0 {
		e.logger.Warn("prompt longer than the text encoder takes: cut", "encoder", t.path, "after_token", enc.Truncated, "dropped", enc.CutText)
	}
	if c := t.fromDisk(key.String()); c != nil {
		t.cache[key.String()] = c
		return c, nil
	}
	start := time.Now()
	in := map[string]onnx.Tensor{t.input: onnx.IntTensor(enc.IDs, 1, int64(len(enc.IDs)))}
	if t.mask != "" {
		in[t.mask] = onnx.IntTensor(enc.Mask, 1, int64(len(enc.Mask)))
	}
	shapes := map[string][]int64{}
	for _, io := range t.outs {
		s := append([]int64(nil), io.Shape...)
		if len(s) > 0 {
			s[0] = 1
		}
		if len(s) == 3 && s[1] < 0 {
			s[1] = int64(len(enc.IDs))
		}
		shapes[io.Name] = s
	}
	out, err := t.sess.RunShaped(ctx, in, shapes)
	t.nanos.Add(int64(time.Since(start)))
	if err != nil {
		return nil, fmt.Errorf("text encoder %s: %w", t.path, err)
	}
	o := out[t.out]
	if len(o.Shape) != 3 || o.Shape[0] != 1 || int(o.Shape[1]) != len(enc.IDs) || len(o.Float) == 0 {
		return nil, ModelUnusable(fmt.Errorf("text encoder %s: output shape %v for %d tokens", t.path, o.Shape, len(enc.IDs)))
	}
	t.runs.Add(1)
	c := &Context{L: int(o.Shape[1]), D: int(o.Shape[2]), Data: o.Float}
	if n := int64(4 * len(c.Data)); len(t.cache) < maxCachedPrompts && t.bytes+n <= maxCachedBytes {
		t.cache[key.String()] = c
		t.bytes += n
	}
	if err := t.toDisk(key.String(), c); err != nil {
		e.logger.Warn("text encoder cache: not written", "dir", t.dir, "err", err)
	}
	return c, nil
}

// diskPath is the cache file of the ids key: the SHA-256 of the encoder's
// hash and the ids.
func (t *textEncoder) diskPath(key string) string {
	sum := sha256.Sum256([]byte(t.hash + "\x00" + key))
	return filepath.Join(t.dir, hex.EncodeToString(sum[:])+".emb")
}

// fromDisk reads a cached embedding: "TEMB", L and D as uint32, then L×D
// float32, little-endian. A missing or malformed file is a miss.
func (t *textEncoder) fromDisk(key string) *Context {
	if t.dir == "" {
		return nil
	}
	data, err := onnx.ReadRegular(t.diskPath(key), maxContextBytes)
	if err != nil || len(data) < 12 || string(data[:4]) != "TEMB" {
		return nil
	}
	L, D := int(binary.LittleEndian.Uint32(data[4:])), int(binary.LittleEndian.Uint32(data[8:]))
	if L < 1 || D < 1 || L > MaxContextTokens || D > MaxContextDim || len(data) != 12+4*L*D {
		return nil
	}
	c := &Context{L: L, D: D, Data: make([]float32, L*D)}
	for i := range c.Data {
		c.Data[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[12+4*i:]))
	}
	return c
}

// toDisk writes an embedding to the cache atomically: a temp file in the
// cache directory, synced, renamed over the entry.
func (t *textEncoder) toDisk(key string, c *Context) error {
	if t.dir == "" {
		return nil
	}
	if err := os.MkdirAll(t.dir, 0o755); err != nil {
		return err
	}
	buf := make([]byte, 12+4*len(c.Data))
	copy(buf, "TEMB")
	binary.LittleEndian.PutUint32(buf[4:], uint32(c.L))
	binary.LittleEndian.PutUint32(buf[8:], uint32(c.D))
	for i, v := range c.Data {
		binary.LittleEndian.PutUint32(buf[12+4*i:], math.Float32bits(v))
	}
	f, err := os.CreateTemp(t.dir, ".emb-*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(buf)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, t.diskPath(key))
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// filesSHA256 hashes files, one after the other, as they stream.
func filesSHA256(paths []string) (string, error) {
	h := sha256.New()
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return "", err
		}
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// stageContexts are the contexts of one stage: the item's context files
// where it gives them (with the empty prompt's embedding, by this stage's
// own text encoder, as the unconditional half of guidance where no
// negative file is given), else its prompt and negative prompt (the empty
// prompt where none is given, as the reference pipelines do) encoded by
// the text encoder of this stage's own pipeline; nil for a model that takes
// no context.
func (e *Engine) stageContexts(ctx context.Context, it Item, sp StagePlan, r *runner, files *itemContexts) (*itemContexts, error) {
	man := r.model.Manifest
	if r.model.Input(onnx.RoleContext) == nil {
		return nil, nil
	}
	if files != nil {
		if !files.zeros || sp.Guidance == 1 || man.TextEncoder == "" {
			return files, nil
		}
		t, err := e.textEncoderOf(man)
		if err != nil {
			return nil, err
		}
		empty, err := t.encode(ctx, e, "")
		if err != nil {
			return nil, err
		}
		if empty.L != files.cond.L || empty.D != files.cond.D {
			return files, nil // the file's shape is not the encoder's: zeros, as warned
		}
		return &itemContexts{cond: files.cond, uncond: empty}, nil
	}
	if it.Prompt == "" || man.TextEncoder == "" {
		return nil, nil // runStage names what is missing
	}
	t, err := e.textEncoderOf(man)
	if err != nil {
		return nil, err
	}
	cond, cut, err := t.encodeCut(ctx, e, it.Prompt)
	if err != nil {
		return nil, err
	}
	uncond, err := t.encode(ctx, e, it.NegativePrompt)
	if err != nil {
		return nil, err
	}
	return &itemContexts{cond: cond, uncond: uncond, cut: cut}, nil
}
