package repository

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/kilnml/kiln/serving/inferencepb"
)

// TritonConfigFile is the name of a Triton model configuration: protobuf
// text format of Triton's ModelConfig message (proto/model_config.proto).
// A model directory holds either it or one of ConfigFiles, never both.
const TritonConfigFile = "config.pbtxt"

// ParseTritonConfig decodes a Triton config.pbtxt and validates it, so that
// a Triton repository of TorchScript models (platform "pytorch_libtorch" or
// backend "pytorch") serves unchanged. It maps Triton's settings to Kiln's
// as ParseConfig does for Triton's spellings in YAML, and follows the
// PyTorch backend's naming convention: when every input is named
// <name>__<i> (INPUT__0, INPUT__1, ...) the inputs are forward's positional
// arguments in the order of i, whatever their order in the file; the same
// holds for outputs and forward's results. Other names are taken in file
// order.
//
// Settings Kiln cannot honour (KIND_GPU instances, parameters, model_warmup,
// optional or ragged inputs, shape tensors, queue timeouts, priorities,
// preserve_ordering, metric_tags, a reshape that differs from dims) are
// errors, not ignored. A syntax error or unknown field is reported with its
// line and column ("line 3:5: unknown field: foo").
func ParseTritonConfig(raw []byte) (*Config, error) {
	var mc pb.ModelConfig
	if err := prototext.Unmarshal(raw, &mc); err != nil {
		return nil, fmt.Errorf("invalid protobuf text: %s", protoTextError(err, raw))
	}
	if err := rejectUnsupported(mc.ProtoReflect(), ""); err != nil {
		return nil, err
	}
	f, err := tritonConfigFile(&mc)
	if err != nil {
		return nil, err
	}
	c, err := f.config()
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// protobuf-go separates its "proto:" prefix by a space or, at random, a
// no-break space.
var (
	protoPrefix   = regexp.MustCompile(`^proto:[ \x{00a0}]*`)
	protoPosition = regexp.MustCompile(`^(syntax error )?\(line (\d+):(\d+)\): `)
)

// protoTextError rewrites prototext's "proto: (line 3:5): msg" as
// "line 3:5: msg", and its position-less "unexpected EOF" as "line N:
// unexpected end of file" with N raw's last line.
func protoTextError(err error, raw []byte) string {
	msg := protoPrefix.ReplaceAllString(err.Error(), "")
	if m := protoPosition.FindStringSubmatch(msg); m != nil {
		return fmt.Sprintf("line %s:%s: %s%s", m[2], m[3], m[1], msg[len(m[0]):])
	}
	if msg == "unexpected EOF" {
		return fmt.Sprintf("line %d: unexpected end of file", bytes.Count(raw, []byte("\n"))+1)
	}
	return msg
}

// supported lists the ModelConfig fields Kiln honours; a field not listed
// that is set (non-default) makes the configuration an error.
var supported = map[protoreflect.FullName]bool{}

func init() {
	for _, f := range []struct {
		msg    protoreflect.Message
		fields []protoreflect.Name
	}{
		{(&pb.ModelConfig{}).ProtoReflect(), []protoreflect.Name{"name", "platform", "backend", "version_policy", "max_batch_size", "input", "output", "instance_group", "default_model_filename", "dynamic_batching"}},
		{(&pb.ModelInput{}).ProtoReflect(), []protoreflect.Name{"name", "data_type", "dims", "reshape"}},
		{(&pb.ModelOutput{}).ProtoReflect(), []protoreflect.Name{"name", "data_type", "dims", "reshape", "label_filename"}},
		{(&pb.ModelTensorReshape{}).ProtoReflect(), []protoreflect.Name{"shape"}},
		{(&pb.ModelInstanceGroup{}).ProtoReflect(), []protoreflect.Name{"name", "count", "kind", "gpus"}},
		{(&pb.ModelVersionPolicy{}).ProtoReflect(), []protoreflect.Name{"latest", "all", "specific"}},
		{(&pb.ModelVersionPolicy_Latest{}).ProtoReflect(), []protoreflect.Name{"num_versions"}},
		{(&pb.ModelVersionPolicy_Specific{}).ProtoReflect(), []protoreflect.Name{"versions"}},
		{(&pb.ModelDynamicBatching{}).ProtoReflect(), []protoreflect.Name{"preferred_batch_size", "max_queue_delay_microseconds", "default_queue_policy"}},
		{(&pb.ModelQueuePolicy{}).ProtoReflect(), []protoreflect.Name{"max_queue_size"}},
	} {
		fds := f.msg.Descriptor().Fields()
		for _, n := range f.fields {
			fd := fds.ByName(n)
			if fd == nil {
				panic("repository: model_config.proto has no field " + string(n)) // a build mismatch, caught by every test
			}
			supported[fd.FullName()] = true
		}
	}
}

// rejectUnsupported errors on the first set field of m (at path) that Kiln
// does not honour, looking into nested messages.
func rejectUnsupported(m protoreflect.Message, path string) error {
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		p := string(fd.Name())
		if path != "" {
			p = path + "." + p
		}
		if !supported[fd.FullName()] {
			err = fmt.Errorf("%s is set, and Kiln does not support it (remove it to serve this model with Kiln)", p)
			return false
		}
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = rejectUnsupported(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i))
			}
		case fd.Message() != nil && !fd.IsMap():
			err = rejectUnsupported(v.Message(), p)
		}
		return err == nil
	})
	return err
}

