// The README's Go recipe: crypto11 (Debian's golang-github-thalesignite-crypto11-dev) against an
// hsmsim cluster. Reads HSMSIM_PKCS11_MODULE and HSMSIM_PIN, as `hsmsim env` exports them, and
// prints key=value lines (binary values in base64) that tests/clients/test_go.py checks.
package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"os"

	"github.com/ThalesIgnite/crypto11"
)

// CloudHSM's vendor AES-GCM: pIv NULL, the output is IV || ciphertext || tag.
const ckmCloudHSMAESGCM = 0x80000000 | 0x1087

func out(k string, v interface{}) {
	if b, ok := v.([]byte); ok {
		v = base64.StdEncoding.EncodeToString(b)
	}
	fmt.Printf("%s=%v\n", k, v)
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func attrs(id, label string, kv ...interface{}) crypto11.AttributeSet {
	a, err := crypto11.NewAttributeSetWithIDAndLabel([]byte(id), []byte(label))
	must(err)
	for i := 0; i < len(kv); i += 2 {
		must(a.Set(kv[i].(crypto11.AttributeType), kv[i+1]))
	}
	return a
}

func main() {
	cfg := crypto11.Config{Path: os.Getenv("HSMSIM_PKCS11_MODULE"), TokenLabel: "hsm1",
		Pin: os.Getenv("HSMSIM_PIN")} // Pin is "crypto_user:password"
	ctx, err := crypto11.Configure(&cfg)
	must(err)
	defer ctx.Close()
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	tag := fmt.Sprintf("%x", suffix)
	msg := []byte("hsmsim from Go")
	digest := sha256.Sum256(msg)
	out("message", msg)

	// ECDSA P-256, usage attributes explicit (CloudHSM's default to false).
	ec, err := ctx.GenerateECDSAKeyPairWithAttributes(
		attrs("ec-"+tag, "go-ec-"+tag, crypto11.CkaVerify, true),
		attrs("ec-"+tag, "go-ec-"+tag, crypto11.CkaSign, true, crypto11.CkaPrivate, true),
		elliptic.P256())
	must(err)
	ecSig, err := ec.Sign(rand.Reader, digest[:], crypto.SHA256)
	must(err)
	ecPub := ec.Public().(*ecdsa.PublicKey)
	der, err := x509.MarshalPKIXPublicKey(ecPub)
	must(err)
	out("ec_verified", ecdsa.VerifyASN1(ecPub, digest[:], ecSig))
	out("ec_public", der)
	out("ec_signature", ecSig)

	// RSA-2048: PKCS#1 v1.5 and PSS signatures, verified with crypto/rsa.
	rk, err := ctx.GenerateRSAKeyPairWithAttributes(
		attrs("rsa-"+tag, "go-rsa-"+tag, crypto11.CkaVerify, true, crypto11.CkaEncrypt, true),
		attrs("rsa-"+tag, "go-rsa-"+tag, crypto11.CkaSign, true, crypto11.CkaDecrypt, true,
			crypto11.CkaPrivate, true),
		2048)
	must(err)
	rsaPub := rk.Public().(*rsa.PublicKey)
	rsaSig, err := rk.Sign(rand.Reader, digest[:], crypto.SHA256)
	must(err)
	out("rsa_verified", rsa.VerifyPKCS1v15(rsaPub, crypto.SHA256, digest[:], rsaSig) == nil)
	pss := &rsa.PSSOptions{SaltLength: 32, Hash: crypto.SHA256}
	pssSig, err := rk.Sign(rand.Reader, digest[:], pss)
	must(err)
	out("pss_verified", rsa.VerifyPSS(rsaPub, crypto.SHA256, digest[:], pssSig, pss) == nil)
	der, err = x509.MarshalPKIXPublicKey(rsaPub)
	must(err)
	out("rsa_public", der)
	out("rsa_signature", rsaSig)

	// Found again by label.
	found, err := ctx.FindKeyPair(nil, []byte("go-ec-"+tag))
	must(err)
	out("found_by_label", found != nil && found.Public().(*ecdsa.PublicKey).Equal(ecPub))

	// AES-256: CBC with PKCS#7 padding in the HSM.
	aes, err := ctx.GenerateSecretKeyWithAttributes(attrs("aes-"+tag, "go-aes-"+tag,
		crypto11.CkaEncrypt, true, crypto11.CkaDecrypt, true, crypto11.CkaPrivate, true),
		256, crypto11.CipherAES)
	must(err)
	cbc, err := aes.NewCBC(crypto11.PaddingPKCS)
	must(err)
	iv := make([]byte, 16)
	_, _ = rand.Read(iv)
	ct := cbc.Seal(nil, iv, msg, nil)
	pt, err := cbc.Open(nil, iv, ct, nil)
	must(err)
	out("cbc_ciphertext", ct)
	out("cbc_roundtrip", bytes.Equal(pt, msg))

	// crypto11's GCM Seal with CloudHSM's zeroed IV: the HSM encrypts under an IV of its own,
	// which crypto11 does not hand back (crypto11#132), so Open with the nonce fails.
	gcm, err := aes.NewGCM()
	must(err)
	nonce := make([]byte, 12)
	sealed := gcm.Seal(nil, nonce, msg, nil)
	_, err = gcm.Open(nil, nonce, sealed, nil)
	out("gcm_seal_nonce_after", nonce)
	out("gcm_open_with_nonce", err == nil)

	// The workaround: the vendor mechanism CKM_CLOUDHSM_AES_GCM, whose output carries the IV.
	// It takes a NULL pIv, which crypto11 passes when UseGCMIVFromHSM is set (a second context).
	vcfg := cfg
	vcfg.UseGCMIVFromHSM = true
	vctx, err := crypto11.Configure(&vcfg)
	must(err)
	defer vctx.Close()
	vkey, err := vctx.FindKey(nil, []byte("go-aes-"+tag))
	must(err)
	vc := *vkey.Cipher
	vc.GCMMech = ckmCloudHSMAESGCM
	vkey.Cipher = &vc
	vgcm, err := vkey.NewGCM()
	must(err)
	aad := []byte("header")
	vsealed := vgcm.Seal(nil, nil, msg, aad) // IV || ciphertext || tag
	vpt, err := vgcm.Open(nil, nil, vsealed, aad)
	must(err)
	out("vendor_gcm_sealed", vsealed)
	out("vendor_gcm_roundtrip", bytes.Equal(vpt, msg))
	out("done", true)
}
