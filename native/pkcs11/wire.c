/* hsmsim PKCS#11 module, transport half: locating the gateway socket, a pool of connections that
 * all belong to one gateway application, framing and the version handshake.
 * Policy lives in the daemon; this file only moves bytes (docs/gateway-protocol.md). */
#include "hsmsim_pkcs11.h"

#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <sys/un.h>
#include <unistd.h>

/* ---- growable write buffer / bounded read buffer ---------------------------------------- */
void hs_w_init(hs_wbuf *w) {
    w->p = NULL;
    w->len = w->cap = 0;
    w->oom = 0;
}

void hs_w_free(hs_wbuf *w) {
    if (w->p) {
        /* The request may hold a PIN or key material: wipe before freeing. */
        volatile uint8_t *v = w->p;
        for (size_t i = 0; i < w->cap; i++) v[i] = 0;
        free(w->p);
    }
    hs_w_init(w);
}

static int w_reserve(hs_wbuf *w, size_t n) {
    if (w->oom) return 0;
    if (n > SIZE_MAX - w->len) { w->oom = 1; return 0; }
    if (w->len + n <= w->cap) return 1;
    size_t cap = w->cap ? w->cap : 256;
    while (cap < w->len + n) {
        if (cap > SIZE_MAX / 2) { w->oom = 1; return 0; }
        cap *= 2;
    }
    uint8_t *p = malloc(cap);
    if (!p) { w->oom = 1; return 0; }
    if (w->p) {
        memcpy(p, w->p, w->len);
        volatile uint8_t *v = w->p;
        for (size_t i = 0; i < w->cap; i++) v[i] = 0;
        free(w->p);
    }
    w->p = p;
    w->cap = cap;
    return 1;
}

static void w_raw(hs_wbuf *w, const void *d, size_t n) {
    if (!n || !w_reserve(w, n)) return;
    memcpy(w->p + w->len, d, n);
    w->len += n;
}

void hs_w_u8(hs_wbuf *w, uint8_t v) { w_raw(w, &v, 1); }
void hs_w_u16(hs_wbuf *w, uint16_t v) { uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)}; w_raw(w, b, 2); }
void hs_w_u32(hs_wbuf *w, uint32_t v) {
    uint8_t b[4];
    for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i));
    w_raw(w, b, 4);
}
void hs_w_u64(hs_wbuf *w, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    w_raw(w, b, 8);
}
void hs_w_bytes(hs_wbuf *w, const void *data, size_t n) {
    if (n > UINT32_MAX) { w->oom = 1; return; }
    hs_w_u32(w, (uint32_t)n);
    w_raw(w, data, n);
}

