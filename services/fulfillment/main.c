/*
 * qm-fulfillment: gets approved equipment into the right hands.
 *
 * An approved asset line (qm.decisions.v1) opens a task, in the consumer's
 * transaction: an asset of the model is reserved at the site serving the
 * person's location (or a central one), or the line is backordered and a
 * purchase order queued for procurement. Staff then stage it (their team's
 * queue), it is shipped through the carrier or handed over at an on-site
 * appointment with a check-out scan, and recalled when its holder leaves
 * (qm.hr.lifecycle.v1). Every step publishes a FulfillmentUpdate and every
 * stock change a StockLevel on qm.fulfillment.v1.
 */
#include "fulfillment.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_service.h"
#include "qm_timer.h"
#include "qm_topics.h"

#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/hr.pb-c.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const qm_migration_t migrations[] = {
    {2, "fulfilment tasks",
     "CREATE TABLE tasks ("
     " seq bigserial PRIMARY KEY,"
     " request_id text NOT NULL,"
     " line_no int NOT NULL,"
     " person_id text NOT NULL,"
     " item_id text NOT NULL,"
     " asset_model text NOT NULL,"
     " country text NOT NULL,"
     " location text NOT NULL,"
     " state text NOT NULL DEFAULT 'open' CHECK (state IN ('open','done','cancelled')),"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " UNIQUE (request_id, line_no));"},
    {3, "inventory, reservations, purchase orders, shipments, returns, loaners",
     "CREATE TABLE sites ("
     " site_id text PRIMARY KEY,"
     " name text NOT NULL,"
     " kind text NOT NULL CHECK (kind IN ('central','regional')),"
     " country text NOT NULL DEFAULT '',"
     " locations text[] NOT NULL DEFAULT '{}',"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "CREATE TABLE models ("
     " model_id text PRIMARY KEY,"
     " name text NOT NULL,"
     " item_type text NOT NULL,"
     " cost numeric NOT NULL DEFAULT 0,"
     " complex boolean NOT NULL DEFAULT false,"
     " loaner boolean NOT NULL DEFAULT false,"
     " attributes jsonb NOT NULL DEFAULT '{}',"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "CREATE TABLE assets ("
     " asset_id bigserial PRIMARY KEY,"
     " tag text NOT NULL UNIQUE,"
     " serial text NOT NULL UNIQUE,"
     " model_id text NOT NULL REFERENCES models,"
     " site_id text NOT NULL REFERENCES sites,"
     " status text NOT NULL CHECK (status IN ('in_stock','reserved','staging','shipped',"
     "  'assigned','returned','retired')),"
     " assigned_to text,"
     " request_id text,"
     " line_no int,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "CREATE INDEX assets_free ON assets (model_id, site_id, asset_id) WHERE status = 'in_stock';"
     "CREATE INDEX assets_holder ON assets (assigned_to) WHERE assigned_to IS NOT NULL;"
     "CREATE TABLE asset_history ("
     " seq bigserial PRIMARY KEY,"
     " asset_id bigint NOT NULL REFERENCES assets,"
     " status text NOT NULL,"
     " person_id text,"
     " request_id text,"
     " actor text,"
     " note text,"
     " at timestamptz NOT NULL DEFAULT clock_timestamp());"
     "CREATE INDEX asset_history_asset ON asset_history (asset_id, seq);"
     "CREATE TABLE purchase_orders ("
     " po_id text PRIMARY KEY,"
     " seq bigserial UNIQUE,"
     " model_id text NOT NULL,"
     " site_id text NOT NULL,"
     " quantity int NOT NULL CHECK (quantity > 0),"
     " status text NOT NULL CHECK (status IN ('new','sent','confirmed','shipped','delivered',"
     "  'cancelled','failed')),"
     " eta_ms bigint NOT NULL DEFAULT 0,"
     " external_ref text,"
     " request_id text,"
     " line_no int,"
     " received int NOT NULL DEFAULT 0,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "CREATE INDEX purchase_orders_open ON purchase_orders (model_id, site_id)"
     " WHERE status IN ('new','sent','confirmed','shipped');"
     "ALTER TABLE tasks"
     " ADD COLUMN step text NOT NULL DEFAULT 'new',"
     " ADD COLUMN item_type text,"
     " ADD COLUMN site_id text,"
     " ADD COLUMN asset_id bigint REFERENCES assets,"
     " ADD COLUMN team text,"
     " ADD COLUMN route text,"
     " ADD COLUMN appointment_ms bigint NOT NULL DEFAULT 0,"
     " ADD COLUMN po_id text REFERENCES purchase_orders,"
     " ADD COLUMN eta_ms bigint NOT NULL DEFAULT 0,"
     " ADD COLUMN carrier text,"
     " ADD COLUMN tracking_number text,"
     " ADD COLUMN label_url text,"
     " ADD COLUMN shipments int NOT NULL DEFAULT 0,"
     " ADD COLUMN sla_due_ms bigint NOT NULL DEFAULT 0,"
     " ADD COLUMN sla_breached boolean NOT NULL DEFAULT false,"
     " ADD COLUMN traceparent text,"
     " ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();"
     "CREATE INDEX tasks_queue ON tasks (team, step, seq) WHERE state = 'open';"
     "CREATE INDEX tasks_backordered ON tasks (asset_model, seq) WHERE step = 'backordered';"
     "CREATE INDEX tasks_person ON tasks (person_id) WHERE state = 'open';"
     "CREATE UNIQUE INDEX tasks_tracking ON tasks (tracking_number)"
     " WHERE tracking_number IS NOT NULL;"
     "CREATE TABLE outbound ("
     " id bigserial PRIMARY KEY,"
     " kind text NOT NULL CHECK (kind IN ('purchase_order','shipment')),"
     " ref text NOT NULL,"
     " body jsonb NOT NULL,"
     " state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending','done','failed')),"
     " attempts int NOT NULL DEFAULT 0,"
     " next_attempt_at timestamptz NOT NULL DEFAULT now(),"
     " lease_until timestamptz,"
     " last_error text,"
     " response jsonb,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " finished_at timestamptz,"
     " UNIQUE (kind, ref));"
     "CREATE INDEX outbound_due ON outbound (next_attempt_at, id) WHERE state = 'pending';"
     "CREATE TABLE returns ("
     " return_id bigserial PRIMARY KEY,"
     " asset_id bigint NOT NULL REFERENCES assets,"
     " person_id text NOT NULL,"
     " request_id text,"
     " line_no int,"
     " reason text NOT NULL,"
     " state text NOT NULL DEFAULT 'open' CHECK (state IN ('open','done')),"
     " outcome text CHECK (outcome IN ('stock','retire')),"
     " due_date date NOT NULL DEFAULT current_date,"
     " actor text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " done_at timestamptz);"
     "CREATE UNIQUE INDEX returns_open ON returns (asset_id) WHERE state = 'open';"
     "CREATE TABLE loans ("
     " loan_id text PRIMARY KEY,"
     " seq bigserial UNIQUE,"
     " asset_id bigint NOT NULL REFERENCES assets,"
     " person_id text NOT NULL,"
     " starts_ms bigint NOT NULL,"
     " ends_ms bigint NOT NULL CHECK (ends_ms > starts_ms),"
     " state text NOT NULL DEFAULT 'booked' CHECK (state IN ('booked','out','returned',"
     "  'cancelled')),"
     " booked_by text,"
     " reminded_at timestamptz,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " checked_out_at timestamptz,"
     " returned_at timestamptz);"
     "CREATE INDEX loans_asset ON loans (asset_id, starts_ms) WHERE state IN ('booked','out');"},
    {4, "timers: SLAs and loaner overdue reminders", QM_TIMER_MIGRATION_SQL("timers")},
    /* Stock changes are noted here (an append, no hot row) and published as
     * coalesced StockLevel events by a background round. */
    {5, "stock level changes",
     "CREATE TABLE stock_changes ("
     " id bigserial PRIMARY KEY,"
     " model_id text NOT NULL,"
     " site_id text NOT NULL,"
     " at timestamptz NOT NULL DEFAULT clock_timestamp());"},
    /* No two active bookings of one loaner overlap, whatever the code does:
     * an exclusion constraint (btree_gist gives bigint its GiST "="; it is a
     * trusted extension, created in public so every schema's search_path
     * finds it). A database holding overlaps from before must have them
     * cancelled first (see docs/operations.md). */
    {6, "loans: no overlapping bookings of one asset",
     "CREATE EXTENSION IF NOT EXISTS btree_gist SCHEMA public;"
     "ALTER TABLE loans ADD CONSTRAINT loans_no_overlap EXCLUDE USING gist"
     " (asset_id WITH =, int8range(starts_ms, ends_ms) WITH &&)"
     " WHERE (state IN ('booked', 'out'));"},
    /* People who have left (from qm.hr.lifecycle.v1, on their effective
     * date): lines approved afterwards are cancelled, deliveries recalled. */
    {7, "leavers",
     "CREATE TABLE leavers ("
     " person_id text PRIMARY KEY,"
     " effective_date date,"
     " recorded_at timestamptz NOT NULL DEFAULT now());"},
};

