package manager

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/serving/batcher"
	"github.com/kilnml/kiln/serving/repository"
)

// Roles of a loaded version, as metrics label them (see Manager.Role).
const (
	RoleProduction = "production"
	RoleCandidate  = "candidate"
	RoleOther      = "other"
)

// Split divides a model's unversioned requests between its production
// version and a candidate, as a canary rollout does (Manager.SetSplit). A
// request that names a version is never split (as in Triton: an explicit
// version bypasses routing).
type Split struct {
	// Production is the version that answers the requests the split does
	// not send to the candidate; it must be the model's default version
	// (its route's Default).
	Production int64 `json:"production"`
	// Candidate is the version under test; the manager keeps it loaded
	// while the split is set.
	Candidate int64 `json:"candidate"`
	// Weight is the share of unversioned requests the candidate answers,
	// in [0, 1]. A request with a routing key goes to the candidate when
	// the key's hash, as a fraction of 2⁶⁴, is below Weight: a key keeps
	// its version while the weight holds, and keys on the candidate stay
	// there as the weight grows. Requests without a key are drawn at
	// random.
	Weight float64 `json:"weight"`
	// Shadow is the share of the requests production answers whose
	// inputs are also run, asynchronously, on the candidate (shadow
	// traffic): the client gets production's answer only, and the two
	// outputs are compared and sent to Sink. In [0, 1].
	Shadow float64 `json:"shadow"`
	// KeyParameter and KeyHeader name where a request's routing key is
	// read from: a request parameter, an HTTP header or gRPC metadata key
	// (see AcquireFor). Empty: requests are drawn at random.
	KeyParameter string `json:"key_parameter,omitempty"`
	KeyHeader    string `json:"key_header,omitempty"`
	// Sink receives the shadow comparisons (nil: they are only counted,
	// see Manager.ShadowCounts). Shadow requests are not recorded in the
	// candidate's request statistics (its executions are).
	Sink ShadowSink `json:"-"`
}

// ShadowSink receives the outcome of each shadow request. RecordShadow is
// called from the shadow request's goroutine and must not block.
type ShadowSink interface {
	RecordShadow(ShadowResult)
}

// ShadowResult compares a candidate's answer to production's on the same
// request.
type ShadowResult struct {
	Model                 string
	Production, Candidate int64
	// Err is the candidate's error (nil: it answered).
	Err error
	// Latency is the candidate's time to answer.
	Latency time.Duration
	// Rows is the number of batch rows whose predicted class was
	// compared, Agree how many of them matched (both 0 when no output is
	// a classifier's: a regression is compared by MaxAbsDiff only).
	Rows, Agree int
	// MaxAbsDiff is the largest absolute difference between production's
	// and the candidate's FP32 outputs (0 when none could be compared).
	MaxAbsDiff float64
	// Mismatch says why outputs could not be compared (different shapes
	// or types), or "".
	Mismatch string
}

// maxShadowInFlight bounds a model's shadow requests in flight; a request
// drawn for shadowing while that many run is not shadowed (and counted).
const maxShadowInFlight = 16

