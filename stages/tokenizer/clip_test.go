package tokenizer

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// clipMerges is CLIP's own merge list (MIT, a copy of ../shared/data/clip kept
// with the tests so that they run in any clone).
var clipMerges = filepath.Join("..", "..", "testdata", "tokenizer", "clip", "bpe_simple_vocab_16e6.txt.gz")

func loadCLIP(t testing.TB) *CLIP {
	t.Helper()
	c, err := LoadCLIPMerges(clipMerges)
	if err != nil {
		t.Fatalf("CLIP's merge list: %v", err)
	}
	return c
}

func TestCLIPMatchesReference(t *testing.T) {
	c := loadCLIP(t)
	if n := len(c.encoder); n != 49408 {
		t.Fatalf("%d tokens, want 49408", n)
	}
	got := c.Encode("a photo of a cat").IDs[:7]
	if want := []int64{49406, 320, 1125, 539, 320, 2368, 49407}; !slices.Equal(got, want) {
		t.Fatalf("a photo of a cat: %v, want %v", got, want)
	}
	f, err := os.Open(filepath.Join("..", "..", "testdata", "tokenizer", "clip-ids.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	n := 0
	for sc.Scan() {
		var ref struct {
			Prompt   string  `json:"prompt"`
			Tokens   []int   `json:"tokens"`
			InputIDs []int64 `json:"input_ids"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ref); err != nil {
			t.Fatal(err)
		}
		n++
		var ids []int
		for _, tk := range c.Tokens(ref.Prompt) {
			ids = append(ids, tk.ID)
		}
		if !slices.Equal(ids, ref.Tokens) && !(len(ids) == 0 && len(ref.Tokens) == 0) {
			t.Errorf("%q: tokens %v, want %v", ref.Prompt, ids, ref.Tokens)
			continue
		}
		e := c.Encode(ref.Prompt)
		if !slices.Equal(e.IDs, ref.InputIDs) {
			t.Errorf("%q: input ids %v, want %v", ref.Prompt, e.IDs, ref.InputIDs)
		}
		if (len(ref.Tokens) > 75) != (e.Truncated == 75) {
			t.Errorf("%q: truncated at %d with %d tokens", ref.Prompt, e.Truncated, len(ref.Tokens))
		}
	}
	if n < 30 {
		t.Fatalf("%d reference prompts, want at least 30", n)
	}
}

func TestCLIPDecodeAndCut(t *testing.T) {
	c := loadCLIP(t)
	long := ""
	for i := 0; i < 40; i++ {
		long += "red blue "
	}
	e := c.Encode(long)
	if e.Truncated != 75 || len(e.IDs) != 77 || e.CutText == "" || e.IDs[76] != 49407 {
		t.Fatalf("cut %d, %d ids, cut text %q", e.Truncated, len(e.IDs), e.CutText)
	}
	if got := c.Decode(c.Tokens("Hello, World!")); got != "hello , world !" {
		t.Errorf("decode: %q", got)
	}
}

func FuzzCLIP(f *testing.F) {
	c, err := LoadCLIPMerges(clipMerges)
	if err != nil {
		f.Skip(err)
	}
	for _, s := range []string{"a photo of a cat", "&amp;&#xZZ;", "\xff\xfe", "👩‍🚀"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e := c.Encode(s)
		if len(e.IDs) != 77 || e.IDs[0] != 49406 {
			t.Fatalf("%q: %v", s, e.IDs)
		}
	})
}
