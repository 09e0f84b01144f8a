/* The texts both event loops share: the handshake IVs (docs/protocol.md, Handshake and
 * Extensions) and the log lines of a server's handshakes (%s: the client's IP, then a detail). */
#ifndef DSVPN_LOOP_TEXT_H
#define DSVPN_LOOP_TEXT_H

#define DSVPN_KX_IV "VPN Key Exchange"
#define DSVPN_PFS_IV "DSVPN PFS X25519" /* dsvpn.pfs.PFS_IV */

#define DSVPN_HS_FAILED_FMT "handshake failed from %s: %s"
#define DSVPN_BAD_HELLO_FMT "authentication failed from %s: wrong key or garbage%s"
#define DSVPN_TOO_MANY_FMT "handshake from %s dropped: too many pending handshakes%s"
#define DSVPN_NO_RANDOM "the system's random source failed"
#define DSVPN_PROB_TIMEOUT_MSG "no frame authenticated within the handshake timeout"

#endif
