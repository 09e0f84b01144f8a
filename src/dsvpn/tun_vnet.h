/* Linux tun with IFF_VNET_HDR: every read and write carries a 10-byte virtio_net_hdr.
 *
 * Why: each packet written to a tun walks the receiving host's stack on its own (forwarding,
 * NAT, veth, the far host's TCP), and on the receiving side of the tunnel that per-packet
 * work, not the cipher, is what costs most. Here consecutive segments of one TCP flow taken
 * from one socket read are written as ONE GSO super-packet (userspace GRO, as wireguard-go
 * does), so the kernel walks its stack once per up to 64 KB and splits the packet again only
 * where it must (a veth delivers it whole to the far host's TCP).
 *
 * UDP likewise: consecutive datagrams of one flow (same addresses and ports) with the same
 * payload size (a shorter one ends the group) go out as one UDP GSO packet (USO, Linux 6.2+),
 * which the receiving socket splits into the original datagrams. Only datagrams with DF set
 * and a checksum are merged (DF: the IP ID of such a packet carries nothing; the checksum: a
 * merged packet gets a fresh one for every datagram). A kernel without USO refuses that write
 * with EINVAL: the group is then written datagram by datagram and UDP is never merged again.
 *
 * Nothing changes on the wire: frames still carry exactly the IP packets the peer's tun gave
 * it; merging happens only after decryption, on the way into our own tun. The merge rules
 * follow the kernel's own GRO (tcp_gro_receive): same addresses, ports, IP header fields, ACK,
 * window and TCP options; contiguous sequence numbers; every segment but the last exactly
 * gso_size long; only ACK/PSH flags; a PSH or short segment ends the group, which is then
 * written at once. Segments whose IPv4 header or TCP checksum is wrong are never merged (the
 * kernel sees and drops them as before), since a merged packet gets a fresh checksum.
 *
 * Reads: with TUNSETOFFLOAD (CSUM, TSO4/6) the kernel may hand us TCP super-packets, which are
 * cut into ordinary packets (below), and partial checksums, which are completed; a packet
 * without offload flags is passed on as it is. */
#ifndef DSVPN_TUN_VNET_H
#define DSVPN_TUN_VNET_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define DSVPN_VNET_HDR_LEN 10
#define DSVPN_GRO_MAX_SEGS 64 /* 64 x 1448 bytes > 65535 anyway */
#define DSVPN_GRO_MAX_LEN 65535

/* struct virtio_net_hdr (legacy layout, native byte order on a legacy tun) */
struct dsvpn_vnet_hdr {
    uint8_t  flags;       /* 1 = VIRTIO_NET_HDR_F_NEEDS_CSUM */
    uint8_t  gso_type;    /* 0 none, 1 TCPV4, 4 TCPV6 */
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};

struct dsvpn_gro {
    struct dsvpn_vnet_hdr hdr;
    struct iovec          iov[DSVPN_GRO_MAX_SEGS + 1];
    int                   segs;     /* 0: no group pending */
    uint8_t              *first;    /* first packet: headers are patched in place on flush */
    size_t                iphl, hl; /* IP header length, IP + TCP header length */
    size_t                total;    /* length of the super-packet */
    size_t                gso_size;
    uint32_t              next_seq;
    int                   v6, psh, closed;
    int                   udp;    /* the pending group is UDP (else TCP) */
    int                   no_uso; /* the kernel refused a UDP GSO write: merge TCP only */
    int                   test_refuse_uso; /* test hook: UDP GSO writes fail as without USO */
    uint64_t              writes, errors, merged; /* tun writes, failed ones, segments merged */
};

static inline uint64_t dsvpn_csum_add(uint64_t sum, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        sum += (w & 0xffffffffu) + (w >> 32); /* native-order words; folded the same way */
        p += 8;
        n -= 8;
    }
    while (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        sum += w;
        p += 2;
        n -= 2;
    }
    if (n) {
        uint16_t w = 0;
        memcpy(&w, p, 1);
        sum += w;
    }
    return sum;
}

/* Fold to 16 bits, result in native order of the summed 16-bit words. */
static inline uint16_t dsvpn_csum_fold(uint64_t sum)
{
    while (sum >> 16) {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    return (uint16_t) sum;
}

static inline uint16_t dsvpn_be16(const uint8_t *p)
{
    return (uint16_t) ((p[0] << 8) | p[1]);
}

static inline void dsvpn_put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t) (v >> 8);
    p[1] = (uint8_t) v;
}

static inline uint32_t dsvpn_be32(const uint8_t *p)
{
    return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) | ((uint32_t) p[2] << 8) | p[3];
}