static const qm_cfg_def_t config[] = {
    {"QM_PROCUREMENT_URL", QM_CFG_STR, "",
     "Procurement REST endpoint: purchase orders are POSTed to <url>/purchase-orders (empty: "
     "queued, not sent).",
     0, 0, 0},
    {"QM_PROCUREMENT_TOKEN", QM_CFG_STR, "", "Bearer token for procurement (empty: none).", 0, 0,
     QM_CFG_SECRET},
    {"QM_CARRIER_URL", QM_CFG_STR, "",
     "Carrier REST endpoint: shipments are POSTed to <url>/shipments (empty: queued, not sent).",
     0, 0, 0},
    {"QM_CARRIER_TOKEN", QM_CFG_STR, "", "Bearer token for the carrier (empty: none).", 0, 0,
     QM_CFG_SECRET},
    {"QM_CARRIER_NAME", QM_CFG_STR, "carrier", "Carrier name shown on shipments.", 0, 0, 0},
    {"QM_CARRIER_WEBHOOK_SECRET", QM_CFG_STR, "",
     "HMAC-SHA256 key of tracking webhooks (X-QM-Signature: sha256=hex of '<X-QM-Timestamp>.<body>'). "
     "Required: without it (or set to the well-known " FF_DEV_WEBHOOK_SECRET ") the service "
     "refuses to start, unless QM_DEV_INSECURE is set.",
     0, 0, QM_CFG_SECRET},
    {"QM_DEV_INSECURE", QM_CFG_BOOL, "false",
     "Development only: start without QM_CARRIER_WEBHOOK_SECRET, using the well-known "
     FF_DEV_WEBHOOK_SECRET " (anyone can forge tracking updates; a warning is logged).",
     0, 0, 0},
    {"QM_CARRIER_WEBHOOK_TOLERANCE", QM_CFG_MS, "5m",
     "How far a webhook's X-QM-Timestamp may be from now (replay window).", 1000, 86400000, 0},
    {"QM_OUTBOUND_TIMEOUT", QM_CFG_MS, "10s", "Bound on one procurement or carrier call.", 100,
     300000, 0},
    {"QM_OUTBOUND_MAX_ATTEMPTS", QM_CFG_INT, "10",
     "Attempts at a procurement or carrier call before it is parked as failed.", 1, 1000, 0},
    {"QM_OUTBOUND_BACKOFF", QM_CFG_MS, "1s",
     "First wait before re-attempting a failed call (doubles each time, up to 1 h).", 10,
     3600000, 0},
    {"QM_OUTBOUND_LEASE", QM_CFG_MS, "60s",
     "How long a worker holds a claimed call before another instance may take it.", 1000,
     3600000, 0},
    {"QM_FULFILLMENT_WORKERS", QM_CFG_INT, "2", "Threads sending procurement and carrier calls.",
     1, FF_MAX_WORKERS, 0},
    {"QM_FULFILLMENT_POLL", QM_CFG_MS, "50ms", "Outbound worker poll interval when idle.", 1,
     60000, 0},
    {"QM_STOCK_LEVEL_INTERVAL", QM_CFG_MS, "200ms",
     "How often changed stock levels are published (coalesced StockLevel events).", 10, 60000,
     0},
    {"QM_FULFILLMENT_TICK", QM_CFG_MS, "1s", "Timer poll (SLAs, loaner overdue).", 10, 3600000,
     0},
    {"QM_FAILED_DELIVERY", QM_CFG_STR, "reship",
     "After a failed delivery: reship (the asset goes back to stock and is shipped again) or "
     "reassign (it goes to the oldest backorder of the model; the line waits for staff).",
     0, 0, 0},
    {"QM_ONSITE_VALUE", QM_CFG_INT, "2500",
     "Models costing at least this (or marked complex) get an on-site setup appointment instead "
     "of shipping (0: never by value).",
     0, 100000000, 0},
    {"QM_ONSITE_LEAD", QM_CFG_MS, "1d",
     "Default time from staging done to the on-site appointment.", 0, 8640000000, 0},
    {"QM_FULFILLMENT_SLA", QM_CFG_STR, "laptop=5d,phone=3d,monitor=3d,*=7d",
     "Fulfilment SLA per item type (type=duration, '*' for the rest; a breach is published).", 0,
     0, 0},
    {"QM_LOAN_MAX_PERIOD", QM_CFG_MS, "14d", "Longest loaner booking.", 60000, 31536000000, 0},
    {"QM_FULFILLMENT_INVENTORY_FILE", QM_CFG_STR, "",
     "JSON seed of sites, models and an assets CSV (see deploy/local/seed/inventory.json); "
     "only what is not known yet is added, at start. Empty: none.",
     0, 0, 0},
    {"QM_ASSET_TAG_PATTERN", QM_CFG_STR, "^[A-Z][A-Z0-9]{1,9}-[0-9]{3,10}$",
     "POSIX extended regex every asset tag must match.", 0, 0, 0},
    {"QM_ASSET_SERIAL_PATTERN", QM_CFG_STR, "^[A-Za-z0-9][A-Za-z0-9-]{3,39}$",
     "POSIX extended regex every serial number must match.", 0, 0, 0},
};

