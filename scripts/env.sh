#!/usr/bin/env bash
# Build environment for Kiln's cgo code against libtorch.
#
#   source scripts/env.sh            # export into the current (bash) shell
#   eval "$(scripts/env.sh --print)" # same, from any POSIX shell
#   scripts/env.sh --print           # print `export NAME='value'` lines only
#
# Sets CGO_ENABLED, CGO_CXXFLAGS, CGO_LDFLAGS, LD_LIBRARY_PATH, PATH (repo
# bin/ first) and KILN_PYTHON (.venv/bin/python if present, else
# /usr/bin/python3).
#
# libtorch:
#   LIBTORCH unset  Debian's libtorch-dev (headers under /usr/include, libs in
#                   /usr/lib/<multiarch>); the Go package's #cgo lines carry
#                   the include/-l flags, so CGO_* stay minimal.
#   LIBTORCH=DIR    a libtorch tree with include/ and lib/ (e.g. a pip
#                   site-packages/torch): adds -I/-L/-rpath for DIR, the
#                   C++11 ABI setting that DIR's libc10.so was built with and
#                   the -std= its headers need (C++20 for torch >= 2.10);
#                   with lib/libtorch_cuda.so also -DKILN_WITH_CUDA when
#                   CUDA's headers are found (CUDA_HOME, nvidia pip
#                   packages, /usr/local/cuda).

