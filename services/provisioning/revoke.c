/*
 * revoke: every way access is taken away — an expiry, a leaver, a mover's or
 * reviewer's revocation request, an administrator — goes through one queue:
 * a 'revoke' grant operation per grant, written in the caller's transaction
 * next to whatever caused it. The workers apply it to the directory after any
 * older operation on the same person and group (so a grant still on its way
 * is applied first, then removed), and publish AccessRevoked with the reason.
 * A grant is marked with its revoke reason when the operation is queued, so
 * a second cause (a leaver while an expiry is on its way) queues nothing more;
 * a grant operation still waiting (not claimed by a worker) is cancelled.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_pg.h"

#include <stdlib.h>

int prov_revoke_queue(prov_t *prov, qm_pg_t *tx, const char *person_id, const char *grant_id,
                      const char *item_id, const char *role_id, const char *reason,
                      const char *comment, const Qm__V1__Actor *actor, int *queued, char *errstr,
                      size_t errstr_size) {
  QM_UNUSED(prov);
  if (!person_id && !grant_id)
    return qm_err(errstr, errstr_size, QM_EINVAL, "revoke needs a person or a grant");
  uint8_t *abuf = NULL;
  size_t alen = 0;
  if (actor) {
    alen = qm__v1__actor__get_packed_size(actor);
    abuf = qm_malloc(alen ? alen : 1);
    qm__v1__actor__pack(actor, abuf);
  }
  qm_pg_param_t p[] = {person_id ? QM_PG_TEXT(person_id) : QM_PG_NULL,
                       grant_id ? QM_PG_TEXT(grant_id) : QM_PG_NULL,
                       item_id && *item_id ? QM_PG_TEXT(item_id) : QM_PG_NULL,
                       role_id && *role_id ? QM_PG_TEXT(role_id) : QM_PG_NULL,
                       QM_PG_TEXT(reason),
                       abuf ? QM_PG_BYTES(abuf, alen) : QM_PG_NULL,
                       comment && *comment ? QM_PG_TEXT(comment) : QM_PG_NULL};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(
      tx,
      "WITH g AS (UPDATE grants SET revoke_reason = $5, revoke_comment = $7, updated_at = now()"
      " WHERE ($1::text IS NULL OR person_id = $1) AND ($2::text IS NULL OR grant_id = $2)"
      " AND ($3::text IS NULL OR item_id = $3) AND ($4::text IS NULL OR role_id = $4)"
      " AND state IN ('pending', 'active', 'failed') AND revoke_reason IS NULL"
      " RETURNING grant_id, person_id, grp),"
      /* A grant not applied yet and not in a worker's hands is never applied:
       * a leaver must not be given access a moment before it is taken. One
       * that a worker holds is applied, then revoked in turn. */
      " cancelled AS (UPDATE grant_ops o SET state = 'done', finished_at = now(),"
      "  last_error = 'cancelled: revoked (' || $5 || ') before it was applied'"
      "  FROM g WHERE o.grant_id = g.grant_id AND o.op = 'grant' AND o.state = 'pending'"
      "  AND o.lease_until IS NULL RETURNING o.id)"
      " INSERT INTO grant_ops (grant_id, op, person_id, grp, state, reason, actor, comment)"
      " SELECT grant_id, 'revoke', person_id, grp, 'pending', $5, $6, $7 FROM g",
      p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  free(abuf);
  if (rc != QM_OK) return rc;
  int n = (int)qm_pg_affected(res);
  qm_pg_result_destroy(res);
  if (queued) *queued = n;
  return QM_OK;
}

int prov_leaver_start(prov_t *prov, qm_pg_t *tx, const char *person_id, char *errstr,
                      size_t errstr_size) {
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  actor.service = (char *)"provisioning";
  int queued = 0;
  int rc = prov_revoke_queue(prov, tx, person_id, NULL, NULL, NULL, "leaver", NULL, &actor, &queued,
                             errstr, errstr_size);
  if (rc != QM_OK) return rc;
  /* With nothing to revoke, the leaver is complete at once. */
  qm_pg_param_t p[] = {QM_PG_TEXT(person_id), QM_PG_INT64(queued)};
  rc = qm_pg_exec(tx,
                  "UPDATE leavers SET started_at = clock_timestamp(), grants = $2::int,"
                  " completed_at = CASE WHEN $2::int = 0 AND NOT EXISTS (SELECT 1 FROM grant_ops"
                  "  WHERE person_id = $1 AND op = 'revoke' AND reason = 'leaver'"
                  "  AND state = 'pending') THEN clock_timestamp() END"
                  " WHERE person_id = $1 AND started_at IS NULL AND effective_date <= current_date",
                  p, 2, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_log(QM_LOG_INFO, NULL, NULL, "leaver %s: %d grant(s) queued for revocation", person_id,
           queued);
  return rc;
}
