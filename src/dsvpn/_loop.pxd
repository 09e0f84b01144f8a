# The names the event loop shares with Python, each declared once, here: Python sees every
# cpdef enum as an IntEnum of dsvpn._loop (and the events also as module attributes).

cpdef enum Event:
    # run()'s first return value; _loop.pyi says what each one carries
    EV_TIMEOUT = 0
    EV_WAKE = 1
    EV_SESSION_UP = 2
    EV_SESSION_DOWN = 3
    EV_LOG = 4
    EV_HANDSHAKE_FAILED = 5
    EV_TUN_ERROR = 6
    EV_CONTROL = 7
    EV_PFS_HELLO = 8
    EV_HANDOFF = 9

cpdef enum Drop:
    # why a packet was dropped: the index of its counter (stats() "<name>_drops", session()
    # "drops"), named by the member name without the prefix, in lower case
    DROP_BAD_TAG = 0
    DROP_OVERSIZE = 1
    DROP_NO_SESSION = 2
    DROP_SPOOFED = 3
    DROP_CONGESTION = 4
    DROP_NON_IP = 5
    DROP_LINK_LOCAL = 6         # not spoofed: an IPv6 packet for its own link (admit.pxd)

cpdef enum Timeout:
    # docs/protocol.md, Timeouts and limits
    TIMEOUT_MS = 60000          # client connect and handshake, send progress, TCP_USER_TIMEOUT
    ACCEPT_TIMEOUT_MS = 10000   # the whole server side of a handshake
