/* Xoodoo[12] kernels (docs/protocol.md, Permutation) and the Charm duplex built on each of them.
 *
 * Kernels: "avx512" (AVX-512F+VL: 128-bit rotates and ternary logic), "ssse3" (pshufb for the
 * 8-bit rotation), "portable" (plain C, any host and byte order). The SIMD kernels keep each
 * plane in one 128-bit register. They are compiled with per-function target attributes so the
 * module itself needs no -m flags and runs on any x86-64; xoo_best() picks one at run time. */
#ifndef DSVPN_XOODOO_KERNELS_H
#define DSVPN_XOODOO_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XOO_FLAG_FINAL 0x01
#define XOO_FLAG_FULL 0x02
#define XOO_FLAG_CIPHER 0x04

typedef struct xoo_kernel {
    const char *name;
    int (*supported)(void);
    void (*permute)(uint32_t w[12]);
    void (*encrypt)(uint32_t w[12], uint8_t *buf, size_t n, uint8_t tag[16]);
    void (*decrypt)(uint32_t w[12], uint8_t *buf, size_t n, uint8_t tag[16]);
    void (*hash)(uint32_t w[12], const uint8_t *msg, size_t n, uint8_t out[32]);
} xoo_kernel;

static const uint32_t XOO_RK[12] = {
    0x058, 0x038, 0x3c0, 0x0d0, 0x120, 0x014, 0x060, 0x02c, 0x380, 0x0f0, 0x1a0, 0x012,
};

/* ---- portable ---------------------------------------------------------------------------- */

#define XOO_ROL32(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

/* the permutations must be inlined into the duplex loops, so the state stays in registers from
 * block to block: left to itself clang makes them out-of-line calls through memory */
#if defined(__GNUC__) || defined(__clang__)
#define XOO_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define XOO_INLINE __forceinline
#else
#define XOO_INLINE inline
#endif

typedef struct { uint32_t a[12]; } xoo_portable_t;

/* little-endian hosts copy the words as they are, which every compiler turns into one load or
 * store; the byte-wise form below may stay four byte accesses (clang on aarch64, where this
 * kernel is the one that runs) */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) &&                             \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
