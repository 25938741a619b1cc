// Package pipeline runs Kiln's automated model lifecycle from one YAML
// file: data (a file, a Flight dataset on another server or the serving
// process's own dataset store) → preprocessing → training one network or
// selecting among candidates → optimization (the smallest prune/quantize
// variant within an accuracy budget) → evaluation against the alias
// `production` → registration (lineage: the optimized variant's parent,
// the data fingerprint, the spec, the hyper-parameters, the optimization
// report, the evaluation) → promotion by compare-and-swap on PROMOTE.
//
// Each finished stage's output is checkpointed in the run directory
// (Options.RunsDir/RUN_ID), so that a run killed at any point resumes from
// its first unfinished stage (Resume); the whole run is recorded in the
// registry as a run of kind "pipeline", with one child run per stage
// attempt (kind "pipeline.STAGE", parameter pipeline_run).
//
// The package sits above core, arrowio and registry and below serving
// (layer 3c in docs/architecture.md).
package pipeline

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/optimize"
	"github.com/kilnml/kiln/core/train"
)

// Stages are the stages of a pipeline run, in order. Every run has all of
// them; a stage the file leaves out (optimize) is recorded as skipped.
var Stages = []string{StageData, StagePreprocess, StageTrain, StageOptimize, StageEvaluate, StageRegister, StagePromote}

// Stage names.
const (
	StageData       = "data"
	StagePreprocess = "preprocess"
	StageTrain      = "train"
	StageOptimize   = "optimize"
	StageEvaluate   = "evaluate"
	StageRegister   = "register"
	StagePromote    = "promote"
)

// DefaultAlias is the alias a pipeline evaluates against and moves.
const DefaultAlias = "production"

// Spec is a pipeline file:
//
//	name: digits                       # the registered model (required)
//	data:
//	  path: digits.csv                 # or flight: grpc://host:8815/NAME, or dataset: NAME
//	  target: digit                    # (required)
//	  features: [p0, p1]               # default: every column but the target
//	  holdout: 0.2                     # rows kept out of training for the evaluation
//	  stratify: true                   # stratify the holdout and the split on the target
//	  seed: 1
//	  split: {val: 0.15, test: 0.15}   # of the remaining rows, as kiln train's split
//	preprocess: {scale: standard, impute: mean}   # core/data Options (no target, features)
//	train: {epochs: 20, batch_size: 32, seed: 1, optimizer: {type: adam, lr: 0.01}}
//	select:
//	  candidates: [{name: small, layers: [...]}, ...]  # one: trained; several: selected
//	  search: {depth: [1], width: [32, 64]}            # and/or a grid (core/train SearchSpace)
//	  budget: {epochs: 10}
//	  rank: {metric: accuracy}
//	  concurrency: 1
//	optimize:                          # optional
//	  variants: [{quantize: int8}, {prune: 0.5, structured: true, finetune_epochs: 3}]
//	  max_accuracy_drop: 0.01          # (r2 for regression) vs the trained model
//	evaluate: {alias: production, min_margin: 0.0, alpha: 0.05, promote: true}
//	                                   # promote_alias: candidate → kiln serve rolls it out
//	register: {description: "..."}
//
// The train, select, preprocess and optimize variant sections are the
// core types of `kiln train`, `kiln select` and `kiln optimize`.
type Spec struct {
	Name       string        `json:"name"`
	Data       DataSpec      `json:"data"`
	Preprocess data.Options  `json:"preprocess"`
	Train      train.Config  `json:"train"`
	Select     SelectSpec    `json:"select"`
	Optimize   *OptimizeSpec `json:"optimize,omitempty"`
	Evaluate   EvaluateSpec  `json:"evaluate"`
	Register   RegisterSpec  `json:"register"`
}

