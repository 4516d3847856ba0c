// The README's Node.js recipe: pkcs11js (npm) against an hsmsim cluster. Reads
// HSMSIM_PKCS11_MODULE and HSMSIM_PIN, as `hsmsim env` exports them, and prints key=value lines
// (binary values in base64) that tests/clients/test_node.py checks.
"use strict";
const crypto = require("crypto");
const pkcs11js = require("pkcs11js");

const out = (k, v) => console.log(`${k}=${Buffer.isBuffer(v) ? v.toString("base64") : v}`);
const label = (s) => Buffer.from(`node-${s}-${crypto.randomBytes(4).toString("hex")}`);

const p11 = new pkcs11js.PKCS11();
p11.load(process.env.HSMSIM_PKCS11_MODULE);
p11.C_Initialize();
try {
  const slot = p11.C_GetSlotList(true)[0];                       // token "hsm1"
  // CloudHSM refuses read-only sessions: ask for a RW one.
  const s = p11.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
  p11.C_Login(s, pkcs11js.CKU_USER, process.env.HSMSIM_PIN);    // "crypto_user:password"
  const msg = Buffer.from("hsmsim from Node");
  out("message", msg);

  // ECDSA P-256, usage attributes explicit (CloudHSM's default to false).
  const p256 = Buffer.from("06082a8648ce3d030107", "hex");      // OID prime256v1
  const ec = p11.C_GenerateKeyPair(s, { mechanism: pkcs11js.CKM_EC_KEY_PAIR_GEN, parameter: null },
    [{ type: pkcs11js.CKA_TOKEN, value: true }, { type: pkcs11js.CKA_LABEL, value: label("ec") },
     { type: pkcs11js.CKA_EC_PARAMS, value: p256 }, { type: pkcs11js.CKA_VERIFY, value: true }],
    [{ type: pkcs11js.CKA_TOKEN, value: true }, { type: pkcs11js.CKA_PRIVATE, value: true },
     { type: pkcs11js.CKA_SENSITIVE, value: true }, { type: pkcs11js.CKA_SIGN, value: true }]);
  p11.C_SignInit(s, { mechanism: pkcs11js.CKM_ECDSA_SHA256, parameter: null }, ec.privateKey);
  const ecSig = p11.C_Sign(s, msg, Buffer.alloc(132));           // r || s
  const point = p11.C_GetAttributeValue(s, ec.publicKey, [{ type: pkcs11js.CKA_EC_POINT }])[0].value;
  const raw = point.subarray(point.length - 65);                 // DER OCTET STRING of 04 || x || y
  const ecPub = crypto.createPublicKey({ format: "jwk", key: { kty: "EC", crv: "P-256",
    x: raw.subarray(1, 33).toString("base64url"), y: raw.subarray(33).toString("base64url") } });
  out("ec_verified", crypto.verify("sha256", msg, { key: ecPub, dsaEncoding: "ieee-p1363" }, ecSig));
  out("ec_public", ecPub.export({ format: "der", type: "spki" }));
  out("ec_signature", ecSig);

  // RSA-2048: PKCS#1 v1.5 signature, verified by Node's crypto.
  const rsa = p11.C_GenerateKeyPair(s, { mechanism: pkcs11js.CKM_RSA_PKCS_KEY_PAIR_GEN, parameter: null },
    [{ type: pkcs11js.CKA_TOKEN, value: true }, { type: pkcs11js.CKA_LABEL, value: label("rsa") },
     { type: pkcs11js.CKA_MODULUS_BITS, value: 2048 },
     { type: pkcs11js.CKA_PUBLIC_EXPONENT, value: Buffer.from([1, 0, 1]) },
     { type: pkcs11js.CKA_VERIFY, value: true }, { type: pkcs11js.CKA_ENCRYPT, value: true }],
    [{ type: pkcs11js.CKA_TOKEN, value: true }, { type: pkcs11js.CKA_PRIVATE, value: true },
     { type: pkcs11js.CKA_SENSITIVE, value: true }, { type: pkcs11js.CKA_SIGN, value: true },
     { type: pkcs11js.CKA_DECRYPT, value: true }]);
  p11.C_SignInit(s, { mechanism: pkcs11js.CKM_SHA256_RSA_PKCS, parameter: null }, rsa.privateKey);
  const rsaSig = p11.C_Sign(s, msg, Buffer.alloc(256));
  const [n, e] = p11.C_GetAttributeValue(s, rsa.publicKey,
    [{ type: pkcs11js.CKA_MODULUS }, { type: pkcs11js.CKA_PUBLIC_EXPONENT }]).map((a) => a.value);
  const rsaPub = crypto.createPublicKey({ format: "jwk", key: { kty: "RSA",
    n: n.toString("base64url"), e: e.toString("base64url") } });
  out("rsa_verified", crypto.verify("sha256", msg, rsaPub, rsaSig));
  out("rsa_public", rsaPub.export({ format: "der", type: "spki" }));
  out("rsa_signature", rsaSig);

  // AES-256-GCM: pass a zeroed 12-byte IV; the HSM writes the IV it generated into that Buffer.
  const aes = p11.C_GenerateKey(s, { mechanism: pkcs11js.CKM_AES_KEY_GEN, parameter: null },
    [{ type: pkcs11js.CKA_TOKEN, value: true }, { type: pkcs11js.CKA_LABEL, value: label("aes") },
     { type: pkcs11js.CKA_VALUE_LEN, value: 32 }, { type: pkcs11js.CKA_PRIVATE, value: true },
     { type: pkcs11js.CKA_SENSITIVE, value: true },
     { type: pkcs11js.CKA_ENCRYPT, value: true }, { type: pkcs11js.CKA_DECRYPT, value: true }]);
  const aad = Buffer.from("header");
  const iv = Buffer.alloc(12);
  p11.C_EncryptInit(s, { mechanism: pkcs11js.CKM_AES_GCM,
    parameter: { type: pkcs11js.CK_PARAMS_GCM, iv, ivBits: 96, aad, tagBits: 128 } }, aes);
  const gct = p11.C_Encrypt(s, msg, Buffer.alloc(msg.length + 16));   // ciphertext || tag
  out("gcm_iv", iv);
  out("gcm_ciphertext", gct);
  p11.C_DecryptInit(s, { mechanism: pkcs11js.CKM_AES_GCM,
    parameter: { type: pkcs11js.CK_PARAMS_GCM, iv, ivBits: 96, aad, tagBits: 128 } }, aes);
  out("gcm_roundtrip", p11.C_Decrypt(s, gct, Buffer.alloc(gct.length)).equals(msg));

  // AES-256-CBC-PAD with an IV of the application's own.
  const cbcIv = crypto.randomBytes(16);
  p11.C_EncryptInit(s, { mechanism: pkcs11js.CKM_AES_CBC_PAD, parameter: cbcIv }, aes);
  const cct = p11.C_Encrypt(s, msg, Buffer.alloc(msg.length + 16));
  p11.C_DecryptInit(s, { mechanism: pkcs11js.CKM_AES_CBC_PAD, parameter: cbcIv }, aes);
  out("cbc_ciphertext", cct);
  out("cbc_roundtrip", p11.C_Decrypt(s, cct, Buffer.alloc(cct.length)).equals(msg));

  p11.C_Logout(s);
  p11.C_CloseSession(s);
  out("done", true);
} finally {
  p11.C_Finalize();
}
