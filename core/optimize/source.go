// Package optimize makes trained Kiln networks smaller and faster and
// measures what it cost: magnitude pruning (unstructured, per layer or
// global), structured pruning that removes whole Linear neurons and conv
// channels and rebuilds a smaller dense network, fine-tuning with core/train, and
// quantization (dynamic int8 Linear layers through libtorch's quantized
// engines; static int8 Linear and Conv layers calibrated on sample rows,
// see QuantizeStatic; weight-only fp16 and bf16). Results are ordinary
// Kiln model packages with a manifest recording what was done, and a
// Report of size, parameters, sparsity, metric and latency for each
// variant.
package optimize

import (
	"encoding/json"
	"fmt"
	"path/filepath"

	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/native"
	"github.com/kilnml/kiln/native/trainer"
)

// Source is a trained model package opened for optimization: its manifest
// and its network rebuilt from the spec with the package's weights.
type Source struct {
	Dir      string
	Manifest modelpkg.Manifest
	// Hyperparameters is the training configuration the manifest records
	// (fine-tuning trains with it).
	Hyperparameters train.Config
	// Net is in eval mode; the caller closes the Source.
	Net     *nn.Net
	Prelude nn.Prelude
}

// Close releases the network.
func (s *Source) Close() error { return s.Net.Close() }

// Open reads the float model package in dir (modelpkg.Read: manifest.json
// and model.pt as core/train.SavePackage writes them).
func Open(dir string) (*Source, error) {
	m, err := modelpkg.Read(dir)
	if err != nil {
		return nil, fmt.Errorf("kiln: optimize: %w", err)
	}
	if m.Preprocessing == nil {
		return nil, fmt.Errorf("kiln: optimize: %s/%s has no preprocessing section", dir, modelpkg.ManifestFile)
	}
	if len(m.Optimization) > 0 {
		var rec Record
		if err := json.Unmarshal(m.Optimization, &rec); err != nil {
			return nil, fmt.Errorf("kiln: optimize: %s/%s: optimization: %w", dir, modelpkg.ManifestFile, err)
		}
		if rec.Quantize != "" {
			return nil, fmt.Errorf("kiln: optimize: %s is already quantized (%s); optimize the float model instead", dir, rec.Quantize)
		}
	}
	hp, err := train.Hyperparameters(&m)
	if err != nil {
		return nil, fmt.Errorf("kiln: optimize: %s: %w", dir, err)
	}
	pre := m.Preprocessing.Prelude()
	net, err := nn.BuildWithPrelude(m.Spec, pre, m.Lineage.Seed)
	if err != nil {
		return nil, fmt.Errorf("kiln: optimize: rebuilding %s from its spec: %w", dir, err)
	}
	saved, err := native.LoadModule(filepath.Join(dir, modelpkg.ModelFile))
	if err != nil {
		net.Close()
		return nil, fmt.Errorf("kiln: optimize: %w", err)
	}
	defer saved.Free()
	if err := trainer.CopyState(net.Handle(), saved); err != nil {
		net.Close()
		return nil, fmt.Errorf("kiln: optimize: %s/%s does not match its spec: %w", dir, modelpkg.ModelFile, err)
	}
	if err := net.SetTraining(false); err != nil {
		net.Close()
		return nil, err
	}
	return &Source{Dir: dir, Manifest: m, Hyperparameters: hp, Net: net, Prelude: pre}, nil
}

// Splits are the package's training, validation and test data.
type Splits struct {
	Train, Val, Test *data.Dataset
}

// Splits re-creates the package's splits from the table it was trained
// on: the same rows (checked by fingerprint), split with the recorded
// seed and options (split, when the manifest predates recording them:
// else nil), encoded with the package's preprocessing.
func (s *Source) Splits(t *data.Table, split *data.SplitOptions) (*Splits, error) {
	lin := s.Manifest.Lineage
	if lin.DataSHA256 != "" && t.Fingerprint != "" && t.Fingerprint != lin.DataSHA256 {
		return nil, fmt.Errorf("kiln: optimize: the data (sha256 %s) is not the data the model was trained on (sha256 %s)",
			t.Fingerprint, lin.DataSHA256)
	}
	if split == nil {
		split = lin.Split
	}
	if split == nil {
		return nil, fmt.Errorf("kiln: optimize: the manifest does not record the split; give the split fractions")
	}
	pre := s.Manifest.Preprocessing
	target, err := t.Lookup(pre.Options.Target, "target column")
	if err != nil {
		return nil, err
	}
	var strata []int
	if split.Stratify {
		// As core/train.Prepare numbers them.
		ids := map[string]int{}
		strata = make([]int, t.Rows())
		for i := range strata {
			var c string
			if target.Categorical {
				c = target.Str[i]
			} else {
				c = fmt.Sprint(target.Num[i])
			}
			k := fmt.Sprint(target.Missing(i), c)
			if _, ok := ids[k]; !ok {
				ids[k] = len(ids)
			}
			strata[i] = ids[k]
		}
	}
	tr, va, te, err := data.Split(t.Rows(), strata, *split, lin.Seed)
	if err != nil {
		return nil, err
	}
	if got := [3]int{len(tr), len(va), len(te)}; lin.SplitRows != [3]int{} && got != lin.SplitRows {
		return nil, fmt.Errorf("kiln: optimize: the split gives %v train/val/test rows, the model was trained on %v", got, lin.SplitRows)
	}
	enc := func(rows []int) (*data.Dataset, error) {
		if len(rows) == 0 {
			return nil, nil
		}
		x, err := pre.EncodeFeatures(t, rows)
		if err != nil {
			return nil, err
		}
		y, err := pre.EncodeTarget(t, rows)
		if err != nil {
			return nil, err
		}
		return data.NewDataset(x, pre.NumInputs(), y)
	}
	var sp Splits
	if sp.Train, err = enc(tr); err != nil {
		return nil, err
	}
	if sp.Val, err = enc(va); err != nil {
		return nil, err
	}
	if sp.Test, err = enc(te); err != nil {
		return nil, err
	}
	return &sp, nil
}
