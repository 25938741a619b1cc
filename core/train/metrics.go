package train

import (
	"fmt"
	"math"
)

// Metrics maps a metric name (loss, accuracy, precision, recall, f1, mse,
// mae, r2) to its value.
type Metrics map[string]float64

// higherIsBetter tells how a metric ranks; unknown names are an error.
func higherIsBetter(name string) (bool, error) {
	switch name {
	case "", "loss", "mse", "mae":
		return false, nil
	case "accuracy", "precision", "recall", "f1", "r2":
		return true, nil
	}
	return false, fmt.Errorf("kiln: unknown metric %q (want loss, accuracy, precision, recall, f1, mse, mae or r2)", name)
}

// ClassMetrics computes accuracy and macro-averaged precision, recall and
// F1 of predicted classes against true ones, over k classes.
func ClassMetrics(pred, truth []int, k int) Metrics {
	if len(pred) == 0 {
		return Metrics{}
	}
	tp := make([]float64, k)
	fp := make([]float64, k)
	fn := make([]float64, k)
	correct := 0
	for i, p := range pred {
		t := truth[i]
		if p == t {
			correct++
			tp[t]++
		} else {
			if p >= 0 && p < k {
				fp[p]++
			}
			fn[t]++
		}
	}
	m := Metrics{"accuracy": float64(correct) / float64(len(pred))}
	if k == 2 {
		// Binary: the positive class is class 1.
		prec, rec := ratio(tp[1], tp[1]+fp[1]), ratio(tp[1], tp[1]+fn[1])
		m["precision"], m["recall"], m["f1"] = prec, rec, f1(prec, rec)
		return m
	}
	var sp, sr, sf float64
	for c := range k {
		prec, rec := ratio(tp[c], tp[c]+fp[c]), ratio(tp[c], tp[c]+fn[c])
		sp += prec
		sr += rec
		sf += f1(prec, rec)
	}
	m["precision"], m["recall"], m["f1"] = sp/float64(k), sr/float64(k), sf/float64(k)
	return m
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func f1(p, r float64) float64 {
	if p+r == 0 {
		return 0
	}
	return 2 * p * r / (p + r)
}

// RegressionMetrics computes MSE, MAE and R² of predictions.
func RegressionMetrics(pred, truth []float64) Metrics {
	if len(pred) == 0 {
		return Metrics{}
	}
	var se, ae, mean float64
	for i := range pred {
		d := pred[i] - truth[i]
		se += d * d
		ae += math.Abs(d)
		mean += truth[i]
	}
	n := float64(len(pred))
	mean /= n
	var ss float64
	for _, t := range truth {
		ss += (t - mean) * (t - mean)
	}
	r2 := 0.0
	if ss > 0 {
		r2 = 1 - se/ss
	}
	return Metrics{"mse": se / n, "mae": ae / n, "r2": r2}
}
