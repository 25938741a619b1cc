package serving

/*
#cgo LDFLAGS: -ldl
#define _GNU_SOURCE
#include <dlfcn.h>

typedef void (*kiln_blas_setter)(int);

// kiln_set_blas_threads sets OpenBLAS's own thread pool size when the
// process has OpenBLAS loaded (libtorch's BLAS on Debian); libtorch's
// set_num_threads bounds OpenMP and MKL but not OpenBLAS's pthreads, whose
// idle workers spin. It returns 0 when there is no OpenBLAS.
static int kiln_set_blas_threads(int n) {
	void *f = dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
	if (f == NULL) {
		return 0;
	}
	((kiln_blas_setter)f)(n);
	return 1;
}
*/
import "C"

// setBLASThreads bounds OpenBLAS's thread pool, if the process uses
// OpenBLAS, to n threads per call, so that instances × threads fit the
// cores for matrix products too; it reports whether OpenBLAS was found.
func setBLASThreads(n int) bool {
	return C.kiln_set_blas_threads(C.int(n)) == 1
}
