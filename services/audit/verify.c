/*
 * verify: `qm-audit verify` recomputes the ledger's hash chains from one of
 * three sources and prints one line per chain naming the first sequence
 * where it breaks and the kind of break (walk.h lists them):
 *
 *  --db (default)   PostgreSQL (QM_PG_DSN), in one REPEATABLE READ snapshot:
 *                   records, stored chain heads and stored checkpoints;
 *  --export FILE    a `qm-audit export` file ("-" for stdin);
 *  --topic          qm.audit.v1 (QM_TOPIC_PREFIX, QM_KAFKA_BROKERS), read
 *                   from the beginning to the end of every partition as it
 *                   was when verify started.
 *
 * With --pubkey FILE every checkpoint that names that key must carry a valid
 * signature and its head must be the recomputed hash at its sequence; a
 * checkpoint beyond the last record means records were cut from the end.
 * Exit 0 when every chain is intact, 1 when one is broken, 2 on a usage,
 * connection or read error.
 *
 * The topic is read with librdkafka directly: qm_kafka's consumer is a group
 * consumer without partition ends, and verify needs "everything up to now".
 */
#include "audit.h"
#include "walk.h"

#include "qm_common.h"
#include "qm_pg.h"
#include "qm_topics.h"

#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { SRC_DB = 0, SRC_EXPORT, SRC_TOPIC } verify_src_t;

typedef struct verify_opts {
  const char *chain; /* NULL: every chain */
  verify_src_t src;
  const char *export_path;
  const char *pubkey_path;
} verify_opts_t;

static void verify_usage(FILE *out) {
  fprintf(out,
          "usage: qm-audit verify [--chain ID | --all] [--db | --export FILE | --topic]\n"
          "                       [--pubkey FILE]\n"
          "  --chain ID     verify one chain (also: a bare ID); default --all\n"
          "  --db           from PostgreSQL (QM_PG_DSN); the default\n"
          "  --export FILE  from a `qm-audit export` file (- for stdin)\n"
          "  --topic        from qm.audit.v1 (QM_TOPIC_PREFIX, QM_KAFKA_BROKERS)\n"
          "  --pubkey FILE  the checkpoint key (PEM, from `qm-audit pubkey`): check every\n"
          "                 checkpoint's signature and head\n"
          "  One line per chain: OK, EMPTY or BROKEN at sequence N (kind).\n"
          "  Exit 0 intact, 1 broken, 2 usage, connection or read error.\n");
}

