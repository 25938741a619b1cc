package flightserver_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/kilnml/kiln/serving/auth"
	kflight "github.com/kilnml/kiln/serving/flightserver"
	"github.com/kilnml/kiln/serving/flightserver/internal/flighttest"
)

func (e *env) action(ctx context.Context, typ string, body any) ([]byte, error) {
	var raw []byte
	switch b := body.(type) {
	case string:
		raw = []byte(b)
	default:
		raw, _ = json.Marshal(b)
	}
	stream, err := e.client.DoAction(ctx, &flight.Action{Type: typ, Body: raw})
	if err != nil {
		return nil, err
	}
	res, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	return res.GetBody(), nil
}

func (e *env) jobStatus(t *testing.T, ctx context.Context, typ, id string) kflight.JobStatus {
	t.Helper()
	raw, err := e.action(ctx, typ, id)
	require.NoError(t, err)
	var st kflight.JobStatus
	require.NoError(t, json.Unmarshal(raw, &st))
	return st
}

// numbersBatch returns a batch of column v = first..first+n-1 (float64) and
// w = 2v (int32).
func numbersBatch(first, n int) arrow.RecordBatch {
	vb := array.NewFloat64Builder(memory.DefaultAllocator)
	wb := array.NewInt32Builder(memory.DefaultAllocator)
	for i := first; i < first+n; i++ {
		vb.Append(float64(i))
		wb.Append(int32(2 * i))
	}
	return record([]string{"v", "w"}, vb.NewArray(), wb.NewArray())
}

func TestTrainWithoutTrainer(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	_, err := e.put(ctx, "d", numbersBatch(0, 3))
	require.NoError(t, err)
	for _, a := range []string{"train", "job-status", "cancel", "list-jobs"} {
		_, err = e.action(ctx, a, map[string]string{"dataset": "d"})
		requireCode(t, err, codes.Unimplemented, "no trainer")
	}
	_, err = e.action(ctx, "frobnicate", "")
	requireCode(t, err, codes.Unimplemented, "unknown action")
}

func TestTrainingJobs(t *testing.T) {
	e := start(t, kflight.Options{Trainer: flighttest.StatsTrainer})
	ctx := ctxT(t)
	var recs []arrow.RecordBatch
	for i := 0; i < 10; i++ {
		recs = append(recs, numbersBatch(i*10, 10))
	}
	_, err := e.put(ctx, "nums", recs...)
	require.NoError(t, err)

	// A job that runs to completion: ids, progress, result.
	raw, err := e.action(ctx, "train", map[string]any{"dataset": "nums", "delay_ms": 20})
	require.NoError(t, err)
	var started struct {
		JobID string `json:"job_id"`
	}
	require.NoError(t, json.Unmarshal(raw, &started))
	require.NotEmpty(t, started.JobID)
	var sawProgress bool
	var st kflight.JobStatus
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		st = e.jobStatus(t, ctx, "job-status", started.JobID)
		if st.State == kflight.JobRunning && st.Progress.Step > 0 && st.Progress.Step < 10 {
			sawProgress = true
			require.EqualValues(t, 10, st.Progress.Total)
			require.InDelta(t, float64(st.Progress.Step)/10, st.Fraction, 1e-9)
			require.Contains(t, st.Progress.Metrics, "v.mean")
		}
		if st.State != kflight.JobRunning {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.Equal(t, kflight.JobSucceeded, st.State, "status %+v", st)
	require.True(t, sawProgress, "a poll saw the job in progress")
	require.EqualValues(t, 10, st.Progress.Step)
	require.Equal(t, 1.0, st.Fraction)
	require.NotNil(t, st.Finished)
	var stats map[string]flighttest.ColumnStats
	require.NoError(t, json.Unmarshal(st.Result, &stats))
	require.Equal(t, flighttest.ColumnStats{Count: 100, Mean: 49.5, Min: 0, Max: 99}, stats["v"])
	require.Equal(t, flighttest.ColumnStats{Count: 100, Mean: 99, Min: 0, Max: 198}, stats["w"])

	// A slow job, cancelled: it ends CANCELLED, with partial progress.
	raw, err = e.action(ctx, "train", map[string]any{"dataset": "nums", "delay_ms": 60000})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(raw, &started))
	for e.jobStatus(t, ctx, "job-status", `{"job_id":"`+started.JobID+`"}`).Progress.Step == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	e.jobStatus(t, ctx, "cancel", `"`+started.JobID+`"`)
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	st, err = e.srv.Jobs().Wait(wctx, started.JobID)
	require.NoError(t, err)
	require.Equal(t, kflight.JobCancelled, st.State)
	require.EqualValues(t, 1, st.Progress.Step)
	require.Equal(t, kflight.JobCancelled, e.jobStatus(t, ctx, "job-status", started.JobID).State)

	// A job whose trainer fails.
	raw, err = e.action(ctx, "train", map[string]any{"dataset": "nums", "fail_after": 3})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(raw, &started))
	st, err = e.srv.Jobs().Wait(wctx, started.JobID)
	require.NoError(t, err)
	require.Equal(t, kflight.JobFailed, st.State)
	require.Contains(t, st.Error, "failing after 3 batches")
	require.EqualValues(t, 3, st.Progress.Step)

	raw, err = e.action(ctx, "list-jobs", "")
	require.NoError(t, err)
	var all []kflight.JobStatus
	require.NoError(t, json.Unmarshal(raw, &all))
	require.Len(t, all, 3)

	// Bad requests.
	_, err = e.action(ctx, "train", map[string]any{"dataset": "missing"})
	requireCode(t, err, codes.NotFound, "missing")
	_, err = e.action(ctx, "train", map[string]any{"dataset": "../etc"})
	requireCode(t, err, codes.InvalidArgument)
	_, err = e.action(ctx, "train", "not json")
	requireCode(t, err, codes.InvalidArgument)
	_, err = e.action(ctx, "train", map[string]any{})
	requireCode(t, err, codes.InvalidArgument, "names no dataset")
	_, err = e.action(ctx, "job-status", "job-0000")
	requireCode(t, err, codes.NotFound)
	_, err = e.action(ctx, "cancel", "")
	requireCode(t, err, codes.InvalidArgument)
}

