/*
 * Unit tests for qm_metrics: the exact exposition text of a small registry
 * (labels, escaping, cumulative histogram buckets, callback gauges), the
 * rules registration enforces, and updates from several threads at once.
 */
#include "qm_common.h"
#include "qm_log.h"
#include "qm_metrics.h"

#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static char *render(qm_metrics_t *reg) {
  char *text = NULL;
  size_t len = 0;
  cr_assert_eq(qm_metrics_render(reg, &text, &len), QM_OK);
  cr_assert_not_null(text);
  cr_assert_eq(strlen(text), len);
  return text;
}

static double fn_value(void *ctx) { return *(double *)ctx; }

static void quiet(void) { qm_log_init("test", QM_LOG_FATAL, NULL); }

TestSuite(metrics, .init = quiet);

Test(metrics, exposition_text_is_exact) {
  qm_metrics_t *reg = qm_metrics_new();
  static const char *const req_labels[] = {"method", "route", "code", NULL};
  qm_metric_family_t *req =
      qm_metrics_counter(reg, "qm_http_requests_total", "HTTP requests answered.", req_labels);
  qm_metric_family_t *inflight = qm_metrics_gauge(reg, "qm_inflight", "In flight.", NULL);
  static const char *const h_labels[] = {"route", NULL};
  static const double bounds[] = {0.125, 0.5, 1};
  qm_metric_family_t *lat =
      qm_metrics_histogram(reg, "qm_latency_seconds", "Latency\\in\nseconds.", h_labels, bounds,
                           3);
  double lag = 2.5;
  cr_assert_eq(qm_metrics_gauge_fn(reg, "qm_outbox_lag_seconds", "Outbox lag.", fn_value, &lag),
               QM_OK);
  cr_assert_not_null(req);
  cr_assert_not_null(inflight);
  cr_assert_not_null(lat);

  const char *v1[] = {"POST", "/v1/requests", "201"};
  const char *v2[] = {"GET", "/v1/requests/{id}", "200"};
  const char *v3[] = {"GET", "a\"b\\c\nd", "404"};
  qm_metrics_inc(qm_metrics_child(req, v2));
  qm_metrics_add(qm_metrics_child(req, v1), 2);
  qm_metrics_inc(qm_metrics_child(req, v1));
  qm_metrics_inc(qm_metrics_child(req, v3));
  qm_metrics_add(qm_metrics_child(req, v1), -5); /* counters never go down */
  qm_metric_t *g = qm_metrics_child(inflight, NULL);
  qm_metrics_set(g, 7);
  qm_metrics_add(g, -2.5);
  const char *r1[] = {"/x"};
  qm_metric_t *h = qm_metrics_child(lat, r1);
  qm_metrics_observe(h, 0.0625);
  qm_metrics_observe(h, 0.125); /* on the bound: counts in le="0.125" */
  qm_metrics_observe(h, 0.75);
  qm_metrics_observe(h, 3);

  char *text = render(reg);
  const char *want =
      "# HELP qm_http_requests_total HTTP requests answered.\n"
      "# TYPE qm_http_requests_total counter\n"
      "qm_http_requests_total{method=\"GET\",route=\"/v1/requests/{id}\",code=\"200\"} 1\n"
      "qm_http_requests_total{method=\"GET\",route=\"a\\\"b\\\\c\\nd\",code=\"404\"} 1\n"
      "qm_http_requests_total{method=\"POST\",route=\"/v1/requests\",code=\"201\"} 3\n"
      "# HELP qm_inflight In flight.\n"
      "# TYPE qm_inflight gauge\n"
      "qm_inflight 4.5\n"
      "# HELP qm_latency_seconds Latency\\\\in\\nseconds.\n"
      "# TYPE qm_latency_seconds histogram\n"
      "qm_latency_seconds_bucket{route=\"/x\",le=\"0.125\"} 2\n"
      "qm_latency_seconds_bucket{route=\"/x\",le=\"0.5\"} 2\n"
      "qm_latency_seconds_bucket{route=\"/x\",le=\"1\"} 3\n"
      "qm_latency_seconds_bucket{route=\"/x\",le=\"+Inf\"} 4\n"
      "qm_latency_seconds_sum{route=\"/x\"} 3.9375\n"
      "qm_latency_seconds_count{route=\"/x\"} 4\n"
      "# HELP qm_outbox_lag_seconds Outbox lag.\n"
      "# TYPE qm_outbox_lag_seconds gauge\n"
      "qm_outbox_lag_seconds 2.5\n";
  cr_assert_str_eq(text, want);
  free(text);

  /* The callback is evaluated at each render. */
  lag = 0.125;
  text = render(reg);
  cr_assert_not_null(strstr(text, "\nqm_outbox_lag_seconds 0.125\n"), "%s", text);
  free(text);
  qm_metrics_destroy(reg);
}

