/* hsmsim PKCS#11 module, API half: every C_* function of the 2.40 list. Each checks its
 * arguments as the specification requires, flattens them into one request frame, and unpacks
 * the gateway's reply into the caller's buffers. No semantics live here (docs/gateway-protocol.md). */
#include "hsmsim_pkcs11.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_mutex_t g_state = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static volatile int g_init;
static volatile pid_t g_pid;

static void module_atfork_child(void);

static void register_atfork(void) {
    pthread_atfork(hs_atfork_prepare, hs_atfork_parent, hs_atfork_child);
    pthread_atfork(NULL, NULL, module_atfork_child);
}

static int ready(void) { return g_init && g_pid == getpid(); }

#define CHECK_INIT() do { if (!ready()) return CKR_CRYPTOKI_NOT_INITIALIZED; } while (0)

/* ---- caller pointers ----------------------------------------------------------------------
 * No pointer a caller passes is kept past the call that passed it: every argument is copied
 * into the request, and every result is written before the call returns. In particular the
 * HSM-generated AES-GCM IV, which CloudHSM hands back in CK_GCM_PARAMS.pIv, is drawn by the
 * daemon at C_EncryptInit and written into pIv then (protocol 1.2), not at C_Encrypt: hosts
 * such as Java's SunPKCS11 free the parameter as soon as C_EncryptInit returns. */

/* ---- speculative results (protocol 1.1) -------------------------------------------------
 * Hosts ask for the output length first (NULL buffer), then call again with a buffer. For the
 * single-part calls the module asks the gateway for the result with the length ("outspec 2"),
 * keeps it here, and answers the second call without a round trip when its input is the same. */
#define SPEC_SLOTS 256
#define SPEC_MAX 16384
typedef struct {
    int used;
    int done; /* answered locally: the operation is over until the next Init */
    CK_SESSION_HANDLE s;
    uint16_t op;
    uint8_t *in, *out; /* the module's own copies */
    size_t inlen, outlen;
} spec_t;
static spec_t g_spec[SPEC_SLOTS];
static pthread_mutex_t g_spec_lock = PTHREAD_MUTEX_INITIALIZER;

static void wipe_free(uint8_t *p, size_t n) {
    if (!p) return;
    volatile uint8_t *v = p;
    for (size_t i = 0; i < n; i++) v[i] = 0;
    free(p);
}

static void spec_drop(spec_t *e) {
    wipe_free(e->in, e->inlen);
    wipe_free(e->out, e->outlen);
    memset(e, 0, sizeof *e);
}

/* op 0: every operation of the session. */
static void spec_forget(CK_SESSION_HANDLE s, uint16_t op) {
    pthread_mutex_lock(&g_spec_lock);
    for (int i = 0; i < SPEC_SLOTS; i++)
        if (g_spec[i].used && g_spec[i].s == s && (!op || g_spec[i].op == op)) spec_drop(&g_spec[i]);
    pthread_mutex_unlock(&g_spec_lock);
}

static void spec_clear_all(void) {
    pthread_mutex_lock(&g_spec_lock);
    for (int i = 0; i < SPEC_SLOTS; i++)
        if (g_spec[i].used) spec_drop(&g_spec[i]);
    pthread_mutex_unlock(&g_spec_lock);
}

static void spec_store(CK_SESSION_HANDLE s, uint16_t op, const uint8_t *in, size_t inlen, const uint8_t *out,
                       size_t outlen) {
    pthread_mutex_lock(&g_spec_lock);
    spec_t *slot = NULL;
    for (int i = 0; i < SPEC_SLOTS; i++) {
        if (g_spec[i].used && g_spec[i].s == s && g_spec[i].op == op) spec_drop(&g_spec[i]);
        if (!g_spec[i].used && !slot) slot = &g_spec[i];
    }
    /* A full table only costs the round trip the cache would have saved: the gateway keeps the
     * result too and answers the follow-up call itself. */
    if (slot) {
        slot->in = malloc(inlen ? inlen : 1);
        slot->out = malloc(outlen ? outlen : 1);
        if (slot->in && slot->out) {
            if (inlen) memcpy(slot->in, in, inlen);
            if (outlen) memcpy(slot->out, out, outlen);
            slot->inlen = inlen;
            slot->outlen = outlen;
            slot->s = s;
            slot->op = op;
            slot->used = 1;
        } else {
            free(slot->in);
            free(slot->out);
            slot->in = slot->out = NULL;
        }
    }
    pthread_mutex_unlock(&g_spec_lock);
}

/* 1 when the call was answered from the stored result (*rv set). */
static int spec_serve(CK_SESSION_HANDLE s, uint16_t op, const uint8_t *in, size_t inlen, uint8_t *out,
                      CK_ULONG_PTR outlen, CK_RV *rv) {
    int handled = 0;
    pthread_mutex_lock(&g_spec_lock);
    for (int i = 0; i < SPEC_SLOTS; i++) {
        spec_t *e = &g_spec[i];
        if (!e->used || e->done || e->s != s || e->op != op) continue;
        if (e->inlen != inlen || (inlen && memcmp(e->in, in, inlen) != 0)) {
            spec_drop(e); /* another input: the gateway computes it */
            break;
        }
        handled = 1;
        if (*outlen < e->outlen) {
            *outlen = e->outlen;
            *rv = CKR_BUFFER_TOO_SMALL; /* the result stays for the next try */
            break;
        }
        if (e->outlen) memcpy(out, e->out, e->outlen);
        *outlen = e->outlen;
        *rv = CKR_OK;
        spec_drop(e);
        e->used = e->done = 1; /* the slot now only records that the operation ended */
        e->s = s;
        e->op = op;
        break;
    }
    pthread_mutex_unlock(&g_spec_lock);
    return handled;
}

/* The Init-level operation a call belongs to (0: none of the speculative kinds). */
static uint16_t op_kind(uint16_t op) {
    switch (op) {
    case OP_C_Encrypt: case OP_C_EncryptUpdate: case OP_C_EncryptFinal: return OP_C_Encrypt;
    case OP_C_Decrypt: case OP_C_DecryptUpdate: case OP_C_DecryptFinal: return OP_C_Decrypt;
    case OP_C_Sign: case OP_C_SignUpdate: case OP_C_SignFinal: return OP_C_Sign;
    case OP_C_Digest: case OP_C_DigestUpdate: case OP_C_DigestFinal: return OP_C_Digest;
    default: return 0;
    }
}

/* 1 when the session's operation of this kind was finished locally (no Init since). */
static int spec_done(CK_SESSION_HANDLE s, uint16_t op) {
    uint16_t kind = op_kind(op);
    if (!kind) return 0;
    int done = 0;
    pthread_mutex_lock(&g_spec_lock);
    for (int i = 0; i < SPEC_SLOTS && !done; i++)
        done = g_spec[i].used && g_spec[i].done && g_spec[i].s == s && g_spec[i].op == kind;
    pthread_mutex_unlock(&g_spec_lock);
    return done;
}


