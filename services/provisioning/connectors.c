/*
 * connectors: the directories one deployment provisions into. Connector
 * "scim-main" comes from QM_SCIM_*; more instances (SCIM or LDAP) come from
 * the JSON file QM_CONNECTORS_FILE, so one deployment can serve several
 * directories and each catalog role names its connector:
 *
 *   {"connectors": {
 *     "ldap-corp": {"type": "ldap", "url": "ldap://dc1:389",
 *                   "bind_dn": "cn=qm,ou=svc,dc=corp", "bind_password_env": "LDAP_PW",
 *                   "user_base": "ou=people,dc=corp", "user_attr": "uid",
 *                   "group_base": "ou=groups,dc=corp", "group_attr": "cn",
 *                   "member_attr": "member", "placeholder_dn": "cn=empty,dc=corp",
 *                   "drift_repair": true},
 *     "scim-entra": {"type": "scim", "url": "https://graph…/scim?aadOptscim062020",
 *                    "token_env": "ENTRA_TOKEN", "dialect": "entra"}}}
 *
 * Secrets are given by the name of an environment variable (*_env), so the
 * file itself can live in a ConfigMap. Every call below is idempotent and
 * thread-safe, as the clients underneath are.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

static const char *jstr(const json_t *o, const char *k) {
  return json_string_value(json_object_get(o, k));
}

/* A secret: the value of the variable named by "<k>_env", else "<k>". */
static const char *secret(const json_t *o, const char *k) {
  char envk[64];
  snprintf(envk, sizeof(envk), "%s_env", k);
  const char *var = jstr(o, envk);
  if (var && *var) return getenv(var);
  return jstr(o, k);
}

static int add_scim(prov_t *prov, const char *name, const char *url, const char *token,
                    const char *dialect, const char *ca_file, int64_t timeout_ms,
                    int64_t retry_after_max_ms, char *errstr, size_t errstr_size) {
  /* The backoff cap only ever binds a Retry-After (3 attempts of exponential
   * backoff from 200 ms stay far below it): a directory that asks for a
   * minute's rest gets it, up to the configured bound. */
  qm_scim_config_t sc = {
      .base_url = url,
      .bearer_token = token,
      .ca_file = ca_file && *ca_file ? ca_file : NULL,
      .total_timeout_ms = (int)timeout_ms,
      .max_attempts = 3,
      .backoff_max_ms = (int)retry_after_max_ms,
  };
  if (qm_scim_dialect_parse(dialect ? dialect : "generic", &sc.dialect) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "connector %s: dialect '%s' is not generic, okta or entra", name, dialect);
  char e[512];
  qm_scim_t *scim = qm_scim_new(&sc, e, sizeof(e));
  if (!scim) return qm_err(errstr, errstr_size, QM_EINVAL, "connector %s: %s", name, e);
  prov_conn_t *c = &prov->conns[prov->n_conns++];
  c->name = qm_strdup(name);
  c->kind = PROV_CONN_SCIM;
  c->scim = scim;
  c->drift_repair = -1;
  return QM_OK;
}

