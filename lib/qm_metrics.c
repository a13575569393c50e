/*
 * qm_metrics: the Prometheus registry behind every service's /metrics.
 *
 * Layout: the registry keeps its families in a list (registration order) under
 * one mutex, which is taken only to register a family, to create a child and
 * to render. Each family hashes its children into a fixed array of buckets
 * whose heads are atomic pointers: a new child is fully built, linked in front
 * of its bucket's chain and published with a release store, and never moves
 * or disappears before qm_metrics_destroy(), so readers walk the chains
 * without a lock. Values are doubles stored as their bit patterns in atomic
 * 64-bit words (compare-and-swap to add); histogram buckets are plain atomic
 * counters, made cumulative only when rendered. A render taken while updates
 * run may show a _sum a few observations behind its _count; _count always
 * equals the +Inf bucket because both are computed from the same counts.
 */
#include "qm_metrics.h"

#include "qm_common.h"
#include "qm_log.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QM_METRICS_HASH_BUCKETS 64

typedef enum {
  QM_METRIC_COUNTER,
  QM_METRIC_GAUGE,
  QM_METRIC_HISTOGRAM,
  QM_METRIC_GAUGE_FN
} qm_metric_kind_t;

struct qm_metric {
  qm_metric_family_t *fam;
  qm_metric_t *next; /* next in its hash chain; set before publication, then fixed */
  uint64_t hash;
  char *values[QM_METRICS_MAX_LABELS];
  _Atomic uint64_t value;   /* double bits: counter/gauge value, histogram sum */
  _Atomic uint64_t *counts; /* histogram: nbounds + 1 per-bucket counts, else NULL */
};

struct qm_metric_family {
  qm_metrics_t *reg;
  qm_metric_kind_t kind;
  char *name;
  char *help;
  size_t nlabels;
  char *labels[QM_METRICS_MAX_LABELS];
  double bounds[QM_METRICS_MAX_BUCKETS];
  size_t nbounds;
  double (*fn)(void *ctx);
  void *fn_ctx;
  _Atomic(qm_metric_t *) heads[QM_METRICS_HASH_BUCKETS];
  size_t nchildren; /* under reg->lock */
  bool full_logged; /* under reg->lock */
  qm_metric_family_t *next;
};

struct qm_metrics {
  pthread_mutex_t lock;
  qm_metric_family_t *first;
  qm_metric_family_t *last;
};

static const double qm_metrics_default_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025,
                                                   0.05,  0.1,    0.25,  0.5,  1.0,
                                                   2.5,   5.0,    10.0};

/* ---- doubles in atomic words ---- */

static uint64_t qm_metrics_d2u(double d) {
  uint64_t u;
  memcpy(&u, &d, sizeof(u));
  return u;
}

static double qm_metrics_u2d(uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof(d));
  return d;
}

static void qm_metrics_atomic_add(_Atomic uint64_t *slot, double v) {
  uint64_t old = atomic_load_explicit(slot, memory_order_relaxed);
  for (;;) {
    uint64_t nv = qm_metrics_d2u(qm_metrics_u2d(old) + v);
    if (atomic_compare_exchange_weak_explicit(slot, &old, nv, memory_order_relaxed,
                                              memory_order_relaxed))
      return;
  }
}

/* ---- a growable text buffer for rendering ---- */

typedef struct {
  char *p;
  size_t len;
  size_t cap;
} qm_metrics_buf_t;

static void qm_metrics_buf_reserve(qm_metrics_buf_t *b, size_t more) {
  if (b->len + more + 1 <= b->cap) return;
  size_t cap = b->cap ? b->cap : 1024;
  while (cap < b->len + more + 1) cap *= 2;
  b->p = qm_realloc(b->p, cap);
  b->cap = cap;
}