// SetSplit sets model name's split (nil clears it). A new candidate is
// loaded and warmed up before the split takes effect (the model's route
// or version policy still selects the other versions); changing only the
// weight or the shadow share swaps the split atomically and loads nothing.
// Clearing the split unloads the candidate unless the route keeps it.
//
// Errors: INVALID_ARGUMENT for weights outside [0, 1] or a candidate that
// equals production; NOT_FOUND for a model or candidate version the
// repository lacks; the load's error when the candidate fails to load (the
// split is then not set).
func (m *Manager) SetSplit(name string, s *Split) error {
	if s != nil {
		switch {
		case s.Production < 1 || s.Candidate < 1 || s.Production == s.Candidate:
			return core.Errorf(core.InvalidArgument, "model %q: split needs distinct positive production and candidate versions, got %d and %d", name, s.Production, s.Candidate)
		case !(s.Weight >= 0 && s.Weight <= 1) || !(s.Shadow >= 0 && s.Shadow <= 1):
			return core.Errorf(core.InvalidArgument, "model %q: split weight %v and shadow %v must be in [0, 1]", name, s.Weight, s.Shadow)
		}
		cp := *s
		s = &cp
	}
	for {
		e := m.entry(name, false)
		if e == nil {
			if s == nil {
				return nil
			}
			return fmt.Errorf("%w: unknown model %q", ErrNotFound, name)
		}
		e.loadMu.Lock()
		if !m.current(name, e) {
			e.loadMu.Unlock()
			continue
		}
		prev := e.split.Load()
		sameCandidate := (prev == nil && s == nil) || (prev != nil && s != nil && prev.Candidate == s.Candidate)
		if sameCandidate {
			e.split.Store(s)
			e.loadMu.Unlock()
			return nil
		}
		if s != nil {
			// Load the candidate first: the split points at it only
			// once it serves.
			e.mu.Lock()
			e.pending = s.Candidate
			e.mu.Unlock()
			err := m.load(name, e)
			e.mu.Lock()
			e.pending = 0
			loaded := e.versions[s.Candidate] != nil
			e.mu.Unlock()
			if err == nil && !loaded {
				err = core.Errorf(core.Unavailable, "model %q: candidate version %d did not load", name, s.Candidate)
			}
			if err != nil {
				if prev == nil || prev.Candidate != s.Candidate {
					_ = m.load(name, e) // retire what the failed attempt loaded
				}
				e.loadMu.Unlock()
				return err
			}
			e.split.Store(s)
			e.loadMu.Unlock()
			m.log.Info("model split set", "model", name, "production", s.Production, "candidate", s.Candidate, "weight", s.Weight, "shadow", s.Shadow)
			return nil
		}
		e.split.Store(nil)
		err := m.load(name, e) // the candidate leaves unless the route keeps it
		e.loadMu.Unlock()
		m.log.Info("model split cleared", "model", name, "candidate", prev.Candidate)
		return err
	}
}

// SplitOf returns model name's split and whether one is set.
func (m *Manager) SplitOf(name string) (Split, bool) {
	e := m.entry(name, false)
	if e == nil {
		return Split{}, false
	}
	s := e.split.Load()
	if s == nil {
		return Split{}, false
	}
	return *s, true
}

