package stages

import (
	"fmt"
	"math"
)

// PadMode says what a tile sees beyond the canvas edge when the canvas is
// smaller than a tile.
type PadMode int

// Padding modes.
const (
	PadReflect PadMode = iota // mirror without repeating the edge (numpy "reflect")
	PadZero                   // zeros
)

// Window holds a tile's separable fusion weights: the weight of tile pixel
// (y, x) is Y[y]·X[x]. It is zero on the halo (the context the model sees
// but whose output is not trusted), rises as a raised cosine (Hann) ramp
// across the overlap, and is flat inside. Sides at the canvas border have
// neither halo nor ramp, and pixels beyond the canvas (padding) weigh zero.
// Tiles in one row or column share slices: treat them as read-only.
type Window struct {
	Y, X []float32
}

// At returns the weight of tile pixel (y, x).
func (w Window) At(y, x int) float32 { return w.Y[y] * w.X[x] }

// Tile is the region of the canvas one model evaluation sees: Height×Width
// pixels from the canvas position (Y0, X0), core plus halo. A tile may reach
// beyond the bottom or right canvas edge only when the canvas is smaller than
// a tile; Extract pads there.
type Tile struct {
	Y0, X0        int
	Height, Width int
	Window        Window
}

// TileGrid covers a canvas with equal tiles, so that one model shape serves
// all of them. Along each axis the tiles are evenly spaced, the first starts
// at 0 and the last ends exactly at the canvas edge, and neighbouring cores
// (tiles minus halo) overlap by at least Overlap pixels. The windows of all
// tiles add up to a positive weight at every canvas pixel, so normalising by
// the total weight (Accumulator) gives a partition of unity.
type TileGrid struct {
	Height, Width         int // canvas
	TileHeight, TileWidth int // model input size, a multiple of the size multiple
	Overlap, Halo         int
	Align                 int // origins are multiples of it (see TileOptions.Align); 1 = none
	Pad                   PadMode
	Rows, Cols            int // tiles along y and x
	Tiles                 []Tile
}

// TileOptions configure NewTileGrid.
type TileOptions struct {
	// Size is the requested tile edge; it is rounded up to Multiple.
	Size int
	// Multiple is the size multiple the model needs (e.g. 8 or 64); 0 means 1.
	Multiple int
	// Overlap is the least overlap of neighbouring cores, carrying the ramp.
	Overlap int
	// Halo is the context on each interior side whose output weighs zero;
	// tiled output equals untiled output when it covers the model's
	// receptive field.
	Halo int
	// Pad is the padding for canvases smaller than a tile.
	Pad PadMode
	// Align makes tile origins multiples of Align (except a last tile that
	// must end at an edge that is not). A U-Net that downsamples by m is
	// translation-equivariant only for shifts by multiples of m, so its tiles
	// agree with the untiled run only when their origins are aligned so.
	// 0 and 1 mean no alignment; it is also dropped when the stride the
	// tile, halo and overlap leave is not larger than Align.
	Align int
}

// NewTileGrid lays tiles over a height×width canvas.
func NewTileGrid(height, width int, o TileOptions) (*TileGrid, error) {
	if height < 1 || width < 1 {
		return nil, fmt.Errorf("tile grid: canvas %dx%d, want positive sizes", width, height)
	}
	mult := o.Multiple
	if mult == 0 {
		mult = 1
	}
	if mult < 0 || o.Size < 1 || o.Overlap < 0 || o.Halo < 0 {
		return nil, fmt.Errorf("tile grid: size %d, multiple %d, overlap %d, halo %d: want size ≥ 1 and no negative value", o.Size, o.Multiple, o.Overlap, o.Halo)
	}
	if o.Pad != PadReflect && o.Pad != PadZero {
		return nil, fmt.Errorf("tile grid: unknown pad mode %d", o.Pad)
	}
	size := (o.Size + mult - 1) / mult * mult
	if size-2*o.Halo-o.Overlap < 1 {
		return nil, fmt.Errorf("tile grid: tile %d leaves no stride after halo 2×%d and overlap %d", size, o.Halo, o.Overlap)
	}
	if o.Align < 0 {
		return nil, fmt.Errorf("tile grid: align %d, want ≥ 0", o.Align)
	}
	ys, wy := tileAxis(height, size, o.Overlap, o.Halo, o.Align)
	xs, wx := tileAxis(width, size, o.Overlap, o.Halo, o.Align)
	g := &TileGrid{
		Height: height, Width: width, TileHeight: size, TileWidth: size,
		Overlap: o.Overlap, Halo: o.Halo, Align: max(o.Align, 1), Pad: o.Pad, Rows: len(ys), Cols: len(xs),
	}
	for i, y0 := range ys {
		for j, x0 := range xs {
			g.Tiles = append(g.Tiles, Tile{Y0: y0, X0: x0, Height: size, Width: size, Window: Window{Y: wy[i], X: wx[j]}})
		}
	}
	return g, nil
}

