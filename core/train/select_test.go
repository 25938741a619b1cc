package train_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
)

func selectJob() train.SelectJob {
	return train.SelectJob{
		Data:   data.Options{Target: "diagnosis"},
		Split:  data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true},
		Train:  train.Config{BatchSize: 32, Seed: 1, Optimizer: train.Optimizer{Type: "adam"}},
		Search: &train.SearchSpace{Depth: []int{1, 2}, Width: []int64{4, 64}, LR: []float64{1e-3, 1e-2}},
		Budget: train.Budget{Epochs: 8},
		Candidates: []nn.Spec{
			{Name: "tiny", Layers: []nn.Layer{nn.Linear(0)}},
		},
		Concurrency: 2,
	}
}

func TestSelectRanksAndSavesTheWinner(t *testing.T) {
	tb := loadCSV(t, "breast_cancer.csv")
	out := filepath.Join(t.TempDir(), "winner")
	var mu sync.Mutex
	seen := map[string]bool{}
	lb, err := train.Select(context.Background(), selectJob(), tb, "breast_cancer.csv", out, func(name string, e train.Event) {
		mu.Lock()
		seen[name] = true
		mu.Unlock()
	})
	require.NoError(t, err)
	require.Len(t, lb.Entries, 9)
	assert.Len(t, seen, 9, "progress from every candidate")
	assert.Equal(t, "accuracy", lb.Metric)
	for i, e := range lb.Entries {
		assert.Empty(t, e.Err)
		assert.Equal(t, i+1, e.Rank)
		assert.Greater(t, e.Params, int64(0))
		assert.Greater(t, e.LatencyMs, 0.0)
		assert.Equal(t, 8, e.Epochs)
		assert.Equal(t, e.Metric, e.Val["accuracy"])
		if i > 0 {
			assert.GreaterOrEqual(t, lb.Entries[i-1].Score, e.Score)
		}
		t.Logf("%d %-28s acc %.4f params %5d latency %.3f ms score %.4f", e.Rank, e.Name, e.Metric, e.Params, e.LatencyMs, e.Score)
	}
	assert.Equal(t, lb.Entries[0].Name, lb.Winner.Name)
	assert.Greater(t, lb.Winner.Metric, 0.9)
	m, err := core.LoadModule(filepath.Join(out, "model.pt"))
	require.NoError(t, err)
	defer m.Close()
	assert.Equal(t, lb.Winner.Params, m.NumParameters())
}

func TestSelectCostTermAndTimeBudget(t *testing.T) {
	tb := loadCSV(t, "breast_cancer.csv")
	j := selectJob()
	j.Rank = train.Ranking{ParamsPenalty: 1000} // one parameter costs 0.001: size dominates
	j.Budget = train.Budget{Epochs: 50, Seconds: 1e-6}
	lb, err := train.Select(context.Background(), j, tb, "", "", nil)
	require.NoError(t, err)
	assert.Equal(t, "tiny", lb.Winner.Name, "the smallest network wins when size costs most")
	for _, e := range lb.Entries {
		assert.Equal(t, 1, e.Epochs, "%s: the time budget ends training after the first epoch", e.Name)
	}

	j = selectJob()
	j.Search, j.Candidates = nil, nil
	_, err = train.Select(context.Background(), j, tb, "", "", nil)
	assert.ErrorContains(t, err, "no candidates")
}