static XOO_INLINE uint32_t xoo_load32_le(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static XOO_INLINE void xoo_store32_le(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}
#else
static XOO_INLINE uint32_t xoo_load32_le(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static XOO_INLINE void xoo_store32_le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
#endif

/* One round from the twelve words i0..i11 (A[y][x] = i(4y + x)) into o0..o11. The lane shifts
 * of rho-west and rho-east are made by the choice of input and output words, and the two sets of
 * names alternate between rounds, so the state stays in plain scalars (from an array form, clang
 * vectorises the round into SSE2 shuffles that are slower than scalar code). The round goes a
 * column at a time, finishing each column's three outputs before the next, which keeps few
 * values live (on x86-64 the state alone takes 12 of the 15 registers). */
#define XOO_E(p) (XOO_ROL32((p), 5) ^ XOO_ROL32((p), 14))
/* column x: theta (E[x] = e, E[x-1] = ew), rho-west, iota (rc), chi and rho-east; plane 1 is
 * read from word wi (lane x-1) and written to wo, plane 2 read from zi and written to zo (lane
 * x-2) */
#define XOO_PORTABLE_COLUMN(i, o, x, wi, wo, zi, zo, e, ew, rc)                               \
    do {                                                                                      \
        uint32_t b0_ = i##x ^ (e) ^ (rc);                                                     \
        uint32_t b1_ = i##wi ^ (ew);                                                          \
        uint32_t b2_ = XOO_ROL32(i##zi ^ (e), 11);                                            \
        o##x = b0_ ^ (~b1_ & b2_);                                                            \
        o##wo = XOO_ROL32(b1_ ^ (~b2_ & b0_), 1);                                             \
        o##zo = XOO_ROL32(b2_ ^ (~b0_ & b1_), 8);                                             \
    } while (0)
#define XOO_PORTABLE_ROUND(i, o, rc)                                                          \
    do {                                                                                      \
        uint32_t p0_ = i##0 ^ i##4 ^ i##8, p1_ = i##1 ^ i##5 ^ i##9;                          \
        uint32_t p2_ = i##2 ^ i##6 ^ i##10, p3_ = i##3 ^ i##7 ^ i##11;                        \
        uint32_t e0_ = XOO_E(p3_), e1_ = XOO_E(p0_), e2_ = XOO_E(p1_), e3_ = XOO_E(p2_);      \
        XOO_PORTABLE_COLUMN(i, o, 0, 7, 4, 8, 10, e0_, e3_, rc);                              \
        XOO_PORTABLE_COLUMN(i, o, 1, 4, 5, 9, 11, e1_, e0_, 0);                               \
        XOO_PORTABLE_COLUMN(i, o, 2, 5, 6, 10, 8, e2_, e1_, 0);                               \
        XOO_PORTABLE_COLUMN(i, o, 3, 6, 7, 11, 9, e3_, e2_, 0);                               \
    } while (0)

static XOO_INLINE void xoo_portable_permute_s(xoo_portable_t *s)
{
    uint32_t a0 = s->a[0], a1 = s->a[1], a2 = s->a[2], a3 = s->a[3];
    uint32_t a4 = s->a[4], a5 = s->a[5], a6 = s->a[6], a7 = s->a[7];
    uint32_t a8 = s->a[8], a9 = s->a[9], a10 = s->a[10], a11 = s->a[11];
    uint32_t n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11;
    int r;

    /* two rounds a pass, so the names come back; unrolling further only grows the code, which
     * is inlined three times per duplex function */
#if defined(__GNUC__) /* gcc and clang */
#pragma GCC unroll 1
#endif
    for (r = 0; r < 12; r += 2) {
        XOO_PORTABLE_ROUND(a, n, XOO_RK[r]);
        XOO_PORTABLE_ROUND(n, a, XOO_RK[r + 1]);
    }
    s->a[0] = a0; s->a[1] = a1; s->a[2] = a2; s->a[3] = a3;
    s->a[4] = a4; s->a[5] = a5; s->a[6] = a6; s->a[7] = a7;
    s->a[8] = a8; s->a[9] = a9; s->a[10] = a10; s->a[11] = a11;
}

static inline void xoo_portable_absorb(xoo_portable_t *s, const uint8_t *p)
{
    int i;

    for (i = 0; i < 4; i++) {
        s->a[i] ^= xoo_load32_le(p + 4 * i);
    }
}

static inline void xoo_portable_squeeze(const xoo_portable_t *s, uint8_t *out)
{
    int i;

    for (i = 0; i < 4; i++) {
        xoo_store32_le(out + 4 * i, s->a[i]);
    }
}

static inline void xoo_portable_decblock(xoo_portable_t *s, const uint8_t *c, uint8_t *p)
{
    int i;

    for (i = 0; i < 4; i++) {
        uint32_t cw = xoo_load32_le(c + 4 * i);
        xoo_store32_le(p + 4 * i, cw ^ s->a[i]);
        s->a[i] = cw;
    }
}

static int xoo_portable_supported(void) { return 1; }

#define XK_NAME xoo_portable
#define XK_KERNEL_NAME "portable"
#define XK_ATTR
#define XK_T xoo_portable_t
#define XK_LOAD(s, w) memcpy((s)->a, (w), 48)
#define XK_STORE(w, s) memcpy((w), (s)->a, 48)
#define XK_PERMUTE(s) xoo_portable_permute_s(s)
#define XK_ABSORB(s, p) xoo_portable_absorb((s), (p))
#define XK_SQUEEZE(s, out) xoo_portable_squeeze((s), (out))
#define XK_DECBLOCK(s, c, p) xoo_portable_decblock((s), (c), (p))
#define XK_FLAGS(s, f) ((s)->a[11] ^= (uint32_t)(f) << 24)
#include "charm_duplex.h" /* undefines the XK_ parameters */

/* ---- x86-64 SIMD ------------------------------------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define XOO_HAVE_X86 1
#include <immintrin.h>

/* planes A[0], A[1], A[2], lane x in 32-bit element x (x86 is little-endian, so the state
 * bytes load straight into the registers) */
typedef struct { __m128i a0, a1, a2; } xoo_x86_t;

/* Both SIMD rounds apply rho-west and iota to the theta input instead of its output, since
 * ROL(a ^ e, n) = ROL(a, n) ^ ROL(e, n) and a lane shift commutes with xor. The plane-side terms
 * are then computed off the critical path, which shortens the dependency chain of a round (the
 * duplex is serial, so latency is what sets the speed). */

/* lane x <- lane x - 1 (Ps = P[x-1], rho-west), and lane x <- lane x - 2 (Pss = P[x-2]) */
#define XOO_LANES_UP 0x93   /* _MM_SHUFFLE(2, 1, 0, 3) */
#define XOO_LANES_UP2 0x4e  /* _MM_SHUFFLE(1, 0, 3, 2) */

/* rho-east in one pshufb: lane x <- ROL32(lane x + 2, 8) */
#define XOO_RHO_EAST_BYTES 11, 8, 9, 10, 15, 12, 13, 14, 3, 0, 1, 2, 7, 4, 5, 6

#define XK_LOAD_X86(s, w)                                                                     \
    do {                                                                                      \
        (s)->a0 = _mm_loadu_si128((const __m128i *)(const void *)(w));                        \
        (s)->a1 = _mm_loadu_si128((const __m128i *)(const void *)((w) + 4));                  \
        (s)->a2 = _mm_loadu_si128((const __m128i *)(const void *)((w) + 8));                  \
    } while (0)
#define XK_STORE_X86(w, s)                                                                    \
    do {                                                                                      \
        _mm_storeu_si128((__m128i *)(void *)(w), (s)->a0);                                    \
        _mm_storeu_si128((__m128i *)(void *)((w) + 4), (s)->a1);                              \
        _mm_storeu_si128((__m128i *)(void *)((w) + 8), (s)->a2);                              \
    } while (0)
#define XK_ABSORB_X86(s, p)                                                                   \
    ((s)->a0 = _mm_xor_si128((s)->a0, _mm_loadu_si128((const __m128i *)(const void *)(p))))
#define XK_SQUEEZE_X86(s, out) _mm_storeu_si128((__m128i *)(void *)(out), (s)->a0)
#define XK_DECBLOCK_X86(s, c, p)                                                              \
    do {                                                                                      \
        __m128i c_ = _mm_loadu_si128((const __m128i *)(const void *)(c));                     \
        _mm_storeu_si128((__m128i *)(void *)(p), _mm_xor_si128(c_, (s)->a0));                 \
        (s)->a0 = c_;                                                                         \
    } while (0)
#define XK_FLAGS_X86(s, f)                                                                    \
    ((s)->a2 = _mm_xor_si128((s)->a2, _mm_set_epi32((int)((uint32_t)(f) << 24), 0, 0, 0)))

/* SSSE3: a rotation by other than 8 is two shifts, whose halves have disjoint bits, so
 * ROL(p, 5) ^ ROL(p, 14) is the xor of four shifts */
#define XOO_SSSE3 __attribute__((target("ssse3")))
#define XOO_SSE_ROL(x, n) _mm_or_si128(_mm_slli_epi32((x), (n)), _mm_srli_epi32((x), 32 - (n)))
#define XOO_SSE_ROL2(x, m, n)                                                                 \
    _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32((x), (m)), _mm_srli_epi32((x), 32 - (m))),     \
                  _mm_xor_si128(_mm_slli_epi32((x), (n)), _mm_srli_epi32((x), 32 - (n))))

static XOO_INLINE XOO_SSSE3 void xoo_ssse3_permute_s(xoo_x86_t *s)
{
    const __m128i rho_east = _mm_setr_epi8(XOO_RHO_EAST_BYTES);
    __m128i a0 = s->a0, a1 = s->a1, a2 = s->a2, p, ps, pss, b0, b1;
    int r;

    for (r = 0; r < 12; r++) {
        p = _mm_xor_si128(_mm_xor_si128(a0, a2), a1);
        ps = _mm_shuffle_epi32(p, XOO_LANES_UP);
        pss = _mm_shuffle_epi32(p, XOO_LANES_UP2);
        a0 = _mm_xor_si128(_mm_xor_si128(a0, _mm_cvtsi32_si128((int)XOO_RK[r])),
                           XOO_SSE_ROL2(ps, 5, 14));
        a1 = _mm_xor_si128(_mm_shuffle_epi32(a1, XOO_LANES_UP), XOO_SSE_ROL2(pss, 5, 14));
        a2 = _mm_xor_si128(XOO_SSE_ROL(a2, 11), XOO_SSE_ROL2(ps, 16, 25));
        b0 = _mm_xor_si128(a0, _mm_andnot_si128(a1, a2)); /* chi, from the pre-chi values */
        b1 = _mm_xor_si128(a1, _mm_andnot_si128(a2, a0));
        a2 = _mm_xor_si128(a2, _mm_andnot_si128(a0, a1));
        a0 = b0;
        a1 = XOO_SSE_ROL(b1, 1);
        a2 = _mm_shuffle_epi8(a2, rho_east);
    }
    s->a0 = a0;
    s->a1 = a1;
    s->a2 = a2;
}

static int xoo_ssse3_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("ssse3");
}

