package stages

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"image"
	"image/png"
	"io"
	"regexp"
	"strings"
	"unicode/utf8"
)

// Text chunk keywords written by Tessera.
const (
	KeyParameters = "parameters" // A1111-style generation parameters
	KeyTessera    = "tessera"    // Tessera's JSON record
)

// Limits of ReadTextChunks.
const (
	maxTextChunks     = 1024
	maxInflatedChunk  = 8 << 20  // bytes of text one compressed chunk may inflate to
	maxInflatedTotal  = 32 << 20 // bytes all compressed chunks may inflate to
	maxPNGChunkLength = 1<<31 - 1
)

var pngSignature = []byte("\x89PNG\r\n\x1a\n")

// TextChunk is one PNG text chunk.
type TextChunk struct {
	Keyword string
	Text    string
	// International marks an iTXt chunk (UTF-8 text). Otherwise the chunk is
	// tEXt (Latin-1 text); the writer falls back to iTXt for text that
	// Latin-1 cannot hold.
	International bool
}

// ParametersChunk returns the `parameters` chunk: tEXt as A1111 writes it
// when the text is Latin-1, iTXt otherwise.
func ParametersChunk(text string) TextChunk {
	return TextChunk{Keyword: KeyParameters, Text: text}
}

// TesseraChunk returns the `tessera` chunk: uncompressed iTXt with JSON bytes.
func TesseraChunk(jsonBytes []byte) TextChunk {
	return TextChunk{Keyword: KeyTessera, Text: string(jsonBytes), International: true}
}

// PNGCompression maps output.compression's names to the encoder's levels:
// fast, default, best and none.
func PNGCompression(name string) (png.CompressionLevel, error) {
	switch name {
	case "fast":
		return png.BestSpeed, nil
	case "default":
		return png.DefaultCompression, nil
	case "best":
		return png.BestCompression, nil
	case "none":
		return png.NoCompression, nil
	}
	return 0, fmt.Errorf("png compression %q: want fast, default, best or none", name)
}

// EncodePNG encodes img as PNG into w at the compression level, with the
// text chunks placed right after IHDR, in order.
func EncodePNG(w io.Writer, img image.Image, level png.CompressionLevel, chunks ...TextChunk) error {
	var buf bytes.Buffer
	enc := png.Encoder{CompressionLevel: level}
	if err := enc.Encode(&buf, img); err != nil {
		return fmt.Errorf("encode png: %w", err)
	}
	out, err := InsertTextChunks(buf.Bytes(), chunks...)
	if err != nil {
		return err
	}
	if _, err := w.Write(out); err != nil {
		return fmt.Errorf("encode png: %w", err)
	}
	return nil
}

// InsertTextChunks returns a copy of the PNG data with the text chunks
// inserted right after IHDR.
func InsertTextChunks(data []byte, chunks ...TextChunk) ([]byte, error) {
	if !bytes.HasPrefix(data, pngSignature) || len(data) < 8+12+13 ||
		string(data[12:16]) != "IHDR" || binary.BigEndian.Uint32(data[8:12]) != 13 {
		return nil, errors.New("insert text chunks: data does not start with a PNG signature and IHDR")
	}
	ihdrEnd := 8 + 12 + 13
	var out bytes.Buffer
	out.Write(data[:ihdrEnd])
	for _, c := range chunks {
		typ, body, err := c.encode()
		if err != nil {
			return nil, err
		}
		writeChunk(&out, typ, body)
	}
	out.Write(data[ihdrEnd:])
	return out.Bytes(), nil
}

func writeChunk(w *bytes.Buffer, typ string, body []byte) {
	var hdr [8]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(len(body)))
	copy(hdr[4:], typ)
	w.Write(hdr[:])
	w.Write(body)
	crc := crc32.NewIEEE()
	crc.Write(hdr[4:])
	crc.Write(body)
	var sum [4]byte
	binary.BigEndian.PutUint32(sum[:], crc.Sum32())
	w.Write(sum[:])
}

