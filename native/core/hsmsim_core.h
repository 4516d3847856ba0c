/*
 * hsmsim_core.h - umbrella header of hsmsim's crypto core: AES-GCM and RSA over OpenSSL
 * libcrypto (EVP only), on key contexts that are loaded once and reused.
 *
 * Contract of every function here:
 *   - it returns an hsmsim_status and writes results only into caller-supplied buffers;
 *   - it decides no policy: lengths, key sizes and algorithm choices are validated by the
 *     caller (the Python face in hsmsim/core), the C side only refuses what libcrypto
 *     cannot do (HSMSIM_ERR_ARG) so that a bad call can never crash the process;
 *   - an authentication failure (GCM tag, signature, padding on decrypt) is one status that
 *     says nothing more, and no partial plaintext is left in the caller's buffer;
 *   - key material lives only inside OpenSSL objects and is zeroised when the context is
 *     freed.
 *
 * Thread safety: a context may be used by several threads at once. An AES-GCM context keeps
 * a small pool of per-operation EVP_CIPHER_CTX copies claimed with an atomic flag (a call
 * that finds every slot busy makes a temporary copy); an RSA context is read-only after
 * load and every operation makes its own EVP_PKEY_CTX. Freeing a context while another
 * thread still uses it is the caller's bug (the Python face prevents it by reference
 * counting).
 *
 * Every public symbol carries the prefix hsmsim_. The parts of this header between the
 * "cdef" markers are mirrored, declaration for declaration, in hsmsim_core.cdef.
 */
#ifndef HSMSIM_CORE_H
#define HSMSIM_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- cdef begin ------------------------------------------------------------------------- */

typedef enum {
    HSMSIM_OK = 0,
    HSMSIM_ERR_ARG = 1,         /* an argument libcrypto cannot take (caller should have checked) */
    HSMSIM_ERR_NOMEM = 2,       /* allocation failed */
    HSMSIM_ERR_KEY = 3,         /* key bytes could not be parsed or are not an RSA key */
    HSMSIM_ERR_TAG = 4,         /* GCM authentication failed */
    HSMSIM_ERR_SIGNATURE = 5,   /* signature did not verify */
    HSMSIM_ERR_DECRYPT = 6,     /* RSA decryption failed (padding, label, range) */
    HSMSIM_ERR_BUFFER = 7,      /* output buffer too small */
    HSMSIM_ERR_CRYPTO = 8       /* any other libcrypto failure */
} hsmsim_status;

typedef enum {
    HSMSIM_HASH_NONE = 0,       /* PKCS#1 v1.5 signature over raw data, no DigestInfo */
    HSMSIM_HASH_SHA1 = 1,
    HSMSIM_HASH_SHA224 = 2,
    HSMSIM_HASH_SHA256 = 3,
    HSMSIM_HASH_SHA384 = 4,
    HSMSIM_HASH_SHA512 = 5
} hsmsim_hash;

typedef enum {
    HSMSIM_RSA_PKCS1V15 = 1,    /* signatures: type 1 (EMSA-PKCS1-v1_5); encryption: type 2 */
    HSMSIM_RSA_PSS = 2,
    HSMSIM_RSA_OAEP = 3,
    HSMSIM_RSA_RAW = 4          /* X.509 raw RSA, no padding */
} hsmsim_rsa_padding;

/* Version string compiled into the library; must equal hsmsim.__version__. */
const char *hsmsim_version(void);

/* The libcrypto the core runs on (OpenSSL_version(OPENSSL_VERSION)), for reports. */
const char *hsmsim_libcrypto_version(void);

/* Process-wide glibc malloc tuning for processes that run large batches: keep up to
 * keep_bytes of freed heap instead of returning it to the kernel (M_TRIM_THRESHOLD), and
 * serve allocations below 32 MiB from the heap (M_MMAP_THRESHOLD), so that freeing a batch's
 * results does not make the next batch fault its pages in again. Returns 1 if applied, 0
 * where mallopt is not available. The caller decides whether to use it. */
int hsmsim_malloc_keep(size_t keep_bytes);

