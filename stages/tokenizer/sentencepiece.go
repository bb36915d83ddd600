package tokenizer

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// SentencePiece is a SentencePiece unigram tokenizer (T5's, DeepFloyd IF's)
// read from its spiece.model: the text is normalised by the model's own
// rules (its precompiled character map: nmt_nfkc's NFKC and more, extra
// white space removed, a ▁ prefix, spaces as ▁), segmented by Viterbi over
// the pieces' scores (an unknown character costs the lowest score less 10,
// consecutive unknowns merge into one), unknowns become bytes where the
// model has byte fallback, and </s> ends the sequence, as T5's tokenizer
// does.
type SentencePiece struct {
	pieces   []spPiece
	byPiece  map[string]int
	maxLen   int // longest piece, in bytes
	minScore float64
	topScore float64 // of normal pieces: user-defined ones score length × it − 0.1
	unk      int
	eos, pad int
	bytes    [256]int // <0xXX> piece ids, where byte fallback
	fallback bool

	charsmap                                       []uint32 // darts trie of the precompiled map
	normalized                                     []byte
	addDummyPrefix, removeExtraSpaces, escapeSpace bool
	length                                         int
}

type spPiece struct {
	piece string
	score float64
	typ   int // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
}

const (
	spNormal  = 1
	spUnknown = 2
	spControl = 3
	spUser    = 4
	spUnused  = 5
	spByte    = 6
)

// LoadSentencePiece reads a spiece.model (a SentencePiece ModelProto). The
// encoder's sequence length is length (T5 in IF: 77).
func LoadSentencePiece(path string, length int) (*SentencePiece, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, err
	}
	sp, err := parseSentencePiece(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	sp.length = length
	return sp, nil
}