static void qm_metrics_buf_add(qm_metrics_buf_t *b, const char *s, size_t n) {
  qm_metrics_buf_reserve(b, n);
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void qm_metrics_buf_str(qm_metrics_buf_t *b, const char *s) {
  qm_metrics_buf_add(b, s, strlen(s));
}

static void qm_metrics_buf_char(qm_metrics_buf_t *b, char c) { qm_metrics_buf_add(b, &c, 1); }

/* Label values escape backslash, double quote and newline; help texts escape
 * backslash and newline only (exposition format 0.0.4). */
static void qm_metrics_buf_escaped(qm_metrics_buf_t *b, const char *s, bool quote) {
  for (; *s; s++) {
    if (*s == '\\')
      qm_metrics_buf_str(b, "\\\\");
    else if (*s == '\n')
      qm_metrics_buf_str(b, "\\n");
    else if (quote && *s == '"')
      qm_metrics_buf_str(b, "\\\"");
    else
      qm_metrics_buf_char(b, *s);
  }
}

/* Shortest text that reads back as the same double, as Prometheus clients
 * print them: "3", "0.25", "1e-05", "+Inf", "NaN". */
static void qm_metrics_fmt_double(double v, char *out, size_t out_size) {
  if (isnan(v)) {
    qm_strlcpy(out, "NaN", out_size);
  } else if (isinf(v)) {
    qm_strlcpy(out, v > 0 ? "+Inf" : "-Inf", out_size);
  } else {
    snprintf(out, out_size, "%.15g", v);
    if (strtod(out, NULL) != v) snprintf(out, out_size, "%.17g", v);
  }
}

static void qm_metrics_buf_double(qm_metrics_buf_t *b, double v) {
  char num[40];
  qm_metrics_fmt_double(v, num, sizeof(num));
  qm_metrics_buf_str(b, num);
}

static void qm_metrics_buf_u64(qm_metrics_buf_t *b, uint64_t v) {
  char num[24];
  snprintf(num, sizeof(num), "%" PRIu64, v);
  qm_metrics_buf_str(b, num);
}

/* ---- names ---- */

static bool qm_metrics_name_ok(const char *s, bool metric) {
  if (!s || !*s) return false;
  for (const char *c = s; *c; c++) {
    bool alpha = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || *c == '_' ||
                 (metric && *c == ':');
    bool digit = *c >= '0' && *c <= '9';
    if (!alpha && !(digit && c != s)) return false;
  }
  if (!metric && strncmp(s, "__", 2) == 0) return false;
  return true;
}

static const char *qm_metrics_kind_name(qm_metric_kind_t kind) {
  switch (kind) {
  case QM_METRIC_COUNTER: return "counter";
  case QM_METRIC_HISTOGRAM: return "histogram";
  default: return "gauge";
  }
}

/* ---- registry ---- */

qm_metrics_t *qm_metrics_new(void) {
  qm_metrics_t *reg = qm_calloc(1, sizeof(*reg));
  pthread_mutex_init(&reg->lock, NULL);
  return reg;
}

static void qm_metrics_child_free(qm_metric_t *m) {
  for (size_t i = 0; i < QM_METRICS_MAX_LABELS; i++) free(m->values[i]);
  free((void *)m->counts);
  free(m);
}

void qm_metrics_destroy(qm_metrics_t *reg) {
  if (!reg) return;
  qm_metric_family_t *fam = reg->first;
  while (fam) {
    qm_metric_family_t *next = fam->next;
    for (size_t i = 0; i < QM_METRICS_HASH_BUCKETS; i++) {
      qm_metric_t *m = atomic_load(&fam->heads[i]);
      while (m) {
        qm_metric_t *mn = m->next;
        qm_metrics_child_free(m);
        m = mn;
      }
    }
    for (size_t i = 0; i < fam->nlabels; i++) free(fam->labels[i]);
    free(fam->name);
    free(fam->help);
    free(fam);
    fam = next;
  }
  pthread_mutex_destroy(&reg->lock);
  free(reg);
}

static qm_metric_family_t *qm_metrics_find_locked(qm_metrics_t *reg, const char *name) {
  for (qm_metric_family_t *fam = reg->first; fam; fam = fam->next)
    if (strcmp(fam->name, name) == 0) return fam;
  return NULL;
}

/* True when an existing family is the same declaration as the one asked for,
 * so that registering twice (two servers sharing a registry) is harmless. */
static bool qm_metrics_same(const qm_metric_family_t *fam, qm_metric_kind_t kind,
                            const char *const *labels, size_t nlabels, const double *bounds,
                            size_t nbounds) {
  if (fam->kind != kind || fam->nlabels != nlabels) return false;
  for (size_t i = 0; i < nlabels; i++)
    if (strcmp(fam->labels[i], labels[i]) != 0) return false;
  if (kind == QM_METRIC_HISTOGRAM) {
    if (fam->nbounds != nbounds) return false;
    for (size_t i = 0; i < nbounds; i++)
      if (fam->bounds[i] != bounds[i]) return false;
  }
  return true;
}

/* Validates a declaration and registers it (or returns the identical existing
 * family). Returns NULL and fills errstr on any problem. */
static qm_metric_family_t *qm_metrics_register(qm_metrics_t *reg, qm_metric_kind_t kind,
                                               const char *name, const char *help,
                                               const char *const *label_names,
                                               const double *bounds, size_t nbounds,
                                               char *errstr, size_t errstr_size) {
  qm_metric_family_t *fam = NULL;
  size_t nlabels = 0;
  bool locked = false;

  if (!reg || !qm_metrics_name_ok(name, true)) {
    qm_err(errstr, errstr_size, QM_EINVAL, "invalid metric name");
    goto out;
  }
  if (label_names) {
    for (; label_names[nlabels]; nlabels++) {
      const char *l = label_names[nlabels];
      if (nlabels == QM_METRICS_MAX_LABELS) {
        qm_err(errstr, errstr_size, QM_EINVAL, "more than %d labels", QM_METRICS_MAX_LABELS);
        goto out;
      }
      if (!qm_metrics_name_ok(l, false) ||
          (kind == QM_METRIC_HISTOGRAM && strcmp(l, "le") == 0)) {
        qm_err(errstr, errstr_size, QM_EINVAL, "invalid label name \"%s\"", l);
        goto out;
      }
      for (size_t j = 0; j < nlabels; j++)
        if (strcmp(label_names[j], l) == 0) {
          qm_err(errstr, errstr_size, QM_EINVAL, "label \"%s\" given twice", l);
          goto out;
        }
    }
  }
  if (kind == QM_METRIC_HISTOGRAM) {
    if (!bounds) {
      bounds = qm_metrics_default_bounds;
      nbounds = QM_ARRAY_LEN(qm_metrics_default_bounds);
    }
    if (nbounds == 0 || nbounds > QM_METRICS_MAX_BUCKETS) {
      qm_err(errstr, errstr_size, QM_EINVAL, "a histogram needs 1 to %d bucket bounds",
             QM_METRICS_MAX_BUCKETS);
      goto out;
    }
    for (size_t i = 0; i < nbounds; i++)
      if (!isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1])) {
        qm_err(errstr, errstr_size, QM_EINVAL,
               "bucket bounds must be finite and strictly increasing");
        goto out;
      }
  }

  pthread_mutex_lock(&reg->lock);
  locked = true;
  qm_metric_family_t *old = qm_metrics_find_locked(reg, name);
  if (old) {
    if (kind != QM_METRIC_GAUGE_FN &&
        qm_metrics_same(old, kind, label_names, nlabels, bounds, nbounds))
      fam = old;
    else
      qm_err(errstr, errstr_size, QM_EINVAL,
             "registered before as a different %s family", qm_metrics_kind_name(old->kind));
    goto out;
  }
  fam = qm_calloc(1, sizeof(*fam));
  fam->reg = reg;
  fam->kind = kind;
  fam->name = qm_strdup(name);
  fam->help = qm_strdup(help ? help : "");
  fam->nlabels = nlabels;
  for (size_t i = 0; i < nlabels; i++) fam->labels[i] = qm_strdup(label_names[i]);
  if (kind == QM_METRIC_HISTOGRAM) {
    memcpy(fam->bounds, bounds, nbounds * sizeof(double));
    fam->nbounds = nbounds;
  }
  for (size_t i = 0; i < QM_METRICS_HASH_BUCKETS; i++) atomic_init(&fam->heads[i], NULL);
  if (reg->last)
    reg->last->next = fam;
  else
    reg->first = fam;
  reg->last = fam;