// Role returns the role of v in its model's serving: RoleCandidate for a
// split's candidate, RoleProduction for the version that answers
// unversioned requests (the split's production, else the default), and
// RoleOther for other loaded versions.
func (m *Manager) Role(v *Version) string {
	e := v.ent
	if e == nil {
		return RoleOther
	}
	if s := e.split.Load(); s != nil {
		switch v.number {
		case s.Candidate:
			return RoleCandidate
		case s.Production:
			return RoleProduction
		}
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	def := e.def
	if def == 0 || e.versions[def] == nil {
		def = 0
		for n := range e.versions {
			def = max(def, n)
		}
	}
	if v.number == def {
		return RoleProduction
	}
	return RoleOther
}

// KeyFunc returns a request's routing key: the value of its parameter
// named parameter, else of its header (or gRPC metadata key) named header,
// else "". An empty name is not looked up.
type KeyFunc func(parameter, header string) string

// toCandidate draws whether an unversioned request goes to s's candidate:
// by its routing key when it has one, at random otherwise.
func toCandidate(s *Split, keyOf KeyFunc) bool {
	if s.Weight <= 0 {
		return false
	}
	if s.Weight >= 1 {
		return true
	}
	key := ""
	if keyOf != nil && (s.KeyParameter != "" || s.KeyHeader != "") {
		key = keyOf(s.KeyParameter, s.KeyHeader)
	}
	if key == "" {
		return rand.Float64() < s.Weight
	}
	return KeyFraction(key) < s.Weight
}

// KeyFraction returns the fraction in [0, 1) that a routing key hashes to
// (a key goes to the candidate when it is below the split's weight).
func KeyFraction(key string) float64 {
	h := fnv.New64a()
	h.Write([]byte(key))
	return float64(h.Sum64()>>11) / (1 << 53)
}

// maybeShadow sends a copy of a request production answered to the
// candidate, when the model's split shadows and the draw says so.
func (v *Version) maybeShadow(inputs, outs []batcher.Tensor) {
	e := v.ent
	if e == nil {
		return
	}
	s := e.split.Load()
	if s == nil || s.Shadow <= 0 || v.number != s.Production || rand.Float64() >= s.Shadow {
		return
	}
	select {
	case e.shadowSem <- struct{}{}:
	default:
		e.shadowDropped.Add(1)
		return
	}
	ins, want := cloneTensors(inputs), cloneTensors(outs)
	go func() {
		defer func() { <-e.shadowSem }()
		res := ShadowResult{Model: v.model.Name, Production: v.number, Candidate: s.Candidate}
		e.mu.RLock()
		cand := e.versions[s.Candidate]
		e.mu.RUnlock()
		if cand == nil || !cand.acquire() {
			return // the candidate left meanwhile
		}
		defer cand.Release()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		start := time.Now()
		got, err := cand.Infer(ctx, ins)
		res.Latency = time.Since(start)
		// Not recorded as the candidate's requests: shadow requests run
		// beside the load, and their latency is not a client's.
		e.shadowed.Add(1)
		if err != nil {
			res.Err = err
		} else {
			compareOutputs(&res, v.model.Config.Outputs, want, got)
		}
		if s.Sink != nil {
			s.Sink.RecordShadow(res)
		}
	}()
}

// ShadowCounts returns how many of model name's requests were shadowed to
// a candidate, and how many drawn for shadowing were not because too many
// shadow requests were in flight.
func (m *Manager) ShadowCounts(name string) (shadowed, dropped uint64) {
	e := m.entry(name, false)
	if e == nil {
		return 0, 0
	}
	return e.shadowed.Load(), e.shadowDropped.Load()
}

func cloneTensors(ts []batcher.Tensor) []batcher.Tensor {
	out := make([]batcher.Tensor, len(ts))
	for i, t := range ts {
		out[i] = batcher.Tensor{DType: t.DType, Shape: slices.Clone(t.Shape), Data: slices.Clone(t.Data)}
	}
	return out
}

// compareOutputs fills res's agreement and largest difference from
// production's outputs (want) and the candidate's (got). A classifier's
// output ([batch, classes] with classes > 1, or a binary one) is compared
// by predicted class per row; every FP32 output by its largest absolute
// difference.
func compareOutputs(res *ShadowResult, specs []repository.TensorSpec, want, got []batcher.Tensor) {
	if len(want) != len(got) {
		res.Mismatch = fmt.Sprintf("%d outputs against %d", len(got), len(want))
		return
	}
	for i := range want {
		w, g := want[i], got[i]
		if w.DType != core.Float32 || g.DType != core.Float32 || !slices.Equal(w.Shape, g.Shape) || len(w.Data) != len(g.Data) {
			if !slices.Equal(w.Shape, g.Shape) {
				res.Mismatch = fmt.Sprintf("output %d: shape %v against %v", i, g.Shape, w.Shape)
			}
			continue
		}
		n := len(w.Data) / 4
		wf, gf := make([]float32, n), make([]float32, n)
		for j := range n {
			wf[j] = math.Float32frombits(binary.LittleEndian.Uint32(w.Data[4*j:]))
			gf[j] = math.Float32frombits(binary.LittleEndian.Uint32(g.Data[4*j:]))
		}
		for j := range n {
			d := math.Abs(float64(wf[j]) - float64(gf[j]))
			if d > res.MaxAbsDiff || math.IsNaN(d) {
				res.MaxAbsDiff = d
			}
		}
		if len(w.Shape) != 2 || w.Shape[0] < 1 {
			continue
		}
		rows, classes := int(w.Shape[0]), int(w.Shape[1])
		binary := ""
		if i < len(specs) {
			binary = specs[i].Binary
		}
		switch {
		case classes > 1:
			for r := range rows {
				if argmax(wf[r*classes:(r+1)*classes]) == argmax(gf[r*classes:(r+1)*classes]) {
					res.Agree++
				}
				res.Rows++
			}
		case classes == 1 && binary != "":
			thr := float32(0)
			if binary == "probability" {
				thr = 0.5
			}
			for r := range rows {
				if (wf[r] > thr) == (gf[r] > thr) {
					res.Agree++
				}
				res.Rows++
			}
		}
	}
}

func argmax(xs []float32) int {
	best := 0
	for i, x := range xs {
		if x > xs[best] {
			best = i
		}
	}
	return best
}
