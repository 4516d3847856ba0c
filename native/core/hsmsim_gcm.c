/*
 * hsmsim_gcm.c - AES-GCM on a key context loaded once: single messages and batches.
 *
 * The key is expanded once into a template EVP_CIPHER_CTX. Operations never touch the
 * template: they claim one of HSMSIM_GCM_SLOTS working copies with an atomic flag (made
 * lazily with EVP_CIPHER_CTX_copy), so that several threads can use one context at once and
 * a single thread pays only for setting the IV. If every slot is busy the call makes a
 * temporary copy and frees it afterwards.
 *
 * The tag is checked by libcrypto's GCM (EVP_DecryptFinal_ex compares with CRYPTO_memcmp);
 * every failure on decrypt becomes HSMSIM_ERR_TAG and the plaintext written so far is
 * wiped.
 */
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "hsmsim_internal.h"

#define HSMSIM_GCM_SLOTS 8
#define HSMSIM_GCM_IV_MAX 128
#define HSMSIM_GCM_TAG_MIN 4
#define HSMSIM_GCM_TAG_MAX 16
#define HSMSIM_GCM_DEFAULT_IV 12
#define HSMSIM_GCM_MAX_THREADS 8
/* Fixed cost of one message, in bytes of bulk encryption, for splitting batches evenly. */
#define HSMSIM_GCM_MSG_COST 512

typedef struct {
    atomic_flag busy;
    EVP_CIPHER_CTX *ctx; /* NULL until first claimed */
    size_t iv_len;       /* IV length the working copy is set to */
} gcm_slot;

struct hsmsim_gcm {
    EVP_CIPHER_CTX *tmpl;
    gcm_slot slots[HSMSIM_GCM_SLOTS];
};

static const EVP_CIPHER *gcm_cipher(size_t key_len)
{
    switch (key_len) {
    case 16: return EVP_aes_128_gcm();
    case 24: return EVP_aes_192_gcm();
    case 32: return EVP_aes_256_gcm();
    default: return NULL;
    }
}

int hsmsim_gcm_new(const uint8_t *key, size_t key_len, hsmsim_gcm **out)
{
    const EVP_CIPHER *cipher = gcm_cipher(key_len);
    hsmsim_gcm *g;

    if (out == NULL)
        return HSMSIM_ERR_ARG;
    *out = NULL;
    if (cipher == NULL || key == NULL)
        return HSMSIM_ERR_ARG;
    g = OPENSSL_zalloc(sizeof(*g));
    if (g == NULL)
        return hsmsim_fail(HSMSIM_ERR_NOMEM);
    for (int i = 0; i < HSMSIM_GCM_SLOTS; i++) {
        atomic_flag_clear(&g->slots[i].busy);
        g->slots[i].iv_len = HSMSIM_GCM_DEFAULT_IV;
    }
    g->tmpl = EVP_CIPHER_CTX_new();
    if (g->tmpl == NULL) {
        OPENSSL_free(g);
        return hsmsim_fail(HSMSIM_ERR_NOMEM);
    }
    /* Encrypt direction for the key schedule; GCM uses the forward cipher both ways. */
    if (EVP_EncryptInit_ex(g->tmpl, cipher, NULL, key, NULL) != 1) {
        hsmsim_gcm_free(g);
        return hsmsim_fail(HSMSIM_ERR_CRYPTO);
    }
    *out = g;
    return HSMSIM_OK;
}

void hsmsim_gcm_free(hsmsim_gcm *g)
{
    if (g == NULL)
        return;
    /* EVP_CIPHER_CTX_free -> the provider's freectx clears the key schedule. */
    for (int i = 0; i < HSMSIM_GCM_SLOTS; i++)
        EVP_CIPHER_CTX_free(g->slots[i].ctx);
    EVP_CIPHER_CTX_free(g->tmpl);
    OPENSSL_clear_free(g, sizeof(*g));
}

