package bindings

import (
	"context"
	"encoding/json"
	"fmt"
	"unsafe"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/registry/runlog"
)

// StartOptimize prunes and/or quantizes the model package at pkgDir as
// optionsJSON says (core/optimize.Options as JSON), re-creating its data
// splits from the numpy training data it was fitted on (rows×cols float32
// features at xAddr, rows float32 targets at yAddr: the same values fit
// saw, checked by fingerprint), and writes the optimized package to
// outDir. calRows >= 0 gives static int8's calibration rows: calRows×calCols
// float32 raw model inputs at calAddr (calRows -1: none). The numpy data is
// copied during this call; the optimization then runs in the background
// like training: Python polls the job (the GIL stays free), Cancel stops
// it, and Report returns the optimization record (with the size, accuracy
// and latency report) as JSON. recordJSON, when not "", records the job
// as a registry run of kind optimize (see StartTraining).
func StartOptimize(pkgDir, optionsJSON string, xAddr uint64, rows, cols int, yAddr uint64, calAddr uint64, calRows, calCols int, outDir, recordJSON string) (_ *TrainJob, err error) {
	defer guard(&err)
	var o optimize.Options
	if err := json.Unmarshal([]byte(optionsJSON), &o); err != nil {
		return nil, fmt.Errorf("kiln: optimize: bad options: %w", err)
	}
	src, err := optimize.Open(pkgDir)
	if err != nil {
		return nil, err
	}
	t, err := numpyTable(xAddr, rows, cols, yAddr)
	if err != nil {
		src.Close()
		return nil, err
	}
	sp, err := src.Splits(t, nil)
	if err != nil {
		src.Close()
		return nil, err
	}
	if calRows >= 0 {
		if o.Calibration, err = numpyCalibration(src, calAddr, calRows, calCols); err != nil {
			src.Close()
			return nil, err
		}
	}
	extra := numpyParams(rows, cols)
	extra["model"] = pkgDir
	tr, err := startTracking(recordJSON, runlog.KindOptimize, runlog.OptimizeParams(o, extra))
	if err != nil {
		src.Close()
		return nil, err
	}
	return startJob(tr, func(ctx context.Context, _ func(train.Event)) (any, error) {
		defer src.Close()
		res, err := optimize.Run(ctx, src, sp, o)
		if err != nil {
			return nil, err
		}
		defer res.Module.Close()
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("kiln: optimize: %w", err)
		}
		if err := optimize.SavePackage(outDir, src, sp, res); err != nil {
			return nil, err
		}
		runlog.OptimizeVariants(tr, res.Record.Report)
		return res.Record, nil
	}, nil), nil
}

// numpyCalibration reads rows×cols float32 raw model inputs at addr as a
// calibration set for src.
func numpyCalibration(src *optimize.Source, addr uint64, rows, cols int) (*data.Dataset, error) {
	if rows == 0 {
		return nil, core.Errorf(core.InvalidArgument, "kiln: optimize: the calibration data is empty (no rows)")
	}
	if src.Manifest.Preprocessing == nil {
		return nil, core.Errorf(core.InvalidArgument, "kiln: optimize: the package records no preprocessing (a fine-tuned TorchScript model), so its calibration columns cannot be checked; optimize a package Kiln trained from a table")
	}
	if want := src.Manifest.Preprocessing.NumInputs(); cols != want {
		return nil, core.Errorf(core.InvalidArgument, "kiln: optimize: the calibration data has %d columns per row, the model takes %d input columns", cols, want)
	}
	x := unsafe.Slice((*float32)(native.AddrPointer(uintptr(addr))), rows*cols)
	return data.NewDataset(append([]float32(nil), x...), cols, make([]float32, rows))
}