/* Zeroises n bytes at p in a way the compiler keeps (OPENSSL_cleanse); for scratch buffers
 * that held plaintext. */
void hsmsim_wipe(void *p, size_t n);

/* ---- AES-GCM ---------------------------------------------------------------------------- */

typedef struct hsmsim_gcm hsmsim_gcm;

/* key_len 16, 24 or 32. On success *out owns an AES-GCM context with the key loaded. */
int hsmsim_gcm_new(const uint8_t *key, size_t key_len, hsmsim_gcm **out);
/* Zeroises and frees; NULL is accepted. */
void hsmsim_gcm_free(hsmsim_gcm *ctx);

/* out receives ciphertext || tag: out_cap >= in_len + tag_len. iv_len 1..128, tag_len 4..16. */
int hsmsim_gcm_encrypt(hsmsim_gcm *ctx, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t in_len,
                       uint8_t *out, size_t out_cap, size_t tag_len);
/* in is ciphertext || tag (in_len >= tag_len); out receives in_len - tag_len bytes of
 * plaintext (out_cap >= in_len - tag_len). HSMSIM_ERR_TAG on any authentication failure,
 * and then out is zeroised. */
int hsmsim_gcm_decrypt(hsmsim_gcm *ctx, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t in_len,
                       uint8_t *out, size_t out_cap, size_t tag_len);

/* Batches of n messages, packed back to back: ivs holds iv_lens[i] bytes for message i,
 * aads holds aad_lens[i] bytes (aads and aad_lens may both be NULL: no AAD), ins holds
 * in_lens[i] bytes. Encrypt writes in_lens[i] + tag_len bytes per message into out, back to
 * back; decrypt writes in_lens[i] - tag_len bytes per message. Inputs are either packed
 * (ins, in_ptrs NULL) or one pointer per message (in_ptrs, ins NULL), which saves copying
 * large messages together. status[i] receives each
 * message's status; the call returns HSMSIM_OK when the batch was processed (even if some
 * tags failed), or the first error that stopped it. out_cap is checked against the total.
 * threads (1..8; 0 counts as 1) splits the batch into that many runs of about equal work,
 * each on its own working context, all but one on threads that end before the call
 * returns. Results do not depend on it. */
int hsmsim_gcm_encrypt_batch(hsmsim_gcm *ctx, size_t n,
                             const uint8_t *ivs, const size_t *iv_lens,
                             const uint8_t *aads, const size_t *aad_lens,
                             const uint8_t *ins, const uint8_t *const *in_ptrs,
                             const size_t *in_lens,
                             uint8_t *out, size_t out_cap, size_t tag_len, int32_t *status,
                             unsigned threads);
int hsmsim_gcm_decrypt_batch(hsmsim_gcm *ctx, size_t n,
                             const uint8_t *ivs, const size_t *iv_lens,
                             const uint8_t *aads, const size_t *aad_lens,
                             const uint8_t *ins, const uint8_t *const *in_ptrs,
                             const size_t *in_lens,
                             uint8_t *out, size_t out_cap, size_t tag_len, int32_t *status,
                             unsigned threads);

/* ---- RSA -------------------------------------------------------------------------------- */

typedef struct hsmsim_rsa hsmsim_rsa;

/* DER: PKCS#8 or PKCS#1 RSAPrivateKey (private), SubjectPublicKeyInfo or PKCS#1
 * RSAPublicKey (public). HSMSIM_ERR_KEY if the bytes are not such a key. */
int hsmsim_rsa_private_from_der(const uint8_t *der, size_t der_len, hsmsim_rsa **out);
int hsmsim_rsa_public_from_der(const uint8_t *der, size_t der_len, hsmsim_rsa **out);
/* Components as unsigned big-endian integers (no leading-zero requirement). The private form
 * needs all of n, e, d, p, q, dp, dq, qinv; the public form n and e. Consistency of the
 * components is the caller's check. */
