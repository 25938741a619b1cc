package flightserver

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"

	"github.com/kilnml/kiln/internal/atomicfile"

	"github.com/kilnml/kiln/core"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
)

// DatasetExt is the file name extension of a stored dataset: dataset NAME is
// the Arrow IPC file DataDir/NAME.arrow.
const DatasetExt = ".arrow"

// metaExt is the extension of a dataset's summary, written next to it.
const metaExt = ".meta.json"

// tmpPrefix starts the names of files being written; dataset names cannot
// start with a dot, so they never collide with them.
const tmpPrefix = ".put-"

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidDatasetName reports why name is not a valid dataset name, or nil.
// A name is 1 to 128 letters, digits, '.', '_' or '-', starting with a
// letter or digit, so it never names a path outside the data directory nor
// a hidden file.
func ValidDatasetName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("invalid dataset name %q: want 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// DatasetInfo describes a stored dataset.
type DatasetInfo struct {
	// Name is the dataset's name.
	Name string `json:"name"`
	// Path is its Arrow IPC file.
	Path string `json:"path"`
	// Schema is its schema.
	Schema *arrow.Schema `json:"-"`
	// Rows is its total number of rows.
	Rows int64 `json:"rows"`
	// Batches is its number of record batches.
	Batches int64 `json:"batches"`
	// Bytes is the size of its file.
	Bytes int64 `json:"bytes"`
}

// datasetMeta is the summary stored next to a dataset so that listing need
// not read every batch; it is trusted only when Bytes matches the file.
type datasetMeta struct {
	Rows    int64 `json:"rows"`
	Batches int64 `json:"batches"`
	Bytes   int64 `json:"bytes"`
}

// store holds the datasets of a data directory.
type store struct {
	dir string
	mem memory.Allocator

	mu    sync.Mutex
	cache map[string]datasetMeta // by file name, validated by size
}

func newStore(dir string, mem memory.Allocator) (*store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	// Files left by a server that stopped in the middle of a DoPut are
	// never visible; remove them.
	if ents, err := os.ReadDir(abs); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), tmpPrefix) || strings.HasPrefix(e.Name(), atomicfile.TempPrefix) {
				_ = os.Remove(filepath.Join(abs, e.Name()))
			}
		}
	}
	return &store{dir: abs, mem: mem, cache: map[string]datasetMeta{}}, nil
}

// Path returns the file of dataset name, which need not exist.
func (s *store) path(name string) string { return filepath.Join(s.dir, name+DatasetExt) }

// info describes dataset name; errors wrap os.ErrNotExist for a dataset
// that is not stored.
func (s *store) info(name string) (DatasetInfo, error) {
	if err := ValidDatasetName(name); err != nil {
		return DatasetInfo{}, err
	}
	p := s.path(name)
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return DatasetInfo{}, fmt.Errorf("dataset %q: %w", name, os.ErrNotExist)
		}
		return DatasetInfo{}, fmt.Errorf("dataset %q: %w", name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: %w", name, err)
	}
	rdr, err := ipc.NewFileReader(f, ipc.WithAllocator(s.mem))
	if err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: reading %s: %w", name, p, err)
	}
	defer rdr.Close()
	info := DatasetInfo{Name: name, Path: p, Schema: rdr.Schema(), Batches: int64(rdr.NumRecords()), Bytes: st.Size()}
	if m, ok := s.meta(name, st.Size()); ok && m.Batches == info.Batches {
		info.Rows = m.Rows
		return info, nil
	}
	// No usable summary: count the rows batch by batch.
	for i := 0; i < rdr.NumRecords(); i++ {
		rec, err := rdr.RecordBatch(i)
		if err != nil {
			return DatasetInfo{}, fmt.Errorf("dataset %q: batch %d: %w", name, i, err)
		}
		info.Rows += rec.NumRows()
	}
	s.setMeta(name, datasetMeta{Rows: info.Rows, Batches: info.Batches, Bytes: info.Bytes})
	return info, nil
}

