package onnx

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/x448/float16"
	"google.golang.org/protobuf/encoding/protowire"
)

// ONNX's TensorProto data types Tessera widens between.
const (
	onnxFloat   = 1
	onnxFloat16 = 10
)

// WidenFloat16 returns the ONNX model in data as a float32 graph: every
// float16 initializer and constant widened (exactly), every float16 value
// declared float32, every Cast (and dtype attribute) to float16 made one to
// float32, in the main graph and its subgraphs. It is the float32 copy a
// float16 autoencoder's overflowing tiles are retried in. Weights kept in
// external data files, sparse tensors and model-local functions are
// refused. It walks the
// protobuf wire format and never panics on arbitrary bytes.
func WidenFloat16(data []byte) ([]byte, error) {
	return rewrite(data, 0, kindModel)
}

// The message kinds the rewrite descends into.
const (
	kindModel = iota
	kindGraph
	kindNode
	kindAttribute
	kindTensor
	kindValueInfo
	kindType
	kindTypeTensor
	kindTypeSequence // also optional: elem_type is field 1
	kindTypeMap
)

// children says, per message kind, which length-delimited fields hold a
// message of which kind.
var children = map[int]map[protowire.Number]int{
	kindModel:        {7: kindGraph},
	kindGraph:        {1: kindNode, 5: kindTensor, 11: kindValueInfo, 12: kindValueInfo, 13: kindValueInfo},
	kindNode:         {5: kindAttribute},
	kindAttribute:    {5: kindTensor, 6: kindGraph, 10: kindTensor, 11: kindGraph},
	kindValueInfo:    {2: kindType},
	kindType:         {1: kindTypeTensor, 4: kindTypeSequence, 5: kindTypeMap, 8: kindTypeTensor, 9: kindTypeSequence},
	kindTypeSequence: {1: kindType},
	kindTypeMap:      {2: kindType},
}

// maxWidenDepth bounds the nesting of subgraphs and types.
const maxWidenDepth = 64

