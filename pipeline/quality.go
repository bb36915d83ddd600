package pipeline

import (
	"math"

	"tessera/onnx"
	"tessera/stages"
)

// PSNR is the peak signal-to-noise ratio in dB of two images in [-1, 1],
// measured on the [0, 1] scale as image papers report it. Identical images
// give +Inf.
func PSNR(a, b []float32) float64 {
	if len(a) != len(b) || len(a) == 0 {
		return math.NaN()
	}
	var se float64
	for i := range a {
		d := float64(a[i]-b[i]) / 2
		se += d * d
	}
	mse := se / float64(len(a))
	if mse == 0 {
		return math.Inf(1)
	}
	return 10 * math.Log10(1/mse)
}

// SeamScore measures visible tile seams in a c×h×w image made with grid:
// the mean absolute difference between neighbouring pixels across the edges
// of the tiles' trusted regions (where one tile's output starts to count),
// divided by the same mean over every other pair of neighbours at the same
// phase modulo the grid's alignment. The phase matters for models that work
// on a coarser grid (a U-Net downsampling by 4 leaves a faint period-4
// texture, and aligned tile edges all sit on the same phase of it). A
// seamless image scores about 1; seams push it up.
func SeamScore(img []float32, c, h, w int, g *stages.TileGrid) float64 {
	period := max(g.Align, 1)
	rows, cols := map[int]bool{}, map[int]bool{}
	for _, t := range g.Tiles {
		for _, y := range []int{t.Y0 + g.Halo, t.Y0 + t.Height - g.Halo} {
			if y > 0 && y < h {
				rows[y] = true
			}
		}
		for _, x := range []int{t.X0 + g.Halo, t.X0 + t.Width - g.Halo} {
			if x > 0 && x < w {
				cols[x] = true
			}
		}
	}
	// Sums and counts of |difference| per phase, at edges and elsewhere,
	// for the two directions separately.
	type acc struct {
		edge, other []float64
		ne, no      []int
	}
	newAcc := func() *acc {
		return &acc{make([]float64, period), make([]float64, period), make([]int, period), make([]int, period)}
	}
	hx, hy := newAcc(), newAcc()
	for ch := 0; ch < c; ch++ {
		p := img[ch*h*w : (ch+1)*h*w]
		for y := 0; y < h; y++ {
			for x := 1; x < w; x++ {
				d := math.Abs(float64(p[y*w+x] - p[y*w+x-1]))
				if r := x % period; cols[x] {
					hx.edge[r], hx.ne[r] = hx.edge[r]+d, hx.ne[r]+1
				} else {
					hx.other[r], hx.no[r] = hx.other[r]+d, hx.no[r]+1
				}
			}
		}
		for y := 1; y < h; y++ {
			for x := 0; x < w; x++ {
				d := math.Abs(float64(p[y*w+x] - p[(y-1)*w+x]))
				if r := y % period; rows[y] {
					hy.edge[r], hy.ne[r] = hy.edge[r]+d, hy.ne[r]+1
				} else {
					hy.other[r], hy.no[r] = hy.other[r]+d, hy.no[r]+1
				}
			}
		}
	}
	// Observed edge differences over what the same phase shows elsewhere.
	var observed, expected float64
	for _, a := range []*acc{hx, hy} {
		for r := 0; r < period; r++ {
			if a.ne[r] == 0 || a.no[r] == 0 {
				continue
			}
			observed += a.edge[r]
			expected += float64(a.ne[r]) * a.other[r] / float64(a.no[r])
		}
	}
	if expected == 0 {
		return 1
	}
	return observed / expected
}

// Grid returns the tile grid a stage of a plan uses.
func (e *Engine) Grid(sp StagePlan) (*stages.TileGrid, error) {
	r, err := e.runner(sp.Model)
	if err != nil {
		return nil, err
	}
	if sp.Kind == onnx.KindBase {
		return stages.NewTileGrid(sp.Height, sp.Width, stages.TileOptions{Size: sp.TileSize})
	}
	return tileGrid(sp, r.model.Manifest)
}