/* ---- the direct data path (protocol 1.3, docs/direct-protocol.md) -------------------------
 * A Sign/Verify/Encrypt/DecryptInit reply may name the HSMs holding the key (balance order),
 * each with a socket path, a ticket and the MAC of an operation descriptor the daemon made.
 * The single-part call then goes to the first of them; what the node cannot answer (its
 * fallback flag, a lost or silent node) goes to the daemon, which still holds the operation.
 * An operation finished on a node is "ended" here until the next request of its kind on the
 * session tells the daemon so (header flag DIRECT_DONE). The module decides nothing else. */
#define DIRECT_BUCKETS 1024
#define DIRECT_MAX_HOLDERS 8
typedef struct {
    char path[108];
    uint8_t ticket[32];
    uint8_t mac[16];
    uint32_t timeout_ms;
} dholder_t;
typedef struct dop {
    struct dop *next;
    CK_SESSION_HANDLE s;
    uint16_t kind;
    int ended;
    uint8_t *desc;
    size_t desclen;
    int n;
    dholder_t h[DIRECT_MAX_HOLDERS];
} dop_t;
static dop_t *g_direct[DIRECT_BUCKETS];
static pthread_mutex_t g_direct_lock = PTHREAD_MUTEX_INITIALIZER;

/* The operation kind of an opcode (its single-part opcode), 0 for none of the direct kinds. */
static uint16_t dkind(uint16_t op) {
    switch (op) {
    case OP_C_EncryptInit: case OP_C_Encrypt: case OP_C_EncryptUpdate: case OP_C_EncryptFinal: return OP_C_Encrypt;
    case OP_C_DecryptInit: case OP_C_Decrypt: case OP_C_DecryptUpdate: case OP_C_DecryptFinal: return OP_C_Decrypt;
    case OP_C_SignInit: case OP_C_Sign: case OP_C_SignUpdate: case OP_C_SignFinal: return OP_C_Sign;
    case OP_C_VerifyInit: case OP_C_Verify: case OP_C_VerifyUpdate: case OP_C_VerifyFinal: return OP_C_Verify;
    default: return 0;
    }
}

static dop_t **direct_slot(CK_SESSION_HANDLE s, uint16_t kind) {
    dop_t **pp = &g_direct[(s * 4 + kind) % DIRECT_BUCKETS];
    while (*pp && !((*pp)->s == s && (*pp)->kind == kind)) pp = &(*pp)->next;
    return pp;
}

static void dop_free(dop_t *d) {
    if (!d) return;
    free(d->desc);
    memset(d, 0, sizeof *d); /* tickets */
    free(d);
}

/* kind 0: every kind of the session. */
static void direct_forget(CK_SESSION_HANDLE s, uint16_t kind) {
    pthread_mutex_lock(&g_direct_lock);
    for (int b = 0; b < DIRECT_BUCKETS; b++) {
        dop_t **pp = &g_direct[b];
        while (*pp) {
            dop_t *d = *pp;
            if (d->s == s && (!kind || d->kind == kind)) {
                *pp = d->next;
                dop_free(d);
            } else {
                pp = &d->next;
            }
        }
    }
    pthread_mutex_unlock(&g_direct_lock);
}

static void direct_clear_all(void) {
    pthread_mutex_lock(&g_direct_lock);
    for (int b = 0; b < DIRECT_BUCKETS; b++) {
        while (g_direct[b]) {
            dop_t *d = g_direct[b];
            g_direct[b] = d->next;
            dop_free(d);
        }
    }
    pthread_mutex_unlock(&g_direct_lock);
}

static void direct_drop(CK_SESSION_HANDLE s, uint16_t kind) {
    pthread_mutex_lock(&g_direct_lock);
    dop_t **pp = direct_slot(s, kind);
    dop_t *d = *pp;
    if (d) {
        *pp = d->next;
        dop_free(d);
    }
    pthread_mutex_unlock(&g_direct_lock);
}

/* The operation was finished on a node: remembered until the daemon is told. */
static void direct_end(CK_SESSION_HANDLE s, uint16_t kind) {
    pthread_mutex_lock(&g_direct_lock);
    dop_t *d = *direct_slot(s, kind);
    if (d) d->ended = 1;
    pthread_mutex_unlock(&g_direct_lock);
}

/* The header flags of a daemon request `op` whose body starts with the session handle; an
 * ended operation's record goes with it. A multi-part call takes the operation back to the
 * daemon (its record is dropped). */
static uint16_t direct_flags(uint16_t op, const hs_wbuf *w) {
    uint16_t kind = dkind(op);
    if (!kind || w->oom || w->len < HS_HDR_RESERVE + 8) return 0;
    uint64_t s = 0;
    for (int i = 7; i >= 0; i--) s = (s << 8) | w->p[HS_HDR_RESERVE + i];
    int init = op == OP_C_EncryptInit || op == OP_C_DecryptInit || op == OP_C_SignInit || op == OP_C_VerifyInit;
    uint16_t flags = 0;
    pthread_mutex_lock(&g_direct_lock);
    dop_t **pp = direct_slot((CK_SESSION_HANDLE)s, kind);
    dop_t *d = *pp;
    /* an active direct operation survives a refused Init (CKR_OPERATION_ACTIVE) */
    if (d && (d->ended || !init)) {
        if (d->ended) flags = HS_FLAG_DIRECT_DONE;
        *pp = d->next;
        dop_free(d);
    }
    pthread_mutex_unlock(&g_direct_lock);
    return flags;
}

/* The direct section of an Init reply (protocol 1.3). */
static void direct_record(CK_SESSION_HANDLE s, uint16_t kind, hs_rbuf *r) {
    uint8_t n = hs_r_u8(r);
    if (r->err || n == 0) {
        direct_drop(s, kind);
        return;
    }
    dop_t *d = calloc(1, sizeof *d);
    size_t dn = 0;
    const uint8_t *desc = hs_r_bytes(r, &dn);
    if (!d || r->err || !(d->desc = malloc(dn ? dn : 1))) {
        free(d);
        direct_drop(s, kind);
        return;
    }
    memcpy(d->desc, desc, dn);
    d->desclen = dn;
    d->s = s;
    d->kind = kind;
    for (int i = 0; i < n; i++) {
        size_t pn = 0, tn = 0, mn = 0;
        const uint8_t *p = hs_r_bytes(r, &pn);
        const uint8_t *t = hs_r_bytes(r, &tn);
        const uint8_t *m = hs_r_bytes(r, &mn);
        uint32_t to = hs_r_u32(r);
        if (r->err) break;
        if (d->n >= DIRECT_MAX_HOLDERS || pn >= sizeof d->h[0].path || tn != 32 || mn != 16) continue;
        dholder_t *h = &d->h[d->n++];
        memcpy(h->path, p, pn);
        h->path[pn] = 0;
        memcpy(h->ticket, t, 32);
        memcpy(h->mac, m, 16);
        h->timeout_ms = to;
    }
    if (r->err || d->n == 0) {
        dop_free(d);
        direct_drop(s, kind);
        return;
    }
    pthread_mutex_lock(&g_direct_lock);
    dop_t **pp = direct_slot(s, kind);
    if (*pp) {
        dop_t *old = *pp;
        *pp = old->next;
        dop_free(old);
    }
    d->next = g_direct[(s * 4 + kind) % DIRECT_BUCKETS];
    g_direct[(s * 4 + kind) % DIRECT_BUCKETS] = d;
    pthread_mutex_unlock(&g_direct_lock);
}