func rewrite(msg []byte, depth, kind int) ([]byte, error) {
	if depth > maxWidenDepth {
		return nil, errors.New("widen: messages nested too deep")
	}
	if kind == kindTensor {
		return widenTensor(msg)
	}
	// An attribute's name says whether its int is a data type.
	dtypeAttr := false
	if kind == kindAttribute {
		err := eachField(msg, func(num protowire.Number, typ protowire.Type, field, val []byte) error {
			if num == 1 && typ == protowire.BytesType {
				name := string(val)
				dtypeAttr = name == "to" || name == "dtype"
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	out := make([]byte, 0, len(msg))
	err := eachField(msg, func(num protowire.Number, typ protowire.Type, field, val []byte) error {
		switch {
		case kind == kindGraph && num == 15, kind == kindAttribute && (num == 22 || num == 23):
			return errors.New("widen: sparse tensors are not supported")
		case kind == kindModel && num == 25:
			return errors.New("widen: model-local functions are not supported")
		case typ == protowire.BytesType && children[kind][num] != 0:
			sub, err := rewrite(val, depth+1, children[kind][num])
			if err != nil {
				return err
			}
			out = protowire.AppendTag(out, num, protowire.BytesType)
			out = protowire.AppendBytes(out, sub)
		case typ == protowire.VarintType && (kind == kindTypeTensor && num == 1 || dtypeAttr && num == 3):
			v, _ := protowire.ConsumeVarint(val)
			if v == onnxFloat16 {
				v = onnxFloat
			}
			out = protowire.AppendTag(out, num, protowire.VarintType)
			out = protowire.AppendVarint(out, v)
		default:
			out = append(out, field...)
		}
		return nil
	})
	return out, err
}

// widenTensor rewrites a float16 TensorProto as float32 (its data in
// raw_data); other tensors are kept as they are.
func widenTensor(msg []byte) ([]byte, error) {
	var dtype uint64
	err := eachField(msg, func(num protowire.Number, typ protowire.Type, field, val []byte) error {
		switch {
		case num == 2 && typ == protowire.VarintType:
			dtype, _ = protowire.ConsumeVarint(val)
		case num == 14 && typ == protowire.VarintType:
			if v, _ := protowire.ConsumeVarint(val); v == 1 {
				return errors.New("widen: a tensor keeps its data in an external file; widen the model with tools/fp16_decoder.py --fp32 instead")
			}
		}
		return nil
	})
	if err != nil || dtype != onnxFloat16 {
		return msg, err
	}
	out := make([]byte, 0, 2*len(msg))
	var bits []uint16
	err = eachField(msg, func(num protowire.Number, typ protowire.Type, field, val []byte) error {
		switch {
		case num == 2 && typ == protowire.VarintType:
			out = protowire.AppendTag(out, 2, protowire.VarintType)
			out = protowire.AppendVarint(out, onnxFloat)
		case num == 9 && typ == protowire.BytesType:
			if len(val)%2 != 0 {
				return fmt.Errorf("widen: float16 raw_data of %d bytes", len(val))
			}
			for i := 0; i+1 < len(val); i += 2 {
				bits = append(bits, binary.LittleEndian.Uint16(val[i:]))
			}
		case num == 5 && typ == protowire.BytesType: // packed int32_data: float16 bits
			for len(val) > 0 {
				v, n := protowire.ConsumeVarint(val)
				if n < 0 {
					return errors.New("widen: truncated int32_data")
				}
				bits, val = append(bits, uint16(v)), val[n:]
			}
		case num == 5 && typ == protowire.VarintType:
			v, _ := protowire.ConsumeVarint(val)
			bits = append(bits, uint16(v))
		default:
			out = append(out, field...)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	data := make([]byte, 4*len(bits))
	for i, b := range bits {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(float16.Frombits(b).Float32()))
	}
	out = protowire.AppendTag(out, 9, protowire.BytesType)
	out = protowire.AppendBytes(out, data)
	return out, nil
}

// eachField calls fn for every field of a protobuf message with its number,
// wire type, whole encoding (tag included) and value (a varint's
// encoding, or a length-delimited field's bytes).
func eachField(msg []byte, fn func(num protowire.Number, typ protowire.Type, field, val []byte) error) error {
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return fmt.Errorf("widen: %w", protowire.ParseError(n))
		}
		m := protowire.ConsumeFieldValue(num, typ, msg[n:])
		if m < 0 {
			return fmt.Errorf("widen: field %d: %w", num, protowire.ParseError(m))
		}
		val := msg[n : n+m]
		if typ == protowire.BytesType {
			b, _ := protowire.ConsumeBytes(val)
			val = b
		}
		if err := fn(num, typ, msg[:n+m], val); err != nil {
			return err
		}
		msg = msg[n+m:]
	}
	return nil
}

// HasFloat16 reports whether the ONNX model in data holds anything in
// float16 (a weight, a value, a cast): a graph with float32 inputs and
// outputs may compute in float16 inside. Bytes that do not parse hold
// none.
func HasFloat16(data []byte) bool {
	found, _ := scanFloat16(data, 0, kindModel)
	return found
}

func scanFloat16(msg []byte, depth, kind int) (found bool, err error) {
	if depth > maxWidenDepth {
		return false, errors.New("nested too deep")
	}
	dtypeAttr := false
	if kind == kindAttribute {
		eachField(msg, func(num protowire.Number, typ protowire.Type, field, val []byte) error {
			if num == 1 && typ == protowire.BytesType {
				dtypeAttr = string(val) == "to" || string(val) == "dtype"
			}
			return nil
		})
	}
	err = eachField(msg, func(num protowire.Number, typ protowire.Type, field, val []byte) error {
		switch {
		case found:
		case typ == protowire.BytesType && children[kind][num] != 0:
			f, err := scanFloat16(val, depth+1, children[kind][num])
			found = found || f
			return err
		case typ == protowire.VarintType && (kind == kindTypeTensor && num == 1 || dtypeAttr && num == 3 || kind == kindTensor && num == 2):
			v, _ := protowire.ConsumeVarint(val)
			found = v == onnxFloat16
		}
		return nil
	})
	return found, err
}

// HasFloat16File is HasFloat16 of the model file at path, read through a
// memory map (a decoder's weights are not copied onto the heap).
func HasFloat16File(path string) bool {
	data, unmap, err := mapFile(path)
	if err != nil {
		return false
	}
	defer unmap()
	return HasFloat16(data)
}
