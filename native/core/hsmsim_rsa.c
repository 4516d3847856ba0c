/*
 * hsmsim_rsa.c - RSA on a key context loaded once: PKCS#1 v1.5 and PSS signatures, OAEP
 * and PKCS#1 v1.5 encryption, raw (X.509) RSA.
 *
 * A context holds one EVP_PKEY, read-only after load, so it may be shared by threads.
 * Every operation makes its own EVP_PKEY_CTX from it (a few microseconds next to a
 * private-key operation); a batch makes one and reuses it for all its messages.
 * Padding checks, hashing choices and key sizes are the caller's policy; this file only
 * maps them onto EVP and reports one undistinguished status for every verify or decrypt
 * failure.
 */
#include <limits.h>
#include <pthread.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "hsmsim_internal.h"

#define HSMSIM_RSA_MAX_THREADS 8

struct hsmsim_rsa {
    EVP_PKEY *pkey;
    int has_private;
    int bits;
    int size;
};

static const EVP_MD *rsa_md(int hash)
{
    switch (hash) {
    case HSMSIM_HASH_SHA1: return EVP_sha1();
    case HSMSIM_HASH_SHA224: return EVP_sha224();
    case HSMSIM_HASH_SHA256: return EVP_sha256();
    case HSMSIM_HASH_SHA384: return EVP_sha384();
    case HSMSIM_HASH_SHA512: return EVP_sha512();
    default: return NULL;
    }
}

/* Wraps a loaded key; takes ownership of pkey in every case. */
static int rsa_wrap(EVP_PKEY *pkey, int has_private, hsmsim_rsa **out)
{
    hsmsim_rsa *r;

    if (pkey == NULL)
        return hsmsim_fail(HSMSIM_ERR_KEY);
    if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA) {
        EVP_PKEY_free(pkey);
        return hsmsim_fail(HSMSIM_ERR_KEY);
    }
    r = OPENSSL_zalloc(sizeof(*r));
    if (r == NULL) {
        EVP_PKEY_free(pkey);
        return hsmsim_fail(HSMSIM_ERR_NOMEM);
    }
    r->pkey = pkey;
    r->has_private = has_private;
    r->bits = EVP_PKEY_get_bits(pkey);
    r->size = EVP_PKEY_get_size(pkey);
    if (r->bits <= 0 || r->size <= 0) {
        hsmsim_rsa_free(r);
        return hsmsim_fail(HSMSIM_ERR_KEY);
    }
    *out = r;
    return HSMSIM_OK;
}

int hsmsim_rsa_private_from_der(const uint8_t *der, size_t der_len, hsmsim_rsa **out)
{
    const unsigned char *p = der;
    EVP_PKEY *pkey = NULL;
    PKCS8_PRIV_KEY_INFO *p8;

    if (out == NULL)
        return HSMSIM_ERR_ARG;
    *out = NULL;
    if (der == NULL || der_len == 0 || der_len > LONG_MAX)
        return HSMSIM_ERR_ARG;
    /* PKCS#8 PrivateKeyInfo first, then PKCS#1 RSAPrivateKey; the whole input must be used. */
    p8 = d2i_PKCS8_PRIV_KEY_INFO(NULL, &p, (long)der_len);
    if (p8 != NULL) {
        if (p == der + der_len)
            pkey = EVP_PKCS82PKEY(p8);
        PKCS8_PRIV_KEY_INFO_free(p8);
    } else {
        p = der;
        pkey = d2i_PrivateKey(EVP_PKEY_RSA, NULL, &p, (long)der_len);
        if (pkey != NULL && p != der + der_len) {
            EVP_PKEY_free(pkey);
            pkey = NULL;
        }
    }
    ERR_clear_error();
    return rsa_wrap(pkey, 1, out);
}

