/*
 * qm-intake: the front door. It serves the catalog (loaded from YAML files:
 * catalog as code) filtered to what the caller may ask for, takes requests
 * — for oneself, by a manager for a report, by helpdesk for anyone — checks
 * them against the catalog and the directory, records them and publishes
 * RequestSubmitted in the same transaction, and keeps each request's status
 * and timeline from every service's events. It keeps the people directory
 * from qm.hr.lifecycle.v1 (seeded from a file on the local stack).
 */
#include "intake.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_metrics.h"
#include "qm_topics.h"

#include <stdlib.h>
#include <string.h>

const char *const intake_staff_roles[] = {"helpdesk", "it_admin", NULL};

static const qm_migration_t migrations[] = {
    {2, "people, requests, lines and timeline",
     "CREATE TABLE people ("
     " id text PRIMARY KEY,"
     " name text NOT NULL DEFAULT '',"
     " email text NOT NULL DEFAULT '',"
     " manager_id text NOT NULL DEFAULT '',"
     " department text NOT NULL DEFAULT '',"
     " job_function text NOT NULL DEFAULT '',"
     " country text NOT NULL DEFAULT '',"
     " location text NOT NULL DEFAULT '',"
     " employment_type text NOT NULL DEFAULT 'employee',"
     " status text NOT NULL DEFAULT 'active',"
     " directory_username text NOT NULL DEFAULT '',"
     " start_date text NOT NULL DEFAULT '',"
     " end_date text NOT NULL DEFAULT '',"
     " effective_date text NOT NULL DEFAULT '0000-00-00',"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "CREATE INDEX people_manager ON people (manager_id);"
     "CREATE TABLE hr_events_seen ("
     " source text NOT NULL, source_event_id text NOT NULL, effective_date text NOT NULL,"
     " received_at timestamptz NOT NULL DEFAULT now(),"
     " PRIMARY KEY (source, source_event_id, effective_date));"
     "CREATE TABLE requests ("
     " id text PRIMARY KEY,"
     " seq bigserial UNIQUE,"
     " requester_id text NOT NULL,"
     " subject_id text NOT NULL,"
     " reason text NOT NULL,"
     " origin text NOT NULL,"
     " status text NOT NULL,"
     " extends_request_id text,"
     " idempotency_key text,"
     " body_hash text,"
     " traceparent text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " updated_at timestamptz NOT NULL DEFAULT now(),"
     " UNIQUE (requester_id, idempotency_key));"
     "CREATE INDEX requests_subject ON requests (subject_id, seq);"
     "CREATE INDEX requests_requester ON requests (requester_id, seq);"
     "CREATE FUNCTION line_rank(s text) RETURNS int IMMUTABLE LANGUAGE sql AS $$"
     " SELECT CASE s WHEN 'submitted' THEN 0 WHEN 'pending_approval' THEN 1"
     " WHEN 'approved' THEN 2 WHEN 'fulfilling' THEN 3 WHEN 'failed' THEN 3"
     " WHEN 'granted' THEN 4 WHEN 'fulfilled' THEN 4 WHEN 'rejected' THEN 4"
     " WHEN 'cancelled' THEN 4 WHEN 'revoked' THEN 5 WHEN 'expired' THEN 5 ELSE -1 END $$;"
     "CREATE TABLE request_lines ("
     " request_id text NOT NULL REFERENCES requests,"
     " line_no int NOT NULL,"
     " item_id text NOT NULL,"
     " role_id text NOT NULL DEFAULT '',"
     " kind text NOT NULL,"
     " risk text NOT NULL DEFAULT '',"
     " grp text NOT NULL DEFAULT '',"
     " duration_days int NOT NULL DEFAULT 0,"
     " status text NOT NULL CHECK (line_rank(status) >= 0),"
     " waiting_on text[] NOT NULL DEFAULT '{}',"
     " expires_at_ms bigint NOT NULL DEFAULT 0,"
     " updated_at timestamptz NOT NULL DEFAULT now(),"
     " PRIMARY KEY (request_id, line_no));"
     "CREATE TABLE timeline ("
     " id bigserial PRIMARY KEY,"
     " request_id text NOT NULL,"
     " line_no int NOT NULL DEFAULT 0,"
     " at_ms bigint NOT NULL,"
     " type text NOT NULL,"
     " event_id text NOT NULL,"
     " actor text NOT NULL DEFAULT '',"
     " summary text NOT NULL);"
     "CREATE INDEX timeline_request ON timeline (request_id, at_ms, id);"},
    /* A cancellation that crosses an approval already made loses: the line
     * goes on to approved and granted, which is what really happened. */
    {3, "cancelled ranks below approved",
     "CREATE OR REPLACE FUNCTION line_rank(s text) RETURNS int IMMUTABLE LANGUAGE sql AS $$"
     " SELECT CASE s WHEN 'submitted' THEN 0 WHEN 'pending_approval' THEN 1"
     " WHEN 'cancelled' THEN 2 WHEN 'approved' THEN 3 WHEN 'fulfilling' THEN 4"
     " WHEN 'failed' THEN 4 WHEN 'granted' THEN 5 WHEN 'fulfilled' THEN 5"
     " WHEN 'rejected' THEN 5 WHEN 'revoked' THEN 6 WHEN 'expired' THEN 6 ELSE -1 END $$;"},
    {4, "flags, scheduled HR changes, stock levels",
     "ALTER TABLE requests ADD COLUMN flags text[] NOT NULL DEFAULT '{}';"
     "CREATE INDEX request_lines_item ON request_lines (item_id, role_id, status);"
     "CREATE TABLE hr_scheduled ("
     " id bigserial PRIMARY KEY,"
     " person_id text NOT NULL,"
     " kind text NOT NULL,"
     " effective_date text NOT NULL,"
     " event bytea NOT NULL,"
     " event_id text NOT NULL,"
     " traceparent text,"
     " received_at timestamptz NOT NULL DEFAULT now(),"
     " applied_at timestamptz);"
     "CREATE INDEX hr_scheduled_due ON hr_scheduled (effective_date) WHERE applied_at IS NULL;"
     "CREATE TABLE stock ("
     " model_id text NOT NULL,"
     " site_id text NOT NULL,"
     " available int NOT NULL,"
     " on_order int NOT NULL,"
     " eta_ms bigint NOT NULL,"
     " updated_at timestamptz NOT NULL DEFAULT now(),"
     " PRIMARY KEY (model_id, site_id));"},
    {5, "scheduled HR changes that failed",
     "ALTER TABLE hr_scheduled ADD COLUMN error text;"},
    /* "Does this person hold or await this item?" is asked on every submit:
     * answer it from one index, whatever the planner's statistics say. */
    {6, "subject on request lines",
     "ALTER TABLE request_lines ADD COLUMN subject_id text;"
     "UPDATE request_lines l SET subject_id = r.subject_id FROM requests r WHERE r.id = l.request_id;"
     "ALTER TABLE request_lines ALTER COLUMN subject_id SET NOT NULL;"
     "CREATE INDEX request_lines_holding ON request_lines (subject_id, item_id, role_id);"},
};