const char *const ff_staff_roles[] = {"it_admin", "helpdesk", NULL};

static int on_decision(ff_t *ff, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size) {
  Qm__V1__DecisionEvent *de =
      qm__v1__decision_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!de)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.DecisionEvent",
                  ev->meta.type);
  int rc = QM_OK;
  const Qm__V1__RequestApproved *ap =
      de->event_case == QM__V1__DECISION_EVENT__EVENT_APPROVED ? de->approved : NULL;
  if (ap && ap->line && ap->line->kind == QM__V1__ITEM_KIND__ITEM_KIND_ASSET) {
    if (!ap->request_id[0] || !ap->subject_person_id[0] || !ap->line->asset_model[0]) {
      rc = qm_err(errstr, errstr_size, QM_EPOISON,
                  "approved asset line without request, subject or asset model");
      goto out;
    }
    ff_line_t l = {.request_id = ap->request_id,
                   .line_no = ap->line->line_no,
                   .person_id = ap->subject_person_id,
                   .item_id = ap->line->item_id,
                   .model_id = ap->line->asset_model,
                   .country = ap->subject_country,
                   .location = ap->subject_location,
                   .traceparent = ev->meta.traceparent};
    rc = ff_task_open(ff, tx, &l, NULL, NULL, errstr, errstr_size);
    if (rc == QM_EINVAL) {
      /* Unknown model or no site: nothing can be reserved until the
       * inventory knows it; dead-letter with the reason so it can be replayed. */
      char why[300];
      qm_strlcpy(why, errstr, sizeof(why));
      rc = qm_err(errstr, errstr_size, QM_EPOISON,
                  "request %s line %d: %s; add it to the inventory (PUT /v1/models/{id}, "
                  "PUT /v1/sites/{id}) and replay the dead letter, or reserve the line with "
                  "POST /v1/reservations",
                  ap->request_id, ap->line->line_no, why);
    }
  }