int hsmsim_rsa_public_from_der(const uint8_t *der, size_t der_len, hsmsim_rsa **out)
{
    const unsigned char *p = der;
    EVP_PKEY *pkey;

    if (out == NULL)
        return HSMSIM_ERR_ARG;
    *out = NULL;
    if (der == NULL || der_len == 0 || der_len > LONG_MAX)
        return HSMSIM_ERR_ARG;
    /* SubjectPublicKeyInfo first, then PKCS#1 RSAPublicKey; the whole input must be used. */
    pkey = d2i_PUBKEY(NULL, &p, (long)der_len);
    if (pkey == NULL) {
        p = der;
        pkey = d2i_PublicKey(EVP_PKEY_RSA, NULL, &p, (long)der_len);
    }
    if (pkey != NULL && p != der + der_len) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
    ERR_clear_error();
    return rsa_wrap(pkey, 0, out);
}

/* One component: a BIGNUM (secure-flagged for private parts, so that OpenSSL clears every
 * copy it makes) pushed onto the parameter builder. */
static int rsa_push(OSSL_PARAM_BLD *bld, const char *name, const uint8_t *v, size_t len,
                    int secret, BIGNUM **keep)
{
    BIGNUM *bn;

    if (v == NULL || len == 0 || len > INT_MAX)
        return HSMSIM_ERR_ARG;
    bn = secret ? BN_secure_new() : BN_new();
    if (bn == NULL)
        return HSMSIM_ERR_NOMEM;
    *keep = bn;
    if (BN_bin2bn(v, (int)len, bn) == NULL || OSSL_PARAM_BLD_push_BN(bld, name, bn) != 1)
        return HSMSIM_ERR_CRYPTO;
    return HSMSIM_OK;
}

static int rsa_from_components(const uint8_t *const *v, const size_t *lens, int with_private,
                               hsmsim_rsa **out)
{
    static const char *const names[8] = {
        OSSL_PKEY_PARAM_RSA_N,         OSSL_PKEY_PARAM_RSA_E,
        OSSL_PKEY_PARAM_RSA_D,         OSSL_PKEY_PARAM_RSA_FACTOR1,
        OSSL_PKEY_PARAM_RSA_FACTOR2,   OSSL_PKEY_PARAM_RSA_EXPONENT1,
        OSSL_PKEY_PARAM_RSA_EXPONENT2, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
    };
    int count = with_private ? 8 : 2;
    BIGNUM *bns[8] = {0};
    OSSL_PARAM_BLD *bld;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *kctx = NULL;
    EVP_PKEY *pkey = NULL;
    int rc = HSMSIM_OK;

    if (out == NULL)
        return HSMSIM_ERR_ARG;
    *out = NULL;
    bld = OSSL_PARAM_BLD_new();
    if (bld == NULL)
        return hsmsim_fail(HSMSIM_ERR_NOMEM);
    for (int i = 0; i < count && rc == HSMSIM_OK; i++)
        rc = rsa_push(bld, names[i], v[i], lens[i], i >= 2, &bns[i]);
    if (rc != HSMSIM_OK)
        goto done;
    params = OSSL_PARAM_BLD_to_param(bld);
    kctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    if (params == NULL || kctx == NULL) {
        rc = HSMSIM_ERR_NOMEM;
        goto done;
    }
    if (EVP_PKEY_fromdata_init(kctx) != 1 ||
        EVP_PKEY_fromdata(kctx, &pkey, with_private ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY,
                          params) != 1) {
        rc = HSMSIM_ERR_KEY;
        goto done;
    }
done:
    EVP_PKEY_CTX_free(kctx);
    OSSL_PARAM_free(params); /* secure-flagged parts are cleared on free */
    OSSL_PARAM_BLD_free(bld);
    for (int i = 0; i < 8; i++)
        BN_clear_free(bns[i]);
    if (rc != HSMSIM_OK) {
        EVP_PKEY_free(pkey);
        return hsmsim_fail(rc);
    }
    return rsa_wrap(pkey, with_private, out);
}

