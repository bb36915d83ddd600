// Package tokenizer turns prompts into the token ids text encoders take:
// CLIP's byte-level BPE (Stable Diffusion's text encoders) and SentencePiece
// unigram (T5, DeepFloyd IF's). Each is exact against its reference
// implementation on the project's test prompts; see the README for what
// differs on text outside them.
package tokenizer

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"regexp"
	"strings"
	"sync"
	"unicode"

	"golang.org/x/text/unicode/norm"
)

// Token is one token of an encoded prompt.
type Token struct {
	ID    int    `json:"id"`
	Piece string `json:"piece"`
}

// Encoding is a prompt as an encoder takes it: IDs of exactly Length
// tokens (start and end tokens, truncation and padding included), the
// pieces, and where truncation cut (the index, in the prompt's own tokens,
// of the first one dropped; -1 when nothing was).
type Encoding struct {
	IDs []int64 `json:"ids"`
	// Mask is 1 for the tokens and the special ones, 0 for padding (the
	// attention_mask of encoders that take one, T5's).
	Mask      []int64 `json:"attention_mask"`
	Tokens    []Token `json:"tokens"` // the prompt's own, before truncation
	Truncated int     `json:"truncated_at"`
	// CutText is the prompt text from the first dropped token on.
	CutText string `json:"cut_text,omitempty"`
}

// Tokenizer is what a text encoder's tokenizer does.
type Tokenizer interface {
	// Tokens are the prompt's own tokens, without special ones.
	Tokens(prompt string) []Token
	// Encode is the encoder's input for the prompt: special tokens,
	// truncation to Length, padding.
	Encode(prompt string) Encoding
	// Length is the sequence length the encoder takes (77 for CLIP).
	Length() int
}

// CLIP is CLIP's byte-level BPE tokenizer (OpenAI's simple_tokenizer and
// transformers' CLIPTokenizer): the text is cleaned (see clean), lower-cased
// and split by CLIP's pattern; each piece's UTF-8 bytes become byte
// symbols, the last marked as a word end (</w>), and are merged pair by
// pair in the merges' rank order.
type CLIP struct {
	encoder map[string]int
	decoder []string
	ranks   map[[2]string]int
	sot     int
	eot     int
	pad     int
	length  int

	mu    sync.Mutex
	cache map[string][]string
}

// clipPattern is CLIP's pre-tokenizer: the special tokens, English
// contractions, runs of letters, single digits, runs of other non-space
// characters.
var clipPattern = regexp.MustCompile(`<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`)

// byteOrder is the order of the bytes' symbols in CLIP's vocabulary: the
// printable ones, then the others (bytes_to_unicode's dict order).
var byteOrder []int

// byteSymbols maps each byte to the printable character that stands for it
// in the vocabulary (bytes_to_unicode).
var byteSymbols = func() [256]string {
	var out [256]string
	var printable []int
	for b := '!'; b <= '~'; b++ {
		printable = append(printable, int(b))
	}
	for b := 0xA1; b <= 0xAC; b++ {
		printable = append(printable, b)
	}
	for b := 0xAE; b <= 0xFF; b++ {
		printable = append(printable, b)
	}
	is := map[int]bool{}
	for _, b := range printable {
		is[b] = true
		out[b] = string(rune(b))
	}
	byteOrder = append(byteOrder, printable...)
	n := 0
	for b := 0; b < 256; b++ {
		if !is[b] {
			out[b] = string(rune(256 + n))
			byteOrder = append(byteOrder, b)
			n++
		}
	}
	return out
}()

// Bounds on tokenizer files, checked as they are read.
const (
	maxMerges    = 1 << 20
	maxVocab     = 1 << 21
	maxFileBytes = 64 << 20
)

