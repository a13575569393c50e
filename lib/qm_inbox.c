/*
 * qm_inbox: the consumer side of "nothing done twice": one row per applied
 * event id, claimed in the same transaction as the event's effects. See
 * qm_inbox.h for the contracts.
 */
#include "qm_inbox.h"

#include "qm_common.h"
#include "qm_log.h"

int qm_inbox_claim(qm_pg_t *c, const char *event_id, const char *topic, char *errstr,
                   size_t errstr_size) {
  qm_pg_result_t *res = NULL;
  if (!event_id || !*event_id)
    return qm_err(errstr, errstr_size, QM_EINVAL, "inbox claim needs an event id");
  qm_pg_param_t p[] = {QM_PG_TEXT(event_id), QM_PG_TEXT(topic)};
  int rc = qm_pg_exec(c,
                      "INSERT INTO inbox (event_id, topic) VALUES ($1, $2)"
                      " ON CONFLICT (event_id) DO NOTHING",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_affected(res) == 0)
    rc = qm_err(errstr, errstr_size, QM_EDUP, "event %s was already applied", event_id);
  qm_pg_result_destroy(res);
  return rc;
}

int qm_inbox_purge(qm_pg_t *c, int64_t older_than_ms, int limit) {
  qm_pg_result_t *res = NULL;
  char err[512];
  if (limit <= 0 || older_than_ms < 0) return QM_EINVAL;
  qm_pg_param_t p[] = {QM_PG_INT64(older_than_ms), QM_PG_INT64(limit)};
  int rc = qm_pg_exec(c,
                      "DELETE FROM inbox WHERE event_id IN (SELECT event_id FROM inbox"
                      " WHERE received_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
                      p, 2, &res, err, sizeof(err));
  if (rc != QM_OK) {
    qm_log_warn("inbox purge failed (will retry at the next purge): %s", err);
    return rc;
  }
  int64_t n = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  return (int)n;
}
