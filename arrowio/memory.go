package arrowio

import (
	"slices"
	"sync"
	"unsafe"

	"github.com/apache/arrow-go/v18/arrow/memory"
	"github.com/apache/arrow-go/v18/arrow/memory/mallocator"
)

// cRegions records the C memory this package knows of: live allocations
// of every Allocator and the buffers of arrays imported through the C Data
// Interface. Regions may overlap (imported arrays can share a buffer), so
// it is a multiset kept sorted by start, with a running maximum of the ends
// that lets a lookup stop early.
var cRegions struct {
	mu     sync.RWMutex
	spans  []span
	maxEnd []uintptr // maxEnd[i] = max(spans[0..i].end)
}

type span struct{ start, end uintptr }

func spanOf(b []byte) (span, bool) {
	if cap(b) == 0 {
		return span{}, false
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return span{p, p + uintptr(cap(b))}, true
}

func registerC(b []byte) {
	s, ok := spanOf(b)
	if !ok {
		return
	}
	cRegions.mu.Lock()
	defer cRegions.mu.Unlock()
	i, _ := slices.BinarySearchFunc(cRegions.spans, s.start, func(e span, p uintptr) int { return cmpUintptr(e.start, p) })
	cRegions.spans = slices.Insert(cRegions.spans, i, s)
	cRegions.maxEnd = slices.Insert(cRegions.maxEnd, i, 0)
	fixMaxEnd(i)
}

func unregisterC(b []byte) {
	s, ok := spanOf(b)
	if !ok {
		return
	}
	cRegions.mu.Lock()
	defer cRegions.mu.Unlock()
	i, _ := slices.BinarySearchFunc(cRegions.spans, s.start, func(e span, p uintptr) int { return cmpUintptr(e.start, p) })
	for ; i < len(cRegions.spans) && cRegions.spans[i].start == s.start; i++ {
		if cRegions.spans[i] == s {
			cRegions.spans = slices.Delete(cRegions.spans, i, i+1)
			cRegions.maxEnd = slices.Delete(cRegions.maxEnd, i, i+1)
			fixMaxEnd(i)
			return
		}
	}
}

// fixMaxEnd recomputes the running maximum from index i on.
func fixMaxEnd(i int) {
	var m uintptr
	if i > 0 {
		m = cRegions.maxEnd[i-1]
	}
	for ; i < len(cRegions.spans); i++ {
		m = max(m, cRegions.spans[i].end)
		cRegions.maxEnd[i] = m
	}
}

func cmpUintptr(a, b uintptr) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// isCMemory reports whether the n bytes at p lie in one region of C memory
// this package knows of.
func isCMemory(p unsafe.Pointer, n int) bool {
	start := uintptr(p)
	end := start + uintptr(n)
	cRegions.mu.RLock()
	defer cRegions.mu.RUnlock()
	// The last span starting at or before start, then back while some
	// earlier span may still reach past start.
	i, _ := slices.BinarySearchFunc(cRegions.spans, start+1, func(e span, p uintptr) int { return cmpUintptr(e.start, p) })
	for i--; i >= 0 && cRegions.maxEnd[i] > start; i-- {
		if s := cRegions.spans[i]; s.start <= start && end <= s.end {
			return true
		}
	}
	return false
}

// IsCMemory reports whether the n bytes at p are C memory that this package
// knows of: allocated by an Allocator, or a buffer of an array imported by
// ImportArray or ImportRecordBatch, and not yet freed. Tensors made by
// ArrayToTensor point at such memory without copying it.
func IsCMemory(p unsafe.Pointer, n int) bool { return isCMemory(p, n) }

// Allocator is an Arrow memory allocator that allocates C memory (with
// malloc, 64-byte aligned, through arrow-go's mallocator) and records it, so
// that tensors made from arrays it allocated share their memory instead of
// copying it. Give it to IPC readers (ipc.WithAllocator), Flight clients
// and builders whose data becomes tensors. It is safe for concurrent use.
type Allocator struct {
	m *mallocator.Mallocator
}

var _ memory.Allocator = (*Allocator)(nil)

// NewAllocator returns an Allocator.
func NewAllocator() *Allocator { return &Allocator{m: mallocator.NewMallocator()} }

// defaultAllocator makes the copies into C memory that conversions need.
var defaultAllocator = NewAllocator()

// Allocate returns size bytes of zeroed C memory.
func (a *Allocator) Allocate(size int) []byte {
	b := a.m.Allocate(size)
	registerC(b)
	return b
}

// Reallocate resizes b, which a allocated, to size bytes.
func (a *Allocator) Reallocate(size int, b []byte) []byte {
	unregisterC(b)
	nb := a.m.Reallocate(size, b)
	registerC(nb)
	return nb
}

// Free releases b, which a allocated.
func (a *Allocator) Free(b []byte) {
	unregisterC(b)
	a.m.Free(b)
}

// AllocatedBytes returns the number of bytes allocated and not yet freed.
func (a *Allocator) AllocatedBytes() int64 { return a.m.AllocatedBytes() }
