/* hsmsim_version.c - the version string compiled into the core (set by native/build_native.py),
 * and small process utilities. */
#include <limits.h>

#include <openssl/crypto.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "hsmsim_core.h"

#ifndef HSMSIM_VERSION
#error "HSMSIM_VERSION must be defined by native/build_native.py"
#endif

const char *hsmsim_version(void)
{
    return HSMSIM_VERSION;
}

void hsmsim_wipe(void *p, size_t n)
{
    if (p != NULL && n > 0)
        OPENSSL_cleanse(p, n);
}

const char *hsmsim_libcrypto_version(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}

int hsmsim_malloc_keep(size_t keep_bytes)
{
#if defined(__GLIBC__)
    int keep = keep_bytes > INT_MAX ? INT_MAX : (int)keep_bytes;
    return mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1 && mallopt(M_TRIM_THRESHOLD, keep) == 1;
#else
    (void)keep_bytes;
    return 0;
#endif
}
