package train_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/core/train"
)

// A GPU this libtorch or machine lacks is refused before any work, with
// the device's code and name; bad amp settings likewise.
func TestDeviceAndAMPChecks(t *testing.T) {
	base := train.Config{Epochs: 1, BatchSize: 16, Loss: train.Loss{Type: "mse"}, Optimizer: train.Optimizer{Type: "sgd", LR: 0.1}}
	cfg := base
	cfg.Device = "cuda:0"
	if core.CUDADeviceCount() == 0 {
		err := cfg.Validate()
		require.Error(t, err)
		assert.Contains(t, err.Error(), "device cuda:0")
		assert.Contains(t, []core.Code{core.Unsupported, core.Unavailable}, core.CodeOf(err), "%v", err)

		net, err := nn.Build(nn.Sequential(nn.Linear(1)), 2, 1)
		require.NoError(t, err)
		defer net.Close()
		before, err := net.State()
		require.NoError(t, err)
		_, err = train.Fit(context.Background(), net, linearData(64, 1), nil, cfg, nil)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "cuda:0")
		after, err := net.State()
		require.NoError(t, err)
		assert.Equal(t, before, after, "nothing trained")
	}
	for _, tc := range []struct {
		device, amp, want string
		code              core.Code
	}{
		{"", "fp8", `unknown amp "fp8"`, core.InvalidArgument},
		{"cpu", "fp16", "amp fp16 needs a CUDA device", core.InvalidArgument},
		{"tpu:0", "", `device "tpu:0": want cpu, cuda or cuda:N`, core.InvalidArgument},
	} {
		cfg := base
		cfg.Device, cfg.AMP = tc.device, tc.amp
		err := cfg.Validate()
		require.Error(t, err, "%+v", tc)
		assert.Contains(t, err.Error(), tc.want)
		assert.Equal(t, tc.code, core.CodeOf(err), "%v", err)
	}
}

// bf16 autocast on the CPU (torch.autocast("cpu", torch.bfloat16)): the
// network still learns, its weights stay float32, and the run differs from
// float32 training from the same start (autocast really ran).
func TestAMPBF16OnCPU(t *testing.T) {
	tr, va := linearData(512, 1), linearData(128, 2)
	run := func(amp string) ([]float64, train.Metrics) {
		net, err := nn.Build(nn.Sequential(nn.Linear(16), nn.ReLU(), nn.Linear(1)), 2, 1)
		require.NoError(t, err)
		defer net.Close()
		cfg := train.Config{Epochs: 20, BatchSize: 32, Seed: 3, Loss: train.Loss{Type: "mse"},
			Optimizer: train.Optimizer{Type: "adam", LR: 0.01}, AMP: amp}
		res, err := train.Fit(context.Background(), net, tr, va, cfg, nil)
		require.NoError(t, err, amp)
		w, err := net.State()
		require.NoError(t, err)
		return w, res.History[len(res.History)-1].Val
	}
	w32, m32 := run("")
	w16, m16 := run("bf16")
	assert.Greater(t, m16["r2"], 0.95, "bf16 learns: %v", m16)
	assert.Greater(t, m32["r2"], 0.95, "fp32 learns: %v", m32)
	assert.NotEqual(t, w32, w16, "autocast changed the arithmetic")
}
