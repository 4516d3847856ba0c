// The README's Java recipe: SunPKCS11 (JDK 17) against an hsmsim cluster.
// Usage: java HsmsimJava  (reads HSMSIM_SUNPKCS11_CONFIG and HSMSIM_PIN, as `hsmsim env` exports them)
// Prints key=value lines (binary values in base64) that tests/clients/test_java.py checks.
import java.security.*;
import java.security.spec.*;
import java.util.Base64;
import javax.crypto.*;
import javax.crypto.spec.*;

public class HsmsimJava {
    static final Base64.Encoder B64 = Base64.getEncoder();

    static void out(String k, Object v) {
        System.out.println(k + "=" + (v instanceof byte[] ? B64.encodeToString((byte[]) v) : v));
    }

    public static void main(String[] args) throws Exception {
        // The config names the module, the slot and the usage attributes of generated keys.
        Provider p = Security.getProvider("SunPKCS11").configure(System.getenv("HSMSIM_SUNPKCS11_CONFIG"));
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, System.getenv("HSMSIM_PIN").toCharArray());   // "crypto_user:password" logs in
        byte[] msg = "hsmsim from Java".getBytes("UTF-8");
        out("message", msg);

        // ECDSA P-256: keygen and signature in the HSM, verification by the default provider.
        KeyPairGenerator ecGen = KeyPairGenerator.getInstance("EC", p);
        ecGen.initialize(new ECGenParameterSpec("secp256r1"));
        KeyPair ec = ecGen.generateKeyPair();
        Signature s = Signature.getInstance("SHA256withECDSA", p);
        s.initSign(ec.getPrivate());
        s.update(msg);
        byte[] ecSig = s.sign();
        Signature v = Signature.getInstance("SHA256withECDSA");
        v.initVerify(KeyFactory.getInstance("EC").generatePublic(new X509EncodedKeySpec(ec.getPublic().getEncoded())));
        v.update(msg);
        out("ec_provider", v.getProvider().getName());
        out("ec_verified", v.verify(ecSig));
        out("ec_public", ec.getPublic().getEncoded());
        out("ec_signature", ecSig);

        // RSA-2048 (CloudHSM's minimum): PKCS#1 v1.5 signature, verified by the default provider.
        KeyPairGenerator rsaGen = KeyPairGenerator.getInstance("RSA", p);
        rsaGen.initialize(2048);
        KeyPair rsa = rsaGen.generateKeyPair();
        s = Signature.getInstance("SHA256withRSA", p);
        s.initSign(rsa.getPrivate());
        s.update(msg);
        byte[] rsaSig = s.sign();
        v = Signature.getInstance("SHA256withRSA");
        v.initVerify(KeyFactory.getInstance("RSA").generatePublic(new X509EncodedKeySpec(rsa.getPublic().getEncoded())));
        v.update(msg);
        out("rsa_verified", v.verify(rsaSig));
        PSSParameterSpec pss = new PSSParameterSpec("SHA-256", "MGF1", MGF1ParameterSpec.SHA256, 32, 1);
        s = Signature.getInstance("RSASSA-PSS", p);
        s.setParameter(pss);
        s.initSign(rsa.getPrivate());
        s.update(msg);
        byte[] pssSig = s.sign();
        v = Signature.getInstance("RSASSA-PSS");
        v.setParameter(pss);
        v.initVerify(KeyFactory.getInstance("RSA").generatePublic(new X509EncodedKeySpec(rsa.getPublic().getEncoded())));
        v.update(msg);
        out("pss_verified", v.verify(pssSig));
        out("pss_signature", pssSig);
        out("rsa_public", rsa.getPublic().getEncoded());
        out("rsa_signature", rsaSig);

        // AES-256-CBC with PKCS#5 padding: encrypt and decrypt in the HSM.
        KeyGenerator kg = KeyGenerator.getInstance("AES", p);
        kg.init(256);
        SecretKey aes = kg.generateKey();
        Cipher c = Cipher.getInstance("AES/CBC/PKCS5Padding", p);
        c.init(Cipher.ENCRYPT_MODE, aes);
        byte[] ct = c.doFinal(msg);
        byte[] iv = c.getIV();
        c.init(Cipher.DECRYPT_MODE, aes, new IvParameterSpec(iv));
        out("cbc_iv", iv);
        out("cbc_ciphertext", ct);
        out("cbc_roundtrip", java.util.Arrays.equals(c.doFinal(ct), msg));

        // AES/GCM: CloudHSM generates the IV, SunPKCS11 cannot hand it back (see the README).
        Cipher g = Cipher.getInstance("AES/GCM/NoPadding", p);
        try {
            g.init(Cipher.ENCRYPT_MODE, aes);   // SunPKCS11 draws a random IV: the HSM refuses it
            g.doFinal(msg);
            out("gcm_random_iv", "accepted");
        } catch (Exception e) {
            out("gcm_random_iv", e.getClass().getSimpleName());
        }
        g = Cipher.getInstance("AES/GCM/NoPadding", p);
        g.init(Cipher.ENCRYPT_MODE, aes, new GCMParameterSpec(128, new byte[12]));  // CloudHSM's zeroed IV
        byte[] gct = g.doFinal(msg);
        out("gcm_zero_iv_ciphertext", gct);
        out("gcm_zero_iv_getiv", g.getIV());
        g = Cipher.getInstance("AES/GCM/NoPadding", p);
        g.init(Cipher.DECRYPT_MODE, aes, new GCMParameterSpec(128, new byte[12]));
        try {
            g.doFinal(gct);
            out("gcm_decrypt_with_getiv", "ok");
        } catch (Exception e) {
            out("gcm_decrypt_with_getiv", e.getClass().getSimpleName());
        }
        out("done", true);
    }
}
