package nn

import (
	"fmt"
	"regexp"
	"strings"
)

// ForwardPreamble returns the statements forward runs before the first
// layer of s: the float conversion of the input, p's code and the reshape
// to s.InputShape. Packages that generate variants of a network's forward
// (core/optimize) start from it.
func ForwardPreamble(s Spec, p Prelude) []string {
	var body []string
	// Inputs of another dtype are converted; float32 ones pass without a
	// dispatch (6 is torch.float32's ScalarType).
	body = append(body, "if x.dtype != 6:", "    x = x.float()")
	body = append(body, p.Code...)
	if len(s.InputShape) > 1 {
		dims := []string{"-1"}
		for _, d := range s.InputShape {
			dims = append(dims, fmt.Sprint(d))
		}
		body = append(body, fmt.Sprintf("x = x.reshape([%s])", strings.Join(dims, ", ")))
	}
	return body
}

// LayerSource returns the TorchScript statements Build generates for one
// layer (info as Spec.Infer returned it for l). They read the layer's
// tensors as self.<name>_weight, self.<name>_bias, ...: see LayerTensors.
func LayerSource(info LayerInfo, l Layer) []string {
	code, _ := layerCode(info, l)
	return code
}

// LayerTensors returns the names of the parameters and buffers Build
// registers for one layer, in registration order.
func LayerTensors(info LayerInfo, l Layer) []string {
	_, ps := layerCode(info, l)
	names := make([]string, len(ps))
	for i, p := range ps {
		names[i] = p.name
	}
	return names
}

// HasBias reports whether a linear or conv layer has a bias.
func HasBias(l Layer) bool { return hasBias(l) }

// batchNormLine matches the statement Build generates for a batch-norm
// layer (see layerCode): weight, bias, running mean and variance,
// momentum and eps.
var batchNormLine = regexp.MustCompile(`x = torch\.batch_norm\(x, (self\.\w+), (self\.\w+), (self\.\w+), (self\.\w+), self\.training, ([^,]+), ([^,]+), False\)`)

// SyncBatchNormSource rewrites the forward source of a network Build made
// (Net.Source) for synchronized batch norm in data-parallel training: each
// batch-norm layer's statement becomes a call of Kiln's operator
// kiln::sync_batch_norm (kiln.sync_batch_norm in the training module's
// TorchScript) with the process group of the training
// module (self.kiln_sync_group; see native/trainer's SetSyncBatchNorm),
// whose batch statistics are those of every rank's batch together. It
// returns the new source and the number of layers rewritten (0: src is
// returned unchanged).
func SyncBatchNormSource(src string) (string, int) {
	n := 0
	out := batchNormLine.ReplaceAllStringFunc(src, func(m string) string {
		n++
		return batchNormLine.ReplaceAllString(m,
			"x = kiln.sync_batch_norm(x, $1, $2, $3, $4, $5, $6, self.kiln_sync_group)")
	})
	return out, n
}
