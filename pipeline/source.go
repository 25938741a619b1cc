package pipeline

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/kilnml/kiln/arrowio"
	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
)

// DatasetStore resolves a dataset of the serving process's own store (a
// pipeline's data.dataset) to its Arrow IPC file; serving gives it.
type DatasetStore func(name string) (path string, err error)

// loadTable reads a CSV (.csv, .txt or no extension), Arrow IPC or Parquet
// file, as kiln train does.
func loadTable(path string) (*data.Table, error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".csv", ".txt", "":
		return data.ReadCSVFile(path)
	case ".arrow", ".feather", ".ipc", ".arrows", ".parquet", ".pq":
		return arrowio.ReadTable(path, nil)
	}
	return nil, core.Errorf(core.InvalidArgument, "kiln: pipeline: %s: unknown data format %q (want .csv, .arrow, .feather, .ipc, .arrows or .parquet)", path, filepath.Ext(path))
}

// fetchData copies the spec's data into dir (the data stage's
// checkpoint) and returns the copy's path: a file is copied as it is, a
// Flight dataset (remote or of the store) is written as an Arrow IPC file.
func (e *engine) fetchData(ctx context.Context, dir string) (string, error) {
	d := e.spec.Data
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	switch {
	case d.Path != "":
		src := e.resolvePath(d.Path)
		dst := filepath.Join(dir, "data"+strings.ToLower(filepath.Ext(src)))
		return dst, copyFile(src, dst)
	case d.Dataset != "":
		if e.opts.Datasets == nil {
			return "", core.Errorf(core.FailedPrecondition, "kiln: pipeline: data.dataset %q names a dataset of a server's store: run the pipeline in kiln serve (--pipeline, or Flight's pipeline_run action), or use data.flight: grpc://HOST:PORT/%s", d.Dataset, d.Dataset)
		}
		src, err := e.opts.Datasets(d.Dataset)
		if err != nil {
			return "", err
		}
		dst := filepath.Join(dir, "data.arrow")
		return dst, copyFile(src, dst)
	default:
		dst := filepath.Join(dir, "data.arrow")
		return dst, e.doGet(ctx, d.Flight, dst)
	}
}

func (e *engine) resolvePath(p string) string {
	if filepath.IsAbs(p) || e.opts.BaseDir == "" {
		return p
	}
	return filepath.Join(e.opts.BaseDir, p)
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return core.Errorf(core.NotFound, "kiln: pipeline: data %s: no such file", src)
		}
		return fmt.Errorf("kiln: pipeline: data: %w", err)
	}
	defer in.Close()
	out, err := os.Create(dst + ".tmp")
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("kiln: pipeline: copying %s: %w", src, err)
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(dst+".tmp", dst)
}

// flightClient connects to a Kiln Flight server (grpc:// or grpc+tls://),
// sending the bearer token, if any, with every call.
func flightClient(rawURL, token string) (flight.Client, context.Context, string, error) {
	addr, name, err := ParseFlightURL(rawURL)
	if err != nil {
		return nil, nil, "", core.Errorf(core.InvalidArgument, "kiln: pipeline: data.flight: %v", err)
	}
	creds := insecure.NewCredentials()
	if strings.HasPrefix(addr, "grpc+tls://") {
		creds = credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})
	}
	host := addr[strings.Index(addr, "://")+3:]
	c, err := flight.NewClientWithMiddleware(host, nil, nil, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<31-1)))
	if err != nil {
		return nil, nil, "", fmt.Errorf("kiln: pipeline: data.flight %s: %w", rawURL, err)
	}
	ctx := context.Background()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	return c, ctx, name, nil
}

// doGet reads a dataset of a Kiln Flight server into an Arrow IPC file.
func (e *engine) doGet(ctx context.Context, rawURL, dst string) error {
	c, mctx, name, err := flightClient(rawURL, e.opts.FlightToken)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx = metadata.NewOutgoingContext(ctx, metadataOf(mctx))
	stream, err := c.DoGet(ctx, &flight.Ticket{Ticket: []byte("datasets/" + name)})
	if err != nil {
		return fmt.Errorf("kiln: pipeline: data.flight %s: %w", rawURL, err)
	}
	rdr, err := flight.NewRecordReader(stream)
	if err != nil {
		return fmt.Errorf("kiln: pipeline: data.flight %s: %w", rawURL, err)
	}
	defer rdr.Release()
	f, err := os.Create(dst + ".tmp")
	if err != nil {
		return err
	}
	defer f.Close()
	w, err := ipc.NewFileWriter(f, ipc.WithSchema(rdr.Schema()))
	if err != nil {
		return err
	}
	for rdr.Next() {
		if err := w.Write(rdr.RecordBatch()); err != nil {
			return fmt.Errorf("kiln: pipeline: data.flight %s: %w", rawURL, err)
		}
	}
	if err := rdr.Err(); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("kiln: pipeline: data.flight %s: %w", rawURL, err)
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return os.Rename(dst+".tmp", dst)
}