// DataSpec is the data stage: where the table comes from, the target, the
// holdout kept for the evaluation and the split of the rest.
type DataSpec struct {
	// Path is a CSV, Arrow IPC or Parquet file (relative to the pipeline
	// file's directory); Flight a dataset on a Kiln Flight server,
	// grpc://HOST:PORT/NAME (grpc+tls:// for TLS); Dataset a dataset of
	// the serving process's own store. Exactly one is given.
	Path    string `json:"path,omitempty" yaml:"path"`
	Flight  string `json:"flight,omitempty" yaml:"flight"`
	Dataset string `json:"dataset,omitempty" yaml:"dataset"`
	// Target is the column to predict; Features the input columns (empty:
	// every other column).
	Target   string   `json:"target" yaml:"target"`
	Features []string `json:"features,omitempty" yaml:"features"`
	// Holdout is the fraction of rows kept out of training and scored by
	// the evaluation (default 0.2); Stratify keeps each class's share;
	// Seed seeds the holdout (default: train.seed).
	Holdout  float64 `json:"holdout" yaml:"holdout"`
	Stratify bool    `json:"stratify,omitempty" yaml:"stratify"`
	Seed     *uint64 `json:"seed,omitempty" yaml:"seed"`
	// Split divides the remaining rows into train, validation and test
	// (default val 0.15, test 0.15; stratified with Stratify).
	Split *data.SplitOptions `json:"split,omitempty" yaml:"-"`
}

// SelectSpec is the train stage's networks: one candidate is trained,
// several (or a search grid) are trained and ranked by core/train.Select.
type SelectSpec struct {
	Candidates  []nn.Spec          `json:"candidates,omitempty"`
	Search      *train.SearchSpace `json:"search,omitempty"`
	Budget      train.Budget       `json:"budget,omitempty"`
	Rank        train.Ranking      `json:"rank,omitempty"`
	Concurrency int                `json:"concurrency,omitempty"`
}

// OptimizeSpec is the optimize stage: each variant is a core/optimize run
// of the trained model; the one with the smallest model.pt whose test
// metric is at most MaxAccuracyDrop below the trained model's is kept (the
// trained model itself when none is).
type OptimizeSpec struct {
	Variants        []optimize.Options `json:"variants"`
	MaxAccuracyDrop float64            `json:"max_accuracy_drop"`
}

// EvaluateSpec is the evaluate and promote stages: the candidate against
// the version Alias names (core/evaluate's gate; the first model of a
// name, with no such version yet, is promoted without a comparison), and
// whether a PROMOTE moves Alias (or PromoteAlias).
type EvaluateSpec struct {
	Alias   string `json:"alias,omitempty" yaml:"alias"`
	Promote *bool  `json:"promote,omitempty" yaml:"promote"`
	// PromoteAlias, when set, is the alias a PROMOTE moves instead of
	// Alias: "candidate" hands the version to `kiln serve`'s rollouts
	// (canary steps judged on live traffic, automatic rollback, the
	// promotion of Alias when every step passes). The first model of a
	// name, with no version at Alias, still moves Alias.
	PromoteAlias    string  `json:"promote_alias,omitempty" yaml:"promote_alias"`
	Metric          string  `json:"metric,omitempty" yaml:"metric"`
	MinMargin       float64 `json:"min_margin,omitempty" yaml:"min_margin"`
	Alpha           float64 `json:"alpha,omitempty" yaml:"alpha"`
	Bootstrap       int     `json:"bootstrap,omitempty" yaml:"bootstrap"`
	Seed            uint64  `json:"seed,omitempty" yaml:"seed"`
	MaxLatencyRatio float64 `json:"max_latency_ratio,omitempty" yaml:"max_latency_ratio"`
	MaxSizeRatio    float64 `json:"max_size_ratio,omitempty" yaml:"max_size_ratio"`
}

// RegisterSpec is the register stage.
type RegisterSpec struct {
	Description string `json:"description,omitempty" yaml:"description"`
}

// Promotes reports whether a PROMOTE verdict moves the alias (default
// true).
func (e EvaluateSpec) Promotes() bool { return e.Promote == nil || *e.Promote }

// HoldoutSeed is the holdout's seed: data.seed, else train.seed.
func (s *Spec) HoldoutSeed() uint64 {
	if s.Data.Seed != nil {
		return *s.Data.Seed
	}
	return s.Train.Seed
}

