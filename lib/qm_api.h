/*
 * qm_api: small helpers the services' HTTP handlers share, so every list is
 * paged the same way and every failure answers the same problem shapes.
 *
 * Paging: `limit` (1..max, default given) and `after` (the opaque `next`
 * cursor of the previous page: a sequence number). A list response is
 * {"items": [...], "next": "<cursor>"} with `next` present only when more
 * rows exist.
 */
#ifndef QM_API_H
#define QM_API_H

#include "qm_http.h"
#include "qm_pg.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct qm_page {
  long limit;    /* rows to return */
  int64_t after; /* cursor: return rows with a sequence after (or before) this; 0 = start */
} qm_page_t;

/* Reads `limit` and `after` from the query into page. On a bad value adds a
 * field error to *pb (created when NULL) and returns false; the caller
 * answers with qm_http_resp_problem() once every field was checked. */
bool qm_api_page(qm_http_req_t *req, long default_limit, long max_limit, qm_page_t *page,
                 qm_problem_t **pb);

/* Adds a field error to *pb, creating a 400 validation problem when NULL. */
void qm_api_field_error(qm_problem_t **pb, const char *field, const char *reason);

/* Takes a pooled connection for a handler, answering 503 when none is free
 * within 5 s (returns NULL then). Give it back with qm_pg_pool_release(). */
qm_pg_t *qm_api_db(qm_http_req_t *req, qm_http_resp_t *resp, qm_pg_pool_t *pool);

/* Logs a database failure with the request's ids and answers 503. */
void qm_api_db_error(qm_http_req_t *req, qm_http_resp_t *resp, const char *what,
                     const char *errstr);

/* One statement for a handler: a pooled connection (503 when none is free
 * within 5 s), the statement, the connection given back at once; a failed
 * statement is logged as `what` and answered 503. True with *res set (res
 * may be NULL for statements without rows; caller frees it with
 * qm_pg_result_destroy()), false when the response is already set. */
bool qm_api_query(qm_http_req_t *req, qm_http_resp_t *resp, qm_pg_pool_t *pool, const char *what,
                  const char *sql, const qm_pg_param_t *params, int nparams,
                  qm_pg_result_t **res);

/* Builds {"items": items, "next": next} (next omitted when NULL or "");
 * takes ownership of items. */
json_t *qm_api_list(json_t *items, const char *next);

/* True when the caller holds any of the NULL-terminated roles. */
bool qm_api_has_any_role(const qm_principal_t *who, const char *const *roles);

#endif /* QM_API_H */
