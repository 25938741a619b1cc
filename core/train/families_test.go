package train_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// kiln select compares real model families (MLP, residual CNN, small
// Transformer, LSTM) on the same data: examples/families/select.yaml.
func TestSelectComparesModelFamilies(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(testkit.Root(), "examples", "families", "select.yaml"))
	require.NoError(t, err)
	job, err := train.ParseSelectJob(b)
	require.NoError(t, err)
	job.Budget.Epochs = 2
	tb := loadCSV(t, "digits.csv")
	lb, err := train.Select(context.Background(), job, tb, "digits.csv", "", nil)
	require.NoError(t, err)
	require.Len(t, lb.Entries, 4)
	names := map[string]bool{}
	for _, e := range lb.Entries {
		assert.Empty(t, e.Err, e.Name)
		assert.Greater(t, e.Params, int64(0), e.Name)
		names[e.Name] = true
		t.Logf("%d %-12s acc %.4f params %6d latency %.3f ms", e.Rank, e.Name, e.Metric, e.Params, e.LatencyMs)
	}
	assert.Equal(t, map[string]bool{"mlp": true, "cnn": true, "transformer": true, "lstm": true}, names)
	assert.Greater(t, lb.Winner.Metric, 0.5)
}