static int parse_args(int argc, char **argv, verify_opts_t *o) {
  int n_src = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--chain") && i + 1 < argc) {
      o->chain = argv[++i];
    } else if (!strcmp(a, "--all")) {
      o->chain = NULL;
    } else if (!strcmp(a, "--db")) {
      o->src = SRC_DB;
      n_src++;
    } else if (!strcmp(a, "--export") && i + 1 < argc) {
      o->src = SRC_EXPORT;
      o->export_path = argv[++i];
      n_src++;
    } else if (!strcmp(a, "--topic")) {
      o->src = SRC_TOPIC;
      n_src++;
    } else if (!strcmp(a, "--pubkey") && i + 1 < argc) {
      o->pubkey_path = argv[++i];
    } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      return 1;
    } else if (a[0] != '-' && !o->chain) {
      o->chain = a; /* the old form: verify <chain-id> */
    } else {
      fprintf(stderr, "qm-audit verify: unexpected argument '%s'\n", a);
      return -1;
    }
  }
  if (n_src > 1) {
    fprintf(stderr, "qm-audit verify: choose one of --db, --export, --topic\n");
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------ database */

typedef struct db_ctx {
  qm_pg_t *pg;
} db_ctx_t;

static bool db_find(void *ctx, const char *chain_id, const uint8_t hash[CHAIN_HASH_LEN],
                    int64_t *seq) {
  db_ctx_t *d = ctx;
  qm_pg_param_t p[] = {QM_PG_TEXT(chain_id), QM_PG_BYTES(hash, CHAIN_HASH_LEN)};
  qm_pg_result_t *res = NULL;
  char errstr[256];
  bool found = false;
  if (qm_pg_exec(d->pg, "SELECT seq FROM ledger WHERE chain_id = $1 AND hash = $2 ORDER BY seq LIMIT 1",
                 p, 2, &res, errstr, sizeof(errstr)) == QM_OK &&
      qm_pg_ntuples(res) == 1)
    found = qm_pg_get_int64(res, 0, 0, seq) == QM_OK;
  qm_pg_result_destroy(res);
  return found;
}

/* Feeds one chain's head, checkpoints and records to the walk. */
static int db_chain(qm_pg_t *pg, walk_t *w, const char *chain, bool have_cps,
                    bool have_anchors, char *errstr,
                    size_t errstr_size) {
  qm_pg_param_t hp[] = {QM_PG_TEXT(chain)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg, "SELECT seq, hash FROM chain_heads WHERE chain_id = $1", hp, 1, &res,
                      errstr, errstr_size);
  if (rc != QM_OK) return rc;
  walk_chain(w, chain);
  if (qm_pg_ntuples(res) == 1) {
    int64_t seq = 0;
    unsigned char *h = NULL;
    size_t hlen = 0;
    qm_pg_get_int64(res, 0, 0, &seq);
    qm_pg_get_bytes(res, 0, 1, &h, &hlen);
    walk_head(w, chain, seq, h, hlen);
    free(h);
  }
  qm_pg_result_destroy(res);
  res = NULL;
  if (have_cps) {
    rc = qm_pg_exec(pg,
                    "SELECT seq, head_hash, signed_at_ms, algorithm, key_id, signature"
                    " FROM checkpoints WHERE chain_id = $1 ORDER BY seq, id",
                    hp, 1, &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    for (int i = 0; i < qm_pg_ntuples(res); i++) {
      chain_checkpoint_t cp = {.chain_id = chain};
      unsigned char *head = NULL, *sig = NULL;
      size_t head_len = 0, sig_len = 0;
      qm_pg_get_int64(res, i, 0, &cp.seq);
      qm_pg_get_bytes(res, i, 1, &head, &head_len);
      qm_pg_get_int64(res, i, 2, &cp.signed_at_ms);
      qm_strlcpy(cp.key_id, qm_pg_get(res, i, 4), sizeof(cp.key_id));
      qm_pg_get_bytes(res, i, 5, &sig, &sig_len);
      if (head_len == CHAIN_HASH_LEN) memcpy(cp.head_hash, head, CHAIN_HASH_LEN);
      if (sig_len == CHAIN_SIG_LEN) memcpy(cp.signature, sig, CHAIN_SIG_LEN);
      walk_checkpoint(w, &cp, qm_pg_get(res, i, 3),
                      head_len == CHAIN_HASH_LEN ? sig_len : 0);
      free(head);
      free(sig);
    }
    qm_pg_result_destroy(res);
    res = NULL;
  }
  /* Pruned by retention: the chain goes on from the latest anchor. */
  if (have_anchors) {
    rc = qm_pg_exec(pg,
                    "SELECT seq, hash, pruned_at_ms FROM ledger_anchors WHERE chain_id = $1"
                    " ORDER BY seq DESC LIMIT 1",
                    hp, 1, &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  if (res && qm_pg_ntuples(res) == 1) {
    int64_t seq = 0, at = 0;
    unsigned char *h = NULL;
    size_t hlen = 0;
    qm_pg_get_int64(res, 0, 0, &seq);
    qm_pg_get_bytes(res, 0, 1, &h, &hlen);
    qm_pg_get_int64(res, 0, 2, &at);
    walk_anchor(w, chain, seq, h, hlen, at);
    free(h);
  }
  qm_pg_result_destroy(res);
  res = NULL;
  /* A cursor: one index scan in sequence order, whatever the statistics
   * (repeated "seq > last LIMIT n" queries degrade to a sort per batch on a
   * freshly loaded table). */
  rc = qm_pg_exec(pg,
                  "DECLARE qm_verify_rows NO SCROLL CURSOR FOR SELECT seq, recorded_at_ms, topic,"
                  " event_id, event_type, event_source, subject, person_id, actor_id, request_id,"
                  " event_time_ms, dead_letter, event_bytes, prev_hash, hash FROM ledger"
                  " WHERE chain_id = $1 ORDER BY seq",
                  hp, 1, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (;;) {
    rc = qm_pg_exec(pg, "FETCH FORWARD 5000 FROM qm_verify_rows", NULL, 0, &res, errstr,
                    errstr_size);
    if (rc != QM_OK) return rc;
    int n = qm_pg_ntuples(res);
    for (int i = 0; i < n; i++) {
      chain_record_t r = {.chain_id = chain};
      qm_pg_get_int64(res, i, 0, &r.seq);
      qm_pg_get_int64(res, i, 1, &r.recorded_at_ms);
      r.topic = qm_pg_get(res, i, 2);
      r.event_id = qm_pg_get(res, i, 3);
      r.event_type = qm_pg_get(res, i, 4);
      r.event_source = qm_pg_get(res, i, 5);
      r.subject = qm_pg_get(res, i, 6);
      r.person_id = qm_pg_get(res, i, 7);
      r.actor_id = qm_pg_get(res, i, 8);
      r.request_id = qm_pg_get(res, i, 9);
      qm_pg_get_int64(res, i, 10, &r.event_time_ms);
      r.dead_letter = !strcmp(qm_pg_get(res, i, 11), "t");
      unsigned char *bytes = NULL, *prev = NULL, *hash = NULL;
      size_t blen = 0, plen = 0, hlen = 0;
      qm_pg_get_bytes(res, i, 12, &bytes, &blen);
      qm_pg_get_bytes(res, i, 13, &prev, &plen);
      qm_pg_get_bytes(res, i, 14, &hash, &hlen);
      r.event_bytes = bytes;
      r.event_len = blen;
      walk_record(w, &r, prev, plen, hash, hlen);
      free(bytes);
      free(prev);
      free(hash);
    }
    qm_pg_result_destroy(res);
    res = NULL;
    if (n < 5000 || walk_broken(w, chain)) break;
  }
  return qm_pg_exec_simple(pg, "CLOSE qm_verify_rows", errstr, errstr_size);
}

static int verify_db(const verify_opts_t *o, const chain_key_t *pub) {
  char errstr[512];
  int status = 2;
  walk_t *w = NULL;
  qm_pg_result_t *res = NULL;
  qm_pg_t *pg = audit_tool_connect("verify");
  if (!pg) return 2;
  /* One snapshot for records, heads and checkpoints, so appends while we
   * read cannot make a healthy chain look broken. */
  if (qm_pg_exec_simple(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", errstr,
                        sizeof(errstr)) != QM_OK)
    goto fail;
  /* A ledger from before migration 3 has no checkpoints table. */
  if (qm_pg_exec(pg, "SELECT to_regclass('checkpoints') IS NOT NULL", NULL, 0, &res, errstr,
                 sizeof(errstr)) != QM_OK)
    goto fail;
  bool have_cps = !strcmp(qm_pg_get(res, 0, 0), "t");
  qm_pg_result_destroy(res);
  res = NULL;
  /* Nor, before migration 5, anchors of pruned chains. */
  if (qm_pg_exec(pg, "SELECT to_regclass('ledger_anchors') IS NOT NULL", NULL, 0, &res, errstr,
                 sizeof(errstr)) != QM_OK)
    goto fail;
  bool have_anchors = !strcmp(qm_pg_get(res, 0, 0), "t");
  qm_pg_result_destroy(res);
  res = NULL;
  db_ctx_t d = {.pg = pg};
  w = walk_new(pub, false, db_find, &d, "db");
  if (o->chain) {
    if (db_chain(pg, w, o->chain, have_cps, have_anchors, errstr, sizeof(errstr)) != QM_OK) goto fail;
  } else {
    if (qm_pg_exec(pg,
                   have_cps ? "SELECT chain_id FROM chain_heads UNION SELECT DISTINCT chain_id"
                              " FROM ledger UNION SELECT chain_id FROM checkpoints"
                            : "SELECT chain_id FROM chain_heads UNION SELECT DISTINCT chain_id"
                              " FROM ledger",
                   NULL, 0, &res, errstr, sizeof(errstr)) != QM_OK)
      goto fail;
    for (int i = 0; i < qm_pg_ntuples(res); i++)
      if (db_chain(pg, w, qm_pg_get(res, i, 0), have_cps, have_anchors, errstr, sizeof(errstr)) != QM_OK)
        goto fail;
    if (qm_pg_ntuples(res) == 0) {
      printf("EMPTY: the ledger has no chains (nothing to verify) [db]\n");
      status = 0;
      goto out;
    }
  }
  status = walk_finish(w, stdout);
  goto out;
fail:
  fprintf(stderr, "qm-audit verify: %s\n", errstr);
out:
  qm_pg_result_destroy(res);
  walk_destroy(w);
  qm_pg_destroy(pg);
  return status;
}

/* ------------------------------------------------------------ AuditEvents */

/* Feeds one decoded record or checkpoint when it belongs to the chains asked for. */
static void feed_record(walk_t *w, const verify_opts_t *o, const Qm__V1__AuditRecord *r) {
  if (o->chain && strcmp(o->chain, r->chain_id)) return;
  chain_record_t v = audit_record_view(r);
  walk_record(w, &v, r->prev_hash.data, r->prev_hash.len, r->hash.data, r->hash.len);
}

static void feed_checkpoint(walk_t *w, const verify_opts_t *o, const Qm__V1__AuditCheckpoint *c) {
  if (o->chain && strcmp(o->chain, c->chain_id)) return;
  chain_checkpoint_t cp = {.chain_id = c->chain_id, .seq = c->sequence,
                           .signed_at_ms = c->signed_at_ms};
  qm_strlcpy(cp.key_id, c->key_id, sizeof(cp.key_id));
  size_t sig_len = c->signature.len;
  if (c->head_hash.len == CHAIN_HASH_LEN)
    memcpy(cp.head_hash, c->head_hash.data, CHAIN_HASH_LEN);
  else
    sig_len = 0; /* a malformed checkpoint cannot verify */
  if (sig_len == CHAIN_SIG_LEN) memcpy(cp.signature, c->signature.data, CHAIN_SIG_LEN);
  walk_checkpoint(w, &cp, c->algorithm, sig_len);
}

/* ------------------------------------------------------------ export file */

static int verify_export(const verify_opts_t *o, const chain_key_t *pub) {
  FILE *f = strcmp(o->export_path, "-") ? fopen(o->export_path, "r") : stdin;
  if (!f) {
    fprintf(stderr, "qm-audit verify: cannot open %s\n", o->export_path);
    return 2;
  }
  walk_t *w = walk_new(pub, true, NULL, NULL, "export");
  char *line = NULL;
  size_t cap = 0;
  ssize_t len;
  long lineno = 0;
  int status = 2;
  while ((len = getline(&line, &cap, f)) >= 0) {
    lineno++;
    if (len == 0 || (len == 1 && line[0] == '\n')) continue;
    json_error_t jerr;
    json_t *j = json_loadb(line, (size_t)len, 0, &jerr);
    audit_json_line_t l;
    char errstr[256];
    if (!j || audit_json_parse(j, &l, errstr, sizeof(errstr)) != QM_OK) {
      fprintf(stderr, "qm-audit verify: %s line %ld: %s\n", o->export_path, lineno,
              j ? errstr : jerr.text);
      json_decref(j);
      goto out;
    }
    if (l.is_record)
      feed_record(w, o, &l.record);
    else
      feed_checkpoint(w, o, &l.checkpoint);
    audit_json_line_clear(&l);
    json_decref(j);
  }
  if (ferror(f)) {
    fprintf(stderr, "qm-audit verify: reading %s failed\n", o->export_path);
    goto out;
  }
  if (o->chain) walk_chain(w, o->chain);
  status = walk_finish(w, stdout);
out:
  free(line);
  if (f != stdin) fclose(f);
  walk_destroy(w);
  return status;
}

/* ------------------------------------------------------------ topic */

/* Reads every message of the topic up to the partition ends seen at start
 * and feeds the AuditEvents to w. QM_OK, or QM_EIO with errstr. */
static int read_topic(const char *brokers, const char *topic, walk_t *w, const verify_opts_t *o,
                      int64_t *n_msgs, char *errstr, size_t errstr_size) {
  char rkerr[512];
  char group[80], uuid[QM_UUID_STR_LEN];
  qm_uuid_new(uuid);
  snprintf(group, sizeof(group), "qm-audit-verify-%s", uuid);
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, rkerr, sizeof(rkerr)) ||
      rd_kafka_conf_set(conf, "group.id", group, rkerr, sizeof(rkerr)) ||
      rd_kafka_conf_set(conf, "enable.auto.commit", "false", rkerr, sizeof(rkerr)) ||
      rd_kafka_conf_set(conf, "enable.partition.eof", "false", rkerr, sizeof(rkerr)) ||
      rd_kafka_conf_set(conf, "log_level", "3", rkerr, sizeof(rkerr))) {
    rd_kafka_conf_destroy(conf);
    return qm_err(errstr, errstr_size, QM_EINVAL, "Kafka configuration: %s", rkerr);
  }
  rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, rkerr, sizeof(rkerr));
  if (!rk) {
    rd_kafka_conf_destroy(conf);
    return qm_err(errstr, errstr_size, QM_EIO, "Kafka consumer: %s", rkerr);
  }
  int rc = QM_OK;
  int64_t *hi = NULL, *next = NULL;
  int n_parts = 0;
  rd_kafka_topic_partition_list_t *parts = NULL;
  const struct rd_kafka_metadata *md = NULL;
  rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
  rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, 10000);
  if (err || md->topic_cnt != 1 || md->topics[0].err) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "no metadata for topic %s on %s: %s", topic, brokers,
                rd_kafka_err2str(err ? err : md->topics[0].err));
    goto out;
  }
  n_parts = md->topics[0].partition_cnt;
  hi = qm_calloc((size_t)n_parts + 1, sizeof(*hi));
  next = qm_calloc((size_t)n_parts + 1, sizeof(*next));
  parts = rd_kafka_topic_partition_list_new(n_parts);
  int open_parts = 0;
  for (int i = 0; i < n_parts; i++) {
    int32_t p = md->topics[0].partitions[i].id;
    int64_t lo = 0, h = 0;
    err = rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &h, 10000);
    if (err) {
      rc = qm_err(errstr, errstr_size, QM_EIO, "offsets of %s[%d]: %s", topic, p,
                  rd_kafka_err2str(err));
      goto out;
    }
    if (p >= 0 && p < n_parts) {
      hi[p] = h;
      next[p] = lo;
    }
    if (h > lo) open_parts++;
    rd_kafka_topic_partition_list_add(parts, topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
  }
  if (open_parts > 0 && (err = rd_kafka_assign(rk, parts)) != RD_KAFKA_RESP_ERR_NO_ERROR) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "assigning %s: %s", topic, rd_kafka_err2str(err));
    goto out;
  }
  int64_t idle_since = qm_mono_ms();
  while (open_parts > 0) {
    rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 500);
    if (!m) {
      if (qm_mono_ms() - idle_since > 60000) {
        rc = qm_err(errstr, errstr_size, QM_ETIMEOUT,
                    "no message from %s for 60 s with %d partition(s) not read to their end",
                    topic, open_parts);
        goto out;
      }
      continue;
    }
    idle_since = qm_mono_ms();
    if (m->err) {
      if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
        fprintf(stderr, "qm-audit verify: %s: %s (retrying)\n", topic, rd_kafka_message_errstr(m));
      rd_kafka_message_destroy(m);
      continue;
    }
    int32_t p = m->partition;
    if (p >= 0 && p < n_parts && next[p] < hi[p]) {
      if (m->offset < hi[p]) {
        (*n_msgs)++;
        Qm__V1__AuditEvent *ev = qm__v1__audit_event__unpack(NULL, m->len, m->payload);
        if (!ev)
          fprintf(stderr, "qm-audit verify: %s[%d]@%lld is not an AuditEvent; skipped\n", topic,
                  p, (long long)m->offset);
        else if (ev->event_case == QM__V1__AUDIT_EVENT__EVENT_RECORD && ev->record)
          feed_record(w, o, ev->record);
        else if (ev->event_case == QM__V1__AUDIT_EVENT__EVENT_CHECKPOINT && ev->checkpoint)
          feed_checkpoint(w, o, ev->checkpoint);
        if (ev) qm__v1__audit_event__free_unpacked(ev, NULL);
      }
      next[p] = m->offset + 1;
      if (next[p] >= hi[p]) open_parts--;
    }
    rd_kafka_message_destroy(m);
  }
