package pipeline

import (
	"context"
	"fmt"

	"tessera/onnx"
	"tessera/stages"
)

// encoderOf returns the encoder of an autoencoder folder (vae_encoder/),
// loading it on first use: sample [B, 3, H, W] → latent_sample [B, C, H/F,
// W/F], or latent_parameters [B, 2C, H/F, W/F] (the mean, then the log
// variance, as newer Optimum exports it).
func (e *Engine) encoderOf(dir string) (*encoder, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, fmt.Errorf("engine closed")
	}
	if x, ok := e.encoders[dir]; ok {
		return x, nil
	}
	ae, m, err := e.loadAEGraph(dir, "encoder", func(ae *onnx.Autoencoder) string { return ae.Encoder })
	if err != nil {
		return nil, err
	}
	out := m.Outputs[0]
	ch := int(out.Shape[1])
	switch {
	case ch <= 0 && out.Name == "latent_parameters":
		ch = 2 * ae.LatentChannels
	case ch <= 0:
		ch = ae.LatentChannels
	}
	if ch != ae.LatentChannels && ch != 2*ae.LatentChannels {
		return nil, ModelUnusable(fmt.Errorf("encoder %s: output %q has %d channels; the autoencoder's latents have %d (or %d: mean and log variance)", ae.Encoder, out.Name, ch, ae.LatentChannels, 2*ae.LatentChannels))
	}
	x := &encoder{ae: ae, aeSession: aeSession{path: ae.Encoder, input: m.Inputs[0].Name, out: out.Name, outCh: ch}}
	if err := e.openAESession(&x.aeSession, m); err != nil {
		return nil, err
	}
	e.encoders[dir] = x
	return x, nil
}

// encoder is an autoencoder's encoder graph.
type encoder struct {
	aeSession
	ae *onnx.Autoencoder
}

// encode turns an image (3×hF×wF in [-1, 1]) into the stage's latents
// (C×h×w, scaled: (mean − shift) · scaling) in the plan's latent tiles:
// each tile's pixels (its latent tile F times as large, halo included) are
// encoded alone and the latents fused with the tile's window, so that
// memory is bounded by the tile. An encoder that gives a distribution is
// read at its mean (diffusers' sample_mode "argmax"), so that the latents
// are a function of the image alone. Normalisation inside the encoder is
// per tile, or (Statistics "image", a cut-open encoder) that of the whole
// image, as in decodeSynced.
func (e *Engine) encode(ctx context.Context, dp *DecodePlan, img []float32, h, w int) ([]float32, error) {
	x, err := e.encoderOf(dp.Autoencoder)
	if err != nil {
		return nil, err
	}
	c, f := x.ae.LatentChannels, dp.Factor
	if x.ae.Factor != f {
		return nil, ModelUnusable(fmt.Errorf("encoder %s: ×%d, the plan ×%d", x.ae.Encoder, x.ae.Factor, f))
	}
	scale, shift, err := latentScaling(dp, x.ae, x.ae.Encoder)
	if err != nil {
		return nil, err
	}
	g, err := decodeGrid(h, w, dp)
	if err != nil {
		return nil, Invalidf("encode: %w", err)
	}
	// The pixel canvas, as Extract sees it: only its size and padding.
	pix := &stages.TileGrid{Height: h * f, Width: w * f, Pad: g.Pad}
	acc := stages.NewAccumulator(c, h, w)
	th, tw := g.TileHeight, g.TileWidth
	add := func(t stages.Tile, out []float32) error {
		out = out[:c*t.Height*t.Width] // latent_parameters: the mean
		for j, v := range out {
			out[j] = (v - shift) * scale
		}
		return acc.Add(t, out)
	}
	if dp.Statistics == StatisticsImage {
		s, err := e.syncOf(&x.aeSession)
		if err != nil {
			return nil, err
		}
		if s == nil {
			return nil, ModelUnusable(fmt.Errorf("encoder %s: no model_sync.onnx beside it for statistics of the whole image (tools/sync_decoder.py makes one)", x.ae.Encoder))
		}
		err = e.syncedTiles(ctx, s, &x.aeSession, g, h, w, 3*th*f*tw*f,
			func(dst []float32, t stages.Tile) ([]int64, error) {
				st := scaleTile(t, f)
				return []int64{1, 3, int64(st.Height), int64(st.Width)}, pix.Extract(dst[:3*st.Height*st.Width], img, 3, st)
			},
			func(t stages.Tile) []int64 { return []int64{1, int64(x.outCh), int64(t.Height), int64(t.Width)} },
			add)
	} else {
		err = e.tiledRuns(ctx, &x.aeSession, g.Tiles, dp.Batch, 3*th*f*tw*f,
			func(dst []float32, t stages.Tile) error { return pix.Extract(dst, img, 3, scaleTile(t, f)) },
			[]int64{3, int64(th * f), int64(tw * f)}, []int64{int64(c), int64(th), int64(tw)}, add)
	}
	if err != nil {
		return nil, err
	}
	z := make([]float32, c*h*w)
	if err := acc.Result(z); err != nil {
		return nil, err
	}
	return z, nil
}
