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
};

static const qm_cfg_def_t config[] = {
    {"QM_INTAKE_CATALOG_DIR", QM_CFG_STR, "/etc/quartermaster/catalog",
     "Directory of catalog YAML files (catalog as code); SIGHUP reloads it.", 0, 0, 0},
    {"QM_INTAKE_PEOPLE_FILE", QM_CFG_STR, "",
     "JSON file with the initial people directory ({\"people\":[…]}); empty: none.", 0, 0, 0},
    {"QM_INTAKE_MAX_LINES", QM_CFG_INT, "20", "Most lines one request may hold.", 1, 200, 0},
};

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
  pthread_rwlock_init(&in->cat_lock, NULL);
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
  *app = in;
  return QM_OK;
fail:
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
  pthread_rwlock_wrlock(&in->cat_lock);
  catalog_t *old = in->cat;
  in->cat = fresh;
  pthread_rwlock_unlock(&in->cat_lock);
  catalog_destroy(old);
  qm_log_info("catalog reloaded: %zu items, %zu bundles", fresh->n_items, fresh->n_bundles);
}

static void fini(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  intake_t *in = app;
  catalog_destroy(in->cat);
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
      .fini = fini,
  };
  return qm_service_main(argc, argv, &def);
}
