/*
 * inventory: sites (central and regional, with the locations they serve),
 * models with attributes, and assets by tag and serial (both unique) with
 * their status history — and the CSV import of assets.
 *
 * The import is all or nothing: the whole file is parsed with libcsv and
 * every row checked (tag and serial patterns, duplicates within the file and
 * against the inventory, known model and site) before anything is written;
 * any bad row answers 400 naming each bad row by its line and field, and
 * nothing is imported. A good file is inserted in one transaction, its
 * StockLevels published and waiting backorders served from it.
 */
#include "fulfillment.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_log.h"
#include "qm_pg.h"

#include <csv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IMPORT_MAX_ROWS 50000
#define IMPORT_MAX_ERRORS 100

const char *ff_asset_check_tag(const ff_t *ff, const char *tag) {
  if (!tag || !*tag) return "is required";
  if (regexec(&ff->tag_re, tag, 0, NULL, 0) != 0)
    return "does not match the asset tag pattern (QM_ASSET_TAG_PATTERN, e.g. LT-000123)";
  return NULL;
}

const char *ff_asset_check_serial(const ff_t *ff, const char *serial) {
  if (!serial || !*serial) return "is required";
  if (regexec(&ff->serial_re, serial, 0, NULL, 0) != 0)
    return "does not match the serial pattern (QM_ASSET_SERIAL_PATTERN: 4-40 letters, digits, '-')";
  return NULL;
}

/* ---- import ---------------------------------------------------------------- */

enum { COL_TAG, COL_SERIAL, COL_MODEL, COL_SITE, COL_STATUS, NCOLS };
static const char *const col_names[NCOLS] = {"tag", "serial", "model_id", "site_id", "status"};

typedef struct import {
  const ff_t *ff;
  int record;       /* records seen so far (the header is record 1) */
  int col;          /* field index within the current record */
  int map[32];      /* field index -> COL_* (-1 unknown) */
  int nfields;      /* fields of the header */
  char *cur[NCOLS]; /* the current record's values */
  int cur_fields;
  json_t *rows;     /* [{tag, serial, model_id, site_id, status, line}] */
  json_t *errors;   /* [{line, field, reason}] */
  bool header_done;
} import_t;

static void add_error(import_t *im, int line, const char *field, const char *reason) {
  if (json_array_size(im->errors) >= IMPORT_MAX_ERRORS) return;
  json_array_append_new(im->errors,
                        json_pack("{s:i, s:s, s:s}", "line", line, "field", field, "reason", reason));
}

static void on_field(void *s, size_t len, void *data) {
  import_t *im = data;
  char *v = qm_strndup(s ? s : "", s ? len : 0);
  if (!im->header_done) {
    if (im->col < 32) {
      im->map[im->col] = -1;
      for (int c = 0; c < NCOLS; c++)
        if (!strcmp(v, col_names[c])) im->map[im->col] = c;
      if (im->map[im->col] < 0) add_error(im, 1, v, "unknown column (expected tag, serial, model_id, site_id, status)");
    }
    free(v);
  } else if (im->col < 32 && im->col < im->nfields && im->map[im->col] >= 0) {
    free(im->cur[im->map[im->col]]);
    im->cur[im->map[im->col]] = v;
  } else {
    free(v);
  }
  im->col++;
}