/* A single-part call on a node: 1 when answered (*rv), 0 when it goes to the daemon. */
static int direct_try(CK_SESSION_HANDLE h, uint16_t op, const uint8_t *in, size_t inlen, const uint8_t *sig,
                      size_t siglen, CK_BYTE_PTR out, CK_ULONG_PTR outlen, CK_RV *rv) {
    dholder_t holder;
    uint8_t *desc = NULL;
    size_t desclen = 0;
    pthread_mutex_lock(&g_direct_lock);
    dop_t *d = *direct_slot(h, op);
    if (d && !d->ended && (desc = malloc(d->desclen ? d->desclen : 1))) {
        holder = d->h[0];
        memcpy(desc, d->desc, d->desclen);
        desclen = d->desclen;
    }
    pthread_mutex_unlock(&g_direct_lock);
    if (!desc) return 0;
    uint8_t verb = op == OP_C_Encrypt ? 1 : op == OP_C_Decrypt ? 2 : op == OP_C_Sign ? 3 : 4;
    uint8_t *res = NULL;
    size_t rn = 0;
    CK_RV nrv = CKR_OK;
    int fallback = 0;
    int got = hs_node_call(holder.path, holder.timeout_ms, verb, holder.ticket, 32, desc, desclen, holder.mac, 16, in,
                           inlen, sig, siglen, &res, &rn, &nrv, &fallback);
    free(desc);
    if (got != 0 || fallback) { /* the daemon retries and fails over; it holds the operation */
        wipe_free(res, rn);
        direct_drop(h, op);
        return 0;
    }
    if (op == OP_C_Verify || nrv != CKR_OK) { /* an answer other than BUFFER_TOO_SMALL ends it */
        direct_end(h, op);
        *rv = nrv;
    } else if (!out || *outlen < rn) { /* the result is kept for the follow-up call */
        spec_store(h, op, in, inlen, res, rn);
        *rv = out ? CKR_BUFFER_TOO_SMALL : CKR_OK;
        *outlen = (CK_ULONG)rn;
    } else {
        if (rn) memcpy(out, res, rn);
        *outlen = (CK_ULONG)rn;
        direct_end(h, op);
        *rv = CKR_OK;
    }
    wipe_free(res, rn);
    return 1;
}

/* A child forked while another thread held one of these locks must not inherit it held. */
static void module_atfork_child(void) {
    pthread_mutex_init(&g_state, NULL);
    pthread_mutex_init(&g_spec_lock, NULL);
    pthread_mutex_init(&g_direct_lock, NULL);
}

/* Replies may carry plaintext or key bytes: wipe them before freeing. */
static void hs_release(uint8_t *mem, const hs_rbuf *r) {
    if (!mem) return;
    volatile uint8_t *v = mem;
    for (size_t i = 0; i < r->len; i++) v[i] = 0;
    free(mem);
}

/* ---- request encoding helpers ------------------------------------------------------------ */
static void req_begin(hs_wbuf *w) {
    hs_w_init(w);
    for (int i = 0; i < HS_HDR_RESERVE; i++) hs_w_u8(w, 0);
}

static CK_RV enc_template(hs_wbuf *w, CK_ATTRIBUTE_PTR t, CK_ULONG n) {
    if (!t && n) return CKR_ARGUMENTS_BAD;
    if (n > 4096) return CKR_ARGUMENTS_BAD;
    hs_w_u32(w, (uint32_t)n);
    for (CK_ULONG i = 0; i < n; i++) {
        if (!t[i].pValue && t[i].ulValueLen) return CKR_ARGUMENTS_BAD;
        if (t[i].ulValueLen > HSMSIM_MAX_FRAME) return CKR_ARGUMENTS_BAD;
        hs_w_u64(w, t[i].type);
        hs_w_bytes(w, t[i].pValue, t[i].ulValueLen);
    }
    return CKR_OK;
}

static int is_gcm(CK_MECHANISM_TYPE m) { return m == CKM_AES_GCM || m == CKM_CLOUDHSM_AES_GCM; }
static int is_pss(CK_MECHANISM_TYPE m) {
    return m == CKM_RSA_PKCS_PSS || m == CKM_SHA1_RSA_PKCS_PSS || m == CKM_SHA224_RSA_PKCS_PSS ||
           m == CKM_SHA256_RSA_PKCS_PSS || m == CKM_SHA384_RSA_PKCS_PSS || m == CKM_SHA512_RSA_PKCS_PSS;
}

#define PARAM_AS(type)                                                        \
    if (m->ulParameterLen != sizeof(type) || !m->pParameter) return CKR_MECHANISM_PARAM_INVALID; \
    const type *p = (const type *)m->pParameter

