package onnx

import (
	"context"
	"errors"
	"fmt"
	"unsafe"

	ort "github.com/yalue/onnxruntime_go"
)

// Run evaluates the graph on inputs keyed by graph input name and returns
// the outputs keyed by name, in buffers the caller owns. Shapes and types
// are checked against the graph before anything reaches ONNX Runtime.
func (s *Session) Run(inputs map[string]Tensor) (map[string]Tensor, error) {
	return s.RunContext(context.Background(), inputs)
}

// RunContext is Run with cancellation: when ctx ends, ONNX Runtime is asked
// to terminate the Run, which then returns ctx's error.
func (s *Session) RunContext(ctx context.Context, inputs map[string]Tensor) (map[string]Tensor, error) {
	return s.RunShaped(ctx, inputs, nil)
}

// RunShaped is RunContext with the shapes of some outputs given (see BindShaped).
func (s *Session) RunShaped(ctx context.Context, inputs map[string]Tensor, outShapes map[string][]int64) (map[string]Tensor, error) {
	b, err := s.BindShaped(inputs, outShapes)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	if err := b.Run(ctx); err != nil {
		return nil, err
	}
	res := make(map[string]Tensor, len(b.outputs))
	for _, o := range b.outputs {
		res[o.io.Name] = o.t
	}
	return res, nil
}

// Binding is a prepared Run: ONNX Runtime values made once over the
// caller's input buffers and over output buffers of fixed shapes, with
// shapes and types checked once. Between Runs the caller rewrites its input
// buffers in place (a batch of tiles of one shape, say) and reads the
// outputs from Output; nothing is allocated per Run for float32 and int64
// tensors, so a Run costs what a bare ONNX Runtime call costs.
//
// A Binding's Run must not be called from several goroutines at once; make
// one Binding per goroutine (the Session itself is shared).
type Binding struct {
	s       *Session
	inputs  []boundInput
	outputs []boundOutput
	in, out []ort.Value
}

type boundInput struct {
	io    IO
	src   Tensor
	value ort.Value    // nil for scalars, which are made afresh per Run
	sync  func() error // refreshes value's buffer from src before a Run; nil when value wraps src
}

type boundOutput struct {
	io    IO
	t     Tensor // what the caller reads (float32 or int64)
	value ort.Value
	bits  []uint16 // float16 outputs: ONNX Runtime's buffer
}

// Bind prepares a Run over inputs (keyed by graph input name).
func (s *Session) Bind(inputs map[string]Tensor) (_ *Binding, err error) {
	return s.BindShaped(inputs, nil)
}

// BindShaped is Bind with the shapes of some outputs given (by name), for
// graphs whose dynamic output sizes do not follow their inputs' (a
// decoder's output is its input times its factor).
func (s *Session) BindShaped(inputs map[string]Tensor, outShapes map[string][]int64) (_ *Binding, err error) {
	m := s.model
	for name := range inputs {
		if !hasIO(m.Inputs, name) {
			return nil, fmt.Errorf("model %q has no input %q (inputs: %s)", m.Name, name, names(m.Inputs))
		}
	}
	b := &Binding{s: s, in: make([]ort.Value, len(m.Inputs)), out: make([]ort.Value, len(m.Outputs))}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	for _, io := range m.Inputs {
		t, ok := inputs[io.Name]
		if !ok {
			return nil, fmt.Errorf("model %q: input %q (%s) not given", m.Name, io.Name, roleOr(io.Role))
		}
		if err := checkShape(io, t); err != nil {
			return nil, err
		}
		in, err := bindInput(io, t)
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", io.Name, err)
		}
		b.inputs = append(b.inputs, in)
	}
	for _, io := range m.Outputs {
		shape, ok := outShapes[io.Name]
		if !ok {
			shape, ok = s.outputShape(io, inputs)
		}
		if !ok {
			return nil, fmt.Errorf("output %q: shape %s cannot be inferred from the inputs", io.Name, io.ShapeString())
		}
		o, err := bindOutput(io, shape)
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", io.Name, err)
		}
		b.outputs = append(b.outputs, o)
	}
	return b, nil
}

// Output returns the output tensor with the given name; its buffer is
// rewritten by every Run.
func (b *Binding) Output(name string) (Tensor, bool) {
	for _, o := range b.outputs {
		if o.io.Name == name {
			return o.t, true
		}
	}
	return Tensor{}, false
}