// tritonConfigFile converts a decoded ModelConfig to Triton's spellings in
// a configFile, ordering inputs and outputs by the __<i> convention.
func tritonConfigFile(mc *pb.ModelConfig) (*configFile, error) {
	f := &configFile{
		Name: mc.GetName(), Platform: mc.GetPlatform(), Backend: mc.GetBackend(),
		MaxBatchSize:         int(mc.GetMaxBatchSize()),
		DefaultModelFilename: mc.GetDefaultModelFilename(),
	}
	for _, in := range mc.GetInput() {
		f.Input = append(f.Input, tritonTensor(in.GetName(), in.GetDataType(), in.GetDims(), in.GetReshape(), ""))
	}
	for _, out := range mc.GetOutput() {
		f.Output = append(f.Output, tritonTensor(out.GetName(), out.GetDataType(), out.GetDims(), out.GetReshape(), out.GetLabelFilename()))
	}
	var err error
	if f.Input, err = orderByIndex("input", f.Input); err != nil {
		return nil, err
	}
	if f.Output, err = orderByIndex("output", f.Output); err != nil {
		return nil, err
	}
	if db := mc.GetDynamicBatching(); db != nil {
		delay := int64(min(db.GetMaxQueueDelayMicroseconds(), 1<<63-1))
		d := &dynamicBatchingFile{MaxQueueDelayMicroseconds: &delay}
		for _, s := range db.GetPreferredBatchSize() {
			d.PreferredBatchSize = append(d.PreferredBatchSize, int(s))
		}
		if q := db.GetDefaultQueuePolicy(); q != nil {
			d.DefaultQueuePolicy = &queuePolicyFile{MaxQueueSize: int(min(q.GetMaxQueueSize(), 1<<31-1))}
		}
		f.DynamicBatching = d
	}
	for _, g := range mc.GetInstanceGroup() {
		count := int(g.GetCount())
		if count == 0 {
			count = 1 // proto3 cannot tell absent from 0; Triton's default is 1
		}
		f.InstanceGroup = append(f.InstanceGroup, instanceGroupFile{Name: g.GetName(), Count: &count, Kind: g.GetKind().String(), GPUs: g.GetGpus()})
	}
	if vp := mc.GetVersionPolicy(); vp != nil {
		switch p := vp.GetPolicyChoice().(type) {
		case *pb.ModelVersionPolicy_Latest_:
			n := p.Latest.GetNumVersions()
			if n == 0 || n > 1<<31-1 {
				return nil, fmt.Errorf("version_policy.latest.num_versions is %d (want ≥ 1)", n)
			}
			f.VersionPolicy.Latest = latestFile(n)
		case *pb.ModelVersionPolicy_All_:
			f.VersionPolicy.All = true
		case *pb.ModelVersionPolicy_Specific_:
			f.VersionPolicy.Specific = append(specificFile{}, p.Specific.GetVersions()...)
		}
	}
	return f, nil
}

// tritonTensor is one ModelInput or ModelOutput in Triton's spellings.
func tritonTensor(name string, dt pb.DataType, dims []int64, reshape *pb.ModelTensorReshape, labels string) tensorFile {
	t := tensorFile{Name: name, TritonDataType: dt.String(), Dims: dims, LabelFilename: labels}
	if t.Dims == nil {
		t.Dims = []int64{} // dims absent in text format is Triton's []
	}
	if reshape != nil {
		t.Reshape = &reshapeFile{Shape: reshape.GetShape()}
		if t.Reshape.Shape == nil {
			t.Reshape.Shape = []int64{}
		}
	}
	return t
}

var indexedName = regexp.MustCompile(`^.*__(\d+)$`)

// orderByIndex sorts ts by the index in their names when every name
// follows Triton's <name>__<i> convention; the indices must then be 0..n-1.
// Otherwise ts is returned as it is.
func orderByIndex(kind string, ts []tensorFile) ([]tensorFile, error) {
	idx := make([]int, len(ts))
	for i, t := range ts {
		m := indexedName.FindStringSubmatch(t.Name)
		if m == nil {
			return ts, nil
		}
		n, err := strconv.Atoi(m[1])
		if err != nil {
			n = len(ts) // too large to be an index
		}
		idx[i] = n
	}
	out := make([]tensorFile, len(ts))
	filled := make([]bool, len(ts))
	for i, n := range idx {
		if n >= len(ts) || filled[n] {
			return nil, fmt.Errorf("%s %q: with every %s named <name>__<index>, the indices must be 0..%d, each once (forward's positional %ss)",
				kind, ts[i].Name, kind, len(ts)-1, kind)
		}
		out[n], filled[n] = ts[i], true
	}
	return out, nil
}

// ErrNoConfig is wrapped by errors about a model directory without a
// configuration file.
var ErrNoConfig = errors.New("no configuration file")

// errBothConfigs is wrapped when a model has both kinds of configuration.
var errBothConfigs = errors.New("both a Kiln and a Triton configuration")

// findConfigs returns the model directory's configuration file: one of
// ConfigFiles (the first found) or config.pbtxt. Having a Kiln file and a
// config.pbtxt is an error: neither silently wins.
func findConfigs(dir string, exists func(string) bool) (string, error) {
	var kiln string
	for _, f := range ConfigFiles {
		if exists(f) {
			kiln = f
			break
		}
	}
	triton := exists(TritonConfigFile)
	switch {
	case kiln != "" && triton:
		return "", fmt.Errorf("%w in %s: %s and %s (keep one)", errBothConfigs, dir, kiln, TritonConfigFile)
	case triton:
		return TritonConfigFile, nil
	case kiln != "":
		return kiln, nil
	}
	return "", fmt.Errorf("%w (%s or %s) in %s", ErrNoConfig, strings.Join(ConfigFiles, " or "), TritonConfigFile, dir)
}