/* A claimed working context: either a pool slot or a temporary copy (slot == NULL). */
typedef struct {
    gcm_slot *slot;
    EVP_CIPHER_CTX *ctx;
    size_t *iv_len;
    size_t tmp_iv_len;
} gcm_work;

static int gcm_claim(hsmsim_gcm *g, gcm_work *w)
{
    for (int i = 0; i < HSMSIM_GCM_SLOTS; i++) {
        gcm_slot *s = &g->slots[i];
        if (atomic_flag_test_and_set_explicit(&s->busy, memory_order_acquire))
            continue;
        if (s->ctx == NULL) {
            EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
            if (c == NULL || EVP_CIPHER_CTX_copy(c, g->tmpl) != 1) {
                EVP_CIPHER_CTX_free(c);
                atomic_flag_clear_explicit(&s->busy, memory_order_release);
                return hsmsim_fail(HSMSIM_ERR_NOMEM);
            }
            s->ctx = c;
            s->iv_len = HSMSIM_GCM_DEFAULT_IV;
        }
        w->slot = s;
        w->ctx = s->ctx;
        w->iv_len = &s->iv_len;
        return HSMSIM_OK;
    }
    /* Every slot busy: a private copy for this call only. */
    w->slot = NULL;
    w->ctx = EVP_CIPHER_CTX_new();
    if (w->ctx == NULL || EVP_CIPHER_CTX_copy(w->ctx, g->tmpl) != 1) {
        EVP_CIPHER_CTX_free(w->ctx);
        w->ctx = NULL;
        return hsmsim_fail(HSMSIM_ERR_NOMEM);
    }
    w->tmp_iv_len = HSMSIM_GCM_DEFAULT_IV;
    w->iv_len = &w->tmp_iv_len;
    return HSMSIM_OK;
}

static void gcm_release(gcm_work *w)
{
    if (w->slot != NULL)
        atomic_flag_clear_explicit(&w->slot->busy, memory_order_release);
    else
        EVP_CIPHER_CTX_free(w->ctx);
}

static int gcm_args_ok(size_t iv_len, size_t aad_len, size_t in_len, size_t tag_len)
{
    return iv_len >= 1 && iv_len <= HSMSIM_GCM_IV_MAX && tag_len >= HSMSIM_GCM_TAG_MIN &&
           tag_len <= HSMSIM_GCM_TAG_MAX && aad_len <= INT_MAX && in_len <= INT_MAX;
}

/* Starts a message on a working context: IV length (only when it changes), IV, direction. */
static int gcm_start(gcm_work *w, const uint8_t *iv, size_t iv_len, int enc)
{
    if (*w->iv_len != iv_len) {
        if (EVP_CIPHER_CTX_ctrl(w->ctx, EVP_CTRL_GCM_SET_IVLEN, (int)iv_len, NULL) != 1)
            return HSMSIM_ERR_CRYPTO;
        *w->iv_len = iv_len;
    }
    if (EVP_CipherInit_ex(w->ctx, NULL, NULL, NULL, iv, enc) != 1)
        return HSMSIM_ERR_CRYPTO;
    return HSMSIM_OK;
}

static int gcm_encrypt_one(gcm_work *w, const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                           size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out,
                           size_t tag_len)
{
    int outl = 0, finl = 0, rc;
    OSSL_PARAM params[2];

    if ((rc = gcm_start(w, iv, iv_len, 1)) != HSMSIM_OK)
        return rc;
    if (aad_len > 0 && EVP_EncryptUpdate(w->ctx, NULL, &outl, aad, (int)aad_len) != 1)
        return HSMSIM_ERR_CRYPTO;
    outl = 0;
    if (in_len > 0 && EVP_EncryptUpdate(w->ctx, out, &outl, in, (int)in_len) != 1)
        return HSMSIM_ERR_CRYPTO;
    if (EVP_EncryptFinal_ex(w->ctx, out + outl, &finl) != 1 || (size_t)outl + (size_t)finl != in_len)
        return HSMSIM_ERR_CRYPTO;
    /* The tag through get_params directly: EVP_CIPHER_CTX_ctrl would build the same request
     * and also drop EVP's cached IV length, which then costs a parameter lookup per call. */
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, out + in_len, tag_len);
    params[1] = OSSL_PARAM_construct_end();
    if (EVP_CIPHER_CTX_get_params(w->ctx, params) != 1)
        return HSMSIM_ERR_CRYPTO;
    return HSMSIM_OK;
}

