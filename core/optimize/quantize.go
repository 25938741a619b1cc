package optimize

import (
	"fmt"
	"slices"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/optimize"
	"github.com/kilnml/kiln/native/trainer"
)

// Quantization modes.
const (
	None = ""
	// Int8 is dynamic int8: Linear weights stored as qint8 packed for the
	// quantized engine, activations quantized per batch at run time.
	Int8 = "int8"
	// FP16 and BF16 store Linear and conv weights in half precision and
	// compute in float32 (weight-only).
	FP16 = "fp16"
	BF16 = "bf16"
)

// Engines returns the quantized engines the linked libtorch supports.
func Engines() ([]string, error) { return optimize.QEngines() }

// ChooseEngine returns engine when libtorch supports it, or, for "", the
// preferred supported one: fbgemm (pip's x86 builds), else qnnpack, else
// onednn.
func ChooseEngine(engine string) (string, error) {
	have, err := optimize.QEngines()
	if err != nil {
		return "", fmt.Errorf("kiln: optimize: %w", err)
	}
	if len(have) == 0 {
		return "", core.Errorf(core.Unsupported, "kiln: optimize: this libtorch has no quantized engine")
	}
	if engine != "" {
		if !slices.Contains(have, engine) {
			return "", core.Errorf(core.Unsupported, "kiln: optimize: quantized engine %q is not supported by this libtorch (it supports: %s)",
				engine, strings.Join(have, ", "))
		}
		return engine, nil
	}
	for _, e := range []string{"fbgemm", "x86", "qnnpack", "onednn"} {
		if slices.Contains(have, e) {
			return e, nil
		}
	}
	return have[0], nil
}

// useEngine chooses engine as ChooseEngine does and selects it for this
// process, so that weights are packed for it.
func useEngine(engine string) (string, error) {
	engine, err := ChooseEngine(engine)
	if err != nil {
		return "", err
	}
	if err := optimize.SetQEngine(engine); err != nil {
		return "", fmt.Errorf("kiln: optimize: %w", err)
	}
	return engine, nil
}

// Quantize builds a TorchScript module computing net (whose spec is spec,
// behind src's prelude) with its layers quantized by mode (Int8, FP16 or
// BF16); engine (Int8 only) is the quantized engine, "" choosing one. The
// module is in eval mode and its forward takes the same raw inputs; the
// caller closes it. It returns the engine used.
func Quantize(src *Source, net *nn.Net, spec nn.Spec, mode, engine string) (*core.Module, string, error) {
	var half *core.DType
	switch mode {
	case Int8:
		var err error
		if engine, err = useEngine(engine); err != nil {
			return nil, "", err
		}
	case FP16:
		half = ptr(core.Float16)
	case BF16:
		half = ptr(core.BFloat16)
	default:
		return nil, "", fmt.Errorf("kiln: optimize: unknown quantization %q (want int8, fp16 or bf16)", mode)
	}
	if mode != Int8 {
		engine = ""
	}
	var quantizable []string
	var kinds []string
	for _, info := range net.Layers {
		kinds = append(kinds, info.Type)
		if info.Type == "linear" || (mode != Int8 && prunable(info.Type)) {
			quantizable = append(quantizable, info.Name)
		}
	}
	if len(quantizable) == 0 {
		want := "linear"
		if mode != Int8 {
			want = "linear or conv"
		}
		hint := ""
		if mode == Int8 && slices.ContainsFunc(kinds, quantizableStatic) {
			hint = "; static int8 (with calibration data) quantizes conv layers"
		}
		return nil, "", fmt.Errorf("kiln: optimize: nothing to quantize to %s: the network has no %s layers (it has %s)%s",
			mode, want, strings.Join(kinds, ", "), hint)
	}
	h, err := trainer.NewModule(nn.ClassName)
	if err != nil {
		return nil, "", fmt.Errorf("kiln: optimize: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			h.Free()
		}
	}()
	for _, b := range src.Prelude.Buffers {
		if err := addBuffer(h, b); err != nil {
			return nil, "", fmt.Errorf("kiln: optimize: buffer %s: %w", b.Name, err)
		}
	}
	body := nn.ForwardPreamble(spec, src.Prelude)
	nh := net.Handle()
	for i, info := range net.Layers {
		l := spec.Layers[i]
		code := nn.LayerSource(info, l)
		names := nn.LayerTensors(info, l)
		switch {
		case mode == Int8 && info.Type == "linear":
			if err := addPackedLinear(h, nh, info, l); err != nil {
				return nil, "", err
			}
			code = []string{fmt.Sprintf("x = quantized.linear_dynamic(x, self.%s_packed)", info.Name)}
			names = nil
		case mode != Int8 && prunable(info.Type):
			w := info.Name + "_weight"
			if err := copyTensor(h, nh, w, half, true); err != nil {
				return nil, "", err
			}
			names = slices.DeleteFunc(slices.Clone(names), func(s string) bool { return s == w })
			for k := range code {
				code[k] = strings.ReplaceAll(code[k], "self."+w, "self."+w+".float()")
			}
		}
		for _, name := range names {
			param := strings.HasSuffix(name, "_weight") || strings.HasSuffix(name, "_bias")
			if err := copyTensor(h, nh, name, nil, param); err != nil {
				return nil, "", err
			}
		}
		body = append(body, code...)
	}
	body = append(body, "return x")
	var srcText strings.Builder
	srcText.WriteString("def forward(self, x: Tensor) -> Tensor:\n")
	for _, line := range body {
		srcText.WriteString("    " + line + "\n")
	}
	if err := optimize.Define(h, srcText.String()); err != nil {
		return nil, "", fmt.Errorf("kiln: optimize: compiling the %s forward: %w", mode, err)
	}
	ok = true
	m, err := core.AdoptModule(h, spec.Name+"-"+mode)
	if err != nil {
		return nil, "", err
	}
	if err := m.SetTraining(false); err != nil {
		m.Close()
		return nil, "", err
	}
	return m, engine, nil
}

