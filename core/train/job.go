package train

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native/trainer"
)

// Job is a complete training run, as a `kiln train` spec file declares it
// (JSON or YAML):
//
//	model: {layers: [...], input_shape: [...]}   # core/nn Spec
//	data:  {target: label, impute: mean, scale: standard, ...}
//	split: {val: 0.15, test: 0.15, stratify: true}
//	train: {epochs: 30, batch_size: 32, seed: 1, optimizer: {type: adam, lr: 0.001}, ...}
//
// The last linear layer may leave out `out`: it becomes the number of
// classes (cross_entropy) or 1.
//
// Instead of model layers, init names a TorchScript model to fine-tune
// (see InitModel, and Config's freeze and param_groups).
type Job struct {
	Model nn.Spec           `json:"model"`
	Init  *InitModel        `json:"init,omitempty"`
	Data  data.Options      `json:"data"`
	Split data.SplitOptions `json:"split"`
	Train Config            `json:"train"`
}

// ParseJob reads a Job from JSON or YAML.
func ParseJob(b []byte) (Job, error) {
	var j Job
	if err := nn.Decode(b, &j); err != nil {
		return Job{}, fmt.Errorf("kiln: training spec: %w", err)
	}
	return j, nil
}

// withDefaults fills what the job leaves out, given the task.
func (j Job) withDefaults(p *data.Preprocessor) Job {
	j.Train = j.Train.withDefaults(p.Task)
	t := &j.Train
	j.Model = autoOut(j.Model, p, t.Loss.Type)
	return j
}

// withDefaults fills the hyper-parameters c leaves out: 20 epochs, batches
// of 32, Adam at lr 1e-3, and the task's loss (cross_entropy for
// classification, mse otherwise).
func (c Config) withDefaults(task data.Task) Config {
	if c.Epochs == 0 {
		c.Epochs = 20
	}
	if c.BatchSize == 0 {
		c.BatchSize = 32
	}
	if c.Loss.Type == "" {
		c.Loss.Type = "mse"
		if task == data.Classification {
			c.Loss.Type = "cross_entropy"
		}
	}
	if c.Optimizer.Type == "" {
		c.Optimizer.Type = "adam"
	}
	if c.Optimizer.LR == 0 {
		c.Optimizer.LR = 1e-3
	}
	return c
}

// autoOut gives the last linear layer, when it leaves out `out`, one
// output per class (cross_entropy) or a single one.
func autoOut(s nn.Spec, p *data.Preprocessor, loss string) nn.Spec {
	layers := append([]nn.Layer(nil), s.Layers...)
	for i := len(layers) - 1; i >= 0; i-- {
		if norm(layers[i].Type) == "linear" {
			if layers[i].Out == 0 {
				layers[i].Out = 1
				if lk, _ := lossKind(loss); headOf(lk) == multiclass {
					layers[i].Out = int64(len(p.Labels))
				}
			}
			break
		}
	}
	s.Layers = layers
	return s
}

// Prepared is a job's data after splitting and preprocessing.
type Prepared struct {
	Job Job
	// TrainModel is the network Build builds: Job.Model, or for a fused
	// loss (binary_crossentropy, ...) Job.Model without its final
	// activation (see TrainSpec).
	TrainModel       nn.Spec
	Pre              *data.Preprocessor
	Train, Val, Test *data.Dataset
	Table            *data.Table
}

