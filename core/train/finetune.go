package train

import (
	"context"
	"fmt"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native/trainer"
)

// ParamGroup trains the parameters whose names start with Prefix at
// learning rate LR (PyTorch's optimizer parameter groups; a schedule
// scales every group's rate in proportion to the base rate). Names are
// named_parameters()'s: "layer4.1.conv2.weight", "fc.bias"; for networks
// built from a spec "<layer>_weight".
type ParamGroup struct {
	Prefix string  `json:"prefix"`
	LR     float64 `json:"lr"`
}

// InitModel is the model a job fine-tunes instead of building one from
// its spec: any TorchScript module (a file torch.jit.save wrote, or a Kiln
// package directory), such as a ResNet scripted in Python torch.
type InitModel struct {
	// Path is the TorchScript file or package directory.
	Path string `json:"path"`
	// InputShape is the per-sample shape forward takes, e.g. [3, 32, 32];
	// the data's feature columns (as many as its product, in row-major
	// order) are reshaped to it. Empty: [number of features].
	InputShape []int64 `json:"input_shape,omitempty"`
}

// fineTunes reports whether c trains only part of the network, or parts
// at their own rates.
func (c Config) fineTunes() bool {
	return len(c.Freeze) > 0 || len(c.ParamGroups) > 0 || c.FreezeBN
}

func (c Config) fineTune() trainer.FineTune {
	f := trainer.FineTune{Freeze: c.Freeze, FreezeBN: c.FreezeBN}
	for _, g := range c.ParamGroups {
		f.Groups = append(f.Groups, trainer.ParamGroup{Prefix: g.Prefix, LR: g.LR})
	}
	return f
}

func (c Config) validateFineTune() error {
	for i, p := range c.Freeze {
		if strings.TrimSpace(p) == "" {
			return fmt.Errorf("kiln: train: freeze prefix %d is empty", i)
		}
	}
	for i, g := range c.ParamGroups {
		if strings.TrimSpace(g.Prefix) == "" {
			return fmt.Errorf("kiln: train: param_groups[%d] has no prefix", i)
		}
		if !(g.LR > 0) {
			return fmt.Errorf("kiln: train: param_groups[%d] (%q): lr must be > 0, got %v", i, g.Prefix, g.LR)
		}
	}
	if c.FreezeBN && len(c.Freeze) == 0 {
		return fmt.Errorf("kiln: train: freeze_bn needs freeze prefixes (it keeps the batch norm under them in eval mode)")
	}
	return nil
}

// tensors returns ds's features, shaped [rows, net.InputShape...] for an
// adopted module (flat [rows, features] otherwise), and targets.
func tensors(ds *data.Dataset, net *nn.Net) (x, y *core.Tensor, err error) {
	if net == nil || len(net.InputShape) == 0 {
		return ds.Tensors()
	}
	if int64(ds.Features) != net.Inputs {
		return nil, nil, fmt.Errorf("kiln: train: the data has %d feature columns but the model's input shape %v holds %d", ds.Features, net.InputShape, net.Inputs)
	}
	if x, err = core.NewTensor(ds.X, append([]int64{int64(ds.Len())}, net.InputShape...)...); err != nil {
		return nil, nil, err
	}
	if y, err = core.NewTensor(ds.Y, int64(ds.Len())); err != nil {
		x.Close()
		return nil, nil, err
	}
	return x, y, nil
}

// prepareInit checks the data options of a job that fine-tunes a
// TorchScript module: the module takes the features as they are, so the
// data are not scaled ("none" is the default) and every feature is
// numeric.
func prepareInit(j Job) (Job, error) {
	if j.Init.Path == "" {
		return j, core.Errorf(core.InvalidArgument, "kiln: train: init needs the path of a TorchScript model")
	}
	switch norm(j.Data.Scale) {
	case "":
		j.Data.Scale = "none"
	case "none":
	default:
		return j, core.Errorf(core.InvalidArgument, "kiln: train: fine-tuning %s feeds the features to it as they are: data.scale must be none, got %q", j.Init.Path, j.Data.Scale)
	}
	if len(j.Model.Layers) > 0 {
		return j, core.Errorf(core.InvalidArgument, "kiln: train: a job has either model layers or init (a TorchScript model to fine-tune), not both")
	}
	return j, nil
}

// loadInit loads the job's TorchScript module as a Net to fine-tune.
func loadInit(p *Prepared) (*nn.Net, error) {
	in := p.Job.Init
	for _, f := range p.Pre.Features {
		if f.Categorical {
			return nil, core.Errorf(core.InvalidArgument, "kiln: train: fine-tuning %s: feature %q is categorical; the model takes numeric features as they are", in.Path, f.Name)
		}
	}
	shape := in.InputShape
	if len(shape) == 0 {
		shape = []int64{int64(p.Pre.NumInputs())}
	}
	m, err := modelpkg.LoadModule(in.Path)
	if err != nil {
		return nil, fmt.Errorf("kiln: train: init model: %w", err)
	}
	net, err := nn.Adopt(m, shape)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("kiln: train: init model %s: %w", in.Path, err)
	}
	if net.Inputs != int64(p.Pre.NumInputs()) {
		net.Close()
		return nil, core.Errorf(core.InvalidArgument, "kiln: train: init model %s: input shape %v holds %d values but the data has %d feature columns",
			in.Path, shape, net.Inputs, p.Pre.NumInputs())
	}
	return net, nil
}

// runInit is Run for a job that fine-tunes a TorchScript module.
func runInit(ctx context.Context, j Job, t *data.Table, source, out string, onEvent func(Event)) (*Report, error) {
	j, err := prepareInit(j)
	if err != nil {
		return nil, err
	}
	p, err := Prepare(j, t)
	if err != nil {
		return nil, err
	}
	net, err := loadInit(p)
	if err != nil {
		return nil, err
	}
	defer net.Close()
	return fitAndSave(ctx, net, p, source, out, onEvent)
}
