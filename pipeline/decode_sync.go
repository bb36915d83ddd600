package pipeline

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"

	"tessera/onnx"
	"tessera/stages"
)

// syncLayer is one GroupNorm layer of a decoder or an encoder cut open by
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

// syncDecoder is an autoencoder graph (a decoder or an encoder) whose
// GroupNorm layers take the statistics of the whole image
// (model_sync.onnx and sync.json beside model.onnx).
type syncDecoder struct {
	sess   *onnx.Session
	layers []syncLayer
	input  string
	output string
}

// syncOf loads the cut-open copy of the graph a, or returns nil when
// there is none.
func (e *Engine) syncOf(a *aeSession) (*syncDecoder, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, errors.New("engine closed")
	}
	if a.sync != nil || a.noSync {
		return a.sync, nil
	}
	dir := filepath.Dir(a.path)
	data, err := onnx.ReadConfigFile(filepath.Join(dir, "sync.json"))
	if os.IsNotExist(err) {
		a.noSync = true
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
	a.sync = s
	return s, nil
}

// syncDecoderOf is syncOf for a decoder.
func (e *Engine) syncDecoderOf(d *decoder) (*syncDecoder, error) { return e.syncOf(&d.aeSession) }

// run runs one tile (x of shape in, for a latent tile of h×w) with the
// statistics known so far (mean, rstd per layer; layers from len(mean) on
// get 0 and 1), its output of shape out, and returns every output.
func (s *syncDecoder) run(ctx context.Context, a *aeSession, x []float32, in, out []int64, h, w int, mean, rstd [][]float32) (map[string]onnx.Tensor, error) {
	inputs := map[string]onnx.Tensor{s.input: onnx.FloatTensor(x, in...)}
	shapes := map[string][]int64{s.output: out}
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
		inputs[l.Mean] = onnx.FloatTensor(m, 1, int64(l.Groups), 1)
		inputs[l.Rstd] = onnx.FloatTensor(r, 1, int64(l.Groups), 1)
		shapes[l.Activation] = []int64{1, int64(l.Channels), int64(h * l.Scale), int64(w * l.Scale)}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	res, err := s.sess.RunShaped(ctx, inputs, shapes)
	if err == nil {
		a.runs.Add(1)
	}
	return res, err
}

// decodeSynced is decode with the statistics of the whole image (see
// syncedTiles).
func (e *Engine) decodeSynced(ctx context.Context, d *decoder, s *syncDecoder, g *stages.TileGrid, z []float32, c, h, w int, scale, shift float32) ([]float32, error) {
	f := d.ae.Factor
	acc := stages.NewAccumulator(3, h*f, w*f)
	err := e.syncedTiles(ctx, s, &d.aeSession, g, h, w, c*g.TileHeight*g.TileWidth,
		func(dst []float32, t stages.Tile) ([]int64, error) {
			if err := g.Extract(dst, z, c, t); err != nil {
				return nil, err
			}
			for j := range dst {
				dst[j] = dst[j]/scale + shift
			}
			return []int64{1, int64(c), int64(t.Height), int64(t.Width)}, nil
		},
		func(t stages.Tile) []int64 { return []int64{1, 3, int64(t.Height * f), int64(t.Width * f)} },
		func(t stages.Tile, out []float32) error { return acc.Add(scaleTile(t, f), out) })
	if err != nil {
		return nil, err
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

// syncedTiles runs a cut-open autoencoder graph over the tiles of g (an
// h×w latent grid) with the statistics of the whole image: for each
// GroupNorm layer in turn, every tile is run with the statistics of the
// layers before it and the layer's input gathered over the tiles, each
// canvas position weighed by its tile's window over the windows' sum (so
// that it counts once: the windows are a partition of unity); the layer's
// mean and variance are then those of the whole image (sums and sums of
// squares in float64, the between-tile term kept). A last pass with every
// layer's statistics gives the tiles' outputs to add. fill writes a tile's
// input (at most per values) and returns its shape; out is a tile's output
// shape. Memory stays bounded by the tile; the cost is a Run per layer and
// tile more than the naive pass. Activations are exact in a tile's core
// where the halo covers the layers' receptive field; a self-attention
// block attends within its tile.
func (e *Engine) syncedTiles(ctx context.Context, s *syncDecoder, a *aeSession, g *stages.TileGrid, h, w, per int, fill func(dst []float32, t stages.Tile) ([]int64, error), out func(t stages.Tile) []int64, add func(t stages.Tile, out []float32) error) error {
	// The windows' sum at every latent position.
	ones := stages.NewAccumulator(1, h, w)
	for _, t := range g.Tiles {
		if err := ones.Add(t, make1(t.Height*t.Width)); err != nil {
			return err
		}
	}
	total := ones.Weights()
	// Each pass cuts its tile out of the canvas again, into one buffer:
	// memory beyond the canvases stays one tile's, whatever the image.
	buf := make([]float32, per)
	runTile := func(t stages.Tile, mean, rstd [][]float32) (map[string]onnx.Tensor, error) {
		in, err := fill(buf, t)
		if err != nil {
			return nil, err
		}
		n := int(in[0] * in[1] * in[2] * in[3])
		res, err := s.run(ctx, a, buf[:n], in, out(t), t.Height, t.Width, mean, rstd)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", a.path, err)
		}
		return res, nil
	}
	var mean, rstd [][]float32
	for k, l := range s.layers {
		sum, sq, cnt := make([]float64, l.Groups), make([]float64, l.Groups), make([]float64, l.Groups)
		per := l.Channels / l.Groups
		for _, t := range g.Tiles {
			res, err := runTile(t, mean, rstd)
			if err != nil {
				return err
			}
			act := res[l.Activation].Float
			ah, aw := t.Height*l.Scale, t.Width*l.Scale
			if len(act) != l.Channels*ah*aw {
				return ModelUnusable(fmt.Errorf("%s: layer %d's activation has %d values, want %d", a.path, k, len(act), l.Channels*ah*aw))
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
	for _, t := range g.Tiles {
		res, err := runTile(t, mean, rstd)
		if err != nil {
			return err
		}
		o := res[s.output].Float
		if !finite(o) {
			// The synchronised pass has no float32 retry: its statistics
			// are shared by every tile.
			return ModelUnusable(fmt.Errorf("%s: the synchronised pass gave NaN or infinity in the tile at latent (%d, %d) (a float16 graph that overflows: cut its float32 copy open instead, tools/fp16_decoder.py --fp32 then tools/sync_decoder.py)", a.path, t.Y0, t.X0))
		}
		if err := add(t, o); err != nil {
			return err
		}
	}
	return nil
}

func make1(n int) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = 1
	}
	return out
}
