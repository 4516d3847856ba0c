"""Where the build puts libhsmsim-pkcs11.so (found by hsmsim.resources.pkcs11_module)."""