out:
  if (locked) pthread_mutex_unlock(&reg->lock);
  return fam;
}

static qm_metric_family_t *qm_metrics_register_logged(qm_metrics_t *reg, qm_metric_kind_t kind,
                                                      const char *name, const char *help,
                                                      const char *const *label_names,
                                                      const double *bounds, size_t nbounds) {
  char err[160] = "";
  qm_metric_family_t *fam =
      qm_metrics_register(reg, kind, name, help, label_names, bounds, nbounds, err, sizeof(err));
  if (!fam)
    qm_log_error("metric %s not registered: %s; fix the declaration in the code",
                 name ? name : "(null)", err);
  return fam;
}

qm_metric_family_t *qm_metrics_counter(qm_metrics_t *reg, const char *name, const char *help,
                                       const char *const *label_names) {
  return qm_metrics_register_logged(reg, QM_METRIC_COUNTER, name, help, label_names, NULL, 0);
}

qm_metric_family_t *qm_metrics_gauge(qm_metrics_t *reg, const char *name, const char *help,
                                     const char *const *label_names) {
  return qm_metrics_register_logged(reg, QM_METRIC_GAUGE, name, help, label_names, NULL, 0);
}

qm_metric_family_t *qm_metrics_histogram(qm_metrics_t *reg, const char *name, const char *help,
                                         const char *const *label_names, const double *bounds,
                                         size_t nbounds) {
  return qm_metrics_register_logged(reg, QM_METRIC_HISTOGRAM, name, help, label_names, bounds,
                                    nbounds);
}

