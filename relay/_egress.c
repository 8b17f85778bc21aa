/* relay._egress: per-viewer RTP egress of frames that were packetized once per rung.
 *
 * The Python side (relay/egress.py) documents the API; this file is the hot loop behind it.
 *
 * Why native: aiortc spends tens of microseconds of Python per packet per viewer (RtpPacket,
 * serialize, pylibsrtp protect, aioice + asyncio sendto). Here one call per rung frame walks every
 * viewer of the rung with the GIL released and, per viewer, writes only what differs between
 * viewers: the 12-byte RTP header, the header extensions and (VP8) the picture id at bytes 2-3 of
 * the payload descriptor. It then SRTP-protects each packet with that viewer's own libsrtp session
 * and hands the viewer's whole frame to the kernel with one sendmmsg. On UDP sockets the packets of
 * equal size (all but a frame's last, for VP8) travel as one UDP GSO message (UDP_SEGMENT): the
 * kernel walks its stack once per run instead of once per datagram and cuts the run into the same
 * datagrams at the device; a route that refuses GSO turns it off for that stream.
 *
 * No libsrtp headers and no link: libsrtp lives inside pylibsrtp's cffi binding, and Python passes
 * the address of its srtp_protect plus each viewer's srtp_t. A stream keeps a reference to the
 * pylibsrtp Session that owns the srtp_t so the session cannot be freed under it.
 *
 * Threading: relay.egress sends frames from its own thread while the event loop retransmits, closes
 * streams and protects aiortc's RTCP with the same libsrtp sessions, which are not thread-safe. One
 * process-wide mutex, tx_lock, guards every stream's state and every use of a tx SRTP session:
 * send_frame takes it per stream, retransmit/close/sender_report and protect_locked (aiortc's RTCP,
 * through relay.egress.LockedSrtpSession) per call. The rule that keeps it deadlock-free: nothing
 * waits for the GIL while holding tx_lock (every holder does plain C work only), so a thread may
 * wait for tx_lock with or without the GIL. A per-stream `busy` flag, set and checked with the GIL
 * held, still turns two send_frame calls on one stream (or a stream listed twice) into a
 * RuntimeError instead of a corrupted session.
 *
 * The send thread holds tx_lock for one stream at a time, but it takes it straight back for the next
 * stream, and a pthread mutex lets it: a call from the event loop could wait out a whole frame to
 * every viewer (milliseconds at a few hundred viewers) with the GIL held, stalling every Python
 * thread. So a caller holding the GIL takes tx_lock with WITH_TX_LOCK: counted in tx_waiters, which
 * the send thread lets in before its next stream, it spins briefly, and only then waits with the GIL
 * released (its work is plain C either way, so the rule above holds). Sender reports do not take
 * tx_lock at all: each stream publishes what its next report says under report_lock, held for a copy.
 *
 * Memory: a frame's payloads live once, in a refcounted eg_frame shared by every viewer. Each
 * retransmission-history entry holds one reference; the Python Frame object holds one. The refcount
 * is atomic because a history entry may drop the last reference inside the GIL-free loop while
 * another thread drops the Python object's.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* -- sizes ------------------------------------------------------------------------------------- */

#define EG_MAX_DATAGRAM 1500        /* a protected packet must fit a 1500-byte path ...            */
#define EG_SRTP_TAG_MAX 16          /* ... after the largest tag aiortc negotiates (AES-GCM: 16)   */
#define EG_LIBSRTP_TRAILER_ROOM 144 /* pylibsrtp's SRTP_MAX_TRAILER_LEN (tag + MKI): srtp_protect
                                       is not told the buffer size, so every slot has this room     */
#define EG_RTP_HEADER 12
#define EG_MAX_EXTENSION_BLOCK 64   /* 4-byte profile/length word + elements + padding             */
#define EG_MAX_PAYLOAD (EG_MAX_DATAGRAM - EG_SRTP_TAG_MAX - EG_RTP_HEADER - EG_MAX_EXTENSION_BLOCK)
#define EG_SLOT_SIZE 1664           /* >= 1500 - 16 + 144, a multiple of 64 (cache lines)         */
#define EG_BATCH 64                 /* datagrams per sendmmsg call                                 */
#define EG_MAX_PAYLOADS 4096        /* per frame: ~5.7 MB, far above any real keyframe             */
#define EG_MAX_HISTORY 32768        /* a power of two dividing 65536, so seq -> slot survives wrap */
#define EG_MAX_MID 48
#define EG_GSO_MAX_SEGMENTS 64     /* UDP_MAX_SEGMENTS of Linux 4.18..6.x                         */
#define EG_GSO_MAX_BYTES 60000      /* one GSO send stays below the 64 KiB IP datagram limit       */
#define EG_GIL_RELEASE_MIN 32      /* packets in a call worth releasing the GIL for: re-taking it
                                       can wait a switch interval (5 ms) behind a busy thread      */
#define EG_VP8_DESCRIPTOR 4         /* X|S|PID, I, M|picture id (15 bits): see packetize_vp8       */

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h, Linux >= 4.18 */
#endif

#define NTP_UNIX_OFFSET 2208988800ULL /* seconds from 1900-01-01 to 1970-01-01 */

_Static_assert(EG_SLOT_SIZE >= EG_MAX_DATAGRAM - EG_SRTP_TAG_MAX + EG_LIBSRTP_TRAILER_ROOM,
               "slot must hold the largest clear packet plus libsrtp's worst-case trailer");

/* srtp_err_status_t srtp_protect(srtp_t ctx, void *rtp_hdr, int *pkt_octet_len): libsrtp 2.x. */
typedef int (*srtp_protect_fn)(void *session, void *packet, int *length);

/* -- shared frame buffers ---------------------------------------------------------------------- */

typedef struct {
    atomic_long refs;
    uint32_t count;      /* payloads */
    uint8_t keyframe;
    uint8_t vp8;         /* payloads carry a 15-bit VP8 picture id at bytes 2-3 */
    int16_t audio_level; /* 0..127 (-dBov), or -1: no audio-level extension */
    uint64_t total_bytes;
    uint32_t offsets[];  /* count + 1 entries, then the payload bytes */
} eg_frame;

static atomic_long live_frame_buffers;

static pthread_mutex_t tx_lock = PTHREAD_MUTEX_INITIALIZER; /* see "Threading" above */
static atomic_int tx_waiters;                                 /* GIL-side callers waiting for it */
static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER; /* every stream's `report` */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Take tx_lock with the GIL held, waiting at most ~200 us: the send thread holds it for one
 * stream's send and lets a counted waiter in before the next. 0 if still not taken; the caller is
 * then counted in tx_waiters and must release the GIL, lock, and uncount itself. Releasing the GIL
 * at once would be worse: taking it back from an encoder thread can cost a switch interval (5 ms). */
static int tx_lock_soon(void)
{
    if (pthread_mutex_trylock(&tx_lock) == 0)
        return 1;
    atomic_fetch_add(&tx_waiters, 1);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 1;; i++) {
        if (pthread_mutex_trylock(&tx_lock) == 0) {
            atomic_fetch_sub(&tx_waiters, 1);
            return 1;
        }
        cpu_relax();
        if (i % 64 == 0) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) > 200000L)
                return 0;
        }
    }
}

/* Runs `work` (plain C: no Python object, no GIL needed) under tx_lock from a thread holding the GIL. */
#define WITH_TX_LOCK(work)                                                                         \
    do {                                                                                           \
        if (tx_lock_soon()) {                                                                      \
            work;                                                                                  \
            pthread_mutex_unlock(&tx_lock);                                                        \
        } else {                                                                                   \
            Py_BEGIN_ALLOW_THREADS                                                                 \
            pthread_mutex_lock(&tx_lock);                                                          \
            atomic_fetch_sub(&tx_waiters, 1);                                                      \
            work;                                                                                  \
            pthread_mutex_unlock(&tx_lock);                                                        \
            Py_END_ALLOW_THREADS                                                                   \
        }                                                                                          \
    } while (0)

/* The send thread, between two streams: a GIL-side caller waiting for tx_lock goes first. */
static inline void let_waiters_in(void)
{
    while (atomic_load(&tx_waiters) > 0)
        sched_yield();
}

static inline uint8_t *frame_data(eg_frame *f) { return (uint8_t *)&f->offsets[f->count + 1]; }

static inline void frame_retain(eg_frame *f) { atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed); }

static inline void frame_release(eg_frame *f)
{
    if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) == 1) {
        free(f);
        atomic_fetch_sub_explicit(&live_frame_buffers, 1, memory_order_relaxed);
    }
}

