package serving

// The soak's clients (TestSoak): what each protocol's client sends and
// what it expects back. Each client sends one request (or stream) after
// the other; about one in five is invalid, picked from its protocol's
// cases, each with the one error code it must get.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/apache/arrow-go/v18/arrow"
	"github.com/apache/arrow-go/v18/arrow/array"
	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/apache/arrow-go/v18/arrow/ipc"
	"github.com/apache/arrow-go/v18/arrow/memory"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// soakTimeout bounds one request or stream, so that a hung call shows as
// a problem instead of hanging the test. It asserts nothing about speed:
// on a loaded machine requests take milliseconds to seconds.
const soakTimeout = 2 * time.Minute

// soakInput returns rows×4 values unique to client, seq and element
// (exact in float32, and so are their results).
func soakInput(client, seq, rows int) []float32 {
	x := make([]float32, 4*rows)
	for i := range x {
		x[i] = float32(client*4096 + (seq%256)*16 + i)
	}
	return x
}

// checkAffine returns what is wrong with y and s as the answer of affine
// (or tight) version v to x: y = x·(v+1) + 1, s = row sums of x.
func checkAffine(v int, x, y, s []float32) error {
	scale := float32(v + 1)
	rows := len(x) / 4
	if len(y) != len(x) || len(s) != rows {
		return fmt.Errorf("%d y and %d s values for %d rows (cross-talk?)", len(y), len(s), rows)
	}
	for r := range rows {
		var sum float32
		for j := range 4 {
			sum += x[4*r+j]
			if want := x[4*r+j]*scale + 1; y[4*r+j] != want {
				return fmt.Errorf("y[%d,%d] = %v, want %v (cross-talk?)", r, j, y[4*r+j], want)
			}
		}
		if s[r] != sum {
			return fmt.Errorf("s[%d] = %v, want %v (cross-talk?)", r, s[r], sum)
		}
	}
	return nil
}

// soakValid is a valid request's target: "affine" (queue of 512, room for
// every client) or, one time in four, "tight" (queue of 8, which may
// refuse it), and the version, 1 or 2.
func soakValid(rng *rand.Rand) (model string, version int) {
	model = "affine"
	if rng.IntN(4) == 0 {
		model = "tight"
	}
	return model, 1 + rng.IntN(2)
}

// expectCode counts a gRPC outcome and reports it unless it is want.
func (s *soak) expectCode(proto, kase, who string, err error, want codes.Code) {
	got := status.Code(err)
	s.counts.add(proto, kase, got.String())
	if got != want {
		s.counts.problem("%s %s (%s): got %v, want %v", proto, kase, who, err, want)
	}
}

// validOutcome counts a valid request's error: RESOURCE_EXHAUSTED from
// tight is allowed, anything else is a problem.
func (s *soak) validError(proto, who, model string, err error) {
	code := status.Code(err)
	s.counts.add(proto, "valid", code.String())
	if code != codes.ResourceExhausted || model != "tight" {
		s.counts.problem("%s valid (%s): %v", proto, who, err)
	}
}

// grpcCase is an invalid KServe request, the code it must get, and a
// fragment of the message ModelStreamInfer answers it with.
type grpcCase struct {
	kase     string
	req      *pb.ModelInferRequest
	code     codes.Code
	fragment string
}

// invalidInfer returns one of the invalid requests both gRPC calls send.
func invalidInfer(rng *rand.Rand, id string, x []float32) grpcCase {
	rows := len(x) / 4
	req := &pb.ModelInferRequest{ModelName: "affine", Id: id,
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(rows), 4}}},
		RawInputContents: [][]byte{rawF32(x...)}}
	switch rng.IntN(6) {
	case 0:
		req.ModelName = "no-such-model"
		return grpcCase{"unknown model", req, codes.NotFound, "no-such-model"}
	case 1:
		req.ModelVersion = "9"
		return grpcCase{"unknown version", req, codes.NotFound, "version"}
	case 2:
		req.Inputs[0].Shape = []int64{int64(4 * rows)} // the same values, one dimension
		return grpcCase{"wrong shape", req, codes.InvalidArgument, "shape"}
	case 3:
		req.Inputs[0].Datatype = "INT32"
		return grpcCase{"wrong datatype", req, codes.InvalidArgument, "INT32"}
	case 4:
		req.RawInputContents[0] = req.RawInputContents[0][4:]
		return grpcCase{"short data", req, codes.InvalidArgument, "bytes"}
	default:
		req.ModelName = "corrupt" // failed to load: not ready
		return grpcCase{"model not ready", req, codes.Unavailable, "corrupt"}
	}
}

