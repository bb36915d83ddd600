package pipeline

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"

	"tessera/onnx"
	"tessera/stages"
)

// syncLayer is one GroupNorm layer of a decoder cut open by
// tools/sync_decoder.py: its statistics come in as graph inputs (Mean,
// Rstd, [1, G, 1]) and the activation it normalises goes out (Activation,
// [1, Channels, h·Scale, w·Scale] for a latent tile of h×w).
type syncLayer struct {
	Groups     int     `json:"groups"`
	Epsilon    float64 `json:"epsilon"`
	Channels   int     `json:"channels"`
	Scale      int     `json:"scale"`
	Mean       string  `json:"mean"`
	Rstd       string  `json:"rstd"`
	Activation string  `json:"activation"`
}

// syncDecoder is a decoder whose GroupNorm layers take the statistics of
// the whole image (model_sync.onnx and sync.json beside model.onnx).
type syncDecoder struct {
	sess   *onnx.Session
	layers []syncLayer
	input  string
	output string
}

// syncDecoderOf loads the cut-open decoder beside d's, or returns nil when
// there is none.
func (e *Engine) syncDecoderOf(d *decoder) (*syncDecoder, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if d.sync != nil || d.noSync {
		return d.sync, nil
	}
	dir := filepath.Dir(d.ae.Decoder)
	data, err := onnx.ReadConfigFile(filepath.Join(dir, "sync.json"))
	if os.IsNotExist(err) {
		d.noSync = true
		return nil, nil
	}
	if err != nil {
		return nil, ModelUnusable(err)
	}
	var spec struct {
		Layers []syncLayer `json:"layers"`
		Input  string      `json:"input"`
		Output string      `json:"output"`
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, ModelUnusable(fmt.Errorf("%s/sync.json: %w", dir, err))
	}
	for i, l := range spec.Layers {
		if l.Groups < 1 || l.Channels < l.Groups || l.Channels%l.Groups != 0 || l.Scale < 1 || l.Scale > 64 {
			return nil, ModelUnusable(fmt.Errorf("%s/sync.json: layer %d: %+v", dir, i, l))
		}
	}
	m, err := e.env.LoadModel(filepath.Join(dir, "model_sync.onnx"))
	if err != nil {
		return nil, ModelUnusable(err)
	}
	s := &syncDecoder{layers: spec.Layers, input: spec.Input, output: spec.Output}
	if s.sess, err = e.env.NewSession(m, onnx.SessionOptions{}); err != nil {
		return nil, &SessionError{Model: dir, Err: err}
	}
	d.sync = s
	return s, nil
}

