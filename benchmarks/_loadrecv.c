/* Native receive path for shelfcast's cheap load viewers (benchmarks/loadgen.py).
 *
 * Why this exists: a load viewer must cost far less than the server spends on it (the benchmark
 * measures ~0.001 core-s per viewer-second on the server), and aiortc's receive path (asyncio
 * datagram callback + aioice queue + SRTP unprotect + RTP parse in Python) costs several times the
 * server's own work per packet. Here one thread epolls every viewer's UDP socket, drains it with
 * recvmmsg and reads only the clear RTP header (SRTP leaves it unencrypted): no decryption, no
 * Python per packet. The viewer's RTCP is done here too, since per viewer per second it would cost
 * Python more than all of its RTP costs here: the server's SRTCP sender reports are unprotected
 * (for LSR / DLSR) and a receiver report + REMB is built from the counters, protected and sent about
 * once a second, with the viewer's own libsrtp sessions (aiortc's; pylibsrtp hands us libsrtp's
 * functions and the session pointers; after the take-over nothing else uses those sessions).
 * STUN and DTLS (ICE consent, the DTLS close: well under one datagram per second per viewer) go
 * to a bounded queue that Python drains: it answers consent checks itself and hands the rest to aioice.
 *
 * Built at run time by loadgen.py (cc -O2 -shared -fPIC) and called through ctypes, which releases
 * the GIL for the duration of each call. Every entry point that touches shared state takes `lock`;
 * the poll thread holds it only while it processes one round of ready sockets, never while it
 * waits in epoll_wait, so Python's calls wait at most one round.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LR_VIDEO 0
#define LR_AUDIO 1
#define LR_KINDS 2
#define LR_KIND_OTHER 255

/* Frame lateness histogram: upper edges in milliseconds; the last bucket is everything above. */
#define LR_HIST_BUCKETS 9
static const double lr_hist_edges_ms[LR_HIST_BUCKETS - 1] = {10, 20, 50, 100, 200, 500, 1000, 2000};

#define LR_BATCH 64         /* datagrams per recvmmsg call */
#define LR_MAX_DGRAM 2048   /* larger than any datagram on a 1500-byte path */
#define LR_MAX_GRO 65536    /* a UDP_GRO read: a whole GSO run of datagrams, up to 64 KiB */
#ifndef UDP_GRO
#define UDP_GRO 104         /* linux/udp.h, Linux >= 5.0 */
#endif
#define LR_EVENTS 512
#define LR_DRAINS_PER_FD 8  /* recvmmsg calls per socket per round: bounds one busy socket's share */
#define LR_QUEUE 2048       /* control datagrams Python has not drained yet */
#define LR_SR_SLOTS 4

/* --- public structs (mirrored by ctypes in loadgen.py: keep the field order) ------------------ */

typedef struct {
    uint64_t packets;
    uint64_t bytes;
    uint64_t expected;      /* sum over every SSRC seen: extended highest seq - first seq + 1 */
    int64_t lost;           /* expected - received (RFC 3550 cumulative; duplicates make it lower) */
    uint64_t ssrc_changes;
    uint32_t ssrc;          /* current SSRC (0 before the first packet) */
    uint32_t highest_seq;   /* extended highest sequence number of the current SSRC */
    uint32_t jitter;        /* RFC 3550 interarrival jitter, timestamp units */
    uint32_t _pad;
    uint64_t frames;        /* video: marker packets whose frame arrived whole */
    uint64_t frames_incomplete; /* video: marker packets with a sequence gap since the previous one */
    uint64_t frames_on_time;    /* whole frames with lateness <= on_time threshold */
    uint64_t frames_late;
    uint64_t lateness_hist[LR_HIST_BUCKETS];
    double window_max_lateness_ms;  /* maxima since the last read with reset_window */
    double window_max_frame_gap_ms;
} lr_counters;

typedef struct {
    int32_t fd;
    int32_t viewer;
    int32_t len;
    uint16_t port;
    uint16_t family;
    int64_t arrival_ns;  /* CLOCK_REALTIME, kernel receive time when available */
    char host[64];
    uint8_t data[LR_MAX_DGRAM];
} lr_control;

/* --- internal state ---------------------------------------------------------------------------- */

typedef struct {
    lr_counters c;
    int have;              /* a packet of the current SSRC was seen */
    uint16_t max_seq;
    uint32_t cycles;       /* multiples of 65536 added to max_seq */
    uint32_t base_seq;     /* extended seq of the current SSRC's first packet */
    uint64_t received;     /* packets of the current SSRC */
    uint64_t expected_done;  /* folded in from previous SSRCs */
    int64_t lost_done_signed;
    /* interval state for the receiver report's fraction lost */
    uint64_t rr_expected_prior, rr_received_prior;
    /* jitter */
    double jitter;
    uint32_t last_transit;
    int have_transit;
    /* timestamp unwrapping (video frames) */
    uint32_t last_ts;
    int64_t ts_ext;
    /* frames */
    uint32_t last_marker_seq;  /* extended seq of the previous marker (base_seq - 1 at start) */
    uint64_t packets_since_marker;
    double min_transit_s;
    int have_min_transit;
    int64_t last_marker_ns;
} lr_stream;