// overLimit returns a request whose message is just over soakMaxMessage.
func overLimit(id string) *pb.ModelInferRequest {
	rows := soakMaxMessage/16 + 1
	return &pb.ModelInferRequest{ModelName: "affine", Id: id,
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(rows), 4}}},
		RawInputContents: [][]byte{make([]byte, 16*rows)}}
}

// garbage is not a protobuf message: field 1 claims 100 bytes, 2 follow.
var garbage = []byte{0x0a, 0x64, 'a', 'b'}

func (s *soak) grpcInfer(client, seq int, rng *rand.Rand) {
	c := s.infer[client%len(s.infer)]
	conn := s.conns[client%len(s.conns)]
	rows := 1 + rng.IntN(4)
	x := soakInput(client, seq, rows)
	who := fmt.Sprintf("client %d request %d", client, seq)
	ctx, cancel := context.WithTimeout(context.Background(), soakTimeout)
	defer cancel()
	if rng.IntN(5) == 0 {
		switch rng.IntN(10) {
		case 0:
			var out []byte
			err := conn.Invoke(ctx, "/inference.GRPCInferenceService/ModelInfer", garbage, &out, grpc.ForceCodecV2(rawCodec{}))
			s.expectCode(protoInfer, "malformed message", who, err, codes.InvalidArgument)
		case 1:
			_, err := c.ModelInfer(ctx, overLimit(who))
			s.expectCode(protoInfer, "over the message limit", who, err, codes.ResourceExhausted)
		default:
			bad := invalidInfer(rng, who, x)
			_, err := c.ModelInfer(ctx, bad.req)
			s.expectCode(protoInfer, bad.kase, who, err, bad.code)
		}
		return
	}
	model, v := soakValid(rng)
	resp, err := c.ModelInfer(ctx, &pb.ModelInferRequest{ModelName: model, ModelVersion: strconv.Itoa(v), Id: who,
		Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(rows), 4}}},
		RawInputContents: [][]byte{rawF32(x...)}})
	if err != nil {
		s.validError(protoInfer, who, model, err)
		return
	}
	s.counts.add(protoInfer, "valid", codes.OK.String())
	if resp.Id != who {
		s.counts.problem("%s: answered with id %q", who, resp.Id)
	} else if len(resp.RawOutputContents) != 2 {
		s.counts.problem("%s: %d outputs", who, len(resp.RawOutputContents))
	} else if err := checkAffine(v, x, f32s(resp.RawOutputContents[0]), f32s(resp.RawOutputContents[1])); err != nil {
		s.counts.problem("%s: %v", who, err)
	}
}

