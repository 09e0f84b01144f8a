/* Flow queuing of the packets read from the tun device, waiting to be framed and sent.
 *
 * Why: the tun device has no backpressure of its own (its kernel queue tail-drops, and a qdisc
 * in front of it never holds anything), so whatever a saturating flow keeps in flight waits in
 * the one FIFO between the tun and the socket, and every other packet (a ping, a DNS query, a
 * call, the ACKs of the other direction) waits behind it. Here the loop drains the tun as soon
 * as it can into per-flow queues and takes packets out in deficit round robin, new (sparse)
 * flows first, as fq_codel's scheduler does: a bulk flow's backlog stays its own, and a flow
 * that sends less than a quantum at a time skips it.
 *
 * Storage: a ring of bytes. A tun read lands whole at its tail (one contiguous read, and a TSO
 * packet is cut straight from there); space comes back at its head once the oldest packets
 * have been taken out, in whatever order the flows gave them up (round robin never leaves a
 * packet behind for long). One descriptor per packet. The queue drops nothing itself: once it
 * holds its limit (or has no room for one more read), the loop stops reading the tun, and the
 * kernel's own backpressure takes over (a local sender blocks on its socket buffer, forwarded
 * traffic is dropped by the tun queue), which costs no work for packets that could not be sent
 * anyway.
 *
 * All functions are static inline, allocate only in dsvpn_fq_init and never touch Python. */
#ifndef DSVPN_FLOWQ_H
#define DSVPN_FLOWQ_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DSVPN_FQ_FLOWS 1024 /* a power of two */
#define DSVPN_FQ_QUANTUM 1514
#define DSVPN_FQ_HDR_MAX 12 /* the tun's own header kept with each packet (vnet 10, AF 4) */
#define DSVPN_FQ_ALIGN 16

struct dsvpn_fq_pkt {
    int32_t  next;  /* next packet of the same flow, or of the free list; -1 */
    int32_t  after; /* the packet stored after this one (ring order); -1 */
    size_t   off;   /* where its bytes start in the ring */
    uint32_t len;
    uint32_t flow;
    uint8_t  done; /* taken out, its space not yet given back (an older one is still queued) */
    uint8_t  hdr[DSVPN_FQ_HDR_MAX];
};

struct dsvpn_fq_flow {
    int32_t  head, tail; /* packets, -1 when empty */
    int32_t  next;       /* next flow in its list */
    int32_t  deficit;
    uint32_t bytes;
    uint8_t  list; /* 0: in no list, 1: new flows, 2: old flows */
};

struct dsvpn_fq {
    uint8_t             *ring;
    size_t               cap, tail; /* tail: where the newest packet ends */
    struct dsvpn_fq_pkt *pkts;
    int32_t              npkts, free_pkt;
    int32_t              oldest, newest; /* packets in ring order */
    size_t               bytes, limit;   /* queued packet bytes, and where reads stop */
    uint32_t             packets, seed;
    int32_t              new_head, new_tail, old_head, old_tail;
    struct dsvpn_fq_flow flows[DSVPN_FQ_FLOWS];
};

static inline void dsvpn_fq_reset(struct dsvpn_fq *q)
{
    int32_t i;
    for (i = 0; i < q->npkts; i++) {
        q->pkts[i].next = i + 1 < q->npkts ? i + 1 : -1;
    }
    q->free_pkt = q->npkts > 0 ? 0 : -1;
    q->tail = 0;
    q->oldest = q->newest = -1;
    q->bytes = 0;
    q->packets = 0;
    q->new_head = q->new_tail = q->old_head = q->old_tail = -1;
    for (i = 0; i < DSVPN_FQ_FLOWS; i++) {
        q->flows[i].head = q->flows[i].tail = q->flows[i].next = -1;
        q->flows[i].deficit = 0;
        q->flows[i].bytes = 0;
        q->flows[i].list = 0;
    }
}

/* A ring of cap bytes and npkts descriptors; reads stop at limit queued bytes (dsvpn_fq_room).
 * 0, or -1 if out of memory. */
