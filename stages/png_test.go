package stages

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"flag"
	"image"
	"image/png"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

var update = flag.Bool("update", false, "rewrite the PNG fixtures under testdata/")

func sampleParameters() Parameters {
	return Parameters{
		Prompt:         "a lighthouse at dusk, 35mm",
		NegativePrompt: "blurry",
		Params: []Param{
			{"Steps", "20"}, {"Sampler", "DDIM"}, {"CFG scale", "7"}, {"Seed", "7"},
			{"Size", "1024x1024"}, {"Model", "demo-base"},
			{"Tiles", "256/64, halo 16"}, {"Note", `say "hi": ok`}, {"Shift", "1"},
		},
	}
}

// pngWithChunks encodes a small image with the sample metadata.
func pngWithChunks(t testing.TB, sixteen bool, p Parameters, js string) []byte {
	t.Helper()
	c, h, w := 3, 4, 5
	ten := make([]float32, c*h*w)
	if err := (Noise{Seed: 5, Stream: StreamBase}).Fill(ten, 0, c, 0, 0, h, w); err != nil {
		t.Fatal(err)
	}
	var img image.Image
	var err error
	if sixteen {
		img, err = TensorToNRGBA64(ten, c, h, w)
	} else {
		img, err = TensorToNRGBA(ten, c, h, w)
	}
	if err != nil {
		t.Fatal(err)
	}
	text, err := FormatParameters(p)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := EncodePNG(&buf, img, png.DefaultCompression, ParametersChunk(text), TesseraChunk([]byte(js))); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestFormatParameters(t *testing.T) {
	got, err := FormatParameters(sampleParameters())
	if err != nil {
		t.Fatal(err)
	}
	want := "a lighthouse at dusk, 35mm\nNegative prompt: blurry\n" +
		`Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 7, Size: 1024x1024, Model: demo-base, Tiles: "256/64, halo 16", Note: "say \"hi\": ok", Shift: 1`
	if got != want {
		t.Errorf("FormatParameters =\n%s\nwant\n%s", got, want)
	}
	back, err := ParseParameters(got)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, sampleParameters()) {
		t.Errorf("ParseParameters = %+v", back)
	}
	if _, err := FormatParameters(Parameters{Params: []Param{{"bad:key", "1"}}}); err == nil {
		t.Error("key with ':' accepted")
	}
	// Only a parameters line.
	p, err := ParseParameters("Steps: 20, Sampler: DDIM, Seed: 7, Size: 1024x1024")
	if err != nil || p.Prompt != "" || len(p.Params) != 4 || p.Params[3] != (Param{"Size", "1024x1024"}) {
		t.Errorf("params-only text parsed as %+v, %v", p, err)
	}
}

func TestParametersRoundTripProperty(t *testing.T) {
	keyGen := rapid.StringMatching(`[A-Za-z0-9_][A-Za-z0-9_ /-]{0,12}[A-Za-z0-9_/-]`)
	valGen := rapid.StringOfN(rapid.SampledFrom([]rune("ab ,:\"\\\n\t\rxé✓{}1=-/")), 0, 16, -1)
	lineGen := rapid.StringMatching(`[a-z][a-z ,.()]{0,20}[a-z]`)
	rapid.Check(t, func(t *rapid.T) {
		var p Parameters
		for _, l := range rapid.SliceOfN(lineGen, 0, 3).Draw(t, "prompt") {
			if p.Prompt != "" {
				p.Prompt += "\n"
			}
			p.Prompt += l
		}
		if rapid.Bool().Draw(t, "negative") {
			p.NegativePrompt = lineGen.Draw(t, "negative prompt")
		}
		n := rapid.IntRange(1, 8).Draw(t, "pairs")
		for i := 0; i < n; i++ {
			p.Params = append(p.Params, Param{Key: keyGen.Draw(t, "key"), Value: valGen.Draw(t, "value")})
		}
		text, err := FormatParameters(p)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Count(text, "\n") != strings.Count(p.Prompt, "\n")+map[bool]int{true: 1}[p.Prompt != ""]+map[bool]int{true: 1}[p.NegativePrompt != ""] {
			t.Fatalf("line breaks leak out of values: %q", text)
		}
		back, err := ParseParameters(text)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, p) {
			t.Fatalf("round trip of %q:\n got %+v\nwant %+v", text, back, p)
		}
	})
}

