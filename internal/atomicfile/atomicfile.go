// Package atomicfile replaces files so that a reader, or the process
// restarted after a crash, finds either the old content or the new one,
// never a part: the content goes to a temporary file next to the target,
// which is synced, given its permissions and renamed over the target, and
// the directory is synced so that the rename itself survives a crash
// (see rename(2) and fsync(2)).
//
// It is a leaf: the standard library only, so that every layer (core,
// registry, pipeline, serving) can use it.
package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
)

// TempPrefix starts the names of the temporary files WriteFile and Write
// create in the target's directory. A directory scan that lists targets
// can skip (or, at start-up, remove) names with this prefix: they are left
// only by a process that died mid-write.
const TempPrefix = ".tmp-"

// WriteFile replaces path with data, with permissions perm (subject to
// no umask: the file gets exactly perm). On error path is unchanged and the
// temporary file is removed; the error names the step that failed.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return replace(path, perm, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	})
}

// Write is WriteFile for content written by name: write is given the
// temporary file's path (it exists, empty) and fills it, e.g. a library
// call that saves to a path. The file is synced after write returns.
func Write(path string, perm os.FileMode, write func(tmp string) error) error {
	return replace(path, perm, func(f *os.File) error {
		if err := write(f.Name()); err != nil {
			return err
		}
		// write may have replaced the file rather than written to f: sync
		// what the name holds now.
		g, err := os.OpenFile(f.Name(), os.O_RDWR, 0)
		if err != nil {
			return err
		}
		err = g.Sync()
		return errors.Join(err, g.Close())
	})
}

func replace(path string, perm os.FileMode, fill func(f *os.File) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, TempPrefix+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	err = fill(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, perm)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes a rename into dir durable; file systems that cannot sync
// a directory (EINVAL, ENOTSUP) are not an error.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if errors.Is(err, syscall.EINVAL) || errors.Is(err, errors.ErrUnsupported) {
		err = nil
	}
	return errors.Join(err, d.Close())
}
