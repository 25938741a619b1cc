package main

import (
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

// goMemoryShare is the share of a cgroup memory limit that `kiln serve`
// gives the Go runtime as its soft memory limit: the rest is for what
// the Go runtime does not count (libtorch's tensors and batches in C
// memory, the libraries' resident pages, about 200 MiB idle, and thread
// stacks). Under 2 GiB, 3/4 left the worst requests of
// TestServeUnderMemoryCap at 91% of the cap; 3/5 leaves more room.
const goMemoryShare = 0.6

// noLimit is the smallest cgroup v1 memory.limit_in_bytes read as "no
// limit" (v1 writes "unlimited" as a page-rounded 2^63-1).
const noLimit = 1 << 62

// applyMemoryLimit sets the Go runtime's soft memory limit
// (runtime/debug.SetMemoryLimit) to goMemoryShare of the cgroup memory
// limit this process runs under, unless GOMEMLIMIT is set or there is no
// such limit. Without it the garbage collector lets the heap grow to
// twice what is live (GOGC=100) whatever the cap, and the kernel kills the
// server under a memory cap that the live data fits in. It returns the
// limit set (0: none).
func applyMemoryLimit(log *slog.Logger) int64 {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0
	}
	raw, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0
	}
	limit, where := cgroupMemoryLimit(raw, "/sys/fs/cgroup")
	if limit <= 0 {
		return 0
	}
	soft := int64(float64(limit) * goMemoryShare)
	debug.SetMemoryLimit(soft)
	log.Info("Go memory limit set from the cgroup's", "cgroup_limit_bytes", limit, "cgroup", where, "go_limit_bytes", soft)
	return soft
}

// cgroupMemoryLimit returns the memory limit, in bytes, of the cgroup that
// procCgroup (/proc/self/cgroup's contents) names under the cgroup
// file systems at root, and the file it read; the smallest limit of the
// cgroup and its ancestors counts. Cgroup v2 (memory.max) is read first,
// then v1's memory controller (memory.limit_in_bytes). 0 means no limit
// found.
func cgroupMemoryLimit(procCgroup []byte, root string) (int64, string) {
	var v2, v1 string
	for _, line := range strings.Split(strings.TrimSpace(string(procCgroup)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			v2 = parts[2]
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "memory" {
				v1 = parts[2]
			}
		}
	}
	smallest := func(base, rel, file string) (int64, string) {
		var best int64
		var where string
		for p := path.Clean("/" + rel); ; p = path.Dir(p) {
			f := filepath.Join(base, p, file)
			if b, err := os.ReadFile(f); err == nil {
				s := strings.TrimSpace(string(b))
				if n, err := strconv.ParseInt(s, 10, 64); err == nil && n > 0 && n < noLimit && (best == 0 || n < best) {
					best, where = n, f
				}
			}
			if p == "/" {
				return best, where
			}
		}
	}
	if v2 != "" {
		if n, where := smallest(root, v2, "memory.max"); n > 0 {
			return n, where
		}
	}
	if v1 != "" {
		return smallest(filepath.Join(root, "memory"), v1, "memory.limit_in_bytes")
	}
	return 0, ""
}