// tileAxis places tiles of size t along an axis of length n and returns
// their starts and 1-D windows. With align > 1 the inner starts are
// rounded to multiples of align, and the stride is reduced by align so that
// the rounding never opens a gap wider than the unaligned stride.
func tileAxis(n, t, overlap, halo, align int) ([]int, [][]float32) {
	if n <= t {
		w := make([]float32, t)
		for p := 0; p < n; p++ {
			w[p] = 1
		}
		return []int{0}, [][]float32{w}
	}
	stride := t - 2*halo - overlap // the largest stride keeping cores overlapped by ≥ overlap
	if align > 1 && stride > align {
		stride -= align
	} else {
		align = 1 // tiles too small for the alignment: coverage comes first
	}
	k := (n-t+stride-1)/stride + 1
	starts := make([]int, k)
	ws := make([][]float32, k)
	for i := range starts {
		// round(i·(n−t)/(k−1)), half up, in integers.
		starts[i] = (2*i*(n-t) + (k - 1)) / (2 * (k - 1))
		if align > 1 && i > 0 && i < k-1 {
			a := (starts[i] + align/2) / align * align
			starts[i] = min(a, (n-t)/align*align)
		}
		w := make([]float32, t)
		for p := range w {
			v := 1.0
			if i > 0 {
				v *= ramp(p-halo, overlap)
			}
			if i < k-1 {
				v *= ramp(t-1-p-halo, overlap)
			}
			w[p] = float32(v)
		}
		ws[i] = w
	}
	return starts, ws
}

// ramp is 0 before q = 0, sin²(π/2·(q+½)/overlap) on [0, overlap), then 1.
func ramp(q, overlap int) float64 {
	switch {
	case q < 0:
		return 0
	case q >= overlap:
		return 1
	}
	s := math.Sin(math.Pi / 2 * (float64(q) + 0.5) / float64(overlap))
	return s * s
}

// reflectIndex maps i to [0, n) by mirroring without repeating the edge.
func reflectIndex(i, n int) int {
	if n == 1 {
		return 0
	}
	p := 2 * (n - 1)
	i %= p
	if i < 0 {
		i += p
	}
	if i >= n {
		i = p - i
	}
	return i
}

// Extract copies tile t of the c-channel canvas (c×Height×Width) into dst
// (c×TileHeight×TileWidth), padding beyond the canvas as the grid says.
func (g *TileGrid) Extract(dst, canvas []float32, c int, t Tile) error {
	if c < 1 || len(canvas) != c*g.Height*g.Width {
		return fmt.Errorf("extract tile: canvas has %d values, want %d×%d×%d", len(canvas), c, g.Height, g.Width)
	}
	th, tw := t.Height, t.Width
	if len(dst) != c*th*tw {
		return fmt.Errorf("extract tile: dst has %d values, want %d×%d×%d", len(dst), c, th, tw)
	}
	H, W := g.Height, g.Width
	inside := t.X0 >= 0 && t.X0+tw <= W
	for ch := 0; ch < c; ch++ {
		plane := canvas[ch*H*W : (ch+1)*H*W]
		for y := 0; y < th; y++ {
			out := dst[(ch*th+y)*tw : (ch*th+y+1)*tw]
			gy := t.Y0 + y
			if gy < 0 || gy >= H {
				if g.Pad == PadZero {
					clear(out)
					continue
				}
				gy = reflectIndex(gy, H)
			}
			row := plane[gy*W : (gy+1)*W]
			if inside {
				copy(out, row[t.X0:t.X0+tw])
				continue
			}
			// The part inside the canvas in one copy, the padding around it
			// value by value.
			lo, hi := min(max(-t.X0, 0), tw), max(min(W-t.X0, tw), 0)
			if lo < hi {
				copy(out[lo:hi], row[t.X0+lo:t.X0+hi])
			} else {
				hi = lo
			}
			for _, span := range [2][2]int{{0, lo}, {hi, tw}} {
				for x := span[0]; x < span[1]; x++ {
					if g.Pad == PadZero {
						out[x] = 0
					} else {
						out[x] = row[reflectIndex(t.X0+x, W)]
					}
				}
			}
		}
	}
	return nil
}

