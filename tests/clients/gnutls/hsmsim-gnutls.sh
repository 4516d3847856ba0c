#!/bin/bash
# GnuTLS's p11tool and certtool against hsmsim, as README's "GnuTLS (p11tool, certtool)" recipe
# shows it (those lines verbatim, with the checks around them); run by
# tests/clients/test_gnutls.py with the environment of `eval "$(hsmsim env)"`, against a cluster
# with gateway.quirk_ro_session_fails = false. Prints key=value lines (files in base64) and
# ends with done=true. Its files go to a new directory under $TMPDIR.
set -euo pipefail
cd "$(mktemp -d)"
out() { printf '%s=%s\n' "$1" "$2"; }
b64() { base64 -w0 < "$1"; }

export GNUTLS_PIN="$HSMSIM_PIN"
# p11tool's own key generation marks the public key CKA_PRIVATE=false, which CloudHSM refuses.
p11tool --provider "$HSMSIM_PKCS11_MODULE" --login --generate-privkey=ecdsa --curve=secp256r1 \
    --label gnutls-ec --mark-sign "pkcs11:token=hsm1" > /dev/null 2> generate.err \
    && out p11tool_generate ok || out p11tool_generate "$(tr '\n' ' ' < generate.err)"

pkcs11-tool --module "$HSMSIM_PKCS11_MODULE" --login --pin "$HSMSIM_PIN" --private \
    --keypairgen --key-type rsa:2048 --label tls-rsa --id 6101 --usage-sign
p11tool --provider "$HSMSIM_PKCS11_MODULE" --list-tokens
p11tool --provider "$HSMSIM_PKCS11_MODULE" --login --test-sign "pkcs11:token=hsm1;object=tls-rsa;type=private"
printf 'cn = "hsmsim gnutls"\nexpiration_days = 30\nsigning_key\ntls_www_server\n' > cert.cfg
certtool --provider "$HSMSIM_PKCS11_MODULE" --generate-self-signed --template cert.cfg \
    --load-privkey "pkcs11:token=hsm1;object=tls-rsa;type=private" --outfile cert.pem
p11tool --provider "$HSMSIM_PKCS11_MODULE" --login --write --load-certificate cert.pem \
    --label tls-rsa --id 6101 "pkcs11:token=hsm1"
p11tool --provider "$HSMSIM_PKCS11_MODULE" --login --list-all "pkcs11:token=hsm1;object=tls-rsa"

P="--provider $HSMSIM_PKCS11_MODULE"
p11tool $P --list-tokens > tokens.txt
out tokens "$(b64 tokens.txt)"
p11tool $P --login --list-all "pkcs11:token=hsm1;object=tls-rsa" > objects.txt
out objects "$(b64 objects.txt)"
p11tool $P --login --test-sign "pkcs11:token=hsm1;object=tls-rsa;type=private" > test-sign.txt 2>&1
out test_sign "$(b64 test-sign.txt)"
out cert_pem "$(b64 cert.pem)"
p11tool $P --login --export-pubkey "pkcs11:token=hsm1;object=tls-rsa;type=private" \
    --outfile pub.pem 2> /dev/null
out public_pem "$(b64 pub.pem)"
p11tool $P --login --export "pkcs11:token=hsm1;object=tls-rsa;type=cert" --outfile token-cert.pem
out token_cert_pem "$(b64 token-cert.pem)"
out done true