// encode returns the chunk type and body.
func (c TextChunk) encode() (string, []byte, error) {
	kw, ok := latin1(c.Keyword)
	if !ok || validKeyword(kw) != nil {
		return "", nil, fmt.Errorf("text chunk: invalid keyword %q (1-79 printable Latin-1 characters, no leading, trailing or double spaces)", c.Keyword)
	}
	if strings.IndexByte(c.Text, 0) >= 0 {
		return "", nil, fmt.Errorf("text chunk %q: text contains a NUL", c.Keyword)
	}
	if !c.International {
		if t, ok := latin1(c.Text); ok {
			return "tEXt", append(append(kw, 0), t...), nil
		}
	}
	if !utf8.ValidString(c.Text) {
		return "", nil, fmt.Errorf("text chunk %q: iTXt text is not valid UTF-8", c.Keyword)
	}
	// keyword NUL, compression flag 0, method 0, empty language NUL, empty
	// translated keyword NUL, text.
	body := append(kw, 0, 0, 0, 0, 0)
	return "iTXt", append(body, c.Text...), nil
}

// latin1 encodes s as Latin-1 when every rune is below 256.
func latin1(s string) ([]byte, bool) {
	b := make([]byte, 0, len(s))
	for _, r := range s {
		if r > 0xff { // invalid UTF-8 decodes as U+FFFD and lands here too
			return nil, false
		}
		b = append(b, byte(r))
	}
	return b, true
}

// fromLatin1 decodes Latin-1 bytes into a UTF-8 string.
func fromLatin1(b []byte) string {
	var sb strings.Builder
	sb.Grow(len(b))
	for _, c := range b {
		sb.WriteRune(rune(c))
	}
	return sb.String()
}

// validKeyword checks a PNG keyword: 1–79 bytes of printable Latin-1
// (32–126, 161–255), no leading, trailing or consecutive spaces.
func validKeyword(kw []byte) error {
	if len(kw) < 1 || len(kw) > 79 {
		return fmt.Errorf("keyword of %d bytes, want 1 to 79", len(kw))
	}
	if kw[0] == ' ' || kw[len(kw)-1] == ' ' || bytes.Contains(kw, []byte("  ")) {
		return errors.New("keyword with leading, trailing or consecutive spaces")
	}
	for _, c := range kw {
		if c < 32 || (c > 126 && c < 161) {
			return fmt.Errorf("keyword byte %#x is not printable Latin-1", c)
		}
	}
	return nil
}

// ReadTextChunks returns the text chunks (tEXt, zTXt, iTXt) of PNG data in
// file order. It checks the signature, that IHDR comes first, every chunk's
// length and CRC, and stops at IEND; compressed text may inflate to at most
// 8 MiB per chunk and 32 MiB in all. It never panics on bad input.
func ReadTextChunks(data []byte) ([]TextChunk, error) {
	if !bytes.HasPrefix(data, pngSignature) {
		return nil, errors.New("read png text: not a PNG (bad signature)")
	}
	var out []TextChunk
	inflated := 0
	rest := data[8:]
	for n := 0; ; n++ {
		if len(rest) < 12 {
			return nil, errors.New("read png text: truncated before IEND")
		}
		length := binary.BigEndian.Uint32(rest[:4])
		if length > maxPNGChunkLength || uint64(length)+12 > uint64(len(rest)) {
			return nil, fmt.Errorf("read png text: chunk %d: length %d exceeds the data", n, length)
		}
		typ := rest[4:8]
		for _, c := range typ {
			if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z') {
				return nil, fmt.Errorf("read png text: chunk %d: invalid type %q", n, typ)
			}
		}
		body := rest[8 : 8+length]
		want := binary.BigEndian.Uint32(rest[8+length : 12+length])
		if got := crc32.ChecksumIEEE(rest[4 : 8+length]); got != want {
			return nil, fmt.Errorf("read png text: chunk %d (%s): CRC %08x, want %08x", n, typ, got, want)
		}
		rest = rest[12+length:]
		if n == 0 && (string(typ) != "IHDR" || length != 13) {
			return nil, errors.New("read png text: first chunk is not IHDR")
		}
		var (
			c   TextChunk
			err error
			ok  = true
		)
		switch string(typ) {
		case "IEND":
			return out, nil
		case "tEXt":
			c, err = parseTEXt(body)
		case "zTXt":
			c, err = parseZTXt(body, &inflated)
		case "iTXt":
			c, err = parseITXt(body, &inflated)
		default:
			ok = false
		}
		if err != nil {
			return nil, fmt.Errorf("read png text: chunk %d (%s): %w", n, typ, err)
		}
		if ok {
			if len(out) >= maxTextChunks {
				return nil, fmt.Errorf("read png text: more than %d text chunks", maxTextChunks)
			}
			out = append(out, c)
		}
	}
}