int hsmsim_rsa_private_from_components(const uint8_t *n, size_t n_len, const uint8_t *e, size_t e_len,
                                       const uint8_t *d, size_t d_len, const uint8_t *p, size_t p_len,
                                       const uint8_t *q, size_t q_len, const uint8_t *dp, size_t dp_len,
                                       const uint8_t *dq, size_t dq_len, const uint8_t *qinv, size_t qinv_len,
                                       hsmsim_rsa **out)
{
    const uint8_t *v[8] = {n, e, d, p, q, dp, dq, qinv};
    size_t lens[8] = {n_len, e_len, d_len, p_len, q_len, dp_len, dq_len, qinv_len};
    return rsa_from_components(v, lens, 1, out);
}

int hsmsim_rsa_public_from_components(const uint8_t *n, size_t n_len, const uint8_t *e, size_t e_len,
                                      hsmsim_rsa **out)
{
    const uint8_t *v[2] = {n, e};
    size_t lens[2] = {n_len, e_len};
    return rsa_from_components(v, lens, 0, out);
}

void hsmsim_rsa_free(hsmsim_rsa *r)
{
    if (r == NULL)
        return;
    EVP_PKEY_free(r->pkey); /* RSA_free clears d, p, q, dp, dq, qinv */
    OPENSSL_clear_free(r, sizeof(*r));
}

int hsmsim_rsa_public_of(const hsmsim_rsa *r, hsmsim_rsa **out)
{
    unsigned char *der = NULL;
    int len, rc;

    if (r == NULL || out == NULL)
        return HSMSIM_ERR_ARG;
    *out = NULL;
    len = i2d_PUBKEY(r->pkey, &der);
    if (len <= 0)
        return hsmsim_fail(HSMSIM_ERR_CRYPTO);
    rc = hsmsim_rsa_public_from_der(der, (size_t)len, out);
    OPENSSL_free(der);
    return rc;
}

int hsmsim_rsa_bits(const hsmsim_rsa *r)
{
    return r != NULL ? r->bits : 0;
}

int hsmsim_rsa_size(const hsmsim_rsa *r)
{
    return r != NULL ? r->size : 0;
}

int hsmsim_rsa_has_private(const hsmsim_rsa *r)
{
    return r != NULL ? r->has_private : 0;
}

int hsmsim_rsa_public_der(const hsmsim_rsa *r, uint8_t *out, size_t *out_len)
{
    unsigned char *der = NULL;
    int len;

    if (r == NULL || out_len == NULL)
        return HSMSIM_ERR_ARG;
    len = i2d_PUBKEY(r->pkey, &der);
    if (len <= 0)
        return hsmsim_fail(HSMSIM_ERR_CRYPTO);
    if (out == NULL || *out_len < (size_t)len) {
        *out_len = (size_t)len;
        OPENSSL_free(der);
        return HSMSIM_ERR_BUFFER;
    }
    memcpy(out, der, (size_t)len);
    *out_len = (size_t)len;
    OPENSSL_free(der);
    return HSMSIM_OK;
}

static int rsa_get_bn(const hsmsim_rsa *r, const char *name, uint8_t *out, size_t *out_len)
{
    BIGNUM *bn = NULL;
    int len;

    if (EVP_PKEY_get_bn_param(r->pkey, name, &bn) != 1)
        return hsmsim_fail(HSMSIM_ERR_CRYPTO);
    len = BN_num_bytes(bn);
    if (*out_len < (size_t)len) {
        BN_free(bn);
        return HSMSIM_ERR_BUFFER;
    }
    *out_len = (size_t)BN_bn2bin(bn, out);
    BN_free(bn);
    return HSMSIM_OK;
}

int hsmsim_rsa_public_numbers(const hsmsim_rsa *r, uint8_t *n, size_t *n_len, uint8_t *e, size_t *e_len)
{
    int rc;

    if (r == NULL || n == NULL || n_len == NULL || e == NULL || e_len == NULL)
        return HSMSIM_ERR_ARG;
    if ((rc = rsa_get_bn(r, OSSL_PKEY_PARAM_RSA_N, n, n_len)) != HSMSIM_OK)
        return rc;
    return rsa_get_bn(r, OSSL_PKEY_PARAM_RSA_E, e, e_len);
}

