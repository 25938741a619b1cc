package nn_test

import (
	"encoding/json"
	"testing"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
)

// specSeeds are the specs the tests use, as JSON or YAML documents, with a
// feature count to infer them for.
func specSeeds(f *testing.F) {
	f.Add([]byte(`{"name":"mlp","layers":[{"type":"Linear","out":16,"name":"fc1"},{"type":"relu"},{"type":"dropout","p":0.1},{"type":"linear","out":3}]}`), int64(4))
	f.Add([]byte("name: mlp\nlayers:\n  - {type: Linear, out: 16, name: fc1}\n  - type: relu\n  - {type: dropout, p: 0.1}\n  - {type: linear, out: 3}\n"), int64(8))
	f.Add([]byte("layers:\n  - {type: linear, outt: 3}\n"), int64(2))
	f.Add([]byte("input_shape: [1, 8, 8]\nlayers:\n  - {type: conv2d, out: 4, kernel: 3, padding: 1, stride: 2}\n  - {type: max_pool2d, kernel: 2}\n  - {type: flatten}\n  - {type: linear}\n"), int64(64))
	f.Add([]byte(`{"layers":[{"type":"linear","out":1099511627776}]}`), int64(4))
	f.Add([]byte(`{"input_shape":[3,6148914691236517206],"layers":[{"type":"linear","out":1}]}`), int64(2))
	f.Add([]byte("a: &a [1, 2]\nb: [*a, *a]\n"), int64(1))
	f.Add([]byte(`[]`), int64(1))
	for _, c := range seqSpecs {
		f.Add([]byte(c.yaml), c.features)
	}
	f.Add([]byte(`{"input_shape":[4,6],"layers":[{"type":"multihead_attention","num_heads":4}]}`), int64(24))
	f.Add([]byte(`{"layers":[{"type":"residual","layers":[{"type":"residual","layers":[{"type":"linear","out":3}]}]}]}`), int64(4))
	for _, s := range []nn.Spec{
		nn.Sequential(
			nn.Conv2d(4, 3).Named("c1"), nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
			nn.Conv2d(4, 1), nn.AvgPool2d(1), nn.GELU(), nn.Flatten(), nn.Dropout(0.2),
			nn.Linear(6), nn.LayerNorm(), nn.Tanh(), nn.Linear(5), nn.BatchNorm1d(), nn.Sigmoid(),
			nn.Linear(3), nn.Softmax(),
		).WithInputShape(1, 8, 8),
		nn.Sequential(nn.Conv1d(3, 2), nn.MaxPool1d(2), nn.AvgPool1d(1), nn.BatchNorm1d(), nn.Flatten(), nn.Linear(2)).WithInputShape(2, 5),
		nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(1)),
	} {
		b, err := json.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, int64(64))
	}
}

// FuzzParseSpec parses a network spec (JSON or YAML) and infers its shapes
// for a feature count, as Build does before it calls libtorch. Neither may
// panic; every error is INVALID_ARGUMENT; what Infer accepts stays within
// the limits (MaxLayers, MaxParams, MaxSampleValues) and yields TorchScript
// source for every layer. No module is built: per input the work stays in
// Go.
func FuzzParseSpec(f *testing.F) {
	specSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte, features int64) {
		s, err := nn.ParseSpec(b)
		if err != nil {
			if !core.HasCode(err, core.InvalidArgument) {
				t.Fatalf("ParseSpec error without INVALID_ARGUMENT: %v", err)
			}
			return
		}
		infos, err := s.Infer(features)
		if err != nil {
			if !core.HasCode(err, core.InvalidArgument) {
				t.Fatalf("Infer error without INVALID_ARGUMENT: %v", err)
			}
			return
		}
		if len(infos) != len(s.Layers) || len(infos) > nn.MaxLayers {
			t.Fatalf("%d layers inferred for %d", len(infos), len(s.Layers))
		}
		total := int64(0)
		for i, info := range infos {
			n := int64(1)
			for _, d := range info.Out {
				if d <= 0 {
					t.Fatalf("layer %d: output shape %v", i, info.Out)
				}
				n *= d
				if n > nn.MaxSampleValues {
					t.Fatalf("layer %d: output shape %v beyond the limit", i, info.Out)
				}
			}
			if info.Params < 0 {
				t.Fatalf("layer %d: %d parameters", i, info.Params)
			}
			total += info.Params
			if total > nn.MaxParams {
				t.Fatalf("%d parameters accepted", total)
			}
			if len(nn.LayerSource(info, s.Layers[i])) == 0 {
				t.Fatalf("layer %d (%s): no source", i, info.Type)
			}
			nn.LayerTensors(info, s.Layers[i])
		}
	})
}