// run decodes one latent tile (C×h×w, scaled) with the statistics known
// so far (mean, rstd per layer; layers from len(mean) on get 0 and 1) and
// returns every output.
func (s *syncDecoder) run(ctx context.Context, d *decoder, z []float32, c, h, w int, mean, rstd [][]float32) (map[string]onnx.Tensor, error) {
	in := map[string]onnx.Tensor{s.input: onnx.FloatTensor(z, 1, int64(c), int64(h), int64(w))}
	f := int64(d.ae.Factor)
	shapes := map[string][]int64{s.output: {1, 3, int64(h) * f, int64(w) * f}}
	for k, l := range s.layers {
		m, r := make([]float32, l.Groups), make([]float32, l.Groups)
		if k < len(mean) {
			copy(m, mean[k])
			copy(r, rstd[k])
		} else {
			for i := range r {
				r[i] = 1
			}
		}
		in[l.Mean] = onnx.FloatTensor(m, 1, int64(l.Groups), 1)
		in[l.Rstd] = onnx.FloatTensor(r, 1, int64(l.Groups), 1)
		shapes[l.Activation] = []int64{1, int64(l.Channels), int64(h * l.Scale), int64(w * l.Scale)}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	out, err := s.sess.RunShaped(ctx, in, shapes)
	if err == nil {
		d.runs.Add(1)
	}
	return out, err
}

// decodeSynced is decode with the statistics of the whole image: for each
// GroupNorm layer in turn, every tile is run with the statistics of the
// layers before it and the layer's input gathered over the tiles, each
// canvas position weighed by its tile's window over the windows' sum (so
// that it counts once: the windows are a partition of unity); the layer's
// mean and variance are then those of the whole image (sums and sums of
// squares in float64, the between-tile term kept). A last pass with every
// layer's statistics makes the tiles. Memory stays bounded by the tile;
// the cost is a Run per layer and tile more than the naive decode.
// Activations are exact in a tile's core where the halo covers the layers'
// receptive field; a self-attention block attends within its tile.
func (e *Engine) decodeSynced(ctx context.Context, d *decoder, s *syncDecoder, g *stages.TileGrid, z []float32, c, h, w int, scale, shift float32) ([]float32, error) {
	// The windows' sum at every latent position.
	ones := stages.NewAccumulator(1, h, w)
	for _, t := range g.Tiles {
		if err := ones.Add(t, make1(t.Height*t.Width)); err != nil {
			return nil, err
		}
	}
	total := ones.Weights()
	// Each pass cuts its tile out of z again, into one buffer: memory
	// beyond the canvases stays one tile's, whatever the image.
	buf := make([]float32, c*g.TileHeight*g.TileWidth)
	runTile := func(t stages.Tile, mean, rstd [][]float32) (map[string]onnx.Tensor, error) {
		b := buf[:c*t.Height*t.Width]
		if err := g.Extract(b, z, c, t); err != nil {
			return nil, err
		}
		for j := range b {
			b[j] = b[j]/scale + shift
		}
		out, err := s.run(ctx, d, b, c, t.Height, t.Width, mean, rstd)
		if err != nil {
			return nil, fmt.Errorf("decoder %s: %w", d.ae.Decoder, err)
		}
		return out, nil
	}
	var mean, rstd [][]float32
	for k, l := range s.layers {
		sum, sq, cnt := make([]float64, l.Groups), make([]float64, l.Groups), make([]float64, l.Groups)
		per := l.Channels / l.Groups
		for _, t := range g.Tiles {
			out, err := runTile(t, mean, rstd)
			if err != nil {
				return nil, err
			}
			act := out[l.Activation].Float
			ah, aw := t.Height*l.Scale, t.Width*l.Scale
			if len(act) != l.Channels*ah*aw {
				return nil, ModelUnusable(fmt.Errorf("decoder %s: layer %d's activation has %d values, want %d", d.ae.Decoder, k, len(act), l.Channels*ah*aw))
			}
			for y := 0; y < ah; y++ {
				ly, Y := y/l.Scale, t.Y0+y/l.Scale
				if Y >= h || t.Window.Y[ly] == 0 {
					continue
				}
				for x := 0; x < aw; x++ {
					lx, X := x/l.Scale, t.X0+x/l.Scale
					if X >= w || t.Window.X[lx] == 0 {
						continue
					}
					wt := float64(t.Window.Y[ly]) * float64(t.Window.X[lx]) / total[Y*w+X]
					for ch := 0; ch < l.Channels; ch++ {
						v := float64(act[(ch*ah+y)*aw+x])
						gi := ch / per
						sum[gi] += wt * v
						sq[gi] += wt * v * v
						cnt[gi] += wt
					}
				}
			}
		}
		m, r := make([]float32, l.Groups), make([]float32, l.Groups)
		for gi := range m {
			mu := sum[gi] / cnt[gi]
			v := math.Max(sq[gi]/cnt[gi]-mu*mu, 0)
			m[gi], r[gi] = float32(mu), float32(1/math.Sqrt(v+l.Epsilon))
		}
		mean, rstd = append(mean, m), append(rstd, r)
	}
	f := d.ae.Factor
	acc := stages.NewAccumulator(3, h*f, w*f)
	for _, t := range g.Tiles {
		out, err := runTile(t, mean, rstd)
		if err != nil {
			return nil, err
		}
		if !finite(out[s.output].Float) {
			// The synchronised decode has no float32 retry: its statistics
			// are shared by every tile.
			return nil, ModelUnusable(fmt.Errorf("decoder %s: the synchronised decode gave NaN or infinity in the tile at latent (%d, %d) (a float16 decoder that overflows: cut its float32 copy open instead, tools/fp16_decoder.py --fp32 then tools/sync_decoder.py)", d.ae.Decoder, t.Y0, t.X0))
		}
		if err := acc.Add(scaleTile(t, f), out[s.output].Float); err != nil {
			return nil, err
		}
	}
	img := make([]float32, 3*h*f*w*f)
	if err := acc.Result(img); err != nil {
		return nil, err
	}
	for i, v := range img {
		img[i] = min(max(v, -1), 1)
	}
	return img, nil
}

func make1(n int) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = 1
	}
	return out
}
