package flight

import (
	"bytes"
	"testing"

	"github.com/apache/arrow-go/v18/arrow/flight"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	gproto "google.golang.org/protobuf/proto"
)

// split cuts raw into buffers of at most n bytes, as gRPC receives a
// message in HTTP/2 frames.
func split(raw []byte, n int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(raw) > 0 {
		k := min(n, len(raw))
		s = append(s, mem.SliceBuffer(bytes.Clone(raw[:k])))
		raw = raw[k:]
	}
	return s
}

func TestFlightCodecDecodesLikeProtobuf(t *testing.T) {
	body := make([]byte, 3*minPooledBody+5)
	for i := range body {
		body[i] = byte(i * 7)
	}
	full := &flight.FlightData{
		FlightDescriptor: &flight.FlightDescriptor{Type: flight.DescriptorPATH, Path: []string{"datasets", "x"}},
		DataHeader:       []byte("header bytes"),
		AppMetadata:      []byte("meta"),
		DataBody:         body,
	}
	std, err := gproto.Marshal(full)
	require.NoError(t, err)
	// Fields out of order, an unknown field of every wire type, and a
	// repeated header (the last wins).
	var odd []byte
	odd = protowire.AppendTag(odd, fdDataBody, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("small body"))
	odd = protowire.AppendTag(odd, 7, protowire.VarintType)
	odd = protowire.AppendVarint(odd, 300)
	odd = protowire.AppendTag(odd, 8, protowire.Fixed32Type)
	odd = protowire.AppendFixed32(odd, 1)
	odd = protowire.AppendTag(odd, 9, protowire.Fixed64Type)
	odd = protowire.AppendFixed64(odd, 2)
	odd = protowire.AppendTag(odd, 10, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("unknown"))
	odd = protowire.AppendTag(odd, fdDataHeader, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("first"))
	odd = protowire.AppendTag(odd, fdDataHeader, protowire.BytesType)
	odd = protowire.AppendBytes(odd, []byte("second"))

	codec := newFlightCodec()
	for name, raw := range map[string][]byte{"standard": std, "odd": odd, "empty": nil} {
		for _, frame := range []int{1, 7, 16 << 10, 1 << 30} {
			want := new(flight.FlightData)
			require.NoError(t, gproto.Unmarshal(raw, want))
			got := &flight.FlightData{DataHeader: []byte("stale")}
			require.NoError(t, codec.Unmarshal(split(raw, frame), got), "%s in frames of %d", name, frame)
			// (protobuf keeps unknown fields; the codec drops them.)
			require.True(t, gproto.Equal(want.FlightDescriptor, got.FlightDescriptor), "%s in frames of %d: %v", name, frame, got)
			require.Equal(t, string(want.DataHeader), string(got.DataHeader), "%s in frames of %d", name, frame)
			require.Equal(t, string(want.AppMetadata), string(got.AppMetadata), "%s in frames of %d", name, frame)
			require.True(t, bytes.Equal(want.DataBody, got.DataBody), "%s in frames of %d", name, frame)
		}
	}
	// Other messages go through the protobuf codec.
	var d flight.FlightDescriptor
	raw, _ := gproto.Marshal(full.FlightDescriptor)
	require.NoError(t, codec.Unmarshal(split(raw, 3), &d))
	require.Equal(t, []string{"datasets", "x"}, d.Path)
}

func TestFlightCodecRefusesMalformed(t *testing.T) {
	raw, err := gproto.Marshal(&flight.FlightData{DataHeader: []byte("h"), DataBody: make([]byte, 100)})
	require.NoError(t, err)
	codec := newFlightCodec()
	for _, bad := range [][]byte{
		raw[:len(raw)-1],   // body cut short
		raw[:len(raw)-100], // body missing
		{0x12},             // header without length
		{0x12, 0x05, 'a'},  // header cut short
		{0x80},             // truncated tag
		{0x00},             // field number 0
		protowire.AppendTag(nil, 4, protowire.StartGroupType),
		append(protowire.AppendTag(nil, fdDescriptor, protowire.BytesType), 2, 0xff, 0xff), // bad descriptor
	} {
		require.Error(t, codec.Unmarshal(split(bad, 2), new(flight.FlightData)), "%x", bad)
	}
}

func TestBodyPoolReuses(t *testing.T) {
	b := bodyPool.get(minPooledBody + 1)
	require.Len(t, b, minPooledBody+1)
	require.Equal(t, 2*minPooledBody, cap(b))
	bodyPool.put(b)
	small := bodyPool.get(100)
	require.Len(t, small, 100)
	bodyPool.put(small)                         // ignored: not pooled
	bodyPool.put(make([]byte, 3*minPooledBody)) // ignored: not a class size
	require.Len(t, bodyPool.get(3*minPooledBody), 3*minPooledBody)
}
