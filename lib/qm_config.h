/*
 * qm_config: configuration from environment variables, driven by tables.
 *
 * Each service declares one or more static tables of qm_cfg_def_t (name, type,
 * default, documentation, bounds); the same tables drive parsing, validation,
 * `--help` and the generated configuration reference (docs/operations.md).
 * A loaded configuration is an immutable value: a reload builds a new one and
 * swaps it in whole, keeping the old one when the new one is invalid.
 */
#ifndef QM_CONFIG_H
#define QM_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
  QM_CFG_STR,  /* any text */
  QM_CFG_INT,  /* a decimal integer within [min, max] */
  QM_CFG_BOOL, /* true/false, 1/0, yes/no, on/off */
  QM_CFG_MS    /* a duration: "250ms", "5s", "2m", "1h", "7d"; bare digits are ms */
} qm_cfg_type_t;

enum {
  QM_CFG_REQUIRED = 1 << 0, /* no default: the variable must be set */
  QM_CFG_SECRET = 1 << 1    /* never printed or logged */
};

typedef struct qm_cfg_def {
  const char *name;  /* environment variable, e.g. "QM_PG_DSN" */
  qm_cfg_type_t type;
  const char *def;   /* default as text; NULL with QM_CFG_REQUIRED */
  const char *doc;   /* one sentence for --help and the docs */
  int64_t min, max;  /* bounds for INT and MS (in ms); min == max == 0: none */
  unsigned flags;
} qm_cfg_def_t;

typedef struct qm_config qm_config_t;

/* Where values come from: getenv() when NULL is passed to qm_config_load(). */
typedef const char *(*qm_config_lookup_fn)(void *ctx, const char *name);

/* A new, empty configuration for program (copied). Caller frees with
 * qm_config_destroy(). */
qm_config_t *qm_config_new(const char *program);
/* Adds a table. defs must outlive cfg (they are static tables). A name defined
 * twice keeps the first definition (services may override library defaults by
 * adding their table first). */
void qm_config_add(qm_config_t *cfg, const qm_cfg_def_t *defs, size_t n);
/* Reads and validates every variable. On failure returns QM_EINVAL and errstr
 * names each bad variable with the reason ("QM_HTTP_PORT: 'abc' is not an
 * integer; QM_PG_DSN: required but not set"); cfg then holds no values. */
int qm_config_load(qm_config_t *cfg, qm_config_lookup_fn lookup, void *ctx, char *errstr,
                   size_t errstr_size);

/* Typed reads of a loaded configuration. Asking for a name no table defines,
 * or with the wrong type, is a programming error: it logs and aborts. The
 * string is valid until qm_config_destroy(). */
const char *qm_config_str(const qm_config_t *cfg, const char *name);
int64_t qm_config_int(const qm_config_t *cfg, const char *name);
bool qm_config_bool(const qm_config_t *cfg, const char *name);
int64_t qm_config_ms(const qm_config_t *cfg, const char *name);

/* The table as text for --help: name, type, default, doc (secrets' defaults hidden). */
void qm_config_help(const qm_config_t *cfg, FILE *out);
/* The table as a Markdown table, for docs/operations.md. */
void qm_config_markdown(const qm_config_t *cfg, FILE *out);
/* Logs the effective values at info level, secrets masked. */
void qm_config_log(const qm_config_t *cfg);

void qm_config_destroy(qm_config_t *cfg);

/* Parses a duration as QM_CFG_MS does. 0 or QM_EINVAL. Exposed for reuse. */
int qm_config_parse_ms(const char *s, int64_t *ms);

#endif /* QM_CONFIG_H */