func splitKeyword(body []byte) ([]byte, []byte, error) {
	i := bytes.IndexByte(body, 0)
	if i < 0 {
		return nil, nil, errors.New("no keyword separator")
	}
	if err := validKeyword(body[:i]); err != nil {
		return nil, nil, err
	}
	return body[:i], body[i+1:], nil
}

func parseTEXt(body []byte) (TextChunk, error) {
	kw, text, err := splitKeyword(body)
	if err != nil {
		return TextChunk{}, err
	}
	if bytes.IndexByte(text, 0) >= 0 {
		return TextChunk{}, errors.New("text contains a NUL")
	}
	return TextChunk{Keyword: fromLatin1(kw), Text: fromLatin1(text)}, nil
}

func parseZTXt(body []byte, inflated *int) (TextChunk, error) {
	kw, rest, err := splitKeyword(body)
	if err != nil {
		return TextChunk{}, err
	}
	if len(rest) < 1 || rest[0] != 0 {
		return TextChunk{}, errors.New("unknown compression method")
	}
	text, err := inflate(rest[1:], inflated)
	if err != nil {
		return TextChunk{}, err
	}
	if bytes.IndexByte(text, 0) >= 0 {
		return TextChunk{}, errors.New("text contains a NUL")
	}
	return TextChunk{Keyword: fromLatin1(kw), Text: fromLatin1(text)}, nil
}

func parseITXt(body []byte, inflated *int) (TextChunk, error) {
	kw, rest, err := splitKeyword(body)
	if err != nil {
		return TextChunk{}, err
	}
	if len(rest) < 2 {
		return TextChunk{}, errors.New("truncated iTXt header")
	}
	flag, method := rest[0], rest[1]
	rest = rest[2:]
	if flag > 1 || (flag == 1 && method != 0) {
		return TextChunk{}, errors.New("unknown compression flag or method")
	}
	for k := 0; k < 2; k++ { // language tag, translated keyword
		i := bytes.IndexByte(rest, 0)
		if i < 0 {
			return TextChunk{}, errors.New("truncated iTXt header")
		}
		rest = rest[i+1:]
	}
	text := rest
	if flag == 1 {
		if text, err = inflate(rest, inflated); err != nil {
			return TextChunk{}, err
		}
	}
	if bytes.IndexByte(text, 0) >= 0 {
		return TextChunk{}, errors.New("text contains a NUL")
	}
	if !utf8.Valid(text) {
		return TextChunk{}, errors.New("text is not valid UTF-8")
	}
	return TextChunk{Keyword: fromLatin1(kw), Text: string(text), International: true}, nil
}

// inflate decompresses zlib data within the per-chunk and total limits.
func inflate(b []byte, inflated *int) ([]byte, error) {
	zr, err := zlib.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("compressed text: %w", err)
	}
	defer zr.Close()
	limit := min(maxInflatedChunk, maxInflatedTotal-*inflated)
	out, err := io.ReadAll(io.LimitReader(zr, int64(limit)+1))
	if err != nil {
		return nil, fmt.Errorf("compressed text: %w", err)
	}
	if len(out) > limit {
		return nil, fmt.Errorf("compressed text inflates beyond %d bytes", limit)
	}
	*inflated += len(out)
	return out, nil
}

// ReadPNGMetadata returns the text of the first `parameters` chunk and the
// bytes of the first `tessera` chunk of PNG data (empty when absent).
func ReadPNGMetadata(data []byte) (parameters string, tessera []byte, err error) {
	chunks, err := ReadTextChunks(data)
	if err != nil {
		return "", nil, err
	}
	var haveP, haveT bool
	for _, c := range chunks {
		switch {
		case c.Keyword == KeyParameters && !haveP:
			parameters, haveP = c.Text, true
		case c.Keyword == KeyTessera && !haveT:
			tessera, haveT = []byte(c.Text), true
		}
	}
	return parameters, tessera, nil
}

// Param is one key/value pair of the A1111 parameters line.
type Param struct {
	Key, Value string
}

// Parameters is the content of an A1111 `parameters` text: the prompt, the
// negative prompt and the ordered key/value line.
type Parameters struct {
	Prompt, NegativePrompt string
	Params                 []Param
}

var paramKey = regexp.MustCompile(`^\w[\w \-/]+$`)

