// Package arrowio moves tensors between Apache Arrow and Kiln without
// copying them.
//
// It provides:
//
//   - FixedShapeTensorType, the canonical arrow.fixed_shape_tensor extension
//     type that arrow-go lacks, with metadata serialized exactly as the Arrow
//     specification and pyarrow write it. Importing this package registers
//     it, so IPC readers and the C Data Interface recognize it.
//   - ArrayToTensor, ColumnToTensor and StackColumns, which turn Arrow
//     columns into *core.Tensor values pointing at the Arrow buffers, and
//     TensorToArray, which turns a tensor into an Arrow array pointing at
//     libtorch's memory.
//   - ImportArray, ImportRecordBatch, ExportArray and ExportRecordBatch,
//     which cross the Arrow C Data Interface by address, so that Python can
//     hand pyarrow data to Go.
//
// # Ownership
//
// Every conversion is explicit about who owns what. A tensor made from an
// Arrow array Retains the Arrow buffer it points at and Releases it when
// libtorch drops the tensor's storage, so the caller may Release the array
// and Close the tensor in any order. An array made from a tensor holds its
// own handle on the tensor's storage, closed when Arrow releases the array's
// buffer, so the caller may Close the tensor and Release the array in any
// order.
//
// # Where memory lives
//
// libtorch may keep a tensor's memory beyond the call that created it, and
// cgo forbids C code to keep pointers into the Go heap. A tensor can
// therefore only point at an Arrow buffer that is C memory. This package
// knows a buffer is C memory when it was allocated by an [Allocator] (for
// example by an IPC reader or Flight client given one with
// ipc.WithAllocator) or imported through the C Data Interface with
// ImportArray or ImportRecordBatch. Any other buffer, such as one that
// arrow-go's default Go allocator made, is copied once into C memory; the
// NoCopy option turns that copy into an error.
package arrowio