#define XK_NAME xoo_ssse3
#define XK_KERNEL_NAME "ssse3"
#define XK_ATTR XOO_SSSE3
#define XK_T xoo_x86_t
#define XK_LOAD XK_LOAD_X86
#define XK_STORE XK_STORE_X86
#define XK_PERMUTE(s) xoo_ssse3_permute_s(s)
#define XK_ABSORB XK_ABSORB_X86
#define XK_SQUEEZE XK_SQUEEZE_X86
#define XK_DECBLOCK XK_DECBLOCK_X86
#define XK_FLAGS XK_FLAGS_X86
#include "charm_duplex.h" /* undefines the XK_ parameters */

/* AVX-512VL: one-instruction rotates (vprold) and three-input logic (vpternlogd; 0x96 = a ^ b ^ c,
 * 0xd2 = a ^ (~b & c)). On the CPUs that have it the round is latency-bound (vector ops take
 * 2 cycles on some of them, more for vpternlogd's second and third inputs), so the round is
 * arranged to shorten the serial chain rather than to save instructions:
 *  - the next round's P[x-1] and P[x-2] (S1(P), S2(P)) are built straight from the chi outputs,
 *    S(c0) ^ S(ROL(c1, 1)) ^ S(rho-east(c2)) with the lane shift folded into a shuffle per term,
 *    so P itself and its shuffle drop off the critical path;
 *  - plane 2 only feeds the next round through ROL(rho-east(c2), 11) = ROL(S2(c2), 19), so that
 *    is computed directly (rho-east is applied for real only after the last round);
 *  - the critical input of each vpternlogd goes first (the destination operand, 2 cycles).
 * Folding more (e.g. chi on pre-rotated inputs) would need more rotates than the two shift
 * pipes can issue. */