/* -- Frame: the Python handle on one eg_frame -------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    eg_frame *frame;
} FrameObject;

static PyTypeObject FrameType;

static PyObject *Frame_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"payloads", "keyframe", "vp8", "audio_level", NULL};
    PyObject *payloads_obj, *level_obj = Py_None;
    int keyframe = 0, vp8 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$ppO:Frame", kwlist, &payloads_obj, &keyframe, &vp8,
                                     &level_obj))
        return NULL;

    long audio_level = -1;
    if (level_obj != Py_None) {
        audio_level = PyLong_AsLong(level_obj);
        if (audio_level == -1 && PyErr_Occurred())
            return NULL;
        if (audio_level < 0 || audio_level > 127) {
            PyErr_SetString(PyExc_ValueError, "audio_level is 0..127 (-dBov) or None");
            return NULL;
        }
    }

    PyObject *seq = PySequence_Fast(payloads_obj, "payloads must be a sequence of bytes-like objects");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count < 1 || count > EG_MAX_PAYLOADS) {
        PyErr_Format(PyExc_ValueError, "a frame has 1..%d payloads, not %zd", EG_MAX_PAYLOADS, count);
        Py_DECREF(seq);
        return NULL;
    }

    /* First pass: validate and size, so the frame is one allocation. */
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        const uint8_t *p = view.buf;
        Py_ssize_t len = view.len;
        int bad_size = len < 1 || len > EG_MAX_PAYLOAD;
        /* The picture id is patched in place per viewer: only the fixed 15-bit layout is safe. */
        int bad_vp8 = vp8 && !bad_size &&
                      (len <= EG_VP8_DESCRIPTOR || !(p[0] & 0x80) || !(p[1] & 0x80) || !(p[2] & 0x80));
        PyBuffer_Release(&view);
        if (bad_size) {
            PyErr_Format(PyExc_ValueError, "payload %zd has %zd bytes; allowed 1..%d", i, len, EG_MAX_PAYLOAD);
            Py_DECREF(seq);
            return NULL;
        }
        if (bad_vp8) {
            PyErr_Format(PyExc_ValueError,
                         "payload %zd lacks the 15-bit picture-id VP8 descriptor (use packetize_vp8)", i);
            Py_DECREF(seq);
            return NULL;
        }
        total += (uint64_t)len;
    }

    size_t header = sizeof(eg_frame) + sizeof(uint32_t) * (size_t)(count + 1);
    eg_frame *f = malloc(header + total);
    if (f == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    atomic_init(&f->refs, 1);
    f->count = (uint32_t)count;
    f->keyframe = (uint8_t)keyframe;
    f->vp8 = (uint8_t)vp8;
    f->audio_level = (int16_t)audio_level;
    f->total_bytes = total;
    uint8_t *data = frame_data(f);
    uint32_t pos = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &view, PyBUF_SIMPLE) < 0) {
            free(f);
            Py_DECREF(seq);
            return NULL;
        }
        /* A bytearray could have been resized between the passes; never write past the block. */
        if ((uint64_t)pos + (uint64_t)view.len > total || view.len < 1 || view.len > EG_MAX_PAYLOAD) {
            PyBuffer_Release(&view);
            free(f);
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "payloads changed while the frame was built");
            return NULL;
        }
        f->offsets[i] = pos;
        memcpy(data + pos, view.buf, (size_t)view.len);
        pos += (uint32_t)view.len;
        PyBuffer_Release(&view);
    }
    f->offsets[count] = pos;
    f->total_bytes = pos;
    Py_DECREF(seq);

    FrameObject *self = (FrameObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        free(f);
        return NULL;
    }
    self->frame = f;
    atomic_fetch_add_explicit(&live_frame_buffers, 1, memory_order_relaxed);
    return (PyObject *)self;
}

static void Frame_dealloc(FrameObject *self)
{
    if (self->frame != NULL)
        frame_release(self->frame);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Frame_get_payloads(FrameObject *self, void *closure)
{
    eg_frame *f = self->frame;
    PyObject *out = PyTuple_New(f->count);
    if (out == NULL)
        return NULL;
    for (uint32_t i = 0; i < f->count; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)frame_data(f) + f->offsets[i],
                                                f->offsets[i + 1] - f->offsets[i]);
        if (b == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, b);
    }
    return out;
}

static PyObject *Frame_get_payload_count(FrameObject *self, void *c) { return PyLong_FromUnsignedLong(self->frame->count); }
static PyObject *Frame_get_nbytes(FrameObject *self, void *c) { return PyLong_FromUnsignedLongLong(self->frame->total_bytes); }
static PyObject *Frame_get_keyframe(FrameObject *self, void *c) { return PyBool_FromLong(self->frame->keyframe); }
static PyObject *Frame_get_vp8(FrameObject *self, void *c) { return PyBool_FromLong(self->frame->vp8); }

static PyObject *Frame_get_audio_level(FrameObject *self, void *c)
{
    if (self->frame->audio_level < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->frame->audio_level);
}

static PyGetSetDef Frame_getset[] = {
    {"payloads", (getter)Frame_get_payloads, NULL, "tuple of the payloads (copies; tests and fallbacks)", NULL},
    {"payload_count", (getter)Frame_get_payload_count, NULL, "number of RTP payloads", NULL},
    {"nbytes", (getter)Frame_get_nbytes, NULL, "payload bytes in total", NULL},
    {"keyframe", (getter)Frame_get_keyframe, NULL, "decodable without earlier frames", NULL},
    {"vp8", (getter)Frame_get_vp8, NULL, "payloads carry a patchable 15-bit VP8 picture id", NULL},
    {"audio_level", (getter)Frame_get_audio_level, NULL, "0..127 (-dBov) or None", NULL},
    {NULL},
};

static PyTypeObject FrameType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._egress.Frame",
    .tp_basicsize = sizeof(FrameObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Frame(payloads, *, keyframe=False, vp8=False, audio_level=None): one rung frame's RTP "
              "payloads, copied once into a refcounted buffer shared by every viewer.",
    .tp_new = Frame_new,
    .tp_dealloc = (destructor)Frame_dealloc,
    .tp_getset = Frame_getset,
};

/* -- Stream: one viewer's outgoing RTP stream of one kind -------------------------------------- */

typedef struct {
    eg_frame *frame; /* NULL: never used */
    uint32_t timestamp;
    uint32_t abs_send_time;
    uint16_t sequence_number;
    uint16_t payload_index;
    uint16_t picture_id;
} eg_sent;

typedef struct {
    PyObject_HEAD
    /* where */
    int fd; /* our own dup of the caller's socket, so a reused descriptor number never gets media */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    /* SRTP (srtp == NULL: clear RTP, tests and benchmarks only) */
    PyObject *srtp_owner;
    void *srtp;
    srtp_protect_fn protect;
    /* RTP fields */
    uint32_t ssrc;
    uint8_t payload_type;
    uint32_t timestamp_origin;
    uint16_t next_sequence_number;
    uint8_t vp8;
    uint16_t next_picture_id;
    uint8_t mid_id, abs_send_time_id, audio_level_id; /* 0: not negotiated */
    uint8_t has_mid;
    uint8_t mid[EG_MAX_MID];
    uint8_t mid_len;
    /* state */
    uint8_t initialized, closed, busy, started, waiting_for_keyframe;
    uint8_t gso; /* send runs of equal-size packets as one UDP GSO message */
    uint32_t last_timestamp;
    uint64_t last_ntp_time;
    /* what the next RTCP sender report says (report_lock): copied after each frame sent */
    struct {
        uint8_t started;
        uint32_t timestamp;
        uint64_t ntp_time, packets, octets;
    } report;
    /* counters (read from Python; written only by the one thread that holds `busy`) */
    uint64_t packets_sent, octets_sent, frames_sent, frames_skipped;
    uint64_t packets_dropped, send_errors, srtp_errors, retransmissions;
    uint64_t rtcp_sent; /* aiortc's RTCP (sender reports, SDES, BYE) sent by the send thread */
    int last_errno;
    /* retransmission history, indexed by seq & mask */
    eg_sent *history;
    uint32_t history_mask;
} StreamObject;

static PyTypeObject StreamType;

/* Header extensions exactly as aiortc.rtp.pack_header_extensions writes aiortc's sender's set, in
 * its order (mid, abs-send-time, audio level): the one-byte form (0xBEDE) unless an id is above 14
 * or a value is empty or longer than 16 bytes, then the two-byte form (0x1000); padded to 32 bits.
 * Returns the block length including the 4-byte profile/length word, 0 when there is nothing. */