// Source says where the data comes from, in words (a path, a URL or
// dataset:NAME).
func (d DataSpec) Source() string {
	switch {
	case d.Path != "":
		return d.Path
	case d.Flight != "":
		return d.Flight
	default:
		return "dataset:" + d.Dataset
	}
}

// SpecError is a pipeline file that cannot run: Line (0: unknown) and
// Field (e.g. "data.target") say where.
type SpecError struct {
	Line  int
	Field string
	Msg   string
}

func (e *SpecError) Error() string {
	var b strings.Builder
	b.WriteString("kiln: pipeline: ")
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// ErrorCode makes a SpecError InvalidArgument.
func (e *SpecError) ErrorCode() core.Code { return core.InvalidArgument }

func specErr(n *yaml.Node, field, format string, args ...any) error {
	line := 0
	if n != nil {
		line = n.Line
	}
	return &SpecError{Line: line, Field: field, Msg: fmt.Sprintf(format, args...)}
}

// topKeys are the keys of a pipeline file: name and the stages' sections.
var topKeys = []string{"name", "data", "preprocess", "train", "select", "optimize", "evaluate", "register"}

// maxSpecBytes bounds a pipeline file.
const maxSpecBytes = 1 << 20

// Parse reads a pipeline file strictly: an unknown key or stage, a value
// of the wrong type, a missing required field or an invalid value is a
// *SpecError (InvalidArgument) naming the line and the field. Parse
// checks the file alone; Check also checks the data's columns.
func Parse(b []byte) (s *Spec, err error) {
	defer func() {
		if p := recover(); p != nil {
			s, err = nil, &SpecError{Msg: fmt.Sprintf("cannot be read: %v", p)}
		}
	}()
	if len(b) > maxSpecBytes {
		return nil, &SpecError{Msg: fmt.Sprintf("the file has %d bytes; the limit is %d", len(b), maxSpecBytes)}
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &SpecError{Msg: "empty file"}
		}
		return nil, &SpecError{Msg: "not YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, specErr(&extra, "", "a second YAML document: a pipeline file holds one")
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, &SpecError{Msg: "empty file"}
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, specErr(root, "", "want a mapping of name and stages (%s)", strings.Join(topKeys, ", "))
	}
	sections, err := mapping(root, "", topKeys, "stage")
	if err != nil {
		return nil, err
	}
	s = &Spec{}
	if n := sections["name"]; n != nil {
		if err := scalar(n, "name", &s.Name); err != nil {
			return nil, err
		}
	}
	if err := s.parseData(root, sections["data"]); err != nil {
		return nil, err
	}
	if n := sections["preprocess"]; n != nil {
		if err := decodeCore(n, "preprocess", &s.Preprocess); err != nil {
			return nil, err
		}
		if s.Preprocess.Target != "" || len(s.Preprocess.Features) > 0 {
			return nil, specErr(n, "preprocess", "give the target and the features in the data section (data.target, data.features)")
		}
	}
	if n := sections["train"]; n != nil {
		if err := decodeCore(n, "train", &s.Train); err != nil {
			return nil, err
		}
	}
	if n := sections["select"]; n != nil {
		if err := decodeCore(n, "select", &s.Select); err != nil {
			return nil, err
		}
	}
	if n := sections["optimize"]; n != nil {
		s.Optimize = &OptimizeSpec{}
		if err := decodeCore(n, "optimize", s.Optimize); err != nil {
			return nil, err
		}
	}
	if n := sections["evaluate"]; n != nil {
		if err := decodeOwn(n, "evaluate", &s.Evaluate); err != nil {
			return nil, err
		}
	}
	if n := sections["register"]; n != nil {
		if err := decodeOwn(n, "register", &s.Register); err != nil {
			return nil, err
		}
	}
	if err := s.validate(root, sections); err != nil {
		return nil, err
	}
	return s, nil
}

// mapping checks that n is a mapping whose keys are all in allowed (each
// once) and returns the values by key.
func mapping(n *yaml.Node, field string, allowed []string, what string) (map[string]*yaml.Node, error) {
	if n.Kind != yaml.MappingNode {
		return nil, specErr(n, field, "want a mapping (keys %s)", strings.Join(allowed, ", "))
	}
	out := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return nil, specErr(k, field, "a key must be a string")
		}
		if !slices.Contains(allowed, k.Value) {
			where := field
			if where == "" {
				return nil, specErr(k, "", "unknown %s %q (the %ss are %s)", what, k.Value, what, strings.Join(allowed, ", "))
			}
			return nil, specErr(k, where, "unknown key %q (want %s)", k.Value, strings.Join(allowed, ", "))
		}
		if _, dup := out[k.Value]; dup {
			return nil, specErr(k, join(field, k.Value), "given twice")
		}
		out[k.Value] = v
	}
	return out, nil
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

