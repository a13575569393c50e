/*
 * qm-loadgen: the end-to-end benchmark of the access path. It submits N
 * auto-approvable access requests to intake at a target rate and measures,
 * for each, the time from the start of its POST /v1/requests to the moment
 * provisioning's AccessGranted event for it arrives on qm.access.v1 — the
 * whole path intake → outbox → Kafka → approval → outbox → Kafka →
 * provisioning → SCIM peer → outbox → Kafka, with the real services.
 *
 * Order of a run: (1) start the grant watcher (watch.c) and wait until its
 * consumer is positioned at the end of the topic; (2) submit the requests
 * (submit.c); (3) wait until every request that got a 201 was granted, or
 * --timeout seconds after the last submission; (4) print the report and a
 * last machine-readable line starting with "RESULT ".
 *
 * The figures: submit_rps is the rate at which requests were started, (k-1)
 * intervals between k starts, scaled by the share intake accepted (201), so
 * it compares with --rate and falls to 0 when nothing was accepted; POST
 * latency is start to complete response of every answered request;
 * submit->granted is start of the POST to receipt of the first
 * AccessGranted for its id, over the requests granted; granted_per_s is
 * grants received per second from the first start to the last grant;
 * errors counts requests without a 201 and an id; missing counts accepted
 * requests not granted when the wait ended.
 *
 * Percentiles are nearest-rank: the values are sorted and the p-th
 * percentile of n values is the one at rank ceil(p/100 * n) (1-based), so
 * every figure printed is a latency that was actually observed.
 * Exit status: 0 when every request was accepted and granted, 1 when any
 * was not, 2 on bad options or when the run could not start.
 */
#include "loadgen.h"

#include "qm_auth.h"
#include "qm_common.h"
#include "qm_log.h"

#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LG_DEV_SECRET "quartermaster-local-development-secret-do-not-use-in-production"
#define LG_READY_TIMEOUT_MS 30000
#define LG_SETTLE_MS 300
#define LG_HTTP_TIMEOUT_MS 30000
#define LG_PROGRESS_MS 5000
#define LG_SHOW_MISSING 3 /* ids of requests not granted, shown for follow-up */

typedef struct {
  const char *intake;
  const char *brokers;
  const char *prefix;
  const char *secret;
  long n;
  long rate;
  long concurrency;
  long timeout_s;
} lg_opts_t;

static void lg_usage(FILE *f) {
  fprintf(f,
          "usage: qm-loadgen [options]\n"
          "Submits N auto-approvable access requests to intake and measures throughput and\n"
          "submit-to-granted latency through approval and provisioning.\n\n"
          "  --intake URL       intake base URL (env QM_INTAKE_URL; http://127.0.0.1:8081)\n"
          "  --brokers LIST     Kafka brokers (env QM_KAFKA_BROKERS; 127.0.0.1:9092)\n"
          "  --prefix P         topic prefix (env QM_TOPIC_PREFIX; \"\")\n"
          "  -n N               requests to submit (1000)\n"
          "  --rate R           requests started per second; 0 = as fast as possible (0)\n"
          "  --concurrency C    HTTP requests in flight at most (32)\n"
          "  --timeout S        seconds to wait for grants after the last submit (120)\n"
          "  -h, --help         this text\n\n"
          "The bearer token is minted with env QM_AUTH_HS256_SECRET (else the local\n"
          "development secret) for p-0001 with role helpdesk.\n"
          "Exit status: 0 all granted, 1 some request failed or was not granted, 2 setup.\n");
}

/* Parses a whole decimal number within [min, max]. */
static int lg_parse_long(const char *name, const char *s, long min, long max, long *out) {
  char *end = NULL;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < min || v > max) {
    fprintf(stderr, "qm-loadgen: %s must be a whole number from %ld to %ld, not '%s'\n", name,
            min, max, s);
    return QM_EINVAL;
  }
  *out = v;
  return QM_OK;
}

static const char *lg_env(const char *name, const char *dflt) {
  const char *v = getenv(name);
  return v && *v ? v : dflt;
}

/* Fills o from the environment and argv. QM_EINVAL (after a message) on a
 * bad option, QM_ENOTFOUND when --help was asked for. */
