/*
 * export: `qm-audit export` writes the ledger as JSON Lines — one
 * AuditEvent per line, exactly what qm.audit.v1 carries, in the proto3 JSON
 * mapping with the .proto field names: {"record": {...}} for each record in
 * sequence order, then {"checkpoint": {...}} for each signed checkpoint of
 * the chain. Bytes are standard base64, int64 values JSON numbers. The same
 * codec reads such a file back for `qm-audit verify --export`.
 *
 * The export reads one REPEATABLE READ snapshot, so a file is a consistent
 * cut of the ledger even while audit appends.
 */
#include "audit.h"

#include "qm_common.h"
#include "qm_pg.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ base64 */

char *audit_b64_encode(const uint8_t *p, size_t n) {
  char *out = qm_malloc(4 * ((n + 2) / 3) + 1);
  int len = n ? EVP_EncodeBlock((unsigned char *)out, p, (int)n) : 0;
  out[len] = '\0';
  return out;
}

int audit_b64_decode(const char *s, uint8_t **out, size_t *n) {
  size_t len = strlen(s);
  if (len % 4) return QM_EINVAL;
  uint8_t *buf = qm_malloc(len / 4 * 3 + 1);
  int got = len ? EVP_DecodeBlock(buf, (const unsigned char *)s, (int)len) : 0;
  if (got < 0) {
    free(buf);
    return QM_EINVAL;
  }
  size_t pad = 0;
  if (len && s[len - 1] == '=') pad++;
  if (len > 1 && s[len - 2] == '=') pad++;
  *out = buf;
  *n = (size_t)got - pad;
  return QM_OK;
}

/* ------------------------------------------------------------ encoding */

static void set_bytes(json_t *o, const char *name, ProtobufCBinaryData b) {
  char *s = audit_b64_encode(b.data, b.len);
  json_object_set_new(o, name, json_string(s));
  free(s);
}

static void set_str(json_t *o, const char *name, const char *s) {
  json_object_set_new(o, name, json_string(s ? s : ""));
}

json_t *audit_json_record(const Qm__V1__AuditRecord *r) {
  json_t *o = json_object();
  set_str(o, "chain_id", r->chain_id);
  json_object_set_new(o, "sequence", json_integer(r->sequence));
  json_object_set_new(o, "recorded_at_ms", json_integer(r->recorded_at_ms));
  set_str(o, "topic", r->topic);
  set_str(o, "event_id", r->event_id);
  set_str(o, "event_type", r->event_type);
  set_str(o, "event_source", r->event_source);
  set_str(o, "subject", r->subject);
  set_str(o, "person_id", r->person_id);
  set_str(o, "actor_id", r->actor_id);
  set_str(o, "request_id", r->request_id);
  set_bytes(o, "event_bytes", r->event_bytes);
  set_bytes(o, "prev_hash", r->prev_hash);
  set_bytes(o, "hash", r->hash);
  json_object_set_new(o, "event_time_ms", json_integer(r->event_time_ms));
  json_object_set_new(o, "dead_letter", json_boolean(r->dead_letter));
  return json_pack("{s:o}", "record", o);
}

json_t *audit_json_checkpoint(const Qm__V1__AuditCheckpoint *cp) {
  json_t *o = json_object();
  set_str(o, "chain_id", cp->chain_id);
  json_object_set_new(o, "sequence", json_integer(cp->sequence));
  set_bytes(o, "head_hash", cp->head_hash);
  json_object_set_new(o, "signed_at_ms", json_integer(cp->signed_at_ms));
  set_str(o, "algorithm", cp->algorithm);
  set_str(o, "key_id", cp->key_id);
  set_bytes(o, "signature", cp->signature);
  return json_pack("{s:o}", "checkpoint", o);
}

/* ------------------------------------------------------------ decoding */

static int get_str(const json_t *o, const char *name, char **out, char *errstr,
                   size_t errstr_size) {
  const json_t *v = json_object_get(o, name);
  if (!v || json_is_null(v)) {
    *out = (char *)"";
    return QM_OK;
  }
  if (!json_is_string(v)) return qm_err(errstr, errstr_size, QM_EINVAL, "%s: not a string", name);
  *out = (char *)json_string_value(v);
  return QM_OK;
}