typedef struct {
    uint32_t ssrc;
    uint32_t lsr;
    int64_t arrival_ns;
} lr_sr;

typedef struct {
    int used;
    uint8_t pt_kind[128];
    uint32_t clock_rate[LR_KINDS];
    lr_stream s[LR_KINDS];
    uint64_t other_packets, other_bytes, control;
    uint64_t srtcp, srtcp_errors, sender_reports, rtcp_sent, rtcp_send_errors;
    lr_sr sr[LR_SR_SLOTS];
    int sr_next;
} lr_viewer;

/* libsrtp 2: srtp_err_status_t srtp_(un)protect_rtcp(srtp_t ctx, void *hdr, int *len); 0 = ok */
typedef int (*lr_srtp_fn)(void *ctx, void *hdr, int *len);

typedef struct {
    int fd;
    int viewer;
    uint32_t gen;
    int active;
    /* RTCP, once lr_set_rtcp has been called */
    void *rx_ctx, *tx_ctx;
    lr_srtp_fn unprotect_rtcp, protect_rtcp;
    struct sockaddr_storage remote;
    socklen_t remote_len;
    uint32_t sender_ssrc;
    uint64_t remb_bps;
    int64_t interval_ns;    /* 0: no reports from here */
    int64_t next_report_ns; /* CLOCK_MONOTONIC */
} lr_attachment;

typedef struct {  /* mirrored by ctypes */
    uint64_t other_packets, other_bytes;  /* RTP of payload types that are neither video nor audio */
    uint64_t control, control_dropped;    /* datagrams queued for Python / dropped, queue full */
    uint64_t srtcp, srtcp_errors, sender_reports;
    uint64_t rtcp_sent, rtcp_send_errors;
    uint64_t rounds, recv_calls;
    uint64_t gro_reads;                   /* reads that carried a GSO run of several datagrams */
} lr_misc_counters;

typedef struct {
    pthread_mutex_t lock;
    pthread_t thread;
    int thread_started;
    volatile int stop;
    int epfd;
    int notify_fd;          /* eventfd: written when the control queue goes from empty to non-empty */
    int batch_us;           /* pause between rounds, so each recvmmsg finds several datagrams */
    int gro;                /* sockets take GSO runs whole (UDP_GRO); then slot = LR_MAX_GRO */
    size_t slot;            /* bytes per recvmmsg buffer */
    double on_time_ms;
    lr_viewer *viewers;
    int n_viewers, cap_viewers;
    lr_attachment *att;
    int n_att, cap_att;
    uint32_t gen;
    lr_control *queue;
    int q_head, q_len;
    uint64_t control_dropped;
    uint64_t rounds, recv_calls, gro_reads;
    int reporters;          /* attachments that send RTCP: the poll loop wakes for them */
    int64_t next_scan_ns;
    uint32_t spread;        /* spreads the viewers' report times over the interval */
    uint8_t rtcp_buf[LR_MAX_DGRAM];
    /* recvmmsg buffers, used only by the poll thread */
    struct mmsghdr msgs[LR_BATCH];
    struct iovec iov[LR_BATCH];
    struct sockaddr_storage addrs[LR_BATCH];
    char cbuf[LR_BATCH][64];
    uint8_t *bufs;          /* LR_BATCH slots of `slot` bytes */
} lr_handle;

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static int64_t now_realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t now_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* --- RTP accounting ---------------------------------------------------------------------------- */

static void stream_restart(lr_stream *s, uint32_t ssrc, uint16_t seq, uint32_t ts) {
    if (s->have) {  /* keep what the previous SSRC lost; start the new one from zero */
        s->expected_done += (uint64_t)(s->cycles + s->max_seq) - s->base_seq + 1;
        s->lost_done_signed += (int64_t)((uint64_t)(s->cycles + s->max_seq) - s->base_seq + 1) - (int64_t)s->received;
        s->c.ssrc_changes++;
    }
    s->have = 1;
    s->c.ssrc = ssrc;
    s->max_seq = seq;
    s->cycles = 0;
    s->base_seq = seq;
    s->received = 0;
    s->rr_expected_prior = 0;
    s->rr_received_prior = 0;
    s->have_transit = 0;
    s->jitter = 0;
    s->last_ts = ts;
    s->ts_ext = ts;
    s->last_marker_seq = (uint32_t)seq - 1;  /* the stream starts at its first packet */
    s->packets_since_marker = 0;
    s->have_min_transit = 0;
    s->last_marker_ns = 0;
}

static void update_totals(lr_stream *s) {
    uint64_t expected = (uint64_t)(s->cycles + s->max_seq) - s->base_seq + 1;
    s->c.expected = s->expected_done + expected;
    s->c.lost = s->lost_done_signed + (int64_t)expected - (int64_t)s->received;
    s->c.highest_seq = s->cycles + s->max_seq;
    s->c.jitter = (uint32_t)s->jitter;
}

