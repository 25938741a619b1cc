package httpserver

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/kilnml/kiln/core"
	pb "github.com/kilnml/kiln/serving/inferencepb"
	"github.com/kilnml/kiln/serving/repository"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

type jsonTensor struct {
	Name       string                     `json:"name"`
	Shape      []int64                    `json:"shape"`
	Datatype   string                     `json:"datatype"`
	Parameters map[string]json.RawMessage `json:"parameters"`
	Data       json.RawMessage            `json:"data"`
}

type jsonOutput struct {
	Name       string                     `json:"name"`
	Parameters map[string]json.RawMessage `json:"parameters"`
}

type jsonInferRequest struct {
	ID         string                     `json:"id"`
	Parameters map[string]json.RawMessage `json:"parameters"`
	Inputs     []jsonTensor               `json:"inputs"`
	Outputs    []jsonOutput               `json:"outputs"`
}

// inferRequest is an HTTP inference request decoded into the gRPC form.
type inferRequest struct {
	pb *pb.ModelInferRequest
	// binaryOutput is the default for outputs that do not say (the
	// request's "binary_data_output" parameter).
	binaryOutput bool
	timeout      time.Duration
}

// outputChoice records, per requested output name, whether it goes back
// binary.
type outputChoice map[string]bool

func boolParam(params map[string]json.RawMessage, key string) (value, ok bool, err error) {
	raw, ok := params[key]
	if !ok {
		return false, false, nil
	}
	if err := json.Unmarshal(raw, &value); err != nil {
		return false, false, invalid("parameter %q must be true or false, got %s", key, raw)
	}
	return value, true, nil
}

// decodeInferRequest decodes a JSON (or binary data extension) inference
// request body into the gRPC request, every input's data in
// raw_input_contents.
func decodeInferRequest(model, version string, body []byte, headerLen string) (*inferRequest, outputChoice, error) {
	jsonPart, bin := body, []byte(nil)
	if headerLen != "" {
		n, err := strconv.ParseInt(headerLen, 10, 64)
		if err != nil || n < 0 || n > int64(len(body)) {
			return nil, nil, invalid("%s is %q; the body holds %d bytes", HeaderLength, headerLen, len(body))
		}
		jsonPart, bin = body[:n], body[n:]
	}
	var jr jsonInferRequest
	dec := json.NewDecoder(bytes.NewReader(jsonPart))
	if err := dec.Decode(&jr); err != nil {
		return nil, nil, invalid("invalid inference request JSON: %v", err)
	}
	req := &inferRequest{pb: &pb.ModelInferRequest{ModelName: model, ModelVersion: version, Id: jr.ID}}
	var err error
	if req.binaryOutput, _, err = boolParam(jr.Parameters, "binary_data_output"); err != nil {
		return nil, nil, err
	}
	if req.timeout, err = requestTimeout(jr.Parameters); err != nil {
		return nil, nil, err
	}
	req.pb.Parameters = scalarParameters(jr.Parameters)
	if len(jr.Inputs) == 0 {
		return nil, nil, invalid("model %q: the request has no inputs", model)
	}
	off := 0
	for _, in := range jr.Inputs {
		if in.Name == "" {
			return nil, nil, invalid("an input has no name")
		}
		if _, shm := in.Parameters["shared_memory_region"]; shm {
			return nil, nil, invalid("input %q: shared memory is not supported", in.Name)
		}
		var data []byte
		if raw, ok := in.Parameters["binary_data_size"]; ok {
			var size int64
			if err := json.Unmarshal(raw, &size); err != nil || size < 0 {
				return nil, nil, invalid("input %q: binary_data_size must be a byte count, got %s", in.Name, raw)
			}
			if in.Data != nil {
				return nil, nil, invalid("input %q: give either binary data or \"data\", not both", in.Name)
			}
			if size > int64(len(bin)-off) {
				return nil, nil, invalid("input %q: binary_data_size is %d but only %d bytes of binary data remain", in.Name, size, len(bin)-off)
			}
			data = bin[off : off+int(size)]
			off += int(size)
		} else {
			if in.Data == nil {
				return nil, nil, invalid("input %q: no data: neither \"data\" nor a binary_data_size parameter", in.Name)
			}
			if data, err = jsonData(in); err != nil {
				return nil, nil, err
			}
		}
		req.pb.Inputs = append(req.pb.Inputs, &pb.ModelInferRequest_InferInputTensor{Name: in.Name, Datatype: in.Datatype, Shape: in.Shape})
		req.pb.RawInputContents = append(req.pb.RawInputContents, data)
	}
	if off != len(bin) {
		return nil, nil, invalid("the body holds %d bytes of binary data, the inputs' binary_data_size add up to %d", len(bin), off)
	}
	choice := outputChoice{}
	for _, o := range jr.Outputs {
		if _, shm := o.Parameters["shared_memory_region"]; shm {
			return nil, nil, invalid("output %q: shared memory is not supported", o.Name)
		}
		binOut, ok, err := boolParam(o.Parameters, "binary_data")
		if err != nil {
			return nil, nil, fmt.Errorf("output %q: %w", o.Name, err)
		}
		if !ok {
			binOut = req.binaryOutput
		}
		choice[o.Name] = binOut
		po := &pb.ModelInferRequest_InferRequestedOutputTensor{Name: o.Name}
		if raw, ok := o.Parameters["classification"]; ok {
			var k int64
			if err := json.Unmarshal(raw, &k); err != nil {
				return nil, nil, invalid("output %q: classification must be a class count, got %s", o.Name, raw)
			}
			if k != 0 { // tritonclient sends 0 for "no classification"
				po.Parameters = map[string]*pb.InferParameter{"classification": {ParameterChoice: &pb.InferParameter_Int64Param{Int64Param: k}}}
			}
		}
		req.pb.Outputs = append(req.pb.Outputs, po)
	}
	return req, choice, nil
}

