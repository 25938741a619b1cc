package rollout

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParsePolicies(t *testing.T) {
	f, err := ParsePolicies([]byte(`
default: {steps: [10, 50, 100], window: 1m, max_error_rate_increase: 0}
models:
  fraud: {shadow: 0.2, sticky_header: x-user-id, window: 2m}
`))
	require.NoError(t, err)
	p := f.For("fraud").WithDefaults()
	assert.Equal(t, []float64{10, 50, 100}, p.Steps)
	assert.Equal(t, Duration(2*time.Minute), p.Window)
	assert.Equal(t, 0.0, *p.MaxErrorRateIncrease, "an explicit 0 is kept")
	assert.Equal(t, 0.2, p.Shadow)
	assert.Equal(t, "x-user-id", p.StickyHeader)
	assert.Equal(t, DefaultMinRequests, p.MinRequests)
	other := f.For("other").WithDefaults()
	assert.Equal(t, Duration(time.Minute), other.Window)
	assert.Equal(t, DefaultMaxP99Ratio, other.MaxP99Ratio)

	for _, c := range []struct{ text, want string }{
		{"default: {stepz: [1]}", "field stepz not found"},
		{"default: {steps: [50, 10]}", "strictly ascending"},
		{"default: {steps: [0, 100]}", "0 only with shadow traffic"},
		{"default: {steps: [120]}", "steps[0] = 120"},
		{"default: {window: 10ms}", "window 10ms"},
		{"default: {window: soon}", "duration"},
		{"default: {shadow: 2}", "shadow 2"},
		{"default: {max_p99_ratio: 0.5}", "max_p99_ratio 0.5"},
		{"default: {min_agreement: -1}", "min_agreement -1"},
		{"models: {m: {max_error_rate_increase: 3}}", "models.m: rollout policy: max_error_rate_increase 3"},
		{"default: {sticky_header: 'a b'}", "sticky_parameter/sticky_header"},
		{"[1, 2]", "rollout policy file"},
	} {
		_, err := ParsePolicies([]byte(c.text))
		require.Error(t, err, c.text)
		assert.Contains(t, err.Error(), c.want, c.text)
	}
	_, err = ParsePolicies([]byte(`{"default": {"steps": [5, 100], "window": "30s"}}`))
	assert.NoError(t, err, "JSON is YAML")
}

func FuzzParsePolicies(f *testing.F) {
	for _, s := range []string{
		"default: {steps: [5, 25, 50, 100], window: 30s}\nmodels: {m: {shadow: 0.1}}\n",
		`{"default": {"steps": [0, 100], "shadow": 1, "min_agreement": 0.9}}`,
		"default: {window: -1s}", "models: {m: {steps: [1e308]}}", "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		pf, err := ParsePolicies(data)
		if err != nil {
			return
		}
		for name := range pf.Models {
			p := pf.For(name).WithDefaults()
			if err := p.Validate(); err != nil {
				t.Fatalf("model %q: a parsed policy fails validation: %v", name, err)
			}
			if p.Steps[len(p.Steps)-1] > 100 || time.Duration(p.Window) <= 0 {
				t.Fatalf("model %q: accepted %+v", name, p)
			}
		}
	})
}
