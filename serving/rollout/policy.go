// Package rollout moves a model's traffic from its production version to a
// candidate inside the server, step by step, and decides each step from
// the server's own measurements: a canary rollout with automatic rollback,
// as Argo Rollouts and Flagger run outside a server, tied here to the
// model registry and its evaluation records.
//
// A rollout splits the model's unversioned requests (manager.SetSplit):
// a share, the step's weight, goes to the candidate (sticky by a request
// key when the policy names one); optionally a share of production's
// requests is also run on the candidate as shadow traffic, whose outputs
// are compared with production's (agreement of the predicted class, the
// largest absolute difference). At the end of each analysis window the
// candidate is compared with production over that window:
//
//   - error rate: candidate − production ≤ Policy.MaxErrorRateIncrease
//     (the candidate's canary and shadow requests together);
//   - p99 latency: candidate ≤ Policy.MaxP99Ratio × production (the
//     latest production p99 measured, when the candidate takes all the
//     traffic), and p50 likewise ≤ Policy.MaxP50Ratio × production's (the
//     median is steady where a loaded machine makes p99 jump), from
//     canary requests only: shadow requests run beside the load, their
//     latency is no client's;
//   - agreement (classifiers, from shadow traffic): ≥ Policy.MinAgreement.
//
// A window with fewer than Policy.MinRequests candidate requests decides
// nothing: it is extended. A failed window rolls back at once: all traffic
// to production, the candidate unloaded, the verdict and its evidence
// recorded in the registry (an evaluation with verdict "rollback" and a
// run of kind "rollout"), the registry's "candidate" alias removed. The
// last step passed promotes: production's alias moves to the candidate by
// compare-and-swap, citing the passing evaluation. Rollouts are kept in
// a state directory, so that after a restart (kill -9 included) a running
// rollout resumes at its step, and one whose promotion reached the
// registry is finished.
package rollout

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kilnml/kiln/core"
)

// Defaults of Policy.
var (
	DefaultSteps                = []float64{5, 25, 50, 100}
	DefaultWindow               = 30 * time.Second
	DefaultMinRequests          = 50
	DefaultMaxErrorRateIncrease = 0.01
	DefaultMaxP99Ratio          = 2.0
	DefaultMaxP50Ratio          = 2.0
	DefaultMinAgreement         = 0.95
)

// Duration is a time.Duration that reads and writes as Go duration text
// ("30s") in JSON and YAML.
type Duration time.Duration

// MarshalText writes d as "30s".
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText reads "30s", "2m", "500ms".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: %w", b, err)
	}
	*d = Duration(v)
	return nil
}

// Policy says how a rollout proceeds. Zero fields take the defaults
// (Policy.WithDefaults); the server's --rollout-policy file (its default,
// then its entry for the model), the model config's rollout block (between
// those two) and a start request (last) may each set some.
type Policy struct {
	// Steps are the candidate's traffic shares, in percent, strictly
	// ascending, each in (0, 100]; passing the last one promotes. With
	// Shadow > 0 a step of 0 is allowed (shadow only).
	Steps []float64 `json:"steps,omitempty" yaml:"steps,omitempty"`
	// Window is how long each step is held and analysed.
	Window Duration `json:"window,omitempty" yaml:"window,omitempty"`
	// MinRequests is the number of candidate requests (canary and
	// shadow) a window needs before it can decide (fewer: the window is
	// extended).
	MinRequests int `json:"min_requests,omitempty" yaml:"min_requests,omitempty"`
	// MaxErrorRateIncrease is how much higher than production's the
	// candidate's error rate (failed / all requests) may be, as a
	// fraction (0.01: one percentage point).
	MaxErrorRateIncrease *float64 `json:"max_error_rate_increase,omitempty" yaml:"max_error_rate_increase,omitempty"`
	// MaxP99Ratio is how many times production's p99 latency the
	// candidate's may be.
	MaxP99Ratio float64 `json:"max_p99_ratio,omitempty" yaml:"max_p99_ratio,omitempty"`
	// MaxP50Ratio is how many times production's median latency the
	// candidate's may be.
	MaxP50Ratio float64 `json:"max_p50_ratio,omitempty" yaml:"max_p50_ratio,omitempty"`
	// MinAgreement is the smallest share of compared rows (shadow
	// traffic, classifiers only) on which the candidate must predict
	// production's class.
	MinAgreement *float64 `json:"min_agreement,omitempty" yaml:"min_agreement,omitempty"`
	// Shadow is the share of production's requests also run on the
	// candidate, in [0, 1].
	Shadow float64 `json:"shadow,omitempty" yaml:"shadow,omitempty"`
	// StickyParameter names the request parameter (KServe v2
	// "parameters") whose value keeps a client on one version; it wins
	// over StickyHeader when both are present in a request.
	StickyParameter string `json:"sticky_parameter,omitempty" yaml:"sticky_parameter,omitempty"`
	// StickyHeader names the HTTP header or gRPC metadata key that does
	// the same.
	StickyHeader string `json:"sticky_header,omitempty" yaml:"sticky_header,omitempty"`
}