// jsonBytesData converts a BYTES input's JSON "data" (strings, in nested
// lists or flat; null for an empty element) to the raw form, each element
// a 4-byte little-endian length and its bytes, checking the count against
// the declared shape. Memory grows with the bytes received only.
func jsonBytesData(in jsonTensor) ([]byte, error) {
	var tree any
	dec := json.NewDecoder(bytes.NewReader(in.Data))
	if err := dec.Decode(&tree); err != nil {
		return nil, invalid("input %q: invalid \"data\": %v", in.Name, err)
	}
	var buf []byte
	var count int64
	var walk func(v any, depth int) error
	walk = func(v any, depth int) error {
		if depth > 64 {
			return invalid("input %q: \"data\" nests deeper than 64 lists", in.Name)
		}
		switch t := v.(type) {
		case []any:
			for _, e := range t {
				if err := walk(e, depth+1); err != nil {
					return err
				}
			}
			return nil
		case string:
			buf = binary.LittleEndian.AppendUint32(buf, uint32(len(t)))
			buf = append(buf, t...)
		case nil:
			buf = binary.LittleEndian.AppendUint32(buf, 0)
		default:
			return invalid("input %q: BYTES values must be strings (or null), got %v", in.Name, t)
		}
		count++
		return nil
	}
	if err := walk(tree, 0); err != nil {
		return nil, err
	}
	want := int64(1)
	for _, d := range in.Shape {
		if d < 0 || (d != 0 && want > math.MaxInt32/d) {
			want = -1
			break
		}
		want *= d
	}
	if want >= 0 && count != want {
		return nil, invalid("input %q: \"data\" holds %d values, shape %v needs %d", in.Name, count, in.Shape, want)
	}
	return buf, nil
}

// notNumberError is a leaf of JSON "data" that is no number, true or
// false (a string, null, an object).
type notNumberError struct{ tok []byte }

func (e notNumberError) Error() string {
	return fmt.Sprintf("value %s is not a number, true or false", e.tok)
}