/* ---- operations ------------------------------------------------------------------------- */

enum { OP_SIGN, OP_VERIFY, OP_ENCRYPT, OP_DECRYPT };

/* A configured EVP_PKEY_CTX for one operation kind, or NULL with *rc set. */
static EVP_PKEY_CTX *rsa_op_ctx(const hsmsim_rsa *r, int op, int padding, int hash, int mgf1_hash,
                                int salt_len, const uint8_t *label, size_t label_len, int *rc)
{
    EVP_PKEY_CTX *pctx;
    const EVP_MD *md = NULL, *mgf1 = NULL;
    int pad, ok;

    *rc = HSMSIM_ERR_ARG;
    if (r == NULL)
        return NULL;
    if ((op == OP_SIGN || op == OP_DECRYPT) && !r->has_private)
        return NULL;
    switch (padding) {
    case HSMSIM_RSA_PKCS1V15:
        pad = RSA_PKCS1_PADDING;
        if (op == OP_SIGN || op == OP_VERIFY) {
            if (hash != HSMSIM_HASH_NONE && (md = rsa_md(hash)) == NULL)
                return NULL;
        }
        break;
    case HSMSIM_RSA_PSS:
        if (op != OP_SIGN && op != OP_VERIFY)
            return NULL;
        pad = RSA_PKCS1_PSS_PADDING;
        if ((md = rsa_md(hash)) == NULL || (mgf1 = rsa_md(mgf1_hash)) == NULL || salt_len < 0)
            return NULL;
        break;
    case HSMSIM_RSA_OAEP:
        if (op != OP_ENCRYPT && op != OP_DECRYPT)
            return NULL;
        pad = RSA_PKCS1_OAEP_PADDING;
        if ((md = rsa_md(hash)) == NULL || (mgf1 = rsa_md(mgf1_hash)) == NULL ||
            label_len > INT_MAX || (label == NULL && label_len > 0))
            return NULL;
        break;
    case HSMSIM_RSA_RAW:
        pad = RSA_NO_PADDING;
        break;
    default:
        return NULL;
    }

    pctx = EVP_PKEY_CTX_new_from_pkey(NULL, r->pkey, NULL);
    if (pctx == NULL) {
        *rc = hsmsim_fail(HSMSIM_ERR_NOMEM);
        return NULL;
    }
    switch (op) {
    case OP_SIGN: ok = EVP_PKEY_sign_init(pctx); break;
    case OP_VERIFY: ok = EVP_PKEY_verify_init(pctx); break;
    case OP_ENCRYPT: ok = EVP_PKEY_encrypt_init(pctx); break;
    default: ok = EVP_PKEY_decrypt_init(pctx); break;
    }
    ok = ok == 1 && EVP_PKEY_CTX_set_rsa_padding(pctx, pad) == 1;
    if (ok && md != NULL) {
        if (padding == HSMSIM_RSA_OAEP)
            ok = EVP_PKEY_CTX_set_rsa_oaep_md(pctx, md) == 1;
        else
            ok = EVP_PKEY_CTX_set_signature_md(pctx, md) == 1;
    }
    if (ok && mgf1 != NULL)
        ok = EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, mgf1) == 1;
    if (ok && padding == HSMSIM_RSA_PSS)
        ok = EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, salt_len) == 1;
    if (ok && padding == HSMSIM_RSA_OAEP && label_len > 0) {
        void *copy = OPENSSL_memdup(label, label_len);
        ok = copy != NULL && EVP_PKEY_CTX_set0_rsa_oaep_label(pctx, copy, (int)label_len) == 1;
        if (!ok)
            OPENSSL_free(copy);
    }
    if (!ok) {
        EVP_PKEY_CTX_free(pctx);
        *rc = hsmsim_fail(HSMSIM_ERR_CRYPTO);
        return NULL;
    }
    *rc = HSMSIM_OK;
    return pctx;
}

