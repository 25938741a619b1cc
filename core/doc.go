// Package core is Kiln's Go API over libtorch: tensors and TorchScript
// modules with explicit ownership.
//
// Every *Tensor and *Module holds a native handle that its Close releases;
// a cleanup attached with runtime.AddCleanup releases handles that were
// never closed, but only as a safety net. Tensor memory always lives in C
// (allocated by libtorch, or handed in by FromBlob), so libtorch never keeps
// a pointer into the Go heap.
//
// Importing core changes nothing in the process: the entry points (the
// kiln command, the Python bindings, serving.Run) set libtorch's thread
// counts with SetNumThreads from their flags or the environment
// (internal/kilnenv).
package core
