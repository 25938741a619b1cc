package train_test

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/modelpkg"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
	"github.com/kilnml/kiln/internal/testkit"
)

// mixedCSV has numeric columns with gaps and a categorical one; the class
// depends on all three.
func mixedCSV(t *testing.T, n int) string {
	rng := rand.New(rand.NewPCG(11, 11))
	var b strings.Builder
	b.WriteString("size,weight,colour,kind\n")
	colours := []string{"red", "green", "blue"}
	for i := range n {
		s, w := rng.NormFloat64()*10+50, rng.NormFloat64()*3
		c := rng.IntN(3)
		score := (s-50)/10 + w/3
		if c == 2 {
			score += 1.5
		}
		kind := "small"
		if score > 0.5 {
			kind = "large"
		}
		ss, ws, cs := fmt.Sprint(s), fmt.Sprint(w), colours[c]
		switch i % 17 {
		case 3:
			ss = ""
		case 5:
			ws = "NA"
		case 7:
			cs = ""
		}
		fmt.Fprintf(&b, "%s,%s,%s,%s\n", ss, ws, cs, kind)
	}
	p := filepath.Join(t.TempDir(), "mixed.csv")
	require.NoError(t, os.WriteFile(p, []byte(b.String()), 0o644))
	return p
}

func TestPackagePredictsTheSameInPython(t *testing.T) {
	csv := mixedCSV(t, 600)
	tb, err := data.ReadCSVFile(csv)
	require.NoError(t, err)
	j := train.Job{
		Model: nn.Sequential(nn.Linear(16), nn.ReLU(), nn.Linear(0)),
		Data:  data.Options{Target: "kind", Impute: "mean"},
		Split: data.SplitOptions{Val: 0.2, Test: 0.2, Stratify: true},
		Train: train.Config{Epochs: 10, BatchSize: 32, Seed: 5, Optimizer: train.Optimizer{Type: "adam", LR: 0.01}},
	}
	out := filepath.Join(t.TempDir(), "pkg")
	rep, err := train.Run(context.Background(), j, tb, csv, out, nil)
	require.NoError(t, err)
	assert.Greater(t, rep.Test["accuracy"], 0.85)

	m, err := modelpkg.Read(out)
	require.NoError(t, err)
	assert.Equal(t, modelpkg.Format, m.Format)
	assert.Equal(t, data.Classification, m.Task)
	assert.Equal(t, []string{"large", "small"}, m.Labels)
	assert.Equal(t, []int64{-1, 3}, m.Inputs[0].Shape)
	assert.Equal(t, []int64{-1, 2}, m.Outputs[0].Shape)
	assert.Equal(t, []string{"blue", "green", "red"}, m.Inputs[0].Columns[2].Categories)
	assert.Equal(t, rep.Test["accuracy"], m.Metrics["test"]["accuracy"])
	file, _ := os.ReadFile(csv)
	sum := sha256.Sum256(file)
	assert.Equal(t, hex.EncodeToString(sum[:]), m.Lineage.DataSHA256)
	assert.Equal(t, uint64(5), m.Lineage.Seed)
	assert.Equal(t, 600, m.Lineage.Rows)
	hp, err := train.Hyperparameters(&m)
	require.NoError(t, err)
	assert.Equal(t, "adam", hp.Optimizer.Type)
	assert.False(t, m.Lineage.Created.IsZero())

	// Raw features in, including gaps and an unseen category.
	x := []float32{
		40, 1, 0,
		float32(math.NaN()), -2, 2,
		55, float32(math.NaN()), float32(math.NaN()),
		60, 3, 9, // category 9 does not exist: all-zero one-hot
	}
	in, err := core.NewTensor(x, 4, 3)
	require.NoError(t, err)
	defer in.Close()
	mod, err := core.LoadModule(filepath.Join(out, "model.pt"))
	require.NoError(t, err)
	defer mod.Close()
	outs, err := mod.Forward(in)
	require.NoError(t, err)
	defer core.CloseAll(outs)
	kiln, err := core.CopyData[float32](outs[0])
	require.NoError(t, err)
	for _, v := range kiln {
		require.False(t, math.IsNaN(float64(v)), "imputation inside the model")
	}

	dir := t.TempDir()
	xb := make([]byte, 4*len(x))
	for i, v := range x {
		binary.LittleEndian.PutUint32(xb[4*i:], math.Float32bits(v))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "x.bin"), xb, 0o644))
	script := `
import sys, numpy as np, torch
m = torch.jit.load(sys.argv[1])
m.eval()
x = torch.from_numpy(np.fromfile(sys.argv[2], dtype="<f4").reshape(4, 3))
with torch.no_grad():
    y = m(x)
y.numpy().astype("<f4").tofile(sys.argv[3])
`
	cmd := exec.Command(testkit.Python(t), "-c", script, filepath.Join(out, "model.pt"),
		filepath.Join(dir, "x.bin"), filepath.Join(dir, "y.bin"))
	msg, err := cmd.CombinedOutput()
	require.NoError(t, err, string(msg))
	yb, err := os.ReadFile(filepath.Join(dir, "y.bin"))
	require.NoError(t, err)
	require.Len(t, yb, 4*len(kiln))
	for i := range kiln {
		py := math.Float32frombits(binary.LittleEndian.Uint32(yb[4*i:]))
		assert.InDelta(t, kiln[i], py, 1e-5, "output %d: Kiln %v, Python %v", i, kiln[i], py)
	}
}