static size_t build_extensions(const StreamObject *s, uint32_t abs_send_time, int audio_level, uint8_t *out)
{
    struct { uint8_t id, len; const uint8_t *value; } el[3];
    int n = 0;
    uint8_t ast[3] = {(uint8_t)(abs_send_time >> 16), (uint8_t)(abs_send_time >> 8), (uint8_t)abs_send_time};
    uint8_t level = (uint8_t)(audio_level & 0x7F); /* V (voice activity) bit 0, as aiortc sends it */
    if (s->has_mid && s->mid_id)
        el[n].id = s->mid_id, el[n].len = s->mid_len, el[n].value = s->mid, n++;
    if (s->abs_send_time_id)
        el[n].id = s->abs_send_time_id, el[n].len = 3, el[n].value = ast, n++;
    if (audio_level >= 0 && s->audio_level_id)
        el[n].id = s->audio_level_id, el[n].len = 1, el[n].value = &level, n++;
    if (n == 0)
        return 0;

    int one_byte = 1;
    for (int i = 0; i < n; i++)
        if (el[i].id > 14 || el[i].len == 0 || el[i].len > 16)
            one_byte = 0;
    size_t pos = 4;
    for (int i = 0; i < n; i++) {
        if (one_byte) {
            out[pos++] = (uint8_t)((el[i].id << 4) | (el[i].len - 1));
        } else {
            out[pos++] = el[i].id;
            out[pos++] = el[i].len;
        }
        memcpy(out + pos, el[i].value, el[i].len);
        pos += el[i].len;
    }
    while (pos % 4)
        out[pos++] = 0;
    uint16_t profile = one_byte ? 0xBEDE : 0x1000;
    uint16_t words = (uint16_t)((pos - 4) / 4);
    out[0] = (uint8_t)(profile >> 8), out[1] = (uint8_t)profile;
    out[2] = (uint8_t)(words >> 8), out[3] = (uint8_t)words;
    return pos;
}

/* One clear RTP packet into `out`; returns its length. */
static size_t write_packet(const StreamObject *s, eg_frame *f, uint32_t index, uint16_t seq, uint32_t ts,
                           uint16_t picture_id, const uint8_t *ext, size_t ext_len, uint8_t *out)
{
    uint32_t start = f->offsets[index], len = f->offsets[index + 1] - start;
    int marker = index == f->count - 1;
    out[0] = (uint8_t)(0x80 | (ext_len ? 0x10 : 0)); /* V=2, P=0, X, CC=0 */
    out[1] = (uint8_t)((marker << 7) | s->payload_type);
    out[2] = (uint8_t)(seq >> 8), out[3] = (uint8_t)seq;
    out[4] = (uint8_t)(ts >> 24), out[5] = (uint8_t)(ts >> 16), out[6] = (uint8_t)(ts >> 8), out[7] = (uint8_t)ts;
    out[8] = (uint8_t)(s->ssrc >> 24), out[9] = (uint8_t)(s->ssrc >> 16);
    out[10] = (uint8_t)(s->ssrc >> 8), out[11] = (uint8_t)s->ssrc;
    memcpy(out + EG_RTP_HEADER, ext, ext_len);
    uint8_t *payload = out + EG_RTP_HEADER + ext_len;
    memcpy(payload, frame_data(f) + start, len);
    if (s->vp8) { /* M bit stays set: the 15-bit form, so every viewer's id fits the same bytes */
        payload[2] = (uint8_t)(0x80 | (picture_id >> 8));
        payload[3] = (uint8_t)picture_id;
    }
    return EG_RTP_HEADER + ext_len + len;
}

static void remember(StreamObject *s, eg_frame *f, uint32_t index, uint16_t seq, uint32_t ts, uint16_t picture_id,
                     uint32_t abs_send_time)
{
    if (s->history == NULL)
        return;
    eg_sent *e = &s->history[seq & s->history_mask];
    if (e->frame != f) { /* each entry holds exactly one reference to its frame */
        frame_retain(f);
        if (e->frame != NULL)
            frame_release(e->frame);
        e->frame = f;
    }
    e->timestamp = ts;
    e->abs_send_time = abs_send_time;
    e->sequence_number = seq;
    e->payload_index = (uint16_t)index;
    e->picture_id = picture_id;
}

static void forget_history(StreamObject *s)
{
    if (s->history == NULL)
        return;
    for (uint32_t i = 0; i <= s->history_mask; i++)
        if (s->history[i].frame != NULL)
            frame_release(s->history[i].frame);
    free(s->history);
    s->history = NULL;
}

/* Per stream, per frame: what every packet of this frame shares. */
typedef struct {
    uint32_t timestamp;
    uint32_t abs_send_time;
    uint16_t picture_id;
    size_t ext_len;
    uint8_t ext[EG_MAX_EXTENSION_BLOCK];
} eg_frame_header;

/* Advance the stream to a new frame; 0 when the stream skips it (waiting for a keyframe). */
static int begin_frame(StreamObject *s, eg_frame *f, uint32_t timestamp, uint64_t ntp_time, eg_frame_header *h)
{
    if (s->waiting_for_keyframe) {
        if (!f->keyframe) {
            s->frames_skipped++;
            return 0;
        }
        s->waiting_for_keyframe = 0;
    }
    uint32_t ts = s->timestamp_origin + timestamp;
    /* Never backwards, never a repeat for a new frame (serial arithmetic, RFC 1982): a viewer moving
     * to a rung on the same clock may land on a frame not newer than the last one it got. */
    if (s->started && (int32_t)(ts - s->last_timestamp) <= 0)
        ts = s->last_timestamp + 1;
    s->started = 1;
    s->last_timestamp = ts;
    s->last_ntp_time = ntp_time;
    h->timestamp = ts;
    h->abs_send_time = (uint32_t)((ntp_time >> 14) & 0xFFFFFF);
    h->picture_id = s->next_picture_id;
    if (s->vp8)
        s->next_picture_id = (uint16_t)((s->next_picture_id + 1) & 0x7FFF);
    h->ext_len = build_extensions(s, h->abs_send_time, f->audio_level, h->ext);
    return 1;
}

static inline int is_transient(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS; }

typedef union {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} eg_gso_control;

/* Scratch space of one send_frame call: packet slots and the messages that point into them. */
typedef struct {
    uint8_t *slots;                      /* EG_BATCH * EG_SLOT_SIZE */
    struct iovec iov[EG_BATCH];          /* one per packet */
    uint32_t payload_len[EG_BATCH];      /* per packet, for the octet count */
    struct mmsghdr msgs[EG_BATCH];       /* one per datagram, or per GSO run of them */
    uint16_t msg_first[EG_BATCH];        /* first packet of each message */
    uint16_t msg_packets[EG_BATCH];      /* packets in each message */
    eg_gso_control control[EG_BATCH];
} eg_arena;

static eg_arena *arena_new(void)
{
    eg_arena *a = malloc(sizeof(eg_arena));
    if (a == NULL)
        return NULL;
    a->slots = aligned_alloc(64, (size_t)EG_BATCH * EG_SLOT_SIZE);
    if (a->slots == NULL) {
        free(a);
        return NULL;
    }
    memset(a->msgs, 0, sizeof(a->msgs));
    memset(a->control, 0, sizeof(a->control));
    for (unsigned i = 0; i < EG_BATCH; i++) {
        struct cmsghdr *c = &a->control[i].align;
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    }
    return a;
}

static void arena_free(eg_arena *a)
{
    free(a->slots);
    free(a);
}

/* Count `count` packets that did not reach the kernel: drops for EAGAIN/ENOBUFS (a full socket
 * buffer is congestion, like loss on the path), errors for anything else. */
static void count_failed(StreamObject *s, int err, uint64_t count)
{
    if (count == 0)
        return;
    if (is_transient(err)) {
        s->packets_dropped += count;
    } else {
        s->send_errors += count;
        s->last_errno = err;
    }
}

/* Messages for packets [first, count): runs of equal-size packets (a shorter one may end a run, as
 * GSO allows) become one GSO message each; without GSO every packet is its own message. */
static unsigned group_messages(StreamObject *s, eg_arena *a, unsigned first, unsigned count)
{
    unsigned messages = 0;
    for (unsigned k = first; k < count; messages++) {
        size_t segment = a->iov[k].iov_len, bytes = segment;
        unsigned run = 1;
        while (s->gso && k + run < count && run < EG_GSO_MAX_SEGMENTS &&
               a->iov[k + run].iov_len <= segment && bytes + a->iov[k + run].iov_len <= EG_GSO_MAX_BYTES) {
            bytes += a->iov[k + run].iov_len;
            run++;
            if (a->iov[k + run - 1].iov_len < segment)
                break;
        }
        struct msghdr *h = &a->msgs[messages].msg_hdr;
        h->msg_name = &s->addr;
        h->msg_namelen = s->addr_len;
        h->msg_iov = &a->iov[k];
        h->msg_iovlen = run;
        if (run > 1) {
            *(uint16_t *)CMSG_DATA(&a->control[messages].align) = (uint16_t)segment;
            h->msg_control = a->control[messages].buf;
            h->msg_controllen = sizeof(a->control[messages].buf);
        } else {
            h->msg_control = NULL;
            h->msg_controllen = 0;
        }
        a->msg_first[messages] = (uint16_t)k;
        a->msg_packets[messages] = (uint16_t)run;
        k += run;
    }
    return messages;
}

