#!/bin/bash
# p11-kit's proxy module loading hsmsim through a `.module` file, as README's "p11-kit" recipe
# shows it (those lines verbatim, with the checks around them); run by
# tests/clients/test_p11kit.py with the environment of `eval "$(hsmsim env)"` and HOME a scratch
# directory (as a user other than root: p11-kit ignores ~/.config for root). Prints key=value
# lines (files in base64) and ends with done=true. Its files go to a new directory under $TMPDIR.
set -euo pipefail
cd "$(mktemp -d)"
out() { printf '%s=%s\n' "$1" "$2"; }
b64() { base64 -w0 < "$1"; }
echo "through p11-kit-proxy.so" > message.txt
IV=000102030405060708090a0b0c0d0e0f

mkdir -p ~/.config/pkcs11/modules
ln -sf "$HSMSIM_P11KIT_MODULE_FILE" ~/.config/pkcs11/modules/hsmsim.module
p11-kit list-modules
PROXY=/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so
pkcs11-tool --module "$PROXY" --token-label hsm1 --login --pin "$HSMSIM_PIN" --private \
    --keypairgen --key-type EC:prime256v1 --label kit-ec --id 7101 --usage-sign
pkcs11-tool --module "$PROXY" --token-label hsm1 --login --pin "$HSMSIM_PIN" --session-rw \
    --sign -m ECDSA-SHA256 --id 7101 -i message.txt -o message.sig
pkcs11-tool --module "$PROXY" --token-label hsm1 --login --pin "$HSMSIM_PIN" --private \
    --keygen --key-type AES:32 --label kit-aes --id 7102 --usage-decrypt
pkcs11-tool --module "$PROXY" --token-label hsm1 --login --pin "$HSMSIM_PIN" --session-rw \
    --encrypt -m AES-CBC-PAD --iv "$IV" --id 7102 -i message.txt -o message.enc
pkcs11-tool --module "$PROXY" --token-label hsm1 --login --pin "$HSMSIM_PIN" --session-rw \
    --decrypt -m AES-CBC-PAD --iv "$IV" --id 7102 -i message.enc -o message.dec

p11-kit list-modules > modules.txt
out modules "$(b64 modules.txt)"
# Without HSMSIM_SOCKET (or HSMSIM_HOME) the module looks for ./.hsmsim/gateway.sock and
# p11-kit leaves it out.
env -u HSMSIM_SOCKET -u HSMSIM_HOME p11-kit list-modules > modules-no-socket.txt 2>&1 || true
out modules_no_socket "$(b64 modules-no-socket.txt)"
pkcs11-tool --module "$PROXY" --token-label hsm1 --login --pin "$HSMSIM_PIN" --session-rw \
    --read-object --type pubkey --id 7101 -o ec.der > /dev/null
out ec_public_der "$(b64 ec.der)"
out message "$(b64 message.txt)"
out ec_signature "$(b64 message.sig)"
out cbc_ciphertext "$(b64 message.enc)"
out cbc_decrypted "$(b64 message.dec)"
out done true