func parseSentencePiece(data []byte) (*SentencePiece, error) {
	sp := &SentencePiece{byPiece: map[string]int{}, unk: -1, eos: -1, pad: -1, addDummyPrefix: true, removeExtraSpaces: true, escapeSpace: true}
	modelType := 1
	err := fields(data, func(num protowire.Number, v uint64, b []byte) error {
		switch num {
		case 1: // pieces
			p := spPiece{typ: spNormal}
			if err := fields(b, func(num protowire.Number, v uint64, b []byte) error {
				switch num {
				case 1:
					p.piece = string(b)
				case 2:
					p.score = float64(math.Float32frombits(uint32(v)))
				case 3:
					p.typ = int(v)
				}
				return nil
			}); err != nil {
				return err
			}
			if len(sp.pieces) >= 1<<22 {
				return fmt.Errorf("more than %d pieces", 1<<22)
			}
			sp.pieces = append(sp.pieces, p)
		case 2: // trainer_spec
			return fields(b, func(num protowire.Number, v uint64, b []byte) error {
				switch num {
				case 3:
					modelType = int(v)
				case 35:
					sp.fallback = v != 0
				}
				return nil
			})
		case 3: // normalizer_spec
			return fields(b, func(num protowire.Number, v uint64, b []byte) error {
				switch num {
				case 2:
					if len(b) < 4 {
						return fmt.Errorf("precompiled_charsmap of %d bytes", len(b))
					}
					n := binary.LittleEndian.Uint32(b)
					if n%4 != 0 || int(n) > len(b)-4 {
						return fmt.Errorf("precompiled_charsmap: trie of %d bytes in %d", n, len(b))
					}
					sp.charsmap = make([]uint32, n/4)
					for i := range sp.charsmap {
						sp.charsmap[i] = binary.LittleEndian.Uint32(b[4+4*i:])
					}
					sp.normalized = append([]byte(nil), b[4+n:]...)
					for _, rule := range bytes.Split(sp.normalized, []byte{0}) {
						if !utf8.Valid(rule) {
							return fmt.Errorf("precompiled_charsmap: a replacement that is not UTF-8")
						}
					}
				case 3:
					sp.addDummyPrefix = v != 0
				case 4:
					sp.removeExtraSpaces = v != 0
				case 5:
					sp.escapeSpace = v != 0
				case 6:
					if len(b) > 0 {
						return fmt.Errorf("normalization_rule_tsv is not supported")
					}
				}
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if modelType != 1 {
		return nil, fmt.Errorf("model_type %d: only unigram (1) models are supported", modelType)
	}
	if len(sp.pieces) == 0 {
		return nil, fmt.Errorf("no pieces")
	}
	for i := range sp.bytes {
		sp.bytes[i] = -1
	}
	sp.minScore, sp.topScore = math.Inf(1), math.Inf(-1)
	for id, p := range sp.pieces {
		switch p.typ {
		case spNormal, spUser, spUnused:
			if len(p.piece) > maxPieceBytes {
				return nil, fmt.Errorf("piece %d is %d bytes, at most %d", id, len(p.piece), maxPieceBytes)
			}
			if _, ok := sp.byPiece[p.piece]; !ok {
				sp.byPiece[p.piece] = id
			}
			sp.maxLen = max(sp.maxLen, len(p.piece))
			if p.typ == spNormal {
				sp.minScore = math.Min(sp.minScore, p.score)
				sp.topScore = math.Max(sp.topScore, p.score)
			}
		case spUnknown:
			sp.unk = id
		case spByte:
			var b int
			if _, err := fmt.Sscanf(p.piece, "<0x%02X>", &b); err == nil && b >= 0 && b < 256 {
				sp.bytes[b] = id
			}
		case spControl:
			switch p.piece {
			case "</s>":
				sp.eos = id
			case "<pad>":
				sp.pad = id
			}
		}
	}
	if sp.unk < 0 {
		return nil, fmt.Errorf("no unknown piece")
	}
	return sp, nil
}

// fields calls fn for each field of a protobuf message: varints and fixed
// 32-bit values in v, length-delimited ones in b.
func fields(data []byte, fn func(num protowire.Number, v uint64, b []byte) error) error {
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return protowire.ParseError(n)
		}
		data = data[n:]
		var v uint64
		var b []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(data)
		case protowire.Fixed32Type:
			var x uint32
			x, n = protowire.ConsumeFixed32(data)
			v = uint64(x)
		case protowire.Fixed64Type:
			v, n = protowire.ConsumeFixed64(data)
		case protowire.BytesType:
			b, n = protowire.ConsumeBytes(data)
		default:
			n = protowire.ConsumeFieldValue(num, typ, data)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		data = data[n:]
		if err := fn(num, v, b); err != nil {
			return err
		}
	}
	return nil
}

// Length is the encoder's sequence length.
func (sp *SentencePiece) Length() int { return sp.length }

// prefix is darts-clone's commonPrefixSearch over the precompiled map: the
// longest rule matching the start of s, as its replacement and length.
func (sp *SentencePiece) prefix(s string) (string, int) {
	a := sp.charsmap
	if len(a) == 0 {
		return "", 0
	}
	offset := func(u uint32) uint32 { return (u >> 10) << ((u & (1 << 9)) >> 6) }
	label := func(u uint32) uint32 { return u & ((1 << 31) | 0xFF) }
	hasLeaf := func(u uint32) bool { return (u>>8)&1 == 1 }
	pos := offset(a[0])
	best, bestLen := -1, 0
	for i := 0; i < len(s); i++ {
		pos ^= uint32(s[i])
		if int(pos) >= len(a) {
			break
		}
		u := a[pos]
		if label(u) != uint32(s[i]) {
			break
		}
		pos ^= offset(u)
		if int(pos) >= len(a) {
			break
		}
		if hasLeaf(u) {
			best, bestLen = int(a[pos]&((1<<31)-1)), i+1
		}
	}
	if best < 0 || best >= len(sp.normalized) {
		return "", 0
	}
	end := best
	for end < len(sp.normalized) && sp.normalized[end] != 0 {
		end++
	}
	return string(sp.normalized[best:end]), bestLen
}

// normalizePrefix is the normalised form of the start of s and how many
// bytes of s it stands for.
func (sp *SentencePiece) normalizePrefix(s string) (string, int) {
	if rep, n := sp.prefix(s); n > 0 {
		return rep, n
	}
	r, n := utf8.DecodeRuneInString(s)
	if r == utf8.RuneError && n <= 1 {
		return "\uFFFD", 1 // a malformed byte: the replacement character, one byte consumed
	}
	return s[:n], n
}

// normalize is SentencePiece's Normalizer::Normalize.
func (sp *SentencePiece) normalize(s string) string {
	if sp.removeExtraSpaces {
		for s != "" {
			p, n := sp.normalizePrefix(s)
			if p != " " {
				break
			}
			s = s[n:]
		}
	}
	if s == "" {
		return ""
	}
	space := " "
	if sp.escapeSpace {
		space = "\u2581"
	}
	var out strings.Builder
	if sp.addDummyPrefix {
		out.WriteString(space)
	}
	prevSpace := sp.removeExtraSpaces
	for s != "" {
		p, n := sp.normalizePrefix(s)
		for prevSpace && strings.HasPrefix(p, " ") {
			p = p[1:]
		}
		if p != "" {
			if sp.escapeSpace {
				out.WriteString(strings.ReplaceAll(p, " ", space))
			} else {
				out.WriteString(p)
			}
			prevSpace = sp.removeExtraSpaces && strings.HasSuffix(p, " ")
		}
		s = s[n:]
	}
	res := out.String()
	if sp.removeExtraSpaces {
		for strings.HasSuffix(res, space) {
			res = res[:len(res)-len(space)]
		}
	}
	return res
}

// unkPenalty is what an unknown character costs below the lowest score.
const unkPenalty = 10.0

// Tokens are the prompt's pieces, without </s>.
func (sp *SentencePiece) Tokens(prompt string) []Token {
	text := sp.normalize(prompt)
	if text == "" {
		return nil
	}
	// Viterbi over byte positions that start characters. The path scores
	// are float32 sums, as the reference's are: paths of equal score in
	// real numbers are told apart by their rounding the same way.
	n := len(text)
	best := make([]float32, n+1)
	from := make([]int, n+1)
	id := make([]int, n+1)
	for i := 1; i <= n; i++ {
		from[i] = -1
	}
	unkScore := float32(sp.minScore - unkPenalty)
	for i := 0; i < n; i++ {
		if i > 0 && (from[i] < 0 || !utf8.RuneStart(text[i])) {
			continue
		}
		single := false
		_, charLen := utf8.DecodeRuneInString(text[i:])
		for l := 1; l <= sp.maxLen && i+l <= n; l++ {
			pid, ok := sp.byPiece[text[i:i+l]]
			if !ok {
				continue
			}
			p := sp.pieces[pid]
			if p.typ == spUnused {
				continue
			}
			score := float32(p.score)
			if p.typ == spUser {
				score = float32(float64(l)*sp.topScore - 0.1)
			}
			if l == charLen {
				single = true
			}
			if s := best[i] + score; from[i+l] < 0 || s > best[i+l] {
				best[i+l], from[i+l], id[i+l] = s, i, pid
			}
		}
		if !single {
			if s := best[i] + unkScore; from[i+charLen] < 0 || s > best[i+charLen] {
				best[i+charLen], from[i+charLen], id[i+charLen] = s, i, sp.unk
			}
		}
	}
	var rev []Token
	for end := n; end > 0; end = from[end] {
		rev = append(rev, Token{ID: id[end], Piece: text[from[end]:end]})
	}
	var out []Token
	for i := len(rev) - 1; i >= 0; i-- {
		t := rev[i]
		// Consecutive unknowns are one unknown piece.
		if t.ID == sp.unk && len(out) > 0 && out[len(out)-1].ID == sp.unk {
			out[len(out)-1].Piece += t.Piece
			continue
		}
		out = append(out, t)
	}
	if !sp.fallback {
		return out
	}
	var fb []Token
	for _, t := range out {
		if t.ID != sp.unk {
			fb = append(fb, t)
			continue
		}
		for _, b := range []byte(t.Piece) {
			if sp.bytes[b] < 0 { // a byte the model lacks: unknown, as the reference makes it
				fb = append(fb, Token{ID: sp.unk, Piece: string([]byte{b})})
				continue
			}
			fb = append(fb, Token{ID: sp.bytes[b], Piece: fmt.Sprintf("<0x%02X>", b)})
		}
	}
	return fb
}

// maxPieceBytes bounds a piece: longer ones would make segmentation slow.
const maxPieceBytes = 256

// Encode is the prompt's pieces cut to Length−1, </s>, and padding to
// Length, as T5's tokenizer makes them with max_length, truncation and
// padding (DeepFloyd IF's pipeline).
func (sp *SentencePiece) Encode(prompt string) Encoding {
	toks := sp.Tokens(prompt)
	e := Encoding{Tokens: toks, Truncated: -1}
	keep := toks
	room := sp.length
	if sp.eos >= 0 {
		room-- // </s> ends the sequence
	}
	if len(toks) > room {
		keep, e.Truncated = toks[:room], room
		var cut strings.Builder
		for _, t := range toks[room:] {
			cut.WriteString(t.Piece)
		}
		e.CutText = strings.TrimSpace(strings.ReplaceAll(cut.String(), "\u2581", " "))
	}
	for _, t := range keep {
		e.IDs = append(e.IDs, int64(t.ID))
	}
	if sp.eos >= 0 {
		e.IDs = append(e.IDs, int64(sp.eos))
	}
	e.Mask = mask(len(e.IDs), sp.length)
	pad := max(sp.pad, 0)
	for len(e.IDs) < sp.length {
		e.IDs = append(e.IDs, int64(pad))
	}
	return e
}

var _ Tokenizer = (*SentencePiece)(nil)