/* errnos with which a kernel or route refuses a GSO send that plain datagrams would pass: no
 * UDP_SEGMENT (before 4.18), IPsec or no checksum offload (EIO), a path MTU below the segment or
 * checksums off (EINVAL), a datagram that needs fragmenting (EMSGSIZE). */
static int gso_refused(int err)
{
    return err == EIO || err == EINVAL || err == EMSGSIZE || err == ENOPROTOOPT || err == EOPNOTSUPP;
}

/* Hand the `count` prepared packets to the kernel, in one sendmmsg when it takes them all.
 * Returns 0, or the errno of the first failure, after counting the packets not sent. */
static int transmit(StreamObject *s, eg_arena *a, unsigned count)
{
    if (count == 0)
        return 0;
    if (s->fd < 0) {
        count_failed(s, EBADF, count);
        return EBADF;
    }
    unsigned next = 0; /* first packet not handed over yet */
    while (next < count) {
        unsigned messages = group_messages(s, a, next, count), done = 0;
        while (done < messages) {
            /* MSG_DONTWAIT: never block the event loop, whatever the socket's own mode */
            int r = sendmmsg(s->fd, a->msgs + done, messages - done, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (r < 0) {
                int err = errno;
                if (err == EINTR)
                    continue;
                if (a->msg_packets[done] > 1 && gso_refused(err)) {
                    s->gso = 0; /* for good on this stream: regroup the rest as plain datagrams */
                    break;
                }
                count_failed(s, err, count - a->msg_first[done]);
                return err;
            }
            for (unsigned m = done; m < done + (unsigned)r; m++)
                for (unsigned k = a->msg_first[m]; k < (unsigned)a->msg_first[m] + a->msg_packets[m]; k++) {
                    s->packets_sent++;
                    s->octets_sent += a->payload_len[k];
                }
            done += (unsigned)r;
        }
        next = done < messages ? a->msg_first[done] : count;
    }
    return 0;
}

/* Protect one packet in place; 0 on success (no SRTP session: clear RTP, nothing to do). */
static int protect_packet(StreamObject *s, uint8_t *packet, size_t *len)
{
    if (s->srtp == NULL)
        return 0;
    int l = (int)*len;
    int status = s->protect(s->srtp, packet, &l);
    if (status != 0)
        return status;
    if (l < (int)*len || l > EG_SLOT_SIZE) /* cannot happen with libsrtp; never send garbage */
        return -1;
    *len = (size_t)l;
    return 0;
}

/* The whole frame to one stream, in batches of EG_BATCH. Once a send fails, the rest of the frame
 * is still numbered and remembered (a NACK can recover it) and counted the way the first failure
 * was, but neither protected nor sent: the socket will not take it now. */
static void send_to_stream(StreamObject *s, eg_frame *f, uint32_t timestamp, uint64_t ntp_time, eg_arena *a)
{
    eg_frame_header h;
    if (!begin_frame(s, f, timestamp, ntp_time, &h))
        return;
    s->frames_sent++;
    int failure = 0; /* errno of this frame's first failed send */
    for (uint32_t base = 0; base < f->count; base += EG_BATCH) {
        uint32_t n = f->count - base < EG_BATCH ? f->count - base : EG_BATCH;
        unsigned prepared = 0, unsent = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t index = base + i;
            uint16_t seq = s->next_sequence_number++;
            remember(s, f, index, seq, h.timestamp, h.picture_id, h.abs_send_time);
            if (failure) {
                unsent++;
                continue;
            }
            uint8_t *slot = a->slots + (size_t)prepared * EG_SLOT_SIZE;
            size_t len = write_packet(s, f, index, seq, h.timestamp, h.picture_id, h.ext, h.ext_len, slot);
            if (protect_packet(s, slot, &len) != 0) {
                s->srtp_errors++;
                continue;
            }
            a->iov[prepared].iov_base = slot;
            a->iov[prepared].iov_len = len;
            a->payload_len[prepared] = f->offsets[index + 1] - f->offsets[index];
            prepared++;
        }
        if (failure)
            count_failed(s, failure, unsent);
        else
            failure = transmit(s, a, prepared);
    }
    pthread_mutex_lock(&report_lock);
    s->report.started = 1;
    s->report.timestamp = s->last_timestamp;
    s->report.ntp_time = s->last_ntp_time;
    s->report.packets = s->packets_sent;
    s->report.octets = s->octets_sent;
    pthread_mutex_unlock(&report_lock);
}

static uint64_t ntp_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    uint64_t frac = ((uint64_t)t.tv_nsec << 32) / 1000000000ULL;
    return (((uint64_t)t.tv_sec + NTP_UNIX_OFFSET) << 32) | frac;
}

/* -- Stream: construction, lifetime, attributes ------------------------------------------------ */

static PyObject *Stream_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    StreamObject *self = (StreamObject *)type->tp_alloc(type, 0); /* zeroed */
    if (self == NULL)
        return NULL;
    self->fd = -1;
    self->closed = 1; /* unusable until __init__ succeeds */
    return (PyObject *)self;
}

static int check_range(const char *name, long long value, long long low, long long high)
{
    if (value < low || value > high) {
        PyErr_Format(PyExc_ValueError, "%s must be in %lld..%lld, not %lld", name, low, high, value);
        return -1;
    }
    return 0;
}

static int set_destination(StreamObject *self, int family, PyObject *host, long long port, unsigned int flowinfo,
                           unsigned int scope_id)
{
    memset(&self->addr, 0, sizeof(self->addr));
    self->addr_len = 0;
    if (family == 0)
        return 0;
    if (!PyUnicode_Check(host)) {
        PyErr_SetString(PyExc_TypeError, "host must be a str");
        return -1;
    }
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL)
        return -1;
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&self->addr;
        if (check_range("port", port, 1, 65535) < 0)
            return -1;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, text, &sin->sin_addr) != 1)
            goto bad_address;
        self->addr_len = sizeof(*sin);
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&self->addr;
        if (check_range("port", port, 1, 65535) < 0)
            return -1;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_flowinfo = htonl(flowinfo);
        sin6->sin6_scope_id = scope_id;
        if (inet_pton(AF_INET6, text, &sin6->sin6_addr) != 1)
            goto bad_address;
        self->addr_len = sizeof(*sin6);
    } else if (family == AF_UNIX) { /* datagram sockets on a path: lets tests fill a receiver queue */
        struct sockaddr_un *sun = (struct sockaddr_un *)&self->addr;
        size_t len = strlen(text);
        if (len == 0 || len >= sizeof(sun->sun_path))
            goto bad_address;
        sun->sun_family = AF_UNIX;
        memcpy(sun->sun_path, text, len + 1);
        self->addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
    } else {
        PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
        return -1;
    }
    return 0;
bad_address:
    PyErr_Format(PyExc_ValueError, "not a numeric address of family %d: %R", family, host);
    return -1;
}

