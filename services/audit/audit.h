/*
 * audit: what the files of qm-audit share — the command-line tools beside
 * the service (verify, export, keygen, pubkey, migrate), the ledger's
 * migrations, the checkpoint signer the service runs, and the JSON Lines
 * form of ledger records and checkpoints used by export files.
 */
#ifndef QM_AUDIT_H
#define QM_AUDIT_H

#include "chain.h"

#include "qm_pg.h"
#include "qm_service.h"

#include "qm/v1/audit.pb-c.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* CloudEvents types on qm.audit.v1. */
#define AUDIT_TYPE_RECORD "qm.audit.record_sealed.v1"
#define AUDIT_TYPE_CHECKPOINT "qm.audit.checkpoint_signed.v1"

/* The default DSN of the command-line tools when QM_PG_DSN is unset. */
#define AUDIT_DEFAULT_DSN "host=127.0.0.1 port=5432 user=postgres dbname=quartermaster"

/* ---- subcommands: argv[0] is the subcommand's name; return the exit code -- */

int audit_verify_main(int argc, char **argv);  /* verify.c */
int audit_export_main(int argc, char **argv);  /* export.c */
int audit_keygen_main(int argc, char **argv);  /* keys.c */
int audit_pubkey_main(int argc, char **argv);  /* keys.c */
int audit_prune_main(int argc, char **argv);   /* prune.c */

/* A command-line tool's connection: QM_PG_DSN (default AUDIT_DEFAULT_DSN),
 * schema audit, application name qm-audit-<tool>. NULL after printing
 * "qm-audit <tool>: cannot connect (…); set QM_PG_DSN" to stderr (tools.c).
 * Caller frees with qm_pg_destroy(). */
qm_pg_t *audit_tool_connect(const char *tool);

/* The ledger's migrations (main.c), versions 2 and up. */
extern const qm_migration_t audit_migrations[];
extern const size_t audit_n_migrations;

/* ---- checkpoints (checkpoint.c) ------------------------------------------ */

typedef struct audit_ckpt audit_ckpt_t;

/* Signs, in one transaction on pg, every chain whose head moved since the
 * last checkpoint signed by key: one row in `checkpoints` and one
 * AuditCheckpoint event on qm.audit.v1 (through the outbox) per chain.
 * Instances serialize on an advisory lock, so a head is signed once per
 * key. *n_signed (may be NULL) receives the number of chains signed.
 * Returns QM_OK or the failing statement's status (QM_ETRANSIENT: retry). */
int audit_ckpt_round(qm_service_t *svc, qm_pg_t *pg, const chain_key_t *key, int *n_signed,
                     char *errstr, size_t errstr_size);

/* Starts the signer thread: a round every interval_ms on a connection of
 * its own. key is borrowed and must outlive the signer. Caller ends it with
 * audit_ckpt_stop(). QM_EIO when the thread cannot start. */
int audit_ckpt_start(qm_service_t *svc, const chain_key_t *key, int64_t interval_ms,
                     audit_ckpt_t **out, char *errstr, size_t errstr_size);

/* Also runs a retention round (audit_prune_round()) after a checkpoint round
 * at most every prune_interval_ms, removing what is older than retention_ms
 * (0: never), at most batch records per chain and round. Call before the
 * signer's first round matters (right after audit_ckpt_start()). */
void audit_ckpt_set_retention(audit_ckpt_t *c, int64_t retention_ms, int64_t prune_interval_ms,
                              int64_t batch);

/* Stops the signer: a last round (retried for up to a few seconds), then
 * the thread ends and c is freed. NULL is a no-op. */
void audit_ckpt_stop(audit_ckpt_t *c);

/* ---- retention (prune.c) ---------------------------------------------------- */

/* One retention round on pg (not in a transaction): for each chain, removes
 * the records up to the newest checkpoint signed with key_id before
 * cutoff_ms — at most max_records past the chain's current anchor — and
 * records the anchor, one transaction per chain. *pruned receives the
 * records removed. Skips the round when another instance holds the prune
 * lock. */
int audit_prune_round(qm_pg_t *pg, const char *key_id, int64_t cutoff_ms, int64_t max_records,
                      int64_t *pruned, char *errstr, size_t errstr_size);

/* ---- JSON Lines (export.c) ------------------------------------------------- */

/* One export line (an AuditEvent in the proto3 JSON mapping with the
 * .proto field names: {"record": {...}} or {"checkpoint": {...}}; bytes in
 * standard base64, int64 as JSON numbers). Caller frees with json_decref(). */
json_t *audit_json_record(const Qm__V1__AuditRecord *r);
json_t *audit_json_checkpoint(const Qm__V1__AuditCheckpoint *cp);

/* A decoded export line. Strings point into the json_t given to
 * audit_json_parse() and bytes into buffers owned here: valid until
 * audit_json_line_clear() or until that json_t is freed, whichever first. */
typedef struct audit_json_line {
  bool is_record; /* else a checkpoint */
  Qm__V1__AuditRecord record;
  Qm__V1__AuditCheckpoint checkpoint;
  uint8_t *bufs[4];
} audit_json_line_t;

/* Decodes one parsed line into *out (cleared first). QM_EINVAL, with the
 * field named in errstr, when it is neither a record nor a checkpoint or a
 * field has the wrong type or bad base64. */
int audit_json_parse(const json_t *line, audit_json_line_t *out, char *errstr,
                     size_t errstr_size);
void audit_json_line_clear(audit_json_line_t *l);

/* Base64 (standard alphabet, padded). audit_b64_encode returns a new
 * string (caller frees with free()); audit_b64_decode a new buffer in *out
 * (caller frees with free()) or QM_EINVAL. */
char *audit_b64_encode(const uint8_t *p, size_t n);
int audit_b64_decode(const char *s, uint8_t **out, size_t *n);

/* The chain_record_t view of an AuditRecord (borrowing its fields). */
chain_record_t audit_record_view(const Qm__V1__AuditRecord *r);

#endif