static CK_RV enc_mechanism(hs_wbuf *w, CK_MECHANISM_PTR m) {
    if (!m) return CKR_ARGUMENTS_BAD;
    if (!m->pParameter && m->ulParameterLen) return CKR_ARGUMENTS_BAD;
    hs_w_u64(w, m->mechanism);
    if (is_gcm(m->mechanism)) {
        PARAM_AS(CK_GCM_PARAMS);
        if ((!p->pIv && p->ulIvLen) || (!p->pAAD && p->ulAADLen)) return CKR_MECHANISM_PARAM_INVALID;
        if (p->ulIvLen > 1024 || p->ulAADLen > HSMSIM_MAX_FRAME) return CKR_MECHANISM_PARAM_INVALID;
        hs_w_u8(w, PK_GCM);
        hs_w_u8(w, p->pIv ? 1 : 0);
        hs_w_bytes(w, p->pIv, p->ulIvLen);
        hs_w_u64(w, p->ulIvBits);
        hs_w_bytes(w, p->pAAD, p->ulAADLen);
        hs_w_u64(w, p->ulTagBits);
    } else if (m->mechanism == CKM_RSA_PKCS_OAEP) {
        PARAM_AS(CK_RSA_PKCS_OAEP_PARAMS);
        if (!p->pSourceData && p->ulSourceDataLen) return CKR_MECHANISM_PARAM_INVALID;
        if (p->ulSourceDataLen > 65536) return CKR_MECHANISM_PARAM_INVALID;
        hs_w_u8(w, PK_OAEP);
        hs_w_u64(w, p->hashAlg);
        hs_w_u64(w, p->mgf);
        hs_w_u64(w, p->source);
        hs_w_bytes(w, p->pSourceData, p->ulSourceDataLen);
    } else if (m->mechanism == CKM_RSA_AES_KEY_WRAP) {
        /* ulAESKeyBits, then the nested OAEP parameters (a NULL pOAEPParams is refused here;
         * the daemon checks the values). */
        PARAM_AS(CK_RSA_AES_KEY_WRAP_PARAMS);
        const CK_RSA_PKCS_OAEP_PARAMS *o = p->pOAEPParams;
        if (!o) return CKR_MECHANISM_PARAM_INVALID;
        if (!o->pSourceData && o->ulSourceDataLen) return CKR_MECHANISM_PARAM_INVALID;
        if (o->ulSourceDataLen > 65536) return CKR_MECHANISM_PARAM_INVALID;
        hs_w_u8(w, PK_RSA_AES);
        hs_w_u64(w, p->ulAESKeyBits);
        hs_w_u64(w, o->hashAlg);
        hs_w_u64(w, o->mgf);
        hs_w_u64(w, o->source);
        hs_w_bytes(w, o->pSourceData, o->ulSourceDataLen);
    } else if (is_pss(m->mechanism)) {
        PARAM_AS(CK_RSA_PKCS_PSS_PARAMS);
        hs_w_u8(w, PK_PSS);
        hs_w_u64(w, p->hashAlg);
        hs_w_u64(w, p->mgf);
        hs_w_u64(w, p->sLen);
    } else if (m->mechanism == CKM_AES_CTR) {
        PARAM_AS(CK_AES_CTR_PARAMS);
        hs_w_u8(w, PK_CTR);
        hs_w_u64(w, p->ulCounterBits);
        hs_w_bytes(w, p->cb, 16);
    } else if (m->mechanism == CKM_ECDH1_DERIVE || m->mechanism == CKM_ECDH1_COFACTOR_DERIVE) {
        PARAM_AS(CK_ECDH1_DERIVE_PARAMS);
        if ((!p->pSharedData && p->ulSharedDataLen) || (!p->pPublicData && p->ulPublicDataLen))
            return CKR_MECHANISM_PARAM_INVALID;
        if (p->ulSharedDataLen > 65536 || p->ulPublicDataLen > 65536) return CKR_MECHANISM_PARAM_INVALID;
        hs_w_u8(w, PK_ECDH1);
        hs_w_u64(w, p->kdf);
        hs_w_bytes(w, p->pSharedData, p->ulSharedDataLen);
        hs_w_bytes(w, p->pPublicData, p->ulPublicDataLen);
    } else if (m->mechanism == CKM_CLOUDHSM_SP800_108_COUNTER_KDF) {
        PARAM_AS(CK_SP800_108_KDF_PARAMS);
        if (!p->pDataParams && p->ulNumberOfDataParams) return CKR_MECHANISM_PARAM_INVALID;
        if (p->ulNumberOfDataParams > 64) return CKR_MECHANISM_PARAM_INVALID;
        hs_w_u8(w, PK_KDF108);
        hs_w_u64(w, p->prftype);
        hs_w_u32(w, (uint32_t)p->ulNumberOfDataParams);
        for (CK_ULONG i = 0; i < p->ulNumberOfDataParams; i++) {
            const CK_PRF_DATA_PARAM *d = &p->pDataParams[i];
            if ((!d->pValue && d->ulValueLen) || d->ulValueLen > 65536) return CKR_MECHANISM_PARAM_INVALID;
            hs_w_u64(w, d->type);
            hs_w_bytes(w, d->pValue, d->ulValueLen);
        }
    } else if (m->pParameter) {
        if (m->ulParameterLen > 65536) return CKR_MECHANISM_PARAM_INVALID;
        hs_w_u8(w, PK_RAW);
        hs_w_bytes(w, m->pParameter, m->ulParameterLen);
    } else {
        hs_w_u8(w, PK_NONE);
    }
    return CKR_OK;
}

static CK_RV enc_outspec(hs_wbuf *w, CK_BYTE_PTR out, CK_ULONG_PTR outlen) {
    if (!outlen) return CKR_ARGUMENTS_BAD;
    hs_w_u8(w, out ? 1 : 0);
    hs_w_u64(w, out ? *outlen : 0);
    return CKR_OK;
}

/* Output result: u64 needed length, u8 has-data, bytes data. */
static CK_RV dec_output(hs_rbuf *r, CK_RV rv, CK_BYTE_PTR out, CK_ULONG_PTR outlen) {
    if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL) return rv;
    uint64_t needed = hs_r_u64(r);
    uint8_t has = hs_r_u8(r);
    size_t n = 0;
    const uint8_t *d = hs_r_bytes(r, &n);
    if (r->err) return CKR_DEVICE_ERROR;
    if (rv == CKR_BUFFER_TOO_SMALL || !out) {
        *outlen = (CK_ULONG)needed;
        return rv;
    }
    if (!has) {
        *outlen = (CK_ULONG)needed;
        return CKR_OK;
    }
    if (n > *outlen) return CKR_DEVICE_ERROR;
    if (n) memcpy(out, d, n);
    *outlen = (CK_ULONG)n;
    return CKR_OK;
}

static void pad_copy(CK_UTF8CHAR *dst, size_t dstlen, const uint8_t *src, size_t n) {
    memset(dst, ' ', dstlen);
    memcpy(dst, src, n < dstlen ? n : dstlen);
}

static CK_RV pad_field(hs_rbuf *r, CK_UTF8CHAR *dst, size_t dstlen) {
    size_t n = 0;
    const uint8_t *s = hs_r_bytes(r, &n);
    if (r->err) return CKR_DEVICE_ERROR;
    pad_copy(dst, dstlen, s, n);
    return CKR_OK;
}

/* Runs one call; `body` runs on the reply when the gateway answered. */
#define CALL(op, w, r, mem, rv)                                     \
    uint8_t *mem = NULL;                                            \
    hs_rbuf r = {0};                                                \
    CK_RV rv = hs_call_flags(op, direct_flags(op, &w), &w, &r, &mem); \
    hs_w_free(&w)

#define ENC(expr) do { CK_RV e_ = (expr); if (e_ != CKR_OK) { hs_w_free(&w); return e_; } } while (0)

/* ---- general purpose ------------------------------------------------------------------- */
CK_RV C_Initialize(CK_VOID_PTR pInitArgs) {
    pthread_once(&g_once, register_atfork);
    if (pInitArgs) {
        CK_C_INITIALIZE_ARGS *a = (CK_C_INITIALIZE_ARGS *)pInitArgs;
        int some = a->CreateMutex || a->DestroyMutex || a->LockMutex || a->UnlockMutex;
        int all = a->CreateMutex && a->DestroyMutex && a->LockMutex && a->UnlockMutex;
        if (a->pReserved) return CKR_ARGUMENTS_BAD;
        if (some && !all) return CKR_ARGUMENTS_BAD;
        /* Application-supplied mutexes without CKF_OS_LOCKING_OK: we only use OS locks. */
        if (all && !(a->flags & CKF_OS_LOCKING_OK)) return CKR_CANT_LOCK;
    }
    pthread_mutex_lock(&g_state);
    if (g_init && g_pid == getpid()) {
        pthread_mutex_unlock(&g_state);
        return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    }
    if (g_init) { /* a forked child: its own connection, never the parent's */
        hs_forget_after_fork();
        spec_clear_all();
        direct_clear_all();
        g_init = 0;
    }
    CK_RV rv = hs_connect_init();
    if (rv == CKR_OK) {
        g_pid = getpid();
        g_init = 1;
    }
    pthread_mutex_unlock(&g_state);
    return rv;
}