#define DSVPN_GSO_TCPV4 1
#define DSVPN_GSO_TCPV6 4
#define DSVPN_GSO_UDP_L4 5

/* Pseudo-header sum (not folded) for TCP or UDP (proto) over the given L4 length. */
static inline uint64_t dsvpn_pseudo(const uint8_t *pkt, int v6, size_t l4len, uint8_t proto)
{
    uint8_t  tail[4] = { 0, 0, 0, 0 }; /* zero, protocol / length, as 16-bit words */
    uint8_t  len4[4];
    uint64_t s;
    if (v6) {
        s = dsvpn_csum_add(0, pkt + 8, 32);
        len4[0] = (uint8_t) (l4len >> 24);
        len4[1] = (uint8_t) (l4len >> 16);
        len4[2] = (uint8_t) (l4len >> 8);
        len4[3] = (uint8_t) l4len;
        s = dsvpn_csum_add(s, len4, 4);
        tail[3] = proto;
        return dsvpn_csum_add(s, tail, 4);
    }
    s = dsvpn_csum_add(0, pkt + 12, 8);
    tail[1] = proto;
    tail[2] = (uint8_t) (l4len >> 8);
    tail[3] = (uint8_t) l4len;
    return dsvpn_csum_add(s, tail, 4);
}

/* The IP header of a packet that may be merged: IPv4 with IHL 5, DF set, not a fragment, or
 * IPv6 without extension headers; protocol proto and length exact. Its length, or 0. */
static inline size_t dsvpn_gro_ip(const uint8_t *pkt, size_t len, uint8_t proto, int *v6)
{
    if ((pkt[0] >> 4) == 4) {
        if (pkt[0] != 0x45 || pkt[9] != proto || (dsvpn_be16(pkt + 6) & 0x7fff) != 0x4000
            || dsvpn_be16(pkt + 2) != len
            || dsvpn_csum_fold(dsvpn_csum_add(0, pkt, 20)) != 0xffff) {
            return 0;
        }
        *v6 = 0;
        return 20;
    }
    if ((pkt[0] >> 4) == 6 && len >= 40 && pkt[6] == proto
        && (size_t) dsvpn_be16(pkt + 4) + 40 == len) {
        *v6 = 1;
        return 40;
    }
    return 0;
}

static inline int dsvpn_l4_csum_ok(const uint8_t *pkt, int v6, size_t ipl, size_t len,
                                   uint8_t proto)
{
    return dsvpn_csum_fold(
               dsvpn_csum_add(dsvpn_pseudo(pkt, v6, len - ipl, proto), pkt + ipl, len - ipl))
           == 0xffff;
}

/* If pkt is a TCP segment or UDP datagram that may be merged, fill *iphl, *hl (IP + L4
 * header), *udp and return 1. */
static inline int dsvpn_gro_candidate(const uint8_t *pkt, size_t len, int no_uso, size_t *iphl,
                                      size_t *hl, int *udp)
{
    size_t ipl, thl;
    int    v6;
    if (len < 28) {
        return 0;
    }
    if ((ipl = dsvpn_gro_ip(pkt, len, 6, &v6)) != 0) {
        if (len < ipl + 20) {
            return 0;
        }
        thl = (size_t) (pkt[ipl + 12] >> 4) * 4;
        if (thl < 20 || ipl + thl >= len) {
            return 0; /* no payload: pure ACKs go as they are */
        }
        /* only ACK, optionally PSH; no urgent pointer */
        if ((pkt[ipl + 13] & ~0x08) != 0x10 || pkt[ipl + 18] || pkt[ipl + 19]) {
            return 0;
        }
        *udp = 0;
    } else if (!no_uso && (ipl = dsvpn_gro_ip(pkt, len, 17, &v6)) != 0) {
        thl = 8;
        /* some payload, the UDP length exact, a checksum (0: none, IPv4 only) */
        if (len <= ipl + thl || dsvpn_be16(pkt + ipl + 4) != len - ipl
            || dsvpn_be16(pkt + ipl + 6) == 0) {
            return 0;
        }
        *udp = 1;
    } else {
        return 0;
    }
    if (!dsvpn_l4_csum_ok(pkt, v6, ipl, len, *udp ? 17 : 6)) {
        return 0;
    }
    *iphl = ipl;
    *hl = ipl + thl;
    return 1;
}

static inline ssize_t dsvpn_tun_writev(int fd, struct dsvpn_gro *g, struct iovec *iov, int n)
{
    ssize_t r;
    do {
        r = writev(fd, iov, n);
    } while (r < 0 && errno == EINTR);
    g->writes++;
    if (r < 0) {
        g->errors++;
    }
    return r;
}

