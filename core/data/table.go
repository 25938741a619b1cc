// Package data prepares tabular data for training: a column Table read
// from CSV, preprocessing fitted on the training split (imputation,
// standardization or min-max scaling, one-hot encoding, label encoding)
// that compiles into TorchScript so a saved model takes raw features,
// seeded and optionally stratified splits, and an in-memory Dataset with a
// per-epoch shuffle and a batch iterator.
package data

import (
	"bytes"
	"crypto/sha256"
	"encoding/csv"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/kilnml/kiln/core"
)

// Column is one column of a Table: numeric (Num, NaN where missing) or
// categorical (Str, "" where missing).
type Column struct {
	Name        string
	Categorical bool
	Num         []float64
	Str         []string
}

// Len returns the number of rows.
func (c *Column) Len() int {
	if c.Categorical {
		return len(c.Str)
	}
	return len(c.Num)
}

// Missing reports whether row i has no value.
func (c *Column) Missing(i int) bool {
	if c.Categorical {
		return c.Str[i] == ""
	}
	return math.IsNaN(c.Num[i])
}

// Table is a set of equally long named columns.
type Table struct {
	Columns []*Column
	// Fingerprint is the hex SHA-256 of the bytes the table was read from
	// (or of its values, for tables built in memory): the data lineage a
	// model package records.
	Fingerprint string
}

// Rows returns the number of rows.
func (t *Table) Rows() int {
	if len(t.Columns) == 0 {
		return 0
	}
	return t.Columns[0].Len()
}

// Names returns the column names in order.
func (t *Table) Names() []string {
	n := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		n[i] = c.Name
	}
	return n
}

// Column returns the named column, or an error naming it and listing the
// columns there are.
func (t *Table) Column(name string) (*Column, error) { return t.Lookup(name, "column") }

// Lookup is Column with the column's role named in the error, e.g.
// `target column "price" not found`.
func (t *Table) Lookup(name, role string) (*Column, error) {
	for _, c := range t.Columns {
		if c.Name == name {
			return c, nil
		}
	}
	names := t.Names()
	if len(names) > 12 {
		names = append(names[:12], fmt.Sprintf("... (%d in all)", len(t.Columns)))
	}
	return nil, fmt.Errorf("kiln: %s %q not found; the data has columns %s", role, name, strings.Join(names, ", "))
}

// missingToken reports whether a CSV cell means "no value".
func missingToken(s string) bool {
	switch strings.ToLower(s) {
	case "", "na", "nan", "null", "none", "?":
		return true
	}
	return false
}

// ReadCSVFile reads a CSV file with a header row; see ReadCSV.
func ReadCSVFile(path string) (*Table, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kiln: read csv: %w", err)
	}
	t, err := ReadCSV(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return t, nil
}

// ReadCSV reads CSV with a header row. A column whose every present value
// parses as a number is numeric; any other is categorical. Empty cells and
// NA, NaN, null, none, ? are missing values. Every row must have the
// header's number of fields. Malformed CSV (ragged rows, bad quoting, an
// empty or repeated column name, no header) is an INVALID_ARGUMENT error;
// an error reading r is returned wrapped. Memory grows with the bytes
// read, never with a count the data declares.
func ReadCSV(r io.Reader) (*Table, error) {
	h := sha256.New()
	cr := csv.NewReader(io.TeeReader(r, h))
	cr.ReuseRecord = false
	readErr := func(what string, err error) error {
		var pe *csv.ParseError
		if errors.As(err, &pe) {
			return core.Errorf(core.InvalidArgument, "kiln: %s: %v", what, err)
		}
		return fmt.Errorf("kiln: %s: %w", what, err)
	}
	header, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return nil, core.Errorf(core.InvalidArgument, "kiln: csv: empty input, no header row")
	}
	if err != nil {
		return nil, readErr("csv header", err)
	}
	seen := map[string]bool{}
	for i, n := range header {
		n = strings.TrimSpace(n)
		if n == "" {
			return nil, core.Errorf(core.InvalidArgument, "kiln: csv: column %d has an empty name", i+1)
		}
		if seen[n] {
			return nil, core.Errorf(core.InvalidArgument, "kiln: csv: column %q appears twice", n)
		}
		seen[n] = true
		header[i] = n
	}
	cells := make([][]string, len(header))
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, readErr("csv", err)
		}
		for i, v := range rec {
			cells[i] = append(cells[i], strings.TrimSpace(v))
		}
	}
	t := &Table{}
	for i, name := range header {
		t.Columns = append(t.Columns, parseColumn(name, cells[i]))
	}
	t.Fingerprint = hex.EncodeToString(h.Sum(nil))
	return t, nil
}

func parseColumn(name string, cells []string) *Column {
	nums := make([]float64, len(cells))
	for i, s := range cells {
		if missingToken(s) {
			nums[i] = math.NaN()
			continue
		}
		v, err := strconv.ParseFloat(s, 64)
		if err != nil || math.IsInf(v, 0) {
			strs := make([]string, len(cells))
			for j, s := range cells {
				if !missingToken(s) {
					strs[j] = s
				}
			}
			return &Column{Name: name, Categorical: true, Str: strs}
		}
		nums[i] = v
	}
	return &Column{Name: name, Num: nums}
}

// NewTable builds a table of numeric columns from row-major values
// (rows×len(names)), e.g. an exported array.
func NewTable(names []string, values []float64) (*Table, error) {
	if len(names) == 0 {
		return nil, errors.New("kiln: table with no columns")
	}
	if len(values)%len(names) != 0 {
		return nil, fmt.Errorf("kiln: %d values do not fill rows of %d columns", len(values), len(names))
	}
	rows := len(values) / len(names)
	h := sha256.New()
	t := &Table{}
	for j, n := range names {
		c := &Column{Name: n, Num: make([]float64, rows)}
		for i := range rows {
			c.Num[i] = values[i*len(names)+j]
		}
		t.Columns = append(t.Columns, c)
		fmt.Fprintf(h, "%s\x00", n)
	}
	for _, v := range values {
		fmt.Fprintf(h, "%x,", math.Float64bits(v))
	}
	t.Fingerprint = hex.EncodeToString(h.Sum(nil))
	return t, nil
}
