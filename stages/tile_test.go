package stages

import (
	"math"
	"testing"

	"pgregory.net/rapid"
)

type gridCase struct {
	h, w, c int
	opt     TileOptions
}

func drawGrid(t *rapid.T) (gridCase, *TileGrid) {
	gc := gridCase{
		h: rapid.IntRange(1, 160).Draw(t, "height"),
		w: rapid.IntRange(1, 160).Draw(t, "width"),
		c: rapid.IntRange(1, 3).Draw(t, "channels"),
	}
	gc.opt.Size = rapid.IntRange(4, 80).Draw(t, "size")
	gc.opt.Multiple = rapid.SampledFrom([]int{1, 4, 8}).Draw(t, "multiple")
	size := (gc.opt.Size + gc.opt.Multiple - 1) / gc.opt.Multiple * gc.opt.Multiple
	gc.opt.Halo = rapid.IntRange(0, min(8, (size-1)/2)).Draw(t, "halo")
	gc.opt.Overlap = rapid.IntRange(0, min(24, size-2*gc.opt.Halo-1)).Draw(t, "overlap")
	gc.opt.Pad = rapid.SampledFrom([]PadMode{PadReflect, PadZero}).Draw(t, "pad")
	gc.opt.Align = rapid.SampledFrom([]int{0, 1, 2, 4, 8}).Draw(t, "align")
	g, err := NewTileGrid(gc.h, gc.w, gc.opt)
	if err != nil {
		t.Fatal(err)
	}
	return gc, g
}

func TestTileGridProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		gc, g := drawGrid(t)
		if g.TileHeight%max(gc.opt.Multiple, 1) != 0 || g.TileHeight < gc.opt.Size || g.TileHeight != g.TileWidth {
			t.Fatalf("tile size %dx%d for requested %d, multiple %d", g.TileWidth, g.TileHeight, gc.opt.Size, gc.opt.Multiple)
		}
		total := make([]float64, gc.h*gc.w)
		for _, tl := range g.Tiles {
			if tl.Height != g.TileHeight || tl.Width != g.TileWidth {
				t.Fatalf("tile %+v differs from the grid size", tl)
			}
			// Tiles end at the canvas edge or, for small canvases, pad it.
			if tl.Y0 < 0 || tl.X0 < 0 || (tl.Y0+tl.Height > gc.h && tl.Y0 != 0) || (tl.X0+tl.Width > gc.w && tl.X0 != 0) {
				t.Fatalf("tile at (%d, %d) size %d outside %dx%d", tl.Y0, tl.X0, tl.Height, gc.w, gc.h)
			}
			for y := 0; y < tl.Height && tl.Y0+y < gc.h; y++ {
				for x := 0; x < tl.Width && tl.X0+x < gc.w; x++ {
					w := tl.Window.At(y, x)
					if w < 0 || w > 1 {
						t.Fatalf("weight %g outside [0, 1]", w)
					}
					total[(tl.Y0+y)*gc.w+tl.X0+x] += float64(w)
				}
			}
		}
		// Origins are aligned, except a last tile ending at an unaligned edge.
		// (The alignment applies only where the stride leaves room for it.)
		if a := gc.opt.Align; a > 1 && g.TileHeight-2*gc.opt.Halo-gc.opt.Overlap > a {
			for _, tl := range g.Tiles {
				if (tl.Y0%a != 0 && tl.Y0+tl.Height != gc.h) || (tl.X0%a != 0 && tl.X0+tl.Width != gc.w) {
					t.Fatalf("tile at (%d, %d) not aligned to %d", tl.Y0, tl.X0, a)
				}
			}
		}
		// The last tile ends exactly at the canvas edge.
		last := g.Tiles[len(g.Tiles)-1]
		if gc.h > g.TileHeight && last.Y0+last.Height != gc.h || gc.w > g.TileWidth && last.X0+last.Width != gc.w {
			t.Fatalf("last tile at (%d, %d) does not end at the %dx%d edge", last.Y0, last.X0, gc.w, gc.h)
		}
		for i, w := range total {
			if !(w > 0) {
				t.Fatalf("pixel (%d, %d) has total weight %g", i/gc.w, i%gc.w, w)
			}
		}
		// Normalised weights sum to one at every pixel.
		norm := make([]float64, len(total))
		for _, tl := range g.Tiles {
			for y := 0; y < tl.Height && tl.Y0+y < gc.h; y++ {
				for x := 0; x < tl.Width && tl.X0+x < gc.w; x++ {
					i := (tl.Y0+y)*gc.w + tl.X0 + x
					norm[i] += float64(tl.Window.At(y, x)) / total[i]
				}
			}
		}
		for i, s := range norm {
			if math.Abs(s-1) > 1e-12 {
				t.Fatalf("normalised weights at pixel %d sum to %g", i, s)
			}
		}
		// Fusing a constant prediction returns the constant exactly.
		cst := rapid.Float32Range(-3, 3).Draw(t, "constant")
		acc := NewAccumulator(gc.c, gc.h, gc.w)
		data := make([]float32, gc.c*g.TileHeight*g.TileWidth)
		for i := range data {
			data[i] = cst
		}
		for _, tl := range g.Tiles {
			if err := acc.Add(tl, data); err != nil {
				t.Fatal(err)
			}
		}
		out := make([]float32, gc.c*gc.h*gc.w)
		if err := acc.Result(out); err != nil {
			t.Fatal(err)
		}
		for i, v := range out {
			if v != cst {
				t.Fatalf("fused constant %v at %d is %v", cst, i, v)
			}
		}
	})
}

