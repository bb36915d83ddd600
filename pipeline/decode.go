package pipeline

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"tessera/onnx"
	"tessera/stages"
)

// decoder is an autoencoder's decoder graph with one session, shared by
// every item: latent_sample [1, C, h, w] → sample [1, 3, h·F, w·F].
type decoder struct {
	ae    *onnx.Autoencoder
	sess  *onnx.Session
	input string
	out   string

	mu    sync.Mutex // one Run at a time
	runs  atomic.Int64
	nanos atomic.Int64
	// inject, set by tests, fails a Run of n tiles before it starts (a
	// device out of memory, which the CPU cannot be made to be).
	inject func(n int) error
	// sync is the decoder cut open at its GroupNorm layers, for statistics
	// of the whole image (nil: none, noSync once looked for).
	sync   *syncDecoder
	noSync bool
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
	ae, err := onnx.ReadAutoencoder(dir)
	if err != nil {
		return nil, ModelUnusable(fmt.Errorf("autoencoder: %w", err))
	}
	m, err := e.env.LoadModel(ae.Decoder)
	if err != nil {
		return nil, ModelUnusable(fmt.Errorf("autoencoder decoder: %w", err))
	}
	if len(m.Inputs) != 1 || len(m.Outputs) < 1 || len(m.Inputs[0].Shape) != 4 || len(m.Outputs[0].Shape) != 4 {
		return nil, ModelUnusable(fmt.Errorf("decoder %s: want one input [B,C,h,w] and an output [B,3,H,W]", ae.Decoder))
	}
	d := &decoder{ae: ae, input: m.Inputs[0].Name, out: m.Outputs[0].Name}
	if d.sess, err = e.env.NewSession(m, onnx.SessionOptions{}); err != nil {
		return nil, &SessionError{Model: ae.Decoder, Err: err}
	}
	e.decoders[dir] = d
	return d, nil
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
	if dp.Statistics == StatisticsImage {
		s, err := e.syncDecoderOf(d)
		if err != nil {
			return nil, err
		}
		if s == nil {
			return nil, ModelUnusable(fmt.Errorf("decoder %s: no model_sync.onnx beside it for statistics of the whole image (tools/sync_decoder.py makes one)", d.ae.Decoder))
		}
		return e.decodeSynced(ctx, d, s, g, z, c, h, w)
	}
	f := dp.Factor
	H, W := h*f, w*f
	acc := stages.NewAccumulator(3, H, W)
	per := c * g.TileHeight * g.TileWidth
	batch := max(1, min(dp.Batch, len(g.Tiles)))
	if dp.Batch == 0 {
		batch = min(decodeBatch, len(g.Tiles))
	}
	buf := make([]float32, batch*per)
	for start := 0; start < len(g.Tiles); {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(batch, len(g.Tiles)-start)
		tiles := g.Tiles[start : start+n]
		for i, t := range tiles {
			tile := buf[i*per : (i+1)*per]
			if err := g.Extract(tile, z, c, t); err != nil {
				return nil, err
			}
			for j := range tile {
				tile[j] = tile[j]/float32(d.ae.ScalingFactor) + float32(d.ae.ShiftFactor)
			}
		}
		out, err := d.run(ctx, buf[:n*per], n, c, g.TileHeight, g.TileWidth)
		if err != nil && isOutOfMemory(err) && batch > 1 {
			// A Run of several tiles did not fit: halve and go on.
			batch /= 2
			e.logger.Warn("decoder ran out of memory; batch halved", "decoder", d.ae.Decoder, "batch", batch, "err", err)
			continue
		}
		if err != nil {
			return nil, err
		}
		outPer := 3 * g.TileHeight * f * g.TileWidth * f
		if len(out) != n*outPer {
			return nil, ModelUnusable(fmt.Errorf("decoder %s: %d values for %d tiles of %dx%d ×%d", d.ae.Decoder, len(out), n, g.TileWidth, g.TileHeight, f))
		}
		for i, t := range tiles {
			if err := acc.Add(scaleTile(t, f), out[i*outPer:(i+1)*outPer]); err != nil {
				return nil, err
			}
		}
		start += n
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

func (d *decoder) run(ctx context.Context, z []float32, n, c, h, w int) ([]float32, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inject != nil {
		if err := d.inject(n); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	f := int64(d.ae.Factor)
	out, err := d.sess.RunShaped(ctx, map[string]onnx.Tensor{d.input: onnx.FloatTensor(z, int64(n), int64(c), int64(h), int64(w))},
		map[string][]int64{d.out: {int64(n), 3, int64(h) * f, int64(w) * f}})
	d.nanos.Add(int64(time.Since(start)))
	if err != nil {
		return nil, fmt.Errorf("decoder %s: %w", d.ae.Decoder, err)
	}
	d.runs.Add(1)
	return out[d.out].Float, nil
}
