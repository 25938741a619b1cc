package train

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/core/data"
	"github.com/kilnml/kiln/core/nn"
)

// SearchSpace is a small grid of MLPs: every combination of hidden depth,
// width, learning rate and dropout (ReLU activations).
type SearchSpace struct {
	Depth   []int     `json:"depth"`
	Width   []int64   `json:"width"`
	LR      []float64 `json:"lr"`
	Dropout []float64 `json:"dropout,omitempty"`
	// MaxCandidates, if > 0, samples that many grid points (seeded).
	MaxCandidates int `json:"max_candidates,omitempty"`
}

// Budget bounds each candidate's training.
type Budget struct {
	// Epochs caps the epochs (default: the train config's).
	Epochs int `json:"epochs,omitempty"`
	// Seconds, if > 0, ends a candidate after the epoch that passes it.
	Seconds float64 `json:"seconds,omitempty"`
}

// Ranking orders candidates: Score = the validation metric (negated when
// lower is better) − ParamsPenalty × parameters/10⁶ − LatencyPenalty ×
// measured single-sample latency in ms.
type Ranking struct {
	// Metric defaults to accuracy for classification, loss otherwise.
	Metric         string  `json:"metric,omitempty"`
	ParamsPenalty  float64 `json:"params_penalty,omitempty"`
	LatencyPenalty float64 `json:"latency_penalty,omitempty"`
}

// SelectJob is a model selection run, as a `kiln select` spec file
// declares it: the data, split and train sections of a Job, plus explicit
// candidate networks and/or a search space.
type SelectJob struct {
	Data       data.Options      `json:"data"`
	Split      data.SplitOptions `json:"split"`
	Train      Config            `json:"train"`
	Candidates []nn.Spec         `json:"candidates,omitempty"`
	Search     *SearchSpace      `json:"search,omitempty"`
	Budget     Budget            `json:"budget,omitempty"`
	Rank       Ranking           `json:"rank,omitempty"`
	// Concurrency is how many candidates train at once (default: the
	// number of CPUs, at most the number of candidates); the libtorch
	// threads are shared out among them. Concurrent candidates share
	// libtorch's dropout generator, so set 1 for a reproducible selection.
	Concurrency int `json:"concurrency,omitempty"`
}

// ParseSelectJob reads a SelectJob from JSON or YAML.
func ParseSelectJob(b []byte) (SelectJob, error) {
	var j SelectJob
	if err := nn.Decode(b, &j); err != nil {
		return SelectJob{}, fmt.Errorf("kiln: selection spec: %w", err)
	}
	return j, nil
}

// Candidate is one network and learning rate to try.
type Candidate struct {
	Name string  `json:"name"`
	Spec nn.Spec `json:"spec"`
	LR   float64 `json:"lr"`
}

// candidates expands the explicit specs and the search space.
func (j SelectJob) candidates() ([]Candidate, error) {
	var cs []Candidate
	for i, s := range j.Candidates {
		name := s.Name
		if name == "" {
			name = fmt.Sprintf("candidate%d", i)
		}
		cs = append(cs, Candidate{Name: name, Spec: s, LR: j.Train.Optimizer.LR})
	}
	if sp := j.Search; sp != nil {
		drop := sp.Dropout
		if len(drop) == 0 {
			drop = []float64{0}
		}
		lrs := sp.LR
		if len(lrs) == 0 {
			lrs = []float64{j.Train.Optimizer.LR}
		}
		if len(sp.Depth) == 0 || len(sp.Width) == 0 {
			return nil, errors.New("kiln: select: the search space needs depth and width values")
		}
		var grid []Candidate
		for _, d := range sp.Depth {
			for _, w := range sp.Width {
				for _, p := range drop {
					for _, lr := range lrs {
						var ls []nn.Layer
						for range d {
							ls = append(ls, nn.Linear(w), nn.ReLU())
							if p > 0 {
								ls = append(ls, nn.Dropout(p))
							}
						}
						ls = append(ls, nn.Linear(0))
						name := fmt.Sprintf("mlp-d%d-w%d-p%g-lr%g", d, w, p, lr)
						grid = append(grid, Candidate{Name: name, Spec: nn.Spec{Name: name, Layers: ls}, LR: lr})
					}
				}
			}
		}
		if sp.MaxCandidates > 0 && len(grid) > sp.MaxCandidates {
			rng := rand.New(rand.NewPCG(j.Train.Seed, 0x5e1ec7))
			rng.Shuffle(len(grid), func(a, b int) { grid[a], grid[b] = grid[b], grid[a] })
			grid = grid[:sp.MaxCandidates]
		}
		cs = append(cs, grid...)
	}
	if len(cs) == 0 {
		return nil, errors.New("kiln: select: no candidates (give candidates or a search space)")
	}
	return cs, nil
}

