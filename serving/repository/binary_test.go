package repository

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/modelpkg"
)

// A binary classifier's package (one output, two labels) installs with its
// labels and what its output is, so that classification answers labels.
func TestPackageConfigBinary(t *testing.T) {
	man := &modelpkg.Manifest{
		Inputs:  []modelpkg.TensorInfo{{Name: "x", DType: "float32", Shape: []int64{-1, 30}}},
		Outputs: []modelpkg.TensorInfo{{Name: "y", DType: "float32", Shape: []int64{-1, 1}, Meaning: "probability of labels[1] (a sigmoid's output)"}},
		Labels:  []string{"0", "1"},
	}
	cfg, labels, err := PackageConfig("bc", man, 0)
	require.NoError(t, err)
	assert.Equal(t, []string{"0", "1"}, labels)
	assert.Equal(t, "labels.txt", cfg.Outputs[0].Labels)
	assert.Equal(t, "probability", cfg.Outputs[0].Binary)

	man.Outputs[0].Meaning = "logit of labels[1] (sigmoid for its probability)"
	cfg, _, err = PackageConfig("bc", man, 0)
	require.NoError(t, err)
	assert.Equal(t, "logit", cfg.Outputs[0].Binary)

	man.Labels = nil // a regressor: no labels, no binary
	cfg, labels, err = PackageConfig("r", man, 0)
	require.NoError(t, err)
	assert.Nil(t, labels)
	assert.Empty(t, cfg.Outputs[0].Binary)
}