static int add_from_json(prov_t *prov, const char *name, const json_t *o, int64_t def_timeout,
                         char *errstr, size_t errstr_size) {
  if (prov->n_conns >= PROV_MAX_CONNECTORS)
    return qm_err(errstr, errstr_size, QM_EINVAL, "more than %d connectors",
                  PROV_MAX_CONNECTORS);
  if (prov_conn_find(prov, name))
    return qm_err(errstr, errstr_size, QM_EINVAL, "connector %s is defined twice", name);
  const char *type = jstr(o, "type");
  json_int_t tmo = json_integer_value(json_object_get(o, "timeout_ms"));
  if (tmo <= 0) tmo = def_timeout;
  int rc;
  if (type && !strcmp(type, "scim")) {
    json_int_t ra = json_integer_value(json_object_get(o, "retry_after_max_ms"));
    rc = add_scim(prov, name, jstr(o, "url"), secret(o, "token"), jstr(o, "dialect"),
                  jstr(o, "ca_file"), tmo,
                  ra > 0 ? ra : qm_config_ms(qm_service_config(prov->svc), "QM_SCIM_RETRY_AFTER_MAX"),
                  errstr, errstr_size);
  } else if (type && !strcmp(type, "ldap")) {
    json_t *ph = json_object_get(o, "placeholder_dn");
    qm_ldap_config_t lc = {
        .url = jstr(o, "url"),
        .bind_dn = jstr(o, "bind_dn"),
        .bind_password = secret(o, "bind_password"),
        .user_base = jstr(o, "user_base"),
        .user_attr = jstr(o, "user_attr"),
        .group_base = jstr(o, "group_base"),
        .group_attr = jstr(o, "group_attr"),
        .member_attr = jstr(o, "member_attr"),
        .placeholder_dn = json_is_string(ph) ? json_string_value(ph) : NULL,
        .ca_file = jstr(o, "ca_file"),
        .timeout_ms = (int)tmo,
        .pool_size = (int)json_integer_value(json_object_get(o, "pool_size")),
    };
    char e[512];
    qm_ldap_t *ldap = qm_ldap_new(&lc, e, sizeof(e));
    if (!ldap) return qm_err(errstr, errstr_size, QM_EINVAL, "connector %s: %s", name, e);
    prov_conn_t *c = &prov->conns[prov->n_conns++];
    c->name = qm_strdup(name);
    c->kind = PROV_CONN_LDAP;
    c->ldap = ldap;
    c->drift_repair = -1;
    rc = QM_OK;
  } else {
    return qm_err(errstr, errstr_size, QM_EINVAL, "connector %s: type must be scim or ldap",
                  name);
  }
  if (rc == QM_OK) {
    json_t *dr = json_object_get(o, "drift_repair");
    if (json_is_boolean(dr)) prov->conns[prov->n_conns - 1].drift_repair = json_is_true(dr);
  }
  return rc;
}

int prov_connectors_load(prov_t *prov, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(prov->svc);
  int64_t tmo = qm_config_ms(cfg, "QM_SCIM_TIMEOUT");
  const char *file = qm_config_str(cfg, "QM_CONNECTORS_FILE");
  int rc = QM_OK;
  if (file && *file) {
    json_error_t je;
    json_t *doc = json_load_file(file, 0, &je);
    if (!doc)
      return qm_err(errstr, errstr_size, QM_EINVAL,
                    "invalid configuration: QM_CONNECTORS_FILE %s: %s (line %d)", file, je.text,
                    je.line);
    json_t *conns = json_object_get(doc, "connectors");
    if (!json_is_object(conns)) {
      json_decref(doc);
      return qm_err(errstr, errstr_size, QM_EINVAL,
                    "invalid configuration: QM_CONNECTORS_FILE %s: no \"connectors\" object", file);
    }
    const char *name;
    json_t *o;
    json_object_foreach(conns, name, o) {
      rc = add_from_json(prov, name, o, tmo, errstr, errstr_size);
      if (rc != QM_OK) break;
    }
    json_decref(doc);
    if (rc != QM_OK) {
      prov_connectors_free(prov);
      return rc;
    }
  }
  if (!prov_conn_find(prov, "scim-main")) {
    const char *ca = qm_config_str(cfg, "QM_SCIM_CA_FILE");
    rc = add_scim(prov, "scim-main", qm_config_str(cfg, "QM_SCIM_URL"),
                  qm_config_str(cfg, "QM_SCIM_TOKEN"), qm_config_str(cfg, "QM_SCIM_DIALECT"), ca,
                  tmo, qm_config_ms(cfg, "QM_SCIM_RETRY_AFTER_MAX"), errstr, errstr_size);
    if (rc != QM_OK) prov_connectors_free(prov);
  }
  if (rc == QM_OK)
    for (size_t i = 0; i < prov->n_conns; i++)
      qm_log_info("connector %s: %s", prov->conns[i].name,
                  prov->conns[i].kind == PROV_CONN_SCIM ? "SCIM 2.0" : "LDAP");
  return rc;
}

