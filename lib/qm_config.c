/*
 * qm_config: environment configuration from declarative tables. Values are
 * parsed once into typed slots; lookups by name are for start-up, not for hot
 * paths (services copy what they need into their own structs).
 */
#include "qm_config.h"

#include "qm_common.h"
#include "qm_log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct qm_cfg_slot {
  const qm_cfg_def_t *def;
  char *text;  /* the effective text (env or default), NULL when unset */
  int64_t num; /* INT, MS, BOOL parsed */
} qm_cfg_slot_t;

struct qm_config {
  char *program;
  qm_cfg_slot_t *slots;
  size_t n, cap;
  bool loaded;
};

qm_config_t *qm_config_new(const char *program) {
  qm_config_t *cfg = qm_calloc(1, sizeof(*cfg));
  cfg->program = qm_strdup(program ? program : "qm");
  return cfg;
}

static qm_cfg_slot_t *qm_config_find(const qm_config_t *cfg, const char *name) {
  for (size_t i = 0; i < cfg->n; i++)
    if (strcmp(cfg->slots[i].def->name, name) == 0) return &cfg->slots[i];
  return NULL;
}

void qm_config_add(qm_config_t *cfg, const qm_cfg_def_t *defs, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (qm_config_find(cfg, defs[i].name)) continue;
    if (cfg->n == cfg->cap) {
      cfg->cap = cfg->cap ? cfg->cap * 2 : 32;
      cfg->slots = qm_realloc(cfg->slots, cfg->cap * sizeof(*cfg->slots));
    }
    cfg->slots[cfg->n++] = (qm_cfg_slot_t){.def = &defs[i]};
  }
}

int qm_config_parse_ms(const char *s, int64_t *ms) {
  if (!s || !*s) return QM_EINVAL;
  errno = 0;
  char *end = NULL;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || v < 0) return QM_EINVAL;
  int64_t mult;
  if (*end == '\0' || strcmp(end, "ms") == 0) mult = 1;
  else if (strcmp(end, "s") == 0) mult = 1000;
  else if (strcmp(end, "m") == 0) mult = 60 * 1000;
  else if (strcmp(end, "h") == 0) mult = 3600 * 1000;
  else if (strcmp(end, "d") == 0) mult = 24LL * 3600 * 1000;
  else return QM_EINVAL;
  if (v > INT64_MAX / mult) return QM_EINVAL;
  *ms = (int64_t)v * mult;
  return QM_OK;
}

static int qm_config_parse_bool(const char *s, int64_t *out) {
  static const char *yes[] = {"1", "true", "yes", "on"};
  static const char *no[] = {"0", "false", "no", "off"};
  for (size_t i = 0; i < QM_ARRAY_LEN(yes); i++) {
    if (strcasecmp(s, yes[i]) == 0) { *out = 1; return QM_OK; }
    if (strcasecmp(s, no[i]) == 0) { *out = 0; return QM_OK; }
  }
  return QM_EINVAL;
}

/* Parses one slot's text. Returns 0, or QM_EINVAL with the reason in why. */
static int qm_config_parse_slot(qm_cfg_slot_t *slot, char *why, size_t why_size) {
  const qm_cfg_def_t *def = slot->def;
  const char *t = slot->text;
  switch (def->type) {
  case QM_CFG_STR:
    return QM_OK;
  case QM_CFG_BOOL:
    if (qm_config_parse_bool(t, &slot->num) != QM_OK)
      return qm_err(why, why_size, QM_EINVAL, "'%s' is not a boolean (use true or false)", t);
    return QM_OK;
  case QM_CFG_INT: {
    errno = 0;
    char *end = NULL;
    long long v = strtoll(t, &end, 10);
    if (errno || end == t || *end != '\0')
      return qm_err(why, why_size, QM_EINVAL, "'%s' is not an integer", t);
    slot->num = v;
    break;
  }
  case QM_CFG_MS:
    if (qm_config_parse_ms(t, &slot->num) != QM_OK)
      return qm_err(why, why_size, QM_EINVAL,
                    "'%s' is not a duration (e.g. 250ms, 5s, 2m, 1h, 7d)", t);
    break;
  }
  if ((def->min != 0 || def->max != 0) && (slot->num < def->min || slot->num > def->max))
    return qm_err(why, why_size, QM_EINVAL, "'%s' is out of range [%lld, %lld]%s", t,
                  (long long)def->min, (long long)def->max, def->type == QM_CFG_MS ? " ms" : "");
  return QM_OK;
}

static const char *qm_config_getenv(void *ctx, const char *name) {
  QM_UNUSED(ctx);
  return getenv(name);
}