// conv applies a (2r+1)² convolution that mixes channels, zero-padded at the
// edges of the c×h×w input: a model of bounded receptive field r.
func conv(in []float32, c, h, w, r int, k []float32) []float32 {
	out := make([]float32, len(in))
	kw := 2*r + 1
	for co := 0; co < c; co++ {
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				var s float32
				for ci := 0; ci < c; ci++ {
					for dy := -r; dy <= r; dy++ {
						yy := y + dy
						if yy < 0 || yy >= h {
							continue
						}
						for dx := -r; dx <= r; dx++ {
							xx := x + dx
							if xx < 0 || xx >= w {
								continue
							}
							s += k[((co*c+ci)*kw+dy+r)*kw+dx+r] * in[(ci*h+yy)*w+xx]
						}
					}
				}
				out[(co*h+y)*w+x] = s
			}
		}
	}
	return out
}

func TestTiledConvolutionEqualsUntiled(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		gc, g := drawGrid(t)
		r := rapid.IntRange(0, min(3, g.Halo)).Draw(t, "radius") // the halo covers the receptive field
		if g.Pad == PadReflect && (gc.h < g.TileHeight || gc.w < g.TileWidth) {
			// A reflection-padded tile shows the model mirrored content where
			// the zero-padded untiled function sees zeros: compare with zero
			// padding there.
			g.Pad = PadZero
		}
		kw := 2*r + 1
		k := make([]float32, gc.c*gc.c*kw*kw)
		for i := range k {
			k[i] = rapid.Float32Range(-1, 1).Draw(t, "k")
		}
		canvas := make([]float32, gc.c*gc.h*gc.w)
		seed := rapid.Uint64().Draw(t, "seed")
		if err := (Noise{Seed: seed, Stream: StreamBase}).Fill(canvas, 0, gc.c, 0, 0, gc.h, gc.w); err != nil {
			t.Fatal(err)
		}
		want := conv(canvas, gc.c, gc.h, gc.w, r, k)
		acc := NewAccumulator(gc.c, gc.h, gc.w)
		tile := make([]float32, gc.c*g.TileHeight*g.TileWidth)
		// Any order: walk the tiles backwards.
		for i := len(g.Tiles) - 1; i >= 0; i-- {
			tl := g.Tiles[i]
			if err := g.Extract(tile, canvas, gc.c, tl); err != nil {
				t.Fatal(err)
			}
			if err := acc.Add(tl, conv(tile, gc.c, tl.Height, tl.Width, r, k)); err != nil {
				t.Fatal(err)
			}
		}
		got := make([]float32, len(canvas))
		if err := acc.Result(got); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			if d := math.Abs(float64(got[i] - want[i])); d > 1e-6*math.Max(1, math.Abs(float64(want[i]))) {
				t.Fatalf("tiled %g, untiled %g at %d (diff %g)", got[i], want[i], i, d)
			}
		}
	})
}

