package pipeline

import (
	"context"
	"path/filepath"
	"testing"

	"tessera/stages"
)

// lowResPhoto writes the held-out photograph downscaled by factor
// (Lanczos) and returns its path with the full-size original.
func lowResPhoto(t *testing.T, factor int) (string, []float32) {
	t.Helper()
	orig, w, h, err := LoadImage(filepath.Join("..", "testdata", "images", "chelsea-256.png"))
	if err != nil {
		t.Fatal(err)
	}
	small := make([]float32, 3*(h/factor)*(w/factor))
	if err := stages.Resample(small, orig, 3, h, w, h/factor, w/factor, stages.FilterLanczos); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "low.png")
	if err := SaveImage(path, small, w/factor, h/factor); err != nil {
		t.Fatal(err)
	}
	return path, orig
}

func demoUpscale(path string, tile int) Item {
	return Item{Seed: 9, Class: -1, Image: path, Scale: 4, SR: StageParams{Model: "demo-sr", Steps: 6, Strength: 0.5, Tile: Tiling{Size: tile, Overlap: 32}}}
}

func TestDemoSRTiledMatchesUntiledAndIsSeamless(t *testing.T) {
	// 128² -> 512²: enough tile edges for the seam score to average over.
	path, _ := lowResPhoto(t, 2)
	e := newEngine(t, Options{Batch: 4})
	untiled, err := e.Make(context.Background(), demoUpscale(path, 512), nil)
	if err != nil {
		t.Fatal(err)
	}
	if untiled.Width != 512 || untiled.Height != 512 || untiled.Plan.Stages[0].Tiles != 1 {
		t.Fatalf("untiled plan %+v", untiled.Plan)
	}
	for _, tile := range []int{192, 256} {
		res, err := e.Make(context.Background(), demoUpscale(path, tile), nil)
		if err != nil {
			t.Fatal(err)
		}
		if res.Width != 512 || res.Height != 512 {
			t.Fatalf("tile %d: size %dx%d", tile, res.Width, res.Height)
		}
		g, err := e.Grid(res.Plan.Stages[0])
		if err != nil {
			t.Fatal(err)
		}
		if len(g.Tiles) < 4 {
			t.Fatalf("tile %d: %d tiles", tile, len(g.Tiles))
		}
		psnr := PSNR(res.Image, untiled.Image)
		seam := SeamScore(res.Image, 3, 512, 512, g)
		t.Logf("tile %d: %d tiles, PSNR vs untiled %.2f dB, seam score %.3f", tile, len(g.Tiles), psnr, seam)
		if psnr < 40 {
			t.Errorf("tile %d: PSNR vs untiled %.2f dB, want ≥ 40", tile, psnr)
		}
		if seam > 1.10 {
			t.Errorf("tile %d: seam score %.3f, want ≤ 1.10", tile, seam)
		}
	}
}

func TestDemoSRShortHaloDiffers(t *testing.T) {
	// Without a halo the tiles lose context at their edges: the output must
	// differ from the untiled run, or the comparison above proves nothing.
	path, orig := lowResPhoto(t, 4)
	e := newEngine(t, Options{Batch: 4})
	untiled, err := e.Make(context.Background(), demoUpscale(path, 256), nil)
	if err != nil {
		t.Fatal(err)
	}
	it := demoUpscale(path, 128)
	it.SR.Tile.Halo = intp(0)
	res, err := e.Make(context.Background(), it, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("demo-sr 4x of the held-out photograph: %.2f dB against the original", PSNR(untiled.Image, orig))
	if psnr := PSNR(res.Image, untiled.Image); psnr > 100 {
		t.Fatalf("halo 0: PSNR vs untiled %.1f dB, indistinguishable", psnr)
	}
}

func TestSeamScoreSeesSeams(t *testing.T) {
	// The same grid over an image with a step at every core edge must score
	// well above 1, or the metric is blind.
	g, err := stages.NewTileGrid(64, 64, stages.TileOptions{Size: 32, Overlap: 8, Halo: 4})
	if err != nil {
		t.Fatal(err)
	}
	img := make([]float32, 3*64*64)
	for i := range img {
		img[i] = float32((i*7919)%13) / 100 // texture
	}
	smooth := SeamScore(img, 3, 64, 64, g)
	for _, tl := range g.Tiles {
		for c := 0; c < 3; c++ {
			for y := tl.Y0 + g.Halo; y < min(64, tl.Y0+tl.Height-g.Halo); y++ {
				for x := tl.X0 + g.Halo; x < min(64, tl.X0+tl.Width-g.Halo); x++ {
					img[(c*64+y)*64+x] += 0.05 * float32(tl.Y0+tl.X0) / 64
				}
			}
		}
	}
	if seamy := SeamScore(img, 3, 64, 64, g); seamy < 1.2*smooth {
		t.Fatalf("seam score %.3f with steps at the tile edges, %.3f without", seamy, smooth)
	}
}