static void on_video_frame(lr_handle *h, lr_stream *s, uint32_t seq_ext, int64_t arrival_ns) {
    int whole = s->packets_since_marker == (uint64_t)(uint32_t)(seq_ext - s->last_marker_seq);
    s->last_marker_seq = seq_ext;
    s->packets_since_marker = 0;
    /* transit = arrival - capture (in the sender's 90 kHz clock): its offset is unknown but fixed,
     * so the frame's lateness is its transit above the least transit seen on this SSRC. */
    double transit = (double)arrival_ns / 1e9 - (double)s->ts_ext / 90000.0;
    if (!s->have_min_transit || transit < s->min_transit_s) {
        s->min_transit_s = transit;
        s->have_min_transit = 1;
    }
    double lateness_ms = (transit - s->min_transit_s) * 1000.0;
    if (s->last_marker_ns) {
        double gap_ms = (double)(arrival_ns - s->last_marker_ns) / 1e6;
        if (gap_ms > s->c.window_max_frame_gap_ms) s->c.window_max_frame_gap_ms = gap_ms;
    }
    s->last_marker_ns = arrival_ns;
    if (!whole) {
        s->c.frames_incomplete++;
        return;
    }
    s->c.frames++;
    if (lateness_ms > s->c.window_max_lateness_ms) s->c.window_max_lateness_ms = lateness_ms;
    int b = 0;
    while (b < LR_HIST_BUCKETS - 1 && lateness_ms > lr_hist_edges_ms[b]) b++;
    s->c.lateness_hist[b]++;
    if (lateness_ms <= h->on_time_ms) s->c.frames_on_time++;
    else s->c.frames_late++;
}

static void on_rtp(lr_handle *h, lr_viewer *v, const uint8_t *p, int len, int64_t arrival_ns) {
    uint8_t pt = p[1] & 0x7f;
    uint8_t kind = v->pt_kind[pt];
    if (kind >= LR_KINDS) {  /* RTX, FEC, padding probes...: counted, not sequenced */
        v->other_packets++;
        v->other_bytes += (uint64_t)len;
        return;
    }
    lr_stream *s = &v->s[kind];
    uint16_t seq = be16(p + 2);
    uint32_t ts = be32(p + 4);
    uint32_t ssrc = be32(p + 8);
    int marker = p[1] >> 7;
    s->c.packets++;
    s->c.bytes += (uint64_t)len;
    if (!s->have || ssrc != s->c.ssrc) stream_restart(s, ssrc, seq, ts);

    /* extended sequence number of this packet (RFC 3550 A.1, without probation) */
    uint16_t udelta = (uint16_t)(seq - s->max_seq);
    uint32_t seq_ext;
    if (udelta < 0x8000) {  /* in order, maybe after a gap */
        if (seq < s->max_seq) s->cycles += 65536;
        s->max_seq = seq;
        seq_ext = s->cycles + seq;
        s->ts_ext += (int32_t)(ts - s->last_ts);
        s->last_ts = ts;
    } else {  /* late or duplicate: it belongs to this or the previous cycle */
        seq_ext = (seq > s->max_seq && s->cycles >= 65536) ? s->cycles - 65536 + seq : s->cycles + seq;
    }
    s->received++;
    /* a straggler of an earlier frame must not make the current frame look overfull */
    if ((int32_t)(seq_ext - s->last_marker_seq) > 0) s->packets_since_marker++;

    /* interarrival jitter, in the stream's timestamp units */
    uint32_t rate = v->clock_rate[kind];
    if (rate) {
#ifdef __SIZEOF_INT128__
        uint32_t arrival_units = (uint32_t)(uint64_t)((__int128)arrival_ns * rate / 1000000000LL);
#else
        uint32_t arrival_units = (uint32_t)(uint64_t)((long double)arrival_ns * rate / 1e9L);
#endif
        uint32_t transit = arrival_units - ts;
        if (s->have_transit) {
            int32_t d = (int32_t)(transit - s->last_transit);
            if (d < 0) d = -d;
            s->jitter += ((double)d - s->jitter) / 16.0;
        }
        s->last_transit = transit;
        s->have_transit = 1;
    }
    if (kind == LR_VIDEO && marker && udelta < 0x8000) on_video_frame(h, s, seq_ext, arrival_ns);
    update_totals(s);
}

/* RFC 5761 demultiplexing (RFC 7983 ranges for the first byte). */
static int is_rtp(const uint8_t *p, int len) {
    if (len < 12 || p[0] < 128 || p[0] > 191) return 0;
    uint8_t pt = p[1] & 0x7f;
    return !(pt >= 64 && pt <= 95);  /* 192-223 with the marker bit: RTCP */
}

static void push_control(lr_handle *h, int fd, int viewer, const uint8_t *p, int len,
                         const struct sockaddr_storage *addr, int64_t arrival_ns) {
    if (len > LR_MAX_DGRAM) return;
    if (h->q_len >= LR_QUEUE) {
        h->control_dropped++;
        return;
    }
    lr_control *e = &h->queue[(h->q_head + h->q_len) % LR_QUEUE];
    e->fd = fd;
    e->viewer = viewer;
    e->len = len;
    e->arrival_ns = arrival_ns;
    memcpy(e->data, p, (size_t)len);
    e->host[0] = 0;
    e->port = 0;
    e->family = 0;
    if (addr) {
        e->family = addr->ss_family;
        if (addr->ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
            inet_ntop(AF_INET, &a->sin_addr, e->host, sizeof e->host);
            e->port = ntohs(a->sin_port);
        } else if (addr->ss_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
            inet_ntop(AF_INET6, &a->sin6_addr, e->host, sizeof e->host);
            e->port = ntohs(a->sin6_port);
        }
    }
    int was_empty = h->q_len == 0;
    h->q_len++;
    if (was_empty && h->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t unused = write(h->notify_fd, &one, sizeof one);
        (void)unused;
    }
}

