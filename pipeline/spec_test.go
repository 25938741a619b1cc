package pipeline

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
)

const goodSpec = `name: digits
data:
  path: digits.csv
  target: digit
  holdout: 0.25
  stratify: true
  seed: 3
train: {epochs: 2, batch_size: 32, seed: 1, optimizer: {type: adam, lr: 0.01}}
select:
  candidates:
    - {name: small, layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]}
    - {name: wide, layers: [{type: linear, out: 64}, {type: relu}, {type: linear}]}
optimize:
  variants: [{quantize: int8}]
  max_accuracy_drop: 0.02
evaluate: {min_margin: 0.01}
`

func TestParseGood(t *testing.T) {
	s, err := Parse([]byte(goodSpec))
	require.NoError(t, err)
	assert.Equal(t, "digits", s.Name)
	assert.Equal(t, "digit", s.Data.Target)
	assert.Equal(t, 0.25, s.Data.Holdout)
	assert.Equal(t, uint64(3), s.HoldoutSeed())
	assert.Equal(t, 0.15, s.Data.Split.Val, "default split")
	assert.True(t, s.Data.Split.Stratify)
	assert.Len(t, s.Select.Candidates, 2)
	assert.Equal(t, "wide", s.Select.Candidates[1].Name)
	assert.Equal(t, 2, s.Train.Epochs)
	require.NotNil(t, s.Optimize)
	assert.Equal(t, "int8", s.Optimize.Variants[0].Quantize)
	assert.Equal(t, DefaultAlias, s.Evaluate.Alias)
	assert.True(t, s.Evaluate.Promotes())
	assert.Equal(t, 0.01, s.Evaluate.MinMargin)
}

// TestParseErrors: every bad file is InvalidArgument, naming the line and
// the field at fault, before any work.
func TestParseErrors(t *testing.T) {
	for _, c := range []struct{ name, file, want string }{
		{"empty", "", "empty file"},
		{"not yaml", "name: [", "not YAML"},
		{"list", "- a\n- b\n", "line 1: want a mapping of name and stages"},
		{"unknown stage", goodSpec + "deploy: {to: prod}\n", `line 17: unknown stage "deploy" (the stages are name, data, preprocess, train, select, optimize, evaluate, register)`},
		{"missing name", strings.Replace(goodSpec, "name: digits\n", "", 1), "name: missing"},
		{"bad name", strings.Replace(goodSpec, "name: digits", "name: ../x", 1), `line 1: name: "../x"`},
		{"missing data", strings.Replace(goodSpec, "data:\n  path: digits.csv\n  target: digit\n  holdout: 0.25\n  stratify: true\n  seed: 3\n", "", 1), "data: missing"},
		{"missing target", strings.Replace(goodSpec, "  target: digit\n", "", 1), "line 3: data.target: missing"},
		{"no source", strings.Replace(goodSpec, "  path: digits.csv\n", "", 1), "line 3: data: no source"},
		{"two sources", strings.Replace(goodSpec, "  path: digits.csv\n", "  path: digits.csv\n  dataset: digits\n", 1), "data: give one source"},
		{"bad flight", strings.Replace(goodSpec, "  path: digits.csv\n", "  flight: http://x/y\n", 1), "line 3: data.flight"},
		{"unknown data key", strings.Replace(goodSpec, "  seed: 3\n", "  seed: 3\n  shuffle: true\n", 1), `line 8: data: unknown key "shuffle"`},
		{"bad holdout", strings.Replace(goodSpec, "holdout: 0.25", "holdout: 1.5", 1), "line 5: data.holdout: 1.5: want a fraction in (0, 1)"},
		{"holdout type", strings.Replace(goodSpec, "holdout: 0.25", "holdout: [1]", 1), "line 5: data.holdout: want a single value"},
		{"unknown train key", strings.Replace(goodSpec, "batch_size: 32", "batch_size: 32, epoch: 3", 1), `line 8: train: unknown key "epoch"`},
		{"bad train value", strings.Replace(goodSpec, "epochs: 2", "epochs: -2", 1), "line 8: train:"},
		{"missing candidates", strings.Replace(goodSpec, "select:\n", "other:\n", 1), `unknown stage "other"`},
		{"no candidates", strings.Replace(strings.Replace(goodSpec, "    - {name: small, layers: [{type: linear, out: 16}, {type: relu}, {type: linear}]}\n", "", 1),
			"    - {name: wide, layers: [{type: linear, out: 64}, {type: relu}, {type: linear}]}\n", "", 1), "line 10: select.candidates: missing"},
		{"unknown layer", strings.Replace(goodSpec, "{type: relu}, {type: linear}]}\n    - {name: wide", "{type: rellu}, {type: linear}]}\n    - {name: wide", 1), "select.candidates[0]"},
		{"unknown candidate key", strings.Replace(goodSpec, "{name: small,", "{name: small, widht: 3,", 1), `line 11: select: unknown key "widht"`},
		{"optimize nothing", strings.Replace(goodSpec, "{quantize: int8}", "{engine: qnnpack}", 1), "optimize.variants[0]: does nothing"},
		{"optimize bad quantize", strings.Replace(goodSpec, "{quantize: int8}", "{quantize: int4}", 1), `optimize.variants[0].quantize: "int4"`},
		{"unknown evaluate key", strings.Replace(goodSpec, "min_margin: 0.01", "min_margin: 0.01, margin: 1", 1), `line 16: evaluate: unknown key "margin"`},
		{"bad alpha", strings.Replace(goodSpec, "min_margin: 0.01", "alpha: 2", 1), "evaluate: min_margin"},
		{"promote_alias is alias", strings.Replace(goodSpec, "min_margin: 0.01", "min_margin: 0.01, promote_alias: production", 1), "evaluate.promote_alias: \"production\""},
		{"two documents", goodSpec + "---\nname: x\n", "a second YAML document"},
		{"duplicate key", goodSpec + "name: again\n", "line 17: name: given twice"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse([]byte(c.file))
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
			assert.True(t, core.HasCode(err, core.InvalidArgument), "%v", err)
		})
	}
}

// FuzzParse: Parse never panics, and what it accepts it accepts again
// from its own JSON rendering's fields (a spec it returns is valid).
func FuzzParse(f *testing.F) {
	f.Add([]byte(goodSpec))
	f.Add([]byte("name: x\ndata: {path: a.csv, target: y}\nselect: {candidates: [{layers: [{type: linear}]}]}\n"))
	f.Add([]byte("name: x\ndata: {flight: 'grpc://h:1/d', target: y, holdout: 0.5}\nselect: {search: {depth: [1], width: [4]}}\n"))
	f.Add([]byte("{}"))
	f.Add([]byte("name: &a x\nother: *a\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := Parse(b)
		if err != nil {
			if !core.HasCode(err, core.InvalidArgument) {
				t.Fatalf("error without InvalidArgument: %v", err)
			}
			return
		}
		if s.Name == "" || s.Data.Target == "" || s.Data.Split == nil || s.Evaluate.Alias == "" {
			t.Fatalf("accepted an incomplete spec: %+v", s)
		}
		if !(s.Data.Holdout > 0 && s.Data.Holdout < 1) {
			t.Fatalf("accepted holdout %v", s.Data.Holdout)
		}
	})
}