/* Write one packet unchanged, with an empty header. */
static inline void dsvpn_vnet_write1(int fd, struct dsvpn_gro *g, uint8_t *pkt, size_t len)
{
    static const uint8_t zero[DSVPN_VNET_HDR_LEN] = { 0 };
    struct iovec         iov[2];
    iov[0].iov_base = (void *) zero;
    iov[0].iov_len = DSVPN_VNET_HDR_LEN;
    iov[1].iov_base = pkt;
    iov[1].iov_len = len;
    dsvpn_tun_writev(fd, g, iov, 2);
}

/* The kernel refused a UDP GSO write (no USO): put the first datagram's header back (saved in
 * hdr, hl bytes) and write the datagrams one by one; each one's header sits in front of its
 * payload, where it arrived. */
static inline void dsvpn_gro_unmerge(int fd, struct dsvpn_gro *g, const uint8_t *hdr)
{
    int i;
    g->errors--; /* not lost: written again below */
    g->no_uso = 1;
    memcpy(g->first, hdr, g->hl);
    dsvpn_vnet_write1(fd, g, g->first, g->iov[1].iov_len);
    for (i = 2; i <= g->segs; i++) {
        uint8_t *pkt = (uint8_t *) g->iov[i].iov_base - g->hl;
        dsvpn_vnet_write1(fd, g, pkt, g->hl + g->iov[i].iov_len);
    }
}

static inline void dsvpn_gro_flush(int fd, struct dsvpn_gro *g)
{
    uint8_t *p = g->first;
    size_t   iphl = g->iphl;
    uint16_t c;
    uint8_t  saved[48]; /* the first datagram's IP + UDP header, for dsvpn_gro_unmerge */
    if (g->segs == 0) {
        return;
    }
    if (g->segs == 1) {
        dsvpn_vnet_write1(fd, g, p, g->iov[1].iov_len);
        g->segs = 0;
        return;
    }
    if (g->udp) {
        memcpy(saved, p, g->hl);
    }
    if (g->v6) {
        dsvpn_put_be16(p + 4, (uint16_t) (g->total - 40));
    } else {
        dsvpn_put_be16(p + 2, (uint16_t) g->total);
        p[10] = p[11] = 0;
        c = (uint16_t) ~dsvpn_csum_fold(dsvpn_csum_add(0, p, 20));
        memcpy(p + 10, &c, 2); /* native-order sum stored as is = network order result */
    }
    if (g->udp) {
        /* the UDP length covers all datagrams, as the pseudo-header's does: the kernel
         * adjusts both for each datagram it cuts */
        dsvpn_put_be16(p + iphl + 4, (uint16_t) (g->total - iphl));
    } else if (g->psh) {
        p[iphl + 13] |= 0x08;
    }
    /* CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum */
    c = dsvpn_csum_fold(dsvpn_pseudo(p, g->v6, g->total - iphl, g->udp ? 17 : 6));
    memcpy(p + iphl + (g->udp ? 6 : 16), &c, 2);
    g->hdr.flags = 1;
    g->hdr.gso_type = g->udp ? DSVPN_GSO_UDP_L4 : g->v6 ? DSVPN_GSO_TCPV6 : DSVPN_GSO_TCPV4;
    g->hdr.hdr_len = (uint16_t) g->hl;
    g->hdr.gso_size = (uint16_t) g->gso_size;
    g->hdr.csum_start = (uint16_t) iphl;
    g->hdr.csum_offset = g->udp ? 6 : 16;
    g->iov[0].iov_base = &g->hdr;
    g->iov[0].iov_len = DSVPN_VNET_HDR_LEN;
    if (g->udp && g->test_refuse_uso) {
        g->writes++;
        g->errors++;
        dsvpn_gro_unmerge(fd, g, saved);
    } else if (dsvpn_tun_writev(fd, g, g->iov, g->segs + 1) < 0 && g->udp && errno == EINVAL) {
        dsvpn_gro_unmerge(fd, g, saved);
    } else {
        g->merged += (uint64_t) g->segs;
    }
    g->segs = 0;
}