/* --- RTCP ------------------------------------------------------------------------------------------ */

static void note_sr_locked(lr_viewer *v, uint32_t ssrc, uint32_t lsr, int64_t arrival_ns) {
    int slot = -1;
    for (int i = 0; i < LR_SR_SLOTS; i++)
        if (v->sr[i].arrival_ns && v->sr[i].ssrc == ssrc) slot = i;
    if (slot < 0) {
        slot = v->sr_next;
        v->sr_next = (v->sr_next + 1) % LR_SR_SLOTS;
    }
    v->sr[slot].ssrc = ssrc;
    v->sr[slot].lsr = lsr;
    v->sr[slot].arrival_ns = arrival_ns ? arrival_ns : now_realtime_ns();
}

/* Each sender report of a clear compound RTCP packet: note the middle 32 bits of its NTP time. */
static void on_clear_rtcp(lr_viewer *v, const uint8_t *p, int len, int64_t arrival_ns) {
    int offset = 0;
    while (offset + 4 <= len) {
        int plen = (be16(p + offset + 2) + 1) * 4;
        if (p[offset + 1] == 200 && offset + 16 <= len) {  /* SR */
            uint32_t ssrc = be32(p + offset + 4);
            uint32_t lsr = ((be32(p + offset + 8) & 0xffffu) << 16) | (be32(p + offset + 12) >> 16);
            note_sr_locked(v, ssrc, lsr, arrival_ns);
            v->sender_reports++;
        }
        offset += plen;
    }
}

/* REMB (draft-alvestrand-rmcat-remb) bitrate: 6-bit exponent, 18-bit mantissa. */
static void remb_encode(uint64_t bps, uint8_t *exp, uint32_t *mantissa) {
    uint8_t e = 0;
    while (bps >= (1u << 18) && e < 63) {
        bps >>= 1;
        e++;
    }
    *exp = e;
    *mantissa = (uint32_t)bps;
}

/* Compound RTCP from a viewer's counters: RR (a block per stream seen) and, with remb_bps > 0, REMB
 * for the video SSRC. Clear text. Returns its length, 0 before any RTP, -1 if cap is too small. */
static int build_rtcp_locked(lr_viewer *v, uint32_t sender_ssrc, uint64_t remb_bps, uint8_t *out, int cap) {
    if (cap < 8 + 24 * LR_KINDS + 24) return -1;
    int64_t now = now_realtime_ns();
    int blocks = 0;
    uint8_t *p = out + 8;
    for (int k = 0; k < LR_KINDS; k++) {
        lr_stream *s = &v->s[k];
        if (!s->have) continue;
        uint64_t expected = (uint64_t)(s->cycles + s->max_seq) - s->base_seq + 1;
        uint64_t exp_interval = expected - s->rr_expected_prior;
        int64_t lost_interval = (int64_t)exp_interval - (int64_t)(s->received - s->rr_received_prior);
        s->rr_expected_prior = expected;
        s->rr_received_prior = s->received;
        uint32_t fraction = (exp_interval == 0 || lost_interval <= 0) ? 0 : (uint32_t)((lost_interval << 8) / (int64_t)exp_interval);
        if (fraction > 255) fraction = 255;
        int64_t lost = s->lost_done_signed + (int64_t)expected - (int64_t)s->received;
        if (lost > 0x7fffff) lost = 0x7fffff;
        if (lost < -0x800000) lost = -0x800000;
        uint32_t lsr = 0, dlsr = 0;
        for (int i = 0; i < LR_SR_SLOTS; i++) {
            if (v->sr[i].arrival_ns && v->sr[i].ssrc == s->c.ssrc) {
                lsr = v->sr[i].lsr;
                double delay = (double)(now - v->sr[i].arrival_ns) / 1e9;
                if (delay > 0 && delay < 65536) dlsr = (uint32_t)(delay * 65536.0);
            }
        }
        put32(p, s->c.ssrc);
        p[4] = (uint8_t)fraction;
        p[5] = (uint8_t)((uint32_t)lost >> 16);
        p[6] = (uint8_t)((uint32_t)lost >> 8);
        p[7] = (uint8_t)lost;
        put32(p + 8, s->cycles + s->max_seq);
        put32(p + 12, (uint32_t)s->jitter);
        put32(p + 16, lsr);
        put32(p + 20, dlsr);
        p += 24;
        blocks++;
    }
    if (blocks == 0) return 0;
    out[0] = (uint8_t)(0x80 | blocks);
    out[1] = 201;  /* RR */
    put16(out + 2, (uint32_t)((p - out) / 4 - 1));
    put32(out + 4, sender_ssrc);
    if (remb_bps > 0 && v->s[LR_VIDEO].have) {
        uint8_t e;
        uint32_t m;
        remb_encode(remb_bps, &e, &m);
        p[0] = 0x80 | 15;  /* PSFB, FMT 15: application layer feedback */
        p[1] = 206;
        put16(p + 2, 5);   /* 6 words */
        put32(p + 4, sender_ssrc);
        put32(p + 8, 0);   /* media source: always 0 for REMB */
        memcpy(p + 12, "REMB", 4);
        p[16] = 1;         /* one SSRC */
        p[17] = (uint8_t)((e << 2) | (m >> 16));
        put16(p + 18, m & 0xffff);
        put32(p + 20, v->s[LR_VIDEO].c.ssrc);
        p += 24;
    }
    return (int)(p - out);
}