int qm_metrics_gauge_fn(qm_metrics_t *reg, const char *name, const char *help,
                        double (*fn)(void *ctx), void *ctx) {
  if (!fn) return QM_EINVAL;
  qm_metric_family_t *fam =
      qm_metrics_register_logged(reg, QM_METRIC_GAUGE_FN, name, help, NULL, NULL, 0);
  if (!fam) return QM_EINVAL;
  /* The family is visible to render from registration on; render skips a
   * callback family whose fn is still unset, so set it under the lock. */
  pthread_mutex_lock(&reg->lock);
  fam->fn = fn;
  fam->fn_ctx = ctx;
  pthread_mutex_unlock(&reg->lock);
  return QM_OK;
}

/* ---- children ---- */

static uint64_t qm_metrics_hash(const char *const *values, size_t n) {
  uint64_t h = 1469598103934665603ULL; /* FNV-1a */
  for (size_t i = 0; i < n; i++) {
    for (const unsigned char *c = (const unsigned char *)values[i]; *c; c++) {
      h ^= *c;
      h *= 1099511628211ULL;
    }
    h ^= 0xff; /* separator: ("ab","c") and ("a","bc") differ */
    h *= 1099511628211ULL;
  }
  return h;
}

static qm_metric_t *qm_metrics_chain_find(qm_metric_t *m, uint64_t h, const char *const *values,
                                          size_t n) {
  for (; m; m = m->next) {
    if (m->hash != h) continue;
    size_t i = 0;
    while (i < n && strcmp(m->values[i], values[i]) == 0) i++;
    if (i == n) return m;
  }
  return NULL;
}

