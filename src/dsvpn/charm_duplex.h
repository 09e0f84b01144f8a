/* Template: the Charm duplex (docs/protocol.md, Duplex) over one kernel's register state.
 *
 * xoodoo_kernels.h includes this file once per kernel, after defining:
 *   XK_NAME              prefix of the generated functions (e.g. xoo_ssse3)
 *   XK_ATTR              function attributes (the kernel's target ISA), may be empty
 *   XK_T                 the in-register state type
 *   XK_LOAD(s, w)        XK_T* <- uint32_t w[12]
 *   XK_STORE(w, s)       uint32_t w[12] <- XK_T*
 *   XK_PERMUTE(s)        Xoodoo[12]
 *   XK_ABSORB(s, p)      rate ^= p[0..16]
 *   XK_SQUEEZE(s, out)   out[0..16] = rate
 *   XK_DECBLOCK(s, c, p) p[0..16] = c ^ rate; rate = c   (c and p may alias)
 *   XK_FLAGS(s, f)       state byte 47 ^= f
 * and undefines them all at its end.
 * The whole message runs with the state in registers: it is loaded and stored once per call,
 * which is where the SIMD kernels gain most over a permute-only kernel. */

#define XK_CAT2(a, b) a##_##b
#define XK_CAT(a, b) XK_CAT2(a, b)
#define XK_FN(f) XK_CAT(XK_NAME, f)

static XK_ATTR void XK_FN(permute)(uint32_t w[12])
{
    XK_T s;
    XK_LOAD(&s, w);
    XK_PERMUTE(&s);
    XK_STORE(w, &s);
}

/* the final block's padding (docs/protocol.md, Duplex): P || 0x80 || 0..., cut to 16 bytes */
static XK_ATTR void XK_FN(pad)(uint8_t blk[16], const uint8_t *p, size_t len)
{
    memset(blk, 0, 16);
    if (len) {
        memcpy(blk, p, len);
    }
    if (len < 16) {
        blk[len] = 0x80;
    }
}

static XK_ATTR void XK_FN(encrypt)(uint32_t w[12], uint8_t *buf, size_t n, uint8_t tag[16])
{
    XK_T s;
    uint8_t blk[16];

    XK_LOAD(&s, w);
    for (; n > 16; n -= 16, buf += 16) {
        XK_ABSORB(&s, buf); /* rate ^= P, and the new rate is C */
        XK_SQUEEZE(&s, buf);
        XK_PERMUTE(&s);
    }
    XK_FN(pad)(blk, buf, n);
    XK_ABSORB(&s, blk); /* the first n bytes of rate ^ pad(P) are C */
    XK_SQUEEZE(&s, blk);
    if (n) {
        memcpy(buf, blk, n);
    }
    XK_FLAGS(&s, XOO_FLAG_FINAL | (n == 16 ? XOO_FLAG_FULL : 0) | XOO_FLAG_CIPHER);
    XK_PERMUTE(&s);
    XK_SQUEEZE(&s, tag);
    XK_PERMUTE(&s);
    XK_STORE(w, &s);
}

/* computes the tag; comparing it is the caller's job */
static XK_ATTR void XK_FN(decrypt)(uint32_t w[12], uint8_t *buf, size_t n, uint8_t tag[16])
{
    XK_T s;
    uint8_t blk[16];
    size_t i;

    XK_LOAD(&s, w);
    for (; n > 16; n -= 16, buf += 16) {
        XK_DECBLOCK(&s, buf, buf);
        XK_PERMUTE(&s);
    }
    XK_SQUEEZE(&s, blk);
    for (i = 0; i < n; i++) {
        buf[i] ^= blk[i];
    }
    XK_FN(pad)(blk, buf, n); /* the plaintext is absorbed, as in encryption */
    XK_ABSORB(&s, blk);
    XK_FLAGS(&s, XOO_FLAG_FINAL | (n == 16 ? XOO_FLAG_FULL : 0) | XOO_FLAG_CIPHER);
    XK_PERMUTE(&s);
    XK_SQUEEZE(&s, tag);
    XK_PERMUTE(&s);
    XK_STORE(w, &s);
}

static XK_ATTR void XK_FN(hash)(uint32_t w[12], const uint8_t *msg, size_t n, uint8_t out[32])
{
    XK_T s;
    uint8_t blk[16];

    XK_LOAD(&s, w);
    for (; n > 16; n -= 16, msg += 16) {
        XK_ABSORB(&s, msg);
        XK_PERMUTE(&s);
    }
    XK_FN(pad)(blk, msg, n);
    XK_ABSORB(&s, blk);
    XK_FLAGS(&s, XOO_FLAG_FINAL | (n == 16 ? XOO_FLAG_FULL : 0));
    XK_PERMUTE(&s);
    XK_SQUEEZE(&s, out);
    XK_PERMUTE(&s);
    XK_SQUEEZE(&s, out + 16);
    XK_PERMUTE(&s);
    XK_STORE(w, &s);
}

static const xoo_kernel XK_FN(kernel) = {
    XK_KERNEL_NAME, XK_FN(supported), XK_FN(permute), XK_FN(encrypt), XK_FN(decrypt), XK_FN(hash),
};

#undef XK_CAT2
#undef XK_CAT
#undef XK_FN
/* Consume the parameters, so the next kernel defines its own and a missing one is an error. */
#undef XK_NAME
#undef XK_KERNEL_NAME
#undef XK_ATTR
#undef XK_T
#undef XK_LOAD
#undef XK_STORE
#undef XK_PERMUTE
#undef XK_ABSORB
#undef XK_SQUEEZE
#undef XK_DECBLOCK
#undef XK_FLAGS
