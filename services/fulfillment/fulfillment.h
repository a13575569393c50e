/*
 * fulfillment: the state shared by qm-fulfillment's parts — the consumer
 * handler and configuration (main.c), inventory and CSV import
 * (inventory.c), reservation, backorders, routing and every step of a
 * request line's task (tasks.c), the outbound calls to procurement and the
 * carrier (outbound.c), the HTTP API of work queues, scans and webhooks
 * (api.c), the loaner pool (loans.c) and SLA / overdue timers (timers.c).
 *
 * Everything a step changes and the events it causes commit in one
 * transaction: the caller passes its open transaction (tx) to every ff_*
 * function that writes.
 */
#ifndef QM_FULFILLMENT_H
#define QM_FULFILLMENT_H

#include "qm_http.h"
#include "qm_metrics.h"
#include "qm_service.h"

#include "qm/v1/fulfillment.pb-c.h"

#include <jansson.h>
#include <pthread.h>
#include <regex.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define FF_MAX_WORKERS 16
#define FF_MAX_SLAS 16
/* The carrier webhook secret QM_DEV_INSECURE=1 falls back to (refused otherwise). */
#define FF_DEV_WEBHOOK_SECRET "dev-carrier-webhook-secret"

typedef struct ff_sla {
  char item_type[32]; /* "*" matches every other type */
  int64_t ms;
} ff_sla_t;

typedef struct ff {
  qm_service_t *svc;
  regex_t tag_re, serial_re;
  double onsite_value;         /* QM_ONSITE_VALUE */
  int64_t onsite_lead_ms;      /* QM_ONSITE_LEAD */
  bool reship;                 /* QM_FAILED_DELIVERY = reship (else reassign) */
  int64_t loan_max_ms;         /* QM_LOAN_MAX_PERIOD */
  const char *webhook_secret;  /* QM_CARRIER_WEBHOOK_SECRET (the config owns it) */
  ff_sla_t slas[FF_MAX_SLAS];
  size_t n_slas;
  pthread_t workers[FF_MAX_WORKERS];
  size_t n_workers;
  pthread_t stock_thread;
  bool stock_running;
  struct qm_timers *timers;
  atomic_bool stopping;
  qm_metric_family_t *m_reservations; /* qm_fulfillment_reservations_total{outcome} */
  qm_metric_family_t *m_sla;          /* qm_fulfillment_sla_breaches_total{item_type} */
  qm_metric_family_t *m_calls;        /* qm_fulfillment_outbound_calls_total{kind,outcome} */
  qm_metric_family_t *m_steps;        /* qm_fulfillment_steps_total{step} */
  qm_metric_family_t *m_loans;        /* qm_fulfillment_loan_overdue_total */
} ff_t;

/* What a new task needs (an approved asset line, or a staff reservation). */
typedef struct ff_line {
  const char *request_id;
  int line_no;
  const char *person_id;
  const char *item_id;
  const char *model_id;
  const char *country;
  const char *location;
  const char *traceparent; /* the cause's, may be NULL */
} ff_line_t;

/* ---- events (tasks.c) ---- */

/* Emits a FulfillmentUpdate (u->at_ms set to now when 0) to the outbox in tx,
 * CloudEvents type qm.fulfillment.<step>.v1, key the subject person. */
int ff_emit_update(ff_t *ff, qm_pg_t *tx, Qm__V1__FulfillmentUpdate *u, const char *traceparent,
                   char *errstr, size_t errstr_size);
/* Notes in tx that the stock of model_id at site_id changed; the StockLevel
 * is published by ff_stock_publish() shortly after (coalesced). */
int ff_emit_stock(ff_t *ff, qm_pg_t *tx, const char *model_id, const char *site_id,
                  const char *traceparent, char *errstr, size_t errstr_size);
/* Publishes one StockLevel per (model, site) noted since the last round, as
 * it is now, in tx (one publisher at a time across instances). */
int ff_stock_publish(ff_t *ff, qm_pg_t *tx, int *published, char *errstr, size_t errstr_size);
/* Records a status change of asset asset_id in its history (and sets it). */
int ff_asset_set(qm_pg_t *tx, int64_t asset_id, const char *status, const char *person_id,
                 const char *request_id, int line_no, const char *actor, const char *note,
                 char *errstr, size_t errstr_size);

/* ---- tasks (tasks.c) ---- */

/* Opens the task of a request line (once: a line seen again is left alone)
 * and reserves an asset for it or backorders it; for a person who has left
 * (ff_person_left) the task is recorded cancelled and CANCELLED published.
 * *task_seq (may be NULL) receives the task, *outcome (may be NULL)
 * "reserved", "backordered", "cancelled" or "exists". QM_EINVAL when the
 * model is unknown. */
int ff_task_open(ff_t *ff, qm_pg_t *tx, const ff_line_t *line, int64_t *task_seq,
                 const char **outcome, char *errstr, size_t errstr_size);
/* Tries to reserve an asset for a task that has none (backordered or after a
 * failed delivery); prefer_asset (0: none) is taken first when free.
 * *reserved says whether one was found; when not and backorder is true a
 * purchase order is raised. */