func TestJobsCloseCancelsRunning(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "d.arrow")
	e := start(t, kflight.Options{DataDir: dir})
	_, err := e.put(ctxT(t), "d", numbersBatch(0, 4), numbersBatch(4, 4))
	require.NoError(t, err)
	js := kflight.NewJobs(flighttest.StatsTrainer)
	id, err := js.Start(context.Background(), json.RawMessage(`{"delay_ms":60000}`), "d", path)
	require.NoError(t, err)
	js.Close()
	st, err := js.Status(id)
	require.NoError(t, err)
	require.Equal(t, kflight.JobCancelled, st.State)
	_, err = js.Start(context.Background(), nil, "d", path)
	require.Error(t, err)
}

func TestAuth(t *testing.T) {
	const static = "static-token-0123456789"
	policy, err := auth.New(auth.Config{Users: map[string]string{"alice": "s3cret"}, Token: static})
	require.NoError(t, err)
	e := start(t, kflight.Options{Auth: policy})
	ctx := ctxT(t)
	_, err = e.client.GetFlightInfo(ctx, datasetDesc("x"))
	requireCode(t, err, codes.Unauthenticated)
	_, err = e.put(ctx, "x", numbersBatch(0, 1))
	requireCode(t, err, codes.Unauthenticated)
	_, err = e.client.AuthenticateBasicToken(ctx, "alice", "wrong")
	requireCode(t, err, codes.Unauthenticated)
	_, err = e.client.AuthenticateBasicToken(ctx, "mallory", "s3cret")
	requireCode(t, err, codes.Unauthenticated)
	bad := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer not-a-token")
	_, err = e.client.GetFlightInfo(bad, datasetDesc("x"))
	requireCode(t, err, codes.Unauthenticated)

	authed, err := e.client.AuthenticateBasicToken(ctx, "alice", "s3cret")
	require.NoError(t, err)
	_, err = e.put(authed, "x", numbersBatch(0, 5))
	require.NoError(t, err)
	info, err := e.client.GetFlightInfo(authed, datasetDesc("x"))
	require.NoError(t, err)
	require.EqualValues(t, 5, info.TotalRecords)

	withStatic := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+static)
	info, err = e.client.GetFlightInfo(withStatic, datasetDesc("x"))
	require.NoError(t, err)
	require.EqualValues(t, 5, info.TotalRecords)
}

// selfSigned writes a certificate and key for 127.0.0.1 into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kiln-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600))
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestTLS(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t, t.TempDir())
	e := start(t, kflight.Options{CertFile: certFile, KeyFile: keyFile},
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})))
	ctx := ctxT(t)
	_, err := e.put(ctx, "secure", numbersBatch(0, 3))
	require.NoError(t, err)
	require.Len(t, e.get(t, ctx, "secure"), 1)

	plain, err := flight.NewClientWithMiddleware(e.srv.Addr().String(), nil, nil, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer plain.Close()
	_, err = plain.GetFlightInfo(ctx, datasetDesc("secure"))
	require.Error(t, err)

	_, err = kflight.New(kflight.Options{DataDir: t.TempDir(), CertFile: certFile})
	require.ErrorContains(t, err, "both CertFile and KeyFile")
}
