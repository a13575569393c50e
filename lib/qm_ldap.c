/*
 * qm_ldap: group membership in LDAP directories through libldap. See
 * qm_ldap.h for the contract. A pool of bound connections serves the calls;
 * a connection that fails with a server-down or timeout result is dropped
 * and the call is tried once more on a fresh one.
 */
#include "qm_ldap.h"

#include "qm_common.h"
#include "qm_log.h"

#include <jansson.h>
#include <ldap.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct ldap_slot {
  pthread_mutex_t lock;
  LDAP *ld; /* NULL until connected */
} ldap_slot_t;

struct qm_ldap {
  char *url, *bind_dn, *bind_password, *user_base, *user_attr, *group_base, *group_attr,
      *member_attr, *placeholder_dn, *ca_file;
  int timeout_ms, cache_ttl_ms;
  int n_slots;
  ldap_slot_t *slots;
  unsigned next_slot;
  pthread_mutex_t mu; /* guards cache, stats, next_slot */
  json_t *cache;      /* "u:<name>" / "g:<name>" -> [dn, expires_mono_ms] */
  qm_ldap_stats_t stats;
};

static char *dup_or_null(const char *s) { return s && *s ? qm_strdup(s) : NULL; }

static void count(qm_ldap_t *ldap, uint64_t *field) {
  pthread_mutex_lock(&ldap->mu);
  (*field)++;
  pthread_mutex_unlock(&ldap->mu);
}

qm_ldap_t *qm_ldap_new(const qm_ldap_config_t *cfg, char *errstr, size_t errstr_size) {
  if (!cfg->url || strncmp(cfg->url, "ldap", 4) != 0) {
    qm_err(errstr, errstr_size, QM_EINVAL, "LDAP url must be ldap:// or ldaps:// (got '%s')",
           cfg->url ? cfg->url : "");
    return NULL;
  }
  if (!cfg->user_base || !*cfg->user_base || !cfg->group_base || !*cfg->group_base) {
    qm_err(errstr, errstr_size, QM_EINVAL, "LDAP user_base and group_base are required");
    return NULL;
  }
  LDAP *probe = NULL;
  if (ldap_initialize(&probe, cfg->url) != LDAP_SUCCESS) {
    qm_err(errstr, errstr_size, QM_EINVAL, "LDAP url '%s' is not valid", cfg->url);
    return NULL;
  }
  ldap_unbind_ext_s(probe, NULL, NULL);
  qm_ldap_t *ldap = qm_calloc(1, sizeof(*ldap));
  ldap->url = qm_strdup(cfg->url);
  ldap->bind_dn = dup_or_null(cfg->bind_dn);
  ldap->bind_password = dup_or_null(cfg->bind_password);
  ldap->user_base = qm_strdup(cfg->user_base);
  ldap->user_attr = qm_strdup(cfg->user_attr && *cfg->user_attr ? cfg->user_attr : "uid");
  ldap->group_base = qm_strdup(cfg->group_base);
  ldap->group_attr = qm_strdup(cfg->group_attr && *cfg->group_attr ? cfg->group_attr : "cn");
  ldap->member_attr =
      qm_strdup(cfg->member_attr && *cfg->member_attr ? cfg->member_attr : "member");
  ldap->placeholder_dn = cfg->placeholder_dn ? qm_strdup(cfg->placeholder_dn) : NULL;
  ldap->ca_file = dup_or_null(cfg->ca_file);
  ldap->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 10000;
  ldap->cache_ttl_ms = cfg->cache_ttl_ms ? cfg->cache_ttl_ms : 300000;
  ldap->n_slots = cfg->pool_size > 0 ? cfg->pool_size : 4;
  ldap->slots = qm_calloc((size_t)ldap->n_slots, sizeof(*ldap->slots));
  for (int i = 0; i < ldap->n_slots; i++) pthread_mutex_init(&ldap->slots[i].lock, NULL);
  pthread_mutex_init(&ldap->mu, NULL);
  ldap->cache = json_object();
  return ldap;
}