static void on_record(int c, void *data) {
  import_t *im = data;
  QM_UNUSED(c);
  im->record++;
  int line = im->record;
  if (!im->header_done) {
    im->header_done = true;
    im->nfields = im->col;
    bool have[NCOLS] = {false};
    for (int i = 0; i < im->col && i < 32; i++)
      if (im->map[i] >= 0) {
        if (have[im->map[i]]) add_error(im, 1, col_names[im->map[i]], "column given twice");
        have[im->map[i]] = true;
      }
    for (int k = 0; k < COL_STATUS; k++)
      if (!have[k]) add_error(im, 1, col_names[k], "required column missing from the header");
  } else if (!(im->col == 1 && (!im->cur[0] || !*im->cur[0]) && !im->cur[1])) {
    if (im->col != im->nfields) {
      char why[96];
      snprintf(why, sizeof(why), "has %d field(s), the header has %d", im->col, im->nfields);
      add_error(im, line, "row", why);
    } else if (json_array_size(im->rows) >= IMPORT_MAX_ROWS) {
      if (json_array_size(im->rows) == IMPORT_MAX_ROWS)
        add_error(im, line, "row", "too many rows: import at most 50000 per file");
    } else {
      const char *why;
      if ((why = ff_asset_check_tag(im->ff, im->cur[COL_TAG]))) add_error(im, line, "tag", why);
      if ((why = ff_asset_check_serial(im->ff, im->cur[COL_SERIAL])))
        add_error(im, line, "serial", why);
      if (!im->cur[COL_MODEL] || !*im->cur[COL_MODEL]) add_error(im, line, "model_id", "is required");
      if (!im->cur[COL_SITE] || !*im->cur[COL_SITE]) add_error(im, line, "site_id", "is required");
      const char *status = im->cur[COL_STATUS] && *im->cur[COL_STATUS] ? im->cur[COL_STATUS] : "in_stock";
      if (strcmp(status, "in_stock") && strcmp(status, "retired"))
        add_error(im, line, "status", "must be in_stock or retired (other states come from fulfilment)");
      json_array_append_new(
          im->rows, json_pack("{s:s, s:s, s:s, s:s, s:s, s:i}", "tag",
                              im->cur[COL_TAG] ? im->cur[COL_TAG] : "", "serial",
                              im->cur[COL_SERIAL] ? im->cur[COL_SERIAL] : "", "model_id",
                              im->cur[COL_MODEL] ? im->cur[COL_MODEL] : "", "site_id",
                              im->cur[COL_SITE] ? im->cur[COL_SITE] : "", "status", status,
                              "line", line));
    }
  }
  for (int k = 0; k < NCOLS; k++) {
    free(im->cur[k]);
    im->cur[k] = NULL;
  }
  im->col = 0;
}

/* Duplicates within the rows: the second and later occurrences are errors. */
static void check_duplicates(import_t *im, const char *field) {
  json_t *seen = json_object();
  size_t i;
  json_t *row;
  json_array_foreach(im->rows, i, row) {
    const char *v = json_string_value(json_object_get(row, field));
    if (!v || !*v) continue;
    json_t *first = json_object_get(seen, v);
    if (first) {
      char why[128];
      snprintf(why, sizeof(why), "'%.60s' repeats line %d", v, (int)json_integer_value(first));
      add_error(im, (int)json_integer_value(json_object_get(row, "line")), field, why);
    } else {
      json_object_set_new(seen, v, json_integer(json_integer_value(json_object_get(row, "line"))));
    }
  }
  json_decref(seen);
}

typedef struct import_tx {
  ff_t *ff;
  import_t *im;
  int64_t imported;
  const char *actor;
  const char *traceparent;
  size_t file_errors; /* errors found in the file itself, before the database */
} import_tx_t;

static int by_line(const void *a, const void *b) {
  json_int_t x = json_integer_value(json_object_get(*(json_t *const *)a, "line"));
  json_int_t y = json_integer_value(json_object_get(*(json_t *const *)b, "line"));
  return x < y ? -1 : x > y;
}

/* Orders the errors by line (stable enough: each line's own order kept by field). */
static void sort_errors(import_t *im) {
  size_t n = json_array_size(im->errors);
  json_t **v = qm_calloc(n ? n : 1, sizeof(*v));
  for (size_t i = 0; i < n; i++) v[i] = json_incref(json_array_get(im->errors, i));
  qsort(v, n, sizeof(*v), by_line);
  json_array_clear(im->errors);
  for (size_t i = 0; i < n; i++) json_array_append_new(im->errors, v[i]);
  free(v);
}

/* Checks the rows against the inventory (model, site, taken tag or serial),
 * then, when every row is good, inserts them all. Errors found here are
 * added to im->errors and nothing is written (QM_EINVAL). */
