package onnx

import (
	"errors"
	"fmt"
)

// ModelHeader is what Tessera reads from an ONNX file itself, before ONNX
// Runtime sees it: enough to reject a file that is not ONNX with a one-line
// reason, to report producer and opsets, and to find external data files.
type ModelHeader struct {
	IRVersion       int64
	ProducerName    string
	ProducerVersion string
	Domain          string
	ModelVersion    int64
	Opsets          map[string]int64 // domain ("" = ai.onnx) -> version
	// ExternalData lists the files initializers are stored in (relative to the model).
	ExternalData []string
	// Inputs and Outputs are the graph's, as the file declares them
	// (initializers listed as inputs left out), with no roles: enough to
	// check a model's contract before ONNX Runtime is loaded.
	Inputs, Outputs []IO
}

// Opset is the default-domain (ai.onnx) opset version, 0 when absent.
func (h *ModelHeader) Opset() int64 {
	if v, ok := h.Opsets[""]; ok {
		return v
	}
	return h.Opsets["ai.onnx"]
}

var errNotONNX = errors.New("not an ONNX model")

// ParseModelHeader decodes the top-level fields of an ONNX ModelProto. It
// walks the protobuf wire format without decoding tensors, so it is cheap even
// for large models, and it never panics on arbitrary bytes.
func ParseModelHeader(data []byte) (*ModelHeader, error) {
	h := &ModelHeader{Opsets: map[string]int64{}}
	hasGraph := false
	err := walkFields(data, func(field int, wire int, v uint64, b []byte) error {
		switch {
		case field == 1 && wire == 0:
			h.IRVersion = int64(v)
		case field == 2 && wire == 2:
			h.ProducerName = string(b)
		case field == 3 && wire == 2:
			h.ProducerVersion = string(b)
		case field == 4 && wire == 2:
			h.Domain = string(b)
		case field == 5 && wire == 0:
			h.ModelVersion = int64(v)
		case field == 7 && wire == 2:
			hasGraph = true
			return parseGraph(b, h)
		case field == 8 && wire == 2:
			var domain string
			var version int64
			if err := walkFields(b, func(f, w int, v uint64, b []byte) error {
				if f == 1 && w == 2 {
					domain = string(b)
				}
				if f == 2 && w == 0 {
					version = int64(v)
				}
				return nil
			}); err != nil {
				return fmt.Errorf("opset_import: %w", err)
			}
			h.Opsets[domain] = version
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errNotONNX, err)
	}
	if !hasGraph || h.IRVersion <= 0 {
		return nil, fmt.Errorf("%w: no graph or IR version in the file", errNotONNX)
	}
	return h, nil
}

// parseGraph collects the external data locations of the graph's
// initializers and its declared inputs and outputs.
func parseGraph(graph []byte, h *ModelHeader) error {
	seen := map[string]bool{}
	for _, l := range h.ExternalData {
		seen[l] = true
	}
	initializers := map[string]bool{}
	var inputs []IO
	err := walkFields(graph, func(field, wire int, _ uint64, b []byte) error {
		if wire != 2 {
			return nil
		}
		switch field {
		case 11, 12: // GraphProto.input, output: ValueInfoProto
			if len(inputs)+len(h.Outputs) >= maxGraphIO {
				return fmt.Errorf("more than %d inputs and outputs", maxGraphIO)
			}
			io, err := parseValueInfo(b)
			if err != nil {
				return fmt.Errorf("value info: %w", err)
			}
			if field == 11 {
				inputs = append(inputs, io)
			} else {
				h.Outputs = append(h.Outputs, io)
			}
			return nil
		case 5: // GraphProto.initializer
		default:
			return nil
		}
		_ = walkFields(b, func(f, w int, _ uint64, nb []byte) error {
			if f == 8 && w == 2 { // TensorProto.name
				initializers[string(nb)] = true
			}
			return nil
		})
		external := false
		var location string
		err := walkFields(b, func(f, w int, v uint64, b []byte) error {
			switch {
			case f == 14 && w == 0: // TensorProto.data_location
				external = v == 1
			case f == 13 && w == 2: // TensorProto.external_data
				var key, value string
				if err := walkFields(b, func(f, w int, _ uint64, b []byte) error {
					if w == 2 && f == 1 {
						key = string(b)
					}
					if w == 2 && f == 2 {
						value = string(b)
					}
					return nil
				}); err != nil {
					return err
				}
				if key == "location" {
					location = value
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("initializer: %w", err)
		}
		if external && location != "" && !seen[location] {
			seen[location] = true
			h.ExternalData = append(h.ExternalData, location)
		}
		return nil
	})
	for _, io := range inputs {
		if !initializers[io.Name] {
			h.Inputs = append(h.Inputs, io)
		}
	}
	return err
}

// Bounds on what the header parse keeps of a graph's declared IO, so that a
// hostile file cannot make it hold more than a few megabytes.
const (
	maxGraphIO   = 4096
	maxIODims    = 64
	maxIONameLen = 4096
)

// parseValueInfo reads a ValueInfoProto: its name and, for a tensor, its
// element type and shape (-1 for a dynamic dimension).
func parseValueInfo(b []byte) (IO, error) {
	var io IO
	err := walkFields(b, func(f, w int, _ uint64, b []byte) error {
		switch {
		case f == 1 && w == 2:
			if len(b) > maxIONameLen {
				return fmt.Errorf("a name of %d bytes", len(b))
			}
			io.Name = string(b)
		case f == 2 && w == 2: // TypeProto
			return walkFields(b, func(f, w int, _ uint64, b []byte) error {
				if f != 1 || w != 2 { // TypeProto.tensor_type
					return nil
				}
				return walkFields(b, func(f, w int, v uint64, b []byte) error {
					switch {
					case f == 1 && w == 0:
						io.Type = onnxElemType(v)
					case f == 2 && w == 2: // TensorShapeProto
						io.Shape = []int64{}
						return walkFields(b, func(f, w int, _ uint64, b []byte) error {
							if f != 1 || w != 2 {
								return nil
							}
							d := int64(-1)
							if err := walkFields(b, func(f, w int, v uint64, _ []byte) error {
								if f == 1 && w == 0 {
									d = int64(v)
								}
								return nil
							}); err != nil {
								return err
							}
							if len(io.Shape) >= maxIODims {
								return fmt.Errorf("more than %d dimensions", maxIODims)
							}
							io.Shape = append(io.Shape, d)
							return nil
						})
					}
					return nil
				})
			})
		}
		return nil
	})
	return io, err
}

// onnxElemType names an ONNX TensorProto.DataType.
func onnxElemType(v uint64) ElemType {
	switch v {
	case 1:
		return Float32
	case 10:
		return Float16
	case 11:
		return Float64
	case 7:
		return Int64
	case 6:
		return Int32
	}
	return ElemType(fmt.Sprintf("type%d", v))
}

// walkFields calls fn for each field of a protobuf message: varints with v
// set, length-delimited fields with b set; fixed-width fields are skipped.
func walkFields(data []byte, fn func(field, wire int, v uint64, b []byte) error) error {
	for len(data) > 0 {
		key, n := uvarint(data)
		if n <= 0 {
			return errors.New("truncated field key")
		}
		data = data[n:]
		field, wire := int(key>>3), int(key&7)
		if field == 0 {
			return errors.New("field number 0")
		}
		var v uint64
		var b []byte
		switch wire {
		case 0:
			v, n = uvarint(data)
			if n <= 0 {
				return fmt.Errorf("truncated varint in field %d", field)
			}
			data = data[n:]
		case 1:
			if len(data) < 8 {
				return fmt.Errorf("truncated fixed64 in field %d", field)
			}
			data = data[8:]
		case 2:
			l, n := uvarint(data)
			if n <= 0 || l > uint64(len(data)-n) {
				return fmt.Errorf("field %d: length %d beyond the end of the data", field, l)
			}
			b = data[n : n+int(l)]
			data = data[n+int(l):]
		case 5:
			if len(data) < 4 {
				return fmt.Errorf("truncated fixed32 in field %d", field)
			}
			data = data[4:]
		default:
			return fmt.Errorf("field %d: unsupported wire type %d", field, wire)
		}
		if err := fn(field, wire, v, b); err != nil {
			return err
		}
	}
	return nil
}

func uvarint(buf []byte) (uint64, int) {
	var x uint64
	var s uint
	for i, b := range buf {
		if i == 10 {
			return 0, -1
		}
		if b < 0x80 {
			return x | uint64(b)<<s, i + 1
		}
		x |= uint64(b&0x7f) << s
		s += 7
	}
	return 0, 0
}
