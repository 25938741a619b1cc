package core

import (
	"fmt"

	"github.com/kilnml/kiln/native"
)

// Version is Kiln's version.
const Version = "0.1.0"

// TorchVersion returns the version of the libtorch Kiln is linked with.
func TorchVersion() string { return native.TorchVersion() }

// SetNumThreads sets libtorch's intra-op thread count for the process.
func SetNumThreads(n int) error {
	if err := native.SetNumThreads(n); err != nil {
		return fmt.Errorf("kiln: set threads to %d: %w", n, err)
	}
	return nil
}

// NumThreads returns libtorch's intra-op thread count.
func NumThreads() int { return native.NumThreads() }

// SetNumInteropThreads sets libtorch's inter-op thread count. libtorch
// accepts this once, before any inter-op parallel work has started.
func SetNumInteropThreads(n int) error {
	if err := native.SetNumInteropThreads(n); err != nil {
		return fmt.Errorf("kiln: set inter-op threads to %d: %w", n, err)
	}
	return nil
}

// NumInteropThreads returns libtorch's inter-op thread count.
func NumInteropThreads() int { return native.NumInteropThreads() }

// ManualSeed seeds libtorch's default CPU random generator.
func ManualSeed(seed uint64) { native.ManualSeed(seed) }