// Run evaluates the graph on the current contents of the bound buffers.
func (b *Binding) Run(ctx context.Context) error {
	s := b.s
	var scalars []ort.Value
	defer func() {
		for _, v := range scalars {
			v.Destroy()
		}
	}()
	for i, in := range b.inputs {
		if in.value == nil {
			v, err := scalarValue(in.io, in.src)
			if err != nil {
				return fmt.Errorf("input %q: %w", in.io.Name, err)
			}
			scalars = append(scalars, v)
			b.in[i] = v
			continue
		}
		if in.sync != nil {
			if err := in.sync(); err != nil {
				return fmt.Errorf("input %q: %w", in.io.Name, err)
			}
		}
		b.in[i] = in.value
	}
	for i, o := range b.outputs {
		b.out[i] = o.value
	}
	run := func() error { return s.run(ctx, b.in, b.out) }
	var err error
	if s.gpu {
		ran := false
		s.firstRun.Do(func() {
			ran = true
			_, err = guardSignals(run)
		})
		if !ran {
			err = run()
		}
	} else {
		err = run()
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("model %q: run on %s: %w", s.model.Name, s.provider, err)
	}
	for _, o := range b.outputs {
		if o.bits != nil {
			Float16ToFloat32(o.t.Float, o.bits)
		}
	}
	return nil
}

// Close releases the ONNX Runtime values. It is safe to call more than once.
func (b *Binding) Close() {
	for i := range b.inputs {
		if v := b.inputs[i].value; v != nil {
			v.Destroy()
			b.inputs[i].value = nil
		}
	}
	for i := range b.outputs {
		if v := b.outputs[i].value; v != nil {
			v.Destroy()
			b.outputs[i].value = nil
		}
	}
}

func (s *Session) run(ctx context.Context, in, out []ort.Value) error {
	s.closeMu.Lock()
	sess := s.sess
	s.closeMu.Unlock()
	if sess == nil {
		return errors.New("session closed")
	}
	if ctx.Done() == nil {
		return sess.Run(in, out)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	opts, err := ort.NewRunOptions()
	if err != nil {
		return err
	}
	// The options are destroyed only once a Terminate that ctx started has
	// returned: stop reports false when the func already began.
	terminated := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(terminated)
		opts.Terminate()
	})
	err = sess.RunWithOptions(in, out, opts)
	if !stop() {
		<-terminated
	}
	opts.Destroy()
	return err
}

// bindInput makes the ONNX Runtime value for one input. float32 and int64
// data given in the graph's own type are wrapped without copying; other
// combinations get a buffer of the graph's type refreshed before each Run.
func bindInput(io IO, t Tensor) (boundInput, error) {
	in := boundInput{io: io, src: t}
	if len(io.Shape) == 0 {
		if io.Type == Float16 {
			return in, errors.New("float16 scalar inputs cannot be passed through onnxruntime_go; re-export the graph with this input as shape [1] or [batch]")
		}
		return in, nil // made per Run by scalarValue
	}
	shape := ort.Shape(t.Shape)
	n := t.dataLen()
	var err error
	switch io.Type {
	case Float32:
		if t.Float != nil {
			in.value, err = ort.NewTensor(shape, t.Float)
			return in, err
		}
		buf := make([]float32, n)
		in.value, err = ort.NewTensor(shape, buf)
		in.sync = func() error { copyFloats(buf, t); return nil }
	case Float64:
		buf := make([]float64, n)
		in.value, err = ort.NewTensor(shape, buf)
		in.sync = func() error {
			for i := range buf {
				if t.Float != nil {
					buf[i] = float64(t.Float[i])
				} else {
					buf[i] = float64(t.Int[i])
				}
			}
			return nil
		}
	case Float16:
		bits := make([]uint16, n)
		in.value, err = ort.NewCustomDataTensor(shape, u16Bytes(bits), ort.TensorElementDataTypeFloat16)
		var tmp []float32
		if t.Float == nil {
			tmp = make([]float32, n)
		}
		in.sync = func() error {
			src := t.Float
			if src == nil {
				copyFloats(tmp, t)
				src = tmp
			}
			Float16Bits(bits, src)
			return nil
		}
	case Int64:
		if t.Int != nil {
			in.value, err = ort.NewTensor(shape, t.Int)
			return in, err
		}
		buf := make([]int64, n)
		in.value, err = ort.NewTensor(shape, buf)
		in.sync = func() error { return intsFrom(buf, t, io.Type) }
	case Int32:
		buf := make([]int32, n)
		in.value, err = ort.NewTensor(shape, buf)
		wide := make([]int64, n)
		in.sync = func() error {
			if err := intsFrom(wide, t, io.Type); err != nil {
				return err
			}
			for i, v := range wide {
				buf[i] = int32(v)
			}
			return nil
		}
	default:
		return in, fmt.Errorf("element type %s is not supported", io.Type)
	}
	return in, err
}

// scalarValue makes a scalar value of the graph's type from t's one element.
func scalarValue(io IO, t Tensor) (ort.Value, error) {
	f := func() float32 {
		if t.Float != nil {
			return t.Float[0]
		}
		return float32(t.Int[0])
	}
	switch io.Type {
	case Float32:
		return ort.NewScalar(f())
	case Float64:
		return ort.NewScalar(float64(f()))
	case Int64, Int32:
		var v [1]int64
		if err := intsFrom(v[:], Tensor{Float: t.Float, Int: t.Int}, io.Type); err != nil {
			return nil, err
		}
		if io.Type == Int32 {
			return ort.NewScalar(int32(v[0]))
		}
		return ort.NewScalar(v[0])
	}
	return nil, fmt.Errorf("element type %s is not supported for scalars", io.Type)
}

