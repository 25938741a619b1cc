package loadgen

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestRunCountsMeasuredCalls(t *testing.T) {
	bad := errors.New("bad")
	calls := 0
	res := Run(1, 20*time.Millisecond, 100*time.Millisecond, func(int) error {
		calls++
		time.Sleep(time.Millisecond)
		if calls%10 == 0 {
			return bad
		}
		return nil
	})
	assert.Greater(t, res.Requests, 20)
	assert.Greater(t, res.Errors, 1)
	assert.ErrorIs(t, res.FirstErr, bad)
	assert.Less(t, res.Requests+res.Errors, calls, "warm-up calls are not counted")
	assert.Len(t, res.Latencies, res.Requests)
	assert.GreaterOrEqual(t, res.Pct(0.5), time.Millisecond)
	assert.LessOrEqual(t, res.Pct(0.5), res.Pct(0.99))
	assert.InDelta(t, float64(res.Requests)/0.1, res.RPS(), 1e-6)
	assert.Equal(t, time.Duration(0), Result{}.Pct(0.5))
}

func TestRunMarkedMarksTheMeasuredSpan(t *testing.T) {
	var marks []bool
	var begin, end time.Time
	start := time.Now()
	res := RunMarked(2, 30*time.Millisecond, 60*time.Millisecond, func(b bool) {
		marks = append(marks, b)
		if b {
			begin = time.Now()
		} else {
			end = time.Now()
		}
	}, func(int) error { time.Sleep(time.Millisecond); return nil })
	assert.Greater(t, res.Requests, 0)
	assert.Equal(t, []bool{true, false}, marks, "begin, then end, before RunMarked returns")
	assert.GreaterOrEqual(t, begin.Sub(start), 30*time.Millisecond, "not before the warm-up ends")
	assert.True(t, end.After(begin))
}