/* Every attachment whose report is due: build, SRTCP-protect, send (caller holds the lock). */
static void send_due_reports(lr_handle *h, int64_t now) {
    for (int i = 0; i < h->n_att; i++) {
        lr_attachment *a = &h->att[i];
        if (!a->active || !a->interval_ns || now < a->next_report_ns) continue;
        a->next_report_ns += a->interval_ns;
        if (a->next_report_ns < now) a->next_report_ns = now + a->interval_ns;  /* fell behind: no burst */
        lr_viewer *v = &h->viewers[a->viewer];
        /* leave room for the SRTCP trailer (index + tag, at most 4 + 16 + 128 bytes) */
        int n = build_rtcp_locked(v, a->sender_ssrc, a->remb_bps, h->rtcp_buf, LR_MAX_DGRAM - 160);
        if (n <= 0) continue;
        if (a->protect_rtcp(a->tx_ctx, h->rtcp_buf, &n) != 0) {
            v->rtcp_send_errors++;
            continue;
        }
        if (sendto(a->fd, h->rtcp_buf, (size_t)n, MSG_DONTWAIT, (struct sockaddr *)&a->remote, a->remote_len) == n)
            v->rtcp_sent++;
        else
            v->rtcp_send_errors++;
    }
}

/* --- classification ------------------------------------------------------------------------------- */

static void process(lr_handle *h, lr_attachment *a, int viewer, const uint8_t *p, int len,
                    const struct sockaddr_storage *addr, int64_t arrival_ns) {
    if (viewer < 0 || viewer >= h->n_viewers || !h->viewers[viewer].used || len <= 0) return;
    lr_viewer *v = &h->viewers[viewer];
    if (is_rtp(p, len)) {
        on_rtp(h, v, p, len, arrival_ns);
        return;
    }
    if (a && a->unprotect_rtcp && len >= 8 && p[0] >= 128 && p[0] <= 191 && len <= LR_MAX_DGRAM) {
        /* SRTCP from the server: its sender reports give LSR / DLSR for our receiver reports. */
        int n = len;
        memcpy(h->rtcp_buf, p, (size_t)len);
        v->srtcp++;
        if (a->unprotect_rtcp(a->rx_ctx, h->rtcp_buf, &n) == 0)
            on_clear_rtcp(v, h->rtcp_buf, n, arrival_ns);
        else
            v->srtcp_errors++;  /* replayed or mangled: aiortc drops those too */
        return;
    }
    v->control++;  /* STUN (0-3), DTLS (20-63), anything else: for Python (consent, or aioice) */
    push_control(h, a ? a->fd : -1, viewer, p, len, addr, arrival_ns);
}

/* --- the poll thread ----------------------------------------------------------------------------- */

/* The kernel's receive time (0 if absent) and, for a UDP_GRO read, the size of its datagrams. */
static int64_t cmsg_arrival_ns(struct msghdr *m, int *gso_size) {
    int64_t arrival = 0;
    *gso_size = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            arrival = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        } else if (c->cmsg_level == IPPROTO_UDP && c->cmsg_type == UDP_GRO) {
            memcpy(gso_size, CMSG_DATA(c), sizeof *gso_size);
        }
    }
    return arrival;
}

static void drain_fd(lr_handle *h, lr_attachment *a) {
    for (int round = 0; round < LR_DRAINS_PER_FD; round++) {
        for (int i = 0; i < LR_BATCH; i++) {
            h->iov[i].iov_base = h->bufs + (size_t)i * h->slot;
            h->iov[i].iov_len = h->slot;
            struct msghdr *m = &h->msgs[i].msg_hdr;
            m->msg_name = &h->addrs[i];
            m->msg_namelen = sizeof h->addrs[i];
            m->msg_iov = &h->iov[i];
            m->msg_iovlen = 1;
            m->msg_control = h->cbuf[i];
            m->msg_controllen = sizeof h->cbuf[i];
            m->msg_flags = 0;
        }
        int n = recvmmsg(a->fd, h->msgs, LR_BATCH, MSG_DONTWAIT, NULL);
        h->recv_calls++;
        if (n <= 0) return;  /* EAGAIN (drained), or an error the socket's owner will see */
        int64_t fallback = 0;
        for (int i = 0; i < n; i++) {
            int gso_size;
            int64_t t = cmsg_arrival_ns(&h->msgs[i].msg_hdr, &gso_size);
            if (!t) t = fallback ? fallback : (fallback = now_realtime_ns());
            const uint8_t *p = h->bufs + (size_t)i * h->slot;
            int len = (int)h->msgs[i].msg_len;
            /* a GSO run read whole: datagrams of gso_size bytes, the last one maybe shorter */
            int step = (gso_size > 0 && gso_size < len) ? gso_size : len;
            if (step < len) h->gro_reads++;
            for (int off = 0; off < len; off += step)
                process(h, a, a->viewer, p + off, (len - off < step) ? len - off : step, &h->addrs[i], t);
        }
        if (n < LR_BATCH) return;
    }
}