/* Same flow and mergeable into the pending group? */
static inline int dsvpn_gro_fits(const struct dsvpn_gro *g, const uint8_t *p, size_t len,
                                 size_t iphl, size_t hl)
{
    const uint8_t *f = g->first;
    size_t         pay = len - hl;
    if (g->closed || iphl != g->iphl || hl != g->hl || pay > g->gso_size
        || g->segs >= DSVPN_GRO_MAX_SEGS || g->total + pay > DSVPN_GRO_MAX_LEN) {
        return 0;
    }
    if (g->v6) {
        if (memcmp(f, p, 4) || memcmp(f + 6, p + 6, 34)) {
            return 0; /* version/class/label, next header/hop limit, addresses */
        }
    } else if (memcmp(f, p, 2) || memcmp(f + 6, p + 6, 4) || memcmp(f + 12, p + 12, 8)) {
        return 0; /* version/IHL/TOS, flags/TTL/protocol, addresses */
    }
    if (g->udp) {
        return memcmp(f + iphl, p + iphl, 4) == 0; /* ports; the protocol matched above */
    }
    if (dsvpn_be32(p + iphl + 4) != g->next_seq) {
        return 0;
    }
    /* ports; ACK number; data offset; flags other than PSH; window; options */
    return memcmp(f + iphl, p + iphl, 4) == 0 && memcmp(f + iphl + 8, p + iphl + 8, 5) == 0
           && ((f[iphl + 13] ^ p[iphl + 13]) & ~0x08) == 0
           && memcmp(f + iphl + 14, p + iphl + 14, 2) == 0
           && memcmp(f + iphl + 20, p + iphl + 20, hl - iphl - 20) == 0;
}

/* Hand one decrypted packet to the tun. pkt must stay valid until dsvpn_gro_flush(). */
static inline void dsvpn_gro_add(int fd, struct dsvpn_gro *g, uint8_t *pkt, size_t len)
{
    size_t iphl, hl, pay;
    int    udp;
    if (!dsvpn_gro_candidate(pkt, len, g->no_uso, &iphl, &hl, &udp)) {
        dsvpn_gro_flush(fd, g);
        dsvpn_vnet_write1(fd, g, pkt, len);
        return;
    }
    pay = len - hl;
    if (g->segs > 0 && udp == g->udp && dsvpn_gro_fits(g, pkt, len, iphl, hl)) {
        g->iov[g->segs + 1].iov_base = pkt + hl;
        g->iov[g->segs + 1].iov_len = pay;
        g->segs++;
    } else {
        dsvpn_gro_flush(fd, g);
        g->first = pkt;
        g->iphl = iphl;
        g->hl = hl;
        g->total = hl;
        g->gso_size = pay;
        g->v6 = (pkt[0] >> 4) == 6;
        g->udp = udp;
        g->psh = 0;
        g->closed = 0;
        g->iov[1].iov_base = pkt;
        g->iov[1].iov_len = len;
        g->segs = 1;
    }
    g->total += pay;
    if (!udp) {
        g->next_seq = dsvpn_be32(pkt + iphl + 4) + (uint32_t) pay;
        if (pkt[iphl + 13] & 0x08) {
            g->psh = 1;
            g->closed = 1;
        }
    }
    if (pay < g->gso_size) {
        g->closed = 1;
    }
    if (g->closed) {
        /* nothing can join it: write it now rather than after the rest of the recv() is
         * decrypted (a lone request or a flow's last segment is not held back) */
        dsvpn_gro_flush(fd, g);
    }
}

/* Complete a partial checksum the kernel left to us (VIRTIO_NET_HDR_F_NEEDS_CSUM): the field
 * at csum_start + csum_offset holds the pseudo-header sum. Returns -1 if out of range. */
static inline int dsvpn_vnet_finish_csum(const struct dsvpn_vnet_hdr *h, uint8_t *pkt, size_t len)
{
    size_t   start = h->csum_start, at = (size_t) h->csum_start + h->csum_offset;
    uint16_t c;
    if (start >= len || at + 2 > len) {
        return -1;
    }
    c = (uint16_t) ~dsvpn_csum_fold(dsvpn_csum_add(0, pkt + start, len - start));
    memcpy(pkt + at, &c, 2);
    return 0;
}

/* TSO and USO on the read side (TUNSETOFFLOAD TSO4/TSO6, USO4/USO6): the local stack hands the
 * tun up to 64 KB TCP super-packets, walking its own path once per 64 KB instead of once per
 * segment, and UDP super-packets from sockets that send with UDP_SEGMENT (QUIC stacks). Each
 * one is cut here into the ordinary packets the kernel would have produced (as
 * tcp_gso_segment and __udp_gso_segment do), so every frame on the wire still carries one IP
 * packet <= MTU. The header's gso_size is what goes in each segment after the TCP or UDP
 * header, so segments never exceed the tun MTU. */

