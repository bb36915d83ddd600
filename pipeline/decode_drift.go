package pipeline

import (
	"context"
	"fmt"
	"math"

	"tessera/stages"
)

// DecodeDrift is how far a tiled decode of one latent is from the decode of
// the whole latent in one Run: as PSNR (dB, +Inf when identical) and as the
// largest difference of a tile's mean colour (on the [-1, 1] scale).
type DecodeDrift struct {
	Latent       string  `json:"latent"` // C×h×w
	Tiles        int     `json:"tiles"`
	TileSize     int     `json:"tile_size"` // latent pixels
	Halo         int     `json:"halo"`
	NaivePSNR    float64 `json:"-"`
	NaiveColour  float64 `json:"naive_tile_colour_diff"`
	SyncedPSNR   float64 `json:"-"`
	SyncedColour float64 `json:"synced_tile_colour_diff"`
	Synced       bool    `json:"synced"` // the decoder has a model_sync.onnx
}

// MeasureDecodeDrift decodes a structured latent of h×w latent pixels (a
// diagonal ramp plus seeded noise, scaled by the autoencoder's scaling
// factor as a stage makes it) with the decoder of the autoencoder folder
// dir: whole, then in tiles of tile latent pixels (overlap tile/6, halo
// tile/4) with each tile's own GroupNorm statistics (naive) and with the
// whole image's (synchronised, when the decoder has a model_sync.onnx).
// The whole decode must fit in memory: this is for measuring, at the
// largest size where it does.
func (e *Engine) MeasureDecodeDrift(ctx context.Context, dir string, h, w, tile int) (*DecodeDrift, error) {
	d, err := e.decoderOf(dir)
	if err != nil {
		return nil, err
	}
	c, f := d.ae.LatentChannels, d.ae.Factor
	if tile <= 0 || tile >= max(h, w) {
		return nil, fmt.Errorf("decode drift: tile %d for a %dx%d latent: want several tiles", tile, w, h)
	}
	z := make([]float32, c*h*w)
	(stages.Noise{Seed: 4}).Fill(z, 0, c, 0, 0, h, w)
	for ch := 0; ch < c; ch++ {
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				i := (ch*h+y)*w + x
				z[i] = float32(d.ae.ScalingFactor) * (0.3*z[i] + float32(x-y)/float32(w))
			}
		}
	}
	whole, err := e.decode(ctx, &DecodePlan{Autoencoder: dir, Factor: f, TileSize: max(h, w), Statistics: StatisticsTile}, z, c, h, w)
	if err != nil {
		return nil, err
	}
	plan := func(stats string) *DecodePlan {
		return &DecodePlan{Autoencoder: dir, Factor: f, TileSize: tile, Overlap: max(tile/6, 1), Halo: max(tile/4, 1), Statistics: stats}
	}
	g, err := decodeGrid(h, w, plan(StatisticsTile))
	if err != nil {
		return nil, err
	}
	dr := &DecodeDrift{Latent: fmt.Sprintf("%dx%dx%d", c, h, w), Tiles: len(g.Tiles), TileSize: tile, Halo: plan("").Halo}
	naive, err := e.decode(ctx, plan(StatisticsTile), z, c, h, w)
	if err != nil {
		return nil, err
	}
	dr.NaivePSNR, dr.NaiveColour = driftOf(whole, naive, g, h, w, f)
	s, err := e.syncDecoderOf(d)
	if err != nil {
		return nil, err
	}
	if s == nil {
		dr.SyncedPSNR = math.NaN()
		return dr, nil
	}
	synced, err := e.decode(ctx, plan(StatisticsImage), z, c, h, w)
	if err != nil {
		return nil, err
	}
	dr.Synced = true
	dr.SyncedPSNR, dr.SyncedColour = driftOf(whole, synced, g, h, w, f)
	return dr, nil
}

// driftOf is the PSNR of tiled against whole (3×hF×wF images decoded from
// an h×w latent in the tiles of g) and the largest difference of a tile's
// mean colour, per channel, over each tile's own region.
func driftOf(whole, tiled []float32, g *stages.TileGrid, h, w, f int) (float64, float64) {
	worst := 0.0
	H, W := h*f, w*f
	for _, tl := range g.Tiles {
		for ch := 0; ch < 3; ch++ {
			var a, b float64
			n := 0
			for y := tl.Y0 * f; y < min((tl.Y0+tl.Height)*f, H); y++ {
				for x := tl.X0 * f; x < min((tl.X0+tl.Width)*f, W); x++ {
					a += float64(whole[(ch*H+y)*W+x])
					b += float64(tiled[(ch*H+y)*W+x])
					n++
				}
			}
			worst = math.Max(worst, math.Abs(a-b)/float64(n))
		}
	}
	return PSNR(tiled, whole), worst
}