#define LR_REPORT_SCAN_NS 10000000LL  /* how often due reports are looked for */

static void *poll_main(void *arg) {
    lr_handle *h = arg;
    struct epoll_event events[LR_EVENTS];
    while (!h->stop) {
        int n = epoll_wait(h->epfd, events, LR_EVENTS, h->reporters ? 10 : 100);
        if (n < 0 && errno != EINTR) break;
        pthread_mutex_lock(&h->lock);
        h->rounds++;
        for (int i = 0; i < n; i++) {
            uint32_t index = (uint32_t)(events[i].data.u64 & 0xffffffffu);
            uint32_t gen = (uint32_t)(events[i].data.u64 >> 32);
            /* An event reported before a detach must not touch the (maybe reused) fd after it. */
            if ((int)index >= h->n_att) continue;
            lr_attachment *a = &h->att[index];
            if (!a->active || a->gen != gen) continue;
            drain_fd(h, a);
        }
        if (h->reporters) {
            int64_t now = now_monotonic_ns();
            if (now >= h->next_scan_ns) {
                send_due_reports(h, now);
                h->next_scan_ns = now + LR_REPORT_SCAN_NS;
            }
        }
        pthread_mutex_unlock(&h->lock);
        if (h->batch_us > 0 && n > 0) {
            struct timespec pause = {h->batch_us / 1000000, (long)(h->batch_us % 1000000) * 1000L};
            nanosleep(&pause, NULL);
        }
    }
    return NULL;
}

/* --- API ------------------------------------------------------------------------------------------- */

lr_handle *lr_create(int batch_us, double on_time_ms, int start_thread, int gro) {
    lr_handle *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    pthread_mutex_init(&h->lock, NULL);
    h->batch_us = batch_us;
    h->gro = gro;
    h->slot = gro ? LR_MAX_GRO : LR_MAX_DGRAM;
    h->bufs = malloc(LR_BATCH * h->slot);
    h->on_time_ms = on_time_ms;
    h->spread = 0x9e3779b9u;
    h->queue = calloc(LR_QUEUE, sizeof *h->queue);
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    h->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!h->queue || !h->bufs || h->epfd < 0 || h->notify_fd < 0) goto fail;
    if (start_thread) {
        if (pthread_create(&h->thread, NULL, poll_main, h) != 0) goto fail;
        h->thread_started = 1;
    }
    return h;
fail:
    if (h->epfd >= 0) close(h->epfd);
    if (h->notify_fd >= 0) close(h->notify_fd);
    free(h->queue);
    free(h->bufs);
    free(h);
    return NULL;
}

/* Stops the thread; every fd must have been detached (they belong to aioice, not to us). */
void lr_destroy(lr_handle *h) {
    if (!h) return;
    h->stop = 1;
    if (h->thread_started) pthread_join(h->thread, NULL);
    close(h->epfd);
    close(h->notify_fd);
    free(h->viewers);
    free(h->att);
    free(h->queue);
    free(h->bufs);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

int lr_notify_fd(lr_handle *h) { return h->notify_fd; }

int lr_add_viewer(lr_handle *h) {
    pthread_mutex_lock(&h->lock);
    if (h->n_viewers == h->cap_viewers) {
        int cap = h->cap_viewers ? h->cap_viewers * 2 : 64;
        lr_viewer *grown = realloc(h->viewers, (size_t)cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&h->lock);
            return -1;
        }
        h->viewers = grown;
        h->cap_viewers = cap;
    }
    int id = h->n_viewers++;
    lr_viewer *v = &h->viewers[id];
    memset(v, 0, sizeof *v);
    memset(v->pt_kind, LR_KIND_OTHER, sizeof v->pt_kind);
    v->used = 1;
    pthread_mutex_unlock(&h->lock);
    return id;
}