void qm_ldap_destroy(qm_ldap_t *ldap) {
  if (!ldap) return;
  for (int i = 0; i < ldap->n_slots; i++) {
    if (ldap->slots[i].ld) ldap_unbind_ext_s(ldap->slots[i].ld, NULL, NULL);
    pthread_mutex_destroy(&ldap->slots[i].lock);
  }
  free(ldap->slots);
  pthread_mutex_destroy(&ldap->mu);
  json_decref(ldap->cache);
  free(ldap->url);
  free(ldap->bind_dn);
  free(ldap->bind_password);
  free(ldap->user_base);
  free(ldap->user_attr);
  free(ldap->group_base);
  free(ldap->group_attr);
  free(ldap->member_attr);
  free(ldap->placeholder_dn);
  free(ldap->ca_file);
  free(ldap);
}

/* Maps an LDAP result code to a QM_E* status. */
static int classify(int lrc) {
  switch (lrc) {
  case LDAP_SUCCESS: return QM_OK;
  case LDAP_SERVER_DOWN:
  case LDAP_TIMEOUT:
  case LDAP_CONNECT_ERROR:
  case LDAP_TIMELIMIT_EXCEEDED:
  case LDAP_BUSY:
  case LDAP_UNAVAILABLE:
  case LDAP_LOCAL_ERROR:
  case LDAP_OTHER:
    return QM_ETRANSIENT;
  case LDAP_INVALID_CREDENTIALS:
  case LDAP_INSUFFICIENT_ACCESS:
  case LDAP_INAPPROPRIATE_AUTH:
  case LDAP_STRONG_AUTH_REQUIRED:
    return QM_EAUTH;
  case LDAP_NO_SUCH_OBJECT: return QM_ENOTFOUND;
  default: return QM_EINVAL;
  }
}

/* True when the connection is unusable after this result. */
static bool conn_lost(int lrc) {
  return lrc == LDAP_SERVER_DOWN || lrc == LDAP_TIMEOUT || lrc == LDAP_CONNECT_ERROR;
}

static int fail(qm_ldap_t *ldap, const char *diag, int lrc, char *errstr, size_t errstr_size,
                const char *what) {
  qm_err(errstr, errstr_size, classify(lrc), "LDAP %s on %s: %s (%d)%s%s", what, ldap->url,
         ldap_err2string(lrc), lrc, *diag ? ": " : "", diag);
  count(ldap, &ldap->stats.failures);
  return classify(lrc);
}

/* The connection's diagnostic message (the server's, or libldap's own, e.g.
 * why a TLS handshake failed) into out; "" when none. */
static void diagnostic(LDAP *ld, char *out, size_t out_size) {
  char *d = NULL;
  out[0] = '\0';
  if (ld && ldap_get_option(ld, LDAP_OPT_DIAGNOSTIC_MESSAGE, &d) == LDAP_OPT_SUCCESS && d) {
    qm_strlcpy(out, d, out_size);
    ldap_memfree(d);
  }
}

/* Connects and binds slot s. LDAP result code; on a failed bind the handle
 * is handed to *failed (caller unbinds it) for its diagnostic message. */
static int slot_connect(qm_ldap_t *ldap, ldap_slot_t *s, LDAP **failed) {
  if (s->ld) return LDAP_SUCCESS;
  LDAP *ld = NULL;
  int lrc = ldap_initialize(&ld, ldap->url);
  if (lrc != LDAP_SUCCESS) return lrc;
  int v3 = LDAP_VERSION3;
  ldap_set_option(ld, LDAP_OPT_PROTOCOL_VERSION, &v3);
  ldap_set_option(ld, LDAP_OPT_REFERRALS, LDAP_OPT_OFF);
  struct timeval tv = {ldap->timeout_ms / 1000, (ldap->timeout_ms % 1000) * 1000};
  ldap_set_option(ld, LDAP_OPT_NETWORK_TIMEOUT, &tv);
  ldap_set_option(ld, LDAP_OPT_TIMEOUT, &tv);
  int demand = LDAP_OPT_X_TLS_DEMAND;
  ldap_set_option(ld, LDAP_OPT_X_TLS_REQUIRE_CERT, &demand);
  if (ldap->ca_file) ldap_set_option(ld, LDAP_OPT_X_TLS_CACERTFILE, ldap->ca_file);
  if (ldap->ca_file || !strncmp(ldap->url, "ldaps:", 6)) {
    /* TLS options set on a handle apply only through a context of its own. */
    int client = 0;
    ldap_set_option(ld, LDAP_OPT_X_TLS_NEWCTX, &client);
  }
  struct berval cred = {0, NULL};
  if (ldap->bind_password) {
    cred.bv_val = ldap->bind_password;
    cred.bv_len = strlen(ldap->bind_password);
  }
  count(ldap, &ldap->stats.operations);
  lrc = ldap_sasl_bind_s(ld, ldap->bind_dn ? ldap->bind_dn : "", LDAP_SASL_SIMPLE, &cred, NULL,
                         NULL, NULL);
  if (lrc != LDAP_SUCCESS) {
    *failed = ld;
    return lrc;
  }
  count(ldap, &ldap->stats.reconnects);
  s->ld = ld;
  return LDAP_SUCCESS;
}