int ff_task_reserve(ff_t *ff, qm_pg_t *tx, int64_t task_seq, int64_t prefer_asset, bool backorder,
                    bool *reserved, char *errstr, size_t errstr_size);
/* Gives free stock of model_id to backordered tasks, oldest first (those
 * waiting on po_id first when not NULL). */
int ff_allocate_backorders(ff_t *ff, qm_pg_t *tx, const char *model_id, const char *po_id,
                           char *errstr, size_t errstr_size);
/* Closes a task (done or cancelled) and cancels its SLA timer. */
int ff_task_close(ff_t *ff, qm_pg_t *tx, int64_t task_seq, const char *state, char *errstr,
                  size_t errstr_size);
/* Emits the task's FulfillmentUpdate for step, filled from the task in tx. */
int ff_task_emit(ff_t *ff, qm_pg_t *tx, int64_t seq, Qm__V1__FulfillmentStep step,
                 const char *note, const char *actor, char *errstr, size_t errstr_size);
/* The carrier accepted shipment ref: tracking number and label recorded,
 * asset and task shipped, SHIPPED published. */
int ff_shipment_created(ff_t *ff, qm_pg_t *tx, const char *ref, const char *carrier,
                        const char *tracking, const char *label_url, char *errstr,
                        size_t errstr_size);
/* Queues a shipment of the task's asset to the carrier (step 'shipping'). */
int ff_task_ship(ff_t *ff, qm_pg_t *tx, int64_t task_seq, char *errstr, size_t errstr_size);
/* The task as the API shows it, or NULL. Caller frees with json_decref(). */
json_t *ff_task_json(qm_pg_t *pg, int64_t task_seq, char *errstr, size_t errstr_size);
/* Takes the person's transaction-scoped advisory lock (the order every
 * path follows: person first, then their tasks) and says whether they are a
 * recorded leaver; date (may be size 0) receives the effective date ("" when
 * unknown). */
int ff_person_left(qm_pg_t *tx, const char *person_id, char *date, size_t date_size, bool *left,
                   char *errstr, size_t errstr_size);
/* A leaver: recorded in leavers (lines approved later are cancelled, assets
 * delivered later recalled), return tasks for every asset they hold, open
 * tasks not in transit cancelled. Idempotent: called again on a delivery to
 * a leaver. */
int ff_leaver(ff_t *ff, qm_pg_t *tx, const char *person_id, const char *effective_date,
              const char *traceparent, int *returns, char *errstr, size_t errstr_size);
/* The SLA of an item type, ms (0: none). */
int64_t ff_sla_ms(const ff_t *ff, const char *item_type);

/* ---- inventory (inventory.c) ---- */
int ff_inventory_register(ff_t *ff, char *errstr, size_t errstr_size);
/* Seeds sites, models and assets (CSV) from a JSON file, adding only what is
 * not known yet. QM_EINVAL (exit 2) when the file is unreadable or bad. */
int ff_inventory_seed(ff_t *ff, const char *path, char *errstr, size_t errstr_size);
/* Validates one asset (tag, serial patterns). NULL when fine, else the reason. */
const char *ff_asset_check_tag(const ff_t *ff, const char *tag);
const char *ff_asset_check_serial(const ff_t *ff, const char *serial);

/* ---- HTTP API of tasks, queues, scans, webhooks (api.c) ---- */
int ff_api_register(ff_t *ff, char *errstr, size_t errstr_size);

/* ---- loaners (loans.c) ---- */
int ff_loans_register(ff_t *ff, char *errstr, size_t errstr_size);
int ff_loan_overdue(ff_t *ff, qm_pg_t *tx, const char *loan_id, char *errstr, size_t errstr_size);

/* ---- outbound calls (outbound.c) ---- */
/* Queues a call in tx: kind "purchase_order" or "shipment", ref its id;
 * takes ownership of body. */
int ff_outbound_add(qm_pg_t *tx, const char *kind, const char *ref, json_t *body, char *errstr,
                    size_t errstr_size);
int ff_outbound_start(ff_t *ff, char *errstr, size_t errstr_size);
void ff_outbound_stop(ff_t *ff);

/* ---- timers (timers.c) ---- */
int ff_timers_start(ff_t *ff, char *errstr, size_t errstr_size);
void ff_timers_stop(ff_t *ff);

/* ---- small API helpers (api.c) ---- */
/* Runs fn in a transaction for a handler; answers 503 on a database failure
 * and returns false then; fn's QM_EINVAL/QM_ENOTFOUND/QM_ECONFLICT are left
 * for fn to have answered (it sets the response itself). */
typedef int (*ff_tx_fn)(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                        size_t errstr_size);
bool ff_api_tx(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, ff_tx_fn fn, void *ctx);
/* Answers a GET list: reads `limit` (default_limit, 1..max_limit) and
 * `after`, runs sql with $1 = after, $2 = limit + 1 and $3.. = extra (at
 * most 14); sql's rows are (cursor, item as JSON text). */
void ff_api_list(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, long default_limit,
                 long max_limit, const char *sql, const qm_pg_param_t *extra, int n_extra);
/* A required string member of a JSON body; adds a field error when absent. */
const char *ff_json_str(json_t *body, const char *name, bool required, qm_problem_t **pb);

extern const char *const ff_staff_roles[];

#endif