// Prepare splits t (seeded by the job's seed, stratified on the target
// when asked), fits preprocessing on the training rows and encodes the
// three splits.
func Prepare(j Job, t *data.Table) (*Prepared, error) {
	if t.Rows() == 0 {
		return nil, fmt.Errorf("kiln: the data set is empty (no rows)")
	}
	if j.Data.Target == "" {
		return nil, fmt.Errorf("kiln: no target column given")
	}
	target, err := t.Lookup(j.Data.Target, "target column")
	if err != nil {
		return nil, err
	}
	var strata []int
	if j.Split.Stratify {
		ids := map[string]int{}
		strata = make([]int, t.Rows())
		for i := range strata {
			k := fmt.Sprint(target.Missing(i), cell(target, i))
			if _, ok := ids[k]; !ok {
				ids[k] = len(ids)
			}
			strata[i] = ids[k]
		}
	}
	tr, va, te, err := data.Split(t.Rows(), strata, j.Split, j.Train.Seed)
	if err != nil {
		return nil, err
	}
	pre, err := data.Fit(t, tr, j.Data)
	if err != nil {
		return nil, err
	}
	p := &Prepared{Job: j.withDefaults(pre), Pre: pre, Table: t}
	if p.TrainModel, err = TrainSpec(p.Job.Model, p.Job.Train.Loss.Type); err != nil {
		return nil, err
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
	if p.Train, err = enc(tr); err != nil {
		return nil, err
	}
	if p.Val, err = enc(va); err != nil {
		return nil, err
	}
	if p.Test, err = enc(te); err != nil {
		return nil, err
	}
	return p, nil
}

func cell(c *data.Column, i int) string {
	if c.Categorical {
		return c.Str[i]
	}
	return fmt.Sprint(c.Num[i])
}

// Build builds the job's network behind its preprocessing, seeded by the
// job's seed.
func (p *Prepared) Build() (*nn.Net, error) {
	return nn.BuildWithPrelude(p.TrainModel, p.Pre.Prelude(), p.Job.Train.Seed)
}

// Report is the outcome of Run.
type Report struct {
	Result *Result `json:"result"`
	// Val and Test are the final network's metrics on those splits.
	Val  Metrics `json:"val,omitempty"`
	Test Metrics `json:"test,omitempty"`
	// Dir is the model package written, if any.
	Dir string `json:"dir,omitempty"`
}

// Run prepares the data, builds and trains the network, evaluates it on
// the validation and test splits, and, when out is not empty, saves a
// model package there (see SavePackage).
func Run(ctx context.Context, j Job, t *data.Table, source, out string, onEvent func(Event)) (*Report, error) {
	if j.Init != nil {
		return runInit(ctx, j, t, source, out, onEvent)
	}
	p, err := Prepare(j, t)
	if err != nil {
		return nil, err
	}
	net, err := p.Build()
	if err != nil {
		return nil, err
	}
	defer net.Close()
	return fitAndSave(ctx, net, p, source, out, onEvent)
}

// fitAndSave trains net on p's splits, evaluates it and saves the package
// (when out is not empty): the rest of Run once the network exists.
func fitAndSave(ctx context.Context, net *nn.Net, p *Prepared, source, out string, onEvent func(Event)) (*Report, error) {
	cfg := p.Job.Train
	if cfg.ModelCheckpoint != nil {
		cfg.saveModel = func(path string, res *Result) error {
			return SavePackage(path, net, p, &Report{Result: res}, source)
		}
	}
	res, err := Fit(ctx, net, p.Train, p.Val, cfg, onEvent)
	if err != nil {
		return nil, err
	}
	rep := &Report{Result: res}
	if p.Val != nil {
		if rep.Val, err = Evaluate(net, p.Val, p.Job.Train); err != nil {
			return nil, err
		}
	}
	if p.Test != nil {
		if rep.Test, err = Evaluate(net, p.Test, p.Job.Train); err != nil {
			return nil, err
		}
	}
	if out != "" {
		if err := SavePackage(out, net, p, rep, source); err != nil {
			return nil, err
		}
		rep.Dir = out
	}
	return rep, nil
}

func rows(d *data.Dataset) int {
	if d == nil {
		return 0
	}
	return d.Len()
}

// SavePackage writes a Kiln model package into dir with modelpkg.Write:
// model.pt, the trained network as TorchScript with the preprocessing at
// the start of forward (raw feature columns in, outputs out; torch.jit.load
// reads it and modelpkg.Load serves it), and manifest.json (see
// modelpkg.Manifest), each written to a temporary name and renamed into
// place.
func SavePackage(dir string, net *nn.Net, p *Prepared, rep *Report, source string) error {
	if err := net.SetTraining(false); err != nil {
		return err
	}
	loss := p.Job.Train.Loss.Type
	net, release, err := packagedNet(net, p.Job.Model, p.Pre.Prelude(), p.Job.Train.Seed, loss)
	if err != nil {
		return err
	}
	defer release()
	meaning := "prediction"
	lk, _ := lossKind(loss)
	switch headOf(lk) {
	case multiclass:
		meaning = "logits (class scores in labels order; softmax for probabilities)"
		if fusedActivation(loss) != "" {
			meaning = "probabilities (softmax over the classes, in labels order)"
		}
	case binary:
		meaning = "logit of labels[1] (sigmoid for its probability)"
		if fusedActivation(loss) != "" {
			meaning = "probability of labels[1] (a sigmoid's output)"
		}
	}
	metrics := map[string]map[string]float64{}
	if rep.Val != nil {
		metrics["val"] = rep.Val
	}
	if rep.Test != nil {
		metrics["test"] = rep.Test
	}
	training, err := json.Marshal(rep.Result)
	if err != nil {
		return fmt.Errorf("kiln: save package: training result: %w", err)
	}
	hyper, err := json.Marshal(p.Job.Train)
	if err != nil {
		return fmt.Errorf("kiln: save package: hyperparameters: %w", err)
	}
	input := modelpkg.TensorInfo{Name: "x", DType: "float32", Shape: []int64{-1, net.Inputs}, Columns: p.Pre.Features}
	pre, name := p.Pre, p.Job.Model.Name
	if p.Job.Init != nil {
		// A fine-tuned TorchScript module takes the features as they are
		// (no preprocessing in its forward), shaped as it wants them.
		// Flat inputs keep the (identity: scale none) preprocessing record,
		// so that tools that encode raw columns with it still apply.
		if name == "" {
			name = strings.TrimSuffix(filepath.Base(p.Job.Init.Path), filepath.Ext(p.Job.Init.Path))
		}
		if len(net.InputShape) > 1 {
			input.Shape = append([]int64{-1}, net.InputShape...)
			input.Columns, pre = nil, nil
		}
	}
	m := modelpkg.Manifest{
		Format: modelpkg.Format, Name: name, Task: p.Pre.Task, Model: modelpkg.ModelFile,
		Inputs: []modelpkg.TensorInfo{input},
		Outputs: []modelpkg.TensorInfo{{Name: "y", DType: "float32", Shape: append([]int64{-1}, net.Outputs...),
			Meaning: meaning}},
		Labels: p.Pre.Labels, Metrics: metrics, Parameters: net.Params, Spec: p.Job.Model,
		Preprocessing: pre, Training: training,
		Lineage: modelpkg.Lineage{
			DataSHA256: p.Table.Fingerprint, DataSource: source, Rows: p.Table.Rows(),
			SplitRows: [3]int{rows(p.Train), rows(p.Val), rows(p.Test)}, Split: &p.Job.Split,
			Seed: p.Job.Train.Seed, Hyperparameters: hyper,
			Created: time.Now().UTC(), KilnVersion: core.Version, TorchVersion: core.TorchVersion(),
		},
	}
	if p.Job.Train.fineTunes() {
		// Frozen parameters were saved with requires_grad false; the
		// package's module is as trainable as the one given.
		if err := trainer.RequireGrad(net.Handle()); err != nil {
			return fmt.Errorf("kiln: save package: %w", err)
		}
	}
	if err := modelpkg.Write(dir, net.Module, m); err != nil {
		return fmt.Errorf("kiln: save package: %w", err)
	}
	return nil
}

// Hyperparameters decodes the training configuration that m's lineage
// records (SavePackage writes it; core/optimize fine-tunes with it).
func Hyperparameters(m *modelpkg.Manifest) (Config, error) {
	var c Config
	if err := json.Unmarshal(m.Lineage.Hyperparameters, &c); err != nil {
		return c, fmt.Errorf("kiln: manifest lineage: hyperparameters: %w", err)
	}
	return c, nil
}