/* in_len includes the tag. Any failure after the IV is set is reported as a tag failure. */
static int gcm_decrypt_one(gcm_work *w, const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                           size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out,
                           size_t tag_len)
{
    size_t ct_len = in_len - tag_len;
    int outl = 0, finl = 0, rc;
    uint8_t tag[HSMSIM_GCM_TAG_MAX];
    OSSL_PARAM params[2];

    if ((rc = gcm_start(w, iv, iv_len, 0)) != HSMSIM_OK)
        return rc;
    memcpy(tag, in + ct_len, tag_len); /* the tag may sit where out points (in-place use) */
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, tag_len);
    params[1] = OSSL_PARAM_construct_end();
    if (EVP_CIPHER_CTX_set_params(w->ctx, params) != 1)
        return HSMSIM_ERR_CRYPTO;
    if (aad_len > 0 && EVP_DecryptUpdate(w->ctx, NULL, &outl, aad, (int)aad_len) != 1)
        goto fail;
    outl = 0;
    if (ct_len > 0 && EVP_DecryptUpdate(w->ctx, out, &outl, in, (int)ct_len) != 1)
        goto fail;
    if (EVP_DecryptFinal_ex(w->ctx, out + outl, &finl) != 1)
        goto fail;
    return HSMSIM_OK;
fail:
    OPENSSL_cleanse(out, ct_len);
    return HSMSIM_ERR_TAG;
}

int hsmsim_gcm_encrypt(hsmsim_gcm *g, const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                       size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out,
                       size_t out_cap, size_t tag_len)
{
    gcm_work w;
    int rc;

    if (g == NULL || iv == NULL || out == NULL || (aad == NULL && aad_len > 0) ||
        (in == NULL && in_len > 0) || !gcm_args_ok(iv_len, aad_len, in_len, tag_len))
        return HSMSIM_ERR_ARG;
    if (out_cap < in_len + tag_len)
        return HSMSIM_ERR_BUFFER;
    if ((rc = gcm_claim(g, &w)) != HSMSIM_OK)
        return rc;
    rc = gcm_encrypt_one(&w, iv, iv_len, aad, aad_len, in, in_len, out, tag_len);
    gcm_release(&w);
    return rc == HSMSIM_OK ? rc : hsmsim_fail(rc);
}

int hsmsim_gcm_decrypt(hsmsim_gcm *g, const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                       size_t aad_len, const uint8_t *in, size_t in_len, uint8_t *out,
                       size_t out_cap, size_t tag_len)
{
    gcm_work w;
    int rc;

    if (g == NULL || iv == NULL || (aad == NULL && aad_len > 0) || in == NULL ||
        !gcm_args_ok(iv_len, aad_len, in_len, tag_len) || in_len < tag_len ||
        (out == NULL && in_len > tag_len))
        return HSMSIM_ERR_ARG;
    if (out_cap < in_len - tag_len)
        return HSMSIM_ERR_BUFFER;
    if ((rc = gcm_claim(g, &w)) != HSMSIM_OK)
        return rc;
    rc = gcm_decrypt_one(&w, iv, iv_len, aad, aad_len, in, in_len, out, tag_len);
    gcm_release(&w);
    return rc == HSMSIM_OK ? rc : hsmsim_fail(rc);
}