/* Which kind (LR_VIDEO, LR_AUDIO, LR_KIND_OTHER) a payload type carries for this viewer, from its SDP. */
int lr_set_payload_kind(lr_handle *h, int viewer, int pt, int kind, uint32_t clock_rate) {
    if (pt < 0 || pt > 127) return -1;
    pthread_mutex_lock(&h->lock);
    if (viewer < 0 || viewer >= h->n_viewers) {
        pthread_mutex_unlock(&h->lock);
        return -1;
    }
    lr_viewer *v = &h->viewers[viewer];
    v->pt_kind[pt] = (uint8_t)kind;
    if (kind >= 0 && kind < LR_KINDS) v->clock_rate[kind] = clock_rate;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

static lr_attachment *find_active(lr_handle *h, int fd) {
    for (int i = 0; i < h->n_att; i++)
        if (h->att[i].active && h->att[i].fd == fd) return &h->att[i];
    return NULL;
}

int lr_attach(lr_handle *h, int viewer, int fd) {
    int on = 1, rcvbuf = 1 << 20;
    /* Kernel receive timestamps: arrival times do not depend on when this thread gets to run. */
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
    /* A deeper queue rides out a slow round (capped by net.core.rmem_max). */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    /* A sender's GSO run arrives as one read instead of one per datagram (the kernel then does not
     * cut it up on the way in either: as with a NIC that segments UDP itself). */
    if (h->gro) setsockopt(fd, IPPROTO_UDP, UDP_GRO, &on, sizeof on);
    pthread_mutex_lock(&h->lock);
    if (viewer < 0 || viewer >= h->n_viewers || find_active(h, fd)) {
        pthread_mutex_unlock(&h->lock);
        return -EINVAL;
    }
    if (h->n_att == h->cap_att) {
        int cap = h->cap_att ? h->cap_att * 2 : 64;
        lr_attachment *grown = realloc(h->att, (size_t)cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&h->lock);
            return -ENOMEM;
        }
        h->att = grown;
        h->cap_att = cap;
    }
    int index = h->n_att++;
    lr_attachment *a = &h->att[index];
    memset(a, 0, sizeof *a);
    a->fd = fd;
    a->viewer = viewer;
    a->gen = ++h->gen;
    a->active = 1;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)a->gen << 32) | (uint32_t)index};
    int rc = epoll_ctl(h->epfd, EPOLL_CTL_ADD, fd, &ev);
    if (rc != 0) {
        a->active = 0;
        rc = -errno;
    }
    pthread_mutex_unlock(&h->lock);
    return rc;
}

/* The attached fd's RTCP: libsrtp sessions and functions, where to send, from which SSRC, how often.
 * The sessions must outlive the attachment (detach before they are freed). */
int lr_set_rtcp(lr_handle *h, int fd, void *rx_ctx, void *tx_ctx, void *unprotect_rtcp, void *protect_rtcp,
                const char *host, int port, uint32_t sender_ssrc, uint64_t remb_bps, int interval_ms) {
    struct sockaddr_storage remote;
    socklen_t remote_len;
    memset(&remote, 0, sizeof remote);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&remote;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&remote;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        remote_len = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        remote_len = sizeof *a6;
    } else {
        return -EINVAL;
    }
    if (!rx_ctx || !tx_ctx || !unprotect_rtcp || !protect_rtcp || interval_ms <= 0) return -EINVAL;
    pthread_mutex_lock(&h->lock);
    lr_attachment *a = find_active(h, fd);
    if (!a) {
        pthread_mutex_unlock(&h->lock);
        return -ENOENT;
    }
    a->rx_ctx = rx_ctx;
    a->tx_ctx = tx_ctx;
    a->unprotect_rtcp = (lr_srtp_fn)unprotect_rtcp;
    a->protect_rtcp = (lr_srtp_fn)protect_rtcp;
    a->remote = remote;
    a->remote_len = remote_len;
    a->sender_ssrc = sender_ssrc;
    a->remb_bps = remb_bps;
    a->interval_ns = (int64_t)interval_ms * 1000000LL;
    /* first report somewhere in the first interval, so reports do not all go out together */
    h->spread = h->spread * 1664525u + 1013904223u;
    a->next_report_ns = now_monotonic_ns() + (int64_t)((h->spread >> 8) % (uint32_t)interval_ms) * 1000000LL;
    h->reporters++;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

static void deactivate(lr_handle *h, lr_attachment *a) {
    a->active = 0;
    if (a->interval_ns) h->reporters--;
    a->interval_ns = 0;
    epoll_ctl(h->epfd, EPOLL_CTL_DEL, a->fd, NULL);
}

/* After this returns, the poll thread never touches fd (nor its SRTP sessions) again. */
int lr_detach(lr_handle *h, int fd) {
    int found = 0;
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->n_att; i++) {
        if (h->att[i].active && h->att[i].fd == fd) {
            deactivate(h, &h->att[i]);
            found++;
        }
    }
    pthread_mutex_unlock(&h->lock);
    return found;
}

/* Detaches every fd of the viewer; its counters stay (totals remain monotonic). */
void lr_remove_viewer(lr_handle *h, int viewer) {
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->n_att; i++)
        if (h->att[i].active && h->att[i].viewer == viewer) deactivate(h, &h->att[i]);
    pthread_mutex_unlock(&h->lock);
}

/* The classifier on one datagram, exactly as the poll thread runs it for a socket without RTCP
 * set up (unit tests, replays). */
void lr_feed(lr_handle *h, int viewer, const uint8_t *data, int len, int64_t arrival_ns) {
    pthread_mutex_lock(&h->lock);
    process(h, NULL, viewer, data, len, NULL, arrival_ns);
    pthread_mutex_unlock(&h->lock);
}