static int Stream_init(StreamObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ssrc", "payload_type", "timestamp_origin", "sequence_number", "picture_id",
                             "mid", "mid_id", "abs_send_time_id", "audio_level_id", "history_size",
                             "wait_for_keyframe", "fd", "family", "host", "port", "flowinfo", "scope_id",
                             "srtp_owner", "srtp", "protect", "gso", NULL};
    long long ssrc, payload_type, timestamp_origin, sequence_number, picture_id, mid_id, abs_send_time_id;
    long long audio_level_id, history_size, port;
    int wait_for_keyframe, fd, family;
    unsigned int flowinfo, scope_id;
    PyObject *mid, *host, *srtp_owner;
    unsigned long long srtp, protect;
    int gso = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LLLLLOLLLLpiiOLIIOKK|$p:Stream", kwlist, &ssrc, &payload_type,
                                     &timestamp_origin, &sequence_number, &picture_id, &mid, &mid_id,
                                     &abs_send_time_id, &audio_level_id, &history_size, &wait_for_keyframe, &fd,
                                     &family, &host, &port, &flowinfo, &scope_id, &srtp_owner, &srtp, &protect,
                                     &gso))
        return -1;
    if (self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "a Stream is initialised once");
        return -1;
    }
    if (check_range("ssrc", ssrc, 0, 0xFFFFFFFFLL) < 0 || check_range("payload_type", payload_type, 0, 127) < 0 ||
        check_range("timestamp_origin", timestamp_origin, 0, 0xFFFFFFFFLL) < 0 ||
        check_range("sequence_number", sequence_number, 0, 0xFFFF) < 0 ||
        check_range("picture_id", picture_id, -1, 0x7FFF) < 0 || check_range("mid_id", mid_id, 0, 255) < 0 ||
        check_range("abs_send_time_id", abs_send_time_id, 0, 255) < 0 ||
        check_range("audio_level_id", audio_level_id, 0, 255) < 0 ||
        check_range("history_size", history_size, 0, EG_MAX_HISTORY) < 0)
        return -1;
    if (history_size & (history_size - 1)) {
        PyErr_SetString(PyExc_ValueError, "history_size must be 0 or a power of two (it must divide 65536)");
        return -1;
    }
    if (mid != Py_None) {
        if (!PyBytes_Check(mid)) {
            PyErr_SetString(PyExc_TypeError, "mid must be bytes or None");
            return -1;
        }
        /* 48 bytes keep the worst-case extension block (two-byte form, all three) within 64 */
        if (PyBytes_GET_SIZE(mid) > EG_MAX_MID) {
            PyErr_Format(PyExc_ValueError, "mid is longer than %d bytes", EG_MAX_MID);
            return -1;
        }
        memcpy(self->mid, PyBytes_AS_STRING(mid), (size_t)PyBytes_GET_SIZE(mid));
        self->mid_len = (uint8_t)PyBytes_GET_SIZE(mid);
        self->has_mid = 1;
    }
    if ((srtp != 0) != (protect != 0)) {
        PyErr_SetString(PyExc_ValueError, "srtp and protect are both given or both 0 (clear RTP)");
        return -1;
    }
    if ((fd >= 0) != (family != 0)) {
        PyErr_SetString(PyExc_ValueError, "a socket needs a destination and a destination needs a socket");
        return -1;
    }
    if (set_destination(self, family, host, port, flowinfo, scope_id) < 0)
        return -1;
    if (history_size > 0) {
        self->history = calloc((size_t)history_size, sizeof(eg_sent));
        if (self->history == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->history_mask = (uint32_t)(history_size - 1);
    }
    if (fd >= 0) {
        self->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (self->fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            forget_history(self);
            return -1;
        }
    }
    /* GSO only where the kernel will cut the run into datagrams: a UDP socket (AF_UNIX, say, would
     * ignore the SOL_UDP cmsg and deliver the whole run as one datagram). */
    if (gso && self->fd >= 0 && (family == AF_INET || family == AF_INET6)) {
        int type = 0, protocol = 0;
        socklen_t size = sizeof(type);
        if (getsockopt(self->fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == SOCK_DGRAM) {
            size = sizeof(protocol);
            if (getsockopt(self->fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &size) == 0 && protocol == IPPROTO_UDP)
                self->gso = 1;
        }
    }
    self->ssrc = (uint32_t)ssrc;
    self->payload_type = (uint8_t)payload_type;
    self->timestamp_origin = (uint32_t)timestamp_origin;
    self->next_sequence_number = (uint16_t)sequence_number;
    self->vp8 = picture_id >= 0;
    self->next_picture_id = picture_id >= 0 ? (uint16_t)picture_id : 0;
    self->mid_id = (uint8_t)mid_id;
    self->abs_send_time_id = (uint8_t)abs_send_time_id;
    self->audio_level_id = (uint8_t)audio_level_id;
    self->waiting_for_keyframe = (uint8_t)wait_for_keyframe;
    Py_INCREF(srtp_owner);
    self->srtp_owner = srtp_owner;
    self->srtp = (void *)(uintptr_t)srtp;
    self->protect = (srtp_protect_fn)(uintptr_t)protect;
    self->initialized = 1;
    self->closed = 0;
    return 0;
}

static void stream_release(StreamObject *self)
{
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
    forget_history(self);
    self->srtp = NULL;
    self->protect = NULL;
    Py_CLEAR(self->srtp_owner);
    self->closed = 1;
}

static PyObject *Stream_close(StreamObject *self, PyObject *unused)
{
    /* A send_frame in another thread may hold this stream: it checks `closed` under the lock. The
     * session's owner is dropped after the lock, with the GIL (it may free the Session). */
    PyObject *owner = self->srtp_owner;
    self->srtp_owner = NULL;
    WITH_TX_LOCK(stream_release(self));
    Py_XDECREF(owner);
    Py_RETURN_NONE;
}

static int Stream_traverse(StreamObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->srtp_owner);
    return 0;
}

static int Stream_clear(StreamObject *self)
{
    /* Dropping the session means dropping its srtp_t: the stream is closed with it. A stream in
     * use by send_frame is referenced by that call and is never garbage. */
    stream_release(self);
    return 0;
}

static void Stream_dealloc(StreamObject *self)
{
    PyObject_GC_UnTrack(self);
    stream_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One history entry back into a clear packet in `out`; 0 when unknown or expired. */
static size_t rebuild(StreamObject *s, long long seq, uint8_t *out, eg_frame **frame)
{
    if (s->history == NULL || seq < 0 || seq > 0xFFFF)
        return 0;
    eg_sent *e = &s->history[seq & s->history_mask];
    if (e->frame == NULL || e->sequence_number != (uint16_t)seq)
        return 0;
    /* Byte for byte what was sent first, abs-send-time included: SRTP reuses the same index (IV)
     * for a repeat, which is only safe for an identical packet (AES-GCM leaks its hash key when
     * two different messages share an IV). */
    uint8_t ext[EG_MAX_EXTENSION_BLOCK];
    size_t ext_len = build_extensions(s, e->abs_send_time, e->frame->audio_level, ext);
    *frame = e->frame;
    return write_packet(s, e->frame, e->payload_index, e->sequence_number, e->timestamp, e->picture_id, ext,
                        ext_len, out);
}

static int check_initialized(StreamObject *s)
{
    if (!s->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "stream was never initialised");
        return -1;
    }
    return 0;
}

/* For send_frame and clear_packets, which advance the stream: one caller at a time. */
static int claim(StreamObject *s)
{
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError, "stream is in use by another thread (or listed twice)");
        return -1;
    }
    return check_initialized(s);
}

/* Under tx_lock: 1 if the packet went out again. */
static int retransmit_locked(StreamObject *self, long long seq)
{
    if (self->closed)
        return 0;
    uint8_t packet[EG_SLOT_SIZE] __attribute__((aligned(16)));
    eg_frame *frame;
    size_t len = rebuild(self, seq, packet, &frame);
    if (len == 0)
        return 0;
    if (self->fd < 0) {
        count_failed(self, EBADF, 1);
        return 0;
    }
    if (protect_packet(self, packet, &len) != 0) {
        self->srtp_errors++;
        return 0;
    }
    ssize_t r;
    do
        r = sendto(self->fd, packet, len, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&self->addr,
                   self->addr_len);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        count_failed(self, errno, 1);
        return 0;
    }
    self->retransmissions++;
    return 1;
}

/* What an RTCP sender report says about this stream, read at one instant: (ntp time, RTP timestamp,
 * packets, payload octets) of the last frame sent, or None before the first. */
static PyObject *Stream_sender_report(StreamObject *self, PyObject *unused)
{
    pthread_mutex_lock(&report_lock);
    int started = self->report.started;
    unsigned long long ntp = self->report.ntp_time, packets = self->report.packets, octets = self->report.octets;
    unsigned long ts = self->report.timestamp;
    pthread_mutex_unlock(&report_lock);
    if (!started)
        Py_RETURN_NONE;
    return Py_BuildValue("(KkKK)", ntp, ts, packets, octets);
}

static PyObject *Stream_retransmit(StreamObject *self, PyObject *arg)
{
    long long seq = PyLong_AsLongLong(arg);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    if (check_initialized(self) < 0)
        return NULL;
    int done = 0;
    WITH_TX_LOCK(done = retransmit_locked(self, seq));
    return PyBool_FromLong(done);
}

#define U64_GETTER(field)                                                                          \
    static PyObject *Stream_get_##field(StreamObject *self, void *c)                               \
    {                                                                                              \
        return PyLong_FromUnsignedLongLong(self->field);                                           \
    }
U64_GETTER(packets_sent)
U64_GETTER(octets_sent)
U64_GETTER(frames_sent)
U64_GETTER(frames_skipped)
U64_GETTER(packets_dropped)
U64_GETTER(send_errors)
U64_GETTER(srtp_errors)
U64_GETTER(retransmissions)
U64_GETTER(rtcp_sent)
U64_GETTER(last_ntp_time)

