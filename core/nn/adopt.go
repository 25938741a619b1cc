package nn

import (
	"fmt"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/native/trainer"
)

// Adopt takes over a TorchScript module m of any architecture (a user's
// scripted model, e.g. one modelpkg.LoadModule read) as a Net to train,
// for samples of the per-sample shape inputShape (e.g. [3, 32, 32]; flat
// feature rows are reshaped to it). It runs forward once on a zero batch
// in eval mode to learn the output shape, so a shape the module rejects is
// an INVALID_ARGUMENT error here. On success the Net owns m (closing the
// Net closes m); on error the caller still owns m.
func Adopt(m *core.Module, inputShape []int64) (*Net, error) {
	if len(inputShape) == 0 || len(inputShape) > 8 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: adopt module: input shape %v must have 1 to 8 dimensions", inputShape)
	}
	for _, d := range inputShape {
		if d <= 0 {
			return nil, core.Errorf(core.InvalidArgument, "kiln: adopt module: input shape %v has a non-positive dimension", inputShape)
		}
	}
	n := prod(inputShape)
	if n < 0 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: adopt module: input shape %v holds more than %d values", inputShape, MaxSampleValues)
	}
	h := m.Handle()
	if !h.Valid() {
		return nil, core.ErrClosed
	}
	params, err := trainer.NumParams(h)
	if err != nil {
		return nil, fmt.Errorf("kiln: adopt module: %w", err)
	}
	if err := m.SetTraining(false); err != nil {
		return nil, err
	}
	net := &Net{Module: m, Params: params, Inputs: n, InputShape: append([]int64(nil), inputShape...)}
	// Two zero samples: what the module returns for one batch tells its
	// per-sample output shape.
	x, err := core.NewTensor(make([]float32, 2*n), append([]int64{2}, inputShape...)...)
	if err != nil {
		return nil, err
	}
	defer x.Close()
	outs, err := net.Forward(x)
	if err != nil {
		return nil, core.Errorf(core.InvalidArgument, "kiln: adopt module: forward on samples of shape %v: %v", inputShape, err)
	}
	defer outs[0].Close()
	shape := outs[0].Shape()
	if len(shape) < 1 || shape[0] != 2 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: adopt module: forward returned shape %v for a batch of 2", shape)
	}
	if dt := outs[0].DType(); dt != core.Float32 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: adopt module: forward returned %v, want float32", dt)
	}
	net.Outputs = append([]int64(nil), shape[1:]...)
	if len(net.Outputs) == 0 {
		net.Outputs = []int64{1}
	}
	return net, nil
}