/* Pops up to max control datagrams into out; returns how many. */
int lr_pop_control(lr_handle *h, lr_control *out, int max) {
    uint64_t drained;
    ssize_t unused = read(h->notify_fd, &drained, sizeof drained);  /* re-arm: nonblocking */
    (void)unused;
    pthread_mutex_lock(&h->lock);
    int n = 0;
    while (n < max && h->q_len > 0) {
        out[n++] = h->queue[h->q_head];
        h->q_head = (h->q_head + 1) % LR_QUEUE;
        h->q_len--;
    }
    int left = h->q_len;
    pthread_mutex_unlock(&h->lock);
    if (left > 0) {  /* more than max waiting: make sure Python comes back for the rest */
        uint64_t one = 1;
        unused = write(h->notify_fd, &one, sizeof one);
    }
    return n;
}

int lr_viewer_counters(lr_handle *h, int viewer, int kind, lr_counters *out, int reset_window) {
    if (kind < 0 || kind >= LR_KINDS) return -1;
    pthread_mutex_lock(&h->lock);
    if (viewer < 0 || viewer >= h->n_viewers) {
        pthread_mutex_unlock(&h->lock);
        return -1;
    }
    lr_stream *s = &h->viewers[viewer].s[kind];
    *out = s->c;
    if (reset_window) {
        s->c.window_max_frame_gap_ms = 0;
        s->c.window_max_lateness_ms = 0;
    }
    pthread_mutex_unlock(&h->lock);
    return 0;
}

/* Sum of every viewer's counters of one kind (maxima for the window fields and jitter). */
int lr_totals(lr_handle *h, int kind, lr_counters *out, int reset_window) {
    if (kind < 0 || kind >= LR_KINDS) return -1;
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->n_viewers; i++) {
        lr_counters *c = &h->viewers[i].s[kind].c;
        out->packets += c->packets;
        out->bytes += c->bytes;
        out->expected += c->expected;
        out->lost += c->lost;
        out->ssrc_changes += c->ssrc_changes;
        out->frames += c->frames;
        out->frames_incomplete += c->frames_incomplete;
        out->frames_on_time += c->frames_on_time;
        out->frames_late += c->frames_late;
        for (int b = 0; b < LR_HIST_BUCKETS; b++) out->lateness_hist[b] += c->lateness_hist[b];
        if (c->window_max_lateness_ms > out->window_max_lateness_ms) out->window_max_lateness_ms = c->window_max_lateness_ms;
        if (c->window_max_frame_gap_ms > out->window_max_frame_gap_ms) out->window_max_frame_gap_ms = c->window_max_frame_gap_ms;
        if (c->jitter > out->jitter) out->jitter = c->jitter;
        if (reset_window) {
            c->window_max_lateness_ms = 0;
            c->window_max_frame_gap_ms = 0;
        }
    }
    pthread_mutex_unlock(&h->lock);
    return 0;
}

void lr_misc(lr_handle *h, lr_misc_counters *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->n_viewers; i++) {
        lr_viewer *v = &h->viewers[i];
        out->other_packets += v->other_packets;
        out->other_bytes += v->other_bytes;
        out->control += v->control;
        out->srtcp += v->srtcp;
        out->srtcp_errors += v->srtcp_errors;
        out->sender_reports += v->sender_reports;
        out->rtcp_sent += v->rtcp_sent;
        out->rtcp_send_errors += v->rtcp_send_errors;
    }
    out->control_dropped = h->control_dropped;
    out->rounds = h->rounds;
    out->recv_calls = h->recv_calls;
    out->gro_reads = h->gro_reads;
    pthread_mutex_unlock(&h->lock);
}

/* As a sender report seen by this viewer would (tests; the poll thread notes SRs by itself). */
void lr_note_sr(lr_handle *h, int viewer, uint32_t ssrc, uint32_t lsr, int64_t arrival_ns) {
    pthread_mutex_lock(&h->lock);
    if (viewer >= 0 && viewer < h->n_viewers) note_sr_locked(&h->viewers[viewer], ssrc, lsr, arrival_ns);
    pthread_mutex_unlock(&h->lock);
}

/* The clear compound RTCP the viewer's next report would carry (tests; it advances the interval
 * state for fraction lost, as sending does). */
int lr_build_rtcp(lr_handle *h, int viewer, uint32_t sender_ssrc, uint64_t remb_bps, uint8_t *out, int cap) {
    pthread_mutex_lock(&h->lock);
    int n = (viewer < 0 || viewer >= h->n_viewers) ? -1 : build_rtcp_locked(&h->viewers[viewer], sender_ssrc, remb_bps, out, cap);
    pthread_mutex_unlock(&h->lock);
    return n;
}

/* CPU seconds the poll thread has used (its own clock: exact, unlike /proc's 10 ms ticks). */
double lr_thread_cpu_s(lr_handle *h) {
    clockid_t cid;
    struct timespec ts;
    if (!h->thread_started || pthread_getcpuclockid(h->thread, &cid) != 0 || clock_gettime(cid, &ts) != 0) return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int lr_hist_buckets(void) { return LR_HIST_BUCKETS; }
double lr_hist_edge_ms(int i) { return (i >= 0 && i < LR_HIST_BUCKETS - 1) ? lr_hist_edges_ms[i] : -1; }
int lr_control_size(void) { return (int)sizeof(lr_control); }
int lr_counters_size(void) { return (int)sizeof(lr_counters); }
int lr_misc_size(void) { return (int)sizeof(lr_misc_counters); }