static int import_apply(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                        size_t errstr_size) {
  QM_UNUSED(svc);
  import_tx_t *it = ctx;
  import_t *im = it->im;
  while (json_array_size(im->errors) > it->file_errors) /* a retried transaction */
    json_array_remove(im->errors, json_array_size(im->errors) - 1);
  char *rows = json_dumps(im->rows, JSON_COMPACT);
  qm_pg_param_t p[] = {QM_PG_TEXT(rows)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(
      tx,
      "SELECT r.line, f.field, f.reason FROM json_to_recordset($1::json)"
      "  AS r(tag text, serial text, model_id text, site_id text, line int),"
      " LATERAL (VALUES"
      "  ('model_id', CASE WHEN NOT EXISTS (SELECT 1 FROM models m WHERE m.model_id = r.model_id)"
      "   THEN 'unknown model ''' || r.model_id || '''' END),"
      "  ('site_id', CASE WHEN NOT EXISTS (SELECT 1 FROM sites s WHERE s.site_id = r.site_id)"
      "   THEN 'unknown site ''' || r.site_id || '''' END),"
      "  ('tag', CASE WHEN EXISTS (SELECT 1 FROM assets a WHERE a.tag = r.tag)"
      "   THEN 'tag ''' || r.tag || ''' is already in the inventory' END),"
      "  ('serial', CASE WHEN EXISTS (SELECT 1 FROM assets a WHERE a.serial = r.serial)"
      "   THEN 'serial ''' || r.serial || ''' is already in the inventory' END)) f(field, reason)"
      " WHERE f.reason IS NOT NULL AND r.model_id <> '' AND r.site_id <> ''"
      " ORDER BY r.line, f.field",
      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  if (json_array_size(im->errors) >= IMPORT_MAX_ERRORS) goto checked;
  for (int i = 0; i < qm_pg_ntuples(res); i++) {
    int64_t line = 0;
    qm_pg_get_int64(res, i, 0, &line);
    add_error(im, (int)line, qm_pg_get(res, i, 1), qm_pg_get(res, i, 2));
  }
checked:
  qm_pg_result_destroy(res);
  res = NULL;
  if (json_array_size(im->errors) > 0) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "bad rows");
    goto out;
  }
  qm_pg_param_t q[] = {QM_PG_TEXT(rows), QM_PG_TEXT(it->actor)};
  rc = qm_pg_exec(tx,
                  "WITH ins AS (INSERT INTO assets (tag, serial, model_id, site_id, status)"
                  "  SELECT tag, serial, model_id, site_id, status FROM json_to_recordset($1::json)"
                  "  AS r(tag text, serial text, model_id text, site_id text, status text, line int)"
                  "  ORDER BY line RETURNING asset_id, model_id, site_id, status),"
                  " h AS (INSERT INTO asset_history (asset_id, status, actor, note)"
                  "  SELECT asset_id, status, $2, 'imported' FROM ins)"
                  " SELECT model_id, site_id, count(*) FROM ins GROUP BY 1, 2 ORDER BY 1, 2",
                  q, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  it->imported = 0;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    int64_t n = 0;
    qm_pg_get_int64(res, i, 2, &n);
    it->imported += n;
    rc = ff_emit_stock(it->ff, tx, qm_pg_get(res, i, 0), qm_pg_get(res, i, 1), it->traceparent,
                       errstr, errstr_size);
    if (rc == QM_OK && (i == 0 || strcmp(qm_pg_get(res, i, 0), qm_pg_get(res, i - 1, 0))))
      rc = ff_allocate_backorders(it->ff, tx, qm_pg_get(res, i, 0), NULL, errstr, errstr_size);
  }
out:
  qm_pg_result_destroy(res);
  free(rows);
  return rc;
}

/* Answers for a finished import: 201 {imported}, or 400 naming each bad line. */
static void import_finish(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, import_t *im) {
  if (json_array_size(im->errors) == 0 && json_array_size(im->rows) == 0)
    add_error(im, im->record > 0 ? im->record : 1, "row", "no asset rows to import");
  check_duplicates(im, "tag");
  check_duplicates(im, "serial");
  import_tx_t it = {.ff = ff, .im = im, .actor = qm_http_req_principal(req)->sub,
                    .traceparent = qm_http_req_traceparent(req),
                    .file_errors = json_array_size(im->errors)};
  char errstr[512] = "";
  /* The inventory checks run even when the file has errors already, so one
   * answer names every bad line; nothing is written unless all are good. */
  int rc = json_array_size(im->rows) == 0
               ? QM_EINVAL
               : qm_service_tx(ff->svc, 10000, import_apply, &it, errstr, sizeof(errstr));
  if (rc == QM_OK) {
    qm_log(QM_LOG_INFO, qm_http_req_id(req), qm_http_req_trace_id(req), "%lld asset(s) imported",
           (long long)it.imported);
    qm_http_resp_json(resp, 201, json_pack("{s:I}", "imported", (json_int_t)it.imported));
    return;
  }
  if (rc == QM_EDUP) { /* a concurrent import took a tag or serial between check and insert */
    qm_http_problem(resp, 409, "conflict", "Tag or serial taken meanwhile",
                    "another import added one of these tags or serials; send the file again");
    return;
  }
  if (rc != QM_EINVAL) {
    qm_api_db_error(req, resp, "importing assets", errstr);
    return;
  }
  sort_errors(im);
  qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid asset rows");
  char detail[160];
  snprintf(detail, sizeof(detail),
           "%zu problem(s) found; nothing was imported. Fix the lines named and send the whole "
           "file again.",
           json_array_size(im->errors));
  qm_problem_detail(pb, detail);
  size_t i;
  json_t *e;
  json_array_foreach(im->errors, i, e) {
    char field[96], reason[400];
    snprintf(field, sizeof(field), "line %d: %s", (int)json_integer_value(json_object_get(e, "line")),
             json_string_value(json_object_get(e, "field")));
    snprintf(reason, sizeof(reason), "%s", json_string_value(json_object_get(e, "reason")));
    qm_problem_field(pb, field, reason);
  }
  qm_problem_extension(pb, "lines", json_incref(im->errors));
  qm_http_resp_problem(resp, pb);
}