static int get_int(const json_t *o, const char *name, int64_t *out, char *errstr,
                   size_t errstr_size) {
  const json_t *v = json_object_get(o, name);
  if (!v || json_is_null(v)) {
    *out = 0;
    return QM_OK;
  }
  if (json_is_integer(v)) {
    *out = json_integer_value(v);
    return QM_OK;
  }
  if (json_is_string(v)) { /* the proto3 mapping's canonical int64 form */
    char *end = NULL;
    const char *s = json_string_value(v);
    long long x = strtoll(s, &end, 10);
    if (*s && !*end) {
      *out = x;
      return QM_OK;
    }
  }
  return qm_err(errstr, errstr_size, QM_EINVAL, "%s: not an integer", name);
}

static int get_bytes(const json_t *o, const char *name, ProtobufCBinaryData *out, uint8_t **keep,
                     char *errstr, size_t errstr_size) {
  const json_t *v = json_object_get(o, name);
  out->data = NULL;
  out->len = 0;
  if (!v || json_is_null(v)) return QM_OK;
  uint8_t *buf = NULL;
  size_t n = 0;
  if (!json_is_string(v) || audit_b64_decode(json_string_value(v), &buf, &n) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "%s: not base64", name);
  *keep = buf;
  out->data = buf;
  out->len = n;
  return QM_OK;
}

void audit_json_line_clear(audit_json_line_t *l) {
  for (size_t i = 0; i < QM_ARRAY_LEN(l->bufs); i++) free(l->bufs[i]);
  memset(l, 0, sizeof(*l));
}

int audit_json_parse(const json_t *line, audit_json_line_t *out, char *errstr,
                     size_t errstr_size) {
  audit_json_line_t l;
  memset(&l, 0, sizeof(l));
  int rc = QM_OK;
  const json_t *r = json_object_get(line, "record");
  const json_t *c = json_object_get(line, "checkpoint");
  if (json_is_object(r)) {
    Qm__V1__AuditRecord init = QM__V1__AUDIT_RECORD__INIT;
    l.is_record = true;
    l.record = init;
    Qm__V1__AuditRecord *a = &l.record;
    json_t *dl = json_object_get(r, "dead_letter");
    if ((rc = get_str(r, "chain_id", &a->chain_id, errstr, errstr_size)) ||
        (rc = get_int(r, "sequence", &a->sequence, errstr, errstr_size)) ||
        (rc = get_int(r, "recorded_at_ms", &a->recorded_at_ms, errstr, errstr_size)) ||
        (rc = get_str(r, "topic", &a->topic, errstr, errstr_size)) ||
        (rc = get_str(r, "event_id", &a->event_id, errstr, errstr_size)) ||
        (rc = get_str(r, "event_type", &a->event_type, errstr, errstr_size)) ||
        (rc = get_str(r, "event_source", &a->event_source, errstr, errstr_size)) ||
        (rc = get_str(r, "subject", &a->subject, errstr, errstr_size)) ||
        (rc = get_str(r, "person_id", &a->person_id, errstr, errstr_size)) ||
        (rc = get_str(r, "actor_id", &a->actor_id, errstr, errstr_size)) ||
        (rc = get_str(r, "request_id", &a->request_id, errstr, errstr_size)) ||
        (rc = get_int(r, "event_time_ms", &a->event_time_ms, errstr, errstr_size)) ||
        (rc = get_bytes(r, "event_bytes", &a->event_bytes, &l.bufs[0], errstr, errstr_size)) ||
        (rc = get_bytes(r, "prev_hash", &a->prev_hash, &l.bufs[1], errstr, errstr_size)) ||
        (rc = get_bytes(r, "hash", &a->hash, &l.bufs[2], errstr, errstr_size)))
      goto out;
    if (dl && !json_is_boolean(dl)) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "dead_letter: not a boolean");
      goto out;
    }
    a->dead_letter = dl && json_is_true(dl);
  } else if (json_is_object(c)) {
    Qm__V1__AuditCheckpoint init = QM__V1__AUDIT_CHECKPOINT__INIT;
    l.checkpoint = init;
    Qm__V1__AuditCheckpoint *a = &l.checkpoint;
    if ((rc = get_str(c, "chain_id", &a->chain_id, errstr, errstr_size)) ||
        (rc = get_int(c, "sequence", &a->sequence, errstr, errstr_size)) ||
        (rc = get_bytes(c, "head_hash", &a->head_hash, &l.bufs[0], errstr, errstr_size)) ||
        (rc = get_int(c, "signed_at_ms", &a->signed_at_ms, errstr, errstr_size)) ||
        (rc = get_str(c, "algorithm", &a->algorithm, errstr, errstr_size)) ||
        (rc = get_str(c, "key_id", &a->key_id, errstr, errstr_size)) ||
        (rc = get_bytes(c, "signature", &a->signature, &l.bufs[1], errstr, errstr_size)))
      goto out;
  } else {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "neither a \"record\" nor a \"checkpoint\" object");
  }