func TestPNGChunksRoundTrip(t *testing.T) {
	js := `{"seed":7,"stages":[{"model":"demo-base","shift":1}],"note":"ünïcødé ✓"}`
	for _, sixteen := range []bool{false, true} {
		p := sampleParameters()
		if sixteen {
			p.Prompt = "a lighthouse ✓ at dusk" // not Latin-1: iTXt
		}
		data := pngWithChunks(t, sixteen, p, js)
		// Chunks sit right after IHDR, parameters first.
		if typ := string(data[33+4 : 33+8]); typ != map[bool]string{false: "tEXt", true: "iTXt"}[sixteen] {
			t.Errorf("chunk after IHDR is %s", typ)
		}
		params, tj, err := ReadPNGMetadata(data)
		if err != nil {
			t.Fatal(err)
		}
		if string(tj) != js {
			t.Errorf("tessera chunk = %s", tj)
		}
		back, err := ParseParameters(params)
		if err != nil || !reflect.DeepEqual(back, p) {
			t.Errorf("parameters = %+v, %v", back, err)
		}
		// The image still decodes, at its bit depth.
		img, err := png.Decode(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if depth := data[24]; (depth == 16) != sixteen || img.Bounds().Dx() != 5 {
			t.Errorf("decoded %T of bit depth %d", img, depth)
		}
		if *update {
			name := map[bool]string{false: "meta8.png", true: "meta16.png"}[sixteen]
			if err := os.WriteFile(filepath.Join("testdata", name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// chunk builds one PNG chunk.
func chunk(typ string, body []byte) []byte {
	var b bytes.Buffer
	writeChunk(&b, typ, body)
	return b.Bytes()
}

func zlibBytes(s string) []byte {
	var b bytes.Buffer
	w := zlib.NewWriter(&b)
	w.Write([]byte(s))
	w.Close()
	return b.Bytes()
}

func TestReadTextChunksCompressedAndBad(t *testing.T) {
	base := pngWithChunks(t, false, Parameters{Params: []Param{{"Steps", "1"}}}, "{}")
	ihdrEnd := 33
	withChunks := func(cs ...[]byte) []byte {
		out := append([]byte(nil), base[:ihdrEnd]...)
		for _, c := range cs {
			out = append(out, c...)
		}
		return append(out, base[ihdrEnd:]...)
	}
	z := withChunks(
		chunk("zTXt", append([]byte("Comment\x00\x00"), zlibBytes("caf\xe9")...)),
		chunk("iTXt", append([]byte("Title\x00\x01\x00en\x00Titel\x00"), zlibBytes("ünï")...)),
	)
	got, err := ReadTextChunks(z)
	if err != nil {
		t.Fatal(err)
	}
	want := []TextChunk{{"Comment", "café", false}, {"Title", "ünï", true}, {"parameters", "Steps: 1", false}, {"tessera", "{}", true}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("chunks = %+v, want %+v", got, want)
	}
	if *update {
		if err := os.WriteFile(filepath.Join("testdata", "compressed.png"), z, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	badCRC := append([]byte(nil), base...)
	badCRC[ihdrEnd+12] ^= 1 // a byte of the first text chunk's body
	bomb := withChunks(chunk("zTXt", append([]byte("Bomb\x00\x00"), zlibBytes(strings.Repeat("a", maxInflatedChunk+1))...)))
	long := append([]byte(nil), base...)
	binary.BigEndian.PutUint32(long[ihdrEnd:], 1<<31-1)
	for name, data := range map[string][]byte{
		"empty":        nil,
		"signature":    []byte("\x89PNX\r\n\x1a\n"),
		"truncated":    base[:len(base)-5],
		"bad crc":      badCRC,
		"huge length":  long,
		"zip bomb":     bomb,
		"no keyword":   withChunks(chunk("tEXt", []byte("nokeyword"))),
		"long keyword": withChunks(chunk("tEXt", append([]byte(strings.Repeat("k", 80)), 0))),
		"bad utf8":     withChunks(chunk("iTXt", []byte("k\x00\x00\x00\x00\x00\xff"))),
		"no ihdr":      append(append([]byte(nil), pngSignature...), chunk("IEND", nil)...),
	} {
		if _, err := ReadTextChunks(data); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func FuzzReadTextChunks(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.png"))
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	if len(files) == 0 {
		f.Add(pngWithChunks(f, false, sampleParameters(), "{}"))
	}
	var base bytes.Buffer
	if err := EncodePNG(&base, image.NewGray(image.Rect(0, 0, 1, 1)), png.BestSpeed); err != nil {
		f.Fatal(err)
	}
	tinyBase := base.Bytes()
	if cs, err := ReadTextChunks(tinyBase); err != nil || len(cs) != 0 {
		f.Fatalf("base PNG for re-encoding: %v %v", cs, err)
	}
	f.Add([]byte("parameters\x00Steps: 1"))
	f.Add([]byte("k\x00\x01\x00en\x00K\x00x\x9c\x03\x00\x00\x00\x00\x01"))
	roundTrip := func(t *testing.T, data []byte) {
		chunks, err := ReadTextChunks(data)
		if err != nil {
			return
		}
		// Round trip: what was read writes and reads back the same.
		out, err := InsertTextChunks(tinyBase, chunks...)
		if err != nil {
			t.Fatalf("re-encoding chunks read from valid data: %v", err)
		}
		again, err := ReadTextChunks(out)
		if err != nil {
			t.Fatal(err)
		}
		if len(again) != len(chunks) || (len(chunks) > 0 && !reflect.DeepEqual(again, chunks)) {
			t.Fatalf("round trip: %+v became %+v", chunks, again)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		roundTrip(t, data)
		// The same bytes as the body of each text chunk type, with a valid
		// length and CRC, so that the fuzzer reaches the chunk parsers.
		for _, typ := range []string{"tEXt", "zTXt", "iTXt"} {
			wrapped := append(append(append([]byte(nil), tinyBase[:33]...), chunk(typ, data)...), tinyBase[33:]...)
			roundTrip(t, wrapped)
		}
	})
}

func FuzzParseParameters(f *testing.F) {
	text, _ := FormatParameters(sampleParameters())
	f.Add(text)
	f.Add(`Steps: 20, Note: "a\"b\\", Size: 5x5`)
	f.Add("prompt\nNegative prompt:\nK: \"")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseParameters(s)
		if err != nil || len(p.Params) == 0 {
			return // without a key/value line the format is ambiguous
		}
		// What parses and formats again parses to the same pairs.
		out, err := FormatParameters(p)
		if err != nil {
			return // e.g. a key with a trailing space, which the writer refuses
		}
		q, err := ParseParameters(out)
		if err != nil || !reflect.DeepEqual(p.Params, q.Params) {
			t.Fatalf("re-parse of %q: %+v, %v; want %+v", out, q.Params, err, p.Params)
		}
	})
}

// Every compression level writes the same pixels, and the fast one is no
// larger than storing them uncompressed.
func TestEncodePNGLevels(t *testing.T) {
	img := image.NewNRGBA(image.Rect(0, 0, 64, 48))
	for i := range img.Pix {
		img.Pix[i] = uint8(i * 7 % 251)
	}
	for i := 3; i < len(img.Pix); i += 4 {
		img.Pix[i] = 255
	}
	sizes := map[string]int{}
	for _, name := range []string{"fast", "default", "best", "none"} {
		level, err := PNGCompression(name)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if err := EncodePNG(&buf, img, level, ParametersChunk("p")); err != nil {
			t.Fatal(err)
		}
		sizes[name] = buf.Len()
		got, err := png.Decode(&buf)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for y := 0; y < 48; y++ {
			for x := 0; x < 64; x++ {
				r, g, b, _ := got.At(x, y).RGBA()
				o := img.PixOffset(x, y)
				if uint8(r>>8) != img.Pix[o] || uint8(g>>8) != img.Pix[o+1] || uint8(b>>8) != img.Pix[o+2] {
					t.Fatalf("%s: pixel (%d, %d) differs", name, x, y)
				}
			}
		}
	}
	if sizes["fast"] >= sizes["none"] {
		t.Errorf("fast %d bytes, uncompressed %d", sizes["fast"], sizes["none"])
	}
	if _, err := PNGCompression("zopfli"); err == nil {
		t.Error("an unknown level was accepted")
	}
}