static void import_free(import_t *im) {
  for (int k = 0; k < NCOLS; k++) free(im->cur[k]);
  json_decref(im->rows);
  json_decref(im->errors);
}

/* POST /v1/assets/import — text/csv: header tag,serial,model_id,site_id[,status]. */
static void import_csv(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  size_t len = 0;
  const char *body = qm_http_req_body(req, &len);
  import_t im = {.ff = ff, .rows = json_array(), .errors = json_array()};
  struct csv_parser p;
  if (csv_init(&p, CSV_STRICT | CSV_APPEND_NULL | CSV_STRICT_FINI) != 0) {
    qm_http_problem(resp, 503, "unavailable", "Out of memory", NULL);
    import_free(&im);
    return;
  }
  size_t used = len ? csv_parse(&p, body, len, on_field, on_record, &im) : 0;
  if (used != len || csv_fini(&p, on_field, on_record, &im) != 0) {
    char why[160];
    snprintf(why, sizeof(why), "malformed CSV after record %d: %s", im.record,
             csv_strerror(csv_error(&p)));
    add_error(&im, im.record + 1, "row", why);
  }
  csv_free(&p);
  import_finish(ff, req, resp, &im);
  import_free(&im);
}

/* POST /v1/assets — one asset, through the same checks as an import. */
static void add_asset(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  import_t im = {.ff = ff, .rows = json_array(), .errors = json_array(), .header_done = true};
  im.record = 1;
  im.col = 4;
  im.nfields = 4;
  const char *names[] = {"tag", "serial", "model_id", "site_id"};
  for (int k = 0; k < 4; k++) {
    json_t *v = json_object_get(b, names[k]);
    im.cur[k] = qm_strdup(json_is_string(v) ? json_string_value(v) : "");
  }
  on_record(0, &im);
  /* Report the fields by name, not by line, for a single asset. */
  size_t i;
  json_t *e;
  if (json_array_size(im.errors)) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid asset");
    json_array_foreach(im.errors, i, e)
      qm_problem_field(pb, json_string_value(json_object_get(e, "field")),
                       json_string_value(json_object_get(e, "reason")));
    qm_http_resp_problem(resp, pb);
  } else {
    import_finish(ff, req, resp, &im);
  }
  import_free(&im);
}

/* ---- sites and models -------------------------------------------------------- */

typedef struct upsert {
  const char *sql;
  qm_pg_param_t p[8];
  int n;
  json_t *out;
} upsert_t;

static int run_upsert(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                      size_t errstr_size) {
  QM_UNUSED(svc);
  upsert_t *u = ctx;
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, u->sql, u->p, u->n, &res, errstr, errstr_size);
  if (rc == QM_OK && qm_pg_ntuples(res) == 1) u->out = json_loads(qm_pg_get(res, 0, 0), 0, NULL);
  qm_pg_result_destroy(res);
  return rc;
}

static void finish_upsert(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, upsert_t *u) {
  char errstr[512] = "";
  int rc = qm_service_tx(ff->svc, 5000, run_upsert, u, errstr, sizeof(errstr));
  if (rc == QM_OK && u->out) qm_http_resp_json(resp, 200, u->out);
  else if (rc == QM_EINVAL)
    qm_http_problem(resp, 400, "validation", "Invalid value", errstr);
  else qm_api_db_error(req, resp, "saving", errstr);
}