// grpcStream opens one ModelStreamInfer stream and sends 1 to 4 requests
// on it, each valid or (one in five) invalid, then ends it; every request
// must be answered once, in any order, by its id. One stream in eight is
// broken instead: a message that is not protobuf (INVALID_ARGUMENT), a
// message over the limit (RESOURCE_EXHAUSTED), or the client cancelling
// the stream with requests in flight.
func (s *soak) grpcStream(client, seq int, rng *rand.Rand) {
	conn := s.conns[client%len(s.conns)]
	who := fmt.Sprintf("client %d stream %d", client, seq)
	ctx, cancel := context.WithTimeout(context.Background(), soakTimeout)
	defer cancel()
	if rng.IntN(8) == 0 {
		switch rng.IntN(3) {
		case 0:
			st, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true},
				"/inference.GRPCInferenceService/ModelStreamInfer", grpc.ForceCodecV2(rawCodec{}))
			if err == nil {
				if err = st.SendMsg(garbage); err == nil || err == io.EOF {
					var out []byte
					err = st.RecvMsg(&out)
				}
			}
			s.expectCode(protoStream, "malformed message", who, err, codes.InvalidArgument)
		case 1:
			st, err := pb.NewGRPCInferenceServiceClient(conn).ModelStreamInfer(ctx)
			if err == nil {
				if err = st.Send(overLimit(who)); err == nil || err == io.EOF {
					_, err = st.Recv()
				}
			}
			s.expectCode(protoStream, "over the message limit", who, err, codes.ResourceExhausted)
		default:
			// Requests in flight, then the client goes away: the server
			// must let go of the stream and its requests.
			st, err := pb.NewGRPCInferenceServiceClient(conn).ModelStreamInfer(ctx)
			if err == nil {
				for i := range 1 + rng.IntN(3) {
					id := fmt.Sprintf("%s/%d", who, i)
					if err = st.Send(&pb.ModelInferRequest{ModelName: "affine", Id: id,
						Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{1, 4}}},
						RawInputContents: [][]byte{rawF32(soakInput(client, seq, 1)...)}}); err != nil {
						break
					}
				}
			}
			cancel()
			if err == nil {
				for err == nil {
					_, err = st.Recv()
				}
			}
			s.expectCode(protoStream, "cancelled by the client", who, err, codes.Canceled)
		}
		return
	}
	st, err := pb.NewGRPCInferenceServiceClient(conn).ModelStreamInfer(ctx)
	if err != nil {
		s.counts.problem("%s: opening: %v", who, err)
		return
	}
	type expect struct {
		model   string
		version int
		x       []float32
		bad     *grpcCase
	}
	pending := map[string]expect{}
	for i := range 1 + rng.IntN(4) {
		id := fmt.Sprintf("%s/%d", who, i)
		rows := 1 + rng.IntN(4)
		x := soakInput(client, seq*4+i, rows)
		var req *pb.ModelInferRequest
		var e expect
		if rng.IntN(5) == 0 {
			bad := invalidInfer(rng, id, x)
			req, e = bad.req, expect{bad: &bad}
		} else {
			model, v := soakValid(rng)
			req = &pb.ModelInferRequest{ModelName: model, ModelVersion: strconv.Itoa(v), Id: id,
				Inputs:           []*pb.ModelInferRequest_InferInputTensor{{Name: "x", Datatype: "FP32", Shape: []int64{int64(rows), 4}}},
				RawInputContents: [][]byte{rawF32(x...)}}
			e = expect{model: model, version: v, x: x}
		}
		pending[id] = e
		if err := st.Send(req); err != nil {
			s.counts.problem("%s: sending %s: %v", who, id, err)
			return
		}
	}
	if err := st.CloseSend(); err != nil {
		s.counts.problem("%s: closing: %v", who, err)
		return
	}
	for {
		msg, err := st.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			s.counts.problem("%s: receiving: %v", who, err)
			return
		}
		id := msg.GetInferResponse().GetId()
		e, ok := pending[id]
		if !ok {
			s.counts.problem("%s: an answer with id %q that is not pending (cross-talk?)", who, id)
			continue
		}
		delete(pending, id)
		switch {
		case e.bad != nil:
			// A stream's answer carries the error's message, not its code.
			s.counts.add(protoStream, e.bad.kase, e.bad.code.String()+" (message)")
			if msg.ErrorMessage == "" || !strings.Contains(msg.ErrorMessage, e.bad.fragment) {
				s.counts.problem("%s %s (%s): error message %q, want one with %q", protoStream, e.bad.kase, id, msg.ErrorMessage, e.bad.fragment)
			}
		case msg.ErrorMessage != "":
			if e.model == "tight" && strings.Contains(msg.ErrorMessage, "queue") {
				s.counts.add(protoStream, "valid", codes.ResourceExhausted.String()+" (message)")
			} else {
				s.counts.add(protoStream, "valid", "error message")
				s.counts.problem("%s valid (%s): %s", protoStream, id, msg.ErrorMessage)
			}
		default:
			s.counts.add(protoStream, "valid", codes.OK.String())
			out := msg.InferResponse.RawOutputContents
			if len(out) != 2 {
				s.counts.problem("%s: %d outputs", id, len(out))
			} else if err := checkAffine(e.version, e.x, f32s(out[0]), f32s(out[1])); err != nil {
				s.counts.problem("%s: %v", id, err)
			}
		}
	}
	for id := range pending {
		s.counts.problem("%s: request %s was never answered", who, id)
	}
}