/* Checks a whole batch's lengths and the output size before any work is done. */
static int gcm_batch_check(size_t n, const uint8_t *ivs, const size_t *iv_lens,
                           const uint8_t *aads, const size_t *aad_lens, const uint8_t *ins,
                           const uint8_t *const *in_ptrs, const size_t *in_lens,
                           const uint8_t *out, size_t out_cap, size_t tag_len,
                           const int32_t *status, int enc)
{
    size_t total = 0;

    if (n == 0)
        return HSMSIM_OK;
    if (ivs == NULL || iv_lens == NULL || ((ins == NULL) == (in_ptrs == NULL)) ||
        in_lens == NULL || status == NULL || out == NULL || ((aads == NULL) != (aad_lens == NULL)))
        return HSMSIM_ERR_ARG;
    for (size_t i = 0; i < n; i++) {
        size_t aad_len = aad_lens != NULL ? aad_lens[i] : 0;
        size_t produced;
        if (!gcm_args_ok(iv_lens[i], aad_len, in_lens[i], tag_len) ||
            (in_ptrs != NULL && in_ptrs[i] == NULL && in_lens[i] > 0))
            return HSMSIM_ERR_ARG;
        if (enc) {
            produced = in_lens[i] + tag_len;
        } else {
            if (in_lens[i] < tag_len)
                return HSMSIM_ERR_ARG;
            produced = in_lens[i] - tag_len;
        }
        if (total > SIZE_MAX - produced)
            return HSMSIM_ERR_ARG;
        total += produced;
    }
    return total <= out_cap ? HSMSIM_OK : HSMSIM_ERR_BUFFER;
}

/* One contiguous run of a batch, processed on one working context. */
typedef struct {
    hsmsim_gcm *g;
    size_t n;
    const uint8_t *ivs;
    const size_t *iv_lens;
    const uint8_t *aads;
    const size_t *aad_lens;
    const uint8_t *ins;           /* packed inputs, or NULL */
    const uint8_t *const *in_ptrs; /* one pointer per message, or NULL */
    const size_t *in_lens;
    uint8_t *out;
    size_t tag_len;
    int32_t *status;
    int enc;
    int rc;
} gcm_run;

static void gcm_run_chunk(gcm_run *r)
{
    const uint8_t *ivs = r->ivs, *aads = r->aads, *ins = r->ins;
    uint8_t *out = r->out;
    gcm_work w;

    if ((r->rc = gcm_claim(r->g, &w)) != HSMSIM_OK)
        return;
    for (size_t i = 0; i < r->n; i++) {
        size_t aad_len = r->aad_lens != NULL ? r->aad_lens[i] : 0;
        size_t in_len = r->in_lens[i];
        if (r->in_ptrs != NULL)
            ins = r->in_ptrs[i];
        if (r->enc) {
            r->status[i] = gcm_encrypt_one(&w, ivs, r->iv_lens[i], aads, aad_len, ins, in_len,
                                           out, r->tag_len);
            out += in_len + r->tag_len;
        } else {
            r->status[i] = gcm_decrypt_one(&w, ivs, r->iv_lens[i], aads, aad_len, ins, in_len,
                                           out, r->tag_len);
            out += in_len - r->tag_len;
        }
        if (r->status[i] != HSMSIM_OK)
            ERR_clear_error();
        ivs += r->iv_lens[i];
        if (r->in_ptrs == NULL)
            ins += in_len;
        if (aads != NULL)
            aads += aad_len;
    }
    gcm_release(&w);
}

static void *gcm_run_thread(void *arg)
{
    gcm_run_chunk(arg);
    return NULL;
}

/* Splits a checked batch into `threads` runs of about equal work (bytes plus a per-message
 * overhead), runs all but the first on new threads and the first on the caller's thread.
 * No thread outlives the call, so nothing needs care across fork(). */