// addPackedLinear registers layer info's weight and bias from src as an
// int8 packed attribute <name>_packed of dst.
func addPackedLinear(dst, src native.Module, info nn.LayerInfo, l nn.Layer) error {
	w, err := optimize.Get(src, info.Name+"_weight")
	if err != nil {
		return fmt.Errorf("kiln: optimize: %w", err)
	}
	defer w.Free()
	var b native.Tensor
	if nn.HasBias(l) {
		if b, err = optimize.Get(src, info.Name+"_bias"); err != nil {
			return fmt.Errorf("kiln: optimize: %w", err)
		}
		defer b.Free()
	}
	if _, err := optimize.AddLinearInt8(dst, info.Name+"_packed", w, b); err != nil {
		return fmt.Errorf("kiln: optimize: int8 layer %s: %w", info.Name, err)
	}
	return nil
}

// copyTensor registers a copy of src's tensor name in dst, converted to dt
// unless dt is nil.
func copyTensor(dst, src native.Module, name string, dt *core.DType, param bool) error {
	v, err := optimize.Get(src, name)
	if err != nil {
		return fmt.Errorf("kiln: optimize: %w", err)
	}
	t, err := core.AdoptTensor(v)
	if err != nil {
		return err
	}
	defer t.Close()
	if dt != nil {
		c, err := t.To(*dt)
		if err != nil {
			return err
		}
		defer c.Close()
		t = c
	}
	register := trainer.RegisterBuffer
	if param {
		register = trainer.RegisterParameter
	}
	if err := register(dst, name, t.Handle()); err != nil {
		return fmt.Errorf("kiln: optimize: %s: %w", name, err)
	}
	return nil
}

func addBuffer(h native.Module, b nn.Buffer) error {
	var t *core.Tensor
	var err error
	switch {
	case b.Float != nil && b.Int == nil:
		t, err = core.NewTensor(b.Float, b.Shape...)
	case b.Int != nil && b.Float == nil:
		t, err = core.NewTensor(b.Int, b.Shape...)
	default:
		return fmt.Errorf("exactly one of Float and Int must be set")
	}
	if err != nil {
		return err
	}
	defer t.Close()
	return trainer.RegisterBuffer(h, b.Name, t.Handle())
}

func ptr[T any](v T) *T { return &v }