// httpDo sends one request with s.httpc and returns the status and body
// (status 0 and a problem when the exchange itself fails).
func (s *soak) httpDo(ctx context.Context, proto, who, path string, body []byte, header map[string]string) (int, http.Header, []byte) {
	req, err := http.NewRequestWithContext(ctx, "POST", s.base+path, bytes.NewReader(body))
	if err != nil {
		s.counts.problem("%s %s: %v", proto, who, err)
		return 0, nil, nil
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := s.httpc.Do(req)
	if err != nil {
		s.counts.problem("%s %s: %v", proto, who, err)
		return 0, nil, nil
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.counts.problem("%s %s: reading: %v", proto, who, err)
		return 0, nil, nil
	}
	return resp.StatusCode, resp.Header, b
}

// expectHTTP counts an HTTP outcome and reports it unless it is want with
// a JSON error body.
func (s *soak) expectHTTP(proto, kase, who string, code int, body []byte, want int) {
	if code == 0 {
		return // already a problem
	}
	s.counts.add(proto, kase, "HTTP "+strconv.Itoa(code))
	var e struct {
		Error string `json:"error"`
	}
	if code != want || json.Unmarshal(body, &e) != nil || e.Error == "" {
		s.counts.problem("%s %s (%s): HTTP %d %.200s, want %d with an error", proto, kase, who, code, body, want)
	}
}

// truncatedBody sends a request whose body ends (the client closes its
// side) before Content-Length, on a connection of its own, and returns
// the status the server answers.
func (s *soak) truncatedBody(who string) int {
	c, err := net.Dial("tcp", s.srv.HTTPAddr().String())
	if err != nil {
		s.counts.problem("truncated body (%s): %v", who, err)
		return 0
	}
	defer c.Close()
	body := `{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,`
	fmt.Fprintf(c, "POST /v2/models/affine/infer HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body)+40, body)
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(soakTimeout))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		s.counts.problem("truncated body (%s): no answer: %v", who, err)
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// httpBinary sends one request with the binary tensor extension.
func (s *soak) httpBinary(client, seq int, rng *rand.Rand) {
	rows := 1 + rng.IntN(4)
	x := soakInput(client, seq, rows)
	who := fmt.Sprintf("client %d request %d", client, seq)
	ctx, cancel := context.WithTimeout(context.Background(), soakTimeout)
	defer cancel()
	header := func(id string, shape []int, binSize int) []byte {
		h, _ := json.Marshal(map[string]any{"id": id,
			"inputs":     []any{map[string]any{"name": "x", "datatype": "FP32", "shape": shape, "parameters": map[string]any{"binary_data_size": binSize}}},
			"parameters": map[string]any{"binary_data_output": true}})
		return h
	}
	send := func(path string, hdr, bin []byte, hdrLen int) (int, http.Header, []byte) {
		return s.httpDo(ctx, protoBinary, who, path, append(hdr, bin...), map[string]string{
			"Inference-Header-Content-Length": strconv.Itoa(hdrLen), "Content-Type": "application/octet-stream"})
	}
	if rng.IntN(5) == 0 {
		bin := rawF32(x...)
		hdr := header(who, []int{rows, 4}, len(bin))
		var kase string
		var code, want int
		var body []byte
		switch rng.IntN(6) {
		case 0:
			kase, want = "header beyond the body", http.StatusBadRequest
			code, _, body = send("/v2/models/affine/infer", hdr, bin, len(hdr)+len(bin)+10)
		case 1:
			kase, want = "binary size mismatch", http.StatusBadRequest
			code, _, body = send("/v2/models/affine/infer", hdr, bin[4:], len(hdr))
		case 2:
			kase, want = "unknown model", http.StatusNotFound
			code, _, body = send("/v2/models/no-such-model/infer", hdr, bin, len(hdr))
		case 3:
			kase, want = "wrong shape", http.StatusBadRequest
			hdr = header(who, []int{4 * rows}, len(bin))
			code, _, body = send("/v2/models/affine/infer", hdr, bin, len(hdr))
		case 4:
			kase, want = "over the body limit", http.StatusRequestEntityTooLarge
			big := make([]byte, soakMaxMessage)
			hdr = header(who, []int{len(big) / 16, 4}, len(big))
			code, _, body = send("/v2/models/affine/infer", hdr, big, len(hdr))
		default:
			kase, want = "truncated body", http.StatusBadRequest
			code = s.truncatedBody(who)
			if code != 0 {
				s.counts.add(protoBinary, kase, "HTTP "+strconv.Itoa(code))
				if code != want {
					s.counts.problem("%s %s (%s): HTTP %d, want %d", protoBinary, kase, who, code, want)
				}
			}
			return
		}
		s.expectHTTP(protoBinary, kase, who, code, body, want)
		return
	}
	model, v := soakValid(rng)
	hdr := header(who, []int{rows, 4}, 16*rows)
	code, h, body := send(fmt.Sprintf("/v2/models/%s/versions/%d/infer", model, v), hdr, rawF32(x...), len(hdr))
	switch {
	case code == 0:
		return
	case code == http.StatusTooManyRequests && model == "tight":
		s.counts.add(protoBinary, "valid", "HTTP 429")
		return
	case code != http.StatusOK:
		s.counts.add(protoBinary, "valid", "HTTP "+strconv.Itoa(code))
		s.counts.problem("%s valid (%s): HTTP %d %.200s", protoBinary, who, code, body)
		return
	}
	s.counts.add(protoBinary, "valid", "HTTP 200")
	n, _ := strconv.Atoi(h.Get("Inference-Header-Content-Length"))
	var out struct {
		ID string `json:"id"`
	}
	if n <= 0 || n > len(body) || json.Unmarshal(body[:n], &out) != nil || out.ID != who {
		s.counts.problem("%s: bad response header %.200q", who, body[:min(n, len(body))])
		return
	}
	bin := body[n:]
	if len(bin) != 20*rows {
		s.counts.problem("%s: %d bytes of binary outputs for %d rows (cross-talk?)", who, len(bin), rows)
		return
	}
	if err := checkAffine(v, x, f32s(bin[:16*rows]), f32s(bin[16*rows:])); err != nil {
		s.counts.problem("%s: %v", who, err)
	}
}

// httpJSON sends one request with JSON tensors.
func (s *soak) httpJSON(client, seq int, rng *rand.Rand) {
	rows := 1 + rng.IntN(4)
	x := soakInput(client, seq, rows)
	who := fmt.Sprintf("client %d request %d", client, seq)
	ctx, cancel := context.WithTimeout(context.Background(), soakTimeout)
	defer cancel()
	body := func(datatype string, shape []int, data any) []byte {
		b, _ := json.Marshal(map[string]any{"id": who,
			"inputs": []any{map[string]any{"name": "x", "datatype": datatype, "shape": shape, "data": data}}})
		return b
	}
	hdr := map[string]string{"Content-Type": "application/json"}
	if rng.IntN(5) == 0 {
		var kase string
		var code, want int
		var resp []byte
		switch rng.IntN(5) {
		case 0:
			kase, want = "malformed JSON", http.StatusBadRequest
			code, _, resp = s.httpDo(ctx, protoJSON, who, "/v2/models/affine/infer", body("FP32", []int{rows, 4}, x)[:20], hdr)
		case 1:
			kase, want = "wrong datatype", http.StatusBadRequest
			code, _, resp = s.httpDo(ctx, protoJSON, who, "/v2/models/affine/infer", body("INT64", []int{rows, 4}, x), hdr)
		case 2:
			kase, want = "data count mismatch", http.StatusBadRequest
			code, _, resp = s.httpDo(ctx, protoJSON, who, "/v2/models/affine/infer", body("FP32", []int{rows, 4}, x[1:]), hdr)
		case 3:
			kase, want = "unknown model", http.StatusNotFound
			code, _, resp = s.httpDo(ctx, protoJSON, who, "/v2/models/no-such-model/infer", body("FP32", []int{rows, 4}, x), hdr)
		default:
			kase, want = "unknown version", http.StatusNotFound
			code, _, resp = s.httpDo(ctx, protoJSON, who, "/v2/models/affine/versions/9/infer", body("FP32", []int{rows, 4}, x), hdr)
		}
		s.expectHTTP(protoJSON, kase, who, code, resp, want)
		return
	}
	model, v := soakValid(rng)
	code, _, resp := s.httpDo(ctx, protoJSON, who, fmt.Sprintf("/v2/models/%s/versions/%d/infer", model, v), body("FP32", []int{rows, 4}, x), hdr)
	switch {
	case code == 0:
		return
	case code == http.StatusTooManyRequests && model == "tight":
		s.counts.add(protoJSON, "valid", "HTTP 429")
		return
	case code != http.StatusOK:
		s.counts.add(protoJSON, "valid", "HTTP "+strconv.Itoa(code))
		s.counts.problem("%s valid (%s): HTTP %d %.200s", protoJSON, who, code, resp)
		return
	}
	s.counts.add(protoJSON, "valid", "HTTP 200")
	var out struct {
		ID      string `json:"id"`
		Outputs []struct {
			Name  string    `json:"name"`
			Shape []int64   `json:"shape"`
			Data  []float32 `json:"data"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(resp, &out); err != nil || out.ID != who || len(out.Outputs) != 2 {
		s.counts.problem("%s: bad response %.300s", who, resp)
		return
	}
	got := map[string][]float32{}
	for _, o := range out.Outputs {
		got[o.Name] = o.Data
	}
	if err := checkAffine(v, x, got["y"], got["s"]); err != nil {
		s.counts.problem("%s: %v", who, err)
	}
}

// flightRecord is a record batch of one column "x" holding rows of width
// values of type elem, from vals (converted).
func flightRecord(elem arrow.DataType, width int, vals []float32) arrow.RecordBatch {
	b := array.NewFixedSizeListBuilder(memory.DefaultAllocator, int32(width), elem)
	defer b.Release()
	for r := 0; r < len(vals)/width; r++ {
		b.Append(true)
	}
	switch vb := b.ValueBuilder().(type) {
	case *array.Float32Builder:
		vb.AppendValues(vals, nil)
	case *array.Float64Builder:
		for _, v := range vals {
			vb.Append(float64(v))
		}
	}
	col := b.NewArray()
	defer col.Release()
	schema := arrow.NewSchema([]arrow.Field{{Name: "x", Type: col.DataType()}}, nil)
	return array.NewRecordBatch(schema, []arrow.Array{col}, int64(col.Len()))
}

// flightFloats returns the float32 values of a numeric, list or extension
// (fixed_shape_tensor) column.
func flightFloats(a arrow.Array) []float32 {
	switch c := a.(type) {
	case *array.Float32:
		return c.Float32Values()
	case *array.FixedSizeList:
		return flightFloats(c.ListValues())
	case array.ExtensionArray:
		return flightFloats(c.Storage())
	}
	return nil
}

// flightExchange runs one DoExchange of 1 to 3 batches of 1 to 8 rows,
// each answered by its own predictions with its own app metadata; one in
// five is invalid instead.
func (s *soak) flightExchange(client, seq int, rng *rand.Rand) {
	fc := s.flights[client%len(s.flights)]
	who := fmt.Sprintf("client %d exchange %d", client, seq)
	ctx, cancel := context.WithTimeout(context.Background(), soakTimeout)
	defer cancel()
	version := 1 + rng.IntN(2)
	desc := &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"models", "affine", strconv.Itoa(version)}}
	nbatch := 1 + rng.IntN(3)
	xs := make([][]float32, nbatch)
	recs := make([]arrow.RecordBatch, nbatch)
	for b := range nbatch {
		rows := 1 + rng.IntN(8)
		xs[b] = make([]float32, 4*rows)
		for i := range xs[b] {
			xs[b][i] = float32(client*4096 + (seq%32)*128 + b*32 + i)
		}
		recs[b] = flightRecord(arrow.PrimitiveTypes.Float32, 4, xs[b])
	}
	defer func() {
		for _, r := range recs {
			r.Release()
		}
	}()
	kase, want := "valid", codes.OK
	if rng.IntN(5) == 0 {
		switch rng.IntN(5) {
		case 0:
			kase, want = "unknown model", codes.NotFound
			desc.Path = []string{"models", "no-such-model"}
		case 1:
			kase, want = "wrong datatype", codes.InvalidArgument
			recs[0].Release()
			recs[0] = flightRecord(arrow.PrimitiveTypes.Float64, 4, xs[0])
			recs = recs[:1]
		case 2:
			kase, want = "wrong width", codes.InvalidArgument
			recs[0].Release()
			recs[0] = flightRecord(arrow.PrimitiveTypes.Float32, 2, xs[0])
			recs = recs[:1]
		case 3:
			kase, want = "over the message limit", codes.ResourceExhausted
			recs[0].Release()
			recs[0] = flightRecord(arrow.PrimitiveTypes.Float32, 4, make([]float32, soakMaxMessage/4+4))
			recs = recs[:1]
		default:
			kase, want = "cancelled by the client", codes.Canceled
		}
	}
	stream, err := fc.DoExchange(ctx)
	if err != nil {
		s.counts.problem("%s: opening: %v", who, err)
		return
	}
	w := flight.NewRecordWriter(stream, ipc.WithSchema(recs[0].Schema()))
	w.SetFlightDescriptor(desc)
	errc := make(chan error, 1)
	go func() {
		defer stream.CloseSend()
		for i, r := range recs {
			if err := w.WriteWithAppMetadata(r, []byte(fmt.Sprintf("%s/%d", who, i))); err != nil {
				errc <- err
				return
			}
			if want == codes.Canceled {
				cancel() // batches in flight, and the client goes away
				errc <- nil
				return
			}
		}
		errc <- w.Close()
	}()
	got := 0
	rdr, err := flight.NewRecordReader(stream)
	if err == nil {
		for rdr.Next() {
			rec := rdr.RecordBatch()
			meta := string(rdr.LatestAppMetadata())
			if want != codes.OK {
				continue
			}
			if got >= len(xs) {
				s.counts.problem("%s: more answers than batches", who)
				break
			}
			if wantMeta := fmt.Sprintf("%s/%d", who, got); meta != wantMeta {
				s.counts.problem("%s: answer %d has app metadata %q, want %q", who, got, meta, wantMeta)
			}
			y, ys := rec.Schema().FieldIndices("y"), rec.Schema().FieldIndices("s")
			if len(y) != 1 || len(ys) != 1 {
				s.counts.problem("%s: answer schema %s", who, rec.Schema())
			} else if err := checkAffine(version, xs[got], flightFloats(rec.Column(y[0])), flightFloats(rec.Column(ys[0]))); err != nil {
				s.counts.problem("%s batch %d: %v", who, got, err)
			}
			got++
		}
		err = rdr.Err()
		rdr.Release()
	}
	cancel()
	<-errc
	if want == codes.OK && err == nil && got != len(xs) {
		s.counts.problem("%s: %d answers for %d batches", who, got, len(xs))
	}
	s.expectCode(protoFlight, kase, who, err, want)
}

// flightControl makes one Flight control call from loopback (allowed
// without a token): listing the datasets, or describing one that does not
// exist (NOT_FOUND).
func (s *soak) flightControl(rng *rand.Rand) {
	fc := s.flights[rng.IntN(len(s.flights))]
	ctx, cancel := context.WithTimeout(context.Background(), soakTimeout)
	defer cancel()
	if rng.IntN(2) == 0 {
		lst, err := fc.ListFlights(ctx, &flight.Criteria{})
		if err == nil {
			for err == nil {
				_, err = lst.Recv()
			}
			if err == io.EOF {
				err = nil
			}
		}
		s.expectCode(protoFlctl, "list datasets", "ListFlights", err, codes.OK)
		return
	}
	_, err := fc.GetFlightInfo(ctx, &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "no-such-dataset"}})
	s.expectCode(protoFlctl, "unknown dataset", "GetFlightInfo", err, codes.NotFound)
}