// LoadCLIPMerges builds the tokenizer from CLIP's merge list as OpenAI
// publishes it (bpe_simple_vocab_16e6.txt.gz: a version line, then merges in
// rank order, of which CLIP uses the first 48894). The vocabulary is the
// 256 byte symbols, the same with </w>, the merges, <|startoftext|> and
// <|endoftext|>: 49408 tokens. Padding is with <|endoftext|> (SD 1.x).
func LoadCLIPMerges(path string) (*CLIP, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, err
	}
	var r io.Reader = bytes.NewReader(data)
	if strings.HasSuffix(path, ".gz") {
		gz, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		r = gz
	}
	merges, err := readMerges(io.LimitReader(r, maxFileBytes), 49152-256-2)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var vocab []string
	for _, b := range byteOrder {
		vocab = append(vocab, byteSymbols[b])
	}
	for _, b := range byteOrder {
		vocab = append(vocab, byteSymbols[b]+"</w>")
	}
	for _, m := range merges {
		vocab = append(vocab, m[0]+m[1])
	}
	vocab = append(vocab, "<|startoftext|>", "<|endoftext|>")
	enc := make(map[string]int, len(vocab))
	for i, v := range vocab {
		enc[v] = i
	}
	return newCLIP(enc, merges, "<|endoftext|>", 77)
}

// LoadCLIPDir builds the tokenizer from a diffusers tokenizer/ folder:
// vocab.json, merges.txt, and the pad token and model_max_length of
// special_tokens_map.json and tokenizer_config.json where present.
func LoadCLIPDir(dir string) (*CLIP, error) {
	data, err := readBounded(dir + "/vocab.json")
	if err != nil {
		return nil, err
	}
	var enc map[string]int
	if err := json.Unmarshal(data, &enc); err != nil {
		return nil, fmt.Errorf("%s/vocab.json: %w", dir, err)
	}
	if len(enc) > maxVocab {
		return nil, fmt.Errorf("%s/vocab.json: %d tokens, limit %d", dir, len(enc), maxVocab)
	}
	mdata, err := readBounded(dir + "/merges.txt")
	if err != nil {
		return nil, err
	}
	merges, err := readMerges(bytes.NewReader(mdata), maxMerges)
	if err != nil {
		return nil, fmt.Errorf("%s/merges.txt: %w", dir, err)
	}
	pad, length := "<|endoftext|>", 77
	var special struct {
		Pad json.RawMessage `json:"pad_token"`
	}
	if data, err := readBounded(dir + "/special_tokens_map.json"); err == nil && json.Unmarshal(data, &special) == nil && len(special.Pad) > 0 {
		var s string
		var obj struct {
			Content string `json:"content"`
		}
		if json.Unmarshal(special.Pad, &s) == nil {
			pad = s
		} else if json.Unmarshal(special.Pad, &obj) == nil && obj.Content != "" {
			pad = obj.Content
		}
	}
	var tc struct {
		MaxLength float64 `json:"model_max_length"`
	}
	if data, err := readBounded(dir + "/tokenizer_config.json"); err == nil && json.Unmarshal(data, &tc) == nil && tc.MaxLength >= 2 && tc.MaxLength <= 4096 {
		length = int(tc.MaxLength)
	}
	return newCLIP(enc, merges, pad, length)
}

// readBounded reads a regular file of at most maxFileBytes, bounded while
// it reads (not /dev/zero or a FIFO a link leads to).
func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() > maxFileBytes {
		return nil, fmt.Errorf("%s: not a regular file of at most %d bytes", path, maxFileBytes)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxFileBytes+1))
	if err == nil && len(data) > maxFileBytes {
		err = fmt.Errorf("%s: more than %d bytes", path, maxFileBytes)
	}
	return data, err
}

// readMerges reads a merge list: a first version line (always skipped:
// OpenAI's reads `"bpe_simple_vocab_16e6.txt#version: 0.2`), then "a b"
// per line, at most limit of them.
func readMerges(r io.Reader, limit int) ([][2]string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var out [][2]string
	first := true
	for sc.Scan() && len(out) < limit {
		line := sc.Text()
		if first {
			first = false
			if strings.Contains(line, "#version") {
				continue
			}
		}
		parts := strings.Fields(line)
		if len(parts) == 0 {
			continue
		}
		if len(parts) != 2 {
			return nil, fmt.Errorf("merge %d: %q is not two symbols", len(out)+1, line)
		}
		out = append(out, [2]string{parts[0], parts[1]})
	}
	return out, sc.Err()
}

