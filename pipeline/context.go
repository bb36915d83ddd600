package pipeline

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"codeberg.org/sbinet/npyio/npy"
	"codeberg.org/sbinet/npyio/npy/float16"
	"github.com/nlpodyssey/safetensors"
	f16 "github.com/x448/float16"

	"tessera/onnx"
)

// Context is a context embedding, as the model's context input takes it
// for one row: L tokens of D values.
type Context struct {
	L, D int
	Data []float32 // L×D
}

// Bounds on a context file, checked before its data is read: a T5-XXL
// embedding of 77 tokens is 77×4096 values.
const (
	MaxContextTokens = 4096
	MaxContextDim    = 16384
	maxContextBytes  = 256 << 20
)

// contextNames are the tensor names a .safetensors file with several
// tensors is searched for, in order.
var contextNames = []string{"encoder_hidden_states", "prompt_embeds", "context", "embeddings", "embedding"}

// ReadContext reads a context file: a NumPy .npy or a .safetensors file
// holding one float tensor of shape [L, D] or [1, L, D] (float32, float16,
// bfloat16 or float64; a .safetensors file of several tensors names it
// encoder_hidden_states, prompt_embeds, context or embeddings). It returns
// the embedding and the SHA-256 of the file, which goes into the item's
// identity. Errors name the file and are ClassInvalid.
func ReadContext(path string) (*Context, string, error) {
	c, sum, err := readContext(path)
	if err != nil {
		return nil, "", Invalid(fmt.Errorf("context file %s: %w", path, err))
	}
	return c, sum, nil
}

func readContext(path string) (*Context, string, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return nil, "", fmt.Errorf("is a directory")
	}
	data, err := onnx.ReadRegular(path, maxContextBytes) // not /dev/zero, not a FIFO, bounded
	if err != nil {
		return nil, "", err
	}
	sum := sha256.Sum256(data)
	var c *Context
	switch strings.ToLower(filepath.Ext(path)) {
	case ".npy":
		c, err = parseNPY(data)
	case ".safetensors":
		c, err = parseSafetensors(data)
	default:
		return nil, "", fmt.Errorf("unknown format %q (want .npy or .safetensors)", filepath.Ext(path))
	}
	if err != nil {
		return nil, "", err
	}
	for i, v := range c.Data {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, "", fmt.Errorf("value %d (token %d) is %v", i, i/c.D, v)
		}
	}
	return c, hex.EncodeToString(sum[:]), nil
}

// contextShape checks a tensor's shape, [L, D] or [1, L, D], against the
// bounds, and returns L and D.
func contextShape(shape []int) (int, int, error) {
	if len(shape) == 3 && shape[0] == 1 {
		shape = shape[1:]
	}
	if len(shape) != 2 {
		return 0, 0, fmt.Errorf("shape %v, want [L, D] or [1, L, D]", shape)
	}
	L, D := shape[0], shape[1]
	if L < 1 || L > MaxContextTokens || D < 1 || D > MaxContextDim {
		return 0, 0, fmt.Errorf("shape %v: L in [1, %d] and D in [1, %d]", shape, MaxContextTokens, MaxContextDim)
	}
	return L, D, nil
}

func parseNPY(data []byte) (*Context, error) {
	r, err := npy.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	h := r.Header.Descr
	h.Type = strings.Trim(h.Type, `'"`)
	if h.Fortran {
		return nil, fmt.Errorf("Fortran order is not supported; save it in C order")
	}
	L, D, err := contextShape(h.Shape)
	if err != nil {
		return nil, err
	}
	size := map[string]int{"<f4": 4, "<f2": 2, "<f8": 8}[h.Type]
	if size > 0 && L*D*size > len(data) {
		return nil, fmt.Errorf("shape [%d, %d] of %s needs %d bytes, the file has %d", L, D, h.Type, L*D*size, len(data))
	}
	c := &Context{L: L, D: D}
	switch h.Type {
	case "<f4":
		c.Data = make([]float32, L*D)
		err = r.Read(&c.Data)
	case "<f8":
		var v []float64
		if err = r.Read(&v); err == nil {
			c.Data = make([]float32, len(v))
			for i, x := range v {
				c.Data[i] = float32(x)
			}
		}
	case "<f2":
		var v []float16.Num
		if err = r.Read(&v); err == nil {
			c.Data = make([]float32, len(v))
			for i, x := range v {
				c.Data[i] = x.Float32()
			}
		}
	default:
		return nil, fmt.Errorf("element type %q (want <f4, <f2 or <f8)", h.Type)
	}
	if err != nil {
		return nil, err
	}
	if len(c.Data) != L*D {
		return nil, fmt.Errorf("%d values for shape [%d, %d]", len(c.Data), L, D)
	}
	return c, nil
}

func parseSafetensors(data []byte) (*Context, error) {
	st, err := safetensors.Deserialize(data)
	if err != nil {
		return nil, err
	}
	names := st.Names()
	sort.Strings(names)
	var name string
	switch {
	case len(names) == 1:
		name = names[0]
	case len(names) == 0:
		return nil, fmt.Errorf("no tensor in the file")
	default:
		for _, n := range contextNames {
			if _, ok := st.Tensor(n); ok {
				name = n
				break
			}
		}
		if name == "" {
			return nil, fmt.Errorf("tensors %s: name the embedding one of %s", strings.Join(names, ", "), strings.Join(contextNames, ", "))
		}
	}
	tv, _ := st.Tensor(name)
	shape := make([]int, len(tv.Shape()))
	for i, d := range tv.Shape() {
		if d > math.MaxInt32 {
			return nil, fmt.Errorf("tensor %s: shape %v", name, tv.Shape())
		}
		shape[i] = int(d)
	}
	L, D, err := contextShape(shape)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	raw := tv.Data()
	c := &Context{L: L, D: D, Data: make([]float32, L*D)}
	switch tv.DType() {
	case safetensors.F32:
		for i := range c.Data {
			c.Data[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
	case safetensors.F16:
		for i := range c.Data {
			c.Data[i] = f16.Frombits(binary.LittleEndian.Uint16(raw[2*i:])).Float32()
		}
	case safetensors.BF16:
		for i := range c.Data {
			c.Data[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(raw[2*i:])) << 16)
		}
	case safetensors.F64:
		for i := range c.Data {
			c.Data[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(raw[8*i:])))
		}
	default:
		return nil, fmt.Errorf("tensor %s: element type %s (want F32, F16, BF16 or F64)", name, tv.DType())
	}
	return c, nil
}