static const qm_cfg_def_t config[] = {
    {"QM_INTAKE_CATALOG_DIR", QM_CFG_STR, "/etc/quartermaster/catalog",
     "Directory of catalog YAML files (catalog as code); SIGHUP reloads it.", 0, 0, 0},
    {"QM_INTAKE_PEOPLE_FILE", QM_CFG_STR, "",
     "JSON file with the initial people directory ({\"people\":[…]}); empty: none.", 0, 0, 0},
    {"QM_INTAKE_MAX_LINES", QM_CFG_INT, "20", "Most lines one request may hold.", 1, 200, 0},
    {"QM_INTAKE_WATCHLIST_FILE", QM_CFG_STR, "",
     "CSV 'name,country' of people contractors and third parties are screened against; "
     "empty: no screening. SIGHUP reloads it.", 0, 0, 0},
    {"QM_INTAKE_WATCHLIST_ACTION", QM_CFG_STR, "refuse",
     "What a watchlist match does: refuse the request, or flag it for approvers.", 0, 0, 0},
    {"QM_INTAKE_HR_TICK", QM_CFG_MS, "60s",
     "How often HR changes dated in the future are checked for their day.", 100, 3600000, 0},
};

static const double decision_bounds[] = {1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400};

static int load_watchlist(const qm_config_t *cfg, watchlist_t **out, char *errstr, size_t errstr_size) {
  const char *path = qm_config_str(cfg, "QM_INTAKE_WATCHLIST_FILE");
  *out = NULL;
  return *path ? watchlist_load(path, out, errstr, errstr_size) : QM_OK;
}

const catalog_t *intake_catalog_acquire(intake_t *in) {
  pthread_rwlock_rdlock(&in->cat_lock);
  return in->cat;
}