Test(metrics, children_are_cached_and_default_buckets_used) {
  qm_metrics_t *reg = qm_metrics_new();
  static const char *const labels[] = {"route", NULL};
  qm_metric_family_t *lat = qm_metrics_histogram(reg, "d_seconds", "d", labels, NULL, 0);
  const char *v[] = {"/a"};
  qm_metric_t *a = qm_metrics_child(lat, v);
  char other[] = "/a"; /* same value, other storage */
  const char *v2[] = {other};
  cr_assert_eq(qm_metrics_child(lat, v2), a);
  qm_metrics_observe(a, 0.0001);
  char *text = render(reg);
  cr_assert_not_null(strstr(text, "d_seconds_bucket{route=\"/a\",le=\"0.001\"} 1\n"), "%s", text);
  cr_assert_not_null(strstr(text, "d_seconds_bucket{route=\"/a\",le=\"0.0025\"} 1\n"));
  cr_assert_not_null(strstr(text, "d_seconds_bucket{route=\"/a\",le=\"10\"} 1\n"));
  cr_assert_not_null(strstr(text, "d_seconds_sum{route=\"/a\"} 0.0001\n"));
  free(text);
  qm_metrics_destroy(reg);
}

Test(metrics, registration_rules) {
  qm_metrics_t *reg = qm_metrics_new();
  static const char *const l1[] = {"a", NULL};
  static const char *const l2[] = {"b", NULL};
  static const char *const le[] = {"le", NULL};
  static const char *const five[] = {"a", "b", "c", "d", "e", NULL};
  static const char *const dup[] = {"a", "a", NULL};
  static const char *const reserved[] = {"__x", NULL};
  qm_metric_family_t *c = qm_metrics_counter(reg, "x_total", "x", l1);
  cr_assert_not_null(c);
  cr_assert_eq(qm_metrics_counter(reg, "x_total", "x again", l1), c, "idempotent");
  cr_assert_null(qm_metrics_counter(reg, "x_total", "x", l2), "other labels");
  cr_assert_null(qm_metrics_gauge(reg, "x_total", "x", l1), "other type");
  cr_assert_null(qm_metrics_counter(reg, "1bad", "x", NULL));
  cr_assert_null(qm_metrics_counter(reg, "bad-name", "x", NULL));
  cr_assert_null(qm_metrics_counter(reg, "y_total", "x", five));
  cr_assert_null(qm_metrics_counter(reg, "y_total", "x", dup));
  cr_assert_null(qm_metrics_counter(reg, "y_total", "x", reserved));
  cr_assert_null(qm_metrics_histogram(reg, "h_seconds", "x", le, NULL, 0));
  static const double bad[] = {1, 0.5};
  cr_assert_null(qm_metrics_histogram(reg, "h_seconds", "x", NULL, bad, 2));
  cr_assert_eq(qm_metrics_gauge_fn(reg, "x_total", "x", fn_value, NULL), QM_EINVAL);
  /* Wrong or missing label values give NULL, and NULL updates are no-ops. */
  cr_assert_null(qm_metrics_child(c, NULL));
  const char *nullv[] = {NULL};
  cr_assert_null(qm_metrics_child(c, nullv));
  qm_metrics_inc(NULL);
  qm_metrics_observe(NULL, 1);
  char *text = render(reg);
  cr_assert_str_eq(text, "# HELP x_total x\n# TYPE x_total counter\n");
  free(text);
  qm_metrics_destroy(reg);
}

#define THREADS 4
#define PER_THREAD 20000

typedef struct {
  qm_metric_family_t *c;
  qm_metric_family_t *h;
} hammer_t;

static void *hammer(void *arg) {
  hammer_t *hm = arg;
  const char *codes[] = {"200", "201", "400", "500"};
  for (int i = 0; i < PER_THREAD; i++) {
    const char *v[] = {codes[i % 4]};
    qm_metrics_inc(qm_metrics_child(hm->c, v));
    qm_metrics_observe(qm_metrics_child(hm->h, NULL), 0.25);
  }
  return NULL;
}

Test(metrics, concurrent_updates_are_not_lost) {
  qm_metrics_t *reg = qm_metrics_new();
  static const char *const labels[] = {"code", NULL};
  hammer_t hm = {qm_metrics_counter(reg, "n_total", "n", labels),
                 qm_metrics_histogram(reg, "t_seconds", "t", NULL, NULL, 0)};
  pthread_t th[THREADS];
  for (int i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, hammer, &hm);
  for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
  const char *v[] = {"500"};
  cr_assert_eq(qm_metrics_value(qm_metrics_child(hm.c, v)), THREADS * PER_THREAD / 4);
  cr_assert_eq(qm_metrics_value(qm_metrics_child(hm.h, NULL)), 0.25 * THREADS * PER_THREAD);
  char *text = render(reg);
  cr_assert_not_null(strstr(text, "t_seconds_count 80000\n"), "%s", text);
  cr_assert_not_null(strstr(text, "t_seconds_bucket{le=\"0.1\"} 0\n"));
  cr_assert_not_null(strstr(text, "t_seconds_bucket{le=\"0.25\"} 80000\n"));
  free(text);
  qm_metrics_destroy(reg);
}