#define XOO_AVX512 __attribute__((target("avx512f,avx512vl")))
/* clang reorders the inputs of vpternlogd, putting a non-critical one in the destination (the
 * latency-critical operand), so under clang the operand order is pinned with inline asm */
#if defined(__clang__)
static XOO_INLINE XOO_AVX512 __m128i xoo_tern96(__m128i a, __m128i b, __m128i c)
{
    __asm__("vpternlogd $0x96, %2, %1, %0" : "+v"(a) : "v"(b), "v"(c));
    return a;
}
static XOO_INLINE XOO_AVX512 __m128i xoo_ternd2(__m128i a, __m128i b, __m128i c)
{
    __asm__("vpternlogd $0xd2, %2, %1, %0" : "+v"(a) : "v"(b), "v"(c));
    return a;
}
#define XOO_X3(a, b, c) xoo_tern96((a), (b), (c))
#define XOO_CHI(a, b, c) xoo_ternd2((a), (b), (c))
#else
#define XOO_X3(a, b, c) _mm_ternarylogic_epi32((a), (b), (c), 0x96)
#define XOO_CHI(a, b, c) _mm_ternarylogic_epi32((a), (b), (c), 0xd2)
#endif

static XOO_INLINE XOO_AVX512 void xoo_avx512_permute_s(xoo_x86_t *s)
{
    const __m128i rho_east = _mm_setr_epi8(XOO_RHO_EAST_BYTES);
    /* lane x <- ROL32(lane x + 1, 8), and lane x <- ROL32(lane x, 8): S1 and S2 of rho-east */
    const __m128i rho_east_s1 = _mm_setr_epi8(7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14, 3, 0, 1, 2);
    const __m128i rho_east_s2 = _mm_setr_epi8(3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14);
    __m128i a0 = s->a0, a1 = s->a1, a2 = s->a2, p, ps, pss, a2r, t0, t1, t2, c2;
    int r;

    p = XOO_X3(a0, a1, a2);
    ps = _mm_shuffle_epi32(p, XOO_LANES_UP);  /* P[x-1] */
    pss = _mm_shuffle_epi32(p, XOO_LANES_UP2); /* P[x-2] */
    a2r = _mm_rol_epi32(a2, 11);
#if defined(__clang__)
#pragma clang loop unroll(full)
#else
#pragma GCC unroll 12
#endif
    for (r = 0; r < 12; r++) {
        /* theta, rho-west and iota, as in the SSSE3 kernel */
        t0 = XOO_X3(_mm_rol_epi32(ps, 5), _mm_rol_epi32(ps, 14),
                    _mm_xor_si128(a0, _mm_cvtsi32_si128((int)XOO_RK[r])));
        t1 = XOO_X3(_mm_rol_epi32(pss, 5), _mm_rol_epi32(pss, 14),
                    _mm_shuffle_epi32(a1, XOO_LANES_UP));
        t2 = XOO_X3(_mm_rol_epi32(ps, 16), _mm_rol_epi32(ps, 25), a2r);
        a0 = XOO_CHI(t0, t1, t2);
        a1 = _mm_rol_epi32(XOO_CHI(t1, t2, t0), 1);
        c2 = XOO_CHI(t2, t0, t1);
        if (r < 11) {
            a2r = _mm_rol_epi32(_mm_shuffle_epi32(c2, XOO_LANES_UP2), 19);
            ps = XOO_X3(_mm_shuffle_epi32(a1, XOO_LANES_UP), _mm_shuffle_epi8(c2, rho_east_s1),
                        _mm_shuffle_epi32(a0, XOO_LANES_UP));
            pss = XOO_X3(_mm_shuffle_epi32(a1, XOO_LANES_UP2), _mm_shuffle_epi8(c2, rho_east_s2),
                         _mm_shuffle_epi32(a0, XOO_LANES_UP2));
        } else {
            a2 = _mm_shuffle_epi8(c2, rho_east);
        }
    }
    s->a0 = a0;
    s->a1 = a1;
    s->a2 = a2;
}

