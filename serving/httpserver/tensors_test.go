package httpserver

import (
	"runtime"
	"testing"

	"github.com/kilnml/kiln/core"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// FuzzDecodeInferRequest decodes arbitrary JSON and binary-extension
// inference request bodies: nothing may panic, every error is
// INVALID_ARGUMENT, and every input decoded holds as many bytes as its
// declared shape needs, never a buffer sized by the shape alone.
func FuzzDecodeInferRequest(f *testing.F) {
	f.Add([]byte(`{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[[1,2,3,4]]}]}`), "")
	f.Add([]byte(`{"id":"a","parameters":{"binary_data_output":true},"inputs":[{"name":"x","shape":[2],"datatype":"INT64","data":[1,2]}],"outputs":[{"name":"y","parameters":{"classification":2}}]}`), "")
	f.Add([]byte(`{"inputs":[{"name":"x","shape":[8589934592],"datatype":"FP32","data":[]}]}`), "")
	f.Add([]byte(`{"inputs":[{"name":"b","shape":[2],"datatype":"BOOL","data":[true,false]}]}`), "")
	f.Add([]byte(`{"inputs":[{"name":"c","shape":[3,1],"datatype":"BYTES","data":[["red"],[null],[""]]}]}`), "")
	f.Add([]byte(`{"inputs":[{"name":"c","shape":[2],"datatype":"BYTES","data":["a",1]}]}`), "")
	bin := `{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}`
	f.Add(append([]byte(bin), 0, 0, 128, 63, 0, 0, 0, 64), "96")
	f.Fuzz(func(t *testing.T, body []byte, headerLen string) {
		req, _, err := decodeInferRequest("m", "", body, headerLen)
		if err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("error without INVALID_ARGUMENT: %v", err)
			}
			return
		}
		for i, in := range req.pb.Inputs {
			if _, ok := in.GetParameters()["binary_data_size"]; ok {
				continue
			}
			if len(req.pb.RawInputContents[i]) > len(body)*8 {
				t.Fatalf("input %q: %d bytes decoded from a %d-byte body", in.Name, len(req.pb.RawInputContents[i]), len(body))
			}
		}
	})
}

// Decoding JSON "data" allocates about the typed tensor, not a value per
// element: a body of a million zeros grew about 50× (76 MiB of JSON took
// 3.8 GiB).
func TestJSONDataAllocatesLittle(t *testing.T) {
	const n = 1 << 20
	data := make([]byte, 0, 2*n+2)
	data = append(data, '[')
	for i := range n {
		if i > 0 {
			data = append(data, ',')
		}
		data = append(data, '0')
	}
	data = append(data, ']')
	in := jsonTensor{Name: "x", Shape: []int64{n}, Datatype: "FP32", Data: data}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	raw, err := jsonData(in)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) != 4*n {
		t.Fatalf("%d bytes, want %d", len(raw), 4*n)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 3*4*n {
		t.Fatalf("decoding %d bytes of JSON into %d bytes allocated %d bytes", len(data), 4*n, got)
	}
	// A declared shape larger than the values is refused before allocating.
	in.Shape = []int64{1 << 30}
	if _, err := jsonData(in); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("got %v, want INVALID_ARGUMENT", err)
	}
}

func TestJSONDataValues(t *testing.T) {
	for _, c := range []struct {
		data, dt string
		shape    []int64
		ok       bool
	}{
		{`[[1,2],[3,4]]`, "INT32", []int64{2, 2}, true},
		{`[ 1 , 2 ]`, "FP64", []int64{2}, true},
		{`7`, "INT8", nil, true},
		{`[true,false]`, "BOOL", []int64{2}, true},
		{`[]`, "FP32", []int64{0}, true},
		{`[1,]`, "FP32", []int64{1}, false},
		{`[1 2]`, "FP32", []int64{2}, false},
		{`["1"]`, "FP32", []int64{1}, false},
		{`[null]`, "FP32", []int64{1}, false},
		{`[1]]`, "FP32", []int64{1}, false},
		{`[[1]`, "FP32", []int64{1}, false},
		{`[300]`, "INT8", []int64{1}, false},
		{`[1.5]`, "INT32", []int64{1}, false},
		{`[1]`, "BOOL", []int64{1}, false},
		{`[01]`, "FP32", []int64{1}, false},
	} {
		_, err := jsonData(jsonTensor{Name: "x", Shape: c.shape, Datatype: c.dt, Data: []byte(c.data)})
		if (err == nil) != c.ok {
			t.Errorf("%s as %s %v: err %v, want ok=%v", c.data, c.dt, c.shape, err, c.ok)
		}
	}
}

// FuzzParseAliasMove: any body is an AliasMove or INVALID_ARGUMENT, never a
// panic.
func FuzzParseAliasMove(f *testing.F) {
	for _, s := range []string{`{"version": 2, "expected": 1, "reason": "better"}`, `{"version": "2"}`, `{}`, `{"version": -1}`,
		`{"version": 1} {"version": 2}`, `{"actor": "a", "verdict": "PROMOTE", "evaluation_id": 3}`, ``} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		m, err := ParseAliasMove(body)
		if err != nil {
			if core.CodeOf(err) != core.InvalidArgument {
				t.Fatalf("code %v: %v", core.CodeOf(err), err)
			}
			return
		}
		if m.Version < 0 || m.Expected < 0 || m.EvaluationID < 0 {
			t.Fatalf("accepted %+v", m)
		}
	})
}

// BYTES "data" (strings, null for empty) becomes length-prefixed raw
// contents; other values and a wrong count are INVALID_ARGUMENT.
func TestJSONBytesData(t *testing.T) {
	req, _, err := decodeInferRequest("m", "", []byte(`{"inputs":[{"name":"c","shape":[3,1],"datatype":"BYTES","data":[["red"],[null],["é"]]}]}`), "")
	if err != nil {
		t.Fatal(err)
	}
	want := "\x03\x00\x00\x00red\x00\x00\x00\x00\x02\x00\x00\x00é"
	if got := string(req.pb.RawInputContents[0]); got != want {
		t.Fatalf("raw %q, want %q", got, want)
	}
	for _, body := range []string{
		`{"inputs":[{"name":"c","shape":[2],"datatype":"BYTES","data":["a",1]}]}`,
		`{"inputs":[{"name":"c","shape":[3],"datatype":"BYTES","data":["a","b"]}]}`,
		`{"inputs":[{"name":"c","shape":[1],"datatype":"BYTES","data":{"a":1}}]}`,
	} {
		if _, _, err := decodeInferRequest("m", "", []byte(body), ""); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%s: got %v, want INVALID_ARGUMENT", body, err)
		}
	}
}
