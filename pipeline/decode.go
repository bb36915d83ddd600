package pipeline

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"tessera/onnx"
	"tessera/stages"
)

// aeSession is one graph of an autoencoder with one session, shared by
// every item, one Run at a time.
type aeSession struct {
	path  string // the graph's model.onnx
	sess  *onnx.Session
	input string
	out   string
	outCh int // the output's channels (an encoder's latent_parameters: 2C)

	mu    sync.Mutex // one Run at a time
	runs  atomic.Int64
	nanos atomic.Int64
	// inject, set by tests, fails a Run of n tiles before it starts (a
	// device out of memory, which the CPU cannot be made to be).
	inject func(n int) error
	// half says the graph takes or gives float16. A tile whose output is
	// not finite (a float16 overflow, inside the graph or at its output)
	// is run again in the graph's float32 copy, loaded on the first such
	// tile by load32 (model_fp32.onnx beside it, or the graph widened in
	// memory); a permanent failure to load it is kept, a transient one
	// tried again.
	half    bool
	mixed   bool // float32 inputs and outputs, float16 inside
	load32  func() (*aeSession, error)
	mu32    sync.Mutex
	fp32    *aeSession
	err32   error
	closed  bool
	retried atomic.Int64
	// batcher gathers tile Runs from every item (tiledRuns).
	batcher aeBatcher
	// sync is the graph cut open at its GroupNorm layers, for statistics
	// of the whole image (nil: none, noSync once looked for).
	sync   *syncDecoder
	noSync bool
}

// float32Copy is the graph's float32 copy.
func (s *aeSession) float32Copy() (*aeSession, error) {
	s.mu32.Lock()
	defer s.mu32.Unlock()
	switch {
	case s.closed:
		return nil, errors.New("engine closed")
	case s.fp32 != nil || s.err32 != nil:
		return s.fp32, s.err32
	}
	f, err := s.load32()
	if err != nil && Classify(err).Permanent() {
		s.err32 = err
	}
	s.fp32 = f
	return f, err
}

// close closes the session, its cut-open copy and its float32 copy, after
// a Run in progress on any; no float32 copy is loaded after it.
func (s *aeSession) close() {
	s.mu.Lock()
	s.sess.Close()
	if s.sync != nil {
		s.sync.sess.Close()
	}
	s.mu.Unlock()
	s.mu32.Lock()
	defer s.mu32.Unlock()
	s.closed = true
	if f := s.fp32; f != nil {
		f.mu.Lock()
		f.sess.Close()
		f.mu.Unlock()
	}
}

// decoder is an autoencoder's decoder graph: latent_sample [B, C, h, w] →
// sample [B, 3, h·F, w·F].
type decoder struct {
	aeSession
	ae *onnx.Autoencoder
}

// decoderOf returns the decoder of an autoencoder folder, loading it on
// first use.
func (e *Engine) decoderOf(dir string) (*decoder, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, fmt.Errorf("engine closed")
	}
	if d, ok := e.decoders[dir]; ok {
		return d, nil
	}
	ae, m, err := e.loadAEGraph(dir, "decoder", func(ae *onnx.Autoencoder) string { return ae.Decoder })
	if err != nil {
		return nil, err
	}
	d := &decoder{ae: ae, aeSession: aeSession{path: ae.Decoder, input: m.Inputs[0].Name, out: m.Outputs[0].Name, outCh: 3}}
	if err := e.openAESession(&d.aeSession, m); err != nil {
		return nil, err
	}
	e.decoders[dir] = d
	return d, nil
}

