/* hsmsim_version.c - the version string compiled into the core (set by native/build_native.py). */
#include "hsmsim_core.h"

#ifndef HSMSIM_VERSION
#error "HSMSIM_VERSION must be defined by native/build_native.py"
#endif

const char *hsmsim_version(void)
{
    return HSMSIM_VERSION;
}