/* The IP header length, TCP/UDP header length and protocol of a GSO packet we can split. */
static inline int dsvpn_gso_headers(const struct dsvpn_vnet_hdr *h, const uint8_t *pkt, size_t len,
                                    size_t *iphl, size_t *hl, int *udp)
{
    int t = h->gso_type & 0x7f, v6;
    if (h->gso_size == 0 || len < 20) {
        return 0;
    }
    v6 = (pkt[0] >> 4) == 6;
    if ((pkt[0] >> 4) == 4) {
        *iphl = (size_t) (pkt[0] & 15) * 4;
        if (*iphl < 20) {
            return 0;
        }
    } else if (v6 && len >= 40) {
        *iphl = 40;
    } else {
        return 0;
    }
    if (((t == DSVPN_GSO_TCPV4 && !v6) || (t == DSVPN_GSO_TCPV6 && v6))
        && pkt[v6 ? 6 : 9] == 6) {
        if (*iphl + 20 > len) {
            return 0;
        }
        *hl = *iphl + (size_t) (pkt[*iphl + 12] >> 4) * 4;
        if (*hl < *iphl + 20) {
            return 0;
        }
        *udp = 0;
    } else if (t == DSVPN_GSO_UDP_L4 && pkt[v6 ? 6 : 9] == 17) {
        *hl = *iphl + 8;
        *udp = 1;
    } else {
        return 0;
    }
    return *hl < len;
}

/* Number of segments of the GSO packet pkt[0..len) and the room they take as frames with
 * frame_hdr bytes before each; 0 if it is not a TCP or UDP GSO packet we can split. */
static inline size_t dsvpn_gso_count(const struct dsvpn_vnet_hdr *h, const uint8_t *pkt, size_t len,
                                     size_t frame_hdr, size_t *room)
{
    size_t iphl, hl, pay, n, gso = h->gso_size;
    int    udp;
    if (!dsvpn_gso_headers(h, pkt, len, &iphl, &hl, &udp)) {
        return 0;
    }
    pay = len - hl;
    n = (pay + gso - 1) / gso;
    *room = n * (frame_hdr + hl) + pay;
    return n;
}

/* Write segment i of the GSO packet src[0..len) (dsvpn_gso_count said nseg) at out; returns
 * its length. */
static inline size_t dsvpn_gso_segment(const struct dsvpn_vnet_hdr *h, const uint8_t *src,
                                       size_t len, size_t i, size_t nseg, uint8_t *out)
{
    size_t   gso = h->gso_size, iphl = 0, hl = 0;
    int      udp = 0, v6 = (src[0] >> 4) == 6;
    size_t   off, chunk;
    uint8_t *th;
    uint16_t c;
    (void) dsvpn_gso_headers(h, src, len, &iphl, &hl, &udp);
    off = hl + i * gso;
    chunk = len - off < gso ? len - off : gso;
    th = out + iphl;
    memcpy(out, src, hl);
    memcpy(out + hl, src + off, chunk);
    if (v6) {
        dsvpn_put_be16(out + 4, (uint16_t) (hl - 40 + chunk));
    } else {
        dsvpn_put_be16(out + 2, (uint16_t) (hl + chunk));
        dsvpn_put_be16(out + 4, (uint16_t) (dsvpn_be16(src + 4) + i));
        out[10] = out[11] = 0;
        c = (uint16_t) ~dsvpn_csum_fold(dsvpn_csum_add(0, out, iphl));
        memcpy(out + 10, &c, 2);
    }
    if (udp) {
        dsvpn_put_be16(th + 4, (uint16_t) (8 + chunk));
        th[6] = th[7] = 0;
        c = (uint16_t) ~dsvpn_csum_fold(
            dsvpn_csum_add(dsvpn_pseudo(out, v6, 8 + chunk, 17), th, 8 + chunk));
        if (c == 0) {
            c = 0xffff; /* a computed zero is sent as all ones: zero means "no checksum" */
        }
        memcpy(th + 6, &c, 2);
        return hl + chunk;
    }
    {
        uint32_t seq = dsvpn_be32(src + iphl + 4) + (uint32_t) (i * gso);
        th[4] = (uint8_t) (seq >> 24);
        th[5] = (uint8_t) (seq >> 16);
        th[6] = (uint8_t) (seq >> 8);
        th[7] = (uint8_t) seq;
    }
    if (i + 1 < nseg) {
        th[13] &= (uint8_t) ~0x09; /* FIN and PSH only on the last segment */
    }
    if (i > 0) {
        th[13] &= (uint8_t) ~0x80; /* CWR only on the first */
    }
    th[16] = th[17] = 0;
    c = (uint16_t) ~dsvpn_csum_fold(
        dsvpn_csum_add(dsvpn_pseudo(out, v6, hl - iphl + chunk, 6), th, hl - iphl + chunk));
    memcpy(th + 16, &c, 2);
    return hl + chunk;
}

#endif