func scalar(n *yaml.Node, field string, v any) error {
	if n.Kind != yaml.ScalarNode {
		return specErr(n, field, "want a single value")
	}
	if err := n.Decode(v); err != nil {
		return specErr(n, field, "%s", cleanYAML(err))
	}
	return nil
}

func cleanYAML(err error) string {
	s := err.Error()
	s = strings.TrimPrefix(s, "yaml: unmarshal errors:\n")
	s = strings.TrimSpace(s)
	if i := strings.Index(s, ": "); strings.HasPrefix(s, "line ") && i > 0 {
		s = s[i+2:]
	}
	return s
}

// decodeOwn decodes a section of this package's own types (yaml tags),
// refusing unknown keys with their line.
func decodeOwn(n *yaml.Node, field string, v any) error {
	var allowed []string
	switch v.(type) {
	case *EvaluateSpec:
		allowed = []string{"alias", "promote", "promote_alias", "metric", "min_margin", "alpha", "bootstrap", "seed", "max_latency_ratio", "max_size_ratio"}
	case *RegisterSpec:
		allowed = []string{"description"}
	}
	vals, err := mapping(n, field, allowed, "key")
	if err != nil {
		return err
	}
	for k, vn := range vals {
		if vn.Kind != yaml.ScalarNode {
			return specErr(vn, join(field, k), "want a single value")
		}
	}
	if err := n.Decode(v); err != nil {
		return specErr(n, field, "%s", cleanYAML(err))
	}
	return nil
}

// decodeCore decodes a section whose type is one of core's (JSON field
// names, decoded strictly as kiln train decodes its spec): the error names
// the section's line.
func decodeCore(n *yaml.Node, field string, v any) error {
	if n.Kind != yaml.MappingNode {
		return specErr(n, field, "want a mapping")
	}
	blockStyle(n) // a flow mapping would render as {...}, which nn.Decode reads as JSON
	b, err := yaml.Marshal(n)
	if err != nil {
		return specErr(n, field, "%v", err)
	}
	if err := nn.Decode(b, v); err != nil {
		msg := strings.TrimPrefix(err.Error(), "json: ")
		// Point at the key's own line when the error names one.
		if k := unknownField(msg); k != "" {
			if kn := findKey(n, k); kn != nil {
				return specErr(kn, field, "unknown key %q", k)
			}
		}
		return specErr(n, field, "%s", msg)
	}
	return nil
}

// blockStyle renders n and what it holds in YAML's block style.
func blockStyle(n *yaml.Node) {
	if n.Kind == yaml.MappingNode || n.Kind == yaml.SequenceNode {
		n.Style &^= yaml.FlowStyle
	}
	for _, c := range n.Content {
		blockStyle(c)
	}
}

// unknownField returns the key encoding/json's "unknown field" error names.
func unknownField(msg string) string {
	const p = `unknown field "`
	i := strings.Index(msg, p)
	if i < 0 {
		return ""
	}
	rest := msg[i+len(p):]
	if j := strings.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return ""
}

// findKey finds the first mapping key named k under n, depth first.
func findKey(n *yaml.Node, k string) *yaml.Node {
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == k {
				return n.Content[i]
			}
		}
	}
	for _, c := range n.Content {
		if f := findKey(c, k); f != nil {
			return f
		}
	}
	return nil
}

var dataKeys = []string{"path", "flight", "dataset", "target", "features", "holdout", "stratify", "seed", "split"}

