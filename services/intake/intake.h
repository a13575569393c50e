/*
 * intake: the state shared by qm-intake's parts — the catalog (swapped whole
 * on SIGHUP), and the entry points of its modules: people (directory and HR
 * lifecycle events), requests (the request API), readmodel (each request's
 * status and timeline, built from every service's events) and catalog_api.
 */
#ifndef QM_INTAKE_H
#define QM_INTAKE_H

#include "catalog.h"

#include "qm_common.h"
#include "qm_event.h"
#include "qm_http.h"
#include "qm_pg.h"
#include "qm_service.h"

#include <jansson.h>
#include <pthread.h>
#include <stdbool.h>

/* A person as the directory holds them. Text fields are bounded copies. */
typedef struct person {
  char id[130], name[200], email[200], manager_id[130], department[130], job_function[130],
      country[8], location[64], employment_type[32], status[32], directory_username[200],
      effective_date[16];
} person_t;

/* The screening watchlist: people (by name and country) whose requests, as
 * contractors or third parties, are refused or flagged. */
typedef struct watch_entry {
  char *name;
  char *country; /* "" matches any country */
} watch_entry_t;

typedef struct watchlist {
  watch_entry_t *v;
  size_t n;
} watchlist_t;

/* Loads a CSV file "name,country" (first line a header). Caller frees with
 * watchlist_destroy(). QM_EINVAL with file:line: reason. */
int watchlist_load(const char *path, watchlist_t **out, char *errstr, size_t errstr_size);
bool watchlist_match(const watchlist_t *wl, const char *name, const char *country);
void watchlist_destroy(watchlist_t *wl);

typedef struct qm_metric_family qm_metric_family_t;

typedef struct intake {
  qm_service_t *svc;
  pthread_rwlock_t cat_lock; /* readers: handlers; writer: reload */
  catalog_t *cat;            /* under cat_lock */
  watchlist_t *watch;        /* under cat_lock; NULL when none is configured */
  bool watch_refuse;         /* refuse (true) or flag (false) a watchlist match */
  int max_lines;
  /* metrics */
  qm_metric_family_t *m_requests;   /* qm_intake_requests_total{origin,outcome} */
  qm_metric_family_t *m_refusals;   /* qm_intake_refusals_total{rule} */
  qm_metric_family_t *m_lines;      /* qm_intake_request_lines_total{kind,outcome} */
  qm_metric_family_t *m_decision;   /* qm_intake_decision_seconds */
  qm_metric_family_t *m_completion; /* qm_intake_completion_seconds */
  /* scheduled HR changes */
  pthread_t hr_ticker;
  bool hr_ticker_started;
  int64_t hr_tick_ms;
} intake_t;

/* One line to file, checked against the catalog. */
typedef struct line_in {
  int line_no;
  const catalog_item_t *item;
  const catalog_role_t *role; /* NULL for assets */
  int duration_days;
  bool attested;
  json_t *attributes; /* borrowed (a request body) or NULL; defaults are applied when filing */
} line_in_t;

/* A request to file (by the API or by HR automation). */
typedef struct request_new {
  const person_t *subject;
  const char *requester_id;        /* person id, or "intake" for automation */
  const qm_principal_t *who;       /* the caller, NULL for automation */
  const char *origin;              /* self_service, manager, helpdesk, birthright, birthright_review */
  const char *reason;
  const char *extends;             /* or NULL */
  const char *idem_key;            /* never NULL */
  const char *body_hash;           /* never NULL */
  const char *traceparent;         /* or NULL */
  const line_in_t *lines;
  size_t n_lines;
  const char *const *flags;
  size_t n_flags;
  /* out */
  char id[QM_UUID_STR_LEN];
  bool replayed;  /* the idempotency key was used before with the same body */
  bool key_clash; /* the idempotency key was used before with another body */
} request_new_t;

/* Writes the request, its lines, its first timeline entry and
 * RequestSubmitted in the caller's transaction. */
int requests_create(intake_t *in, qm_pg_t *tx, request_new_t *rq, char *errstr,
                    size_t errstr_size);

/* The state (granted/pending) of the subject's most advanced line for an
 * item and role: "held", "pending" or "" (neither). */
int requests_holding(qm_pg_t *tx, const char *subject, const char *item, const char *role,
                     char *out, size_t out_size, char *errstr, size_t errstr_size);

/* Seats of a licence held or on the way, counted under a per-item
 * transaction lock (so the caller's check and insert are not raced). */
int requests_seats_in_use(qm_pg_t *tx, const char *item, int64_t *used, char *errstr,
                          size_t errstr_size);

/* Starts/stops the thread that applies HR changes when their date arrives. */
int people_ticker_start(intake_t *in, char *errstr, size_t errstr_size);
void people_ticker_stop(intake_t *in);
int people_register(intake_t *in, char *errstr, size_t errstr_size);



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