static int lg_opts_parse(int argc, char **argv, lg_opts_t *o) {
  enum { OPT_INTAKE = 256, OPT_BROKERS, OPT_PREFIX, OPT_RATE, OPT_CONC, OPT_TIMEOUT };
  static const struct option longopts[] = {
      {"intake", required_argument, NULL, OPT_INTAKE},
      {"brokers", required_argument, NULL, OPT_BROKERS},
      {"prefix", required_argument, NULL, OPT_PREFIX},
      {"requests", required_argument, NULL, 'n'},
      {"rate", required_argument, NULL, OPT_RATE},
      {"concurrency", required_argument, NULL, OPT_CONC},
      {"timeout", required_argument, NULL, OPT_TIMEOUT},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0}};
  int c, rc = QM_OK;
  o->intake = lg_env("QM_INTAKE_URL", "http://127.0.0.1:8081");
  o->brokers = lg_env("QM_KAFKA_BROKERS", "127.0.0.1:9092");
  o->prefix = getenv("QM_TOPIC_PREFIX") ? getenv("QM_TOPIC_PREFIX") : "";
  o->secret = lg_env("QM_AUTH_HS256_SECRET", LG_DEV_SECRET);
  o->n = 1000;
  o->rate = 0;
  o->concurrency = 32;
  o->timeout_s = 120;
  while ((c = getopt_long(argc, argv, "n:h", longopts, NULL)) != -1) {
    switch (c) {
    case OPT_INTAKE: o->intake = optarg; break;
    case OPT_BROKERS: o->brokers = optarg; break;
    case OPT_PREFIX: o->prefix = optarg; break;
    case 'n': rc = lg_parse_long("-n", optarg, 1, 10000000, &o->n); break;
    case OPT_RATE: rc = lg_parse_long("--rate", optarg, 0, 1000000, &o->rate); break;
    case OPT_CONC: rc = lg_parse_long("--concurrency", optarg, 1, 4096, &o->concurrency); break;
    case OPT_TIMEOUT: rc = lg_parse_long("--timeout", optarg, 1, 86400, &o->timeout_s); break;
    case 'h': return QM_ENOTFOUND;
    default: lg_usage(stderr); return QM_EINVAL;
    }
    if (rc) return rc;
  }
  if (optind < argc) {
    fprintf(stderr, "qm-loadgen: unexpected argument '%s'\n", argv[optind]);
    return QM_EINVAL;
  }
  if (!*o->intake || !*o->brokers) {
    fprintf(stderr, "qm-loadgen: --intake and --brokers must not be empty\n");
    return QM_EINVAL;
  }
  return QM_OK;
}

static int lg_cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Nearest-rank percentile p (0 < p <= 100) of n sorted values, in ms. */
static double lg_pct_ms(const int64_t *sorted, size_t n, double p) {
  if (n == 0) return 0;
  size_t rank = (size_t)ceil(p / 100.0 * (double)n);
  if (rank < 1) rank = 1;
  if (rank > n) rank = n;
  return (double)sorted[rank - 1] / 1000.0;
}

/* lg_watch_expect() as the submitter's callback. */
static void lg_on_created(void *ctx, const char *id) { lg_watch_expect(ctx, id); }

/* Prints "201 x1998, 409 x2, transport error x1" for the requests. */
static void lg_print_statuses(const lg_req_t *reqs, size_t n) {
  size_t counts[600] = {0}, other = 0, unsent = 0;
  bool first = true;
  for (size_t i = 0; i < n; i++) {
    if (!reqs[i].start_us || !reqs[i].end_us) unsent++;
    else if (reqs[i].status >= 0 && reqs[i].status < 600) counts[reqs[i].status]++;
    else other++;
  }
  printf("  HTTP statuses:    ");
  for (int s = 0; s < 600; s++) {
    if (!counts[s]) continue;
    if (s == 0) printf("%stransport error x%zu", first ? "" : ", ", counts[s]);
    else printf("%s%d x%zu", first ? "" : ", ", s, counts[s]);
    first = false;
  }
  if (other) printf("%sother x%zu", first ? "" : ", ", other), first = false;
  if (unsent) printf("%snot sent or unfinished x%zu", first ? "" : ", ", unsent), first = false;
  printf("\n");
}