// Accumulator fuses tile outputs into one canvas: it keeps the
// window-weighted sum of the outputs and the sum of the weights per pixel,
// takes tiles in any order, and normalises once. Sums are kept in float64 so
// that fusing a constant returns it exactly and the order of tiles does not
// matter beyond float64 rounding.
type Accumulator struct {
	C, Height, Width int
	sum              []float64
	weight           []float64
}

// NewAccumulator returns an empty accumulator for a c×height×width canvas.
func NewAccumulator(c, height, width int) *Accumulator {
	return &Accumulator{C: c, Height: height, Width: width,
		sum: make([]float64, c*height*width), weight: make([]float64, height*width)}
}

// Reset clears the sums for the next step.
func (a *Accumulator) Reset() { a.ResetRows(0, a.Height) }

// ResetRows clears the sums of canvas rows [y0, y1), so that a caller may
// clear disjoint bands at the same time.
func (a *Accumulator) ResetRows(y0, y1 int) {
	n, w := a.Height*a.Width, a.Width
	for ch := 0; ch < a.C; ch++ {
		clear(a.sum[ch*n+y0*w : ch*n+y1*w])
	}
	clear(a.weight[y0*w : y1*w])
}

// Add adds a tile's output (C×t.Height×t.Width) with the tile's window.
// Pixels beyond the canvas are dropped.
func (a *Accumulator) Add(t Tile, data []float32) error {
	th, tw := t.Height, t.Width
	if len(data) != a.C*th*tw || len(t.Window.Y) != th || len(t.Window.X) != tw {
		return fmt.Errorf("accumulate tile: %d values and a %dx%d window, want %d×%d×%d", len(data), len(t.Window.X), len(t.Window.Y), a.C, th, tw)
	}
	if t.Y0 < 0 || t.X0 < 0 || t.Y0 >= a.Height || t.X0 >= a.Width {
		return fmt.Errorf("accumulate tile: origin (%d, %d) outside the %dx%d canvas", t.Y0, t.X0, a.Width, a.Height)
	}
	H, W := a.Height, a.Width
	h := min(th, H-t.Y0)
	w := min(tw, W-t.X0)
	wx := t.Window.X[:w]
	for ch := 0; ch < a.C; ch++ {
		for y := 0; y < h; y++ {
			wy := float64(t.Window.Y[y])
			if wy == 0 {
				continue
			}
			in := data[(ch*th+y)*tw : (ch*th+y)*tw+w]
			base := (ch*H+t.Y0+y)*W + t.X0
			sum := a.sum[base : base+w]
			for x, v := range in {
				sum[x] += wy * float64(wx[x]) * float64(v)
			}
			if ch == 0 {
				wb := (t.Y0+y)*W + t.X0
				wt := a.weight[wb : wb+w]
				for x := range wt {
					wt[x] += wy * float64(wx[x])
				}
			}
		}
	}
	return nil
}

// Result writes sum/weight into dst (C×Height×Width). It fails if a pixel
// has no weight, which means the tiles did not cover the canvas.
func (a *Accumulator) Result(dst []float32) error { return a.ResultRows(dst, 0, a.Height) }

// ResultRows is Result for canvas rows [y0, y1) only (dst is still the
// whole C×Height×Width canvas), so that a caller may normalise disjoint
// bands at the same time.
func (a *Accumulator) ResultRows(dst []float32, y0, y1 int) error {
	if len(dst) != len(a.sum) {
		return fmt.Errorf("accumulator result: dst has %d values, want %d", len(dst), len(a.sum))
	}
	if y0 < 0 || y1 > a.Height || y0 > y1 {
		return fmt.Errorf("accumulator result: rows [%d, %d) outside [0, %d)", y0, y1, a.Height)
	}
	n, lo, hi := a.Height*a.Width, y0*a.Width, y1*a.Width
	weight := a.weight[lo:hi]
	for i, w := range weight {
		if !(w > 0) {
			return fmt.Errorf("accumulator result: pixel (%d, %d) has no weight", (lo+i)/a.Width, (lo+i)%a.Width)
		}
	}
	for ch := 0; ch < a.C; ch++ {
		s := a.sum[ch*n+lo : ch*n+hi]
		d := dst[ch*n+lo : ch*n+hi]
		for i, w := range weight {
			d[i] = float32(s[i] / w)
		}
	}
	return nil
}

// Weights returns a copy of the total weight per canvas pixel.
func (a *Accumulator) Weights() []float64 { return append([]float64(nil), a.weight...) }
