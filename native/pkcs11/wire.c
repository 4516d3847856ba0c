/* hsmsim PKCS#11 module, transport half: locating the gateway socket, a pool of connections that
 * all belong to one gateway application, framing and the version handshake.
 * Policy lives in the daemon; this file only moves bytes (docs/gateway-protocol.md). */
#include "hsmsim_pkcs11.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_hello_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int g_idle[POOL_MAX];
static int g_nidle;
static uint8_t g_token[HSMSIM_APP_TOKEN_LEN];
static int g_have_token;
static uint32_t g_max_frame = HSMSIM_MAX_FRAME;
static uint32_t g_reqid;

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int read_all(int fd, uint8_t *p, size_t n) {
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (k == 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void trim(char *s) {
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = 0;
}

/* `socket = /path` (or `socket = unix:/path`) from a CloudHSM-style library config file. */
static int path_from_conf(const char *file, char *out, size_t outlen) {
    FILE *f = fopen(file, "re");
    if (!f) return 0;
    char line[1024];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *s = line;
        while (*s == ' ' || *s == '\t') s++;
        if (*s == '#' || *s == ';') continue;
        if (strncmp(s, "socket", 6) != 0) continue;
        s += 6;
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

/* HSMSIM_SOCKET, else a config file (HSMSIM_CONF, else /etc/hsmsim/pkcs11.conf), else
 * $HSMSIM_HOME/gateway.sock, else ./.hsmsim/gateway.sock. Relative paths are made absolute
 * now so that a later chdir() does not move the daemon. */
static CK_RV resolve_path(void) {
    char buf[PATH_MAX + 16] = {0};
    const char *env = getenv("HSMSIM_SOCKET");
    const char *conf = getenv("HSMSIM_CONF");
    const char *home = getenv("HSMSIM_HOME");
    if (env && *env) {
        snprintf(buf, sizeof buf, "%s", env);
    } else if (!(conf && *conf && path_from_conf(conf, buf, sizeof buf)) &&
               !path_from_conf("/etc/hsmsim/pkcs11.conf", buf, sizeof buf)) {
        if (home && *home)
            snprintf(buf, sizeof buf, "%s/gateway.sock", home);
        else
            snprintf(buf, sizeof buf, ".hsmsim/gateway.sock");
    }
    char *p = buf;
    if (strncmp(p, "unix:", 5) == 0) p += 5;
    /* FIDELITY: TCP+TLS to a remote daemon (`tls:host:port`) is designed into the protocol but
     * not implemented in this module yet: only Unix sockets. */
    if (strncmp(p, "tls:", 4) == 0 || strncmp(p, "tcp:", 4) == 0) return CKR_GENERAL_ERROR;
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

static int frame_exchange(int fd, uint16_t op, hs_wbuf *w, uint8_t **mem, hs_rbuf *body, CK_RV *rv);

/* Connects and handshakes; joins the application named by g_token, or creates one. */
static int open_conn(void) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, g_path, strlen(g_path) + 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
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
    int ok = frame_exchange(fd, OP_HELLO, &w, &mem, &r, &rv) == 0 && rv == CKR_OK;
    hs_w_free(&w);
    if (ok) {
        uint16_t major = r_u16(&r);
        (void)r_u16(&r);
        uint32_t maxf = hs_r_u32(&r);
        size_t tn = 0;
        const uint8_t *tok = hs_r_bytes(&r, &tn);
        if (r.err || major != HSMSIM_PROTO_MAJOR || tn != HSMSIM_APP_TOKEN_LEN || maxf < 4096) {
            ok = 0;
        } else {
            memcpy(g_token, tok, HSMSIM_APP_TOKEN_LEN);
            g_have_token = 1;
            g_max_frame = maxf < HSMSIM_MAX_FRAME ? maxf : HSMSIM_MAX_FRAME;
        }
    }
    pthread_mutex_unlock(&g_hello_lock);
    free(mem);
    if (!ok) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Writes one request frame (header filled in place) and reads its reply. 0 on success. */
static int frame_exchange(int fd, uint16_t op, hs_wbuf *w, uint8_t **mem, hs_rbuf *body, CK_RV *rv) {
    *mem = NULL;
    if (w->oom || w->len < HS_HDR_RESERVE) return -1;
    uint32_t id = __atomic_add_fetch(&g_reqid, 1, __ATOMIC_RELAXED);
    uint32_t len = (uint32_t)(w->len - 4);
    uint8_t *h = w->p;
    for (int i = 0; i < 4; i++) h[i] = (uint8_t)(len >> (8 * i));
    for (int i = 0; i < 4; i++) h[4 + i] = (uint8_t)(id >> (8 * i));
    h[8] = (uint8_t)op;
    h[9] = (uint8_t)(op >> 8);
    h[10] = h[11] = 0;
    if (write_all(fd, w->p, w->len) != 0) return -1;
    /* Most replies are small: take the length and as much of the body as has arrived in one
     * recv, then read whatever remains. */
    uint8_t first[4096];
    size_t got = 0;
    while (got < 4) {
        ssize_t k = recv(fd, first + got, sizeof first - got, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        got += (size_t)k;
    }
    uint32_t rlen = (uint32_t)first[0] | ((uint32_t)first[1] << 8) | ((uint32_t)first[2] << 16) |
                    ((uint32_t)first[3] << 24);
    if (rlen < 16 || rlen > HSMSIM_MAX_FRAME || got - 4 > rlen) return -1;
    uint8_t *buf = malloc(rlen);
    if (!buf) return -1;
    memcpy(buf, first + 4, got - 4);
    if (read_all(fd, buf + (got - 4), rlen - (got - 4)) != 0) { free(buf); return -1; }
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

static int take_idle(void) {
    int fd = -1;
    pthread_mutex_lock(&g_lock);
    if (g_nidle > 0) fd = g_idle[--g_nidle];
    pthread_mutex_unlock(&g_lock);
    return fd;
}

static void give_back(int fd) {
    pthread_mutex_lock(&g_lock);
    if (g_nidle < POOL_MAX) {
        g_idle[g_nidle++] = fd;
        fd = -1;
    }
    pthread_mutex_unlock(&g_lock);
    if (fd >= 0) close(fd);
}

CK_RV hs_call(uint16_t op, hs_wbuf *w, hs_rbuf *resp, uint8_t **mem) {
    *mem = NULL;
    if (w->oom) return CKR_HOST_MEMORY;
    if (w->len - 4 > g_max_frame) return CKR_DATA_LEN_RANGE;
    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = take_idle();
        int reused = fd >= 0;
        if (!reused) fd = open_conn();
        /* FIDELITY: an unreachable daemon is CKR_DEVICE_ERROR (CloudHSM's code for a lost
         * cluster connection is not documented). */
        if (fd < 0) return CKR_DEVICE_ERROR;
        CK_RV rv = CKR_OK;
        if (frame_exchange(fd, op, w, mem, resp, &rv) == 0) {
            give_back(fd);
            return rv;
        }
        close(fd);
        free(*mem);
        *mem = NULL;
        /* A pooled connection may have died with a restarted daemon: retry once on a fresh
         * one. A fresh connection that fails is a real failure. */
        if (!reused) return CKR_DEVICE_ERROR;
    }
    return CKR_DEVICE_ERROR;
}

CK_RV hs_connect_init(void) {
    CK_RV rv = resolve_path();
    if (rv != CKR_OK) return rv;
    memset(g_token, 0, sizeof g_token);
    g_have_token = 0;
    int fd = open_conn();
    if (fd < 0) return CKR_DEVICE_ERROR;
    give_back(fd);
    return CKR_OK;
}

void hs_disconnect_all(int say_goodbye) {
    int fds[POOL_MAX];
    int n;
    pthread_mutex_lock(&g_lock);
    n = g_nidle;
    memcpy(fds, g_idle, sizeof(int) * (size_t)n);
    g_nidle = 0;
    pthread_mutex_unlock(&g_lock);
    if (say_goodbye && n > 0) {
        hs_wbuf w;
        hs_w_init(&w);
        for (int i = 0; i < HS_HDR_RESERVE; i++) hs_w_u8(&w, 0);
        uint8_t *mem = NULL;
        hs_rbuf r;
        CK_RV rv;
        (void)frame_exchange(fds[0], OP_C_Finalize, &w, &mem, &r, &rv);
        free(mem);
        hs_w_free(&w);
    }
    for (int i = 0; i < n; i++) close(fds[i]);
    memset(g_token, 0, sizeof g_token);
    g_have_token = 0;
}

/* In a forked child the pooled sockets are the parent's: drop them without a word. */
void hs_forget_after_fork(void) {
    for (int i = 0; i < g_nidle; i++) close(g_idle[i]);
    g_nidle = 0;
    memset(g_token, 0, sizeof g_token);
    g_have_token = 0;
}

void hs_atfork_prepare(void) { pthread_mutex_lock(&g_hello_lock); pthread_mutex_lock(&g_lock); }
void hs_atfork_parent(void) { pthread_mutex_unlock(&g_lock); pthread_mutex_unlock(&g_hello_lock); }
void hs_atfork_child(void) {
    pthread_mutex_init(&g_lock, NULL);
    pthread_mutex_init(&g_hello_lock, NULL);
}
