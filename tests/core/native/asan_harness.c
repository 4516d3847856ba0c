/* asan_harness.c - a C-level exercise of the crypto core for sanitizer builds. */
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include "hsmsim_core.h"
#define CHECK(x) do { int _r = (x); if (_r) { printf("FAIL %s -> %d (line %d)\n", #x, _r, __LINE__); exit(1);} } while (0)
/* Exercises every entry point of the core, including error paths, batches on 1 to 4 threads
 * and the pointer-input mode; built with AddressSanitizer and UBSan by test_sanitizers.py.
 * argv[1]: an RSA-2048 private key, PKCS#8 DER. */
int main(int argc, char **argv){
  if (argc != 2) return 2;
  uint8_t key[32]={1}, iv[128]={2}, aad[50]={3}, in[5000], out[5000+16], back[5000];
  for (int i=0;i<5000;i++) in[i]=i;
  hsmsim_gcm *g; CHECK(hsmsim_gcm_new(key,32,&g));
  for (size_t ivl=1; ivl<=128; ivl+=31) for (size_t tl=4; tl<=16; tl+=3) for (size_t n=0;n<300;n+=37){
    CHECK(hsmsim_gcm_encrypt(g,iv,ivl,aad,ivl%50,in,n,out,n+tl,tl));
    CHECK(hsmsim_gcm_decrypt(g,iv,ivl,aad,ivl%50,out,n+tl,back,n,tl));
    if (memcmp(back,in,n)) { puts("mismatch"); return 1; }
    out[n+tl-1]^=1;
    if (hsmsim_gcm_decrypt(g,iv,ivl,aad,ivl%50,out,n+tl,back,n,tl)!=HSMSIM_ERR_TAG) { puts("tag"); return 1; }
  }
  if (hsmsim_gcm_encrypt(g,iv,0,NULL,0,in,10,out,26,16)!=HSMSIM_ERR_ARG) { printf("fail line %d\n", __LINE__); return 1; }
  if (hsmsim_gcm_encrypt(g,iv,12,NULL,0,in,10,out,25,16)!=HSMSIM_ERR_BUFFER) { printf("fail line %d\n", __LINE__); return 1; }
  if (hsmsim_gcm_decrypt(g,iv,12,NULL,0,in,3,out,0,4)!=HSMSIM_ERR_ARG) { printf("fail line %d\n", __LINE__); return 1; }
  /* batches: packed and pointers, 1..3 threads */
  enum {N=20}; size_t ivl[N], inl[N], aadl[N]; const uint8_t *ptrs[N]; int32_t st[N];
  uint8_t ivs[N*12], aads[N*5]; size_t tot=0;
  for (int i=0;i<N;i++){ ivl[i]=12; inl[i]=i*13; aadl[i]=5; ptrs[i]=in+i; tot+=inl[i]+16; }
  uint8_t *bo=malloc(tot), *bb=malloc(tot);
  for (unsigned th=1; th<=3; th++){
    CHECK(hsmsim_gcm_encrypt_batch(g,N,ivs,ivl,aads,aadl,in,NULL,inl,bo,tot,16,st,th));
    CHECK(hsmsim_gcm_encrypt_batch(g,N,ivs,ivl,NULL,NULL,NULL,ptrs,inl,bo,tot,16,st,th));
    size_t inl2[N]; const uint8_t *p2[N]; const uint8_t *q=bo;
    for (int i=0;i<N;i++){ inl2[i]=inl[i]+16; p2[i]=q; q+=inl2[i]; }
    CHECK(hsmsim_gcm_decrypt_batch(g,N,ivs,ivl,NULL,NULL,NULL,p2,inl2,bb,tot,16,st,th));
    CHECK(hsmsim_gcm_decrypt_batch(g,N,ivs,ivl,NULL,NULL,bo,NULL,inl2,bb,tot,16,st,th));
    for (int i=0;i<N;i++) if (st[i]) { puts("st"); return 1; }
    if (hsmsim_gcm_decrypt_batch(g,N,ivs,ivl,NULL,NULL,bo,NULL,inl2,bb,tot-N*16-1,16,st,th)!=HSMSIM_ERR_BUFFER) { puts("buf"); return 1; }
  }
  free(bo); free(bb);
  hsmsim_gcm_free(g); hsmsim_gcm_free(NULL);
  /* RSA */
  unsigned char der[4096]; FILE*f=fopen(argv[1],"rb"); if (!f) return 2; size_t dl=fread(der,1,sizeof der,f); fclose(f);
  hsmsim_rsa *r, *pub, *c0; CHECK(hsmsim_rsa_private_from_der(der,dl,&r)); CHECK(hsmsim_rsa_public_of(r,&pub));
  if (hsmsim_rsa_private_from_der(der,dl-1,&c0)!=HSMSIM_ERR_KEY) { printf("fail line %d\n", __LINE__); return 1; }  /* pub untouched? set to NULL */
  uint8_t d[64]={5}, sig[512], pt[512]; size_t sl=512, pl=512;
  for (int pad=1; pad<=2; pad++) for (int h=(pad==1?0:1); h<=5; h++){
    size_t dlen = h==0?40: (h==1?20:h==2?28:h==3?32:h==4?48:64);
    sl=512; CHECK(hsmsim_rsa_sign(r,pad,h,3,10,d,dlen,sig,&sl));
    CHECK(hsmsim_rsa_verify(pub,pad,h,3,10,sig,sl,d,dlen));
    sig[0]^=1; if (hsmsim_rsa_verify(pub,pad,h,3,10,sig,sl,d,dlen)!=HSMSIM_ERR_SIGNATURE) { printf("fail line %d\n", __LINE__); return 1; }
  }
  sl=512; CHECK(hsmsim_rsa_encrypt(pub,3,3,1,(const uint8_t*)"lbl",3,d,30,sig,&sl));
  pl=512; CHECK(hsmsim_rsa_decrypt(r,3,3,1,(const uint8_t*)"lbl",3,sig,sl,pt,&pl)); if (pl!=30) { printf("fail line %d\n", __LINE__); return 1; }
  pl=512; if (hsmsim_rsa_decrypt(r,3,3,1,(const uint8_t*)"lbx",3,sig,sl,pt,&pl)!=HSMSIM_ERR_DECRYPT) { printf("fail line %d\n", __LINE__); return 1; }
  sl=512; CHECK(hsmsim_rsa_encrypt(pub,1,0,0,NULL,0,d,30,sig,&sl));
  pl=512; CHECK(hsmsim_rsa_decrypt(r,1,0,0,NULL,0,sig,sl,pt,&pl));
  uint8_t x[256]={0}; x[255]=7; sl=512; CHECK(hsmsim_rsa_sign(r,4,0,0,0,x,256,sig,&sl));
  sl=512; CHECK(hsmsim_rsa_encrypt(pub,4,0,0,NULL,0,x,256,sig,&sl));
  pl=512; CHECK(hsmsim_rsa_decrypt(r,4,0,0,NULL,0,sig,sl,pt,&pl));
  if (hsmsim_rsa_sign(pub,1,3,0,0,d,32,sig,&sl)!=HSMSIM_ERR_ARG) { printf("fail line %d\n", __LINE__); return 1; }
  uint8_t bsig[512*7]; size_t lens[7]={32,32,32,32,32,32,32}; int32_t bst[7]; uint8_t dd[32*7]={0};
  for (unsigned th=1; th<=4; th++) CHECK(hsmsim_rsa_sign_batch(r,2,3,3,32,7,dd,lens,bsig,sizeof bsig,bst,th));
  uint8_t spki[1024]; size_t sp=sizeof spki; CHECK(hsmsim_rsa_public_der(pub,spki,&sp));
  uint8_t nb[512], eb[512]; size_t nl=512, el=512; CHECK(hsmsim_rsa_public_numbers(pub,nb,&nl,eb,&el));
  hsmsim_rsa *c; CHECK(hsmsim_rsa_public_from_components(nb,nl,eb,el,&c)); hsmsim_rsa_free(c);
  hsmsim_rsa_free(r); hsmsim_rsa_free(pub); hsmsim_rsa_free(NULL);
  puts("all ok");
  return 0;
}
