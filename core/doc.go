// Package core is Kiln's Go API over libtorch: tensors and TorchScript
// modules with explicit ownership.
//
// Every *Tensor and *Module holds a native handle that its Close releases;
// a cleanup attached with runtime.AddCleanup releases handles that were
// never closed, but only as a safety net. Tensor memory always lives in C
// (allocated by libtorch, or handed in by FromBlob), so libtorch never keeps
// a pointer into the Go heap.
//
// On import, core sets libtorch's intra-op thread count to the number of
// CPUs (or to KILN_NUM_THREADS when set), since some libtorch builds start
// with one thread.
package core