// jsonLeaves walks the (nested) JSON array data and calls leaf with each
// leaf's bytes (a number, true or false; anything else is an error), in
// order; it allocates nothing. With leaf nil it only counts and checks.
func jsonLeaves(data []byte, leaf func(tok []byte) error) (int64, error) {
	var n int64
	depth := 0
	i := 0
	skip := func() {
		for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
			i++
		}
	}
	// expectValue: after '[' or ',' a value must come.
	expectValue, first := true, true
	for {
		skip()
		if i >= len(data) {
			if depth != 0 || first {
				return 0, errors.New("unexpected end of \"data\"")
			}
			return n, nil
		}
		if depth == 0 && !first {
			return 0, fmt.Errorf("unexpected %q after \"data\"", data[i])
		}
		c := data[i]
		switch {
		case c == '[':
			if !expectValue {
				return 0, fmt.Errorf("unexpected '[' at byte %d", i)
			}
			if depth++; depth > 64 {
				return 0, errors.New("\"data\" nests deeper than 64 arrays")
			}
			i++
			first = false
			skip()
			if i < len(data) && data[i] == ']' { // empty array
				i++
				depth--
				expectValue = false
				continue
			}
			expectValue = true
		case c == ']':
			if expectValue || depth == 0 {
				return 0, fmt.Errorf("unexpected ']' at byte %d", i)
			}
			i++
			depth--
		case c == ',':
			if expectValue || depth == 0 {
				return 0, fmt.Errorf("unexpected ',' at byte %d", i)
			}
			i++
			expectValue = true
		default:
			if !expectValue {
				return 0, fmt.Errorf("unexpected %q at byte %d", c, i)
			}
			j := i
			for j < len(data) && !strings.ContainsRune(" \t\n\r,[]", rune(data[j])) {
				j++
			}
			tok := data[i:j]
			if !(tok[0] == '-' || (tok[0] >= '0' && tok[0] <= '9') || string(tok) == "true" || string(tok) == "false") {
				return 0, notNumberError{tok}
			}
			if leaf != nil {
				if err := leaf(tok); err != nil {
					return 0, err
				}
			}
			n++
			i = j
			first = false
			expectValue = false
		}
	}
}