static void slot_drop(ldap_slot_t *s) {
  if (s->ld) ldap_unbind_ext_s(s->ld, NULL, NULL);
  s->ld = NULL;
}

/* Borrows a slot: a free one if any, else waits on one in turn. */
static ldap_slot_t *slot_get(qm_ldap_t *ldap) {
  for (int i = 0; i < ldap->n_slots; i++)
    if (pthread_mutex_trylock(&ldap->slots[i].lock) == 0) return &ldap->slots[i];
  pthread_mutex_lock(&ldap->mu);
  unsigned k = ldap->next_slot++ % (unsigned)ldap->n_slots;
  pthread_mutex_unlock(&ldap->mu);
  pthread_mutex_lock(&ldap->slots[k].lock);
  return &ldap->slots[k];
}

static void slot_put(ldap_slot_t *s) { pthread_mutex_unlock(&s->lock); }

/* ---- the operation runner: one connection, one reconnect on loss ---- */

typedef int (*ldap_op_fn)(qm_ldap_t *ldap, LDAP *ld, void *ctx); /* returns an LDAP code */

/* Runs fn on a borrowed connection (connecting and binding first), once
 * more on a fresh connection when the first was lost. The slot stays
 * borrowed until the caller's slot_put(); diag receives the connection's
 * diagnostic message (kept from before a lost connection is dropped). */
static int run(qm_ldap_t *ldap, ldap_op_fn fn, void *ctx, int *lrc_out, char *diag,
               size_t diag_size, ldap_slot_t **slot_out) {
  ldap_slot_t *s = slot_get(ldap);
  int lrc = LDAP_SUCCESS;
  diag[0] = '\0';
  for (int round = 0; round < 2; round++) {
    LDAP *fresh = NULL;
    if (!s->ld) {
      lrc = slot_connect(ldap, s, &fresh);
      if (lrc != LDAP_SUCCESS) diagnostic(fresh, diag, diag_size);
      if (fresh) ldap_unbind_ext_s(fresh, NULL, NULL);
    }
    if (s->ld) {
      count(ldap, &ldap->stats.operations);
      lrc = fn(ldap, s->ld, ctx);
      diagnostic(s->ld, diag, diag_size);
    }
    if (!conn_lost(lrc)) break;
    slot_drop(s);
  }
  *lrc_out = lrc;
  *slot_out = s;
  return lrc;
}

/* ---- lookups ---- */

typedef struct find_ctx {
  const char *base, *attr, *value;
  char *dn_out;
  size_t dn_size;
  int found;
  bool too_small;
} find_ctx_t;

static int find_op(qm_ldap_t *ldap, LDAP *ld, void *arg) {
  find_ctx_t *fc = arg;
  struct berval in = {strlen(fc->value), (char *)fc->value}, esc = {0, NULL};
  if (ldap_bv2escaped_filter_value(&in, &esc) != 0) return LDAP_NO_MEMORY;
  char *filter = qm_asprintf("(%s=%s)", fc->attr, esc.bv_val);
  ber_memfree(esc.bv_val);
  char *attrs[] = {LDAP_NO_ATTRS, NULL};
  struct timeval tv = {ldap->timeout_ms / 1000, (ldap->timeout_ms % 1000) * 1000};
  LDAPMessage *res = NULL;
  int lrc = ldap_search_ext_s(ld, fc->base, LDAP_SCOPE_SUBTREE, filter, attrs, 0, NULL, NULL, &tv,
                              2, &res);
  free(filter);
  if (lrc == LDAP_SUCCESS || lrc == LDAP_SIZELIMIT_EXCEEDED) {
    fc->found = ldap_count_entries(ld, res);
    LDAPMessage *e = ldap_first_entry(ld, res);
    if (fc->found == 1 && e) {
      char *dn = ldap_get_dn(ld, e);
      if (dn && strlen(dn) < fc->dn_size) qm_strlcpy(fc->dn_out, dn, fc->dn_size);
      else fc->too_small = true;
      if (dn) ldap_memfree(dn);
    }
    lrc = LDAP_SUCCESS;
  }
  if (res) ldap_msgfree(res);
  return lrc;
}