out:
  qm__v1__decision_event__free_unpacked(de, NULL);
  return rc;
}

static int on_hr(ff_t *ff, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                 size_t errstr_size) {
  Qm__V1__HrEvent *he =
      qm__v1__hr_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!he)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.HrEvent",
                  ev->meta.type);
  int rc = QM_OK;
  bool leaver = he->kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER ||
                (he->person && he->person->status ==
                                   QM__V1__PERSON_STATUS__PERSON_STATUS_TERMINATED);
  if (!leaver && he->kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER && he->person &&
      he->person->id[0]) {
    /* Rehired: no longer a leaver (new lines are fulfilled again). */
    qm_pg_param_t p[] = {QM_PG_TEXT(he->person->id)};
    rc = qm_pg_exec(tx, "DELETE FROM leavers WHERE person_id = $1", p, 1, NULL, errstr,
                    errstr_size);
  }
  if (leaver && he->person && he->person->id[0]) {
    /* Dated in the future: recalled on that day (a "leaver" timer; a
     * repeat of the event arms another, and the second recall finds
     * nothing left to open). Today, in the past or undated: now. */
    int y = 0, mo = 0, d = 0;
    int64_t due = 0;
    if (sscanf(he->effective_date, "%4d-%2d-%2d", &y, &mo, &d) == 3 && mo >= 1 && mo <= 12 &&
        d >= 1 && d <= 31) {
      struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d};
      due = (int64_t)timegm(&tm) * 1000;
    }
    if (due > qm_now_ms()) {
      rc = qm_timer_add(tx, "timers", "leaver", he->person->id, he->effective_date,
                        strlen(he->effective_date), due, NULL, errstr, errstr_size);
      if (rc == QM_OK)
        qm_log(QM_LOG_INFO, NULL, NULL, "leaver %s effective %s: assets recalled on that day",
               he->person->id, he->effective_date);
    } else {
      int n = 0;
      rc = ff_leaver(ff, tx, he->person->id, he->effective_date, ev->meta.traceparent, &n, errstr,
                     errstr_size);
      if (rc == QM_OK)
        qm_log(QM_LOG_INFO, NULL, NULL, "leaver %s: %d return task(s) opened", he->person->id, n);
    }
  }
  qm__v1__hr_event__free_unpacked(he, NULL);
  return rc;
}

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  ff_t *ff = app;
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_DECISIONS))
    return on_decision(ff, tx, ev, errstr, errstr_size);
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_HR))
    return on_hr(ff, tx, ev, errstr, errstr_size);
  return QM_OK;
}