static PyObject *Stream_get_ssrc(StreamObject *self, void *c) { return PyLong_FromUnsignedLong(self->ssrc); }
static PyObject *Stream_get_closed(StreamObject *self, void *c) { return PyBool_FromLong(self->closed); }
static PyObject *Stream_get_last_errno(StreamObject *self, void *c) { return PyLong_FromLong(self->last_errno); }
static PyObject *Stream_get_next_sequence_number(StreamObject *self, void *c) { return PyLong_FromLong(self->next_sequence_number); }
static PyObject *Stream_get_history_size(StreamObject *self, void *c)
{
    return PyLong_FromUnsignedLong(self->history ? self->history_mask + 1 : 0);
}
static PyObject *Stream_get_last_timestamp(StreamObject *self, void *c)
{
    if (!self->started)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(self->last_timestamp);
}
static PyObject *Stream_get_next_picture_id(StreamObject *self, void *c)
{
    if (!self->vp8)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->next_picture_id);
}
static PyObject *Stream_get_gso(StreamObject *self, void *c) { return PyBool_FromLong(self->gso); }
static PyObject *Stream_get_waiting_for_keyframe(StreamObject *self, void *c)
{
    return PyBool_FromLong(self->waiting_for_keyframe);
}
static int Stream_set_waiting_for_keyframe(StreamObject *self, PyObject *value, void *c)
{
    int truth = value == NULL ? -1 : PyObject_IsTrue(value);
    if (truth < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "waiting_for_keyframe cannot be deleted");
        return -1;
    }
    self->waiting_for_keyframe = (uint8_t)truth;
    return 0;
}

static PyGetSetDef Stream_getset[] = {
    {"packets_sent", (getter)Stream_get_packets_sent, NULL, "RTP packets the kernel took (no retransmissions)", NULL},
    {"octets_sent", (getter)Stream_get_octets_sent, NULL, "payload bytes of those packets (RTCP SR octet count)", NULL},
    {"frames_sent", (getter)Stream_get_frames_sent, NULL, "frames numbered and sent (fully or not)", NULL},
    {"frames_skipped", (getter)Stream_get_frames_skipped, NULL, "frames skipped while waiting for a keyframe", NULL},
    {"packets_dropped", (getter)Stream_get_packets_dropped, NULL, "packets not sent: socket buffer full (EAGAIN/ENOBUFS)", NULL},
    {"send_errors", (getter)Stream_get_send_errors, NULL, "packets not sent: any other socket error", NULL},
    {"srtp_errors", (getter)Stream_get_srtp_errors, NULL, "packets libsrtp refused to protect", NULL},
    {"retransmissions", (getter)Stream_get_retransmissions, NULL, "packets sent again by retransmit()", NULL},
    {"rtcp_sent", (getter)Stream_get_rtcp_sent, NULL, "RTCP compounds sent by the send thread (submit_rtcp)", NULL},
    {"last_errno", (getter)Stream_get_last_errno, NULL, "errno of the latest send error (0: none)", NULL},
    {"last_timestamp", (getter)Stream_get_last_timestamp, NULL, "RTP timestamp of the latest frame, None before the first", NULL},
    {"last_ntp_time", (getter)Stream_get_last_ntp_time, NULL, "64-bit NTP time the latest frame was sent at", NULL},
    {"next_sequence_number", (getter)Stream_get_next_sequence_number, NULL, "sequence number of the next packet", NULL},
    {"next_picture_id", (getter)Stream_get_next_picture_id, NULL, "VP8 picture id of the next frame (None: not VP8)", NULL},
    {"ssrc", (getter)Stream_get_ssrc, NULL, "SSRC", NULL},
    {"history_size", (getter)Stream_get_history_size, NULL, "packets kept for retransmission", NULL},
    {"closed", (getter)Stream_get_closed, NULL, "closed (or never initialised)", NULL},
    {"gso", (getter)Stream_get_gso, NULL, "runs of equal-size packets go out as one UDP GSO send", NULL},
    {"waiting_for_keyframe", (getter)Stream_get_waiting_for_keyframe, (setter)Stream_set_waiting_for_keyframe,
     "skip frames until the next keyframe", NULL},
    {NULL},
};

static PyMethodDef Stream_methods[] = {
    {"close", (PyCFunction)Stream_close, METH_NOARGS,
     "Release the socket duplicate, the retransmission history and the SRTP session (idempotent)."},
    {"retransmit", (PyCFunction)Stream_retransmit, METH_O,
     "retransmit(seq) -> bool: send the packet with this sequence number again, byte for byte, protected "
     "again; False when it is unknown, expired, or could not be sent."},
    {"sender_report", (PyCFunction)Stream_sender_report, METH_NOARGS,
     "sender_report() -> (ntp_time, timestamp, packets_sent, octets_sent) | None: one consistent reading "
     "for an RTCP SR (None before the first frame)."},
    {NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._egress.Stream",
    .tp_basicsize = sizeof(StreamObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One viewer's outgoing RTP stream of one kind (see relay.egress.EgressStream).",
    .tp_new = Stream_new,
    .tp_init = (initproc)Stream_init,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_traverse = (traverseproc)Stream_traverse,
    .tp_clear = (inquiry)Stream_clear,
    .tp_getset = Stream_getset,
    .tp_methods = Stream_methods,
};

/* -- module functions -------------------------------------------------------------------------- */

static int parse_times(PyObject *timestamp_obj, PyObject *ntp_obj, uint32_t *timestamp, uint64_t *ntp_time)
{
    /* Any int: a rung's 90 kHz timestamp outgrows 32 bits after 13 h; RTP keeps the low 32 bits. */
    if (!PyLong_Check(timestamp_obj) || (ntp_obj != Py_None && !PyLong_Check(ntp_obj))) {
        PyErr_SetString(PyExc_TypeError, "timestamp and ntp_time are ints (ntp_time may be None: now)");
        return -1;
    }
    *timestamp = (uint32_t)PyLong_AsUnsignedLongLongMask(timestamp_obj);
    if (PyErr_Occurred())
        return -1;
    if (ntp_obj == Py_None) {
        *ntp_time = ntp_now();
    } else {
        *ntp_time = PyLong_AsUnsignedLongLongMask(ntp_obj);
        if (PyErr_Occurred())
            return -1;
    }
    return 0;
}

static int check_kind(StreamObject *s, FrameObject *frame)
{
    if (s->vp8 != frame->frame->vp8) {
        PyErr_SetString(PyExc_ValueError, s->vp8 ? "a VP8 stream needs a frame made with vp8=True"
                                                 : "a frame with VP8 picture ids needs a VP8 stream");
        return -1;
    }
    return 0;
}

/* `streams` as a fast sequence of initialised Streams of `frame`'s kind, or NULL with an exception. */
static PyObject *checked_streams(PyObject *streams_obj, FrameObject *frame)
{
    PyObject *seq = PySequence_Fast(streams_obj, "streams must be a sequence of Stream");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(items[i], &StreamType)) {
            PyErr_Format(PyExc_TypeError, "streams[%zd] is not a Stream", i);
            Py_DECREF(seq);
            return NULL;
        }
        StreamObject *st = (StreamObject *)items[i];
        if (check_initialized(st) < 0 || check_kind(st, frame) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    return seq;
}

static PyObject *eg_send_frame(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"streams", "frame", "timestamp", "ntp_time", NULL};
    PyObject *streams_obj, *timestamp_obj, *ntp_obj = Py_None;
    FrameObject *frame;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O|O:send_frame", kwlist, &streams_obj, &FrameType, &frame,
                                     &timestamp_obj, &ntp_obj))
        return NULL;
    uint32_t timestamp;
    uint64_t ntp_time;
    if (parse_times(timestamp_obj, ntp_obj, &timestamp, &ntp_time) < 0)
        return NULL;
    PyObject *seq = checked_streams(streams_obj, frame);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    StreamObject **targets = PyMem_Malloc(sizeof(StreamObject *) * (size_t)(n ? n : 1));
    if (targets == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        StreamObject *s = (StreamObject *)items[i];
        if (claim(s) < 0)
            goto fail;
        if (s->closed) /* a viewer that just left: nothing to send, nothing to count */
            continue;
        s->busy = 1;
        targets[count++] = s;
    }
    eg_arena *arena = count ? arena_new() : NULL;
    if (count && arena == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    unsigned long long sent = 0;
    /* Everything the loop reads is native now; the busy flags keep other send_frame calls off these
     * streams and tx_lock the event loop's retransmit/close/RTCP. */
    PyThreadState *released = (uint64_t)count * frame->frame->count >= EG_GIL_RELEASE_MIN ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        StreamObject *s = targets[i];
        pthread_mutex_lock(&tx_lock);
        if (!s->closed) { /* closed meanwhile by another thread */
            uint64_t before = s->packets_sent;
            send_to_stream(s, frame->frame, timestamp, ntp_time, arena);
            sent += s->packets_sent - before;
        }
        pthread_mutex_unlock(&tx_lock);
    }
    if (released != NULL)
        PyEval_RestoreThread(released);
    if (arena != NULL)
        arena_free(arena);
    for (Py_ssize_t i = 0; i < count; i++)
        targets[i]->busy = 0;
    PyMem_Free(targets);
    Py_DECREF(seq);
    return PyLong_FromUnsignedLongLong(sent);
