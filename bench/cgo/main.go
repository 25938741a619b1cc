// Command cgo benchmarks the cost of crossing from Go into libtorch: one
// cgo call, one tensor created and freed, and a forward pass of a small MLP
// (64 -> 256 -> 256 -> 10) at batch 1 and 64, side by side with the same
// operations from Python torch on the same libtorch, the same TorchScript
// file and the same thread count. One run, one table.
//
//	go run ./bench/cgo [-threads N]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/kilnml/kiln/core"
	"github.com/kilnml/kiln/internal/testkit"
	"github.com/kilnml/kiln/native"
)

// perOp times fn the way peer.py does: warm up, find an iteration count
// that runs ~60 ms, then report the best of five rounds in ns per op.
func perOp(fn func()) float64 {
	for i := 0; i < 200; i++ {
		fn()
	}
	n := 1
	for {
		t0 := time.Now()
		for i := 0; i < n; i++ {
			fn()
		}
		if time.Since(t0) > 60*time.Millisecond {
			break
		}
		n *= 2
	}
	best := 1e300
	for r := 0; r < 5; r++ {
		t0 := time.Now()
		for i := 0; i < n; i++ {
			fn()
		}
		best = min(best, float64(time.Since(t0).Nanoseconds())/float64(n))
	}
	return best
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench/cgo:", err)
		os.Exit(1)
	}
}

func main() {
	// libgomp keeps one OpenMP team per calling OS thread: pin this
	// goroutine, as a serving worker would, so that every forward pass
	// reuses the same team instead of waking another.
	runtime.LockOSThread()
	threads := flag.Int("threads", runtime.NumCPU(), "libtorch intra-op threads, both sides")
	flag.Parse()
	// libtorch's thread count does not reach OpenBLAS, whose idle workers
	// otherwise compete with libtorch's on small machines; OpenBLAS reads
	// OPENBLAS_NUM_THREADS when it loads, so both sides get it through a
	// re-exec (the Python peer inherits it).
	if want := fmt.Sprint(*threads); os.Getenv("OPENBLAS_NUM_THREADS") != want {
		os.Setenv("OPENBLAS_NUM_THREADS", want)
		exe, err := os.Executable()
		must(err)
		must(syscall.Exec(exe, os.Args, os.Environ()))
	}
	must(core.SetNumThreads(*threads))

	dir, err := os.MkdirTemp("", "kiln-bench-cgo-")
	must(err)
	defer os.RemoveAll(dir)
	must(testkit.MakeFixture("bench-cgo", dir))
	model := filepath.Join(dir, "mlp.pt")
	python, err := testkit.PythonPath()
	must(err)

	m, err := core.LoadModule(model)
	must(err)
	defer m.Close()

	kiln := map[string]float64{}
	x := 0
	kiln["call"] = perOp(func() { x = native.Noop(x) })
	kiln["tensor"] = perOp(func() {
		t, err := core.Zeros(core.Float32, 1, 64)
		must(err)
		t.Close()
	})
	for _, b := range []int{1, 64} {
		data := make([]float32, b*64)
		for i := range data {
			data[i] = rand.Float32()*2 - 1
		}
		in, err := core.NewTensor(data, int64(b), 64)
		must(err)
		kiln[fmt.Sprintf("forward%d", b)] = perOp(func() {
			outs, err := m.Forward(in)
			must(err)
			core.CloseAll(outs)
		})
		in.Close()
	}

	out, err := exec.Command(python, filepath.Join(testkit.Root(), "bench", "cgo", "peer.py"), model, fmt.Sprint(*threads)).Output()
	must(err)
	var peer map[string]any
	must(json.Unmarshal(out, &peer))

	fmt.Printf("bench/cgo: libtorch %s (Go side) / torch %v (Python side), %d intra-op and OpenBLAS threads, %s/%s, %d CPUs\n\n",
		core.TorchVersion(), peer["torch"], *threads, runtime.GOOS, runtime.GOARCH, runtime.NumCPU())
	fmt.Printf("%-42s %14s %14s %8s\n", "operation", "Kiln (Go)", "PyTorch (Py)", "Py/Kiln")
	rows := []struct{ key, name string }{
		{"call", "one call into the native layer"},
		{"tensor", "create + free a 1x64 float32 tensor"},
		{"forward1", "MLP 64-256-256-10 forward, batch 1"},
		{"forward64", "MLP 64-256-256-10 forward, batch 64"},
	}
	for _, r := range rows {
		k := kiln[r.key]
		p, _ := peer[r.key].(float64)
		fmt.Printf("%-42s %14s %14s %7.2fx\n", r.name, fmtNS(k), fmtNS(p), p/k)
	}
	fmt.Println("\none call: Go's cgo call to kiln_noop vs Python's torch.get_num_threads() (pybind11);")
	fmt.Println("forward: core.Module.Forward vs torch.jit.load(...)(x) under torch.inference_mode().")
}

func fmtNS(ns float64) string {
	switch {
	case ns >= 1e6:
		return fmt.Sprintf("%.2f ms", ns/1e6)
	case ns >= 1e3:
		return fmt.Sprintf("%.2f µs", ns/1e3)
	}
	return fmt.Sprintf("%.1f ns", ns)
}
