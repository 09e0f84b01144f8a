# The events a loop's run() returns (the Event enum of _loop.pxd), queued while it runs without
# the GIL.
from libc.stdio cimport snprintf


cdef enum:
    MSG_LEN = 256               # an event's message, NUL included
    EVQ_MAX = 256               # the most events a queue holds (Events.cap)


cdef struct QueuedEvent:
    int code
    char msg[MSG_LEN]


cdef struct Events:
    QueuedEvent q[EVQ_MAX]
    int head, count, cap


cdef inline void events_push(Events* e, int code, const char* msg) noexcept nogil:
    cdef int i
    if e.count == e.cap:
        return  # only possible with a log flood; losing a log line is acceptable
    i = (e.head + e.count) % e.cap
    e.q[i].code = code
    snprintf(e.q[i].msg, MSG_LEN, "%s", msg)
    e.count += 1


cdef inline QueuedEvent* events_pop(Events* e) noexcept nogil:
    """The oldest event (valid until the next push), or NULL."""
    cdef QueuedEvent* q
    if e.count == 0:
        return NULL
    q = &e.q[e.head]
    e.head = (e.head + 1) % e.cap
    e.count -= 1
    return q


cdef inline tuple events_next(Events* e, event_type):
    """run()'s answer: the oldest event as (event_type member, message), or (EV_TIMEOUT, "")."""
    cdef QueuedEvent* q = events_pop(e)
    if q == NULL:
        return (event_type(0), "")  # EV_TIMEOUT
    return (event_type(q.code), q.msg.decode("utf-8", "replace"))