func metadataOf(ctx context.Context) metadata.MD {
	md, _ := metadata.FromOutgoingContext(ctx)
	return md
}

// sourceColumns returns the column names of the spec's data without
// reading its rows where it can: a CSV's header, an Arrow or Parquet
// file's schema (through arrowio), a Flight dataset's schema
// (GetSchema), a store dataset's file schema.
func (e *engine) sourceColumns(ctx context.Context) ([]string, error) {
	d := e.spec.Data
	switch {
	case d.Path != "":
		p := e.resolvePath(d.Path)
		if _, err := os.Stat(p); err != nil {
			return nil, &SpecError{Field: "data.path", Msg: fmt.Sprintf("%s: no such file", p)}
		}
		return fileColumns(p)
	case d.Dataset != "":
		if e.opts.Datasets == nil {
			return nil, &SpecError{Field: "data.dataset", Msg: fmt.Sprintf("%q names a dataset of a server's store: run the pipeline in kiln serve, or use data.flight: grpc://HOST:PORT/%s", d.Dataset, d.Dataset)}
		}
		p, err := e.opts.Datasets(d.Dataset)
		if err != nil {
			return nil, &SpecError{Field: "data.dataset", Msg: err.Error()}
		}
		return fileColumns(p)
	default:
		c, mctx, name, err := flightClient(d.Flight, e.opts.FlightToken)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		ctx = metadata.NewOutgoingContext(ctx, metadataOf(mctx))
		res, err := c.GetSchema(ctx, &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", name}})
		if err != nil {
			return nil, fmt.Errorf("kiln: pipeline: data.flight %s: %w", d.Flight, err)
		}
		s, err := flight.DeserializeSchema(res.GetSchema(), memory.DefaultAllocator)
		if err != nil {
			return nil, fmt.Errorf("kiln: pipeline: data.flight %s: %w", d.Flight, err)
		}
		return schemaNames(s), nil
	}
}

func schemaNames(s *arrow.Schema) []string {
	var out []string
	for _, f := range s.Fields() {
		out = append(out, f.Name)
	}
	return out
}

// fileColumns reads a data file's column names: a CSV's header line, or
// the table (Arrow, Parquet) through arrowio.
func fileColumns(path string) ([]string, error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".csv", ".txt", "":
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		buf := make([]byte, 1<<20)
		n, _ := io.ReadFull(f, buf)
		line, _, _ := strings.Cut(string(buf[:n]), "\n")
		t, err := data.ReadCSV(strings.NewReader(strings.TrimRight(line, "\r") + "\n"))
		if err != nil {
			// A header with no rows reads as an empty table in some
			// versions; fall back on splitting it.
			return strings.Split(strings.TrimRight(line, "\r"), ","), nil
		}
		return t.Names(), nil
	}
	t, err := loadTable(path)
	if err != nil {
		return nil, err
	}
	return t.Names(), nil
}

// checkColumns checks that the data has the target and every feature, and
// every input column of the model in production (which the evaluation
// scores on the same rows).
func checkColumns(cols []string, d DataSpec, prodFeatures []string, prodRef string) error {
	if !slices.Contains(cols, d.Target) {
		return &SpecError{Field: "data.target", Msg: fmt.Sprintf("column %q is not in the data (its columns: %s)", d.Target, shortList(cols))}
	}
	for _, f := range d.Features {
		if !slices.Contains(cols, f) {
			return &SpecError{Field: "data.features", Msg: fmt.Sprintf("column %q is not in the data (its columns: %s)", f, shortList(cols))}
		}
	}
	var missing []string
	for _, f := range prodFeatures {
		if !slices.Contains(cols, f) {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return &SpecError{Field: "data", Msg: fmt.Sprintf("the data lacks %s, input column(s) of %s, the model it is evaluated against", shortList(missing), prodRef)}
	}
	return nil
}

func shortList(s []string) string {
	if len(s) > 12 {
		return strings.Join(s[:12], ", ") + fmt.Sprintf(", ... (%d in all)", len(s))
	}
	return strings.Join(s, ", ")
}

// subset returns the rows of t as a new table whose fingerprint derives
// from t's and what (so the same rows of the same data always get the
// same fingerprint: core/optimize checks it).
func subset(t *data.Table, rows []int, what string) *data.Table {
	out := &data.Table{}
	for _, c := range t.Columns {
		nc := &data.Column{Name: c.Name, Categorical: c.Categorical}
		if c.Categorical {
			nc.Str = make([]string, len(rows))
			for i, r := range rows {
				nc.Str[i] = c.Str[r]
			}
		} else {
			nc.Num = make([]float64, len(rows))
			for i, r := range rows {
				nc.Num[i] = c.Num[r]
			}
		}
		out.Columns = append(out.Columns, nc)
	}
	h := sha256.Sum256([]byte(t.Fingerprint + "\x00" + what))
	out.Fingerprint = hex.EncodeToString(h[:])
	return out
}
