/* hsmsim_internal.h - helpers shared by the core's C files; not part of the cffi surface. */
#ifndef HSMSIM_INTERNAL_H
#define HSMSIM_INTERNAL_H

#include <openssl/err.h>

#include "hsmsim_core.h"

/* Forget libcrypto's error queue (per thread) after a failure: the status code is the only
 * thing reported, and stale entries must not leak into the next operation. */
static inline int hsmsim_fail(int status)
{
    ERR_clear_error();
    return status;
}

#endif