CK_RV C_Finalize(CK_VOID_PTR pReserved) {
    if (pReserved) return CKR_ARGUMENTS_BAD;
    pthread_mutex_lock(&g_state);
    if (g_init && g_pid != getpid()) {
        /* A forked child finalising what its parent initialised (e.g. a host that re-initialises
         * after fork): drop the inherited connections without a word to the daemon, so the
         * parent's application lives on. */
        hs_forget_after_fork();
        spec_clear_all();
        direct_clear_all();
        g_init = 0;
        pthread_mutex_unlock(&g_state);
        return CKR_OK;
    }
    if (!ready()) {
        pthread_mutex_unlock(&g_state);
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    g_init = 0;
    hs_disconnect_all(1);
    spec_clear_all();
    direct_clear_all();
    pthread_mutex_unlock(&g_state);
    return CKR_OK;
}

CK_RV C_GetInfo(CK_INFO_PTR pInfo) {
    CHECK_INIT();
    if (!pInfo) return CKR_ARGUMENTS_BAD;
    memset(pInfo, 0, sizeof *pInfo);
    pInfo->cryptokiVersion.major = 2;
    pInfo->cryptokiVersion.minor = 40;
    pad_copy(pInfo->manufacturerID, 32, (const uint8_t *)"hsmsim", 6);
    pad_copy(pInfo->libraryDescription, 32, (const uint8_t *)"hsmsim CloudHSM PKCS#11 library", 31);
    pInfo->libraryVersion.major = 5;
    pInfo->libraryVersion.minor = 16;
    return CKR_OK;
}

#define HSMSIM_ENTRY(name, args) name,
static CK_FUNCTION_LIST g_functions = {{2, 40}, HSMSIM_FUNCTIONS(HSMSIM_ENTRY)};
#undef HSMSIM_ENTRY

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) {
    if (!ppFunctionList) return CKR_ARGUMENTS_BAD;
    *ppFunctionList = &g_functions;
    return CKR_OK;
}

/* ---- slots and tokens -------------------------------------------------------------------- */
static CK_RV dec_ulong_list(hs_rbuf *r, CK_RV rv, CK_ULONG_PTR list, CK_ULONG_PTR count) {
    if (rv != CKR_OK) return rv;
    uint32_t n = hs_r_u32(r);
    if (r->err || n > (r->len - r->pos) / 8) return CKR_DEVICE_ERROR;
    if (!list) { *count = n; return CKR_OK; }
    if (*count < n) { *count = n; return CKR_BUFFER_TOO_SMALL; }
    for (uint32_t i = 0; i < n; i++) list[i] = (CK_ULONG)hs_r_u64(r);
    *count = n;
    return CKR_OK;
}

CK_RV C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount) {
    CHECK_INIT();
    if (!pulCount) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u8(&w, tokenPresent ? 1 : 0);
    CALL(OP_C_GetSlotList, w, r, mem, rv);
    rv = dec_ulong_list(&r, rv, pSlotList, pulCount);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo) {
    CHECK_INIT();
    if (!pInfo) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, slotID);
    CALL(OP_C_GetSlotInfo, w, r, mem, rv);
    if (rv == CKR_OK) {
        CK_SLOT_INFO info;
        memset(&info, 0, sizeof info);
        if (pad_field(&r, info.slotDescription, 64) || pad_field(&r, info.manufacturerID, 32)) rv = CKR_DEVICE_ERROR;
        info.flags = (CK_FLAGS)hs_r_u64(&r);
        info.hardwareVersion.major = hs_r_u8(&r);
        info.hardwareVersion.minor = hs_r_u8(&r);
        info.firmwareVersion.major = hs_r_u8(&r);
        info.firmwareVersion.minor = hs_r_u8(&r);
        if (r.err) rv = CKR_DEVICE_ERROR;
        if (rv == CKR_OK) *pInfo = info;
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo) {
    CHECK_INIT();
    if (!pInfo) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, slotID);
    CALL(OP_C_GetTokenInfo, w, r, mem, rv);
    if (rv == CKR_OK) {
        CK_TOKEN_INFO t;
        memset(&t, 0, sizeof t);
        if (pad_field(&r, t.label, 32) || pad_field(&r, t.manufacturerID, 32) || pad_field(&r, t.model, 16) ||
            pad_field(&r, t.serialNumber, 16))
            rv = CKR_DEVICE_ERROR;
        t.flags = hs_r_u64(&r);
        t.ulMaxSessionCount = hs_r_u64(&r);
        t.ulSessionCount = hs_r_u64(&r);
        t.ulMaxRwSessionCount = hs_r_u64(&r);
        t.ulRwSessionCount = hs_r_u64(&r);
        t.ulMaxPinLen = hs_r_u64(&r);
        t.ulMinPinLen = hs_r_u64(&r);
        t.ulTotalPublicMemory = hs_r_u64(&r);
        t.ulFreePublicMemory = hs_r_u64(&r);
        t.ulTotalPrivateMemory = hs_r_u64(&r);
        t.ulFreePrivateMemory = hs_r_u64(&r);
        t.hardwareVersion.major = hs_r_u8(&r);
        t.hardwareVersion.minor = hs_r_u8(&r);
        t.firmwareVersion.major = hs_r_u8(&r);
        t.firmwareVersion.minor = hs_r_u8(&r);
        if (pad_field(&r, t.utcTime, 16)) rv = CKR_DEVICE_ERROR;
        if (r.err) rv = CKR_DEVICE_ERROR;
        if (rv == CKR_OK) *pInfo = t;
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, CK_ULONG_PTR pulCount) {
    CHECK_INIT();
    if (!pulCount) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, slotID);
    CALL(OP_C_GetMechanismList, w, r, mem, rv);
    rv = dec_ulong_list(&r, rv, pMechanismList, pulCount);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo) {
    CHECK_INIT();
    if (!pInfo) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, slotID);
    hs_w_u64(&w, type);
    CALL(OP_C_GetMechanismInfo, w, r, mem, rv);
    if (rv == CKR_OK) {
        CK_MECHANISM_INFO i;
        i.ulMinKeySize = hs_r_u64(&r);
        i.ulMaxKeySize = hs_r_u64(&r);
        i.flags = hs_r_u64(&r);
        if (r.err) rv = CKR_DEVICE_ERROR; else *pInfo = i;
    }
    hs_release(mem, &r);
    return rv;
}

/* CloudHSM's SDK 5 API list has no token/PIN administration, operation state, recover, dual
 * or key-digest functions, nor slot events: they exist in the function list and say so. */
CK_RV C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pLabel) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_InitPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_SetPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen, CK_UTF8CHAR_PTR pNewPin,
               CK_ULONG ulNewLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}

/* ---- sessions ---------------------------------------------------------------------------- */
static CK_RV simple_session_call(uint16_t op, CK_SESSION_HANDLE h) {
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, h);
    CALL(op, w, r, mem, rv);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify,
                    CK_SESSION_HANDLE_PTR phSession) {
    CHECK_INIT();
    if (!phSession) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, slotID);
    hs_w_u64(&w, flags);
    CALL(OP_C_OpenSession, w, r, mem, rv);
    if (rv == CKR_OK) {
        CK_SESSION_HANDLE h = hs_r_u64(&r);
        if (r.err) rv = CKR_DEVICE_ERROR; else *phSession = h;
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_CloseSession(CK_SESSION_HANDLE hSession) {
    CHECK_INIT();
    CK_RV rv = simple_session_call(OP_C_CloseSession, hSession);
    if (rv == CKR_OK) {
        spec_forget(hSession, 0);
        direct_forget(hSession, 0);
    }
    return rv;
}

CK_RV C_CloseAllSessions(CK_SLOT_ID slotID) {
    CHECK_INIT();
    CK_RV rv = simple_session_call(OP_C_CloseAllSessions, slotID);
    if (rv == CKR_OK) {
        spec_clear_all();
        direct_clear_all();
    }
    return rv;
}

CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo) {
    CHECK_INIT();
    if (!pInfo) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    CALL(OP_C_GetSessionInfo, w, r, mem, rv);
    if (rv == CKR_OK) {
        CK_SESSION_INFO i;
        i.slotID = hs_r_u64(&r);
        i.state = hs_r_u64(&r);
        i.flags = hs_r_u64(&r);
        i.ulDeviceError = hs_r_u64(&r);
        if (r.err) rv = CKR_DEVICE_ERROR; else *pInfo = i;
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, CK_ULONG_PTR pulOperationStateLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_SetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, CK_ULONG ulOperationStateLen,
                          CK_OBJECT_HANDLE hEncryptionKey, CK_OBJECT_HANDLE hAuthenticationKey) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}