func bindOutput(io IO, shape []int64) (boundOutput, error) {
	o := boundOutput{io: io}
	n := ort.Shape(shape).FlattenedSize()
	var err error
	switch io.Type {
	case Float32:
		o.t = Tensor{Shape: shape, Float: make([]float32, n)}
		o.value, err = ort.NewTensor(ort.Shape(shape), o.t.Float)
	case Float16:
		o.t = Tensor{Shape: shape, Float: make([]float32, n)}
		o.bits = make([]uint16, n)
		o.value, err = ort.NewCustomDataTensor(ort.Shape(shape), u16Bytes(o.bits), ort.TensorElementDataTypeFloat16)
	case Int64:
		o.t = Tensor{Shape: shape, Int: make([]int64, n)}
		o.value, err = ort.NewTensor(ort.Shape(shape), o.t.Int)
	default:
		err = fmt.Errorf("element type %s is not supported for outputs", io.Type)
	}
	return o, err
}

func u16Bytes(b []uint16) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&b[0])), 2*len(b))
}

func copyFloats(dst []float32, t Tensor) {
	if t.Float != nil {
		copy(dst, t.Float)
		return
	}
	for i, v := range t.Int {
		dst[i] = float32(v)
	}
}

func intsFrom(dst []int64, t Tensor, typ ElemType) error {
	if t.Int != nil {
		copy(dst, t.Int)
		return nil
	}
	conv, err := toInt64(t.Float)
	if err != nil {
		return fmt.Errorf("the graph takes %s: %w", typ, err)
	}
	copy(dst, conv)
	return nil
}

func hasIO(ios []IO, name string) bool {
	for _, io := range ios {
		if io.Name == name {
			return true
		}
	}
	return false
}

func roleOr(role string) string {
	if role == "" {
		return "no role"
	}
	return "role " + role
}

// checkShape compares a tensor with the graph's declaration.
func checkShape(io IO, t Tensor) error {
	if len(t.Shape) != len(io.Shape) {
		if len(io.Shape) == 0 {
			return fmt.Errorf("input %q: expected a scalar, got shape %v", io.Name, t.Shape)
		}
		return fmt.Errorf("input %q: expected %d dimensions %s, got shape %v", io.Name, len(io.Shape), io.ShapeString(), t.Shape)
	}
	for i, d := range io.Shape {
		got := t.Shape[i]
		if got <= 0 {
			return fmt.Errorf("input %q: dimension %d is %d, must be positive", io.Name, i, got)
		}
		if d >= 0 && d != got {
			what := fmt.Sprintf("dimension %d to be %d", i, d)
			if len(io.Shape) == 4 {
				what = fmt.Sprintf("%d %s", d, [...]string{"batch items", "channels", "rows", "columns"}[i])
			}
			return fmt.Errorf("input %q: expected %s, got %d", io.Name, what, got)
		}
	}
	if t.Float == nil && t.Int == nil {
		return fmt.Errorf("input %q: no data", io.Name)
	}
	if n := t.Len(); int64(t.dataLen()) != n {
		return fmt.Errorf("input %q: shape %v holds %d values, got %d", io.Name, t.Shape, n, t.dataLen())
	}
	return nil
}

// outputShape infers an output's concrete shape: static dimensions as
// declared, dynamic ones from the same axis of the sample input when the
// ranks agree, which is how image-to-image graphs are shaped, and a
// dynamic batch axis from the inputs' batch (a text encoder's).
func (s *Session) outputShape(io IO, inputs map[string]Tensor) ([]int64, bool) {
	var ref []int64
	if in := s.model.Input(RoleSample); in != nil && len(in.Shape) == len(io.Shape) {
		ref = inputs[in.Name].Shape
	}
	shape := make([]int64, len(io.Shape))
	for i, d := range io.Shape {
		switch {
		case d >= 0:
			shape[i] = d
		case ref != nil:
			shape[i] = ref[i]
		case i == 0 && batchOf(s.model, inputs) > 0:
			shape[i] = batchOf(s.model, inputs) // the batch axis every input shares
		default:
			return nil, false
		}
	}
	return shape, true
}

// batchOf is the batch size of the inputs: the first dimension of the first
// input of rank 2 or more (a text encoder's input_ids [B, L]).
func batchOf(m *Model, inputs map[string]Tensor) int64 {
	for _, in := range m.Inputs {
		if t, ok := inputs[in.Name]; ok && len(t.Shape) >= 2 {
			return t.Shape[0]
		}
	}
	return 0
}