// FormatParameters writes p as A1111 does:
//
//	<prompt>
//	Negative prompt: <negative prompt>
//	Steps: 20, Sampler: DDIM, Seed: 7, Size: 1024x1024
//
// with empty parts left out and keys in the order given. A value is written
// as a JSON string (json.dumps with ensure_ascii=False, as A1111's quote does)
// when it contains ',', ':', '"' or a line break, is empty, or begins or ends
// with white space; otherwise bare. Keys must match A1111's \w[\w \-/]+.
func FormatParameters(p Parameters) (string, error) {
	var line strings.Builder
	for i, kv := range p.Params {
		if !paramKey.MatchString(kv.Key) || strings.HasSuffix(kv.Key, " ") {
			return "", fmt.Errorf("parameters: key %q is not a word followed by words, spaces, '-' or '/'", kv.Key)
		}
		if i > 0 {
			line.WriteString(", ")
		}
		line.WriteString(kv.Key)
		line.WriteString(": ")
		line.WriteString(quoteParam(kv.Value))
	}
	for _, s := range []string{p.Prompt, p.NegativePrompt} {
		if strings.IndexByte(s, 0) >= 0 {
			return "", errors.New("parameters: prompt contains a NUL")
		}
	}
	text := p.Prompt
	if p.NegativePrompt != "" {
		text += "\nNegative prompt: " + p.NegativePrompt
	}
	if line.Len() > 0 {
		text += "\n" + line.String()
	}
	return strings.TrimSpace(text), nil
}

func quoteParam(v string) string {
	if v != "" && !strings.ContainsAny(v, ",:\"\n\r") && strings.TrimSpace(v) == v {
		return v
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range v {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		default:
			if r < 0x20 {
				fmt.Fprintf(&b, `\u%04x`, r)
			} else {
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
	return b.String()
}

// ParseParameters reads an A1111 `parameters` text (valid UTF-8) back: the last line is
// the key/value line when it parses as one (at least one pair); lines before
// it are the prompt until a line starting "Negative prompt:", the negative
// prompt after. Lines are trimmed, as A1111 does. Without a key/value line
// the format is ambiguous: a last prompt line that reads as key/value pairs
// is taken for one (a "Negative prompt:" line never is).
func ParseParameters(text string) (Parameters, error) {
	var p Parameters
	if !utf8.ValidString(text) {
		return p, errors.New("parameters: text is not valid UTF-8")
	}
	lines := strings.Split(strings.TrimSpace(text), "\n")
	last := lines[len(lines)-1]
	if kv, err := parseParamLine(last); err == nil && len(kv) > 0 && !strings.HasPrefix(strings.TrimSpace(last), "Negative prompt:") {
		p.Params = kv
		lines = lines[:len(lines)-1]
	}
	negative := false
	for _, l := range lines {
		l = strings.TrimSpace(l)
		if rest, ok := strings.CutPrefix(l, "Negative prompt:"); ok && !negative {
			negative = true
			l = strings.TrimSpace(rest)
			p.NegativePrompt = l
			continue
		}
		dst := &p.Prompt
		if negative {
			dst = &p.NegativePrompt
		}
		if *dst != "" {
			*dst += "\n"
		}
		*dst += l
	}
	return p, nil
}

// parseParamLine parses "k: v, k2: "quoted", ..." strictly.
func parseParamLine(s string) ([]Param, error) {
	var out []Param
	i := 0
	for {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		if i == len(s) {
			if len(out) == 0 {
				return nil, errors.New("empty parameters line")
			}
			return nil, errors.New("trailing comma")
		}
		j := strings.IndexByte(s[i:], ':')
		if j < 0 {
			return nil, fmt.Errorf("no ':' after key at %d", i)
		}
		key := s[i : i+j]
		if !paramKey.MatchString(key) {
			return nil, fmt.Errorf("invalid key %q", key)
		}
		i += j + 1
		for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
			i++
		}
		var val string
		if i < len(s) && s[i] == '"' {
			k := i + 1
			for k < len(s) && s[k] != '"' {
				if s[k] == '\\' {
					k++
				}
				k++
			}
			if k >= len(s) {
				return nil, fmt.Errorf("unterminated quoted value of %q", key)
			}
			if err := json.Unmarshal([]byte(s[i:k+1]), &val); err != nil {
				return nil, fmt.Errorf("quoted value of %q: %w", key, err)
			}
			i = k + 1
		} else {
			k := strings.IndexByte(s[i:], ',')
			if k < 0 {
				k = len(s) - i
			}
			val = s[i : i+k]
			i += k
		}
		out = append(out, Param{Key: key, Value: val})
		if i == len(s) {
			return out, nil
		}
		if s[i] != ',' {
			return nil, fmt.Errorf("expected ',' after the value of %q", key)
		}
		i++
	}
}