// Merge returns p with the fields that o sets replacing p's.
func (p Policy) Merge(o Policy) Policy {
	if len(o.Steps) > 0 {
		p.Steps = slices.Clone(o.Steps)
	}
	if o.Window != 0 {
		p.Window = o.Window
	}
	if o.MinRequests != 0 {
		p.MinRequests = o.MinRequests
	}
	if o.MaxErrorRateIncrease != nil {
		p.MaxErrorRateIncrease = o.MaxErrorRateIncrease
	}
	if o.MaxP99Ratio != 0 {
		p.MaxP99Ratio = o.MaxP99Ratio
	}
	if o.MaxP50Ratio != 0 {
		p.MaxP50Ratio = o.MaxP50Ratio
	}
	if o.MinAgreement != nil {
		p.MinAgreement = o.MinAgreement
	}
	if o.Shadow != 0 {
		p.Shadow = o.Shadow
	}
	if o.StickyParameter != "" {
		p.StickyParameter = o.StickyParameter
	}
	if o.StickyHeader != "" {
		p.StickyHeader = o.StickyHeader
	}
	return p
}

// WithDefaults returns p with every unset field at its default.
func (p Policy) WithDefaults() Policy {
	if len(p.Steps) == 0 {
		p.Steps = slices.Clone(DefaultSteps)
	}
	if p.Window == 0 {
		p.Window = Duration(DefaultWindow)
	}
	if p.MinRequests == 0 {
		p.MinRequests = DefaultMinRequests
	}
	if p.MaxErrorRateIncrease == nil {
		v := DefaultMaxErrorRateIncrease
		p.MaxErrorRateIncrease = &v
	}
	if p.MaxP99Ratio == 0 {
		p.MaxP99Ratio = DefaultMaxP99Ratio
	}
	if p.MaxP50Ratio == 0 {
		p.MaxP50Ratio = DefaultMaxP50Ratio
	}
	if p.MinAgreement == nil {
		v := DefaultMinAgreement
		p.MinAgreement = &v
	}
	return p
}

// Validate checks a policy with its defaults applied; the error is
// INVALID_ARGUMENT and names the field.
func (p Policy) Validate() error {
	bad := func(format string, args ...any) error {
		return core.Errorf(core.InvalidArgument, "rollout policy: "+format, args...)
	}
	if len(p.Steps) == 0 || len(p.Steps) > 100 {
		return bad("steps: between 1 and 100 steps, got %d", len(p.Steps))
	}
	for i, s := range p.Steps {
		if !(s >= 0 && s <= 100) || (s == 0 && p.Shadow == 0) {
			return bad("steps[%d] = %v: a share in percent, in (0, 100] (0 only with shadow traffic)", i, s)
		}
		if i > 0 && s <= p.Steps[i-1] {
			return bad("steps must be strictly ascending: %v", p.Steps)
		}
	}
	switch {
	case time.Duration(p.Window) < 100*time.Millisecond || time.Duration(p.Window) > 24*time.Hour:
		return bad("window %s: between 100ms and 24h", time.Duration(p.Window))
	case p.MinRequests < 1 || p.MinRequests > 1e9:
		return bad("min_requests %d: at least 1", p.MinRequests)
	case !(*p.MaxErrorRateIncrease >= 0 && *p.MaxErrorRateIncrease <= 1):
		return bad("max_error_rate_increase %v: a fraction in [0, 1]", *p.MaxErrorRateIncrease)
	case !(p.MaxP99Ratio >= 1 && p.MaxP99Ratio <= 1000):
		return bad("max_p99_ratio %v: at least 1", p.MaxP99Ratio)
	case !(p.MaxP50Ratio >= 1 && p.MaxP50Ratio <= 1000):
		return bad("max_p50_ratio %v: at least 1", p.MaxP50Ratio)
	case !(*p.MinAgreement >= 0 && *p.MinAgreement <= 1):
		return bad("min_agreement %v: a fraction in [0, 1]", *p.MinAgreement)
	case !(p.Shadow >= 0 && p.Shadow <= 1):
		return bad("shadow %v: a fraction in [0, 1]", p.Shadow)
	case len(p.StickyParameter) > 256 || len(p.StickyHeader) > 256 || strings.ContainsAny(p.StickyHeader, " :\r\n"):
		return bad("sticky_parameter/sticky_header: a name of at most 256 characters")
	}
	return nil
}

// ParsePolicies reads a --rollout-policy file: JSON or YAML (JSON is
// YAML) with a "default" policy and per-model ones under "models":
//
//	default: {steps: [10, 50, 100], window: 1m}
//	models:
//	  fraud: {shadow: 0.2, sticky_header: x-user-id}
//
// Unknown fields are errors (INVALID_ARGUMENT with the position).
func ParsePolicies(data []byte) (PolicyFile, error) {
	var f PolicyFile
	if err := decodeStrict(data, &f); err != nil {
		return PolicyFile{}, core.Errorf(core.InvalidArgument, "rollout policy file: %v", err)
	}
	if err := f.Default.WithDefaults().Validate(); err != nil {
		return PolicyFile{}, fmt.Errorf("default: %w", err)
	}
	for name, p := range f.Models {
		if err := f.Default.Merge(p).WithDefaults().Validate(); err != nil {
			return PolicyFile{}, fmt.Errorf("models.%s: %w", name, err)
		}
	}
	return f, nil
}

// PolicyFile is a parsed --rollout-policy file.
type PolicyFile struct {
	Default Policy            `json:"default" yaml:"default"`
	Models  map[string]Policy `json:"models" yaml:"models"`
}

// For returns the policy of model name: the default merged with the
// model's own.
func (f PolicyFile) For(name string) Policy { return f.Default.Merge(f.Models[name]) }

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		return json.RawMessage(`null`)
	}
	return b
}