CK_RV C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen) {
    CHECK_INIT();
    /* No protected authentication path: a PIN is always required. */
    if (!pPin) return CKR_ARGUMENTS_BAD;
    if (ulPinLen > 4096) return CKR_PIN_LEN_RANGE_;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, userType);
    hs_w_bytes(&w, pPin, ulPinLen);
    CALL(OP_C_Login, w, r, mem, rv);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_Logout(CK_SESSION_HANDLE hSession) {
    CHECK_INIT();
    CK_RV rv = simple_session_call(OP_C_Logout, hSession);
    if (rv == CKR_OK) direct_clear_all(); /* the daemon ended every operation; tickets die */
    return rv;
}

/* ---- objects ----------------------------------------------------------------------------- */
static CK_RV dec_handle(hs_rbuf *r, CK_RV rv, CK_OBJECT_HANDLE_PTR out) {
    if (rv != CKR_OK) return rv;
    CK_OBJECT_HANDLE h = hs_r_u64(r);
    if (r->err) return CKR_DEVICE_ERROR;
    *out = h;
    return CKR_OK;
}

CK_RV C_CreateObject(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                     CK_OBJECT_HANDLE_PTR phObject) {
    CHECK_INIT();
    if (!phObject) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_template(&w, pTemplate, ulCount));
    CALL(OP_C_CreateObject, w, r, mem, rv);
    rv = dec_handle(&r, rv, phObject);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_CopyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate,
                   CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phNewObject) {
    CHECK_INIT();
    if (!phNewObject) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, hObject);
    ENC(enc_template(&w, pTemplate, ulCount));
    CALL(OP_C_CopyObject, w, r, mem, rv);
    rv = dec_handle(&r, rv, phNewObject);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject) {
    CHECK_INIT();
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, hObject);
    CALL(OP_C_DestroyObject, w, r, mem, rv);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetObjectSize(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ULONG_PTR pulSize) {
    CHECK_INIT();
    if (!pulSize) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, hObject);
    CALL(OP_C_GetObjectSize, w, r, mem, rv);
    rv = dec_handle(&r, rv, pulSize);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate,
                          CK_ULONG ulCount) {
    CHECK_INIT();
    if (!pTemplate && ulCount) return CKR_ARGUMENTS_BAD;
    if (ulCount > 4096) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, hObject);
    hs_w_u32(&w, (uint32_t)ulCount);
    for (CK_ULONG i = 0; i < ulCount; i++) {
        hs_w_u64(&w, pTemplate[i].type);
        hs_w_u8(&w, pTemplate[i].pValue ? 1 : 0);
        hs_w_u64(&w, pTemplate[i].pValue ? pTemplate[i].ulValueLen : 0);
    }
    CALL(OP_C_GetAttributeValue, w, r, mem, rv);
    /* The per-attribute results come with OK and with the three "partial" return values. */
    if (rv == CKR_OK || rv == CKR_ATTRIBUTE_SENSITIVE_ || rv == CKR_ATTRIBUTE_TYPE_INVALID_ ||
        rv == CKR_BUFFER_TOO_SMALL) {
        uint32_t n = hs_r_u32(&r);
        if (r.err || n != ulCount) {
            rv = CKR_DEVICE_ERROR;
        } else {
            for (CK_ULONG i = 0; i < ulCount && !r.err; i++) {
                uint64_t len = hs_r_u64(&r);
                uint8_t has = hs_r_u8(&r);
                size_t dn = 0;
                const uint8_t *d = hs_r_bytes(&r, &dn);
                if (r.err) break;
                if (has) {
                    if (!pTemplate[i].pValue || dn > pTemplate[i].ulValueLen) { r.err = 1; break; }
                    if (dn) memcpy(pTemplate[i].pValue, d, dn);
                    pTemplate[i].ulValueLen = (CK_ULONG)dn;
                } else {
                    pTemplate[i].ulValueLen = (CK_ULONG)len;
                }
            }
            if (r.err) rv = CKR_DEVICE_ERROR;
        }
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_SetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate,
                          CK_ULONG ulCount) {
    CHECK_INIT();
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, hObject);
    ENC(enc_template(&w, pTemplate, ulCount));
    CALL(OP_C_SetAttributeValue, w, r, mem, rv);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) {
    CHECK_INIT();
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_template(&w, pTemplate, ulCount));
    CALL(OP_C_FindObjectsInit, w, r, mem, rv);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, CK_ULONG ulMaxObjectCount,
                    CK_ULONG_PTR pulObjectCount) {
    CHECK_INIT();
    if (!phObject || !pulObjectCount) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, ulMaxObjectCount);
    CALL(OP_C_FindObjects, w, r, mem, rv);
    if (rv == CKR_OK) {
        uint32_t n = hs_r_u32(&r);
        if (r.err || n > ulMaxObjectCount || n > (r.len - r.pos) / 8) {
            rv = CKR_DEVICE_ERROR;
        } else {
            for (uint32_t i = 0; i < n; i++) phObject[i] = hs_r_u64(&r);
            *pulObjectCount = n;
        }
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession) {
    CHECK_INIT();
    return simple_session_call(OP_C_FindObjectsFinal, hSession);
}

/* ---- crypto: shared shapes ----------------------------------------------------------------- */
/* A *Init call. With `iv` (C_EncryptInit, protocol 1.2) the reply's `bytes iv` is copied into
 * iv[0..ivcap) before returning: the only moment the module may write through the caller's pIv. */
static CK_RV init_call_iv(uint16_t op, CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, int with_key, CK_OBJECT_HANDLE key,
                          CK_BYTE_PTR iv, CK_ULONG ivcap) {
    CHECK_INIT();
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, h);
    ENC(enc_mechanism(&w, m));
    if (with_key) hs_w_u64(&w, key);
    CALL(op, w, r, mem, rv);
    if (rv == CKR_OK && op == OP_C_EncryptInit && hs_peer_minor() >= 2) {
        size_t n = 0;
        const uint8_t *d = hs_r_bytes(&r, &n);
        if (iv) {
            if (r.err || !n) rv = CKR_DEVICE_ERROR; /* the gateway draws an IV for every CKM_AES_GCM */
            else memcpy(iv, d, n < ivcap ? n : ivcap);
        }
    }
    if (rv == CKR_OK && dkind(op) && hs_peer_minor() >= 3) direct_record(h, dkind(op), &r);
    hs_release(mem, &r);
    return rv;
}

