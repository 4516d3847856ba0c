#!/bin/bash
# OpenSSH against hsmsim, as README's "OpenSSH" recipe shows it (those lines verbatim, with an
# RSA key and the checks around them); run by tests/clients/test_openssh.py in a scratch
# directory with the environment of `eval "$(hsmsim env)"`. Prints key=value lines (files in
# base64) and ends with done=true. Its files go to a new directory under $TMPDIR.
set -euo pipefail
cd "$(mktemp -d)"
out() { printf '%s=%s\n' "$1" "$2"; }
b64() { base64 -w0 < "$1"; }
echo "signed by an HSM key through ssh-agent" > message.txt

pkcs11-tool --module "$HSMSIM_PKCS11_MODULE" --login --pin "$HSMSIM_PIN" --private \
    --keypairgen --key-type EC:prime256v1 --label ssh-ec --id 5501 --usage-sign
pkcs11-tool --module "$HSMSIM_PKCS11_MODULE" --login --pin "$HSMSIM_PIN" --private \
    --keypairgen --key-type rsa:2048 --label ssh-rsa --id 5502 --usage-sign
for k in ec rsa; do
    pkcs11-tool --module "$HSMSIM_PKCS11_MODULE" --login --pin "$HSMSIM_PIN" --session-rw \
        --read-object --type pubkey --label "ssh-$k" -o "$k.der" > /dev/null
    out "${k}_public_der" "$(b64 "$k.der")"
done

# Without a terminal or an askpass program OpenSSH cannot ask for the PIN.
ssh-keygen -D "$HSMSIM_PKCS11_MODULE" < /dev/null > /dev/null 2>&1 && out no_pin_D ok || out no_pin_D failed
SSH_ASKPASS="$HSMSIM_SSH_ASKPASS" SSH_ASKPASS_REQUIRE=force ssh-keygen -D "$HSMSIM_PKCS11_MODULE"
SSH_ASKPASS="$HSMSIM_SSH_ASKPASS" SSH_ASKPASS_REQUIRE=force ssh-keygen -D "$HSMSIM_PKCS11_MODULE" \
    > keygen-D.pub
out keygen_D "$(b64 keygen-D.pub)"

# ssh-agent's default allow-list is /usr/lib*/*,/usr/local/lib*/*: without -P it refuses.
(eval "$(ssh-agent -s)" > /dev/null
 SSH_ASKPASS="$HSMSIM_SSH_ASKPASS" SSH_ASKPASS_REQUIRE=force ssh-add -s "$HSMSIM_PKCS11_MODULE" \
     < /dev/null > /dev/null 2>&1 && echo ok > default-agent.txt || echo refused > default-agent.txt
 ssh-agent -k > /dev/null)
out default_agent_add "$(cat default-agent.txt)"

eval "$(ssh-agent -s -P "$HSMSIM_PKCS11_MODULE")"
trap 'ssh-agent -k > /dev/null' EXIT
SSH_ASKPASS="$HSMSIM_SSH_ASKPASS" SSH_ASKPASS_REQUIRE=force ssh-add -s "$HSMSIM_PKCS11_MODULE"
ssh-add -L | grep ' ssh-ec$' > ssh-ec.pub
ssh-add -L | grep ' ssh-rsa$' > ssh-rsa.pub
ssh-keygen -Y sign -f ssh-ec.pub -n file message.txt          # writes message.txt.sig
echo "me $(cut -d' ' -f1,2 ssh-ec.pub)" > allowed_signers
ssh-keygen -Y verify -f allowed_signers -I me -n file -s message.txt.sig < message.txt

out message "$(b64 message.txt)"
out agent_ec "$(cat ssh-ec.pub)"
out agent_rsa "$(cat ssh-rsa.pub)"
out ec_sshsig "$(b64 message.txt.sig)"
ssh-keygen -Y verify -f allowed_signers -I me -n file -s message.txt.sig < message.txt \
    > verify-ec.txt 2>&1
out ec_verify "$(cat verify-ec.txt)"
cp message.txt rsa-message.txt
ssh-keygen -Y sign -f ssh-rsa.pub -n file rsa-message.txt
out rsa_sshsig "$(b64 rsa-message.txt.sig)"
echo "me $(cut -d' ' -f1,2 ssh-rsa.pub)" > rsa_allowed_signers
ssh-keygen -Y verify -f rsa_allowed_signers -I me -n file -s rsa-message.txt.sig < message.txt \
    > verify-rsa.txt 2>&1
out rsa_verify "$(cat verify-rsa.txt)"
echo "tampered" | ssh-keygen -Y verify -f allowed_signers -I me -n file -s message.txt.sig \
    > /dev/null 2>&1 && out tampered_verify ok || out tampered_verify refused
out done true