static int rsa_sign_one(EVP_PKEY_CTX *pctx, size_t size, const uint8_t *data, size_t data_len,
                        uint8_t *sig, size_t *sig_len)
{
    size_t len = *sig_len;

    if (len < size)
        return HSMSIM_ERR_BUFFER;
    if (EVP_PKEY_sign(pctx, sig, &len, data, data_len) != 1)
        return hsmsim_fail(HSMSIM_ERR_CRYPTO);
    *sig_len = len;
    return HSMSIM_OK;
}

int hsmsim_rsa_sign(const hsmsim_rsa *r, int padding, int hash, int mgf1_hash, int salt_len,
                    const uint8_t *data, size_t data_len, uint8_t *sig, size_t *sig_len)
{
    EVP_PKEY_CTX *pctx;
    int rc;

    if (data == NULL || sig == NULL || sig_len == NULL)
        return HSMSIM_ERR_ARG;
    pctx = rsa_op_ctx(r, OP_SIGN, padding, hash, mgf1_hash, salt_len, NULL, 0, &rc);
    if (pctx == NULL)
        return rc;
    rc = rsa_sign_one(pctx, (size_t)r->size, data, data_len, sig, sig_len);
    EVP_PKEY_CTX_free(pctx);
    return rc;
}

/* One contiguous run of a sign batch, on its own EVP_PKEY_CTX (a duplicate of the batch's). */
typedef struct {
    const hsmsim_rsa *r;
    EVP_PKEY_CTX *pctx;
    size_t n;
    const uint8_t *data;
    const size_t *data_lens;
    uint8_t *sig;
    int32_t *status;
} rsa_run;

static void *rsa_run_chunk(void *arg)
{
    rsa_run *run = arg;
    const uint8_t *data = run->data;
    uint8_t *sig = run->sig;
    size_t size = (size_t)run->r->size;

    for (size_t i = 0; i < run->n; i++) {
        size_t len = size;
        run->status[i] = rsa_sign_one(run->pctx, size, data, run->data_lens[i], sig, &len);
        if (run->status[i] == HSMSIM_OK && len != size) /* EVP pads to the modulus size */
            run->status[i] = HSMSIM_ERR_CRYPTO;
        data += run->data_lens[i];
        sig += size;
    }
    return NULL;
}

int hsmsim_rsa_sign_batch(const hsmsim_rsa *r, int padding, int hash, int mgf1_hash, int salt_len,
                          size_t n, const uint8_t *data, const size_t *data_lens, uint8_t *sig,
                          size_t sig_cap, int32_t *status, unsigned threads)
{
    rsa_run runs[HSMSIM_RSA_MAX_THREADS];
    pthread_t tids[HSMSIM_RSA_MAX_THREADS];
    int started[HSMSIM_RSA_MAX_THREADS] = {0};
    EVP_PKEY_CTX *pctx;
    unsigned t, nruns;
    size_t i = 0;
    int rc = HSMSIM_OK;

    if (n == 0)
        return r != NULL ? HSMSIM_OK : HSMSIM_ERR_ARG;
    if (r == NULL || data == NULL || data_lens == NULL || sig == NULL || status == NULL)
        return HSMSIM_ERR_ARG;
    if (n > sig_cap / (size_t)r->size)
        return HSMSIM_ERR_BUFFER;
    pctx = rsa_op_ctx(r, OP_SIGN, padding, hash, mgf1_hash, salt_len, NULL, 0, &rc);
    if (pctx == NULL)
        return rc;
    if (threads < 1)
        threads = 1;
    if (threads > HSMSIM_RSA_MAX_THREADS)
        threads = HSMSIM_RSA_MAX_THREADS;
    if (threads > n)
        threads = (unsigned)n;

    /* Equal message counts per run: every signature costs the same. */
    nruns = 0;
    for (t = 0; t < threads; t++) {
        size_t count = n / threads + (t < n % threads ? 1 : 0);
        rsa_run *run = &runs[nruns];
        run->r = r;
        run->pctx = t == 0 ? pctx : EVP_PKEY_CTX_dup(pctx);
        if (run->pctx == NULL) {
            rc = hsmsim_fail(HSMSIM_ERR_NOMEM);
            break;
        }
        run->n = count;
        run->data = data;
        run->data_lens = data_lens + i;
        run->sig = sig + i * (size_t)r->size;
        run->status = status + i;
        for (size_t k = 0; k < count; k++)
            data += data_lens[i + k];
        i += count;
        nruns++;
    }
    if (rc == HSMSIM_OK) {
        for (t = 1; t < nruns; t++)
            started[t] = pthread_create(&tids[t], NULL, rsa_run_chunk, &runs[t]) == 0;
        for (t = 1; t < nruns; t++)
            if (!started[t])
                rsa_run_chunk(&runs[t]);
        rsa_run_chunk(&runs[0]);
        for (t = 1; t < nruns; t++)
            if (started[t])
                pthread_join(tids[t], NULL);
    }
    for (t = 1; t < nruns; t++)
        EVP_PKEY_CTX_free(runs[t].pctx);
    EVP_PKEY_CTX_free(pctx);
    return rc;
}