int qm_config_load(qm_config_t *cfg, qm_config_lookup_fn lookup, void *ctx, char *errstr,
                   size_t errstr_size) {
  if (!lookup) lookup = qm_config_getenv;
  char msg[4096] = "";
  size_t used = 0;
  int rc = QM_OK;
  for (size_t i = 0; i < cfg->n; i++) {
    qm_cfg_slot_t *slot = &cfg->slots[i];
    free(slot->text);
    slot->text = NULL;
    slot->num = 0;
    const char *v = lookup(ctx, slot->def->name);
    char why[256] = "";
    if (v && *v) {
      slot->text = qm_strdup(v);
    } else if (slot->def->def) {
      slot->text = qm_strdup(slot->def->def);
    } else if (slot->def->flags & QM_CFG_REQUIRED) {
      qm_strlcpy(why, "required but not set", sizeof(why));
      rc = QM_EINVAL;
    }
    if (!why[0] && slot->text && qm_config_parse_slot(slot, why, sizeof(why)) != QM_OK)
      rc = QM_EINVAL;
    if (why[0] && used < sizeof(msg)) {
      int w = snprintf(msg + used, sizeof(msg) - used, "%s%s: %s", used ? "; " : "",
                       slot->def->name, why);
      if (w > 0) used += (size_t)w;
    }
  }
  if (rc != QM_OK) {
    for (size_t i = 0; i < cfg->n; i++) {
      free(cfg->slots[i].text);
      cfg->slots[i].text = NULL;
    }
    cfg->loaded = false;
    return qm_err(errstr, errstr_size, rc, "invalid configuration: %s", msg);
  }
  cfg->loaded = true;
  return QM_OK;
}

static const qm_cfg_slot_t *qm_config_get(const qm_config_t *cfg, const char *name,
                                          qm_cfg_type_t type) {
  const qm_cfg_slot_t *slot = qm_config_find(cfg, name);
  if (!slot || slot->def->type != type || !cfg->loaded) {
    qm_log_error("configuration %s read %s (programming error)", name,
                 !slot ? "is not defined" : !cfg->loaded ? "before load" : "with the wrong type");
    abort();
  }
  return slot;
}

const char *qm_config_str(const qm_config_t *cfg, const char *name) {
  const qm_cfg_slot_t *s = qm_config_get(cfg, name, QM_CFG_STR);
  return s->text ? s->text : "";
}
int64_t qm_config_int(const qm_config_t *cfg, const char *name) {
  return qm_config_get(cfg, name, QM_CFG_INT)->num;
}
bool qm_config_bool(const qm_config_t *cfg, const char *name) {
  return qm_config_get(cfg, name, QM_CFG_BOOL)->num != 0;
}
int64_t qm_config_ms(const qm_config_t *cfg, const char *name) {
  return qm_config_get(cfg, name, QM_CFG_MS)->num;
}

static const char *qm_config_type_name(qm_cfg_type_t t) {
  switch (t) {
  case QM_CFG_STR: return "string";
  case QM_CFG_INT: return "integer";
  case QM_CFG_BOOL: return "boolean";
  default: return "duration";
  }
}

static const char *qm_config_shown_default(const qm_cfg_def_t *d) {
  if (d->flags & QM_CFG_REQUIRED && !d->def) return "(required)";
  if (d->flags & QM_CFG_SECRET && d->def && *d->def) return "(secret)";
  return d->def ? (*d->def ? d->def : "(empty)") : "(unset)";
}

void qm_config_help(const qm_config_t *cfg, FILE *out) {
  fprintf(out, "Usage: %s [--help] [--config-doc]\n\nConfiguration (environment variables):\n\n",
          cfg->program);
  for (size_t i = 0; i < cfg->n; i++) {
    const qm_cfg_def_t *d = cfg->slots[i].def;
    fprintf(out, "  %-32s %-8s default: %s\n      %s\n", d->name, qm_config_type_name(d->type),
            qm_config_shown_default(d), d->doc);
  }
}

void qm_config_markdown(const qm_config_t *cfg, FILE *out) {
  fprintf(out, "| variable | type | default | meaning |\n| --- | --- | --- | --- |\n");
  for (size_t i = 0; i < cfg->n; i++) {
    const qm_cfg_def_t *d = cfg->slots[i].def;
    fprintf(out, "| `%s` | %s | `%s` | %s |\n", d->name, qm_config_type_name(d->type),
            qm_config_shown_default(d), d->doc);
  }
}

void qm_config_log(const qm_config_t *cfg) {
  for (size_t i = 0; i < cfg->n; i++) {
    const qm_cfg_slot_t *s = &cfg->slots[i];
    qm_log_info("config %s=%s", s->def->name,
                s->def->flags & QM_CFG_SECRET ? "(secret)" : (s->text ? s->text : "(unset)"));
  }
}

void qm_config_destroy(qm_config_t *cfg) {
  if (!cfg) return;
  for (size_t i = 0; i < cfg->n; i++) free(cfg->slots[i].text);
  free(cfg->slots);
  free(cfg->program);
  free(cfg);
}