func TestExtractReflectsSmallCanvas(t *testing.T) {
	// A 3x2 canvas in a 4x4 tile: reflection without repeating the edge.
	g, err := NewTileGrid(2, 3, TileOptions{Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if len(g.Tiles) != 1 {
		t.Fatalf("%d tiles, want 1", len(g.Tiles))
	}
	canvas := []float32{1, 2, 3, 4, 5, 6}
	tile := make([]float32, 16)
	if err := g.Extract(tile, canvas, 1, g.Tiles[0]); err != nil {
		t.Fatal(err)
	}
	want := []float32{1, 2, 3, 2, 4, 5, 6, 5, 1, 2, 3, 2, 4, 5, 6, 5}
	for i := range want {
		if tile[i] != want[i] {
			t.Fatalf("tile = %v, want %v", tile, want)
		}
	}
	// Cropped after: the accumulator keeps the canvas part only.
	acc := NewAccumulator(1, 2, 3)
	if err := acc.Add(g.Tiles[0], tile); err != nil {
		t.Fatal(err)
	}
	out := make([]float32, 6)
	if err := acc.Result(out); err != nil {
		t.Fatal(err)
	}
	for i := range canvas {
		if out[i] != canvas[i] {
			t.Fatalf("cropped = %v, want %v", out, canvas)
		}
	}
}

func TestTileGridLayout(t *testing.T) {
	// 1024 canvas, tile 256, overlap 64, halo 16: stride ≤ 160, 6 tiles per
	// axis, starts round(k·768/5).
	g, err := NewTileGrid(1024, 1024, TileOptions{Size: 250, Multiple: 64, Overlap: 64, Halo: 16})
	if err != nil {
		t.Fatal(err)
	}
	if g.TileHeight != 256 || g.Rows != 6 || g.Cols != 6 {
		t.Fatalf("grid %dx%d tiles of %d", g.Rows, g.Cols, g.TileHeight)
	}
	want := []int{0, 154, 307, 461, 614, 768}
	for i, w := range want {
		if g.Tiles[i].X0 != w {
			t.Errorf("tile %d starts at %d, want %d", i, g.Tiles[i].X0, w)
		}
	}
	// Interior sides: zero halo, ramp, flat; border sides flat from the edge.
	wx := g.Tiles[1].Window.X
	if wx[0] != 0 || wx[15] != 0 || !(wx[16] > 0 && wx[16] < 0.01) || wx[16+64] != 1 || wx[255] != 0 {
		t.Errorf("interior window: %v %v %v %v %v", wx[0], wx[15], wx[16], wx[80], wx[255])
	}
	if w0 := g.Tiles[0].Window.X; w0[0] != 1 || w0[255] != 0 {
		t.Errorf("border window starts %v, ends %v", w0[0], w0[255])
	}
	if _, err := NewTileGrid(100, 100, TileOptions{Size: 32, Overlap: 16, Halo: 8}); err == nil {
		t.Error("grid with no stride accepted")
	}
}

func BenchmarkTileExtractStitch(b *testing.B) {
	const c, h, w = 3, 1024, 1024
	g, err := NewTileGrid(h, w, TileOptions{Size: 256, Overlap: 64, Halo: 16})
	if err != nil {
		b.Fatal(err)
	}
	canvas := make([]float32, c*h*w)
	_ = (Noise{Seed: 1, Stream: StreamBase}).Fill(canvas, 0, c, 0, 0, h, w)
	out := make([]float32, len(canvas))
	tile := make([]float32, c*g.TileHeight*g.TileWidth)
	acc := NewAccumulator(c, h, w)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		acc.Reset()
		for _, tl := range g.Tiles {
			if err := g.Extract(tile, canvas, c, tl); err != nil {
				b.Fatal(err)
			}
			if err := acc.Add(tl, tile); err != nil {
				b.Fatal(err)
			}
		}
		if err := acc.Result(out); err != nil {
			b.Fatal(err)
		}
	}
	sec := b.Elapsed().Seconds()
	b.ReportMetric(float64(b.N)*float64(len(g.Tiles)*g.TileHeight*g.TileWidth)/sec/1e6, "tileMpx/s")
	b.ReportMetric(float64(b.N)*float64(h*w)/sec/1e6, "canvasMpx/s")
}

func TestAccumulatorRowBandsEqualWhole(t *testing.T) {
	g, err := NewTileGrid(37, 29, TileOptions{Size: 16, Overlap: 4, Halo: 2})
	if err != nil {
		t.Fatal(err)
	}
	whole, bands := NewAccumulator(2, 37, 29), NewAccumulator(2, 37, 29)
	for k, tl := range g.Tiles {
		data := make([]float32, 2*tl.Height*tl.Width)
		for i := range data {
			data[i] = float32((i*31+k*7)%19) / 9
		}
		whole.Add(tl, data)
		bands.Add(tl, data)
	}
	want := make([]float32, 2*37*29)
	if err := whole.Result(want); err != nil {
		t.Fatal(err)
	}
	got := make([]float32, len(want))
	for _, b := range [][2]int{{20, 37}, {0, 11}, {11, 20}} {
		if err := bands.ResultRows(got, b[0], b[1]); err != nil {
			t.Fatal(err)
		}
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("value %d: bands %g, whole %g", i, got[i], want[i])
		}
	}
	bands.ResetRows(0, 20)
	bands.ResetRows(20, 37)
	if err := bands.ResultRows(got, 0, 1); err == nil {
		t.Fatal("rows cleared in bands still have weight")
	}
	if err := bands.ResultRows(got, 5, 40); err == nil {
		t.Fatal("rows beyond the canvas accepted")
	}
}