qm_metric_t *qm_metrics_child(qm_metric_family_t *fam, const char *const *label_values) {
  qm_metric_t *m = NULL;
  if (!fam || fam->kind == QM_METRIC_GAUGE_FN) goto out;
  if (fam->nlabels > 0 && !label_values) goto out;
  for (size_t i = 0; i < fam->nlabels; i++)
    if (!label_values[i]) goto out;

  uint64_t h = qm_metrics_hash(label_values, fam->nlabels);
  _Atomic(qm_metric_t *) *head = &fam->heads[h % QM_METRICS_HASH_BUCKETS];
  m = qm_metrics_chain_find(atomic_load_explicit(head, memory_order_acquire), h, label_values,
                            fam->nlabels);
  if (m) goto out;

  qm_metrics_t *reg = fam->reg;
  pthread_mutex_lock(&reg->lock);
  m = qm_metrics_chain_find(atomic_load_explicit(head, memory_order_acquire), h, label_values,
                            fam->nlabels);
  if (!m && fam->nchildren >= QM_METRICS_MAX_CHILDREN) {
    if (!fam->full_logged)
      qm_log_error("metric %s reached %d label sets; further ones are dropped. A label "
                   "probably carries ids or free text: fix its values in the code",
                   fam->name, QM_METRICS_MAX_CHILDREN);
    fam->full_logged = true;
  } else if (!m) {
    m = qm_calloc(1, sizeof(*m));
    m->fam = fam;
    m->hash = h;
    for (size_t i = 0; i < fam->nlabels; i++) m->values[i] = qm_strdup(label_values[i]);
    atomic_init(&m->value, qm_metrics_d2u(0.0));
    if (fam->kind == QM_METRIC_HISTOGRAM) {
      m->counts = qm_calloc(fam->nbounds + 1, sizeof(*m->counts));
      for (size_t i = 0; i <= fam->nbounds; i++) atomic_init(&m->counts[i], 0);
    }
    m->next = atomic_load_explicit(head, memory_order_relaxed);
    atomic_store_explicit(head, m, memory_order_release);
    fam->nchildren++;
  }
  pthread_mutex_unlock(&reg->lock);

out:
  return m;
}

void qm_metrics_inc(qm_metric_t *m) { qm_metrics_add(m, 1.0); }

void qm_metrics_add(qm_metric_t *m, double v) {
  if (!m || m->fam->kind == QM_METRIC_HISTOGRAM) return;
  if (m->fam->kind == QM_METRIC_COUNTER && !(v >= 0)) return;
  qm_metrics_atomic_add(&m->value, v);
}

void qm_metrics_set(qm_metric_t *m, double v) {
  if (!m || m->fam->kind != QM_METRIC_GAUGE) return;
  atomic_store_explicit(&m->value, qm_metrics_d2u(v), memory_order_relaxed);
}

void qm_metrics_observe(qm_metric_t *m, double v) {
  if (!m || m->fam->kind != QM_METRIC_HISTOGRAM || isnan(v)) return;
  const qm_metric_family_t *fam = m->fam;
  size_t i = 0;
  while (i < fam->nbounds && v > fam->bounds[i]) i++;
  atomic_fetch_add_explicit(&m->counts[i], 1, memory_order_relaxed);
  qm_metrics_atomic_add(&m->value, v);
}

double qm_metrics_value(const qm_metric_t *m) {
  if (!m) return 0.0;
  return qm_metrics_u2d(atomic_load_explicit(&m->value, memory_order_relaxed));
}

/* ---- rendering ---- */

static int qm_metrics_child_cmp(const void *a, const void *b) {
  const qm_metric_t *ma = *(const qm_metric_t *const *)a;
  const qm_metric_t *mb = *(const qm_metric_t *const *)b;
  for (size_t i = 0; i < ma->fam->nlabels; i++) {
    int c = strcmp(ma->values[i], mb->values[i]);
    if (c) return c;
  }
  return 0;
}

/* Writes {a="x",b="y"} (plus le="…" when le is not NULL); nothing when there
 * are no labels at all. */
static void qm_metrics_render_labels(qm_metrics_buf_t *b, const qm_metric_t *m, const char *le) {
  const qm_metric_family_t *fam = m->fam;
  if (fam->nlabels == 0 && !le) return;
  qm_metrics_buf_char(b, '{');
  for (size_t i = 0; i < fam->nlabels; i++) {
    if (i) qm_metrics_buf_char(b, ',');
    qm_metrics_buf_str(b, fam->labels[i]);
    qm_metrics_buf_str(b, "=\"");
    qm_metrics_buf_escaped(b, m->values[i], true);
    qm_metrics_buf_char(b, '"');
  }
  if (le) {
    if (fam->nlabels) qm_metrics_buf_char(b, ',');
    qm_metrics_buf_str(b, "le=\"");
    qm_metrics_buf_str(b, le);
    qm_metrics_buf_char(b, '"');
  }
  qm_metrics_buf_char(b, '}');
}

