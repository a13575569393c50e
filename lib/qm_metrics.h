/*
 * qm_metrics: a small, thread-safe Prometheus registry. A service creates one
 * registry, registers its metric families at start-up (counters, gauges,
 * histograms, and gauges computed by a callback at scrape time), updates them
 * from any thread, and serves qm_metrics_render()'s text on GET /metrics
 * (qm_http does that for it).
 *
 * A family has a name, a help text and up to QM_METRICS_MAX_LABELS label names
 * fixed when it is registered. Each combination of label values is a child,
 * created on first use and kept until the registry is destroyed. Looking up an
 * existing child takes no lock, and updating a child is a few atomic
 * operations, so the hot path never blocks; callers that update the same child
 * often may keep the qm_metric_t pointer.
 *
 * Conventions (Prometheus practice, and what our dashboards expect):
 *  - base units: seconds, bytes; histograms of durations are named *_seconds;
 *  - counters end in _total;
 *  - label values come from small closed sets (method, route pattern, outcome,
 *    topic). NEVER put ids (request, person, event ids) or free text in a
 *    label: every distinct value is a new time series kept forever. As a
 *    safety net a family stops creating children at QM_METRICS_MAX_CHILDREN
 *    (further label sets are dropped, and an error is logged once).
 *
 * Misuse (a bad name, a clash with an existing family of another type or
 * labels, the wrong number of label values) is a programming error: the call
 * returns NULL and logs why, and every update function treats a NULL metric as
 * a no-op, so a bad metric never takes a service down.
 */
#ifndef QM_METRICS_H
#define QM_METRICS_H

#include <stddef.h>

#define QM_METRICS_MAX_LABELS 4
#define QM_METRICS_MAX_BUCKETS 32
#define QM_METRICS_MAX_CHILDREN 10000

typedef struct qm_metrics qm_metrics_t;
typedef struct qm_metric_family qm_metric_family_t;
typedef struct qm_metric qm_metric_t;

/* A new, empty registry. Caller frees with qm_metrics_destroy(). */
qm_metrics_t *qm_metrics_new(void);

/* Frees the registry with every family and child it holds. All family and
 * child pointers obtained from it become invalid. NULL is a no-op. */
void qm_metrics_destroy(qm_metrics_t *reg);

/* Registers a counter (a value that only goes up; the name should end in
 * _total). label_names is a NULL-terminated array of at most
 * QM_METRICS_MAX_LABELS names, or NULL for none; the strings are copied.
 * Registering the same name again with the same type and labels returns the
 * existing family. Returns NULL (and logs why) on a bad name or a clash.
 * The family is valid until qm_metrics_destroy(). */
qm_metric_family_t *qm_metrics_counter(qm_metrics_t *reg, const char *name, const char *help,
                                       const char *const *label_names);

/* Registers a gauge (a value that goes up and down). As qm_metrics_counter(). */
qm_metric_family_t *qm_metrics_gauge(qm_metrics_t *reg, const char *name, const char *help,
                                     const char *const *label_names);

/* Registers a histogram. bounds are the bucket upper bounds in base units
 * (seconds for durations), strictly increasing, finite, at most
 * QM_METRICS_MAX_BUCKETS of them (the +Inf bucket is implicit); bounds NULL
 * (nbounds ignored) means the default latency buckets, 0.001 s to 10 s. The
 * label name "le" is reserved. Otherwise as qm_metrics_counter(). */
qm_metric_family_t *qm_metrics_histogram(qm_metrics_t *reg, const char *name, const char *help,
                                         const char *const *label_names, const double *bounds,
                                         size_t nbounds);

/* Registers a gauge without labels whose value is fn(ctx), called on every
 * render (for values that live elsewhere: outbox lag, pending timers). fn runs
 * on the thread that renders, with the registry locked: it must be
 * thread-safe, quick, and must not call into this registry. ctx is borrowed
 * and must stay valid until qm_metrics_destroy(). Returns 0, or QM_EINVAL on a
 * bad name or a clash with an existing family. */
int qm_metrics_gauge_fn(qm_metrics_t *reg, const char *name, const char *help,
                        double (*fn)(void *ctx), void *ctx);

/* The child of fam for these label values: an array of exactly as many
 * strings as the family has label names (NULL when it has none), copied on
 * first use. Lock-free when the child exists already. Returns NULL when fam is
 * NULL, a value is NULL, or the family is full. The child is valid until
 * qm_metrics_destroy(). */
qm_metric_t *qm_metrics_child(qm_metric_family_t *fam, const char *const *label_values);

/* Counter: adds 1 / adds v (v must be >= 0; negative values are ignored).
 * Gauge: qm_metrics_add() also takes negative v. NULL m is a no-op. */
void qm_metrics_inc(qm_metric_t *m);
void qm_metrics_add(qm_metric_t *m, double v);
/* Gauge only: sets the value. NULL m is a no-op. */
void qm_metrics_set(qm_metric_t *m, double v);
/* Histogram only: records one observation (in base units). NULL m is a no-op. */
void qm_metrics_observe(qm_metric_t *m, double v);
/* The current value of a counter or gauge, the sum of a histogram (for tests
 * and for services that read their own gauges). 0 for NULL. */
double qm_metrics_value(const qm_metric_t *m);

/* Writes the whole registry in the Prometheus text exposition format 0.0.4
 * (served with Content-Type "text/plain; version=0.0.4"): families in
 * registration order, each with # HELP and # TYPE, children sorted by label
 * values, histograms as cumulative _bucket{le="…"} lines ending with +Inf,
 * then _sum and _count. On success *out is a NUL-terminated string of *len
 * bytes; caller frees with free(). Returns 0 (QM_EINVAL on NULL arguments). */
int qm_metrics_render(qm_metrics_t *reg, char **out, size_t *len);

#endif /* QM_METRICS_H */
