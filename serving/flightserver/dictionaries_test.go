package flightserver_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	kflight "github.com/kilnml/kiln/serving/flightserver"
)

// categoricalBatch returns a batch of a dictionary<int8, string> column
// "c" whose dictionary is dict and whose rows are the dictionary's values
// at idx (-1: null), beside an int64 column "n" numbering the rows from
// first.
func categoricalBatch(t *testing.T, dict []string, idx []int, first int64) arrow.RecordBatch {
	t.Helper()
	mem := memory.DefaultAllocator
	db := array.NewStringBuilder(mem)
	defer db.Release()
	db.AppendValues(dict, nil)
	d := db.NewArray()
	defer d.Release()
	ib := array.NewInt8Builder(mem)
	defer ib.Release()
	nb := array.NewInt64Builder(mem)
	defer nb.Release()
	for i, x := range idx {
		if x < 0 {
			ib.AppendNull()
		} else {
			ib.Append(int8(x))
		}
		nb.Append(first + int64(i))
	}
	ind := ib.NewArray()
	defer ind.Release()
	dt := &arrow.DictionaryType{IndexType: arrow.PrimitiveTypes.Int8, ValueType: arrow.BinaryTypes.String}
	c := array.NewDictionaryArray(dt, ind, d)
	defer c.Release()
	n := nb.NewArray()
	defer n.Release()
	schema := arrow.NewSchema([]arrow.Field{{Name: "n", Type: arrow.PrimitiveTypes.Int64}, {Name: "c", Type: dt, Nullable: true}}, nil)
	return array.NewRecordBatch(schema, []arrow.Array{n, c}, int64(len(idx)))
}

// values returns column "c" of recs decoded, "<null>" for nulls.
func values(t *testing.T, recs []arrow.RecordBatch) []string {
	t.Helper()
	var out []string
	for _, r := range recs {
		c := r.Column(int(r.Schema().FieldIndices("c")[0])).(*array.Dictionary)
		dict := c.Dictionary().(*array.String)
		for i := 0; i < c.Len(); i++ {
			if c.IsNull(i) {
				out = append(out, "<null>")
			} else {
				out = append(out, dict.Value(c.GetValueIndex(i)))
			}
		}
	}
	return out
}

// A dictionary column whose dictionary changes between batches (what
// pyarrow sends for pa.concat_tables of categorical tables) is stored with
// one unified dictionary: DoGet returns the values sent, the column still
// dictionary-encoded, and the stored file reads back and validates.
func TestDoPutUnifiesChangingDictionaries(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	many := make([]string, 120)
	for i := range many {
		many[i] = fmt.Sprintf("v%03d", i)
	}
	cases := map[string]struct {
		recs  []arrow.RecordBatch
		index arrow.DataType
	}{
		"replaced": {recs: []arrow.RecordBatch{
			categoricalBatch(t, []string{"a", "b"}, []int{0, 1, -1, 0}, 0),
			categoricalBatch(t, []string{"a", "b"}, []int{1, 1}, 4),
			categoricalBatch(t, []string{"c", "a"}, []int{0, 1, 0, -1}, 6),
			categoricalBatch(t, []string{"c", "a"}, []int{}, 10),
			categoricalBatch(t, []string{"d", "b", "a"}, []int{2, 1, 0}, 10),
		}, index: arrow.PrimitiveTypes.Int8},
		// 240 categories outgrow int8's indices.
		"outgrown": {recs: []arrow.RecordBatch{
			categoricalBatch(t, many, []int{0, 119, 5}, 0),
			categoricalBatch(t, append([]string{"x"}, many[1:]...), []int{0, 1, 119}, 3),
			categoricalBatch(t, []string{"w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"}, []int{9}, 6),
			categoricalBatch(t, func() []string {
				s := make([]string, 110)
				for i := range s {
					s[i] = fmt.Sprintf("u%03d", i)
				}
				return s
			}(), []int{109, 0}, 7),
		}, index: arrow.PrimitiveTypes.Int16},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			acks, err := e.put(ctx, name, c.recs...)
			require.NoError(t, err)
			last := acks[len(acks)-1]
			require.True(t, last.Committed)
			require.EqualValues(t, len(c.recs), last.Batches)
			back := e.get(t, ctx, name)
			require.Len(t, back, len(c.recs))
			require.Equal(t, values(t, c.recs), values(t, back))
			for i, r := range back {
				require.NoError(t, array.ValidateRecordFull(r), "batch %d", i)
				require.Equal(t, c.recs[i].NumRows(), r.NumRows())
				require.True(t, array.Equal(c.recs[i].Column(0), r.Column(0)))
				dt := r.Schema().Field(1).Type.(*arrow.DictionaryType)
				require.True(t, arrow.TypeEqual(c.index, dt.IndexType), "index type %s", dt.IndexType)
				require.True(t, arrow.TypeEqual(arrow.BinaryTypes.String, dt.ValueType))
			}
			// The file itself: one dictionary, every batch valid.
			f, err := os.Open(filepath.Join(e.data, name+".arrow"))
			require.NoError(t, err)
			defer f.Close()
			fr, err := ipc.NewFileReader(f)
			require.NoError(t, err)
			defer fr.Close()
			require.Equal(t, 1, fr.NumDictionaries())
			info, err := e.srv.Dataset(name)
			require.NoError(t, err)
			require.EqualValues(t, values(t, c.recs), values(t, back))
			require.EqualValues(t, len(values(t, c.recs)), info.Rows)
			require.Equal(t, []string{name + ".arrow", name + ".meta.json"}, filterPrefix(visibleFiles(t, e.data), name), "no temporary file left")
		})
	}
}

// A dictionary column whose dictionary never changes comes back as it was
// sent, batch for batch.
func TestDoPutKeepsSteadyDictionaries(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	recs := []arrow.RecordBatch{
		categoricalBatch(t, []string{"a", "b"}, []int{0, 1, -1}, 0),
		categoricalBatch(t, []string{"a", "b"}, []int{1, 0}, 3),
	}
	_, err := e.put(ctx, "steady", recs...)
	require.NoError(t, err)
	back := e.get(t, ctx, "steady")
	require.Len(t, back, 2)
	for i := range recs {
		require.True(t, array.RecordEqual(recs[i], back[i]), "batch %d", i)
		require.True(t, recs[i].Schema().Equal(back[i].Schema()))
	}
}

func filterPrefix(names []string, prefix string) []string {
	var out []string
	for _, n := range names {
		if len(n) >= len(prefix) && n[:len(prefix)] == prefix {
			out = append(out, n)
		}
	}
	return out
}

// A dictionary nested in a struct is not unified: a change of it is
// UNIMPLEMENTED (the client's data, not a server fault), and nothing is
// stored.
func TestDoPutNestedDictionaryChangeIsUnsupported(t *testing.T) {
	e := start(t, kflight.Options{})
	ctx := ctxT(t)
	nested := func(dict []string, idx []int) arrow.RecordBatch {
		c := categoricalBatch(t, dict, idx, 0)
		defer c.Release()
		s, err := array.NewStructArray([]arrow.Array{c.Column(1)}, []string{"c"})
		require.NoError(t, err)
		defer s.Release()
		schema := arrow.NewSchema([]arrow.Field{{Name: "s", Type: s.DataType()}}, nil)
		return array.NewRecordBatch(schema, []arrow.Array{s}, int64(len(idx)))
	}
	_, err := e.put(ctx, "nested", nested([]string{"a"}, []int{0}), nested([]string{"b"}, []int{0}))
	requireCode(t, err, codes.Unimplemented, "Arrow IPC file")
	require.Empty(t, visibleFiles(t, e.data))
}
