package serving

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// soakDuration is KILN_SOAK_SECONDS (default 20 s; the full run is
// KILN_SOAK_SECONDS=60).
func soakDuration(t *testing.T) time.Duration {
	s := os.Getenv("KILN_SOAK_SECONDS")
	if s == "" {
		return 20 * time.Second
	}
	f, err := strconv.ParseFloat(s, 64)
	require.NoError(t, err, "KILN_SOAK_SECONDS")
	return time.Duration(f * float64(time.Second))
}

func rssBytes(t *testing.T) int64 {
	raw, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			require.NoError(t, err, line)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// TestSoak256Clients runs 256 concurrent clients (192 on gRPC over 8
// connections, 64 on HTTP with the binary extension) against two batched
// models for KILN_SOAK_SECONDS (default 20 s) on loopback. "affine" has
// room for every client in its queue; "tight" (the same model, queue of 8)
// refuses some requests, which is the only error allowed: RESOURCE_EXHAUSTED
// (HTTP 429). Every response must be its own request's result (each
// request carries values unique to its client and sequence number, so
// cross-talk between batched requests shows), and the process's RSS after
// the first quarter of the run may grow by at most 25% + 64 MiB.
func TestSoak256Clients(t *testing.T) {
	dur := soakDuration(t)
	srv, base := startAll(t, Config{}, func(root string) {
		require.NoError(t, os.RemoveAll(filepath.Join(root, "corrupt")))
		require.NoError(t, os.CopyFS(filepath.Join(root, "tight"), os.DirFS(filepath.Join(root, "affine"))))
		require.NoError(t, os.WriteFile(filepath.Join(root, "tight", "config.yaml"), []byte(`
max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}, {name: s, datatype: FP32, dims: []}]
dynamic_batching: {max_queue_delay_us: 1000, max_queue_size: 8}
version_policy: {all: true}
`), 0o644))
	})
	require.True(t, srv.Ready())
	conns := make([]*grpc.ClientConn, 8)
	for i := range conns {
		c, err := grpc.NewClient(srv.GRPCAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		defer c.Close()
		conns[i] = c
	}
	httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

	var ok, exhausted atomic.Int64
	var mu sync.Mutex
	var problems []string
	problem := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(problems) < 20 {
			problems = append(problems, fmt.Sprintf(format, args...))
		}
	}
	// check verifies y = x*scale + 1 and s = row sums for version v.
	check := func(who string, v int, x []float32, y, s []float32) {
		scale := float32(v + 1) // version 1: 2, version 2: 3
		rows := len(x) / 4
		if len(y) != len(x) || len(s) != rows {
			problem("%s: %d y and %d s values for %d rows", who, len(y), len(s), rows)
			return
		}
		for r := range rows {
			var sum float32
			for j := range 4 {
				sum += x[4*r+j]
				if want := x[4*r+j]*scale + 1; y[4*r+j] != want {
					problem("%s: y[%d,%d] = %v, want %v (cross-talk?)", who, r, j, y[4*r+j], want)
					return
				}
			}
			if s[r] != sum {
				problem("%s: s[%d] = %v, want %v (cross-talk?)", who, r, s[r], sum)
				return
			}
		}
	}

	deadline := time.Now().Add(dur)
	var wg sync.WaitGroup
	var rssQuarter atomic.Int64
	go func() {
		time.Sleep(dur / 4)
		rssQuarter.Store(rssBytes(t))
	}()
	for client := range 256 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(client), 7))
			gc := pb.NewGRPCInferenceServiceClient(conns[client%len(conns)])
			for seq := 0; time.Now().Before(deadline); seq++ {
				rows := 1 + rng.IntN(4)
				model := "affine"
				if rng.IntN(4) == 0 {
					model = "tight"
				}
				v := 1 + rng.IntN(2)
				x := make([]float32, 4*rows)
				for i := range x { // unique per client, request and element; exact in float32
					x[i] = float32(client*4096 + (seq%256)*16 + i)
				}
				who := fmt.Sprintf("client %d request %d (%s v%d)", client, seq, model, v)
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				if client < 192 {
					resp, err := gc.ModelInfer(ctx, &pb.ModelInferRequest{
						ModelName: model, ModelVersion: strconv.Itoa(v), Id: who,
						Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(rows), 4}}},
						RawInputContents: [][]byte{rawF32(x...)},
					})
					cancel()
					switch {
					case status.Code(err) == codes.ResourceExhausted && model == "tight":
						exhausted.Add(1)
					case err != nil:
						problem("%s: %v", who, err)
					case resp.Id != who:
						problem("%s: answered with id %q", who, resp.Id)
					default:
						check(who, v, x, f32s(resp.RawOutputContents[0]), f32s(resp.RawOutputContents[1]))
						ok.Add(1)
					}
					continue
				}
				hdr, _ := json.Marshal(map[string]any{"id": who,
					"inputs":     []any{map[string]any{"name": "x", "datatype": "FP32", "shape": []int{rows, 4}, "parameters": map[string]any{"binary_data_size": 16 * rows}}},
					"parameters": map[string]any{"binary_data_output": true}})
				req, _ := http.NewRequestWithContext(ctx, "POST", fmt.Sprintf("%s/v2/models/%s/versions/%d/infer", base, model, v), bytes.NewReader(append(hdr, rawF32(x...)...)))
				req.Header.Set("Inference-Header-Content-Length", strconv.Itoa(len(hdr)))
				resp, err := httpc.Do(req)
				if err != nil {
					cancel()
					problem("%s: %v", who, err)
					continue
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				cancel()
				switch {
				case err != nil:
					problem("%s: reading: %v", who, err)
				case resp.StatusCode == http.StatusTooManyRequests && model == "tight":
					exhausted.Add(1)
				case resp.StatusCode != 200:
					problem("%s: HTTP %d %s", who, resp.StatusCode, body)
				default:
					n, _ := strconv.Atoi(resp.Header.Get("Inference-Header-Content-Length"))
					var out struct {
						ID string `json:"id"`
					}
					if n <= 0 || n > len(body) || json.Unmarshal(body[:n], &out) != nil || out.ID != who {
						problem("%s: bad response header %q", who, body[:min(n, len(body))])
						continue
					}
					bin := body[n:]
					if len(bin) != 20*rows {
						problem("%s: %d bytes of binary outputs for %d rows (cross-talk?)", who, len(bin), rows)
						continue
					}
					check(who, v, x, f32s(bin[:16*rows]), f32s(bin[16*rows:]))
					ok.Add(1)
				}
			}
		})
	}
	wg.Wait()
	runtime.GC()
	rssEnd := rssBytes(t)
	q := rssQuarter.Load()
	t.Logf("soak %v: %d responses checked, %d intended RESOURCE_EXHAUSTED, RSS %d MiB at 1/4, %d MiB at end",
		dur, ok.Load(), exhausted.Load(), q>>20, rssEnd>>20)
	assert.Empty(t, problems)
	assert.Greater(t, ok.Load(), int64(256), "every client got answers")
	require.NotZero(t, q)
	assert.LessOrEqual(t, rssEnd, q+q/4+64<<20, "RSS grew from %d MiB to %d MiB", q>>20, rssEnd>>20)
	// The server still answers normally.
	_, err := pb.NewGRPCInferenceServiceClient(conns[0]).ModelInfer(context.Background(), affineReq("", 1, 1, 2, 3, 4))
	require.NoError(t, err)
}