/* "laptop=5d,phone=3d,*=7d" into ff->slas. */
static int parse_slas(ff_t *ff, const char *spec, char *errstr, size_t errstr_size) {
  char *copy = qm_strdup(spec), *save = NULL;
  int rc = QM_OK;
  ff->n_slas = 0;
  for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(tok, '=');
    int64_t ms = 0;
    if (!eq || eq == tok || ff->n_slas >= FF_MAX_SLAS ||
        qm_config_parse_ms(eq + 1, &ms) != QM_OK || (size_t)(eq - tok) >= sizeof(ff->slas[0].item_type)) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL,
                  "QM_FULFILLMENT_SLA: '%s' is not type=duration (e.g. laptop=5d)", tok);
      break;
    }
    *eq = 0;
    qm_strlcpy(ff->slas[ff->n_slas].item_type, tok, sizeof(ff->slas[0].item_type));
    ff->slas[ff->n_slas++].ms = ms;
  }
  free(copy);
  return rc;
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(svc);
  ff_t *ff = qm_calloc(1, sizeof(*ff));
  ff->svc = svc;
  int rc = QM_OK;
  bool tag_re = false, serial_re = false;
  const char *fd = qm_config_str(cfg, "QM_FAILED_DELIVERY");
  if (strcmp(fd, "reship") && strcmp(fd, "reassign")) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "QM_FAILED_DELIVERY: '%s' is not reship or reassign",
                fd);
    goto fail;
  }
  ff->reship = !strcmp(fd, "reship");
  ff->onsite_value = (double)qm_config_int(cfg, "QM_ONSITE_VALUE");
  ff->onsite_lead_ms = qm_config_ms(cfg, "QM_ONSITE_LEAD");
  ff->loan_max_ms = qm_config_ms(cfg, "QM_LOAN_MAX_PERIOD");
  rc = parse_slas(ff, qm_config_str(cfg, "QM_FULFILLMENT_SLA"), errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  if (regcomp(&ff->tag_re, qm_config_str(cfg, "QM_ASSET_TAG_PATTERN"), REG_EXTENDED | REG_NOSUB)) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "QM_ASSET_TAG_PATTERN is not a valid regex");
    goto fail;
  }
  tag_re = true;
  if (regcomp(&ff->serial_re, qm_config_str(cfg, "QM_ASSET_SERIAL_PATTERN"),
              REG_EXTENDED | REG_NOSUB)) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "QM_ASSET_SERIAL_PATTERN is not a valid regex");
    goto fail;
  }
  serial_re = true;
  const char *secret = qm_config_str(cfg, "QM_CARRIER_WEBHOOK_SECRET");
  if (!*secret || !strcmp(secret, FF_DEV_WEBHOOK_SECRET)) {
    if (!qm_config_bool(cfg, "QM_DEV_INSECURE")) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL,
                  "QM_CARRIER_WEBHOOK_SECRET is %s: set the secret agreed with the carrier "
                  "(tracking webhooks are authenticated with it), or QM_DEV_INSECURE=1 on a "
                  "development machine",
                  *secret ? "the well-known development value" : "not set");
      goto fail;
    }
    secret = FF_DEV_WEBHOOK_SECRET;
    qm_log_warn("QM_CARRIER_WEBHOOK_SECRET is the development value " FF_DEV_WEBHOOK_SECRET
                " (QM_DEV_INSECURE): anyone can forge tracking updates; never outside a laptop");
  }
  ff->webhook_secret = secret;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  qm_metrics_t *reg = qm_service_metrics(svc);
  ff->m_reservations = qm_metrics_counter(reg, "qm_fulfillment_reservations_total",
                                          "Reservation attempts by outcome (reserved, backordered).",
                                          (const char *const[]){"outcome", NULL});
  ff->m_sla = qm_metrics_counter(reg, "qm_fulfillment_sla_breaches_total",
                                 "Request lines not fulfilled within their item type's SLA.",
                                 (const char *const[]){"item_type", NULL});
  ff->m_calls = qm_metrics_counter(reg, "qm_fulfillment_outbound_calls_total",
                                   "Procurement and carrier calls by kind and outcome (done, "
                                   "retried, parked).",
                                   (const char *const[]){"kind", "outcome", NULL});
  ff->m_steps = qm_metrics_counter(reg, "qm_fulfillment_steps_total",
                                   "FulfillmentUpdate events published, by step.",
                                   (const char *const[]){"step", NULL});
  ff->m_loans = qm_metrics_counter(reg, "qm_fulfillment_loan_overdue_total",
                                   "Overdue reminders sent for loaners not returned in time.", NULL);
  const char *seed = qm_config_str(cfg, "QM_FULFILLMENT_INVENTORY_FILE");
  if (*seed) rc = ff_inventory_seed(ff, seed, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  rc = ff_inventory_register(ff, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_api_register(ff, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_loans_register(ff, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_outbound_start(ff, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_timers_start(ff, errstr, errstr_size);
  if (rc != QM_OK) {
    ff_outbound_stop(ff);
    goto fail;
  }
  *app = ff;
  return QM_OK;
fail:
  if (tag_re) regfree(&ff->tag_re);
  if (serial_re) regfree(&ff->serial_re);
  free(ff);
  return rc;
}

static void stop(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  ff_timers_stop(app);
  ff_outbound_stop(app);
}

static void fini(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  ff_t *ff = app;
  regfree(&ff->tag_re);
  regfree(&ff->serial_re);
  free(ff);
}

static const char *const consumes[] = {QM_TOPIC_DECISIONS, QM_TOPIC_HR};

int main(int argc, char **argv) {
  static const qm_service_def_t def = {
      .name = "fulfillment",
      .default_port = 8084,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .config = config,
      .n_config = QM_ARRAY_LEN(config),
      .init = init,
      .stop = stop,
      .fini = fini,
      .uses_redis = true,
  };
  return qm_service_main(argc, argv, &def);
}