static CK_RV init_call(uint16_t op, CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, int with_key, CK_OBJECT_HANDLE key) {
    return init_call_iv(op, h, m, with_key, key, NULL, 0);
}

/* data in, output buffer out; `iv` says the reply also carries an HSM-generated IV (ignored: for
 * CKM_AES_GCM it reached the caller's pIv at C_EncryptInit; nothing is written through pIv now). */
static CK_RV data_out_call(uint16_t op, CK_SESSION_HANDLE h, int with_data, CK_BYTE_PTR in, CK_ULONG inlen,
                           CK_BYTE_PTR out, CK_ULONG_PTR outlen, int iv) {
    CHECK_INIT();
    if (with_data && !in && inlen) return CKR_ARGUMENTS_BAD;
    if (!outlen) return CKR_ARGUMENTS_BAD;
    /* FIDELITY: one call carries at most the 64 MiB frame; CloudHSM hashes single-part input of
     * any size. Larger inputs need the multi-part calls. */
    if (with_data && inlen > HSMSIM_MAX_FRAME - 4096) return CKR_DATA_LEN_RANGE;
    if (spec_done(h, op)) return CKR_OPERATION_NOT_INITIALIZED_;
    int single = op == OP_C_Encrypt || op == OP_C_Decrypt || op == OP_C_Sign || op == OP_C_Digest;
    if (single && out) {
        CK_RV rv = CKR_OK;
        if (spec_serve(h, op, in, inlen, out, outlen, &rv)) {
            if (rv == CKR_OK) direct_end(h, op); /* delivered: a direct operation is over */
            return rv;
        }
    }
    if (single && op != OP_C_Digest && inlen <= HS_DIRECT_MAX_FRAME - 4096) {
        CK_RV rv = CKR_OK;
        if (direct_try(h, op, in, inlen, NULL, 0, out, outlen, &rv)) return rv;
    }
    int speculate = single && !out && inlen <= SPEC_MAX && hs_peer_minor() >= 1;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, h);
    if (with_data) hs_w_bytes(&w, in, inlen);
    hs_w_u8(&w, out ? 1 : (speculate ? 2 : 0));
    hs_w_u64(&w, out ? *outlen : 0);
    CALL(op, w, r, mem, rv);
    if (speculate && rv == CKR_OK) {
        uint64_t needed = hs_r_u64(&r);
        uint8_t has = hs_r_u8(&r);
        size_t n = 0, ivn = 0;
        const uint8_t *d = hs_r_bytes(&r, &n);
        if (iv) (void)hs_r_bytes(&r, &ivn);
        if (r.err) {
            rv = CKR_DEVICE_ERROR;
        } else {
            if (has && n == needed && n <= SPEC_MAX) spec_store(h, op, in, inlen, d, n);
            *outlen = (CK_ULONG)needed;
        }
        hs_release(mem, &r);
        return rv;
    }
    rv = dec_output(&r, rv, out, outlen);
    hs_release(mem, &r);
    return rv;
}

static CK_RV data_in_call(uint16_t op, CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG inlen, int with_sig,
                          CK_BYTE_PTR sig, CK_ULONG siglen) {
    CHECK_INIT();
    if (!in && inlen) return CKR_ARGUMENTS_BAD;
    if (with_sig && !sig && siglen) return CKR_ARGUMENTS_BAD;
    if (inlen > HSMSIM_MAX_FRAME - 4096) return CKR_DATA_LEN_RANGE;
    if (spec_done(h, op)) return CKR_OPERATION_NOT_INITIALIZED_;
    if (op == OP_C_Verify && inlen + siglen <= HS_DIRECT_MAX_FRAME - 4096) {
        CK_RV rv = CKR_OK;
        if (direct_try(h, op, in, inlen, sig, siglen, NULL, NULL, &rv)) return rv;
    }
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, h);
    hs_w_bytes(&w, in, inlen);
    if (with_sig) hs_w_bytes(&w, sig, siglen);
    CALL(op, w, r, mem, rv);
    hs_release(mem, &r);
    return rv;
}

/* ---- encrypt / decrypt ------------------------------------------------------------------ */
CK_RV C_EncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
    CHECK_INIT();
    spec_forget(hSession, OP_C_Encrypt);
    CK_BYTE_PTR iv = NULL;
    CK_ULONG ivcap = 0;
    if (pMechanism && pMechanism->mechanism == CKM_AES_GCM && pMechanism->pParameter &&
        pMechanism->ulParameterLen == sizeof(CK_GCM_PARAMS)) {
        /* FIDELITY: CloudHSM writes the HSM's IV into pIv at C_Encrypt; here it is written now,
         * before C_EncryptInit returns (the daemon draws it at Init), so that no caller pointer
         * is used after its call. A 1.1 daemon only sends the IV at C_Encrypt: refused. */
        if (hs_peer_minor() < 2) return CKR_DEVICE_ERROR;
        const CK_GCM_PARAMS *p = (const CK_GCM_PARAMS *)pMechanism->pParameter;
        iv = p->pIv;
        ivcap = p->ulIvLen;
    }
    return init_call_iv(OP_C_EncryptInit, hSession, pMechanism, 1, hKey, iv, ivcap);
}
CK_RV C_Encrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pEncryptedData,
                CK_ULONG_PTR pulEncryptedDataLen) {
    return data_out_call(OP_C_Encrypt, hSession, 1, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen, 1);
}
CK_RV C_EncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart,
                      CK_ULONG_PTR pulEncryptedPartLen) {
    return data_out_call(OP_C_EncryptUpdate, hSession, 1, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen, 0);
}
CK_RV C_EncryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart, CK_ULONG_PTR pulLastEncryptedPartLen) {
    return data_out_call(OP_C_EncryptFinal, hSession, 0, NULL, 0, pLastEncryptedPart, pulLastEncryptedPartLen, 1);
}
CK_RV C_DecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
    spec_forget(hSession, OP_C_Decrypt);
    return init_call(OP_C_DecryptInit, hSession, pMechanism, 1, hKey);
}
CK_RV C_Decrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData, CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData,
                CK_ULONG_PTR pulDataLen) {
    return data_out_call(OP_C_Decrypt, hSession, 1, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen, 0);
}
CK_RV C_DecryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen,
                      CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen) {
    return data_out_call(OP_C_DecryptUpdate, hSession, 1, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen, 0);
}
CK_RV C_DecryptFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart, CK_ULONG_PTR pulLastPartLen) {
    return data_out_call(OP_C_DecryptFinal, hSession, 0, NULL, 0, pLastPart, pulLastPartLen, 0);
}

/* ---- digest ------------------------------------------------------------------------------ */
CK_RV C_DigestInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism) {
    spec_forget(hSession, OP_C_Digest);
    return init_call(OP_C_DigestInit, hSession, pMechanism, 0, 0);
}
CK_RV C_Digest(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pDigest,
               CK_ULONG_PTR pulDigestLen) {
    return data_out_call(OP_C_Digest, hSession, 1, pData, ulDataLen, pDigest, pulDigestLen, 0);
}
CK_RV C_DigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) {
    return data_in_call(OP_C_DigestUpdate, hSession, pPart, ulPartLen, 0, NULL, 0);
}
CK_RV C_DigestKey(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_DigestFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen) {
    return data_out_call(OP_C_DigestFinal, hSession, 0, NULL, 0, pDigest, pulDigestLen, 0);
}