/* The DN cache holds at most about QM_LDAP_CACHE_SWEEP_AT entries: past
 * that, expired entries are dropped, and when none had expired the whole
 * cache is (a directory of many people looked up once each would otherwise
 * grow it for ever). ldap->mu held. */
#define QM_LDAP_CACHE_SWEEP_AT 50000
static void cache_sweep(qm_ldap_t *ldap) {
  int64_t now = qm_mono_ms();
  const char *k;
  json_t *v, *tmp;
  size_t before = json_object_size(ldap->cache);
  json_object_foreach_safe(ldap->cache, tmp, k, v) {
    if (json_integer_value(json_array_get(v, 1)) <= now) json_object_del(ldap->cache, k);
  }
  if (json_object_size(ldap->cache) == before) json_object_clear(ldap->cache);
}

static int find(qm_ldap_t *ldap, char kind, const char *base, const char *attr, const char *name,
                char *dn_out, size_t dn_size, char *errstr, size_t errstr_size) {
  char *key = qm_asprintf("%c:%s", kind, name);
  int rc = QM_OK;
  pthread_mutex_lock(&ldap->mu);
  json_t *hit = json_object_get(ldap->cache, key);
  if (hit && json_integer_value(json_array_get(hit, 1)) > qm_mono_ms() &&
      strlen(json_string_value(json_array_get(hit, 0))) < dn_size) {
    qm_strlcpy(dn_out, json_string_value(json_array_get(hit, 0)), dn_size);
    ldap->stats.cache_hits++;
    pthread_mutex_unlock(&ldap->mu);
    goto out;
  }
  ldap->stats.cache_misses++;
  pthread_mutex_unlock(&ldap->mu);
  char dn[1024] = "", diag[256];
  find_ctx_t fc = {base, attr, name, dn, sizeof(dn), 0, false};
  int lrc;
  ldap_slot_t *s;
  run(ldap, find_op, &fc, &lrc, diag, sizeof(diag), &s);
  if (lrc != LDAP_SUCCESS) {
    rc = fail(ldap, diag, lrc, errstr, errstr_size, kind == 'u' ? "user search" : "group search");
  } else if (fc.found == 0) {
    rc = qm_err(errstr, errstr_size, QM_ENOTFOUND, "LDAP: no %s with %s=%s under %s",
                kind == 'u' ? "user" : "group", attr, name, base);
  } else if (fc.found > 1) {
    rc = qm_err(errstr, errstr_size, QM_ECONFLICT, "LDAP: %d entries with %s=%s under %s",
                fc.found, attr, name, base);
  } else if (fc.too_small || strlen(dn) >= dn_size) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "LDAP: DN of %s does not fit the buffer", name);
  } else {
    qm_strlcpy(dn_out, dn, dn_size);
    if (ldap->cache_ttl_ms > 0) {
      pthread_mutex_lock(&ldap->mu);
      if (json_object_size(ldap->cache) >= QM_LDAP_CACHE_SWEEP_AT) cache_sweep(ldap);
      json_object_set_new(ldap->cache, key,
                          json_pack("[s, I]", dn, (json_int_t)(qm_mono_ms() + ldap->cache_ttl_ms)));
      pthread_mutex_unlock(&ldap->mu);
    }
  }
  slot_put(s);
out:
  free(key);
  return rc;
}

int qm_ldap_find_user(qm_ldap_t *ldap, const char *name, char *dn_out, size_t dn_size,
                      char *errstr, size_t errstr_size) {
  return find(ldap, 'u', ldap->user_base, ldap->user_attr, name, dn_out, dn_size, errstr,
              errstr_size);
}

int qm_ldap_find_group(qm_ldap_t *ldap, const char *name, char *dn_out, size_t dn_size,
                       char *errstr, size_t errstr_size) {
  return find(ldap, 'g', ldap->group_base, ldap->group_attr, name, dn_out, dn_size, errstr,
              errstr_size);
}

/* ---- modifications ---- */

