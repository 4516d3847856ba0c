/* hsmsim_version.c - the version string compiled into the core (set by native/build_native.py),
 * and small utilities. */
#include <openssl/crypto.h>

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
