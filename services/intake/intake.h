/*
 * intake: the state shared by qm-intake's parts — the catalog (swapped whole
 * on SIGHUP), and the entry points of its modules: people (directory and HR
 * lifecycle events), requests (the request API), readmodel (each request's
 * status and timeline, built from every service's events) and catalog_api.
 */
#ifndef QM_INTAKE_H
#define QM_INTAKE_H

#include "catalog.h"

#include "qm_event.h"
#include "qm_http.h"
#include "qm_pg.h"
#include "qm_service.h"

#include <pthread.h>
#include <stdbool.h>

typedef struct intake {
  qm_service_t *svc;
  pthread_rwlock_t cat_lock; /* readers: handlers; writer: reload */
  catalog_t *cat;
  int max_lines;
} intake_t;

/* A person as the directory holds them. Text fields are bounded copies. */
typedef struct person {
  char id[130], name[200], email[200], manager_id[130], department[130], job_function[130],
      country[8], location[64], employment_type[32], status[32], directory_username[200];
} person_t;

/* Loads one person (QM_OK, QM_ENOTFOUND, or a database error). */
int people_get(qm_pg_t *pg, const char *id, person_t *out, char *errstr, size_t errstr_size);
/* Loads the initial directory file (JSON {"people":[…]}); HR events win over it. */
int people_seed(intake_t *in, const char *path, char *errstr, size_t errstr_size);
/* Applies one qm.hr.lifecycle.v1 event (by effective date, duplicates dropped). */
int people_on_hr_event(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size);

/* Registers the request and catalog routes. */
int requests_register(intake_t *in, char *errstr, size_t errstr_size);
int catalog_api_register(intake_t *in, char *errstr, size_t errstr_size);

/* Applies decision, access and fulfilment events to the read model. */
int readmodel_on_event(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size);
/* Adds a timeline entry and recomputes the request's status. */
int readmodel_timeline(qm_pg_t *tx, const char *request_id, int line_no, int64_t at_ms,
                       const char *type, const char *event_id, const char *actor,
                       const char *summary, char *errstr, size_t errstr_size);
int readmodel_recompute(qm_pg_t *tx, const char *request_id, char *errstr, size_t errstr_size);

/* Catalog access for handlers: hold the read lock while using the result. */
const catalog_t *intake_catalog_acquire(intake_t *in);
void intake_catalog_release(intake_t *in);

/* Roles that may act for anyone (delegated forms) and read everything. */
extern const char *const intake_staff_roles[];

#endif