// Entry is one row of the leaderboard.
type Entry struct {
	Rank      int     `json:"rank"`
	Candidate         // name, spec, learning rate
	Metric    float64 `json:"metric"`
	Params    int64   `json:"params"`
	LatencyMs float64 `json:"latency_ms"`
	Score     float64 `json:"score"`
	Epochs    int     `json:"epochs"`
	Seconds   float64 `json:"seconds"`
	Val       Metrics `json:"val,omitempty"`
	Test      Metrics `json:"test,omitempty"`
	// Err is why the candidate failed (it then ranks last).
	Err string `json:"error,omitempty"`
}

// Leaderboard is the outcome of Select, best first.
type Leaderboard struct {
	Metric  string  `json:"metric"`
	Entries []Entry `json:"entries"`
	Winner  *Entry  `json:"winner,omitempty"`
	Seconds float64 `json:"seconds"`
}

// Select trains every candidate within the budget on the same split and
// preprocessing, measures each one's single-sample latency, ranks them and
// returns the leaderboard; with out set it saves the winner as a model
// package there. onEvent (may be nil) receives each candidate's progress
// and may be called from several goroutines at once.
func Select(ctx context.Context, j SelectJob, t *data.Table, source, out string, onEvent func(string, Event)) (*Leaderboard, error) {
	t0 := time.Now()
	s, err := newSelection(j, t)
	if err != nil {
		return nil, err
	}
	conc := j.Concurrency
	if conc <= 0 {
		conc = runtime.NumCPU()
	}
	conc = min(conc, len(s.cands))
	prevThreads := core.NumThreads()
	if err := core.SetNumThreads(max(1, runtime.NumCPU()/conc)); err != nil {
		return nil, err
	}
	defer core.SetNumThreads(prevThreads)
	defer s.close()

	s.trainAll(ctx, conc, onEvent)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("kiln: select: %w", err)
	}
	s.score()
	lb, order := s.rank()
	if lb.Entries[0].Err != "" {
		return lb, fmt.Errorf("kiln: select: every candidate failed; first error: %s", lb.Entries[0].Err)
	}
	lb.Winner = &lb.Entries[0]
	if out != "" {
		if err := s.saveWinner(order[0], out, source); err != nil {
			return lb, err
		}
	}
	lb.Seconds = time.Since(t0).Seconds()
	if slices.ContainsFunc(lb.Entries, func(e Entry) bool { return math.IsNaN(e.Score) }) {
		return lb, errors.New("kiln: select: a candidate's score is NaN")
	}
	return lb, nil
}

// selection is the state of one Select: the candidates, the prepared data
// they all train on, and each one's leaderboard entry and trained network.
// Its methods are Select's stages, in order: trainAll, score, rank,
// saveWinner.
type selection struct {
	j     SelectJob
	cands []Candidate
	prep  *Prepared
	// cfg is the training config every candidate starts from (the job's,
	// bounded by the budget); metric ranks them, higher being better when
	// up.
	cfg     Config
	metric  string
	up      bool
	entries []Entry
	nets    []*nn.Net
}

// newSelection expands the job's candidates, prepares the data with the
// first one's network and works out the training config and the ranking
// metric.
func newSelection(j SelectJob, t *data.Table) (*selection, error) {
	cands, err := j.candidates()
	if err != nil {
		return nil, err
	}
	base := Job{Model: cands[0].Spec, Data: j.Data, Split: j.Split, Train: j.Train}
	if base.Train.Optimizer.LR == 0 {
		base.Train.Optimizer.LR = cands[0].LR
	}
	prep, err := Prepare(base, t)
	if err != nil {
		return nil, err
	}
	if prep.Val == nil {
		return nil, errors.New("kiln: select: ranking needs a validation split (split.val > 0)")
	}
	cfg := prep.Job.Train
	cfg.CheckpointDir, cfg.Resume = "", false
	if j.Budget.Epochs > 0 {
		cfg.Epochs = j.Budget.Epochs
	}
	cfg.MaxSeconds = j.Budget.Seconds
	metric := j.Rank.Metric
	if metric == "" {
		metric = "loss"
		if prep.Pre.Task == data.Classification {
			metric = "accuracy"
		}
	}
	up, err := higherIsBetter(metric)
	if err != nil {
		return nil, err
	}
	return &selection{j: j, cands: cands, prep: prep, cfg: cfg, metric: metric, up: up,
		entries: make([]Entry, len(cands)), nets: make([]*nn.Net, len(cands))}, nil
}

// close releases the candidates' networks.
func (s *selection) close() {
	for _, n := range s.nets {
		if n != nil {
			n.Close()
		}
	}
}