func (s *Spec) parseData(root, n *yaml.Node) error {
	if n == nil {
		return specErr(root, "data", "missing: the data stage needs a source (path, flight or dataset) and a target")
	}
	vals, err := mapping(n, "data", dataKeys, "key")
	if err != nil {
		return err
	}
	d := &s.Data
	d.Holdout = -1
	for _, k := range []string{"path", "flight", "dataset", "target"} {
		if v := vals[k]; v != nil {
			var str string
			if err := scalar(v, "data."+k, &str); err != nil {
				return err
			}
			switch k {
			case "path":
				d.Path = str
			case "flight":
				d.Flight = str
			case "dataset":
				d.Dataset = str
			case "target":
				d.Target = str
			}
		}
	}
	if v := vals["features"]; v != nil {
		if v.Kind != yaml.SequenceNode {
			return specErr(v, "data.features", "want a list of column names")
		}
		if err := v.Decode(&d.Features); err != nil {
			return specErr(v, "data.features", "%s", cleanYAML(err))
		}
	}
	if v := vals["holdout"]; v != nil {
		if err := scalar(v, "data.holdout", &d.Holdout); err != nil {
			return err
		}
		if !(d.Holdout > 0 && d.Holdout < 1) {
			return specErr(v, "data.holdout", "%v: want a fraction in (0, 1)", d.Holdout)
		}
	}
	if v := vals["stratify"]; v != nil {
		if err := scalar(v, "data.stratify", &d.Stratify); err != nil {
			return err
		}
	}
	if v := vals["seed"]; v != nil {
		var seed uint64
		if err := scalar(v, "data.seed", &seed); err != nil {
			return err
		}
		d.Seed = &seed
	}
	if v := vals["split"]; v != nil {
		d.Split = &data.SplitOptions{}
		if err := decodeCore(v, "data.split", d.Split); err != nil {
			return err
		}
	}
	n0 := 0
	for _, src := range []string{d.Path, d.Flight, d.Dataset} {
		if src != "" {
			n0++
		}
	}
	switch {
	case n0 == 0:
		return specErr(n, "data", "no source: give path (a CSV, Arrow or Parquet file), flight (grpc://HOST:PORT/NAME) or dataset (NAME in the server's store)")
	case n0 > 1:
		return specErr(n, "data", "give one source: path, flight or dataset")
	}
	if d.Flight != "" {
		if _, _, err := ParseFlightURL(d.Flight); err != nil {
			return specErr(vals["flight"], "data.flight", "%v", err)
		}
	}
	if d.Target == "" {
		return specErr(n, "data.target", "missing: name the column to predict")
	}
	if d.Holdout < 0 {
		d.Holdout = 0.2
	}
	return nil
}

// ParseFlightURL splits grpc://HOST:PORT/NAME (or grpc+tls://) into the
// address, with the scheme, and the dataset name.
func ParseFlightURL(s string) (addr, name string, err error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", "", fmt.Errorf("%q: %v", s, err)
	}
	if u.Scheme != "grpc" && u.Scheme != "grpc+tcp" && u.Scheme != "grpc+tls" {
		return "", "", fmt.Errorf("%q: want grpc://HOST:PORT/NAME or grpc+tls://HOST:PORT/NAME", s)
	}
	name = strings.TrimPrefix(u.Path, "/")
	if u.Host == "" || u.Port() == "" || name == "" || strings.Contains(name, "/") {
		return "", "", fmt.Errorf("%q: want grpc://HOST:PORT/NAME (a host, a port and one dataset name)", s)
	}
	return u.Scheme + "://" + u.Host, name, nil
}

