# Sizes of the wire protocol (docs/protocol.md, Handshake, Framing, Timeouts and limits), for the
# Cython modules. The timeouts, which Python needs too, are in _loop.pxd.

cdef enum:
    WIRE_TAG_LEN = 6            # the tag bytes a frame carries (of Charm's 16)
    FRAME_HDR_LEN = 8           # LEN (2, little-endian) || TAG
    MAX_PAYLOAD = 65535         # LEN is a uint16
    PKT1_LEN = 72               # client random (32) || timestamp (8) || H1 (32)
    PKT2_LEN = 64               # server random (32) || H2 (32)
    HS_RANDOM_LEN = 32
    HS_TIMESTAMP_LEN = 8
    # docs/protocol.md, Extensions, Forward-secret handshake
    PFS_HELLO_LEN = 104         # client random (32) || timestamp (8) || E_c (32) || H1 (32)
    PFS_REPLY_LEN = 96          # server random (32) || E_s (32) || H2 (32)
    X25519_LEN = 32             # an X25519 public key
    TS_TOLERANCE_S = 7200       # the largest clock difference the server accepts
    NOTSENT_LOWAT = 131072      # TCP_NOTSENT_LOWAT of every session socket