/* PUT /v1/sites/{id} {name, kind: central|regional, country, locations: [..]} */
static void put_site(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  const char *name = ff_json_str(b, "name", true, &pb);
  const char *kind = ff_json_str(b, "kind", true, &pb);
  const char *country = ff_json_str(b, "country", false, &pb);
  json_t *locs = json_object_get(b, "locations");
  if (kind && strcmp(kind, "central") && strcmp(kind, "regional"))
    qm_api_field_error(&pb, "kind", "must be central or regional");
  if (locs && !json_is_array(locs)) qm_api_field_error(&pb, "locations", "must be a list of location names");
  size_t i;
  json_t *l;
  if (json_is_array(locs))
    json_array_foreach(locs, i, l) if (!json_is_string(l))
      qm_api_field_error(&pb, "locations", "every location must be a string");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  char *ls = json_is_array(locs) ? json_dumps(locs, JSON_COMPACT) : qm_strdup("[]");
  upsert_t u = {.sql = "INSERT INTO sites (site_id, name, kind, country, locations)"
                       " VALUES ($1, $2, $3, $4, ARRAY(SELECT json_array_elements_text($5::json)))"
                       " ON CONFLICT (site_id) DO UPDATE SET name = EXCLUDED.name,"
                       " kind = EXCLUDED.kind, country = EXCLUDED.country,"
                       " locations = EXCLUDED.locations, updated_at = now()"
                       " RETURNING json_build_object('site_id', site_id, 'name', name, 'kind', kind,"
                       " 'country', country, 'locations', locations)::text",
                .n = 5};
  u.p[0] = QM_PG_TEXT(qm_http_req_param(req, "id"));
  u.p[1] = QM_PG_TEXT(name);
  u.p[2] = QM_PG_TEXT(kind);
  u.p[3] = QM_PG_TEXT(country ? country : "");
  u.p[4] = QM_PG_TEXT(ls);
  finish_upsert(ff, req, resp, &u);
  free(ls);
}

/* PUT /v1/models/{id} {name, item_type, cost, complex, loaner, attributes} */
static void put_model(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  const char *name = ff_json_str(b, "name", true, &pb);
  const char *type = ff_json_str(b, "item_type", true, &pb);
  json_t *cost = json_object_get(b, "cost"), *attrs = json_object_get(b, "attributes");
  json_t *complex = json_object_get(b, "complex"), *loaner = json_object_get(b, "loaner");
  if (cost && (!json_is_number(cost) || json_number_value(cost) < 0))
    qm_api_field_error(&pb, "cost", "must be a number >= 0");
  if (attrs && !json_is_object(attrs)) qm_api_field_error(&pb, "attributes", "must be an object");
  if (complex && !json_is_boolean(complex)) qm_api_field_error(&pb, "complex", "must be true or false");
  if (loaner && !json_is_boolean(loaner)) qm_api_field_error(&pb, "loaner", "must be true or false");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  char cost_s[64];
  snprintf(cost_s, sizeof(cost_s), "%.2f", cost ? json_number_value(cost) : 0.0);
  char *as = attrs ? json_dumps(attrs, JSON_COMPACT) : qm_strdup("{}");
  upsert_t u = {.sql = "INSERT INTO models (model_id, name, item_type, cost, complex, loaner,"
                       " attributes) VALUES ($1, $2, $3, $4::numeric, $5::boolean, $6::boolean,"
                       " $7::jsonb) ON CONFLICT (model_id) DO UPDATE SET name = EXCLUDED.name,"
                       " item_type = EXCLUDED.item_type, cost = EXCLUDED.cost,"
                       " complex = EXCLUDED.complex, loaner = EXCLUDED.loaner,"
                       " attributes = EXCLUDED.attributes, updated_at = now()"
                       " RETURNING json_build_object('model_id', model_id, 'name', name,"
                       " 'item_type', item_type, 'cost', cost, 'complex', complex, 'loaner', loaner,"
                       " 'attributes', attributes)::text",
                .n = 7};
  u.p[0] = QM_PG_TEXT(qm_http_req_param(req, "id"));
  u.p[1] = QM_PG_TEXT(name);
  u.p[2] = QM_PG_TEXT(type);
  u.p[3] = QM_PG_TEXT(cost_s);
  u.p[4] = QM_PG_TEXT(json_is_true(complex) ? "true" : "false");
  u.p[5] = QM_PG_TEXT(json_is_true(loaner) ? "true" : "false");
  u.p[6] = QM_PG_TEXT(as);
  finish_upsert(ff, req, resp, &u);
  free(as);
}

