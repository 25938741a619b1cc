package train

import (
	"fmt"
	"strings"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/nn"
	"github.com/kilnml/kiln/native/trainer"
)

// Keras's losses, computed stably: binary_crossentropy on a sigmoid output
// and categorical_crossentropy / sparse_categorical_crossentropy on a
// softmax output are trained as bce_with_logits and cross_entropy on the
// activation's input (the network without its final sigmoid or softmax),
// so that log(sigmoid(x)) and log(softmax(x)) are never formed from
// rounded probabilities. The saved package keeps the activation: its
// forward returns probabilities, as the Keras model does.

// fusedActivation returns the output activation that loss s is fused with
// ("sigmoid", "softmax"), or "" for a loss on raw outputs.
func fusedActivation(s string) string {
	switch norm(s) {
	case "binary_crossentropy", "binary_cross_entropy":
		return "sigmoid"
	case "categorical_crossentropy", "sparse_categorical_crossentropy",
		"categorical_cross_entropy", "sparse_categorical_cross_entropy":
		return "softmax"
	}
	return ""
}

// layerKind normalizes a layer type as core/nn does (case, underscores and
// dashes ignored).
func layerKind(t string) string {
	return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(strings.TrimSpace(t)))
}

// lastKind is the normalized type of s's last layer, or "".
func lastKind(s nn.Spec) string {
	if len(s.Layers) == 0 {
		return ""
	}
	return layerKind(s.Layers[len(s.Layers)-1].Type)
}

// TrainSpec returns the network that trains under loss: spec itself, or
// for a fused loss spec without its final activation. A fused loss on a
// network that does not end in its activation, and a logits loss on one
// that does (a double sigmoid or softmax), are INVALID_ARGUMENT with a
// hint.
func TrainSpec(spec nn.Spec, loss string) (nn.Spec, error) {
	last := lastKind(spec)
	act := fusedActivation(loss)
	switch {
	case act != "":
		if last != act {
			if last == "" {
				last = "nothing"
			}
			logits := map[string]string{"sigmoid": "bce_with_logits", "softmax": "cross_entropy"}[act]
			return nn.Spec{}, core.Errorf(core.InvalidArgument,
				"kiln: train: loss %s takes the output of a %s (as in Keras, e.g. Dense(1, activation=%q)), but the network ends in %s; end it with a %s layer, or train its raw outputs with %s",
				loss, act, act, last, act, logits)
		}
		if act == "softmax" {
			if d := spec.Layers[len(spec.Layers)-1].Dim; d != nil && *d != -1 && *d != 0 {
				return nn.Spec{}, core.Errorf(core.InvalidArgument,
					"kiln: train: loss %s fuses the final softmax over the classes; the network's softmax has dim %d", loss, *d)
			}
		}
		s := spec
		s.Layers = append([]nn.Layer(nil), spec.Layers[:len(spec.Layers)-1]...)
		if len(s.Layers) == 0 {
			return nn.Spec{}, core.Errorf(core.InvalidArgument, "kiln: train: the network is only a %s; add a layer before it", act)
		}
		return s, nil
	case last == "sigmoid" && headOfName(loss) == binary:
		return nn.Spec{}, core.Errorf(core.InvalidArgument,
			"kiln: train: loss %s applies a sigmoid itself, and the network ends in a sigmoid: the sigmoid would be applied twice; remove the final sigmoid layer, or use binary_crossentropy (which takes the sigmoid's output)", loss)
	case last == "softmax" && headOfName(loss) == multiclass:
		return nn.Spec{}, core.Errorf(core.InvalidArgument,
			"kiln: train: loss %s applies log_softmax itself, and the network ends in a softmax: it would be applied twice; remove the final softmax layer, or use sparse_categorical_crossentropy (which takes the softmax's output)", loss)
	}
	return spec, nil
}

// headOfName is the head of a loss by name (regression for unknown names,
// which validation reports).
func headOfName(loss string) head {
	lk, err := lossKind(loss)
	if err != nil {
		return regression
	}
	return headOf(lk)
}

// packagedNet returns the network to save for net, trained under loss from
// spec behind prelude: net itself, or for a fused loss spec with its final
// activation rebuilt around net's weights (release it with the returned
// function).
func packagedNet(net *nn.Net, spec nn.Spec, prelude nn.Prelude, seed uint64, loss string) (*nn.Net, func(), error) {
	if fusedActivation(loss) == "" || len(net.Layers) == len(spec.Layers) {
		return net, func() {}, nil
	}
	full, err := nn.BuildWithPrelude(spec, prelude, seed)
	if err != nil {
		return nil, nil, fmt.Errorf("kiln: save package: %w", err)
	}
	if err := trainer.CopyState(full.Handle(), net.Handle()); err != nil {
		full.Close()
		return nil, nil, fmt.Errorf("kiln: save package: copying the trained weights: %w", err)
	}
	if err := full.SetTraining(false); err != nil {
		full.Close()
		return nil, nil, err
	}
	return full, func() { full.Close() }, nil
}