static inline int dsvpn_fq_init(struct dsvpn_fq *q, size_t cap, int32_t npkts, size_t limit,
                                uint32_t seed)
{
    memset(q, 0, sizeof *q);
    q->ring = (uint8_t *) malloc(cap);
    q->pkts = (struct dsvpn_fq_pkt *) malloc((size_t) npkts * sizeof(struct dsvpn_fq_pkt));
    if (q->ring == NULL || q->pkts == NULL) {
        free(q->ring);
        free(q->pkts);
        memset(q, 0, sizeof *q);
        return -1;
    }
    q->cap = cap;
    q->npkts = npkts;
    q->limit = limit;
    q->seed = seed;
    dsvpn_fq_reset(q);
    return 0;
}

static inline void dsvpn_fq_destroy(struct dsvpn_fq *q)
{
    free(q->ring);
    free(q->pkts);
    memset(q, 0, sizeof *q);
}

static inline uint32_t dsvpn_fq_mix(uint32_t h, uint32_t v)
{
    h ^= v * 0xcc9e2d51u;
    h = (h << 13) | (h >> 19);
    return h * 5 + 0xe6546b64u;
}

static inline uint32_t dsvpn_fq_word(const uint8_t *p)
{
    uint32_t w;
    memcpy(&w, p, 4);
    return w;
}

/* The flow of an IP packet: addresses, protocol and, for TCP and UDP (unfragmented), the
 * ports. Anything else shares flow 0's hash input. */
static inline uint32_t dsvpn_fq_flow_of(const struct dsvpn_fq *q, const uint8_t *p, size_t len)
{
    uint32_t h = q->seed;
    size_t   l4 = 0, i;
    uint8_t  proto = 0;
    if (len >= 20 && (p[0] >> 4) == 4) {
        proto = p[9];
        h = dsvpn_fq_mix(h, dsvpn_fq_word(p + 12));
        h = dsvpn_fq_mix(h, dsvpn_fq_word(p + 16));
        if (((p[6] & 0x3f) | p[7]) == 0) { /* first (or only) fragment without MF */
            l4 = (size_t) (p[0] & 15) * 4;
        }
    } else if (len >= 40 && (p[0] >> 4) == 6) {
        proto = p[6];
        for (i = 8; i < 40; i += 4) {
            h = dsvpn_fq_mix(h, dsvpn_fq_word(p + i));
        }
        l4 = 40;
    }
    h = dsvpn_fq_mix(h, proto);
    if ((proto == 6 || proto == 17) && l4 >= 20 && l4 + 4 <= len) {
        h = dsvpn_fq_mix(h, dsvpn_fq_word(p + l4));
    }
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    return h & (DSVPN_FQ_FLOWS - 1);
}

/* Where a read of up to maxlen bytes can land, contiguous: its offset in the ring, or -1 if
 * there is no room (or the queue holds its limit, or has no descriptor left). The ring is in
 * use from its oldest packet to its tail, possibly wrapping (the end it skipped stays unused
 * until the oldest packet wraps too). */
static inline ptrdiff_t dsvpn_fq_slot(const struct dsvpn_fq *q, size_t maxlen)
{
    size_t head, need = maxlen + DSVPN_FQ_ALIGN; /* a packet's bytes, rounded up */
    if (q->bytes >= q->limit || q->free_pkt < 0 || need > q->cap) {
        return -1;
    }
    if (q->oldest < 0) {
        return 0; /* empty: start over at the beginning */
    }
    head = q->pkts[q->oldest].off;
    if (q->tail > head) {
        /* back to the beginning as soon as there is room there: the ring's low end stays in
         * use (and in cache), however long the queue never empties */
        if (head >= need) {
            return 0;
        }
        return q->cap - q->tail >= need ? (ptrdiff_t) q->tail : -1;
    }
    return head - q->tail >= need ? (ptrdiff_t) q->tail : -1;
}

static inline int dsvpn_fq_room(const struct dsvpn_fq *q, size_t maxlen)
{
    return dsvpn_fq_slot(q, maxlen) >= 0;
}

static inline void dsvpn_fq_link(struct dsvpn_fq *q, int32_t f, int list)
{
    int32_t *head = list == 1 ? &q->new_head : &q->old_head;
    int32_t *tail = list == 1 ? &q->new_tail : &q->old_tail;
    q->flows[f].next = -1;
    q->flows[f].list = (uint8_t) list;
    if (*tail >= 0) {
        q->flows[*tail].next = f;
    } else {
        *head = f;
    }
    *tail = f;
}

