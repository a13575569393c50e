/*
 * evidence: the auditor's HTTP API over the ledger — evidence for one
 * request (who asked, who approved, what changed in the identity provider,
 * when it ended, the full timeline and the chain positions to verify it
 * against signed checkpoints), search by time, type, person and item, paged;
 * streamed exports in CSV, JSON Lines and OCSF (classes 3001 and 3006); and
 * the reports, computed from ledger_facts (payload.h). OpenAPI:
 * docs/api/audit.yaml.
 */
#ifndef QM_AUDIT_EVIDENCE_H
#define QM_AUDIT_EVIDENCE_H

#include "qm_service.h"

#include <stdatomic.h>
#include <stddef.h>

typedef struct audit_api {
  qm_service_t *svc;
  atomic_int exports_active; /* streams in flight */
  int max_exports;           /* QM_AUDIT_MAX_EXPORTS */
} audit_api_t;

/* Registers the routes for roles (NULL-terminated) on svc's server; api
 * must outlive the server. QM_EINVAL when a route cannot be registered. */
int audit_api_register(qm_service_t *svc, audit_api_t *api, const char *const *roles,
                       char *errstr, size_t errstr_size);

#endif