func (s *store) meta(name string, size int64) (datasetMeta, bool) {
	s.mu.Lock()
	m, ok := s.cache[name]
	s.mu.Unlock()
	if ok && m.Bytes == size {
		return m, true
	}
	raw, err := os.ReadFile(filepath.Join(s.dir, name+metaExt))
	if err != nil || json.Unmarshal(raw, &m) != nil || m.Bytes != size {
		return datasetMeta{}, false
	}
	s.setMeta(name, m)
	return m, true
}

func (s *store) setMeta(name string, m datasetMeta) {
	s.mu.Lock()
	s.cache[name] = m
	s.mu.Unlock()
}

// list describes every stored dataset, by name.
func (s *store) list() ([]DatasetInfo, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("listing datasets: %w", err)
	}
	var out []DatasetInfo
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), DatasetExt)
		if !ok || !e.Type().IsRegular() || ValidDatasetName(name) != nil {
			continue
		}
		info, err := s.info(name)
		if errors.Is(err, os.ErrNotExist) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// PutProgress is what a DoPut has made durable so far.
type PutProgress struct {
	// Batches is the number of record batches written and synced.
	Batches int64 `json:"batches"`
	// Rows is their number of rows.
	Rows int64 `json:"rows"`
	// Bytes is the size of the file written so far.
	Bytes int64 `json:"bytes"`
	// Committed is set on the last acknowledgement, sent once the whole
	// dataset is stored and visible.
	Committed bool `json:"committed,omitempty"`
}

// errInvalidStream marks errors caused by the client's data rather than by
// the server.
var errInvalidStream error = &core.Error{Code: core.InvalidArgument, Message: "invalid stream"}

// countingWriter counts the bytes written through it and keeps the first
// write error, so that a failed write of the IPC writer can be told apart
// from data the IPC writer refused.
type countingWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if err != nil && c.err == nil {
		c.err = err
	}
	return n, err
}

// part is one temporary file of a DoPut: an Arrow IPC file, or an IPC
// stream (the batches after a dictionary changed, see dictColumns), with
// the syncer that acknowledges its batches as they become durable.
type part struct {
	f    *os.File
	path string
	cw   *countingWriter
	bw   *bufio.Writer
	fw   *ipc.FileWriter // file format
	sw   *ipc.Writer     // stream format
	sy   *syncer         // nil when nothing is acknowledged
	done bool            // finished: written, synced and closed
	kept bool            // renamed into place: not removed
}

// newPart creates a temporary file in the data directory for batches of
// schema, in the IPC file format (file) or stream format; durable, when
// set, is called as its batches become durable (see syncer).
func (s *store) newPart(name string, schema *arrow.Schema, file bool, durable func(PutProgress)) (*part, error) {
	f, err := os.CreateTemp(s.dir, tmpPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("dataset %q: creating temporary file: %w", name, err)
	}
	p := &part{f: f, path: f.Name()}
	p.cw = &countingWriter{w: f}
	p.bw = bufio.NewWriterSize(p.cw, 64<<10)
	if file {
		if p.fw, err = ipc.NewFileWriter(p.bw, ipc.WithSchema(schema), ipc.WithAllocator(s.mem)); err != nil {
			p.discard()
			return nil, fmt.Errorf("dataset %q: %w", name, err)
		}
	} else {
		p.sw = ipc.NewWriter(p.bw, ipc.WithSchema(schema), ipc.WithAllocator(s.mem))
	}
	if durable != nil {
		p.sy = startSyncer(f, durable)
	}
	return p, nil
}

// write writes rec and flushes it to the file. An error is the file
// system's, or else the IPC writer's refusal of the client's data
// (UNSUPPORTED: such data cannot be stored as an Arrow IPC file).
func (p *part) write(rec arrow.RecordBatch) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: encoding failed: %v", errInvalidStream, r)
		}
	}()
	if p.fw != nil {
		err = p.fw.Write(rec)
	} else {
		err = p.sw.Write(rec)
	}
	if err == nil {
		err = p.bw.Flush()
	}
	if err != nil && p.cw.err == nil {
		return core.Errorf(core.Unsupported, "the batch cannot be stored as an Arrow IPC file: %v", err)
	}
	return err
}

