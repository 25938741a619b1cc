package bindings

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/kilnml/kiln/core/optimize"
)

// Optimize prunes and/or quantizes the model package at pkgDir as
// optionsJSON says (core/optimize.Options as JSON), re-creating its data
// splits from the numpy training data it was fitted on (rows×cols float32
// features at xAddr, rows float32 targets at yAddr: the same values fit
// saw, checked by fingerprint), and writes the optimized package to
// outDir. It returns the optimization record (with the size, accuracy and
// latency report) as JSON.
func Optimize(pkgDir, optionsJSON string, xAddr uint64, rows, cols int, yAddr uint64, outDir string) (_ string, err error) {
	defer guard(&err)
	var o optimize.Options
	if err := json.Unmarshal([]byte(optionsJSON), &o); err != nil {
		return "", fmt.Errorf("kiln: optimize: bad options: %w", err)
	}
	src, err := optimize.Open(pkgDir)
	if err != nil {
		return "", err
	}
	defer src.Close()
	t, err := numpyTable(xAddr, rows, cols, yAddr)
	if err != nil {
		return "", err
	}
	sp, err := src.Splits(t, nil)
	if err != nil {
		return "", err
	}
	res, err := optimize.Run(context.Background(), src, sp, o)
	if err != nil {
		return "", err
	}
	defer res.Module.Close()
	if err := optimize.SavePackage(outDir, src, sp, res); err != nil {
		return "", err
	}
	b, err := json.Marshal(res.Record)
	return string(b), err
}
