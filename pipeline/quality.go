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
// divided by the same mean over every other pair of neighbours. A seamless
// image scores about 1; seams push it up.
func SeamScore(img []float32, c, h, w int, g *stages.TileGrid) float64 {
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
	var seam, other float64
	var ns, no int
	for ch := 0; ch < c; ch++ {
		p := img[ch*h*w : (ch+1)*h*w]
		for y := 0; y < h; y++ {
			for x := 1; x < w; x++ {
				d := math.Abs(float64(p[y*w+x] - p[y*w+x-1]))
				if cols[x] {
					seam, ns = seam+d, ns+1
				} else {
					other, no = other+d, no+1
				}
			}
		}
		for y := 1; y < h; y++ {
			for x := 0; x < w; x++ {
				d := math.Abs(float64(p[y*w+x] - p[(y-1)*w+x]))
				if rows[y] {
					seam, ns = seam+d, ns+1
				} else {
					other, no = other+d, no+1
				}
			}
		}
	}
	if ns == 0 || other == 0 {
		return 1
	}
	return (seam / float64(ns)) / (other / float64(no))
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