// trainAll trains the candidates, conc at a time, each one's failure
// (or a panic) becoming its entry's Err.
func (s *selection) trainAll(ctx context.Context, conc int, onEvent func(string, Event)) {
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	for i, c := range s.cands {
		s.entries[i] = Entry{Candidate: c}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			defer func() {
				if r := recover(); r != nil {
					s.entries[i].Err = fmt.Sprintf("internal error: %v", r)
				}
			}()
			if ctx.Err() != nil {
				s.entries[i].Err = ctx.Err().Error()
				return
			}
			net, err := trainCandidate(ctx, s.prep, c, s.cfg, s.metric, &s.entries[i], onEvent)
			if err != nil {
				s.entries[i].Err = err.Error()
				return
			}
			s.nets[i] = net
		}()
	}
	wg.Wait()
}

// score measures each trained candidate's latency and works out its
// score. Latency is measured after training, one candidate at a time, so
// that candidates do not slow each other's measurement.
func (s *selection) score() {
	rk := s.j.Rank
	for i, net := range s.nets {
		if net == nil {
			continue
		}
		lat, err := latency(net)
		if err != nil {
			s.entries[i].Err = err.Error()
			continue
		}
		e := &s.entries[i]
		e.LatencyMs = lat
		v := e.Metric
		if !s.up {
			v = -v
		}
		e.Score = v - rk.ParamsPenalty*float64(e.Params)/1e6 - rk.LatencyPenalty*lat
	}
}

// rank orders the entries, those that trained first and then by score,
// and returns the leaderboard with order[r], the index in s.entries of
// the candidate ranked r+1.
func (s *selection) rank() (*Leaderboard, []int) {
	entries := s.entries
	order := make([]int, len(entries))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool {
		ea, eb := entries[order[a]], entries[order[b]]
		if (ea.Err == "") != (eb.Err == "") {
			return ea.Err == ""
		}
		return ea.Score > eb.Score
	})
	lb := &Leaderboard{Metric: s.metric}
	for r, i := range order {
		entries[i].Rank = r + 1
		lb.Entries = append(lb.Entries, entries[i])
	}
	return lb, order
}

// saveWinner saves candidate wi (the winner) as a model package in out,
// with the job it was trained by and its metrics.
func (s *selection) saveWinner(wi int, out, source string) error {
	pj := *s.prep
	pj.Job.Model = autoOut(s.cands[wi].Spec, s.prep.Pre, s.cfg.Loss.Type)
	pj.Job.Train = s.cfg
	pj.Job.Train.Optimizer.LR = s.entries[wi].LR
	e := s.entries[wi]
	rep := &Report{Val: e.Val, Test: e.Test, Result: &Result{BestEpoch: e.Epochs}}
	return SavePackage(out, s.nets[wi], &pj, rep, source)
}

// latency is the median time of a single-sample forward pass, in ms.
func latency(net *nn.Net) (float64, error) {
	x, err := core.Zeros(core.Float32, 1, net.Inputs)
	if err != nil {
		return 0, err
	}
	defer x.Close()
	var ts []float64
	for i := range 25 {
		t0 := time.Now()
		outs, err := net.Forward(x)
		if err != nil {
			return 0, fmt.Errorf("kiln: select: latency: %w", err)
		}
		core.CloseAll(outs)
		if i >= 5 { // warm-up runs are not counted
			ts = append(ts, float64(time.Since(t0).Microseconds())/1000)
		}
	}
	slices.Sort(ts)
	return ts[len(ts)/2], nil
}

func trainCandidate(ctx context.Context, p *Prepared, c Candidate, cfg Config, metric string, e *Entry, onEvent func(string, Event)) (*nn.Net, error) {
	spec := autoOut(c.Spec, p.Pre, cfg.Loss.Type)
	e.Spec = spec
	ts, err := TrainSpec(spec, cfg.Loss.Type)
	if err != nil {
		return nil, err
	}
	net, err := nn.BuildWithPrelude(ts, p.Pre.Prelude(), cfg.Seed)
	if err != nil {
		return nil, err
	}
	if c.LR > 0 {
		cfg.Optimizer.LR = c.LR
	}
	e.LR = cfg.Optimizer.LR
	var cb func(Event)
	if onEvent != nil {
		cb = func(ev Event) { onEvent(c.Name, ev) }
	}
	res, err := Fit(ctx, net, p.Train, p.Val, cfg, cb)
	if err != nil {
		net.Close()
		return nil, err
	}
	e.Params, e.Epochs, e.Seconds = net.Params, len(res.History), res.Seconds
	if e.Val, err = Evaluate(net, p.Val, cfg); err != nil {
		net.Close()
		return nil, err
	}
	v, ok := e.Val[metric]
	if !ok {
		net.Close()
		return nil, fmt.Errorf("kiln: select: ranking metric %q is not computed for this task (it has %v)", metric, keys(e.Val))
	}
	e.Metric = v
	if p.Test != nil {
		if e.Test, err = Evaluate(net, p.Test, cfg); err != nil {
			net.Close()
			return nil, err
		}
	}
	return net, nil
}