/* ---- sign / verify ----------------------------------------------------------------------- */
CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
    spec_forget(hSession, OP_C_Sign);
    return init_call(OP_C_SignInit, hSession, pMechanism, 1, hKey);
}
CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature,
             CK_ULONG_PTR pulSignatureLen) {
    return data_out_call(OP_C_Sign, hSession, 1, pData, ulDataLen, pSignature, pulSignatureLen, 0);
}
CK_RV C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) {
    return data_in_call(OP_C_SignUpdate, hSession, pPart, ulPartLen, 0, NULL, 0);
}
CK_RV C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen) {
    return data_out_call(OP_C_SignFinal, hSession, 0, NULL, 0, pSignature, pulSignatureLen, 0);
}
CK_RV C_SignRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_SignRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature,
                    CK_ULONG_PTR pulSignatureLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_VerifyInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
    return init_call(OP_C_VerifyInit, hSession, pMechanism, 1, hKey);
}
CK_RV C_Verify(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature,
               CK_ULONG ulSignatureLen) {
    return data_in_call(OP_C_Verify, hSession, pData, ulDataLen, 1, pSignature, ulSignatureLen);
}
CK_RV C_VerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen) {
    return data_in_call(OP_C_VerifyUpdate, hSession, pPart, ulPartLen, 0, NULL, 0);
}
CK_RV C_VerifyFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen) {
    return data_in_call(OP_C_VerifyFinal, hSession, pSignature, ulSignatureLen, 0, NULL, 0);
}
CK_RV C_VerifyRecoverInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_VerifyRecover(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen, CK_BYTE_PTR pData,
                      CK_ULONG_PTR pulDataLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_DigestEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
                            CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_DecryptDigestUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen,
                            CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_SignEncryptUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
                          CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
CK_RV C_DecryptVerifyUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen,
                            CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}

/* ---- keys -------------------------------------------------------------------------------- */
CK_RV C_GenerateKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pTemplate,
                    CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phKey) {
    CHECK_INIT();
    if (!phKey) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_mechanism(&w, pMechanism));
    ENC(enc_template(&w, pTemplate, ulCount));
    CALL(OP_C_GenerateKey, w, r, mem, rv);
    rv = dec_handle(&r, rv, phKey);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_GenerateKeyPair(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pPublicKeyTemplate,
                        CK_ULONG ulPublicKeyAttributeCount, CK_ATTRIBUTE_PTR pPrivateKeyTemplate,
                        CK_ULONG ulPrivateKeyAttributeCount, CK_OBJECT_HANDLE_PTR phPublicKey,
                        CK_OBJECT_HANDLE_PTR phPrivateKey) {
    CHECK_INIT();
    if (!phPublicKey || !phPrivateKey) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_mechanism(&w, pMechanism));
    ENC(enc_template(&w, pPublicKeyTemplate, ulPublicKeyAttributeCount));
    ENC(enc_template(&w, pPrivateKeyTemplate, ulPrivateKeyAttributeCount));
    CALL(OP_C_GenerateKeyPair, w, r, mem, rv);
    if (rv == CKR_OK) {
        CK_OBJECT_HANDLE pub = hs_r_u64(&r), priv = hs_r_u64(&r);
        if (r.err) rv = CKR_DEVICE_ERROR;
        else { *phPublicKey = pub; *phPrivateKey = priv; }
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_WrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hWrappingKey,
                CK_OBJECT_HANDLE hKey, CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen) {
    CHECK_INIT();
    if (!pulWrappedKeyLen) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_mechanism(&w, pMechanism));
    hs_w_u64(&w, hWrappingKey);
    hs_w_u64(&w, hKey);
    ENC(enc_outspec(&w, pWrappedKey, pulWrappedKeyLen));
    CALL(OP_C_WrapKey, w, r, mem, rv);
    CK_RV orig = rv;
    rv = dec_output(&r, rv, pWrappedKey, pulWrappedKeyLen);
    if (orig == CKR_OK && pMechanism->mechanism == CKM_AES_GCM) {
        size_t n = 0;
        const uint8_t *d = hs_r_bytes(&r, &n);
        const CK_GCM_PARAMS *p = (const CK_GCM_PARAMS *)pMechanism->pParameter;
        if (!r.err && n && p->pIv) memcpy(p->pIv, d, n < p->ulIvLen ? n : p->ulIvLen);
    }
    hs_release(mem, &r);
    return rv;
}

CK_RV C_UnwrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hUnwrappingKey,
                  CK_BYTE_PTR pWrappedKey, CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate,
                  CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey) {
    CHECK_INIT();
    if (!phKey || (!pWrappedKey && ulWrappedKeyLen)) return CKR_ARGUMENTS_BAD;
    if (ulWrappedKeyLen > HSMSIM_MAX_FRAME - 4096) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_mechanism(&w, pMechanism));
    hs_w_u64(&w, hUnwrappingKey);
    hs_w_bytes(&w, pWrappedKey, ulWrappedKeyLen);
    ENC(enc_template(&w, pTemplate, ulAttributeCount));
    CALL(OP_C_UnwrapKey, w, r, mem, rv);
    rv = dec_handle(&r, rv, phKey);
    hs_release(mem, &r);
    return rv;
}

CK_RV C_DeriveKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hBaseKey,
                  CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey) {
    CHECK_INIT();
    if (!phKey) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    ENC(enc_mechanism(&w, pMechanism));
    hs_w_u64(&w, hBaseKey);
    ENC(enc_template(&w, pTemplate, ulAttributeCount));
    CALL(OP_C_DeriveKey, w, r, mem, rv);
    rv = dec_handle(&r, rv, phKey);
    hs_release(mem, &r);
    return rv;
}

/* ---- random and legacy ------------------------------------------------------------------- */
CK_RV C_SeedRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}

CK_RV C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, CK_ULONG ulRandomLen) {
    CHECK_INIT();
    if (!RandomData && ulRandomLen) return CKR_ARGUMENTS_BAD;
    if (ulRandomLen > HSMSIM_MAX_FRAME - 4096) return CKR_ARGUMENTS_BAD;
    hs_wbuf w;
    req_begin(&w);
    hs_w_u64(&w, hSession);
    hs_w_u64(&w, ulRandomLen);
    CALL(OP_C_GenerateRandom, w, r, mem, rv);
    if (rv == CKR_OK) {
        size_t n = 0;
        const uint8_t *d = hs_r_bytes(&r, &n);
        if (r.err || n != ulRandomLen) rv = CKR_DEVICE_ERROR;
        else if (n) memcpy(RandomData, d, n);
    }
    hs_release(mem, &r);
    return rv;
}

/* Legacy parallel-function management: the 2.40 specification fixes these answers. */
CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE hSession) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_PARALLEL;
}
CK_RV C_CancelFunction(CK_SESSION_HANDLE hSession) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_PARALLEL;
}
CK_RV C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved) {
    CHECK_INIT();
    return CKR_FUNCTION_NOT_SUPPORTED;
}