// finish waits until the acknowledged batches are synced, ends the file
// (footer or end-of-stream marker), syncs and closes it.
func (p *part) finish() error {
	if err := p.sy.stop(); err != nil {
		return fmt.Errorf("syncing: %w", err)
	}
	var err error
	if p.fw != nil {
		err = p.fw.Close()
	} else {
		err = p.sw.Close()
	}
	if err != nil {
		return fmt.Errorf("writing the end of the file: %w", err)
	}
	if err := p.bw.Flush(); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	if err := p.f.Sync(); err != nil {
		return fmt.Errorf("syncing: %w", err)
	}
	p.done = true
	return p.f.Close()
}

// discard removes the file unless it was kept; nil does nothing.
func (p *part) discard() {
	if p == nil || p.kept {
		return
	}
	p.sy.stop()
	p.f.Close()
	os.Remove(p.path)
}

// put stores the record batches of rdr as dataset name. Each batch is
// validated in full (validateRecord), written and fsync'd before durable is
// called with the progress so far. The dataset becomes visible, atomically,
// only once the whole stream is stored; on any error nothing of it remains,
// not even the batches acknowledged as durable before it.
//
// A dictionary-encoded column keeps its type. When a batch's dictionary
// differs from the one before (pyarrow sends a replacement dictionary for
// a table concatenated from tables with other categories), which an Arrow
// IPC file cannot hold, the dictionaries of the stream are unified
// (dictColumns): the batches from there on are kept as an IPC stream, and
// once the stream has ended every batch is written again, into the file,
// with its indices into the one unified dictionary (whose index type is
// widened when the categories outgrow it). DoGet then returns the values
// sent, in one dictionary.
func (s *store) put(ctx context.Context, name string, rdr recordSource, durable func(PutProgress)) (info DatasetInfo, err error) {
	if err := ValidDatasetName(name); err != nil {
		return DatasetInfo{}, err
	}
	schema := rdr.Schema()
	// Batches are written here and made durable by a syncer goroutine, so
	// that the next batch is received, checked and written while the
	// device flushes the previous ones; each fsync covers every batch
	// written before it started, and only those are acknowledged.
	out, err := s.newPart(name, schema, true, durable)
	if err != nil {
		return DatasetInfo{}, err
	}
	defer func() { out.discard() }()
	var first *part // the file part once a dictionary changed
	defer func() { first.discard() }()
	dc := newDictColumns(schema)
	defer dc.release()
	var prog PutProgress
	var base int64 // bytes of the parts before out
	for {
		if err := ctx.Err(); err != nil {
			return DatasetInfo{}, fmt.Errorf("dataset %q: stream ended after %d batches: %w", name, prog.Batches, err)
		}
		if err := out.sy.failed(); err != nil {
			return DatasetInfo{}, fmt.Errorf("dataset %q: syncing after batch %d: %w", name, prog.Batches, err)
		}
		rec, err := rdr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return DatasetInfo{}, fmt.Errorf("dataset %q: after %d batches: %w", name, prog.Batches, err)
		}
		if err := validateRecord(rec); err != nil {
			return DatasetInfo{}, fmt.Errorf("dataset %q: batch %d: %w: %w", name, prog.Batches, errInvalidStream, err)
		}
		if dc != nil {
			if first == nil && prog.Batches > 0 && dc.changed(rec) {
				// The file holds the batches so far; the rest go to a
				// stream, unified at the end.
				if err := out.finish(); err != nil {
					return DatasetInfo{}, fmt.Errorf("dataset %q: %w", name, err)
				}
				first, base = out, out.cw.n
				out = nil
				if err := dc.startUnifying(s.mem); err != nil {
					return DatasetInfo{}, fmt.Errorf("dataset %q: batch %d: %w", name, prog.Batches, err)
				}
				if out, err = s.newPart(name, schema, false, durable); err != nil {
					return DatasetInfo{}, err
				}
			}
			if err := dc.observe(rec, prog.Batches); err != nil {
				return DatasetInfo{}, fmt.Errorf("dataset %q: batch %d: %w", name, prog.Batches, err)
			}
		}
		if err := out.write(rec); err != nil {
			return DatasetInfo{}, fmt.Errorf("dataset %q: writing batch %d: %w", name, prog.Batches, err)
		}
		prog.Batches++
		prog.Rows += rec.NumRows()
		prog.Bytes = base + out.cw.n
		out.sy.written(prog)
	}
	if err := out.finish(); err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: %w", name, err)
	}
	final := out
	if first != nil {
		if final, err = s.unifyParts(ctx, name, schema, first, out, dc); err != nil {
			return DatasetInfo{}, err
		}
		defer final.discard()
	}
	size := final.cw.n
	meta := datasetMeta{Rows: prog.Rows, Batches: prog.Batches, Bytes: size}
	if err := writeFileSync(filepath.Join(s.dir, name+metaExt), meta); err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: %w", name, err)
	}
	if err := ctx.Err(); err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: stream ended before commit: %w", name, err)
	}
	if err := os.Rename(final.path, s.path(name)); err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: committing: %w", name, err)
	}
	final.kept = true
	s.setMeta(name, meta)
	if err := syncDir(s.dir); err != nil {
		return DatasetInfo{}, fmt.Errorf("dataset %q: syncing data directory: %w", name, err)
	}
	return DatasetInfo{Name: name, Path: s.path(name), Schema: dc.schema(schema), Rows: prog.Rows, Batches: prog.Batches, Bytes: size}, nil
}