int hsmsim_rsa_verify(const hsmsim_rsa *r, int padding, int hash, int mgf1_hash, int salt_len,
                      const uint8_t *sig, size_t sig_len, const uint8_t *data, size_t data_len)
{
    EVP_PKEY_CTX *pctx;
    int rc, ok;

    if (sig == NULL || data == NULL)
        return HSMSIM_ERR_ARG;
    pctx = rsa_op_ctx(r, OP_VERIFY, padding, hash, mgf1_hash, salt_len, NULL, 0, &rc);
    if (pctx == NULL)
        return rc;
    ok = (sig_len == (size_t)r->size) && EVP_PKEY_verify(pctx, sig, sig_len, data, data_len) == 1;
    EVP_PKEY_CTX_free(pctx);
    return ok ? HSMSIM_OK : hsmsim_fail(HSMSIM_ERR_SIGNATURE);
}

int hsmsim_rsa_encrypt(const hsmsim_rsa *r, int padding, int hash, int mgf1_hash,
                       const uint8_t *label, size_t label_len, const uint8_t *in, size_t in_len,
                       uint8_t *out, size_t *out_len)
{
    EVP_PKEY_CTX *pctx;
    size_t len;
    int rc;

    if (in == NULL || out == NULL || out_len == NULL)
        return HSMSIM_ERR_ARG;
    pctx = rsa_op_ctx(r, OP_ENCRYPT, padding, hash, mgf1_hash, 0, label, label_len, &rc);
    if (pctx == NULL)
        return rc;
    len = *out_len;
    if (len < (size_t)r->size)
        rc = HSMSIM_ERR_BUFFER;
    else if (EVP_PKEY_encrypt(pctx, out, &len, in, in_len) != 1)
        rc = hsmsim_fail(HSMSIM_ERR_CRYPTO);
    else
        *out_len = len;
    EVP_PKEY_CTX_free(pctx);
    return rc;
}

int hsmsim_rsa_decrypt(const hsmsim_rsa *r, int padding, int hash, int mgf1_hash,
                       const uint8_t *label, size_t label_len, const uint8_t *in, size_t in_len,
                       uint8_t *out, size_t *out_len)
{
    EVP_PKEY_CTX *pctx;
    size_t len;
    int rc;

    if (in == NULL || out == NULL || out_len == NULL)
        return HSMSIM_ERR_ARG;
    pctx = rsa_op_ctx(r, OP_DECRYPT, padding, hash, mgf1_hash, 0, label, label_len, &rc);
    if (pctx == NULL)
        return rc;
    len = *out_len;
    if (len < (size_t)r->size) {
        rc = HSMSIM_ERR_BUFFER;
    } else if (in_len != (size_t)r->size || EVP_PKEY_decrypt(pctx, out, &len, in, in_len) != 1) {
        OPENSSL_cleanse(out, *out_len);
        rc = hsmsim_fail(HSMSIM_ERR_DECRYPT);
    } else {
        *out_len = len;
    }
    EVP_PKEY_CTX_free(pctx);
    return rc;
}