static const uint8_t *r_take(hs_rbuf *r, size_t n) {
    if (r->err || n > r->len - r->pos) { r->err = 1; return NULL; }
    const uint8_t *p = r->p + r->pos;
    r->pos += n;
    return p;
}
uint8_t hs_r_u8(hs_rbuf *r) { const uint8_t *p = r_take(r, 1); return p ? p[0] : 0; }
static uint16_t r_u16(hs_rbuf *r) { const uint8_t *p = r_take(r, 2); return p ? (uint16_t)(p[0] | (p[1] << 8)) : 0; }
uint32_t hs_r_u32(hs_rbuf *r) {
    const uint8_t *p = r_take(r, 4);
    uint32_t v = 0;
    if (p) for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
uint64_t hs_r_u64(hs_rbuf *r) {
    const uint8_t *p = r_take(r, 8);
    uint64_t v = 0;
    if (p) for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
const uint8_t *hs_r_bytes(hs_rbuf *r, size_t *n) {
    uint32_t len = hs_r_u32(r);
    const uint8_t *p = r_take(r, len);
    *n = p ? len : 0;
    return p;
}

/* ---- connection pool -------------------------------------------------------------------- */
#define POOL_MAX 64

/* One connection: a Unix socket, or TCP with TLS to a remote daemon. */
typedef struct {
    int fd;
    SSL *ssl;
    unsigned gen; /* the library generation (C_Initialize) it belongs to */
} conn_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_hello_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int g_tls;                  /* remote daemon over TLS */
static char g_host[256], g_port[16], g_server_name[256], g_ca_file[PATH_MAX];
static SSL_CTX *g_ctx;
static conn_t *g_idle[POOL_MAX];
static int g_nidle;
static unsigned g_gen; /* bumped by every C_Initialize/C_Finalize: older connections are dropped */
static uint8_t g_token[HSMSIM_APP_TOKEN_LEN];
static int g_have_token;
static uint32_t g_max_frame = HSMSIM_MAX_FRAME;
static volatile int g_peer_minor;
static uint32_t g_reqid;

static int write_all(conn_t *c, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t k;
        if (c->ssl) {
            int m = SSL_write(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
            if (m <= 0) return -1;
            k = m;
        } else {
            k = send(c->fd, p, n, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR) continue;
                return -1;
            }
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Reads what is available (at least one byte): the count, or -1 on error/EOF. */
static ssize_t read_some(conn_t *c, uint8_t *p, size_t n) {
    for (;;) {
        if (c->ssl) {
            int m = SSL_read(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
            return m > 0 ? m : -1;
        }
        ssize_t k = recv(c->fd, p, n, 0);
        if (k < 0 && errno == EINTR) continue;
        return k > 0 ? k : -1;
    }
}

static int read_all(conn_t *c, uint8_t *p, size_t n) {
    while (n) {
        ssize_t k = read_some(c, p, n);
        if (k < 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void conn_close(conn_t *c) {
    if (!c) return;
    if (c->ssl) SSL_free(c->ssl); /* no close_notify: the daemon treats EOF alike */
    close(c->fd);
    free(c);
}

static void trim(char *s) {
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = 0;
}

/* `key = value` from a CloudHSM-style library config file (`#`/`;` start comments). */
static int conf_value(const char *file, const char *key, char *out, size_t outlen) {
    FILE *f = fopen(file, "re");
    if (!f) return 0;
    char line[1024];
    size_t klen = strlen(key);
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *s = line;
        while (*s == ' ' || *s == '\t') s++;
        if (*s == '#' || *s == ';') continue;
        if (strncmp(s, key, klen) != 0) continue;
        s += klen;
        while (*s == ' ' || *s == '\t') s++;
        if (*s != '=') continue;
        s++;
        while (*s == ' ' || *s == '\t') s++;
        trim(s);
        if (!*s) continue;
        snprintf(out, outlen, "%s", s);
        found = 1;
    }
    fclose(f);
    return found;
}

/* The config file in force: HSMSIM_CONF, else /etc/hsmsim/pkcs11.conf (if it exists). */
static const char *conf_file(void) {
    const char *conf = getenv("HSMSIM_CONF");
    if (conf && *conf) return conf;
    return "/etc/hsmsim/pkcs11.conf";
}

/* `tls:host:port` (host may be [v6]): the remote daemon and its trust anchor. */
static CK_RV setup_tls(const char *addr) {
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || !colon[1]) return CKR_GENERAL_ERROR;
    size_t hlen = (size_t)(colon - addr);
    if (addr[0] == '[' && hlen >= 2 && addr[hlen - 1] == ']') {
        addr++;
        hlen -= 2;
    }
    if (hlen >= sizeof g_host || strlen(colon + 1) >= sizeof g_port) return CKR_GENERAL_ERROR;
    memcpy(g_host, addr, hlen);
    g_host[hlen] = 0;
    snprintf(g_port, sizeof g_port, "%s", colon + 1);
    const char *ca = getenv("HSMSIM_CA_FILE");
    if (ca && *ca)
        snprintf(g_ca_file, sizeof g_ca_file, "%s", ca);
    else if (!conf_value(conf_file(), "ca_file", g_ca_file, sizeof g_ca_file))
        return CKR_GENERAL_ERROR; /* never TLS without a trust anchor */
    const char *sn = getenv("HSMSIM_SERVER_NAME");
    if (sn && *sn)
        snprintf(g_server_name, sizeof g_server_name, "%s", sn);
    else if (!conf_value(conf_file(), "server_name", g_server_name, sizeof g_server_name))
        snprintf(g_server_name, sizeof g_server_name, "%s", g_host);
    if (g_ctx) SSL_CTX_free(g_ctx);
    g_ctx = SSL_CTX_new(TLS_client_method());
    if (!g_ctx) return CKR_HOST_MEMORY;
    SSL_CTX_set_min_proto_version(g_ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(g_ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_load_verify_locations(g_ctx, g_ca_file, NULL) != 1) {
        SSL_CTX_free(g_ctx);
        g_ctx = NULL;
        ERR_clear_error();
        return CKR_GENERAL_ERROR;
    }
    g_tls = 1;
    return CKR_OK;
}

/* HSMSIM_SOCKET, else the config file's `socket`, else $HSMSIM_HOME/gateway.sock, else
 * ./.hsmsim/gateway.sock. Relative paths are made absolute now so that a later chdir() does
 * not move the daemon. `tls:host:port` selects a remote daemon over TLS. */
static CK_RV resolve_path(void) {
    char buf[PATH_MAX + 16] = {0};
    const char *env = getenv("HSMSIM_SOCKET");
    const char *home = getenv("HSMSIM_HOME");
    g_tls = 0;
    if (env && *env) {
        snprintf(buf, sizeof buf, "%s", env);
    } else if (!conf_value(conf_file(), "socket", buf, sizeof buf)) {
        if (home && *home)
            snprintf(buf, sizeof buf, "%s/gateway.sock", home);
        else
            snprintf(buf, sizeof buf, ".hsmsim/gateway.sock");
    }
    char *p = buf;
    if (strncmp(p, "tls:", 4) == 0) return setup_tls(p + 4);
    if (strncmp(p, "unix:", 5) == 0) p += 5;
    /* Plain TCP is refused: a remote daemon is reached only over TLS. */
    if (strncmp(p, "tcp:", 4) == 0) return CKR_GENERAL_ERROR;
    char abs[PATH_MAX + 16];
    if (p[0] != '/') {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) return CKR_GENERAL_ERROR;
        if ((size_t)snprintf(abs, sizeof abs, "%s/%s", cwd, p) >= sizeof abs) return CKR_GENERAL_ERROR;
        p = abs;
    }
    if (strlen(p) >= sizeof g_path) return CKR_GENERAL_ERROR;
    memcpy(g_path, p, strlen(p) + 1);
    return CKR_OK;
}

static int frame_exchange(conn_t *c, uint16_t op, hs_wbuf *w, uint8_t **mem, hs_rbuf *body, CK_RV *rv);
static __thread uint16_t t_flags; /* request header flags of this thread's next call */

static int connect_tcp(void) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(g_host, g_port, &hints, &res) != 0) return -1;
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

static int connect_unix(void) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, g_path, strlen(g_path) + 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        int err = errno;
        close(fd);
        /* Said once per process, on stderr, as CloudHSM's library reports a lost connection
         * in its log: the caller only gets CKR_DEVICE_ERROR. */
        static int told;
        if (!__atomic_exchange_n(&told, 1, __ATOMIC_RELAXED))
            fprintf(stderr, "libhsmsim-pkcs11: cannot reach the hsmsim daemon at %s (%s); "
                    "start it with `hsmsim up`, or point HSMSIM_SOCKET at its gateway.sock\n",
                    g_path, strerror(err));
        errno = err;
        return -1;
    }
    return fd;
}

/* Connects and handshakes; joins the application named by g_token, or creates one. */
static conn_t *open_conn(void) {
    conn_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->gen = __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
    c->fd = g_tls ? connect_tcp() : connect_unix();
    if (c->fd < 0) {
        free(c);
        return NULL;
    }
    if (g_tls) {
        c->ssl = SSL_new(g_ctx);
        if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1 || SSL_set1_host(c->ssl, g_server_name) != 1 ||
            SSL_set_tlsext_host_name(c->ssl, g_server_name) != 1 || SSL_connect(c->ssl) != 1) {
            ERR_clear_error();
            conn_close(c);
            return NULL;
        }
    }
    pthread_mutex_lock(&g_hello_lock);
    hs_wbuf w;
    hs_w_init(&w);
    uint8_t hdr[HS_HDR_RESERVE] = {0};
    for (int i = 0; i < HS_HDR_RESERVE; i++) hs_w_u8(&w, hdr[i]);
    hs_w_u32(&w, HSMSIM_PROTO_MAGIC);
    hs_w_u16(&w, HSMSIM_PROTO_MAJOR);
    hs_w_u16(&w, HSMSIM_PROTO_MINOR);
    hs_w_u32(&w, HSMSIM_MAX_FRAME);
    hs_w_u64(&w, (uint64_t)getpid());
    hs_w_bytes(&w, g_token, g_have_token ? HSMSIM_APP_TOKEN_LEN : 0);
    uint8_t *mem = NULL;
    hs_rbuf r;
    CK_RV rv = CKR_OK;
    int ok = frame_exchange(c, OP_HELLO, &w, &mem, &r, &rv) == 0 && rv == CKR_OK;
    hs_w_free(&w);
    if (ok) {
        uint16_t major = r_u16(&r);
        uint16_t minor = r_u16(&r);
        uint32_t maxf = hs_r_u32(&r);
        size_t tn = 0;
        const uint8_t *tok = hs_r_bytes(&r, &tn);
        if (r.err || major != HSMSIM_PROTO_MAJOR || tn != HSMSIM_APP_TOKEN_LEN || maxf < 4096) {
            ok = 0;
        } else {
            memcpy(g_token, tok, HSMSIM_APP_TOKEN_LEN);
            g_have_token = 1;
            g_max_frame = maxf < HSMSIM_MAX_FRAME ? maxf : HSMSIM_MAX_FRAME;
            g_peer_minor = minor;
        }
    }
    pthread_mutex_unlock(&g_hello_lock);
    free(mem);
    if (!ok) {
        conn_close(c);
        return NULL;
    }
    return c;
}

/* Writes one request frame (header filled in place) and reads its reply. 0 on success. */
static int frame_exchange(conn_t *c, uint16_t op, hs_wbuf *w, uint8_t **mem, hs_rbuf *body, CK_RV *rv) {
    *mem = NULL;
    if (w->oom || w->len < HS_HDR_RESERVE) return -1;
    uint32_t id = __atomic_add_fetch(&g_reqid, 1, __ATOMIC_RELAXED);
    uint32_t len = (uint32_t)(w->len - 4);
    uint8_t *h = w->p;
    for (int i = 0; i < 4; i++) h[i] = (uint8_t)(len >> (8 * i));
    for (int i = 0; i < 4; i++) h[4 + i] = (uint8_t)(id >> (8 * i));
    h[8] = (uint8_t)op;
    h[9] = (uint8_t)(op >> 8);
    h[10] = (uint8_t)t_flags;
    h[11] = (uint8_t)(t_flags >> 8);
    t_flags = 0;
    if (write_all(c, w->p, w->len) != 0) return -1;
    /* Most replies are small: take the length and as much of the body as has arrived in one
     * recv, then read whatever remains. */
    uint8_t first[4096];
    size_t got = 0;
    while (got < 4) {
        ssize_t k = read_some(c, first + got, sizeof first - got);
        if (k < 0) return -1;
        got += (size_t)k;
    }
    uint32_t rlen = (uint32_t)first[0] | ((uint32_t)first[1] << 8) | ((uint32_t)first[2] << 16) |
                    ((uint32_t)first[3] << 24);
    if (rlen < 16 || rlen > HSMSIM_MAX_FRAME || got - 4 > rlen) return -1;
    uint8_t *buf = malloc(rlen);
    if (!buf) return -1;
    memcpy(buf, first + 4, got - 4);
    if (read_all(c, buf + (got - 4), rlen - (got - 4)) != 0) { free(buf); return -1; }
    hs_rbuf r = {buf, rlen, 0, 0};
    uint32_t rid = hs_r_u32(&r);
    uint16_t rop = r_u16(&r);
    (void)r_u16(&r);
    uint64_t rrv = hs_r_u64(&r);
    if (rid != id || rop != op) { free(buf); return -1; }
    *rv = (CK_RV)rrv;
    *mem = buf;
    *body = r;
    return 0;
}

static conn_t *take_idle(void) {
    conn_t *c = NULL;
    pthread_mutex_lock(&g_lock);
    if (g_nidle > 0) c = g_idle[--g_nidle];
    pthread_mutex_unlock(&g_lock);
    return c;
}

static void give_back(conn_t *c) {
    pthread_mutex_lock(&g_lock);
    if (c->gen == __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE) && g_nidle < POOL_MAX) {
        g_idle[g_nidle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&g_lock);
    conn_close(c);
}

CK_RV hs_call_flags(uint16_t op, uint16_t flags, hs_wbuf *w, hs_rbuf *resp, uint8_t **mem) {
    t_flags = flags;
    CK_RV rv = hs_call(op, w, resp, mem);
    t_flags = 0;
    return rv;
}

CK_RV hs_call(uint16_t op, hs_wbuf *w, hs_rbuf *resp, uint8_t **mem) {
    *mem = NULL;
    uint16_t flags = t_flags;
    if (w->oom) return CKR_HOST_MEMORY;
    if (w->len - 4 > g_max_frame) return CKR_DATA_LEN_RANGE;
    for (int attempt = 0; attempt < 2; attempt++) {
        conn_t *c = take_idle();
        int reused = c != NULL;
        if (!reused) c = open_conn();
        /* FIDELITY: an unreachable daemon is CKR_DEVICE_ERROR (CloudHSM's code for a lost
         * cluster connection is not documented). */
        if (!c) return CKR_DEVICE_ERROR;
        CK_RV rv = CKR_OK;
        t_flags = flags;
        if (frame_exchange(c, op, w, mem, resp, &rv) == 0) {
            give_back(c);
            return rv;
        }
        ERR_clear_error();
        conn_close(c);
        free(*mem);
        *mem = NULL;
        /* A pooled connection may have died with a restarted daemon: retry once on a fresh
         * one. A fresh connection that fails is a real failure. */
        if (!reused) return CKR_DEVICE_ERROR;
    }
    return CKR_DEVICE_ERROR;
}


/* ---- direct node connections (docs/direct-protocol.md) ------------------------------------
 * Pooled per node address (a Unix socket path, or tls:NAME@HOST:PORT for a module that reaches
 * the daemon over TLS); a connection is used by one thread at a time. Like the daemon
 * connections they belong to one library generation and one process: a forked child closes
 * its copies (and frees their TLS state without a word to the node) unused. */
#define NPOOL_MAX 64
#define DP_MAGIC 0x50444D48u /* "HMDP" little-endian */
#define DP_MAJOR 1
#define DP_MINOR 0

typedef struct {
    int fd;
    SSL *ssl; /* TCP+TLS to the node, else NULL (Unix socket) */
    unsigned gen;
    uint32_t timeout_ms; /* SO_RCVTIMEO (and for TLS SO_SNDTIMEO) in force */
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} nconn_t;

static nconn_t *g_nidle_n[NPOOL_MAX];
static int g_nnidle;
static uint32_t g_nreqid;

static void nconn_close(nconn_t *c) {
    if (!c) return;
    if (c->ssl) SSL_free(c->ssl); /* no close_notify: the node treats EOF alike */
    if (c->fd >= 0) close(c->fd);
    free(c);
}

/* Reads what is there (at least one byte), bounded by SO_RCVTIMEO: the count, or -1 on error,
 * EOF or timeout (errno ETIMEDOUT: a silent node, the caller hands the call to the daemon). */
static ssize_t n_recv(nconn_t *c, uint8_t *p, size_t n) {
    for (;;) {
        errno = 0;
        if (c->ssl) {
            int m = SSL_read(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
            if (m > 0) return m;
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) errno = ETIMEDOUT;
            ERR_clear_error();
            return -1;
        }
        ssize_t m = recv(c->fd, p, n, 0);
        if (m < 0 && errno == EINTR) continue;
        if (m < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) errno = ETIMEDOUT;
        return m > 0 ? m : -1;
    }
}

/* Reads exactly n bytes (n_recv's errors). */
static int n_read_all(nconn_t *c, uint8_t *p, size_t n) {
    while (n) {
        ssize_t m = n_recv(c, p, n);
        if (m <= 0) return -1;
        p += m;
        n -= (size_t)m;
    }
    return 0;
}

static int n_timeout(nconn_t *c, uint32_t timeout_ms) {
    if (c->timeout_ms == timeout_ms) return 0;
    struct timeval tv = {(time_t)(timeout_ms / 1000), (suseconds_t)((timeout_ms % 1000) * 1000)};
    if (setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) return -1;
    /* TCP: connect() and a stuck send are bounded too (a Unix peer answers or refuses) */
    if (c->ssl && setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0) return -1;
    c->timeout_ms = timeout_ms;
    return 0;
}

static int n_write_all(nconn_t *c, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t k;
        if (c->ssl) {
            int m = SSL_write(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
            if (m <= 0) {
                ERR_clear_error();
                return -1;
            }
            k = m;
        } else {
            k = send(c->fd, p, n, MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR) continue;
                return -1;
            }
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Addresses whose certificate failed verification (no chain to the trust anchor, another
 * name): skipped for REFUSE_S so that each call does not pay a handshake before going to the
 * daemon; forgotten at C_Initialize/C_Finalize and in a forked child (the generation). */
#define REFUSE_MAX 16
#define REFUSE_S 30
static struct {
    char addr[sizeof(((struct sockaddr_un *)0)->sun_path)];
    time_t until;
    unsigned gen;
} g_refused[REFUSE_MAX];
static pthread_mutex_t g_refused_lock = PTHREAD_MUTEX_INITIALIZER;

static time_t mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

static void n_refuse(const char *addr) {
    size_t n = strlen(addr);
    if (n >= sizeof g_refused[0].addr) return;
    unsigned gen = __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
    time_t now = mono_s();
    pthread_mutex_lock(&g_refused_lock);
    int slot = 0;
    for (int i = 0; i < REFUSE_MAX; i++) {
        if (strcmp(g_refused[i].addr, addr) == 0) { slot = i; break; }
        if (g_refused[i].until < g_refused[slot].until) slot = i; /* the oldest goes */
    }
    memcpy(g_refused[slot].addr, addr, n + 1);
    g_refused[slot].until = now + REFUSE_S;
    g_refused[slot].gen = gen;
    pthread_mutex_unlock(&g_refused_lock);
}

static int n_refused(const char *addr) {
    unsigned gen = __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
    time_t now = mono_s();
    int found = 0;
    pthread_mutex_lock(&g_refused_lock);
    for (int i = 0; i < REFUSE_MAX && !found; i++)
        found = g_refused[i].gen == gen && g_refused[i].until > now && strcmp(g_refused[i].addr, addr) == 0;
    pthread_mutex_unlock(&g_refused_lock);
    return found;
}

/* tls:NAME@HOST:PORT (HOST may be [v6]) into its parts; 0 on success. */
static int n_parse_tls(const char *addr, char *name, size_t namelen, char *host, size_t hostlen, char *port,
                       size_t portlen) {
    const char *at = strchr(addr, '@');
    const char *colon = strrchr(addr, ':');
    if (!at || !colon || colon < at || at == addr || !colon[1]) return -1;
    size_t nl = (size_t)(at - addr), hl = (size_t)(colon - at - 1);
    const char *h = at + 1;
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (!hl || nl >= namelen || hl >= hostlen || strlen(colon + 1) >= portlen) return -1;
    memcpy(name, addr, nl);
    name[nl] = 0;
    memcpy(host, h, hl);
    host[hl] = 0;
    snprintf(port, portlen, "%s", colon + 1);
    return 0;
}

/* A TCP connection to the node at tls:NAME@HOST:PORT with TLS: its certificate must chain to
 * the module's trust anchor (the daemon's, g_ctx) and name NAME (the HSM id). 0 on success. */
static int n_connect_tls(nconn_t *c, const char *path, uint32_t timeout_ms) {
    char name[128], host[128], port[16];
    if (!g_ctx || n_parse_tls(path + 4, name, sizeof name, host, sizeof host, port, sizeof port) != 0) return -1;
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    if (getaddrinfo(host, port, &hints, &res) != 0) return -1;
    for (struct addrinfo *a = res; a && c->fd < 0; a = a->ai_next) {
        c->fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (c->fd < 0) continue;
        c->ssl = SSL_new(g_ctx); /* marks the connection as TCP for n_timeout */
        c->timeout_ms = 0;
        if (!c->ssl || n_timeout(c, timeout_ms) != 0 || connect(c->fd, a->ai_addr, a->ai_addrlen) != 0) {
            if (c->ssl) SSL_free(c->ssl);
            c->ssl = NULL;
            close(c->fd);
            c->fd = -1;
        }
    }
    freeaddrinfo(res);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (SSL_set_fd(c->ssl, c->fd) != 1 || SSL_set1_host(c->ssl, name) != 1 ||
        SSL_set_tlsext_host_name(c->ssl, name) != 1 || SSL_connect(c->ssl) != 1) {
        /* the daemon takes the call. A certificate that does not chain is remembered (a trust
         * anchor without the cluster CA would otherwise cost a handshake per call); one that
         * names another HSM is not (an impostor or a stale address: the HSM may come back) */
        long vr = SSL_get_verify_result(c->ssl);
        if (vr != X509_V_OK && vr != X509_V_ERR_HOSTNAME_MISMATCH) n_refuse(path);
        ERR_clear_error();
        return -1;
    }
    return 0;
}

static void put32(uint8_t *b, uint32_t v) { for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *b) {
    return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}

static nconn_t *n_open(const char *path, uint32_t timeout_ms) {
    size_t plen = strlen(path);
    nconn_t *c = calloc(1, sizeof *c);
    if (!c || plen >= sizeof c->path) { free(c); return NULL; }
    memcpy(c->path, path, plen + 1);
    c->gen = __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
    c->fd = -1;
    if (strncmp(path, "tls:", 4) == 0) {
        if (n_connect_tls(c, path, timeout_ms) != 0) {
            nconn_close(c);
            return NULL;
        }
    } else {
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) { free(c); return NULL; }
        struct sockaddr_un sa;
        memset(&sa, 0, sizeof sa);
        sa.sun_family = AF_UNIX;
        memcpy(sa.sun_path, path, plen + 1);
        if (n_timeout(c, timeout_ms) != 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            nconn_close(c);
            return NULL;
        }
    }
    uint8_t hello[12], reply[16];
    put32(hello, 8);
    put32(hello + 4, DP_MAGIC);
    hello[8] = DP_MAJOR; hello[9] = 0; hello[10] = DP_MINOR; hello[11] = 0;
    if (n_write_all(c, hello, sizeof hello) != 0 || n_read_all(c, reply, sizeof reply) != 0 ||
        get32(reply) != 12 ||
        get32(reply + 4) != DP_MAGIC || reply[8] != DP_MAJOR || reply[9] != 0) {
        nconn_close(c);
        return NULL;
    }
    return c;
}

static nconn_t *n_take(const char *path) {
    nconn_t *c = NULL;
    pthread_mutex_lock(&g_lock);
    for (int i = g_nnidle - 1; i >= 0; i--) {
        if (strcmp(g_nidle_n[i]->path, path) == 0) {
            c = g_nidle_n[i];
            g_nidle_n[i] = g_nidle_n[--g_nnidle];
            break;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return c;
}

static void n_give_back(nconn_t *c) {
    pthread_mutex_lock(&g_lock);
    if (c->gen == __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE)) {
        if (g_nnidle == NPOOL_MAX) { /* full: the oldest goes */
            nconn_close(g_nidle_n[0]);
            g_nidle_n[0] = g_nidle_n[--g_nnidle];
        }
        g_nidle_n[g_nnidle++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&g_lock);
    nconn_close(c);
}

static void n_drop_all(void) {
    for (int i = 0; i < g_nnidle; i++) nconn_close(g_nidle_n[i]);
    g_nnidle = 0;
}

int hs_node_call(const char *path, uint32_t timeout_ms, uint8_t verb, const uint8_t *ticket, size_t ticketlen,
                 const uint8_t *desc, size_t desclen, const uint8_t *mac, size_t maclen, const uint8_t *data,
                 size_t datalen, const uint8_t *sig, size_t siglen, uint8_t **out, size_t *outlen, CK_RV *rv,
                 int *fallback) {
    *out = NULL;
    *outlen = 0;
    *fallback = 0;
    size_t total = 4 + 1 + 5 * 4 + ticketlen + desclen + maclen + datalen + siglen;
    if (total > HS_DIRECT_MAX_FRAME) return -1;
    if (strncmp(path, "tls:", 4) == 0 && n_refused(path)) return -1; /* its certificate failed */
    uint8_t *req = malloc(4 + total);
    if (!req) return -1;
    uint32_t id = __atomic_add_fetch(&g_nreqid, 1, __ATOMIC_RELAXED);
    size_t pos = 0;
    put32(req, (uint32_t)total); pos += 4;
    put32(req + pos, id); pos += 4;
    req[pos++] = verb;
    const uint8_t *parts[5] = {ticket, desc, mac, data, sig};
    size_t lens[5] = {ticketlen, desclen, maclen, datalen, siglen};
    for (int i = 0; i < 5; i++) {
        put32(req + pos, (uint32_t)lens[i]);
        pos += 4;
        if (lens[i]) memcpy(req + pos, parts[i], lens[i]);
        pos += lens[i];
    }
    int result = -1;
    uint8_t first[1024]; /* the reply's head; may hold plaintext: wiped on every way out */
    for (int attempt = 0; attempt < 2 && result < 0; attempt++) {
        nconn_t *c = n_take(path);
        int reused = c != NULL;
        if (!c) c = n_open(path, timeout_ms);
        if (!c) break;
        if (n_timeout(c, timeout_ms) != 0) {
            nconn_close(c);
            break;
        }
        if (n_write_all(c, req, pos) != 0) {
            nconn_close(c);
            if (reused) continue; /* a pooled connection to a restarted node: one fresh try */
            break;
        }
        /* reply: u32 len, u32 id, u64 rv, u8 flags, u32 n, n bytes. Most replies arrive whole:
         * one recv takes the header and as much of the output as is there. */
        size_t got = 0;
        int failed = 0;
        errno = 0;
        while (got < 21) {
            ssize_t k = n_recv(c, first + got, sizeof first - got);
            if (k <= 0) { failed = 1; break; }
            got += (size_t)k;
        }
        if (failed) {
            int timed_out = errno == ETIMEDOUT;
            nconn_close(c); /* silent or gone: the answer may still come; never reuse it */
            if (reused && !timed_out && got == 0) continue; /* a pooled connection the node closed */
            break;
        }
        const uint8_t *head = first;
        uint32_t rlen = get32(head), rid = get32(head + 4), n = get32(head + 17);
        if (rid != id || rlen != 17 + n || n > HS_DIRECT_MAX_FRAME || got > 21 + (size_t)n) { nconn_close(c); break; }
        uint8_t *buf = malloc(n ? n : 1);
        size_t have = got - 21;
        if (buf && have) memcpy(buf, first + 21, have);
        if (!buf || (n > have && n_read_all(c, buf + have, n - have) != 0)) {
            if (buf) {
                volatile uint8_t *b = buf;
                for (size_t i = 0; i < have; i++) b[i] = 0;
            }
            free(buf);
            nconn_close(c);
            break;
        }
        uint64_t r = 0;
        for (int i = 7; i >= 0; i--) r = (r << 8) | head[8 + i];
        *rv = (CK_RV)r;
        *fallback = head[16] & 1;
        *out = buf;
        *outlen = n;
        n_give_back(c);
        result = 0;
    }
    volatile uint8_t *f = first;
    for (size_t i = 0; i < sizeof first; i++) f[i] = 0;
    volatile uint8_t *v = req; /* the request carries plaintext */
    for (size_t i = 0; i < pos; i++) v[i] = 0;
    free(req);
    return result;
}

int hs_peer_minor(void) { return g_peer_minor; }

CK_RV hs_connect_init(void) {
    __atomic_add_fetch(&g_gen, 1, __ATOMIC_RELEASE);
    CK_RV rv = resolve_path();
    if (rv != CKR_OK) return rv;
    memset(g_token, 0, sizeof g_token);
    g_have_token = 0;
    conn_t *c = open_conn();
    if (!c) return CKR_DEVICE_ERROR;
    give_back(c);
    return CKR_OK;
}

void hs_disconnect_all(int say_goodbye) {
    conn_t *cs[POOL_MAX];
    int n;
    pthread_mutex_lock(&g_lock);
    n = g_nidle;
    memcpy(cs, g_idle, sizeof(conn_t *) * (size_t)n);
    g_nidle = 0;
    __atomic_add_fetch(&g_gen, 1, __ATOMIC_RELEASE); /* in-use connections close on return */
    pthread_mutex_unlock(&g_lock);
    if (say_goodbye && n > 0) {
        hs_wbuf w;
        hs_w_init(&w);
        for (int i = 0; i < HS_HDR_RESERVE; i++) hs_w_u8(&w, 0);
        uint8_t *mem = NULL;
        hs_rbuf r;
        CK_RV rv;
        (void)frame_exchange(cs[0], OP_C_Finalize, &w, &mem, &r, &rv);
        free(mem);
        hs_w_free(&w);
    }
    for (int i = 0; i < n; i++) conn_close(cs[i]);
    pthread_mutex_lock(&g_lock);
    n_drop_all();
    pthread_mutex_unlock(&g_lock);
    memset(g_token, 0, sizeof g_token);
    g_have_token = 0;
}

/* In a forked child the pooled sockets (and TLS states) are the parent's: drop them without a
 * word. The TLS objects are freed without a shutdown record so nothing reaches the peer. */
void hs_forget_after_fork(void) {
    for (int i = 0; i < g_nidle; i++) conn_close(g_idle[i]);
    g_nidle = 0;
    n_drop_all(); /* the parent's node connections: closed here, never used */
    __atomic_add_fetch(&g_gen, 1, __ATOMIC_RELEASE);
    memset(g_token, 0, sizeof g_token);
    g_have_token = 0;
}

void hs_atfork_prepare(void) { pthread_mutex_lock(&g_hello_lock); pthread_mutex_lock(&g_lock); }
void hs_atfork_parent(void) { pthread_mutex_unlock(&g_lock); pthread_mutex_unlock(&g_hello_lock); }
void hs_atfork_child(void) {
    pthread_mutex_init(&g_refused_lock, NULL);
    pthread_mutex_init(&g_lock, NULL);
    pthread_mutex_init(&g_hello_lock, NULL);
}