static void qm_metrics_render_child(qm_metrics_buf_t *b, const qm_metric_t *m) {
  const qm_metric_family_t *fam = m->fam;
  if (fam->kind != QM_METRIC_HISTOGRAM) {
    qm_metrics_buf_str(b, fam->name);
    qm_metrics_render_labels(b, m, NULL);
    qm_metrics_buf_char(b, ' ');
    qm_metrics_buf_double(b, qm_metrics_value(m));
    qm_metrics_buf_char(b, '\n');
    return;
  }
  uint64_t cum = 0;
  for (size_t i = 0; i <= fam->nbounds; i++) {
    char le[40];
    if (i < fam->nbounds)
      qm_metrics_fmt_double(fam->bounds[i], le, sizeof(le));
    else
      qm_strlcpy(le, "+Inf", sizeof(le));
    cum += atomic_load_explicit(&m->counts[i], memory_order_relaxed);
    qm_metrics_buf_str(b, fam->name);
    qm_metrics_buf_str(b, "_bucket");
    qm_metrics_render_labels(b, m, le);
    qm_metrics_buf_char(b, ' ');
    qm_metrics_buf_u64(b, cum);
    qm_metrics_buf_char(b, '\n');
  }
  qm_metrics_buf_str(b, fam->name);
  qm_metrics_buf_str(b, "_sum");
  qm_metrics_render_labels(b, m, NULL);
  qm_metrics_buf_char(b, ' ');
  qm_metrics_buf_double(b, qm_metrics_value(m));
  qm_metrics_buf_char(b, '\n');
  qm_metrics_buf_str(b, fam->name);
  qm_metrics_buf_str(b, "_count");
  qm_metrics_render_labels(b, m, NULL);
  qm_metrics_buf_char(b, ' ');
  qm_metrics_buf_u64(b, cum);
  qm_metrics_buf_char(b, '\n');
}

static void qm_metrics_render_family(qm_metrics_buf_t *b, qm_metric_family_t *fam) {
  if (fam->kind == QM_METRIC_GAUGE_FN && !fam->fn) return;
  qm_metrics_buf_str(b, "# HELP ");
  qm_metrics_buf_str(b, fam->name);
  qm_metrics_buf_char(b, ' ');
  qm_metrics_buf_escaped(b, fam->help, false);
  qm_metrics_buf_str(b, "\n# TYPE ");
  qm_metrics_buf_str(b, fam->name);
  qm_metrics_buf_char(b, ' ');
  qm_metrics_buf_str(b, qm_metrics_kind_name(fam->kind));
  qm_metrics_buf_char(b, '\n');

  if (fam->kind == QM_METRIC_GAUGE_FN) {
    qm_metrics_buf_str(b, fam->name);
    qm_metrics_buf_char(b, ' ');
    qm_metrics_buf_double(b, fam->fn(fam->fn_ctx));
    qm_metrics_buf_char(b, '\n');
    return;
  }
  if (fam->nchildren == 0) return;
  qm_metric_t **all = qm_malloc(fam->nchildren * sizeof(*all));
  size_t n = 0;
  for (size_t i = 0; i < QM_METRICS_HASH_BUCKETS; i++)
    for (qm_metric_t *m = atomic_load_explicit(&fam->heads[i], memory_order_acquire);
         m && n < fam->nchildren; m = m->next)
      all[n++] = m;
  qsort(all, n, sizeof(*all), qm_metrics_child_cmp);
  for (size_t i = 0; i < n; i++) qm_metrics_render_child(b, all[i]);
  free(all);
}

int qm_metrics_render(qm_metrics_t *reg, char **out, size_t *len) {
  if (!reg || !out || !len) return QM_EINVAL;
  qm_metrics_buf_t b = {0};
  qm_metrics_buf_reserve(&b, 0);
  b.p[0] = '\0';
  pthread_mutex_lock(&reg->lock);
  for (qm_metric_family_t *fam = reg->first; fam; fam = fam->next)
    qm_metrics_render_family(&b, fam);
  pthread_mutex_unlock(&reg->lock);
  *out = b.p;
  *len = b.len;
  return QM_OK;
}