out:
  if (rc != QM_OK) {
    audit_json_line_clear(&l);
    return rc;
  }
  *out = l;
  return QM_OK;
}

chain_record_t audit_record_view(const Qm__V1__AuditRecord *r) {
  chain_record_t v = {
      .chain_id = r->chain_id,
      .seq = r->sequence,
      .recorded_at_ms = r->recorded_at_ms,
      .topic = r->topic,
      .event_id = r->event_id,
      .event_type = r->event_type,
      .event_source = r->event_source,
      .subject = r->subject,
      .person_id = r->person_id,
      .actor_id = r->actor_id,
      .request_id = r->request_id,
      .event_time_ms = r->event_time_ms,
      .dead_letter = r->dead_letter,
      .event_bytes = r->event_bytes.data,
      .event_len = r->event_bytes.len,
  };
  return v;
}

/* ------------------------------------------------------------ the command */

static void export_usage(FILE *out) {
  fprintf(out,
          "usage: qm-audit export [--chain ID | --all]\n"
          "  Writes the ledger from PostgreSQL (QM_PG_DSN) to stdout as JSON Lines: one\n"
          "  {\"record\": AuditRecord} per line in sequence order, then the chain's\n"
          "  {\"checkpoint\": AuditCheckpoint} lines. Default: every chain.\n"
          "  Exit 0 written, 2 usage or database error.\n");
}

/* Writes one JSON value as a line; false when stdout failed. */
static bool put_line(json_t *j) {
  char *s = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  bool ok = s && fputs(s, stdout) >= 0 && fputc('\n', stdout) != EOF;
  free(s);
  return ok;
}