/* ---- queries ------------------------------------------------------------------- */

static void list_sites(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_api_list(ctx, req, resp, 100, 500,
              "SELECT rn, j FROM (SELECT row_number() OVER (ORDER BY site_id) rn,"
              " json_build_object('site_id', site_id, 'name', name, 'kind', kind, 'country', country,"
              " 'locations', locations)::text j FROM sites) s WHERE rn > $1::bigint ORDER BY rn"
              " LIMIT $2::int",
              NULL, 0);
}

static void list_models(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_api_list(ctx, req, resp, 100, 500,
              "SELECT rn, j FROM (SELECT row_number() OVER (ORDER BY model_id) rn,"
              " json_build_object('model_id', model_id, 'name', name, 'item_type', item_type,"
              " 'cost', cost, 'complex', complex, 'loaner', loaner, 'attributes', attributes)::text j"
              " FROM models) s WHERE rn > $1::bigint ORDER BY rn LIMIT $2::int",
              NULL, 0);
}

#define ASSET_JSON                                                                          \
  "json_build_object('tag', a.tag, 'serial', a.serial, 'model_id', a.model_id, 'site_id',"  \
  " a.site_id, 'status', a.status, 'assigned_to', a.assigned_to, 'request_id', a.request_id," \
  " 'line_no', a.line_no, 'updated_at', a.updated_at)"

/* GET /v1/assets?model_id=&site_id=&status=&assigned_to= */
static void list_assets(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_pg_param_t p[] = {QM_PG_TEXT(qm_http_req_query(req, "model_id")),
                       QM_PG_TEXT(qm_http_req_query(req, "site_id")),
                       QM_PG_TEXT(qm_http_req_query(req, "status")),
                       QM_PG_TEXT(qm_http_req_query(req, "assigned_to"))};
  ff_api_list(ctx, req, resp, 100, 1000,
              "SELECT a.asset_id, " ASSET_JSON "::text FROM assets a WHERE a.asset_id > $1::bigint"
              " AND ($3::text IS NULL OR a.model_id = $3) AND ($4::text IS NULL OR a.site_id = $4)"
              " AND ($5::text IS NULL OR a.status = $5) AND ($6::text IS NULL OR a.assigned_to = $6)"
              " ORDER BY a.asset_id LIMIT $2::int",
              p, 4);
}

/* GET /v1/assets/{tag} — the asset and its status history. */
static void get_asset(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  qm_pg_param_t p[] = {QM_PG_TEXT(qm_http_req_param(req, "tag"))};
  qm_pg_result_t *res = NULL;
  if (!qm_api_query(req, resp, qm_service_pool(ff->svc), "reading an asset",
                      "SELECT (" ASSET_JSON "::jsonb || jsonb_build_object('history',"
                      " (SELECT coalesce(jsonb_agg(jsonb_build_object('status', h.status,"
                      " 'person_id', h.person_id, 'request_id', h.request_id, 'actor', h.actor,"
                      " 'note', h.note, 'at', h.at) ORDER BY h.seq), '[]') FROM asset_history h"
                      " WHERE h.asset_id = a.asset_id)))::text FROM assets a"
                      " WHERE a.tag = $1 OR a.serial = $1",
                      p, 1, &res))
    return;
  if (qm_pg_ntuples(res) == 0)
    qm_http_problem(resp, 404, "not-found", "No such asset", "no asset has this tag or serial");
  else qm_http_resp_json(resp, 200, json_loads(qm_pg_get(res, 0, 0), 0, NULL));
  qm_pg_result_destroy(res);
}

/* GET /v1/stock?model_id= — per model and site: available, reserved and on the
 * way, on order, estimated delivery of the next purchase order. */