int hsmsim_rsa_private_from_components(const uint8_t *n, size_t n_len, const uint8_t *e, size_t e_len,
                                       const uint8_t *d, size_t d_len, const uint8_t *p, size_t p_len,
                                       const uint8_t *q, size_t q_len, const uint8_t *dp, size_t dp_len,
                                       const uint8_t *dq, size_t dq_len, const uint8_t *qinv, size_t qinv_len,
                                       hsmsim_rsa **out);
int hsmsim_rsa_public_from_components(const uint8_t *n, size_t n_len, const uint8_t *e, size_t e_len,
                                      hsmsim_rsa **out);
/* Zeroises (OpenSSL clears the private BIGNUMs) and frees; NULL is accepted. */
void hsmsim_rsa_free(hsmsim_rsa *ctx);
/* A new public-only context for the same key. */
int hsmsim_rsa_public_of(const hsmsim_rsa *ctx, hsmsim_rsa **out);

/* Modulus size in bits, and in bytes (the size of every signature and ciphertext). */
int hsmsim_rsa_bits(const hsmsim_rsa *ctx);
int hsmsim_rsa_size(const hsmsim_rsa *ctx);
int hsmsim_rsa_has_private(const hsmsim_rsa *ctx);
/* SubjectPublicKeyInfo DER. *out_len is the capacity in, the length out. */
int hsmsim_rsa_public_der(const hsmsim_rsa *ctx, uint8_t *out, size_t *out_len);
/* Public exponent and modulus, big-endian, each into a buffer of hsmsim_rsa_size() bytes. */
int hsmsim_rsa_public_numbers(const hsmsim_rsa *ctx, uint8_t *n, size_t *n_len, uint8_t *e, size_t *e_len);

/* Sign: padding HSMSIM_RSA_PKCS1V15 (hash may be HSMSIM_HASH_NONE: raw data, type-1
 * padding only), HSMSIM_RSA_PSS (hash, mgf1_hash, salt_len) or HSMSIM_RSA_RAW (data is
 * exactly one modulus-sized integer below n). *sig_len: capacity in, length out. */
int hsmsim_rsa_sign(const hsmsim_rsa *ctx, int padding, int hash, int mgf1_hash, int salt_len,
                    const uint8_t *data, size_t data_len, uint8_t *sig, size_t *sig_len);
/* n inputs of data_lens[i] bytes packed in data; n signatures of hsmsim_rsa_size() bytes
 * packed in sig (sig_cap >= n * size). status[i] per message. threads (1..8; 0 counts as
 * 1) splits the batch over that many threads, each with its own EVP_PKEY_CTX, all joined
 * before the call returns. */
int hsmsim_rsa_sign_batch(const hsmsim_rsa *ctx, int padding, int hash, int mgf1_hash, int salt_len,
                          size_t n, const uint8_t *data, const size_t *data_lens,
                          uint8_t *sig, size_t sig_cap, int32_t *status, unsigned threads);
/* HSMSIM_OK or HSMSIM_ERR_SIGNATURE (whatever the reason). */
int hsmsim_rsa_verify(const hsmsim_rsa *ctx, int padding, int hash, int mgf1_hash, int salt_len,
                      const uint8_t *sig, size_t sig_len, const uint8_t *data, size_t data_len);

/* Encrypt: padding HSMSIM_RSA_OAEP (hash, mgf1_hash, label), HSMSIM_RSA_PKCS1V15 or
 * HSMSIM_RSA_RAW. *out_len: capacity in, length out. */
int hsmsim_rsa_encrypt(const hsmsim_rsa *ctx, int padding, int hash, int mgf1_hash,
                       const uint8_t *label, size_t label_len,
                       const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);
/* Decrypt: HSMSIM_ERR_DECRYPT on any failure, whatever the reason; out is zeroised then. */
int hsmsim_rsa_decrypt(const hsmsim_rsa *ctx, int padding, int hash, int mgf1_hash,
                       const uint8_t *label, size_t label_len,
                       const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);

/* ---- cdef end --------------------------------------------------------------------------- */

#ifdef __cplusplus
}
#endif

#endif /* HSMSIM_CORE_H */