fail:
    for (Py_ssize_t i = 0; i < count; i++)
        targets[i]->busy = 0;
    PyMem_Free(targets);
    Py_DECREF(seq);
    return NULL;
}

/* -- the send thread: send_frame without the event loop and without the GIL -------------------- *
 *
 * submit() (event loop, GIL held) queues a job: the frame (retained) and the streams (each
 * Py_INCREF'd, so none is freed while queued). One native thread takes the jobs in order and sends
 * them exactly as send_frame does, never touching the GIL: a Python thread had to win the GIL twice
 * per frame (~5 ms each under load, the interpreter's switch interval), which made it fall behind
 * at a few hundred viewers. Streams of finished jobs go on a done list and are released by the next
 * submit/flush/sender_stats call, which holds the GIL. */

typedef struct eg_job {
    struct eg_job *next;
    eg_frame *frame;      /* a rung frame to every stream, or NULL for an RTCP compound: */
    uint8_t *rtcp;        /* clear RTCP for streams[0]'s session, SRTCP-protected by the thread */
    int rtcp_len;
    srtp_protect_fn protect_rtcp;
    uint32_t timestamp;
    uint64_t queued_ns;
    Py_ssize_t count;
    StreamObject *streams[];
} eg_job;

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_ready = PTHREAD_COND_INITIALIZER; /* a job was queued */
static pthread_cond_t queue_idle = PTHREAD_COND_INITIALIZER;  /* nothing queued or running */
static eg_job *queue_head, *queue_tail, *done_head;
static long queue_pending;  /* queued or being sent */
static int sender_running;
/* statistics (queue_lock) */
static unsigned long long sender_frames, sender_packets;
static double sender_delay_s, sender_max_delay_s;

static uint64_t monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

/* Under tx_lock, on the send thread: protect and send one RTCP compound on the stream's session,
 * so aiortc's RTCP never waits for the lock on the event loop. */
static void send_rtcp_locked(StreamObject *s, eg_job *job)
{
    if (s->closed || s->fd < 0)
        return;
    uint8_t packet[EG_SLOT_SIZE] __attribute__((aligned(16)));
    int len = job->rtcp_len;
    memcpy(packet, job->rtcp, (size_t)len);
    if (s->srtp != NULL && (job->protect_rtcp(s->srtp, packet, &len) != 0 || len < job->rtcp_len || len > EG_SLOT_SIZE)) {
        s->srtp_errors++;
        return;
    }
    ssize_t r;
    do
        r = sendto(s->fd, packet, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&s->addr, s->addr_len);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        s->send_errors++;
        s->last_errno = errno;
        return;
    }
    s->rtcp_sent++;
}

static void *sender_main(void *unused)
{
    eg_arena *arena = arena_new();
    for (;;) {
        pthread_mutex_lock(&queue_lock);
        while (queue_head == NULL)
            pthread_cond_wait(&queue_ready, &queue_lock);
        eg_job *job = queue_head;
        queue_head = job->next;
        if (queue_head == NULL)
            queue_tail = NULL;
        pthread_mutex_unlock(&queue_lock);

        if (job->rtcp != NULL) {
            pthread_mutex_lock(&tx_lock);
            send_rtcp_locked(job->streams[0], job);
            pthread_mutex_unlock(&tx_lock);
            pthread_mutex_lock(&queue_lock);
            job->next = done_head;
            done_head = job;
            if (--queue_pending == 0)
                pthread_cond_broadcast(&queue_idle);
            pthread_mutex_unlock(&queue_lock);
            continue;
        }
        double waited = (double)(monotonic_ns() - job->queued_ns) / 1e9;
        uint64_t ntp_time = ntp_now();
        unsigned long long sent = 0;
        for (Py_ssize_t i = 0; i < job->count && arena != NULL; i++) {
            StreamObject *st = job->streams[i];
            pthread_mutex_lock(&tx_lock);
            if (!st->closed) {
                uint64_t before = st->packets_sent;
                send_to_stream(st, job->frame, job->timestamp, ntp_time, arena);
                sent += st->packets_sent - before;
            }
            pthread_mutex_unlock(&tx_lock);
            let_waiters_in();
        }
        frame_release(job->frame);
        job->frame = NULL;

        pthread_mutex_lock(&queue_lock);
        job->next = done_head;
        done_head = job;
        sender_frames++;
        sender_packets += sent;
        sender_delay_s += 0.05 * (waited - sender_delay_s);
        if (waited > sender_max_delay_s)
            sender_max_delay_s = waited;
        if (--queue_pending == 0)
            pthread_cond_broadcast(&queue_idle);
        pthread_mutex_unlock(&queue_lock);
    }
    return NULL;
}

/* GIL held: drop the references of finished jobs. */
static void release_done(void)
{
    pthread_mutex_lock(&queue_lock);
    eg_job *job = done_head;
    done_head = NULL;
    pthread_mutex_unlock(&queue_lock);
    while (job != NULL) {
        eg_job *next = job->next;
        for (Py_ssize_t i = 0; i < job->count; i++)
            Py_DECREF(job->streams[i]);
        PyMem_RawFree(job->rtcp);
        PyMem_RawFree(job);
        job = next;
    }
}

static int start_sender(void)
{
    if (sender_running)
        return 0;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&thread, &attr, sender_main, NULL);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_setname_np(thread, "native-egress");
    sender_running = 1;
    return 0;
}

static void enqueue(eg_job *job)
{
    job->queued_ns = monotonic_ns();
    pthread_mutex_lock(&queue_lock);
    if (queue_tail == NULL)
        queue_head = job;
    else
        queue_tail->next = job;
    queue_tail = job;
    queue_pending++;
    pthread_cond_signal(&queue_ready);
    pthread_mutex_unlock(&queue_lock);
}

static PyObject *eg_submit(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"streams", "frame", "timestamp", NULL};
    PyObject *streams_obj, *timestamp_obj;
    FrameObject *frame;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O:submit", kwlist, &streams_obj, &FrameType, &frame,
                                     &timestamp_obj))
        return NULL;
    release_done();
    uint32_t timestamp;
    uint64_t unused_ntp;
    if (parse_times(timestamp_obj, Py_None, &timestamp, &unused_ntp) < 0)
        return NULL;
    PyObject *seq = checked_streams(streams_obj, frame);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (start_sender() < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    eg_job *job = PyMem_RawMalloc(sizeof(eg_job) + sizeof(StreamObject *) * (size_t)(n ? n : 1));
    if (job == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    job->next = NULL;
    job->rtcp = NULL;
    job->count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        StreamObject *st = (StreamObject *)items[i];
        if (st->closed) /* a viewer that just left */
            continue;
        Py_INCREF(st);
        job->streams[job->count++] = st;
    }
    Py_DECREF(seq);
    frame_retain(frame->frame);
    job->frame = frame->frame;
    job->timestamp = timestamp;
    enqueue(job);
    Py_RETURN_NONE;
}

/* submit_rtcp(stream, protect_rtcp_fn, packet): aiortc's clear RTCP compound for the stream's
 * session, protected (srtp_protect_rtcp, by address) and sent by the send thread, in order with
 * the frames queued before it. Dropped if the stream is closed by then. */