static void get_stock(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  qm_pg_param_t p[] = {QM_PG_TEXT(qm_http_req_query(req, "model_id"))};
  qm_pg_result_t *res = NULL;
  if (!qm_api_query(
      req, resp, qm_service_pool(ff->svc), "reading stock",
      "SELECT coalesce(json_agg(json_build_object('model_id', k.model_id, 'site_id', k.site_id,"
      " 'available', (SELECT count(*) FROM assets a WHERE a.model_id = k.model_id"
      "  AND a.site_id = k.site_id AND a.status = 'in_stock'),"
      " 'committed', (SELECT count(*) FROM assets a WHERE a.model_id = k.model_id"
      "  AND a.site_id = k.site_id AND a.status IN ('reserved', 'staging', 'shipped')),"
      " 'on_order', (SELECT coalesce(sum(quantity), 0) FROM purchase_orders o"
      "  WHERE o.model_id = k.model_id AND o.site_id = k.site_id"
      "  AND o.status IN ('new', 'sent', 'confirmed', 'shipped')),"
      " 'estimated_delivery_ms', (SELECT min(eta_ms) FILTER (WHERE eta_ms > 0) FROM purchase_orders o"
      "  WHERE o.model_id = k.model_id AND o.site_id = k.site_id"
      "  AND o.status IN ('new', 'sent', 'confirmed', 'shipped')))"
      " ORDER BY k.model_id, k.site_id), '[]')::text FROM (SELECT model_id, site_id FROM assets"
      "  UNION SELECT model_id, site_id FROM purchase_orders) k"
      " WHERE $1::text IS NULL OR k.model_id = $1",
      p, 1, &res))
    return;
  qm_http_resp_json(resp, 200, qm_api_list(json_loads(qm_pg_get(res, 0, 0), 0, NULL), NULL));
  qm_pg_result_destroy(res);
}


/* ---- seed file ------------------------------------------------------------------ */

typedef struct seed_tx {
  ff_t *ff;
  json_t *doc;
  import_t *im;
  int64_t sites, models, assets;
} seed_tx_t;

/* Runs sql (one JSON parameter, one count(*) row) and stores the count. */
static int exec_count(qm_pg_t *tx, const char *sql, const char *json, int64_t *out, char *errstr,
                      size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(json ? json : "[]")};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, sql, p, 1, &res, errstr, errstr_size);
  if (rc == QM_OK) qm_pg_get_int64(res, 0, 0, out);
  qm_pg_result_destroy(res);
  return rc;
}

static int seed_apply(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                      size_t errstr_size) {
  QM_UNUSED(svc);
  seed_tx_t *sd = ctx;
  char *sites = json_dumps(json_object_get(sd->doc, "sites"), JSON_COMPACT);
  char *models = json_dumps(json_object_get(sd->doc, "models"), JSON_COMPACT);
  char *rows = json_dumps(sd->im->rows, JSON_COMPACT);
  /* Only what is not known yet: a restart never overwrites what IT staff
   * changed through the API. */
  int rc = exec_count(tx,
                      "WITH i AS (INSERT INTO sites (site_id, name, kind, country, locations)"
                      " SELECT s->>'site_id', coalesce(s->>'name', s->>'site_id'), s->>'kind',"
                      "  coalesce(s->>'country', ''),"
                      "  ARRAY(SELECT json_array_elements_text(coalesce(s->'locations', '[]')))"
                      " FROM json_array_elements($1::json) s ON CONFLICT (site_id) DO NOTHING"
                      " RETURNING 1) SELECT count(*) FROM i",
                      sites, &sd->sites, errstr, errstr_size);
  if (rc == QM_OK)
    rc = exec_count(tx,
                    "WITH i AS (INSERT INTO models (model_id, name, item_type, cost, complex, loaner,"
                    " attributes) SELECT m->>'model_id', coalesce(m->>'name', m->>'model_id'),"
                    " m->>'item_type', coalesce((m->>'cost')::numeric, 0),"
                    " coalesce((m->>'complex')::boolean, false), coalesce((m->>'loaner')::boolean, false),"
                    " coalesce((m->'attributes')::jsonb, '{}') FROM json_array_elements($1::json) m"
                    " ON CONFLICT (model_id) DO NOTHING RETURNING 1) SELECT count(*) FROM i",
                    models, &sd->models, errstr, errstr_size);
  if (rc == QM_OK)
    rc = exec_count(tx,
                    "WITH ins AS (INSERT INTO assets (tag, serial, model_id, site_id, status)"
                    "  SELECT tag, serial, model_id, site_id, status FROM json_to_recordset($1::json)"
                    "  AS r(tag text, serial text, model_id text, site_id text, status text, line int)"
                    "  ORDER BY line ON CONFLICT DO NOTHING RETURNING asset_id, model_id, site_id, status),"
                    " h AS (INSERT INTO asset_history (asset_id, status, actor, note)"
                    "  SELECT asset_id, status, 'seed', 'seeded' FROM ins),"
                    " c AS (INSERT INTO stock_changes (model_id, site_id)"
                    "  SELECT DISTINCT model_id, site_id FROM ins)"
                    " SELECT count(*) FROM ins",
                    rows, &sd->assets, errstr, errstr_size);
  free(sites);
  free(models);
  free(rows);
  if (rc == QM_EINVAL || rc == QM_EDUP) { /* bad data in the seed: a configuration error */
    char why[512];
    qm_strlcpy(why, errstr, sizeof(why));
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "QM_FULFILLMENT_INVENTORY_FILE: %s", why);
  }
  return rc;
}