void prov_connectors_free(prov_t *prov) {
  for (size_t i = 0; i < prov->n_conns; i++) {
    qm_scim_destroy(prov->conns[i].scim);
    qm_ldap_destroy(prov->conns[i].ldap);
    free(prov->conns[i].name);
  }
  memset(prov->conns, 0, sizeof(prov->conns));
  prov->n_conns = 0;
}

prov_conn_t *prov_conn_find(prov_t *prov, const char *name) {
  for (size_t i = 0; i < prov->n_conns; i++)
    if (!strcmp(prov->conns[i].name, name)) return &prov->conns[i];
  return NULL;
}

int prov_conn_find_user(prov_conn_t *c, const char *username, char *id, size_t id_size, char *why,
                        size_t why_size) {
  return c->kind == PROV_CONN_SCIM
             ? qm_scim_find_user(c->scim, username, id, id_size, why, why_size)
             : qm_ldap_find_user(c->ldap, username, id, id_size, why, why_size);
}

int prov_conn_find_group(prov_conn_t *c, const char *name, char *id, size_t id_size, char *why,
                         size_t why_size) {
  return c->kind == PROV_CONN_SCIM
             ? qm_scim_find_group(c->scim, name, id, id_size, why, why_size)
             : qm_ldap_find_group(c->ldap, name, id, id_size, why, why_size);
}

int prov_conn_add(prov_conn_t *c, const char *group_id, const char *const *user_ids, size_t n,
                  char *why, size_t why_size) {
  if (c->kind == PROV_CONN_LDAP)
    return qm_ldap_add_members(c->ldap, group_id, user_ids, n, why, why_size);
  if (n == 1) return qm_scim_add_member(c->scim, group_id, user_ids[0], why, why_size);
  return qm_scim_add_members(c->scim, group_id, user_ids, n, why, why_size);
}

int prov_conn_remove(prov_conn_t *c, const char *group_id, const char *user_id, char *why,
                     size_t why_size) {
  return c->kind == PROV_CONN_SCIM
             ? qm_scim_remove_member(c->scim, group_id, user_id, why, why_size)
             : qm_ldap_remove_member(c->ldap, group_id, user_id, why, why_size);
}

void prov_conn_norm_id(const prov_conn_t *c, const char *id, char *out, size_t out_size) {
  qm_strlcpy(out, id, out_size);
  if (c->kind == PROV_CONN_LDAP)
    for (char *p = out; *p; p++) *p = (char)tolower((unsigned char)*p);
}

typedef struct list_ctx {
  const prov_conn_t *c;
  json_t *members;
} list_ctx_t;

static int on_scim_member(void *ctx, const char *value, const char *display, const char *type) {
  QM_UNUSED(display);
  list_ctx_t *lc = ctx;
  if (type && strcmp(type, "User") != 0) return 0; /* nested groups are not grants */
  json_object_set_new(lc->members, value, json_true());
  return 0;
}

static int on_ldap_member(void *ctx, const char *dn) {
  list_ctx_t *lc = ctx;
  char norm[1024];
  prov_conn_norm_id(lc->c, dn, norm, sizeof(norm));
  json_object_set_new(lc->members, norm, json_true());
  return 0;
}

int prov_conn_list(prov_conn_t *c, const char *group_id, json_t *members, char *why,
                   size_t why_size) {
  list_ctx_t lc = {c, members};
  return c->kind == PROV_CONN_SCIM
             ? qm_scim_list_members(c->scim, group_id, on_scim_member, &lc, why, why_size)
             : qm_ldap_list_members(c->ldap, group_id, on_ldap_member, &lc, why, why_size);
}

void prov_conn_cache_clear(prov_conn_t *c) {
  if (c->kind == PROV_CONN_SCIM) qm_scim_cache_clear(c->scim);
  else qm_ldap_cache_clear(c->ldap);
}