void intake_catalog_release(intake_t *in) { pthread_rwlock_unlock(&in->cat_lock); }

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  intake_t *in = app;
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_HR))
    return people_on_hr_event(in, tx, ev, errstr, errstr_size);
  return readmodel_on_event(in, tx, ev, errstr, errstr_size);
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(svc);
  intake_t *in = qm_calloc(1, sizeof(*in));
  in->svc = svc;
  in->max_lines = (int)qm_config_int(cfg, "QM_INTAKE_MAX_LINES");
  in->hr_tick_ms = qm_config_ms(cfg, "QM_INTAKE_HR_TICK");
  const char *action = qm_config_str(cfg, "QM_INTAKE_WATCHLIST_ACTION");
  if (strcmp(action, "refuse") && strcmp(action, "flag")) {
    free(in);
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "invalid configuration: QM_INTAKE_WATCHLIST_ACTION: '%s' is not refuse or flag", action);
  }
  in->watch_refuse = !strcmp(action, "refuse");
  qm_metrics_t *reg = qm_service_metrics(svc);
  static const char *const req_labels[] = {"origin", "outcome", NULL};
  static const char *const rule_labels[] = {"rule", NULL};
  in->m_requests = qm_metrics_counter(reg, "qm_intake_requests_total",
                                      "Requests submitted, by origin and outcome (accepted, refused, replayed).",
                                      req_labels);
  in->m_refusals = qm_metrics_counter(reg, "qm_intake_refusals_total",
                                      "Refusals at submit, by the rule that refused.", rule_labels);
  static const char *const line_labels[] = {"kind", "outcome", NULL};
  in->m_lines = qm_metrics_counter(reg, "qm_intake_request_lines_total",
                                   "Request lines submitted, by item kind (access, asset, licence) "
                                   "and outcome (accepted, refused, replayed).",
                                   line_labels);
  in->m_decision = qm_metrics_histogram(reg, "qm_intake_decision_seconds",
                                        "Time from submit to a line's approval or rejection.", NULL,
                                        decision_bounds, QM_ARRAY_LEN(decision_bounds));
  in->m_completion = qm_metrics_histogram(reg, "qm_intake_completion_seconds",
                                          "Time from submit to a line granted or fulfilled.", NULL,
                                          decision_bounds, QM_ARRAY_LEN(decision_bounds));
  pthread_rwlock_init(&in->cat_lock, NULL);
  int wrc = load_watchlist(cfg, &in->watch, errstr, errstr_size);
  if (wrc != QM_OK) {
    pthread_rwlock_destroy(&in->cat_lock);
    free(in);
    return wrc;
  }
  int rc = catalog_load_dir(qm_config_str(cfg, "QM_INTAKE_CATALOG_DIR"), &in->cat, errstr,
                            errstr_size);
  if (rc != QM_OK) {
    char why[1024];
    snprintf(why, sizeof(why), "catalog refused: %s (fix the file; QM_INTAKE_CATALOG_DIR=%s)",
             errstr, qm_config_str(cfg, "QM_INTAKE_CATALOG_DIR"));
    qm_strlcpy(errstr, why, errstr_size);
    goto fail;
  }
  qm_log_info("catalog loaded: %zu items, %zu bundles", in->cat->n_items, in->cat->n_bundles);
  const char *people = qm_config_str(cfg, "QM_INTAKE_PEOPLE_FILE");
  if (*people && (rc = people_seed(in, people, errstr, errstr_size)) != QM_OK) goto fail;
  if ((rc = requests_register(in, errstr, errstr_size)) != QM_OK) goto fail;
  if ((rc = catalog_api_register(in, errstr, errstr_size)) != QM_OK) goto fail;
  if ((rc = people_register(in, errstr, errstr_size)) != QM_OK) goto fail;
  if ((rc = people_ticker_start(in, errstr, errstr_size)) != QM_OK) goto fail;
  *app = in;
  return QM_OK;
fail:
  watchlist_destroy(in->watch);
  catalog_destroy(in->cat);
  pthread_rwlock_destroy(&in->cat_lock);
  free(in);
  return rc;
}

/* SIGHUP: a catalog with any error is refused whole and the old one stays. */
static void reload(qm_service_t *svc, void *app) {
  intake_t *in = app;
  const char *dir = qm_config_str(qm_service_config(svc), "QM_INTAKE_CATALOG_DIR");
  catalog_t *fresh = NULL;
  char errstr[1024];
  if (catalog_load_dir(dir, &fresh, errstr, sizeof(errstr)) != QM_OK) {
    qm_log_error("catalog reload refused, keeping the current catalog: %s", errstr);
    return;
  }
  watchlist_t *wl = NULL;
  if (load_watchlist(qm_service_config(svc), &wl, errstr, sizeof(errstr)) != QM_OK) {
    qm_log_error("watchlist reload refused, keeping the current catalog and watchlist: %s", errstr);
    catalog_destroy(fresh);
    return;
  }
  pthread_rwlock_wrlock(&in->cat_lock);
  catalog_t *old = in->cat;
  watchlist_t *old_wl = in->watch;
  in->cat = fresh;
  in->watch = wl;
  pthread_rwlock_unlock(&in->cat_lock);
  catalog_destroy(old);
  watchlist_destroy(old_wl);
  qm_log_info("catalog reloaded: %zu items, %zu bundles; watchlist: %zu entries", fresh->n_items,
              fresh->n_bundles, wl ? wl->n : 0);
}

static void stop(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  people_ticker_stop(app);
}

static void fini(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  intake_t *in = app;
  catalog_destroy(in->cat);
  watchlist_destroy(in->watch);
  pthread_rwlock_destroy(&in->cat_lock);
  free(in);
}

static const char *const consumes[] = {QM_TOPIC_HR, QM_TOPIC_DECISIONS, QM_TOPIC_ACCESS,
                                       QM_TOPIC_FULFILLMENT};

int main(int argc, char **argv) {
  static const qm_service_def_t def = {
      .name = "intake",
      .default_port = 8081,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .config = config,
      .n_config = QM_ARRAY_LEN(config),
      .init = init,
      .reload = reload,
      .stop = stop,
      .fini = fini,
  };
  return qm_service_main(argc, argv, &def);
}