/* Exports one chain's records, then its checkpoints. */
static int export_chain(qm_pg_t *pg, const char *chain, bool have_cps, int64_t *n_out,
                        char *errstr, size_t errstr_size) {
  /* A cursor: one index scan in sequence order, whatever the statistics. */
  qm_pg_param_t p[] = {QM_PG_TEXT(chain)};
  int rc = qm_pg_exec(pg,
                      "DECLARE qm_export_rows NO SCROLL CURSOR FOR SELECT seq, recorded_at_ms,"
                      " topic, event_id, event_type, event_source, subject, person_id, actor_id,"
                      " request_id, event_time_ms, dead_letter, event_bytes, prev_hash, hash"
                      " FROM ledger WHERE chain_id = $1 ORDER BY seq",
                      p, 1, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (;;) {
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(pg, "FETCH FORWARD 5000 FROM qm_export_rows", NULL, 0, &res, errstr,
                    errstr_size);
    if (rc != QM_OK) return rc;
    int n = qm_pg_ntuples(res);
    for (int i = 0; i < n; i++) {
      Qm__V1__AuditRecord r = QM__V1__AUDIT_RECORD__INIT;
      r.chain_id = (char *)chain;
      qm_pg_get_int64(res, i, 0, &r.sequence);
      qm_pg_get_int64(res, i, 1, &r.recorded_at_ms);
      r.topic = (char *)qm_pg_get(res, i, 2);
      r.event_id = (char *)qm_pg_get(res, i, 3);
      r.event_type = (char *)qm_pg_get(res, i, 4);
      r.event_source = (char *)qm_pg_get(res, i, 5);
      r.subject = (char *)qm_pg_get(res, i, 6);
      r.person_id = (char *)qm_pg_get(res, i, 7);
      r.actor_id = (char *)qm_pg_get(res, i, 8);
      r.request_id = (char *)qm_pg_get(res, i, 9);
      qm_pg_get_int64(res, i, 10, &r.event_time_ms);
      r.dead_letter = !strcmp(qm_pg_get(res, i, 11), "t");
      qm_pg_get_bytes(res, i, 12, &r.event_bytes.data, &r.event_bytes.len);
      qm_pg_get_bytes(res, i, 13, &r.prev_hash.data, &r.prev_hash.len);
      qm_pg_get_bytes(res, i, 14, &r.hash.data, &r.hash.len);
      bool ok = put_line(audit_json_record(&r));
      free(r.event_bytes.data);
      free(r.prev_hash.data);
      free(r.hash.data);
      if (!ok) {
        qm_pg_result_destroy(res);
        return qm_err(errstr, errstr_size, QM_EIO, "writing to stdout failed");
      }
      (*n_out)++;
    }
    qm_pg_result_destroy(res);
    if (n < 5000) break;
  }
  rc = qm_pg_exec_simple(pg, "CLOSE qm_export_rows", errstr, errstr_size);
  if (rc != QM_OK || !have_cps) return rc;
  qm_pg_param_t cp[] = {QM_PG_TEXT(chain)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(pg,
                  "SELECT seq, head_hash, signed_at_ms, algorithm, key_id, signature"
                  " FROM checkpoints WHERE chain_id = $1 ORDER BY seq, id",
                  cp, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    Qm__V1__AuditCheckpoint c = QM__V1__AUDIT_CHECKPOINT__INIT;
    c.chain_id = (char *)chain;
    qm_pg_get_int64(res, i, 0, &c.sequence);
    qm_pg_get_bytes(res, i, 1, &c.head_hash.data, &c.head_hash.len);
    qm_pg_get_int64(res, i, 2, &c.signed_at_ms);
    c.algorithm = (char *)qm_pg_get(res, i, 3);
    c.key_id = (char *)qm_pg_get(res, i, 4);
    qm_pg_get_bytes(res, i, 5, &c.signature.data, &c.signature.len);
    if (!put_line(audit_json_checkpoint(&c)))
      rc = qm_err(errstr, errstr_size, QM_EIO, "writing to stdout failed");
    free(c.head_hash.data);
    free(c.signature.data);
  }
  qm_pg_result_destroy(res);
  return rc;
}

int audit_export_main(int argc, char **argv) {
  const char *chain = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--chain") && i + 1 < argc) {
      chain = argv[++i];
    } else if (!strcmp(argv[i], "--all")) {
      chain = NULL;
    } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      export_usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "qm-audit export: unexpected argument '%s'\n", argv[i]);
      export_usage(stderr);
      return 2;
    }
  }
  char errstr[512];
  int status = 2;
  int64_t n = 0;
  qm_pg_result_t *chains = NULL;
  qm_pg_t *pg = audit_tool_connect("export");
  if (!pg) return 2;
  if (qm_pg_exec_simple(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", errstr,
                        sizeof(errstr)) != QM_OK)
    goto fail;
  /* A ledger from before migration 3 has no checkpoints table. */
  if (qm_pg_exec(pg, "SELECT to_regclass('checkpoints') IS NOT NULL", NULL, 0, &chains, errstr,
                 sizeof(errstr)) != QM_OK)
    goto fail;
  bool have_cps = !strcmp(qm_pg_get(chains, 0, 0), "t");
  qm_pg_result_destroy(chains);
  chains = NULL;
  if (chain) {
    if (export_chain(pg, chain, have_cps, &n, errstr, sizeof(errstr)) != QM_OK) goto fail;
  } else {
    if (qm_pg_exec(pg,
                   "SELECT chain_id FROM chain_heads UNION SELECT DISTINCT chain_id FROM ledger"
                   " ORDER BY 1", NULL, 0, &chains, errstr, sizeof(errstr)) != QM_OK)
      goto fail;
    for (int i = 0; i < qm_pg_ntuples(chains); i++)
      if (export_chain(pg, qm_pg_get(chains, i, 0), have_cps, &n, errstr, sizeof(errstr)) !=
          QM_OK)
        goto fail;
  }
  if (fflush(stdout) != 0) {
    qm_strlcpy(errstr, "writing to stdout failed", sizeof(errstr));
    goto fail;
  }
  fprintf(stderr, "qm-audit export: %lld records written\n", (long long)n);
  status = 0;
  goto out;
fail:
  fprintf(stderr, "qm-audit export: %s\n", errstr);
out:
  qm_pg_result_destroy(chains);
  qm_pg_destroy(pg);
  return status;
}