static int xoo_avx512_supported(void)
{
    __builtin_cpu_init(); /* also checks that the OS saves the AVX-512 registers */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

#define XK_NAME xoo_avx512
#define XK_KERNEL_NAME "avx512"
#define XK_ATTR XOO_AVX512
#define XK_PERMUTE(s) xoo_avx512_permute_s(s)
#define XK_T xoo_x86_t
#define XK_LOAD XK_LOAD_X86
#define XK_STORE XK_STORE_X86
#define XK_ABSORB XK_ABSORB_X86
#define XK_SQUEEZE XK_SQUEEZE_X86
#define XK_DECBLOCK XK_DECBLOCK_X86
#define XK_FLAGS XK_FLAGS_X86
#include "charm_duplex.h" /* undefines the XK_ parameters */
#endif /* x86-64 */

/* ---- selection --------------------------------------------------------------------------- */

/* every kernel compiled in, fastest first; NULL-terminated. The order goes by CPU features, not
 * by timing at import, so the choice is deterministic. SSSE3 comes before the portable code: on
 * CPUs without AVX-512 simple vector ops take one cycle, so its round is shorter than the
 * ~80-instruction scalar one; the CPUs where vector ops are slower have AVX-512. */
static const xoo_kernel *const xoo_kernels[] = {
#ifdef XOO_HAVE_X86
    &xoo_avx512_kernel,
    &xoo_ssse3_kernel,
#endif
    &xoo_portable_kernel,
    NULL,
};

/* the kernel behind charm_*(); set once at module init (tests may switch it) */
static const xoo_kernel *xoo_active = &xoo_portable_kernel;

static const xoo_kernel *xoo_best(void)
{
    const xoo_kernel *const *k;

    for (k = xoo_kernels; *k != NULL; k++) {
        if ((*k)->supported()) {
            return *k;
        }
    }
    return &xoo_portable_kernel;
}

#endif /* DSVPN_XOODOO_KERNELS_H */