static int gcm_batch(hsmsim_gcm *g, size_t n, const uint8_t *ivs, const size_t *iv_lens,
                     const uint8_t *aads, const size_t *aad_lens, const uint8_t *ins,
                     const uint8_t *const *in_ptrs, const size_t *in_lens, uint8_t *out,
                     size_t out_cap, size_t tag_len, int32_t *status, int enc, unsigned threads)
{
    gcm_run runs[HSMSIM_GCM_MAX_THREADS];
    pthread_t tids[HSMSIM_GCM_MAX_THREADS];
    int started[HSMSIM_GCM_MAX_THREADS] = {0};
    size_t total_work = 0, done_work = 0, i = 0;
    unsigned t, nruns;
    int rc;

    if (g == NULL)
        return HSMSIM_ERR_ARG;
    rc = gcm_batch_check(n, ivs, iv_lens, aads, aad_lens, ins, in_ptrs, in_lens, out, out_cap,
                         tag_len, status, enc);
    if (rc != HSMSIM_OK || n == 0)
        return rc;
    if (threads < 1)
        threads = 1;
    if (threads > HSMSIM_GCM_MAX_THREADS)
        threads = HSMSIM_GCM_MAX_THREADS;
    if (threads > n)
        threads = (unsigned)n;
    for (size_t k = 0; k < n; k++)
        total_work += in_lens[k] + HSMSIM_GCM_MSG_COST;

    /* Cut into runs: run t ends once the work so far reaches (t+1)/threads of the total. */
    nruns = 0;
    for (t = 0; t < threads && i < n; t++) {
        gcm_run *r = &runs[nruns++];
        size_t goal = total_work / threads * (t + 1), start = i;
        r->g = g;
        r->ivs = ivs;
        r->iv_lens = iv_lens + i;
        r->aads = aads;
        r->aad_lens = aad_lens != NULL ? aad_lens + i : NULL;
        r->ins = ins;
        r->in_ptrs = in_ptrs != NULL ? in_ptrs + i : NULL;
        r->in_lens = in_lens + i;
        r->out = out;
        r->tag_len = tag_len;
        r->status = status + i;
        r->enc = enc;
        r->rc = HSMSIM_OK;
        while (i < n && (t == threads - 1 || done_work < goal)) {
            size_t aad_len = aad_lens != NULL ? aad_lens[i] : 0;
            done_work += in_lens[i] + HSMSIM_GCM_MSG_COST;
            ivs += iv_lens[i];
            if (ins != NULL)
                ins += in_lens[i];
            if (aads != NULL)
                aads += aad_len;
            out += enc ? in_lens[i] + tag_len : in_lens[i] - tag_len;
            i++;
        }
        r->n = i - start;
    }
    for (t = 1; t < nruns; t++)
        started[t] = pthread_create(&tids[t], NULL, gcm_run_thread, &runs[t]) == 0;
    for (t = 1; t < nruns; t++)
        if (!started[t])
            gcm_run_chunk(&runs[t]);
    gcm_run_chunk(&runs[0]);
    for (t = 1; t < nruns; t++)
        if (started[t])
            pthread_join(tids[t], NULL);
    for (t = 0; t < nruns; t++)
        if (runs[t].rc != HSMSIM_OK)
            return runs[t].rc;
    return HSMSIM_OK;
}

int hsmsim_gcm_encrypt_batch(hsmsim_gcm *g, size_t n, const uint8_t *ivs, const size_t *iv_lens,
                             const uint8_t *aads, const size_t *aad_lens, const uint8_t *ins,
                             const uint8_t *const *in_ptrs, const size_t *in_lens, uint8_t *out,
                             size_t out_cap, size_t tag_len, int32_t *status, unsigned threads)
{
    return gcm_batch(g, n, ivs, iv_lens, aads, aad_lens, ins, in_ptrs, in_lens, out, out_cap,
                     tag_len, status, 1, threads);
}

int hsmsim_gcm_decrypt_batch(hsmsim_gcm *g, size_t n, const uint8_t *ivs, const size_t *iv_lens,
                             const uint8_t *aads, const size_t *aad_lens, const uint8_t *ins,
                             const uint8_t *const *in_ptrs, const size_t *in_lens, uint8_t *out,
                             size_t out_cap, size_t tag_len, int32_t *status, unsigned threads)
{
    return gcm_batch(g, n, ivs, iv_lens, aads, aad_lens, ins, in_ptrs, in_lens, out, out_cap,
                     tag_len, status, 0, threads);
}