/* Unlink the head flow of a list. */
static inline void dsvpn_fq_unlink_head(struct dsvpn_fq *q, int list)
{
    int32_t *head = list == 1 ? &q->new_head : &q->old_head;
    int32_t *tail = list == 1 ? &q->new_tail : &q->old_tail;
    int32_t  f = *head;
    *head = q->flows[f].next;
    if (*head < 0) {
        *tail = -1;
    }
    q->flows[f].next = -1;
    q->flows[f].list = 0;
}

/* A read of len bytes landed at offset off (dsvpn_fq_slot): queue it as a packet, with
 * hdr[0..hdr_len) kept beside it. */
static inline void dsvpn_fq_commit(struct dsvpn_fq *q, size_t off, size_t len, const uint8_t *hdr,
                                   size_t hdr_len)
{
    int32_t               pi = q->free_pkt, f;
    struct dsvpn_fq_pkt  *p = &q->pkts[pi];
    struct dsvpn_fq_flow *fl;
    q->free_pkt = p->next;
    p->off = off;
    p->len = (uint32_t) len;
    p->next = -1;
    p->after = -1;
    p->done = 0;
    if (hdr_len > 0) {
        memcpy(p->hdr, hdr, hdr_len);
    }
    /* every packet takes at least DSVPN_FQ_ALIGN bytes: the tail always moves */
    q->tail = off + ((len + DSVPN_FQ_ALIGN) & ~(size_t) (DSVPN_FQ_ALIGN - 1));
    if (q->newest >= 0) {
        q->pkts[q->newest].after = pi;
    } else {
        q->oldest = pi;
    }
    q->newest = pi;
    f = (int32_t) dsvpn_fq_flow_of(q, q->ring + off, len);
    p->flow = (uint32_t) f;
    fl = &q->flows[f];
    if (fl->tail >= 0) {
        q->pkts[fl->tail].next = pi;
    } else {
        fl->head = pi;
    }
    fl->tail = pi;
    fl->bytes += (uint32_t) len;
    q->bytes += len;
    q->packets++;
    if (fl->list == 0) {
        fl->deficit = DSVPN_FQ_QUANTUM;
        dsvpn_fq_link(q, f, 1);
    }
}

/* The next packet to send, or -1 if none; its bytes stay valid until dsvpn_fq_release. */
static inline int32_t dsvpn_fq_dequeue(struct dsvpn_fq *q)
{
    for (;;) {
        int                   list = q->new_head >= 0 ? 1 : 2;
        int32_t               f = list == 1 ? q->new_head : q->old_head;
        struct dsvpn_fq_flow *fl;
        int32_t               pi;
        if (f < 0) {
            return -1;
        }
        fl = &q->flows[f];
        if (fl->deficit <= 0) {
            fl->deficit += DSVPN_FQ_QUANTUM;
            dsvpn_fq_unlink_head(q, list);
            dsvpn_fq_link(q, f, 2);
            continue;
        }
        if (fl->head < 0) {
            dsvpn_fq_unlink_head(q, list);
            /* An emptied new flow goes behind the old ones once, so that a flow cannot stay
             * "new" for ever by emptying just in time. */
            if (list == 1 && q->old_head >= 0) {
                dsvpn_fq_link(q, f, 2);
            }
            continue;
        }
        pi = fl->head;
        fl->head = q->pkts[pi].next;
        if (fl->head < 0) {
            fl->tail = -1;
        }
        fl->bytes -= q->pkts[pi].len;
        fl->deficit -= (int32_t) q->pkts[pi].len;
        q->bytes -= q->pkts[pi].len;
        q->packets--;
        return pi;
    }
}

/* A dequeued packet is done with: its space comes back once every older one's has. */
static inline void dsvpn_fq_release(struct dsvpn_fq *q, int32_t pi)
{
    q->pkts[pi].done = 1;
    while (q->oldest >= 0 && q->pkts[q->oldest].done) {
        int32_t oi = q->oldest;
        q->oldest = q->pkts[oi].after;
        q->pkts[oi].next = q->free_pkt;
        q->free_pkt = oi;
    }
    if (q->oldest < 0) {
        q->newest = -1;
        q->tail = 0;
    }
}

#endif