// loadAEGraph describes the autoencoder in dir and loads one of its graphs
// (which picks its path; "" when it has none), which must have one input
// and an output, both [B, C, h, w].
func (e *Engine) loadAEGraph(dir, which string, pick func(*onnx.Autoencoder) string) (*onnx.Autoencoder, *onnx.Model, error) {
	ae, err := onnx.ReadAutoencoder(dir)
	if err != nil {
		return nil, nil, ModelUnusable(fmt.Errorf("autoencoder: %w", err))
	}
	path := pick(ae)
	if path == "" {
		return nil, nil, ModelUnusable(fmt.Errorf("autoencoder %s: no vae_%s/model.onnx", dir, which))
	}
	m, err := e.env.LoadModel(path)
	if err != nil {
		return nil, nil, ModelUnusable(fmt.Errorf("autoencoder %s: %w", which, err))
	}
	if len(m.Inputs) != 1 || len(m.Outputs) < 1 || len(m.Inputs[0].Shape) != 4 || len(m.Outputs[0].Shape) != 4 {
		return nil, nil, ModelUnusable(fmt.Errorf("%s %s: want one input and an output, both [B,C,h,w]", which, path))
	}
	return ae, m, nil
}

// decode turns a latent canvas (C×h×w, as the stage samples it, scaled by
// the autoencoder's scaling factor) into pixels (3×hF×wF) in tiles of the
// latent canvas with a halo, each decoded alone and fused with its window
// scaled up by F, so that memory is bounded by the tile. Each tile's
// decoder sees only its own pixels: normalisation inside the decoder is
// per tile.
func (e *Engine) decode(ctx context.Context, dp *DecodePlan, z []float32, c, h, w int) ([]float32, error) {
	d, err := e.decoderOf(dp.Autoencoder)
	if err != nil {
		return nil, err
	}
	if c != d.ae.LatentChannels || d.ae.Factor != dp.Factor {
		return nil, ModelUnusable(fmt.Errorf("decoder %s: %d latent channels ×%d, the stage makes %d (plan ×%d)", d.ae.Decoder, d.ae.LatentChannels, d.ae.Factor, c, dp.Factor))
	}
	g, err := decodeGrid(h, w, dp)
	if err != nil {
		return nil, Invalidf("decode: %w", err)
	}
	scale, shift, err := latentScaling(dp, d.ae, d.ae.Decoder)
	if err != nil {
		return nil, err
	}
	if dp.Statistics == StatisticsImage {
		s, err := e.syncDecoderOf(d)
		if err != nil {
			return nil, err
		}
		if s == nil {
			return nil, ModelUnusable(fmt.Errorf("decoder %s: no model_sync.onnx beside it for statistics of the whole image (tools/sync_decoder.py makes one)", d.ae.Decoder))
		}
		return e.decodeSynced(ctx, d, s, g, z, c, h, w, scale, shift)
	}
	f := dp.Factor
	H, W := h*f, w*f
	acc := stages.NewAccumulator(3, H, W)
	err = e.tiledRuns(ctx, &d.aeSession, g.Tiles, dp.Batch, c*g.TileHeight*g.TileWidth,
		func(dst []float32, t stages.Tile) error {
			if err := g.Extract(dst, z, c, t); err != nil {
				return err
			}
			for j := range dst {
				dst[j] = dst[j]/scale + shift
			}
			return nil
		},
		[]int64{int64(c), int64(g.TileHeight), int64(g.TileWidth)}, []int64{3, int64(g.TileHeight * f), int64(g.TileWidth * f)},
		func(t stages.Tile, out []float32) error { return acc.Add(scaleTile(t, f), out) })
	if err != nil {
		return nil, err
	}
	img := make([]float32, 3*H*W)
	if err := acc.Result(img); err != nil {
		return nil, err
	}
	for i, v := range img {
		img[i] = min(max(v, -1), 1)
	}
	return img, nil
}

// latentScaling is how the decoder's latents come from the stage's: the
// plan's scaling and shift (the autoencoder's when the plan has none),
// which must still be the autoencoder's.
func latentScaling(dp *DecodePlan, ae *onnx.Autoencoder, graph string) (scale, shift float32, err error) {
	if dp.Scaling != 0 && (dp.Scaling != ae.ScalingFactor || dp.Shift != ae.ShiftFactor) {
		return 0, 0, ModelUnusable(fmt.Errorf("%s: scaling %g shift %g in its config now, %g and %g when the item was queued (submit it again)", graph, ae.ScalingFactor, ae.ShiftFactor, dp.Scaling, dp.Shift))
	}
	return float32(ae.ScalingFactor), float32(ae.ShiftFactor), nil
}

