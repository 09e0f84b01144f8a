/* Linux multi-queue tun: which queue (worker) the kernel hands each packet to.
 *
 * A server of several clients runs one worker per core, each with its own tun queue and the
 * sessions of its own peers (dsvpn.workers). The kernel must therefore put a packet for a peer
 * on the queue of the worker that owns that peer: peer host part modulo the number of workers
 * (the host part of its IPv4 address in the pool, which its 64:ff9b:: twin carries in its last
 * four bytes too). Without a steering program the kernel would pick queues by flow hash and
 * most packets would reach a worker without the session.
 *
 * The program is a socket filter (TUNSETSTEERINGEBPF, Linux 4.16+) of thirteen instructions,
 * written out here so that nothing else (clang, libbpf, headers of the build machine) is
 * needed. Its return value, modulo the number of queues, is the queue. */
#ifndef DSVPN_TUN_STEER_H
#define DSVPN_TUN_STEER_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/ioctl.h>
#include <sys/syscall.h>
/* Build machines with kernel headers older than 3.18 (manylinux2014) lack the number. */
#if !defined(__NR_bpf) && defined(__x86_64__)
#define __NR_bpf 321
#elif !defined(__NR_bpf) && defined(__aarch64__)
#define __NR_bpf 280
#endif
#endif

struct dsvpn_bpf_insn {
    uint8_t code;
    uint8_t regs; /* src << 4 | dst */
    int16_t off;
    int32_t imm;
};

/* The queue of the worker that owns pool address net + host: what the program computes. */
static inline uint32_t dsvpn_steer_queue(uint32_t dst, uint32_t net, uint32_t queues)
{
    return queues ? (uint32_t) (dst - net) % queues : 0;
}

/* The program for a pool starting at net (host order) and `queues` workers; 13 instructions. */
static inline int dsvpn_steer_program(struct dsvpn_bpf_insn *p, uint32_t net, uint32_t queues)
{
    const struct dsvpn_bpf_insn prog[] = {
        { 0xbf, 0x16, 0, 0 },                    /* r6 = r1 (the skb, for the loads)     */
        { 0x30, 0, 0, 0 },                       /* r0 = byte 0 (version, IHL)           */
        { 0x77, 0, 0, 4 },                       /* r0 >>= 4                             */
        { 0x15, 0, 3, 4 },                       /* if r0 == 4 goto IPv4                 */
        { 0x15, 0, 4, 6 },                       /* if r0 == 6 goto IPv6                 */
        { 0xb7, 0, 0, 0 },                       /* r0 = 0: not IP, queue 0              */
        { 0x95, 0, 0, 0 },                       /* return                               */
        { 0x20, 0, 0, 16 },                      /* IPv4: r0 = destination (host order)  */
        { 0x05, 0, 1, 0 },                       /* goto host                            */
        { 0x20, 0, 0, 36 },                      /* IPv6: r0 = destination's last word   */
        { 0x14, 0, 0, (int32_t) net },           /* host: w0 -= net                      */
        { 0x94, 0, 0, (int32_t) (queues ? queues : 1) }, /* w0 %= queues                */
        { 0x95, 0, 0, 0 },                       /* return                               */
    };
    memcpy(p, prog, sizeof prog);
    return (int) (sizeof prog / sizeof prog[0]);
}

#define DSVPN_TUNSETSTEERINGEBPF 0x800454e0UL /* _IOR('T', 224, int) */

/* Load the program and attach it to the multi-queue tun that fd is a queue of. 0, or an
 * errno (ENOSYS where the system has no eBPF). */
static inline int dsvpn_tun_steer(int fd, uint32_t net, uint32_t queues)
{
#if defined(__linux__) && defined(__NR_bpf)
    struct dsvpn_bpf_insn insns[16];
    static const char license[] = "MIT"; /* no GPL-only helper is called */
    uint64_t attr[16]; /* union bpf_attr, BPF_PROG_LOAD: the fields below, the rest zero */
    int prog_fd, err = 0;
    uint32_t *w = (uint32_t *) attr;

    memset(attr, 0, sizeof attr);
    w[0] = 1; /* BPF_PROG_TYPE_SOCKET_FILTER */
    w[1] = (uint32_t) dsvpn_steer_program(insns, net, queues);
    attr[1] = (uint64_t) (uintptr_t) insns;
    attr[2] = (uint64_t) (uintptr_t) license;
    prog_fd = (int) syscall(__NR_bpf, 5 /* BPF_PROG_LOAD */, attr, sizeof attr);
    if (prog_fd < 0) {
        return errno;
    }
    if (ioctl(fd, DSVPN_TUNSETSTEERINGEBPF, &prog_fd) != 0) {
        err = errno;
    }
    close(prog_fd); /* the tun holds its own reference */
    return err;
#else
    (void) fd;
    (void) net;
    (void) queues;
    return ENOSYS;
#endif
}

#endif