static PyObject *eg_submit_rtcp(PyObject *module, PyObject *args)
{
    StreamObject *st;
    unsigned long long fn_address;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "O!Ky*:submit_rtcp", &StreamType, &st, &fn_address, &data))
        return NULL;
    release_done();
    if (data.len < 8 || data.len > EG_MAX_DATAGRAM || (st->srtp != NULL && fn_address == 0)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "submit_rtcp needs an RTCP compound of one datagram and a protect function");
        return NULL;
    }
    if (check_initialized(st) < 0 || start_sender() < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    eg_job *job = PyMem_RawMalloc(sizeof(eg_job) + sizeof(StreamObject *));
    uint8_t *copy = PyMem_RawMalloc((size_t)data.len);
    if (job == NULL || copy == NULL) {
        PyMem_RawFree(job);
        PyMem_RawFree(copy);
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    memcpy(copy, data.buf, (size_t)data.len);
    job->next = NULL;
    job->frame = NULL;
    job->rtcp = copy;
    job->rtcp_len = (int)data.len;
    job->protect_rtcp = (srtp_protect_fn)(uintptr_t)fn_address;
    job->count = 1;
    Py_INCREF(st);
    job->streams[0] = st;
    PyBuffer_Release(&data);
    enqueue(job);
    Py_RETURN_NONE;
}

static PyObject *eg_flush(PyObject *module, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    long long ns = (long long)deadline.tv_nsec + (long long)(timeout * 1e9);
    deadline.tv_sec += (time_t)(ns / 1000000000LL);
    deadline.tv_nsec = (long)(ns % 1000000000LL);
    int idle;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&queue_lock);
    int err = 0;
    while (queue_pending > 0 && err == 0)
        err = pthread_cond_timedwait(&queue_idle, &queue_lock, &deadline);
    idle = queue_pending == 0;
    pthread_mutex_unlock(&queue_lock);
    Py_END_ALLOW_THREADS
    release_done();
    return PyBool_FromLong(idle);
}

static PyObject *eg_sender_stats(PyObject *module, PyObject *unused)
{
    release_done();
    pthread_mutex_lock(&queue_lock);
    long pending = queue_pending;
    unsigned long long frames = sender_frames, packets = sender_packets;
    double delay = sender_delay_s, worst = sender_max_delay_s;
    sender_max_delay_s = 0.0;
    pthread_mutex_unlock(&queue_lock);
    return Py_BuildValue("{s:l,s:K,s:K,s:d,s:d}", "pending", pending, "frames_sent", frames, "packets_sent",
                         packets, "delay_s", delay, "max_delay_s", worst);
}

static PyObject *eg_clear_packets(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"stream", "frame", "timestamp", "ntp_time", NULL};
    StreamObject *s;
    FrameObject *frame;
    PyObject *timestamp_obj, *ntp_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OO:clear_packets", kwlist, &StreamType, &s, &FrameType,
                                     &frame, &timestamp_obj, &ntp_obj))
        return NULL;
    uint32_t timestamp;
    uint64_t ntp_time;
    if (parse_times(timestamp_obj, ntp_obj, &timestamp, &ntp_time) < 0 || claim(s) < 0 ||
        check_kind(s, frame) < 0)
        return NULL;
    if (s->closed) {
        PyErr_SetString(PyExc_ValueError, "stream is closed");
        return NULL;
    }
    eg_frame *f = frame->frame;
    eg_frame_header h;
    if (!begin_frame(s, f, timestamp, ntp_time, &h))
        return PyList_New(0);
    PyObject *out = PyList_New(f->count);
    if (out == NULL)
        return NULL;
    uint8_t packet[EG_SLOT_SIZE];
    for (uint32_t i = 0; i < f->count; i++) {
        uint16_t seq = s->next_sequence_number++;
        remember(s, f, i, seq, h.timestamp, h.picture_id, h.abs_send_time);
        size_t len = write_packet(s, f, i, seq, h.timestamp, h.picture_id, h.ext, h.ext_len, packet);
        PyObject *b = PyBytes_FromStringAndSize((const char *)packet, (Py_ssize_t)len);
        if (b == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, b);
    }
    return out;
}

static PyObject *eg_clear_retransmission(PyObject *module, PyObject *args)
{
    StreamObject *s;
    long long seq;
    if (!PyArg_ParseTuple(args, "O!L:clear_retransmission", &StreamType, &s, &seq))
        return NULL;
    if (check_initialized(s) < 0)
        return NULL;
    uint8_t packet[EG_SLOT_SIZE];
    eg_frame *frame;
    size_t len = 0;
    WITH_TX_LOCK(len = s->closed ? 0 : rebuild(s, seq, packet, &frame));
    if (len == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)packet, (Py_ssize_t)len);
}

/* protect_locked(protect_fn, srtp, data): libsrtp's srtp_protect or srtp_protect_rtcp (the
 * address of either, same signature) on one session under tx_lock, the way pylibsrtp's
 * Session.protect/protect_rtcp call it: a buffer with the trailer's room, the length in and out. */
static PyObject *eg_protect_locked(PyObject *module, PyObject *args)
{
    unsigned long long fn_address, session_address;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "KKy*:protect_locked", &fn_address, &session_address, &data))
        return NULL;
    if (fn_address == 0 || session_address == 0 || data.len > EG_MAX_DATAGRAM) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "protect_locked needs a function, a session and at most one datagram");
        return NULL;
    }
    uint8_t packet[EG_SLOT_SIZE] __attribute__((aligned(16)));
    memcpy(packet, data.buf, (size_t)data.len);
    int len = (int)data.len;
    PyBuffer_Release(&data);
    srtp_protect_fn protect = (srtp_protect_fn)(uintptr_t)fn_address;
    int status = 0;
    WITH_TX_LOCK(status = protect((void *)(uintptr_t)session_address, packet, &len));
    if (status != 0)
        return PyErr_Format(PyExc_RuntimeError, "srtp protect failed (libsrtp status %d)", status);
    if (len < 0 || len > EG_SLOT_SIZE)
        return PyErr_Format(PyExc_RuntimeError, "srtp protect returned length %d", len);
    return PyBytes_FromStringAndSize((const char *)packet, len);
}

static PyObject *eg_live_frame_buffers(PyObject *module, PyObject *unused)
{
    return PyLong_FromLong(atomic_load(&live_frame_buffers));
}

static PyObject *eg_ntp_now(PyObject *module, PyObject *unused) { return PyLong_FromUnsignedLongLong(ntp_now()); }

static PyMethodDef module_methods[] = {
    {"send_frame", (PyCFunction)(void (*)(void))eg_send_frame, METH_VARARGS | METH_KEYWORDS,
     "send_frame(streams, frame, timestamp, ntp_time=None) -> int: the frame to every open stream, one "
     "sendmmsg per stream (per 64 packets), GIL released; returns the packets the kernel took."},
    {"clear_packets", (PyCFunction)(void (*)(void))eg_clear_packets, METH_VARARGS | METH_KEYWORDS,
     "clear_packets(stream, frame, timestamp, ntp_time) -> list[bytes]: advance the stream exactly like "
     "send_frame but return the clear packets instead of protecting and sending them (tests)."},
    {"clear_retransmission", eg_clear_retransmission, METH_VARARGS,
     "clear_retransmission(stream, seq) -> bytes | None: the clear packet retransmit(seq) would send (tests)."},
    {"submit", (PyCFunction)(void (*)(void))eg_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(streams, frame, timestamp) -> None: send_frame on the native send thread, in submission "
     "order; abs-send-time is taken when the frame goes out."},
    {"submit_rtcp", eg_submit_rtcp, METH_VARARGS,
     "submit_rtcp(stream, protect_rtcp_fn, packet) -> None: SRTCP-protect and send an RTCP compound on "
     "the stream's session from the send thread, after the frames queued before it."},
    {"flush", eg_flush, METH_O, "flush(timeout_s) -> bool: wait until every submitted frame was sent."},
    {"sender_stats", eg_sender_stats, METH_NOARGS,
     "sender_stats() -> dict: pending, frames_sent, packets_sent, delay_s (smoothed queue wait), "
     "max_delay_s (since the previous call)."},
    {"protect_locked", eg_protect_locked, METH_VARARGS,
     "protect_locked(protect_fn, srtp, data) -> bytes: srtp_protect(_rtcp) at protect_fn on session srtp "
     "(addresses), under the lock the native senders hold (aiortc's RTCP on a session they use)."},
    {"live_frame_buffers", eg_live_frame_buffers, METH_NOARGS,
     "Native frame buffers alive in this process (leak checks)."},
    {"ntp_now", eg_ntp_now, METH_NOARGS, "The current time as a 64-bit NTP timestamp (CLOCK_REALTIME)."},
    {NULL},
};

static struct PyModuleDef egress_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._egress",
    .m_doc = "Native per-viewer RTP egress: header, picture id, SRTP, sendmmsg (see relay.egress).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__egress(void)
{
    if (PyType_Ready(&FrameType) < 0 || PyType_Ready(&StreamType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&egress_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Frame", (PyObject *)&FrameType) < 0 ||
        PyModule_AddObjectRef(m, "Stream", (PyObject *)&StreamType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PAYLOAD", EG_MAX_PAYLOAD) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DATAGRAM", EG_MAX_DATAGRAM) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PAYLOADS", EG_MAX_PAYLOADS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HISTORY", EG_MAX_HISTORY) < 0 ||
        PyModule_AddIntConstant(m, "MAX_MID", EG_MAX_MID) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", EG_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