// validate checks what the sections say together and fills defaults.
func (s *Spec) validate(root *yaml.Node, sections map[string]*yaml.Node) error {
	if s.Name == "" {
		return specErr(root, "name", "missing: name the registered model the pipeline trains")
	}
	if err := modelName(s.Name); err != nil {
		return specErr(sections["name"], "name", "%v", err)
	}
	if sn := sections["select"]; sn == nil || (len(s.Select.Candidates) == 0 && s.Select.Search == nil) {
		at := sn
		if at == nil {
			at = root
		}
		return specErr(at, "select.candidates", "missing: give at least one network spec (one is trained, several are selected among)")
	}
	for i, c := range s.Select.Candidates {
		if len(c.Layers) == 0 {
			return specErr(sections["select"], fmt.Sprintf("select.candidates[%d]", i), "no layers")
		}
		if err := c.CheckLayers(); err != nil {
			return specErr(sections["select"], fmt.Sprintf("select.candidates[%d]", i), "%v", err)
		}
	}
	if err := s.Train.Validate(); err != nil {
		return specErr(sections["train"], "train", "%v", err)
	}
	if s.Data.Split == nil {
		s.Data.Split = &data.SplitOptions{Val: 0.15, Test: 0.15, Stratify: s.Data.Stratify}
	}
	if sp := s.Data.Split; sp.Val <= 0 && len(s.Select.Candidates) != 1 {
		return specErr(sections["data"], "data.split.val", "selecting among candidates needs a validation split (val > 0)")
	}
	if o := s.Optimize; o != nil {
		if len(o.Variants) == 0 {
			return specErr(sections["optimize"], "optimize.variants", "missing: give at least one variant ({quantize: int8}, {prune: 0.5}, ...)")
		}
		for i, v := range o.Variants {
			if v.Prune == 0 && v.Quantize == "" {
				return specErr(sections["optimize"], fmt.Sprintf("optimize.variants[%d]", i), "does nothing: give prune and/or quantize")
			}
			if v.Prune < 0 || v.Prune >= 1 {
				return specErr(sections["optimize"], fmt.Sprintf("optimize.variants[%d].prune", i), "%v: want a fraction in [0, 1)", v.Prune)
			}
			switch v.Quantize {
			case "", optimize.Int8, optimize.FP16, optimize.BF16:
			default:
				return specErr(sections["optimize"], fmt.Sprintf("optimize.variants[%d].quantize", i), "%q: want int8, fp16 or bf16", v.Quantize)
			}
		}
		if o.MaxAccuracyDrop < 0 || math.IsNaN(o.MaxAccuracyDrop) {
			return specErr(sections["optimize"], "optimize.max_accuracy_drop", "%v: want ≥ 0", o.MaxAccuracyDrop)
		}
	}
	e := &s.Evaluate
	if e.Alias == "" {
		e.Alias = DefaultAlias
	}
	if !aliasRE.MatchString(e.Alias) || e.Alias == "latest" {
		return specErr(sections["evaluate"], "evaluate.alias", "%q: want a lower-case letter, then lower-case letters, digits, '_' or '-' (not \"latest\")", e.Alias)
	}
	if e.PromoteAlias != "" && (!aliasRE.MatchString(e.PromoteAlias) || e.PromoteAlias == "latest" || e.PromoteAlias == e.Alias) {
		return specErr(sections["evaluate"], "evaluate.promote_alias", "%q: want an alias other than evaluate.alias (e.g. candidate), lower-case letters, digits, '_' or '-'", e.PromoteAlias)
	}
	if e.MinMargin < 0 || (e.Alpha != 0 && !(e.Alpha > 0 && e.Alpha < 1)) || e.Bootstrap < 0 || e.MaxLatencyRatio < 0 || e.MaxSizeRatio < 0 {
		return specErr(sections["evaluate"], "evaluate", "min_margin, bootstrap and the ratios must be ≥ 0 and alpha in (0, 1)")
	}
	return nil
}

var aliasRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,63}$`)

// modelName checks a registered model's name as the registry does (letters,
// digits, '.', '_', '-', starting with a letter or digit, at most 128).
func modelName(name string) error {
	if len(name) > 128 {
		return fmt.Errorf("%q: at most 128 characters", name)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || (i > 0 && (r == '.' || r == '_' || r == '-'))
		if !ok {
			return fmt.Errorf("%q: want letters, digits, '.', '_' or '-', starting with a letter or digit", name)
		}
	}
	return nil
}

// JSON returns the spec as indented JSON (what a run records).
func (s *Spec) JSON() []byte {
	b, _ := json.MarshalIndent(s, "", "  ")
	return b
}