int main(int argc, char **argv) {
  int rc, exit_code = 2;
  lg_opts_t o;
  lg_watch_t *w = NULL;
  lg_req_t *reqs = NULL;
  int64_t *http_lat = NULL, *e2e = NULL;
  char *token = NULL, *url = NULL;
  char errstr[512];
  bool curl_up = false;

  rc = lg_opts_parse(argc, argv, &o);
  if (rc == QM_ENOTFOUND) {
    lg_usage(stdout);
    return 0;
  }
  if (rc) return 2;
  qm_log_init("loadgen", QM_LOG_WARN, stderr);
  qm_signals_install();
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    fprintf(stderr, "qm-loadgen: curl_global_init failed\n");
    goto out;
  }
  curl_up = true;

  const char *roles[] = {"helpdesk"};
  if (qm_auth_mint_hs256(o.secret, "p-0001", roles, 1, 24 * 3600, &token) != QM_OK) {
    fprintf(stderr, "qm-loadgen: cannot mint a token (QM_AUTH_HS256_SECRET must be at least %d "
                    "bytes)\n", QM_AUTH_MIN_SECRET);
    goto out;
  }
  size_t ilen = strlen(o.intake);
  url = qm_asprintf("%.*s/v1/requests", (int)(ilen && o.intake[ilen - 1] == '/' ? ilen - 1 : ilen),
                    o.intake);

  printf("qm-loadgen: %ld requests to %s at %ld/s (0 = unlimited), concurrency %ld; grants "
         "from %sqm.access.v1 at %s\n",
         o.n, url, o.rate, o.concurrency, o.prefix, o.brokers);
  fflush(stdout);

  int64_t t_ready = qm_mono_ms();
  rc = lg_watch_start(o.brokers, o.prefix, LG_READY_TIMEOUT_MS, LG_SETTLE_MS, &w, errstr,
                      sizeof(errstr));
  if (rc) {
    fprintf(stderr, "qm-loadgen: cannot watch for grants: %s\n", errstr);
    goto out;
  }
  printf("  grant consumer positioned in %lld ms\n", (long long)(qm_mono_ms() - t_ready));
  fflush(stdout);

  /* -------------------------------------------------------------- submit */
  size_t n = (size_t)o.n;
  reqs = qm_calloc(n, sizeof(*reqs));
  lg_submit_info_t info;
  lg_submit_conf_t sc = {.url = url,
                         .token = token,
                         .n = n,
                         .rate = o.rate,
                         .concurrency = o.concurrency,
                         .http_timeout_ms = LG_HTTP_TIMEOUT_MS,
                         .on_created = lg_on_created,
                         .cb_ctx = w};
  rc = lg_submit_run(&sc, reqs, &info, errstr, sizeof(errstr));
  if (rc && rc != QM_ESHUTDOWN) {
    fprintf(stderr, "qm-loadgen: %s\n", errstr);
    goto out;
  }
  if (rc == QM_ESHUTDOWN) fprintf(stderr, "qm-loadgen: %s; reporting what was done\n", errstr);

  size_t n_ok = 0, n_http = 0, n_started = 0;
  int64_t first_start = INT64_MAX, last_start = 0, last_end = 0;
  http_lat = qm_calloc(n, sizeof(*http_lat));
  for (size_t i = 0; i < n; i++) {
    if (!reqs[i].start_us) continue;
    n_started++;
    if (reqs[i].start_us < first_start) first_start = reqs[i].start_us;
    if (reqs[i].start_us > last_start) last_start = reqs[i].start_us;
    if (reqs[i].end_us > last_end) last_end = reqs[i].end_us;
    if (reqs[i].end_us && reqs[i].status > 0) http_lat[n_http++] = reqs[i].end_us - reqs[i].start_us;
    if (reqs[i].id[0]) n_ok++;
  }

  /* ---------------------------------------------------------------- wait */
  /* Progress every few seconds on stderr, so a long wait is not silent. */
  int64_t deadline = qm_mono_ms() + o.timeout_s * 1000;
  while (!qm_shutdown_requested() && qm_mono_ms() < deadline) {
    int64_t step = qm_mono_ms() + LG_PROGRESS_MS;
    size_t settled = lg_watch_wait(w, n_ok, step < deadline ? step : deadline);
    if (settled >= n_ok || qm_mono_ms() >= deadline) break;
    fprintf(stderr, "qm-loadgen: %zu of %zu requests settled; waiting up to %lld s more\n",
            settled, n_ok, (long long)((deadline - qm_mono_ms()) / 1000));
  }

  /* -------------------------------------------------------------- report */
  size_t n_granted = 0, n_prov_failed = 0, n_dup = 0, n_shown = 0;
  char shown[LG_SHOW_MISSING][LG_ID_MAX];
  int64_t last_grant = 0;
  e2e = qm_calloc(n, sizeof(*e2e));
  for (size_t i = 0; i < n; i++) {
    if (!reqs[i].id[0]) continue;
    lg_outcome_t oc;
    lg_watch_outcome(w, reqs[i].id, &oc);
    if (!oc.granted_us && n_shown < LG_SHOW_MISSING)
      qm_strlcpy(shown[n_shown++], reqs[i].id, sizeof(shown[0]));
    if (oc.granted_us) {
      int64_t d = oc.granted_us - reqs[i].start_us;
      e2e[n_granted++] = d > 0 ? d : 0;
      if (oc.granted_us > last_grant) last_grant = oc.granted_us;
      if (oc.n_grants > 1) n_dup++;
    } else if (oc.failed_us) {
      n_prov_failed++;
    }
  }
  lg_watch_stats_t ws;
  lg_watch_stats(w, &ws);
  qsort(http_lat, n_http, sizeof(*http_lat), lg_cmp_i64);
  qsort(e2e, n_granted, sizeof(*e2e), lg_cmp_i64);

  size_t errors = n - n_ok, missing = n_ok - n_granted;
  /* The achieved rate is that of the starts, (k - 1) intervals between k
   * starts, so that it compares with --rate without a fence-post error. */
  double start_s = last_start > first_start ? (double)(last_start - first_start) / 1e6 : 0;
  double start_rps = start_s > 0 ? (double)(n_started - 1) / start_s : 0;
  double submit_rps = n_started ? start_rps * (double)n_ok / (double)n_started : 0;
  double submit_s = last_end > first_start ? (double)(last_end - first_start) / 1e6 : 0;
  double grant_s = last_grant > first_start ? (double)(last_grant - first_start) / 1e6 : 0;
  double granted_per_s = grant_s > 0 ? (double)n_granted / grant_s : 0;

  printf("\n== qm-loadgen report ==\n");
  if (o.rate) printf("  requested rate:   %ld req/s, %ld in flight at most\n", o.rate, o.concurrency);
  else printf("  requested rate:   unlimited, %ld in flight at most\n", o.concurrency);
  printf("  submitted:        %zu started at %.1f req/s, accepted (201) at %.1f req/s; all "
         "answered %.2f s after the first start\n",
         n_started, start_rps, submit_rps, submit_s);
  lg_print_statuses(reqs, n);
  if (errors && info.sample_status[0])
    printf("  first failure:    %s %.200s\n", info.sample_status, info.sample_body);
  printf("  POST latency:     p50 %.1f ms, p99 %.1f ms, max %.1f ms (%zu answered)\n",
         lg_pct_ms(http_lat, n_http, 50), lg_pct_ms(http_lat, n_http, 99),
         lg_pct_ms(http_lat, n_http, 100), n_http);
  printf("  granted:          %zu of %zu accepted (not granted %zu, of which provisioning "
         "failed %zu; duplicate grant events for %zu)\n",
         n_granted, n_ok, missing, n_prov_failed, n_dup);
  if (n_shown) {
    printf("  not granted, e.g.:");
    for (size_t i = 0; i < n_shown; i++) printf(" %s", shown[i]);
    printf("\n                    (GET /v1/requests/<id> on intake shows where each stopped)\n");
  }
  printf("  submit->granted:  p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms\n",
         lg_pct_ms(e2e, n_granted, 50), lg_pct_ms(e2e, n_granted, 90),
         lg_pct_ms(e2e, n_granted, 99), lg_pct_ms(e2e, n_granted, 100));
  printf("  grant throughput: %zu grants in %.2f s (first submit to last grant) = %.1f grants/s\n",
         n_granted, grant_s, granted_per_s);
  printf("  access topic:     %llu events read (%llu grants of any request, %llu undecodable)\n",
         (unsigned long long)ws.events, (unsigned long long)ws.granted,
         (unsigned long long)ws.undecodable);
  if (qm_shutdown_requested())
    printf("  interrupted:      the run was cut short; the figures cover what happened until then\n");
  printf("RESULT n=%zu submit_rps=%.1f granted_per_s=%.1f p50_ms=%.1f p90_ms=%.1f p99_ms=%.1f "
         "max_ms=%.1f errors=%zu missing=%zu\n",
         n, submit_rps, granted_per_s, lg_pct_ms(e2e, n_granted, 50),
         lg_pct_ms(e2e, n_granted, 90), lg_pct_ms(e2e, n_granted, 99),
         lg_pct_ms(e2e, n_granted, 100), errors, missing);
  fflush(stdout);
  exit_code = errors || missing ? 1 : 0;
out:
  lg_watch_destroy(w);
  free(e2e);
  free(http_lat);
  free(reqs);
  free(url);
  free(token);
  if (curl_up) curl_global_cleanup();
  return exit_code;
}