typedef struct mod_ctx {
  const char *group_dn;
  int nmods;
  int ops[2];           /* LDAP_MOD_ADD / LDAP_MOD_DELETE */
  const char *const *values[2];
  size_t n_values[2];
} mod_ctx_t;

static int mod_op(qm_ldap_t *ldap, LDAP *ld, void *arg) {
  mod_ctx_t *mc = arg;
  LDAPMod mods[2];
  LDAPMod *pmods[3] = {NULL, NULL, NULL};
  char **vals[2] = {NULL, NULL};
  for (int m = 0; m < mc->nmods; m++) {
    vals[m] = qm_calloc(mc->n_values[m] + 1, sizeof(char *));
    for (size_t i = 0; i < mc->n_values[m]; i++) vals[m][i] = (char *)mc->values[m][i];
    mods[m].mod_op = mc->ops[m];
    mods[m].mod_type = ldap->member_attr;
    mods[m].mod_values = vals[m];
    pmods[m] = &mods[m];
  }
  int lrc = ldap_modify_ext_s(ld, mc->group_dn, pmods, NULL, NULL);
  for (int m = 0; m < mc->nmods; m++) free(vals[m]);
  return lrc;
}

/* One modify; returns the LDAP code and fills errstr on failure (without
 * counting it: the caller decides what a code means). */
static int modify(qm_ldap_t *ldap, mod_ctx_t *mc, char *errstr, size_t errstr_size,
                  const char *what) {
  int lrc;
  char diag[256];
  ldap_slot_t *s;
  run(ldap, mod_op, mc, &lrc, diag, sizeof(diag), &s);
  if (lrc != LDAP_SUCCESS)
    qm_err(errstr, errstr_size, classify(lrc), "LDAP %s of %s on %s: %s (%d)%s%s", what,
           mc->group_dn, ldap->url, ldap_err2string(lrc), lrc, *diag ? ": " : "", diag);
  slot_put(s);
  return lrc;
}

static int single(int op, const char *group_dn, const char *const *v, size_t n, mod_ctx_t *mc) {
  memset(mc, 0, sizeof(*mc));
  mc->group_dn = group_dn;
  mc->nmods = 1;
  mc->ops[0] = op;
  mc->values[0] = v;
  mc->n_values[0] = n;
  return 0;
}

/* Removes the placeholder from a group that now has a real member. */
static void drop_placeholder(qm_ldap_t *ldap, const char *group_dn) {
  if (!ldap->placeholder_dn) return;
  const char *v[] = {ldap->placeholder_dn};
  mod_ctx_t mc;
  single(LDAP_MOD_DELETE, group_dn, v, 1, &mc);
  char e[256];
  int lrc = modify(ldap, &mc, e, sizeof(e), "placeholder removal");
  if (lrc != LDAP_SUCCESS && lrc != LDAP_NO_SUCH_ATTRIBUTE && lrc != LDAP_OBJECT_CLASS_VIOLATION)
    qm_log_warn("%s (the placeholder stays; harmless)", e);
}

int qm_ldap_add_members(qm_ldap_t *ldap, const char *group_dn, const char *const *member_dns,
                        size_t n, char *errstr, size_t errstr_size) {
  if (n == 0) return QM_OK;
  mod_ctx_t mc;
  single(LDAP_MOD_ADD, group_dn, member_dns, n, &mc);
  int lrc = modify(ldap, &mc, errstr, errstr_size, "member add");
  if (lrc == LDAP_TYPE_OR_VALUE_EXISTS && n > 1) {
    /* One of them is there already: the server refused the whole list. */
    for (size_t i = 0; i < n; i++) {
      single(LDAP_MOD_ADD, group_dn, &member_dns[i], 1, &mc);
      lrc = modify(ldap, &mc, errstr, errstr_size, "member add");
      if (lrc != LDAP_SUCCESS && lrc != LDAP_TYPE_OR_VALUE_EXISTS) break;
      lrc = LDAP_SUCCESS;
    }
  }
  if (lrc == LDAP_TYPE_OR_VALUE_EXISTS) lrc = LDAP_SUCCESS;
  if (lrc != LDAP_SUCCESS) {
    count(ldap, &ldap->stats.failures);
    return classify(lrc);
  }
  drop_placeholder(ldap, group_dn);
  return QM_OK;
}

int qm_ldap_add_member(qm_ldap_t *ldap, const char *group_dn, const char *member_dn,
                       char *errstr, size_t errstr_size) {
  const char *v[] = {member_dn};
  return qm_ldap_add_members(ldap, group_dn, v, 1, errstr, errstr_size);
}

