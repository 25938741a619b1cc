// Package flighttest holds StatsTrainer, a real trainer of column
// statistics that exercises the Flight service's training job machinery in
// its tests and in the test server. (The models those tests serve are the
// flight-repo fixture of internal/testkit.)
package flighttest

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"

	"github.com/kilnml/kiln/serving/flightserver"
)

// StatsSpec is the spec StatsTrainer accepts.
type StatsSpec struct {
	// Dataset names the dataset (the server resolves it).
	Dataset string `json:"dataset"`
	// Columns are the numeric columns to summarize (default: every
	// numeric column).
	Columns []string `json:"columns"`
	// DelayMS is a pause after each batch, so that tests can observe a
	// running job and cancel it.
	DelayMS int `json:"delay_ms"`
	// FailAfter makes the job fail after that many batches when > 0.
	FailAfter int `json:"fail_after"`
}

// ColumnStats are the statistics of one column.
type ColumnStats struct {
	Count int64   `json:"count"`
	Mean  float64 `json:"mean"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
}

// StatsTrainer is a flightserver.Trainer that "fits" per-column statistics (count,
// mean, min, max) over a stored dataset batch by batch, reporting progress
// after each batch and the running means as metrics.
var StatsTrainer flightserver.Trainer = flightserver.TrainerFunc(trainStats)

func trainStats(ctx context.Context, raw json.RawMessage, path string, progress func(flightserver.Progress)) (json.RawMessage, error) {
	var spec StatsSpec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, fmt.Errorf("stats spec: %w", err)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rdr, err := ipc.NewFileReader(f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	defer rdr.Close()
	cols := spec.Columns
	if len(cols) == 0 {
		for _, fl := range rdr.Schema().Fields() {
			if arrow.IsInteger(fl.Type.ID()) || arrow.IsFloating(fl.Type.ID()) {
				cols = append(cols, fl.Name)
			}
		}
	}
	stats := map[string]*ColumnStats{}
	sums := map[string]float64{}
	for _, c := range cols {
		if len(rdr.Schema().FieldIndices(c)) != 1 {
			return nil, fmt.Errorf("dataset has no column %q", c)
		}
		stats[c] = &ColumnStats{Min: math.Inf(1), Max: math.Inf(-1)}
	}
	total := int64(rdr.NumRecords())
	for i := 0; i < rdr.NumRecords(); i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if spec.FailAfter > 0 && i >= spec.FailAfter {
			return nil, fmt.Errorf("failing after %d batches, as the spec asks", spec.FailAfter)
		}
		rec, err := rdr.RecordBatch(i)
		if err != nil {
			return nil, fmt.Errorf("batch %d: %w", i, err)
		}
		for _, c := range cols {
			col := rec.Column(rec.Schema().FieldIndices(c)[0])
			st := stats[c]
			for r := 0; r < col.Len(); r++ {
				if col.IsNull(r) {
					continue
				}
				v, err := number(col, r)
				if err != nil {
					return nil, fmt.Errorf("column %q: %w", c, err)
				}
				st.Count++
				sums[c] += v
				st.Min, st.Max = math.Min(st.Min, v), math.Max(st.Max, v)
			}
		}
		metrics := map[string]float64{}
		for _, c := range cols {
			if stats[c].Count > 0 {
				metrics[c+".mean"] = sums[c] / float64(stats[c].Count)
			}
		}
		progress(flightserver.Progress{Step: int64(i + 1), Total: total, Message: fmt.Sprintf("batch %d of %d", i+1, total), Metrics: metrics})
		if spec.DelayMS > 0 {
			select {
			case <-time.After(time.Duration(spec.DelayMS) * time.Millisecond):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}
	for _, c := range cols {
		if st := stats[c]; st.Count > 0 {
			st.Mean = sums[c] / float64(st.Count)
		}
	}
	return json.Marshal(stats)
}

func number(col arrow.Array, i int) (float64, error) {
	switch a := col.(type) {
	case *array.Float32:
		return float64(a.Value(i)), nil
	case *array.Float64:
		return a.Value(i), nil
	case *array.Int8:
		return float64(a.Value(i)), nil
	case *array.Int16:
		return float64(a.Value(i)), nil
	case *array.Int32:
		return float64(a.Value(i)), nil
	case *array.Int64:
		return float64(a.Value(i)), nil
	case *array.Uint8:
		return float64(a.Value(i)), nil
	case *array.Uint16:
		return float64(a.Value(i)), nil
	case *array.Uint32:
		return float64(a.Value(i)), nil
	case *array.Uint64:
		return float64(a.Value(i)), nil
	}
	return 0, fmt.Errorf("type %s is not numeric", col.DataType())
}
