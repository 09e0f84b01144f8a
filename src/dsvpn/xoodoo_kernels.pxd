# Declarations of xoodoo_kernels.h: the Xoodoo[12] kernels and the Charm duplex on each.
from libc.stdint cimport uint8_t, uint32_t


cdef extern from "xoodoo_kernels.h" nogil:
    ctypedef struct xoo_kernel:
        const char* name
        int (*supported)() noexcept nogil
        void (*permute)(uint32_t* w) noexcept nogil
        void (*encrypt)(uint32_t* w, uint8_t* buf, size_t n, uint8_t* tag) noexcept nogil
        void (*decrypt)(uint32_t* w, uint8_t* buf, size_t n, uint8_t* tag) noexcept nogil
        void (*hash)(uint32_t* w, const uint8_t* msg, size_t n, uint8_t* out) noexcept nogil
    const xoo_kernel* xoo_kernels[]      # every kernel compiled in, fastest first; NULL-ended
    const xoo_kernel* xoo_active         # the kernel behind charm_*()
    const xoo_kernel* xoo_best()
