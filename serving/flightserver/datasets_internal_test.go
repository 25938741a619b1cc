package flightserver

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestSyncerAcknowledgesInOrderAfterSync(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	require.NoError(t, err)
	defer f.Close()
	var mu sync.Mutex
	var acked []PutProgress
	sy := startSyncer(f, func(p PutProgress) {
		mu.Lock()
		acked = append(acked, p)
		mu.Unlock()
	})
	for i := int64(1); i <= 100; i++ {
		_, err := f.Write([]byte("x"))
		require.NoError(t, err)
		sy.written(PutProgress{Batches: i, Bytes: i})
	}
	require.NoError(t, sy.stop())
	require.NoError(t, sy.stop(), "stop is idempotent")
	// Acknowledgements grow and end with the last batch written; several
	// batches may share one fsync.
	require.NotEmpty(t, acked)
	for i := 1; i < len(acked); i++ {
		require.Greater(t, acked[i].Batches, acked[i-1].Batches)
	}
	require.Equal(t, PutProgress{Batches: 100, Bytes: 100}, acked[len(acked)-1])
}

func TestSyncerFailureAcknowledgesNothing(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	require.NoError(t, err)
	require.NoError(t, f.Close()) // every fsync fails
	acks := 0
	sy := startSyncer(f, func(PutProgress) { acks++ })
	for i := int64(1); i <= 3*syncDepth; i++ { // never blocks, even past the queue's depth
		sy.written(PutProgress{Batches: i})
	}
	require.Error(t, sy.stop())
	require.Error(t, sy.failed())
	require.Zero(t, acks)
}