int qm_ldap_remove_member(qm_ldap_t *ldap, const char *group_dn, const char *member_dn,
                          char *errstr, size_t errstr_size) {
  const char *v[] = {member_dn};
  mod_ctx_t mc;
  single(LDAP_MOD_DELETE, group_dn, v, 1, &mc);
  int lrc = modify(ldap, &mc, errstr, errstr_size, "member delete");
  if (lrc == LDAP_OBJECT_CLASS_VIOLATION && ldap->placeholder_dn) {
    /* The last member of a groupOfNames: swap in the placeholder atomically. */
    const char *ph[] = {ldap->placeholder_dn};
    memset(&mc, 0, sizeof(mc));
    mc.group_dn = group_dn;
    mc.nmods = 2;
    mc.ops[0] = LDAP_MOD_ADD;
    mc.values[0] = ph;
    mc.n_values[0] = 1;
    mc.ops[1] = LDAP_MOD_DELETE;
    mc.values[1] = v;
    mc.n_values[1] = 1;
    lrc = modify(ldap, &mc, errstr, errstr_size, "last-member swap");
  }
  if (lrc == LDAP_NO_SUCH_ATTRIBUTE || lrc == LDAP_NO_SUCH_OBJECT) lrc = LDAP_SUCCESS;
  if (lrc != LDAP_SUCCESS) {
    count(ldap, &ldap->stats.failures);
    return classify(lrc);
  }
  return QM_OK;
}

/* ---- listing ---- */

typedef struct list_ctx {
  const char *group_dn;
  json_t *members; /* array of DNs */
} list_ctx_t;

static int list_op(qm_ldap_t *ldap, LDAP *ld, void *arg) {
  list_ctx_t *lc = arg;
  char *attrs[] = {ldap->member_attr, NULL};
  struct timeval tv = {ldap->timeout_ms / 1000, (ldap->timeout_ms % 1000) * 1000};
  LDAPMessage *res = NULL;
  int lrc = ldap_search_ext_s(ld, lc->group_dn, LDAP_SCOPE_BASE, "(objectClass=*)", attrs, 0,
                              NULL, NULL, &tv, 1, &res);
  if (lrc == LDAP_SUCCESS) {
    json_array_clear(lc->members);
    LDAPMessage *e = ldap_first_entry(ld, res);
    if (!e) lrc = LDAP_NO_SUCH_OBJECT;
    struct berval **vals = e ? ldap_get_values_len(ld, e, ldap->member_attr) : NULL;
    for (size_t i = 0; vals && vals[i]; i++) {
      char *dn = qm_strndup(vals[i]->bv_val, vals[i]->bv_len);
      if (!ldap->placeholder_dn || strcasecmp(dn, ldap->placeholder_dn) != 0)
        json_array_append_new(lc->members, json_string(dn));
      free(dn);
    }
    if (vals) ldap_value_free_len(vals);
  }
  if (res) ldap_msgfree(res);
  return lrc;
}

int qm_ldap_list_members(qm_ldap_t *ldap, const char *group_dn, qm_ldap_member_fn cb, void *ctx,
                         char *errstr, size_t errstr_size) {
  list_ctx_t lc = {group_dn, json_array()};
  int lrc;
  char diag[256];
  ldap_slot_t *s;
  run(ldap, list_op, &lc, &lrc, diag, sizeof(diag), &s);
  int rc = QM_OK;
  if (lrc != LDAP_SUCCESS) rc = fail(ldap, diag, lrc, errstr, errstr_size, "member list");
  slot_put(s);
  size_t i;
  json_t *v;
  if (rc == QM_OK) json_array_foreach(lc.members, i, v) {
      rc = cb(ctx, json_string_value(v));
      if (rc != 0) break;
    }
  json_decref(lc.members);
  return rc;
}

void qm_ldap_cache_clear(qm_ldap_t *ldap) {
  pthread_mutex_lock(&ldap->mu);
  json_object_clear(ldap->cache);
  pthread_mutex_unlock(&ldap->mu);
}

void qm_ldap_stats(qm_ldap_t *ldap, qm_ldap_stats_t *stats) {
  pthread_mutex_lock(&ldap->mu);
  *stats = ldap->stats;
  pthread_mutex_unlock(&ldap->mu);
}