func newCLIP(enc map[string]int, merges [][2]string, pad string, length int) (*CLIP, error) {
	c := &CLIP{encoder: enc, ranks: make(map[[2]string]int, len(merges)), length: length, cache: map[string][]string{}}
	for i, m := range merges {
		if _, ok := c.ranks[m]; !ok {
			c.ranks[m] = i
		}
	}
	max := 0
	for _, id := range enc {
		if id < 0 || id > maxVocab {
			return nil, fmt.Errorf("vocabulary id %d out of range", id)
		}
		max = int(math.Max(float64(max), float64(id)))
	}
	c.decoder = make([]string, max+1)
	for s, id := range enc {
		c.decoder[id] = s
	}
	var ok bool
	for _, s := range []struct {
		name string
		dst  *int
	}{{"<|startoftext|>", &c.sot}, {"<|endoftext|>", &c.eot}, {pad, &c.pad}} {
		if *s.dst, ok = enc[s.name]; !ok {
			return nil, fmt.Errorf("the vocabulary has no %s", s.name)
		}
	}
	return c, nil
}

// Length is the encoder's sequence length.
func (c *CLIP) Length() int { return c.length }

// clean is CLIP's basic_clean and whitespace_clean: ftfy.fix_text (of
// which this does what changes prompts: NFC, curly quotes to straight
// ones, Latin ligatures and full-width forms to plain letters, control
// characters removed; not its repair of mis-decoded text), HTML entities
// unescaped twice, every run of Unicode white space one space, trimmed.
func clean(s string) string {
	s = fixText(s)
	s = html.UnescapeString(html.UnescapeString(s))
	var b strings.Builder
	space := false
	for _, r := range strings.TrimFunc(s, isSpace) {
		if isSpace(r) {
			space = true
			continue
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		b.WriteRune(r)
	}
	return b.String()
}

// isSpace is Python's str.isspace, which its regular expressions' \s
// follows: Unicode white space and the separators U+001C to U+001F.
func isSpace(r rune) bool {
	return unicode.IsSpace(r) || r >= 0x1c && r <= 0x1f
}

var quotes = strings.NewReplacer("\u2018", "'", "\u2019", "'", "\u201a", "'", "\u201b", "'", "\u2032", "'",
	"\u201c", `"`, "\u201d", `"`, "\u201e", `"`, "\u201f", `"`, "\u2033", `"`,
	"\ufb00", "ff", "\ufb01", "fi", "\ufb02", "fl", "\ufb03", "ffi", "\ufb04", "ffl", "\ufb05", "ſt", "\ufb06", "st")

func fixText(s string) string {
	s = quotes.Replace(s)
	s = strings.Map(func(r rune) rune {
		switch {
		case r >= 0xFF01 && r <= 0xFF5E: // full-width ASCII
			return r - 0xFEE0
		case r == 0x3000: // ideographic space
			return ' '
		case r == '\t' || r == '\n' || r == '\r':
			return r
		case unicode.IsControl(r):
			return -1
		}
		return r
	}, s)
	return norm.NFC.String(s)
}

// lower is Python's str.lower where Go's differs: İ becomes i and a
// combining dot above.
func lower(s string) string {
	return strings.ToLower(strings.ReplaceAll(s, "\u0130", "i\u0307"))
}

// Tokens are the prompt's tokens, without start, end or padding.
func (c *CLIP) Tokens(prompt string) []Token {
	text := lower(clean(prompt))
	var out []Token
	for _, m := range clipPattern.FindAllString(text, -1) {
		for _, piece := range c.bpe(m) {
			id, ok := c.encoder[piece]
			if !ok {
				continue // every byte symbol is in the vocabulary; a custom one may lack a merge
			}
			out = append(out, Token{ID: id, Piece: piece})
		}
	}
	return out
}

// bpe merges one pre-token's byte symbols by rank.
func (c *CLIP) bpe(token string) []string {
	if token == "<|startoftext|>" || token == "<|endoftext|>" {
		return []string{token}
	}
	c.mu.Lock()
	if w, ok := c.cache[token]; ok {
		c.mu.Unlock()
		return w
	}
	c.mu.Unlock()
	var word []string
	for _, b := range []byte(token) {
		word = append(word, byteSymbols[b])
	}
	word[len(word)-1] += "</w>"
	for len(word) > 1 {
		best, bestRank := -1, math.MaxInt
		for i := 0; i+1 < len(word); i++ {
			if r, ok := c.ranks[[2]string{word[i], word[i+1]}]; ok && r < bestRank {
				best, bestRank = i, r
			}
		}
		if best < 0 {
			break
		}
		first, second := word[best], word[best+1]
		next := word[:0:0]
		for i := 0; i < len(word); {
			if i+1 < len(word) && word[i] == first && word[i+1] == second {
				next = append(next, first+second)
				i += 2
				continue
			}
			next = append(next, word[i])
			i++
		}
		word = next
	}
	c.mu.Lock()
	if len(c.cache) < 1<<16 {
		c.cache[token] = word
	}
	c.mu.Unlock()
	return word
}

// Encode is [<|startoftext|>] + the prompt's tokens, cut to Length−2 as
// the reference pipelines do (truncation=True), + [<|endoftext|>], padded
// to Length with the pad token.
func (c *CLIP) Encode(prompt string) Encoding {
	toks := c.Tokens(prompt)
	e := Encoding{Tokens: toks, Truncated: -1}
	keep := toks
	if room := c.length - 2; len(toks) > room {
		keep = toks[:room]
		e.Truncated = room
		e.CutText = c.Decode(toks[room:])
	}
	e.IDs = append(e.IDs, int64(c.sot))
	for _, t := range keep {
		e.IDs = append(e.IDs, int64(t.ID))
	}
	e.IDs = append(e.IDs, int64(c.eot))
	e.Mask = mask(len(e.IDs), c.length)
	for len(e.IDs) < c.length {
		e.IDs = append(e.IDs, int64(c.pad))
	}
	return e
}

// mask is n ones and then zeros, length in all.
func mask(n, length int) []int64 {
	m := make([]int64, length)
	for i := 0; i < n && i < length; i++ {
		m[i] = 1
	}
	return m
}

// Decode turns tokens back into text (word ends become spaces).
func (c *CLIP) Decode(toks []Token) string {
	var sym strings.Builder
	for _, t := range toks {
		sym.WriteString(t.Piece)
	}
	rev := map[rune]byte{}
	for b, s := range byteSymbols {
		rev[[]rune(s)[0]] = byte(b)
	}
	var out bytes.Buffer
	for _, part := range strings.SplitAfter(sym.String(), "</w>") {
		word := strings.TrimSuffix(part, "</w>")
		for _, r := range word {
			if b, ok := rev[r]; ok {
				out.WriteByte(b)
			}
		}
		if strings.HasSuffix(part, "</w>") {
			out.WriteByte(' ')
		}
	}
	return strings.TrimSpace(out.String())
}

var _ Tokenizer = (*CLIP)(nil)

// LoadDir loads the tokenizer of a diffusers tokenizer/ folder: CLIP's BPE
// (vocab.json, merges.txt) or SentencePiece (spiece.model, T5's), with the
// sequence length of its tokenizer_config.json (77 when it gives none).
func LoadDir(dir string) (Tokenizer, error) {
	if _, err := os.Stat(dir + "/vocab.json"); err == nil {
		return LoadCLIPDir(dir)
	}
	if _, err := os.Stat(dir + "/spiece.model"); err == nil {
		length := 77
		var tc struct {
			MaxLength float64 `json:"model_max_length"`
		}
		if data, err := readBounded(dir + "/tokenizer_config.json"); err == nil && json.Unmarshal(data, &tc) == nil && tc.MaxLength >= 2 && tc.MaxLength <= 4096 {
			length = int(tc.MaxLength)
		}
		return LoadSentencePiece(dir+"/spiece.model", length)
	}
	return nil, fmt.Errorf("tokenizer %s: neither vocab.json and merges.txt (CLIP) nor spiece.model (SentencePiece)", dir)
}
