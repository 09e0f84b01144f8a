# Declarations of loop_text.h: the texts both event loops share.


cdef extern from "loop_text.h":
    const char* KX_IV "DSVPN_KX_IV"
    const char* PFS_IV "DSVPN_PFS_IV"
    const char* HS_FAILED_FMT "DSVPN_HS_FAILED_FMT"
    const char* BAD_HELLO_FMT "DSVPN_BAD_HELLO_FMT"
    const char* TOO_MANY_FMT "DSVPN_TOO_MANY_FMT"
    const char* NO_RANDOM "DSVPN_NO_RANDOM"
    const char* PROB_TIMEOUT_MSG "DSVPN_PROB_TIMEOUT_MSG"
