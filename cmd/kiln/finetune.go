package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/kilnml/kiln/core/train"
)

// fineTuneFlags are kiln train's flags for fine-tuning a TorchScript model.
type fineTuneFlags struct {
	init, inputShape string
	freeze, lrGroups []string
	freezeBN         bool
}

func (o *fineTuneFlags) addTo(f *pflag.FlagSet) {
	f.StringVar(&o.init, "init", "", "fine-tune this TorchScript model (a torch.jit.save file or a Kiln package) instead of building the spec's layers")
	f.StringVar(&o.inputShape, "input-shape", "", "per-sample shape the model's forward takes, e.g. 1,32,32 (the feature columns, row-major; default: [features])")
	f.StringArrayVar(&o.freeze, "freeze", nil, "keep the parameters whose names start with this prefix fixed, e.g. layer1. (repeatable)")
	f.StringArrayVar(&o.lrGroups, "lr-group", nil, "PREFIX=LR: train the parameters whose names start with PREFIX at learning rate LR, e.g. fc.=0.01 (repeatable; first match wins)")
	f.BoolVar(&o.freezeBN, "freeze-bn", false, "keep the modules under --freeze prefixes (batch norm) in eval mode while the rest trains")
}

// apply sets the flags given on job.
func (o *fineTuneFlags) apply(job *train.Job) error {
	if o.init != "" {
		job.Init = &train.InitModel{Path: o.init}
	}
	if o.inputShape != "" {
		if job.Init == nil {
			return fmt.Errorf("kiln: train: --input-shape applies to --init models only")
		}
		for _, p := range strings.Split(o.inputShape, ",") {
			d, err := strconv.ParseInt(strings.TrimSpace(p), 10, 64)
			if err != nil || d <= 0 {
				return fmt.Errorf("kiln: train: --input-shape %q: want positive integers separated by commas", o.inputShape)
			}
			job.Init.InputShape = append(job.Init.InputShape, d)
		}
	}
	job.Train.Freeze = append(job.Train.Freeze, o.freeze...)
	for _, g := range o.lrGroups {
		prefix, lr, ok := strings.Cut(g, "=")
		v, err := strconv.ParseFloat(lr, 64)
		if !ok || prefix == "" || err != nil || !(v > 0) {
			return fmt.Errorf("kiln: train: --lr-group %q: want PREFIX=LR with LR > 0, e.g. fc.=0.01", g)
		}
		job.Train.ParamGroups = append(job.Train.ParamGroups, train.ParamGroup{Prefix: prefix, LR: v})
	}
	if o.freezeBN {
		job.Train.FreezeBN = true
	}
	return nil
}
