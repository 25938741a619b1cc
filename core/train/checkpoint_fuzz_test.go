package train

import (
	"encoding/json"
	"math/rand/v2"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/kilnml/kiln/core"
)

var checkpointName = regexp.MustCompile(`^ckpt-[0-9]{6,9}$`)

// FuzzCheckpointState feeds what resume reads from a checkpoint directory
// before any tensor archive, the LATEST file and state.json, to
// parseLatest and decodeState, seeded with what checkpoint writes and
// damaged variants. Neither may panic; errors are INVALID_ARGUMENT; an
// accepted name stays inside the checkpoint directory and an accepted
// state is consistent enough for resume and Fit to index its history by
// epoch.
func FuzzCheckpointState(f *testing.F) {
	rng, err := rand.NewPCG(1, 0x5eed).MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	st := ckptState{Epoch: 3, RNG: rng, BestEpoch: 2, Best: Metrics{"accuracy": 0.9, "loss": 0.3},
		BestValue: 0.9, Bad: 1, HasBest: true, Fingerprint: Config{Epochs: 3, BatchSize: 32}.fingerprint()}
	for i := range 3 {
		st.History = append(st.History, EpochStats{Epoch: i + 1, TrainLoss: 1 / float64(i+1), Val: Metrics{"loss": 0.5}, LR: 0.01, Seconds: 0.2})
	}
	good, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte("ckpt-000003\n"), good)
	st.StopReason = "early_stopping"
	stopped, _ := json.Marshal(st)
	f.Add([]byte("ckpt-000003"), stopped)
	f.Add([]byte("ckpt-000001/../../../etc\n"), []byte(`{"epoch": 1, "history": [{"epoch": 1}], "best_epoch": 99}`))
	f.Add([]byte("ckpt--00001"), []byte(`{"epoch": -1, "rng": "AAAA"}`))
	f.Add([]byte("ckpt-99999999999999999999"), []byte(`{"epoch": 0, "history": null}`))
	f.Add([]byte(""), good[:len(good)/2])
	f.Fuzz(func(t *testing.T, latest, state []byte) {
		epoch := 3
		name, e, err := parseLatest(latest)
		if err != nil {
			if !core.HasCode(err, core.InvalidArgument) {
				t.Fatalf("parseLatest error without INVALID_ARGUMENT: %v", err)
			}
		} else {
			dir := filepath.Join("a", "ckpt")
			if !checkpointName.MatchString(name) || filepath.Dir(filepath.Join(dir, name)) != dir {
				t.Fatalf("parseLatest accepted %q", name)
			}
			if e < 1 || e > maxCheckpointEpoch {
				t.Fatalf("parseLatest accepted epoch %d", e)
			}
			epoch = e
		}
		s, err := decodeState(state, epoch)
		if err != nil {
			if !core.HasCode(err, core.InvalidArgument) {
				t.Fatalf("decodeState error without INVALID_ARGUMENT: %v", err)
			}
			return
		}
		if s.Epoch != epoch || len(s.History) != epoch {
			t.Fatalf("state of epoch %d with %d history entries accepted for epoch %d", s.Epoch, len(s.History), epoch)
		}
		if s.BestEpoch > 0 {
			_ = s.History[s.BestEpoch-1] // in range
		}
		if err := new(rand.PCG).UnmarshalBinary(s.RNG); err != nil {
			t.Fatalf("accepted rng state does not restore: %v", err)
		}
	})
}