int ff_inventory_seed(ff_t *ff, const char *path, char *errstr, size_t errstr_size) {
  json_error_t jerr;
  json_t *doc = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
  int rc = QM_OK;
  char *csv = NULL;
  import_t im = {.ff = ff, .rows = json_array(), .errors = json_array()};
  if (!json_is_object(doc)) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "QM_FULFILLMENT_INVENTORY_FILE %s: %s (line %d)",
                path, doc ? "not a JSON object" : jerr.text, jerr.line);
    goto out;
  }
  const char *assets = json_string_value(json_object_get(doc, "assets_csv"));
  if (assets && *assets) {
    /* Relative to the seed file's directory. */
    char full[4096];
    const char *slash = strrchr(path, '/');
    if (assets[0] == '/' || !slash) snprintf(full, sizeof(full), "%s", assets);
    else snprintf(full, sizeof(full), "%.*s/%s", (int)(slash - path), path, assets);
    FILE *f = fopen(full, "rb");
    if (!f) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "QM_FULFILLMENT_INVENTORY_FILE: cannot read %s",
                  full);
      goto out;
    }
    size_t cap = 1 << 16, len = 0, n;
    csv = qm_malloc(cap);
    while ((n = fread(csv + len, 1, cap - len, f)) > 0) {
      len += n;
      if (len == cap) csv = qm_realloc(csv, cap *= 2);
    }
    fclose(f);
    struct csv_parser p;
    csv_init(&p, CSV_STRICT | CSV_APPEND_NULL | CSV_STRICT_FINI);
    if (csv_parse(&p, csv, len, on_field, on_record, &im) != len ||
        csv_fini(&p, on_field, on_record, &im) != 0)
      add_error(&im, im.record + 1, "row", "malformed CSV");
    csv_free(&p);
    check_duplicates(&im, "tag");
    check_duplicates(&im, "serial");
    if (json_array_size(im.errors)) {
      json_t *e = json_array_get(im.errors, 0);
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s line %d: %s %s (%zu problem(s))", full,
                  (int)json_integer_value(json_object_get(e, "line")),
                  json_string_value(json_object_get(e, "field")),
                  json_string_value(json_object_get(e, "reason")), json_array_size(im.errors));
      goto out;
    }
  }
  seed_tx_t sd = {.ff = ff, .doc = doc, .im = &im};
  rc = qm_service_tx(ff->svc, 30000, seed_apply, &sd, errstr, errstr_size);
  if (rc == QM_OK)
    qm_log_info("inventory seed %s: %lld site(s), %lld model(s), %lld asset(s) new", path,
                (long long)sd.sites, (long long)sd.models, (long long)sd.assets);
out:
  free(csv);
  import_free(&im);
  json_decref(doc);
  return rc;
}

int ff_inventory_register(ff_t *ff, char *errstr, size_t errstr_size) {
  static const char *const admin[] = {"it_admin", NULL};
  qm_http_server_t *h = qm_service_http(ff->svc);
  int rc = QM_OK;
  if (!rc) rc = qm_http_route(h, "PUT", "/v1/sites/{id}", put_site, ff, 0, admin);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/sites", list_sites, ff, 0, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "PUT", "/v1/models/{id}", put_model, ff, 0, admin);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/models", list_models, ff, 0, NULL);
  if (!rc) rc = qm_http_route(h, "POST", "/v1/assets", add_asset, ff, 0, admin);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/assets/import", import_csv, ff, QM_HTTP_ANY_BODY, admin);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/assets", list_assets, ff, 0, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/assets/{tag}", get_asset, ff, 0, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/stock", get_stock, ff, 0, NULL);
  if (rc) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register inventory routes");
  return QM_OK;
}