out:
  if (md) rd_kafka_metadata_destroy(md);
  if (parts) rd_kafka_topic_partition_list_destroy(parts);
  rd_kafka_topic_destroy(rkt);
  rd_kafka_consumer_close(rk);
  rd_kafka_destroy(rk);
  free(hi);
  free(next);
  return rc;
}

static int verify_topic(const verify_opts_t *o, const chain_key_t *pub) {
  const char *brokers = getenv("QM_KAFKA_BROKERS");
  if (!brokers || !*brokers) brokers = "127.0.0.1:9092";
  const char *prefix = getenv("QM_TOPIC_PREFIX");
  char *topic = qm_asprintf("%s%s", prefix ? prefix : "", QM_TOPIC_AUDIT);
  walk_t *w = walk_new(pub, true, NULL, NULL, "topic");
  char errstr[512];
  int64_t n = 0;
  int status = 2;
  if (read_topic(brokers, topic, w, o, &n, errstr, sizeof(errstr)) != QM_OK) {
    fprintf(stderr, "qm-audit verify: %s\n", errstr);
  } else {
    if (o->chain) walk_chain(w, o->chain);
    status = walk_finish(w, stdout);
    if (n == 0 && !o->chain) printf("EMPTY: topic %s holds no messages [topic]\n", topic);
  }
  walk_destroy(w);
  free(topic);
  return status;
}

/* ------------------------------------------------------------ main */

int audit_verify_main(int argc, char **argv) {
  verify_opts_t o = {0};
  int a = parse_args(argc, argv, &o);
  if (a != 0) {
    verify_usage(a > 0 ? stdout : stderr);
    return a > 0 ? 0 : 2;
  }
  chain_key_t *pub = NULL;
  if (o.pubkey_path) {
    char errstr[512];
    if (chain_key_load_pem(o.pubkey_path, &pub, errstr, sizeof(errstr)) != QM_OK) {
      fprintf(stderr, "qm-audit verify: --pubkey: %s\n", errstr);
      return 2;
    }
  }
  int status;
  switch (o.src) {
  case SRC_EXPORT: status = verify_export(&o, pub); break;
  case SRC_TOPIC: status = verify_topic(&o, pub); break;
  default: status = verify_db(&o, pub); break;
  }
  chain_key_destroy(pub);
  return status;
}
