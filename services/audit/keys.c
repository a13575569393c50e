/*
 * keys: the checkpoint key on the command line.
 *
 *   qm-audit keygen FILE   writes a new Ed25519 private key (PKCS#8 PEM, mode
 *                          0600, never over an existing file) and prints its
 *                          public key (PEM) on stdout, the key id on stderr;
 *   qm-audit pubkey [FILE] prints the public key (PEM) of FILE, or of
 *                          QM_AUDIT_SIGNING_KEY_FILE, on stdout and the key id
 *                          on stderr — what auditors pass to verify --pubkey.
 *
 * Exit 0 done, 1 the key could not be made or read, 2 usage.
 */
#include "audit.h"

#include "qm_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints k's public key on stdout and its id on stderr. */
static void print_public(const chain_key_t *k) {
  char *pem = chain_key_public_pem(k);
  char id[CHAIN_KEY_ID_LEN];
  chain_key_id(k, id);
  fputs(pem, stdout);
  fprintf(stderr, "key id %s (%s)\n", id, CHAIN_SIG_ALGORITHM);
  free(pem);
}

int audit_keygen_main(int argc, char **argv) {
  if (argc != 2 || argv[1][0] == '-') {
    fprintf(stderr, "usage: qm-audit keygen FILE\n"
                    "  Writes a new Ed25519 checkpoint signing key to FILE (PEM, mode 0600) and\n"
                    "  prints its public key. Point QM_AUDIT_SIGNING_KEY_FILE at FILE.\n");
    return 2;
  }
  char errstr[512];
  chain_key_t *k = NULL;
  int status = 1;
  if (chain_key_generate(&k, errstr, sizeof(errstr)) != QM_OK ||
      chain_key_write_pem(k, argv[1], errstr, sizeof(errstr)) != QM_OK) {
    fprintf(stderr, "qm-audit keygen: %s\n", errstr);
    goto out;
  }
  print_public(k);
  status = 0;
out:
  chain_key_destroy(k);
  return status;
}

int audit_pubkey_main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : getenv("QM_AUDIT_SIGNING_KEY_FILE");
  if (argc > 2 || !path || !*path || path[0] == '-') {
    fprintf(stderr, "usage: qm-audit pubkey [FILE]\n"
                    "  Prints the public checkpoint key of FILE (default: "
                    "QM_AUDIT_SIGNING_KEY_FILE).\n"
                    "  A service without that file signs with a key of its own: read it from\n"
                    "  GET /v1/audit/key instead.\n");
    return 2;
  }
  char errstr[512];
  chain_key_t *k = NULL;
  if (chain_key_load_pem(path, &k, errstr, sizeof(errstr)) != QM_OK) {
    fprintf(stderr, "qm-audit pubkey: %s\n", errstr);
    return 1;
  }
  print_public(k);
  chain_key_destroy(k);
  return 0;
}