// jsonData converts an input's JSON "data" to raw little-endian bytes of
// its datatype. It streams: the values are counted and checked against
// the declared shape first, then parsed straight into a buffer of exactly
// that many elements, with no intermediate value per element.
func jsonData(in jsonTensor) ([]byte, error) {
	dt := repository.DataType(in.Datatype)
	if dt == repository.Bytes {
		return jsonBytesData(in)
	}
	if !dt.Known() {
		return nil, invalid("input %q: datatype %q cannot be given as JSON \"data\"", in.Name, in.Datatype)
	}
	count, err := jsonLeaves(in.Data, nil)
	var nn notNumberError
	if errors.As(err, &nn) {
		if dt == repository.Bool {
			return nil, invalid("input %q: BOOL values must be true or false, got %s", in.Name, nn.tok)
		}
		return nil, invalid("input %q: %s values must be numbers, got %s", in.Name, dt, nn.tok)
	}
	if err != nil {
		return nil, invalid("input %q: invalid \"data\": %v", in.Name, err)
	}
	want := int64(1)
	for _, d := range in.Shape {
		if d < 0 || (d != 0 && want > math.MaxInt32/d) {
			want = -1
			break
		}
		want *= d
	}
	if want >= 0 && count != want {
		return nil, invalid("input %q: \"data\" holds %d values, shape %v needs %d", in.Name, count, in.Shape, want)
	}
	size := dt.Size()
	buf := make([]byte, 0, count*int64(size))
	le := binary.LittleEndian
	_, err = jsonLeaves(in.Data, func(tok []byte) error {
		s := string(tok)
		bad := func(err error) error {
			return invalid("input %q: value %s is not a valid %s: %v", in.Name, s, dt, err)
		}
		isBool := s == "true" || s == "false"
		if dt == repository.Bool {
			if !isBool {
				return invalid("input %q: BOOL values must be true or false, got %s", in.Name, s)
			}
			if s == "true" {
				buf = append(buf, 1)
			} else {
				buf = append(buf, 0)
			}
			return nil
		}
		if isBool || !json.Valid(tok) {
			return invalid("input %q: %s values must be numbers, got %s", in.Name, dt, s)
		}
		switch dt {
		case repository.FP32, repository.FP16, repository.BF16:
			f, err := strconv.ParseFloat(s, 32)
			if err != nil {
				return bad(err)
			}
			switch dt {
			case repository.FP32:
				buf = le.AppendUint32(buf, math.Float32bits(float32(f)))
			case repository.FP16:
				buf = le.AppendUint16(buf, uint16(core.HalfFromFloat32(float32(f))))
			default:
				buf = le.AppendUint16(buf, uint16(core.BHalfFromFloat32(float32(f))))
			}
		case repository.FP64:
			f, err := strconv.ParseFloat(s, 64)
			if err != nil {
				return bad(err)
			}
			buf = le.AppendUint64(buf, math.Float64bits(f))
		case repository.Uint8, repository.Uint16, repository.Uint32, repository.Uint64:
			u, err := strconv.ParseUint(s, 10, size*8)
			if err != nil {
				return bad(err)
			}
			buf = appendInt(buf, u, size)
		default: // signed integers
			i, err := strconv.ParseInt(s, 10, size*8)
			if err != nil {
				return bad(err)
			}
			buf = appendInt(buf, uint64(i), size)
		}
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, invalid("input %q: invalid \"data\": %v", in.Name, err)
	}
	return buf, nil
}

func appendInt(buf []byte, v uint64, size int) []byte {
	le := binary.LittleEndian
	switch size {
	case 1:
		return append(buf, byte(v))
	case 2:
		return le.AppendUint16(buf, uint16(v))
	case 4:
		return le.AppendUint32(buf, uint32(v))
	}
	return le.AppendUint64(buf, v)
}

type jsonOutputTensor struct {
	Name       string          `json:"name"`
	Datatype   string          `json:"datatype"`
	Shape      []int64         `json:"shape"`
	Parameters map[string]any  `json:"parameters,omitempty"`
	Data       json.RawMessage `json:"data,omitempty"`
}

type jsonInferResponse struct {
	ModelName    string             `json:"model_name"`
	ModelVersion string             `json:"model_version"`
	ID           string             `json:"id,omitempty"`
	Outputs      []jsonOutputTensor `json:"outputs"`
}

// encodeInferResponse returns the JSON part of the response and the binary
// part (empty when every output is JSON).
func encodeInferResponse(resp *pb.ModelInferResponse, choice outputChoice, binaryDefault bool) ([]byte, []byte, error) {
	out := jsonInferResponse{ModelName: resp.ModelName, ModelVersion: resp.ModelVersion, ID: resp.Id}
	var bin []byte
	for i, o := range resp.Outputs {
		raw := resp.RawOutputContents[i]
		t := jsonOutputTensor{Name: o.Name, Datatype: o.Datatype, Shape: o.Shape}
		isBin, ok := choice[o.Name]
		if !ok {
			isBin = binaryDefault
		}
		if isBin {
			t.Parameters = map[string]any{"binary_data_size": len(raw)}
			bin = append(bin, raw...)
		} else {
			data, err := jsonValues(o.Name, repository.DataType(o.Datatype), raw)
			if err != nil {
				return nil, nil, err
			}
			t.Data = data
		}
		out.Outputs = append(out.Outputs, t)
	}
	header, err := json.Marshal(out)
	if err != nil {
		return nil, nil, status.Errorf(codes.Internal, "encoding the response: %v", err)
	}
	return header, bin, nil
}

// jsonValues writes raw little-endian elements of dt as a flat JSON array.
func jsonValues(name string, dt repository.DataType, raw []byte) ([]byte, error) {
	le := binary.LittleEndian
	buf := []byte{'['}
	if dt == repository.Bytes {
		for k := 0; len(raw) > 0; k++ {
			if len(raw) < 4 || int(le.Uint32(raw)) > len(raw)-4 {
				return nil, status.Errorf(codes.Internal, "output %q: malformed BYTES element %d", name, k)
			}
			n := int(le.Uint32(raw))
			s, _ := json.Marshal(string(raw[4 : 4+n]))
			if k > 0 {
				buf = append(buf, ',')
			}
			buf = append(buf, s...)
			raw = raw[4+n:]
		}
		return append(buf, ']'), nil
	}
	size := dt.Size()
	if size == 0 || len(raw)%size != 0 {
		return nil, status.Errorf(codes.Internal, "output %q: %d bytes of %s", name, len(raw), dt)
	}
	for i := 0; i < len(raw); i += size {
		if i > 0 {
			buf = append(buf, ',')
		}
		b := raw[i:]
		var f float64
		isFloat := true
		switch dt {
		case repository.Bool:
			buf = strconv.AppendBool(buf, b[0] != 0)
			continue
		case repository.Uint8:
			buf = strconv.AppendUint(buf, uint64(b[0]), 10)
			continue
		case repository.Uint16:
			buf = strconv.AppendUint(buf, uint64(le.Uint16(b)), 10)
			continue
		case repository.Uint32:
			buf = strconv.AppendUint(buf, uint64(le.Uint32(b)), 10)
			continue
		case repository.Uint64:
			buf = strconv.AppendUint(buf, le.Uint64(b), 10)
			continue
		case repository.Int8:
			buf = strconv.AppendInt(buf, int64(int8(b[0])), 10)
			continue
		case repository.Int16:
			buf = strconv.AppendInt(buf, int64(int16(le.Uint16(b))), 10)
			continue
		case repository.Int32:
			buf = strconv.AppendInt(buf, int64(int32(le.Uint32(b))), 10)
			continue
		case repository.Int64:
			buf = strconv.AppendInt(buf, int64(le.Uint64(b)), 10)
			continue
		case repository.FP16:
			f = float64(core.Half(le.Uint16(b)).Float32())
		case repository.BF16:
			f = float64(core.BHalf(le.Uint16(b)).Float32())
		case repository.FP32:
			f = float64(math.Float32frombits(le.Uint32(b)))
		case repository.FP64:
			f = math.Float64frombits(le.Uint64(b))
		default:
			isFloat = false
		}
		if !isFloat {
			return nil, status.Errorf(codes.Internal, "output %q: cannot write %s as JSON", name, dt)
		}
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, status.Errorf(codes.Internal, "output %q holds %v, which JSON cannot represent; request it as binary data", name, f)
		}
		bits := 64
		if dt != repository.FP64 {
			bits = 32
		}
		buf = strconv.AppendFloat(buf, f, 'g', -1, bits)
	}
	return append(buf, ']'), nil
}

// scalarParameters converts a request's string, integer and boolean
// parameters to the gRPC request's, as a rollout's sticky parameter reads
// them (others are left out: the server reads those from the JSON itself).
func scalarParameters(ps map[string]json.RawMessage) map[string]*pb.InferParameter {
	var out map[string]*pb.InferParameter
	for k, raw := range ps {
		var p *pb.InferParameter
		var str string
		var i int64
		var b bool
		switch {
		case json.Unmarshal(raw, &str) == nil:
			p = &pb.InferParameter{ParameterChoice: &pb.InferParameter_StringParam{StringParam: str}}
		case json.Unmarshal(raw, &i) == nil:
			p = &pb.InferParameter{ParameterChoice: &pb.InferParameter_Int64Param{Int64Param: i}}
		case json.Unmarshal(raw, &b) == nil:
			p = &pb.InferParameter{ParameterChoice: &pb.InferParameter_BoolParam{BoolParam: b}}
		default:
			continue
		}
		if out == nil {
			out = make(map[string]*pb.InferParameter, len(ps))
		}
		out[k] = p
	}
	return out
}