_kiln_env_main() {
    local mode=export
    case "${1:-}" in
        --print) mode=print ;;
        -h|--help)
            sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            return 0 ;;
        "") ;;
        *) printf 'env.sh: unknown argument: %s (use --print or --help)\n' "$1" >&2
           return 2 ;;
    esac
    # Run directly (not sourced): there is no shell to export into, so print.
    [ "${_kiln_sourced:-1}" = 1 ] || mode=print

    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1

    local cxxflags="-O2" ldflags="-O2"
    local ld_path="${LD_LIBRARY_PATH:-}"

    if [ -n "${LIBTORCH:-}" ]; then
        local lt
        if ! lt="$(cd "$LIBTORCH" 2>/dev/null && pwd)"; then
            printf 'env.sh: LIBTORCH=%s is not a directory\n' "$LIBTORCH" >&2
            return 1
        fi
        if [ ! -f "$lt/include/torch/script.h" ] || [ ! -f "$lt/lib/libtorch.so" ]; then
            printf 'env.sh: LIBTORCH=%s is not a libtorch tree: need include/torch/script.h and lib/libtorch.so\n' "$lt" >&2
            return 1
        fi
        if [ ! -f "$lt/lib/libc10.so" ]; then
            printf 'env.sh: LIBTORCH=%s lacks lib/libc10.so\n' "$lt" >&2
            return 1
        fi
        if ! command -v nm >/dev/null 2>&1; then
            printf 'env.sh: nm (binutils) is needed to detect the C++ ABI of %s/lib/libc10.so\n' "$lt" >&2
            return 1
        fi
        # C++11 ABI of this libtorch: look only at c10's own exported symbols
        # (_ZN3c10...). Pip wheels also export libstdc++ helpers that mention
        # std::__cxx11 even when built with the old ABI, so a plain
        # `grep __cxx11` over all symbols misdetects them as ABI=1.
        local abi=0
        if nm -D --defined-only "$lt/lib/libc10.so" 2>/dev/null \
                | awk '$NF ~ /^_ZN3c10/ && $NF ~ /__cxx11/ {found=1} END {exit !found}'; then
            abi=1
        fi
        # C++ standard its headers require (torch >= 2.10 needs C++20, older
        # 2.x C++17).
        local std=c++17
        if grep -qs 'C++20 or later' "$lt/include/ATen/ATen.h" \
                "$lt/include/torch/csrc/api/include/torch/all.h"; then
            std=c++20
        fi
        cxxflags="$cxxflags -std=$std -I$lt/include -I$lt/include/torch/csrc/api/include -D_GLIBCXX_USE_CXX11_ABI=$abi"
        ldflags="$ldflags -L$lt/lib -Wl,-rpath,$lt/lib"
        # A libtorch with CUDA (lib/libtorch_cuda.so, as in PyPI's Linux
        # wheels): define KILN_WITH_CUDA (a CUDA stream per GPU module,
        # the caching allocator's statistics; native/device.cc) when CUDA's
        # runtime headers are found: $CUDA_HOME/include, the nvidia pip
        # packages beside the torch package (cu13 and cu12 layouts), or
        # /usr/local/cuda. Without them Kiln still runs on a GPU through
        # libtorch's device-generic API. The linker may lack the nvidia
        # libraries libtorch_cuda.so needs (a build machine without a
        # GPU): they are resolved when the binary runs, so they are allowed
        # to be missing at link time.
        if [ -f "$lt/lib/libtorch_cuda.so" ]; then
            local cuda_inc="" d
            for d in "${CUDA_HOME:+$CUDA_HOME/include}" "$lt/../nvidia/cu13/include" \
                     "$lt/../nvidia/cuda_runtime/include" /usr/local/cuda/include; do
                if [ -n "$d" ] && [ -f "$d/cuda_runtime_api.h" ]; then
                    cuda_inc="$(cd "$d" && pwd)"
                    break
                fi
            done
            # c10's CUDA headers call CUDA's runtime inline: link libcudart
            # from beside the headers (lib/ or lib64/).
            local cudart=""
            for d in "$cuda_inc/../lib" "$cuda_inc/../lib64"; do
                cudart="$(ls "$d"/libcudart.so* 2>/dev/null | head -n 1)"
                [ -n "$cudart" ] && break
            done
            if [ -n "$cuda_inc" ] && [ -n "$cudart" ]; then
                cxxflags="$cxxflags -DKILN_WITH_CUDA -I$cuda_inc"
                ldflags="$ldflags -lc10_cuda -L$(cd "$(dirname "$cudart")" && pwd) -l:$(basename "$cudart")"
            else
                printf 'env.sh: %s has CUDA but CUDA runtime headers and libcudart were not found (set CUDA_HOME): building without KILN_WITH_CUDA\n' "$lt" >&2
            fi
            ldflags="$ldflags -Wl,--allow-shlib-undefined"
        fi
        ld_path="$(_kiln_prepend "$ld_path" "$lt/lib")"
    fi

    local path
    path="$(_kiln_prepend "${PATH:-}" "$root/bin")"
    if ! PATH="$path" command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
        path="$path:/usr/local/go/bin"
    fi

    local python=/usr/bin/python3
    [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"

    if [ "$mode" = print ]; then
        _kiln_print CGO_ENABLED 1
        _kiln_print CGO_CXXFLAGS "$cxxflags"
        _kiln_print CGO_LDFLAGS "$ldflags"
        _kiln_print LD_LIBRARY_PATH "$ld_path"
        _kiln_print PATH "$path"
        _kiln_print KILN_PYTHON "$python"
    else
        export CGO_ENABLED=1
        export CGO_CXXFLAGS="$cxxflags"
        export CGO_LDFLAGS="$ldflags"
        export LD_LIBRARY_PATH="$ld_path"
        export PATH="$path"
        export KILN_PYTHON="$python"
    fi
}

# _kiln_prepend LIST DIR: DIR first in the colon list LIST, without repeats
# and without empty entries (an empty entry would mean the current dir).
_kiln_prepend() {
    local out="$2" item
    local -a items=()
    IFS=: read -r -a items <<< "$1"
    for item in "${items[@]}"; do
        if [ -n "$item" ] && [ "$item" != "$2" ]; then out="$out:$item"; fi
    done
    printf '%s' "$out"
}

# _kiln_print NAME VALUE: `export NAME='VALUE'`, single quotes escaped.
_kiln_print() {
    local v="$2" q="'\\''"
    printf "export %s='%s'\n" "$1" "${v//\'/$q}"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    _kiln_sourced=0
    _kiln_env_main "$@"
    exit $?
else
    _kiln_sourced=1
    # A script sourced without arguments sees its caller's "$@": only take
    # the options this script knows.
    case "${1:-}" in
        --print|-h|--help) _kiln_env_main "$1" ;;
        *) _kiln_env_main ;;
    esac
    _kiln_rc=$?
    unset -f _kiln_env_main _kiln_prepend _kiln_print
    unset _kiln_sourced
    eval "unset _kiln_rc; return $_kiln_rc"
fi