// tiledRuns runs an autoencoder graph over tiles, up to batch at a time (0:
// decodeBatch) and batched with the tiles of other items using the graph
// at the same time (aeBatcher), the batch halved while a Run of several
// tiles runs out of memory: fill writes a tile's input (per values,
// in[0]×in[1]×in[2]) into its slot, add takes its output (out's shape per
// tile).
func (e *Engine) tiledRuns(ctx context.Context, s *aeSession, tiles []stages.Tile, batch, per int, fill func(dst []float32, t stages.Tile) error, in, out []int64, add func(t stages.Tile, out []float32) error) error {
	if batch == 0 {
		batch = decodeBatch
	}
	want := max(batch, 1) // a Run's tiles, other items' included
	batch = max(1, min(batch, len(tiles)))
	buf := make([]float32, batch*per)
	outPer := int(out[0] * out[1] * out[2])
	var in3, out3 [3]int64
	copy(in3[:], in)
	copy(out3[:], out)
	reqs := make([]*aeRequest, batch)
	for start := 0; start < len(tiles); {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(batch, len(tiles)-start)
		for i, t := range tiles[start : start+n] {
			if err := fill(buf[i*per:(i+1)*per], t); err != nil {
				return err
			}
			reqs[i] = &aeRequest{in: buf[i*per : (i+1)*per], in3: in3, out3: out3, limited: want}
		}
		// Batched with the tiles of other items decoding at the same time.
		if err := e.runTiles(ctx, s, reqs[:n]); err != nil {
			return err
		}
		for i, t := range tiles[start : start+n] {
			res := reqs[i].res
			if len(res) < outPer {
				return ModelUnusable(fmt.Errorf("%s: %d values for a tile of %v", s.path, len(res), out))
			}
			// An encoder's latent_parameters hold the mean and then the log
			// variance: the first outPer values of each tile's are the mean.
			o := res[:outPer]
			if !finite(res) {
				if !s.half && !s.mixed {
					return ModelUnusable(fmt.Errorf("%s: NaN or infinity in the tile at latent (%d, %d) of a float32 graph", s.path, t.Y0, t.X0))
				}
				// The Run overflowed in this tile (float16, inside the
				// graph or at its output): run it again in float32, alone.
				f32, err := s.float32Copy()
				if err != nil {
					return fmt.Errorf("%s: NaN or infinity (a float16 overflow?) in the tile at latent (%d, %d): %w", s.path, t.Y0, t.X0, err)
				}
				r32, err := f32.run(ctx, reqs[i].in, append([]int64{1}, in...), append([]int64{1}, out...))
				if err != nil {
					return err
				}
				if len(r32) < outPer || !finite(r32) {
					return ModelUnusable(fmt.Errorf("%s: the tile at latent (%d, %d) is not finite in float32 either", f32.path, t.Y0, t.X0))
				}
				if s.retried.Add(1) == 1 {
					e.logger.Warn("NaN or infinity in an autoencoder tile (a float16 overflow); retried in float32", "graph", s.path, "float16_io", s.half, "tile_y", t.Y0, "tile_x", t.X0)
				}
				o = r32[:outPer]
			}
			if err := add(t, o); err != nil {
				return err
			}
		}
		start += n
	}
	return nil
}