// TestExtractPaddingMatchesPerPixel checks Extract's row copies against a
// value-by-value reading of the padding rule, for tiles that overhang the
// canvas on any side.
func TestExtractPaddingMatchesPerPixel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		h, w := rapid.IntRange(1, 9).Draw(t, "h"), rapid.IntRange(1, 9).Draw(t, "w")
		th, tw := rapid.IntRange(1, 24).Draw(t, "th"), rapid.IntRange(1, 24).Draw(t, "tw")
		pad := rapid.SampledFrom([]PadMode{PadReflect, PadZero}).Draw(t, "pad")
		tl := Tile{Y0: rapid.IntRange(-12, h).Draw(t, "y0"), X0: rapid.IntRange(-12, w).Draw(t, "x0"), Height: th, Width: tw}
		g := &TileGrid{Height: h, Width: w, TileHeight: th, TileWidth: tw, Pad: pad}
		canvas := make([]float32, 2*h*w)
		for i := range canvas {
			canvas[i] = float32(i + 1)
		}
		got := make([]float32, 2*th*tw)
		if err := g.Extract(got, canvas, 2, tl); err != nil {
			t.Fatal(err)
		}
		for ch := 0; ch < 2; ch++ {
			for y := 0; y < th; y++ {
				for x := 0; x < tw; x++ {
					gy, gx := tl.Y0+y, tl.X0+x
					var want float32
					if pad == PadReflect || (gy >= 0 && gy < h && gx >= 0 && gx < w) {
						want = canvas[(ch*h+reflectIndex(gy, h))*w+reflectIndex(gx, w)]
					}
					if v := got[(ch*th+y)*tw+x]; v != want {
						t.Fatalf("channel %d, tile (%d, %d) = %v, want %v", ch, y, x, v, want)
					}
				}
			}
		}
	})
}