// syncDepth bounds the batches written but not yet synced.
const syncDepth = 16

// syncer fsyncs a file in the background: after each fsync it reports, as
// durable, the progress of the last batch written before the fsync began.
type syncer struct {
	f       *os.File
	durable func(PutProgress)
	queue   chan PutProgress
	done    chan struct{}
	stopped bool

	mu  sync.Mutex
	err error
}

func startSyncer(f *os.File, durable func(PutProgress)) *syncer {
	sy := &syncer{f: f, durable: durable, queue: make(chan PutProgress, syncDepth), done: make(chan struct{})}
	go sy.run()
	return sy
}

func (sy *syncer) run() {
	defer close(sy.done)
	for p := range sy.queue {
		// Everything written so far is covered by one fsync.
	drain:
		for {
			select {
			case q, ok := <-sy.queue:
				if !ok {
					break drain
				}
				p = q
			default:
				break drain
			}
		}
		if err := sy.f.Sync(); err != nil {
			sy.mu.Lock()
			sy.err = err
			sy.mu.Unlock()
			for range sy.queue { // let writers finish; acknowledge nothing more
			}
			return
		}
		if sy.durable != nil {
			sy.durable(p)
		}
	}
}

// written hands the progress after a fully written batch to the syncer.
// A nil syncer, and nil's other methods, do nothing.
func (sy *syncer) written(p PutProgress) {
	if sy != nil {
		sy.queue <- p
	}
}

// failed returns the error of a failed fsync, if any.
func (sy *syncer) failed() error {
	if sy == nil {
		return nil
	}
	sy.mu.Lock()
	defer sy.mu.Unlock()
	return sy.err
}

// stop waits until every written batch is synced (or an fsync failed) and
// returns the first fsync error. Later calls return the same.
func (sy *syncer) stop() error {
	if sy == nil {
		return nil
	}
	if !sy.stopped {
		sy.stopped = true
		close(sy.queue)
		<-sy.done
	}
	return sy.failed()
}

// writeFileSync writes v as JSON to path, atomically and synced.
func writeFileSync(path string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, raw, 0o644)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return err
	}
	return nil
}

// recordSource yields record batches of one schema; a batch is valid until
// the next Read. Read returns io.EOF at the end.
type recordSource interface {
	Schema() *arrow.Schema
	Read() (arrow.RecordBatch, error)
}