// openAESession opens an autoencoder graph's session and, for a float16
// graph, its float32 copy where there is one (model_fp32.onnx beside it).
func (e *Engine) openAESession(s *aeSession, m *onnx.Model) error {
	var err error
	if s.sess, err = e.env.NewSession(m, onnx.SessionOptions{}); err != nil {
		return &SessionError{Model: s.path, Err: err}
	}
	s.half = m.Inputs[0].Type == onnx.Float16 || m.Outputs[0].Type == onnx.Float16
	s.mixed = !s.half && onnx.HasFloat16File(s.path)
	s.load32 = func() (*aeSession, error) {
		p := filepath.Join(filepath.Dir(s.path), "model_fp32.onnx")
		var m32 *onnx.Model
		var err error
		if _, serr := os.Stat(p); serr == nil {
			m32, err = e.env.LoadModel(p)
		} else {
			// No copy beside it: widen the graph itself (exact).
			var data []byte
			if data, err = os.ReadFile(s.path); err == nil {
				if data, err = onnx.WidenFloat16(data); err == nil {
					p = s.path + " (widened to float32)"
					m32, err = e.env.LoadModelBytes(p, data, nil)
				}
			}
		}
		if err != nil {
			return nil, ModelUnusable(fmt.Errorf("float32 copy of %s: %w (tools/fp16_decoder.py --fp32 %s writes one)", s.path, err, filepath.Dir(s.path)))
		}
		if len(m32.Inputs) != 1 || m32.Inputs[0].Name != s.input || m32.Inputs[0].Type != onnx.Float32 || len(m32.Outputs) < 1 || m32.Outputs[0].Name != s.out || m32.Outputs[0].Type != onnx.Float32 || len(m32.Outputs[0].Shape) != 4 {
			return nil, ModelUnusable(fmt.Errorf("%s: not a float32 copy of %s (want float32 input %q and output %q)", p, s.path, s.input, s.out))
		}
		f := &aeSession{path: p, input: s.input, out: s.out, outCh: s.outCh}
		if f.sess, err = e.env.NewSession(m32, onnx.SessionOptions{}); err != nil {
			return nil, &SessionError{Model: p, Err: err}
		}
		e.logger.Info("float32 copy of a float16 autoencoder graph loaded for its overflowing tiles", "graph", p)
		return f, nil
	}
	return nil
}

// finite reports whether every value of v is a number (a float16 Run that
// overflowed gives infinities, and NaN where they meet).
func finite(v []float32) bool {
	for _, x := range v {
		if x-x != 0 { // NaN and ±Inf
			return false
		}
	}
	return true
}

// DecodeCanvasBytes is what a decode to W×H pixels holds whatever its
// tiles: the fusion accumulator (three float64 sums and a float64 weight
// per pixel) and the float32 RGB image it resolves into, 44 bytes a pixel.
func DecodeCanvasBytes(W, H int) int64 { return int64(W) * int64(H) * (3*8 + 8 + 3*4) }

// decodeBatch is how many decoder tiles go in one Run by default.
const decodeBatch = 4

// scaleTile is a latent tile as the decoder's output covers it: F times the
// origin and size, each window weight repeated F times.
func scaleTile(t stages.Tile, f int) stages.Tile {
	up := func(w []float32) []float32 {
		out := make([]float32, len(w)*f)
		for i, v := range w {
			for k := 0; k < f; k++ {
				out[i*f+k] = v
			}
		}
		return out
	}
	return stages.Tile{Y0: t.Y0 * f, X0: t.X0 * f, Height: t.Height * f, Width: t.Width * f,
		Window: stages.Window{Y: up(t.Window.Y), X: up(t.Window.X)}}
}

// run runs the graph on x of shape in, its output of shape out but with
// the graph's own channels (outCh, which may be twice out's: see
// tiledRuns).
func (s *aeSession) run(ctx context.Context, x []float32, in, out []int64) ([]float32, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inject != nil {
		if err := s.inject(int(in[0])); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	shape := append([]int64{in[0], int64(s.outCh)}, out[2:]...)
	res, err := s.sess.RunShaped(ctx, map[string]onnx.Tensor{s.input: onnx.FloatTensor(x, in...)}, map[string][]int64{s.out: shape})
	s.nanos.Add(int64(time.Since(start)))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.path, err)
	}
	s.runs.Add(1)
	return res[s.out].Float, nil
}
