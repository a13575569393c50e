/*
 * qm-loadgen: the end-to-end benchmark of the access path. It submits N
 * auto-approvable access requests to intake at a target rate and measures,
 * for each, the time from the start of its POST /v1/requests to the moment
 * provisioning's AccessGranted event for it arrives on qm.access.v1 — the
 * whole path intake → outbox → Kafka → approval → outbox → Kafka →
 * provisioning → SCIM peer → outbox → Kafka, with the real services — and,
 * on the way, to the moment approval's RequestApproved for it arrives on
 * qm.decisions.v1: intake → outbox → Kafka → approval → outbox → Kafka,
 * our own code only, without provisioning and its SCIM peer.
 *
 * Order of a run: (1) start the watcher (watch.c) and wait until its
 * consumer is positioned at the end of the topics; (2) submit the requests
 * (submit.c); (3) wait until every request that got a 201 was granted, or
 * --timeout seconds after the last submission; (4) print the report and a
 * last machine-readable line starting with "RESULT ".
 *
 * With --submit-only there is no watcher and no wait: the run is (2) and a
 * report of the HTTP side alone (intake's POST /v1/requests), and Kafka is
 * not needed. With --extend, a step (0) first looks up what each person
 * already holds (held.c), since intake refuses a fresh request for a held
 * role; such requests then extend the grant instead.
 *
 * The figures: submit_rps is the rate at which requests were started, (k-1)
 * intervals between k starts, scaled by the share intake accepted (201), so
 * it compares with --rate and falls to 0 when nothing was accepted; POST
 * latency is start to complete response of every answered request;
 * submit->granted is start of the POST to receipt of the first
 * AccessGranted for its id, over the requests granted; granted_per_s is
 * grants received per second from the first start to the last grant;
 * submit->approved and approved_per_s are the same for the first
 * RequestApproved, over the requests approved; answered_rps (submit-only)
 * is responses of any status per second from the first start to the last
 * response;
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
  bool submit_only; /* no watcher, no wait: the POST side alone */
  long people;      /* p-0001..p-<people> */
  bool extend;      /* a held pair extends the request that granted it */
  const char *held_file; /* NULL, or where to write the grants found (--extend) */
} lg_opts_t;

/* The HTTP side of a run, from the per-request records. */
typedef struct {
  size_t n_started, n_ok, n_http; /* started; accepted (201 and an id); answered */
  int64_t first_start, last_start, last_end;
  double start_rps;   /* (k - 1) intervals between k starts */
  double submit_rps;  /* start_rps scaled by the share accepted */
  double submit_s;    /* first start to last response */
  double answered_rps; /* responses of any status per second over submit_s */
} lg_http_sum_t;

static void lg_usage(FILE *f) {
  fprintf(f,
          "usage: qm-loadgen [options]\n"
          "Submits N auto-approvable access requests to intake and measures throughput and\n"
          "latency from submit to approved (approval) and to granted (provisioning).\n\n"
          "  --intake URL       intake base URL (env QM_INTAKE_URL; http://127.0.0.1:8081)\n"
          "  --brokers LIST     Kafka brokers (env QM_KAFKA_BROKERS; 127.0.0.1:9092)\n"
          "  --prefix P         topic prefix (env QM_TOPIC_PREFIX; \"\")\n"
          "  -n N               requests to submit (1000)\n"
          "  --rate R           requests started per second; 0 = as fast as possible (0)\n"
          "  --concurrency C    HTTP requests in flight at most (32)\n"
          "  --timeout S        seconds to wait for grants after the last submit (120)\n"
          "  --submit-only      only submit and time the POSTs: no Kafka, no wait for\n"
          "                     approvals or grants (intake alone)\n"
          "  --people P         subjects p-0001..p-P; pairs repeat every 6 x P requests (300)\n"
          "  --extend           look up what each person holds first; a request for a held\n"
          "                     role extends its grant (intake refuses a second grant)\n"
          "  --held-file F      with --extend: also write the grants found to F, one\n"
          "                     \"person item role request-id\" a line (for bench/intake.lua)\n"
          "  -h, --help         this text\n\n"
          "The bearer token is minted with env QM_AUTH_HS256_SECRET (else the local\n"
          "development secret) for p-0001 with role helpdesk.\n"
          "Exit status: 0 all granted (--submit-only: all accepted), 1 some request failed or\n"
          "was not granted, 2 setup.\n");
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
  enum {
    OPT_INTAKE = 256, OPT_BROKERS, OPT_PREFIX, OPT_RATE, OPT_CONC, OPT_TIMEOUT,
    OPT_SUBMIT_ONLY, OPT_PEOPLE, OPT_EXTEND, OPT_HELD_FILE
  };
  static const struct option longopts[] = {
      {"intake", required_argument, NULL, OPT_INTAKE},
      {"brokers", required_argument, NULL, OPT_BROKERS},
      {"prefix", required_argument, NULL, OPT_PREFIX},
      {"requests", required_argument, NULL, 'n'},
      {"rate", required_argument, NULL, OPT_RATE},
      {"concurrency", required_argument, NULL, OPT_CONC},
      {"timeout", required_argument, NULL, OPT_TIMEOUT},
      {"submit-only", no_argument, NULL, OPT_SUBMIT_ONLY},
      {"people", required_argument, NULL, OPT_PEOPLE},
      {"extend", no_argument, NULL, OPT_EXTEND},
      {"held-file", required_argument, NULL, OPT_HELD_FILE},
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
  o->submit_only = false;
  o->people = 300;
  o->extend = false;
  o->held_file = NULL;
  while ((c = getopt_long(argc, argv, "n:h", longopts, NULL)) != -1) {
    switch (c) {
    case OPT_INTAKE: o->intake = optarg; break;
    case OPT_BROKERS: o->brokers = optarg; break;
    case OPT_PREFIX: o->prefix = optarg; break;
    case 'n': rc = lg_parse_long("-n", optarg, 1, 10000000, &o->n); break;
    case OPT_RATE: rc = lg_parse_long("--rate", optarg, 0, 1000000, &o->rate); break;
    case OPT_CONC: rc = lg_parse_long("--concurrency", optarg, 1, 4096, &o->concurrency); break;
    case OPT_TIMEOUT: rc = lg_parse_long("--timeout", optarg, 1, 86400, &o->timeout_s); break;
    case OPT_SUBMIT_ONLY: o->submit_only = true; break;
    case OPT_PEOPLE: rc = lg_parse_long("--people", optarg, 1, 1000000, &o->people); break;
    case OPT_EXTEND: o->extend = true; break;
    case OPT_HELD_FILE: o->held_file = optarg; break;
    case 'h': return QM_ENOTFOUND;
    default: lg_usage(stderr); return QM_EINVAL;
    }
    if (rc) return rc;
  }
  if (optind < argc) {
    fprintf(stderr, "qm-loadgen: unexpected argument '%s'\n", argv[optind]);
    return QM_EINVAL;
  }
  if (o->held_file && !o->extend) {
    fprintf(stderr, "qm-loadgen: --held-file needs --extend\n");
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

/* Sums up the HTTP side of the run from the records; http_lat (n entries)
 * receives the POST latencies of the answered requests, unsorted. */
static void lg_http_sum(const lg_req_t *reqs, size_t n, int64_t *http_lat, lg_http_sum_t *h) {
  memset(h, 0, sizeof(*h));
  h->first_start = INT64_MAX;
  for (size_t i = 0; i < n; i++) {
    if (!reqs[i].start_us) continue;
    h->n_started++;
    if (reqs[i].start_us < h->first_start) h->first_start = reqs[i].start_us;
    if (reqs[i].start_us > h->last_start) h->last_start = reqs[i].start_us;
    if (reqs[i].end_us > h->last_end) h->last_end = reqs[i].end_us;
    if (reqs[i].end_us && reqs[i].status > 0)
      http_lat[h->n_http++] = reqs[i].end_us - reqs[i].start_us;
    if (reqs[i].id[0]) h->n_ok++;
  }
  /* The achieved rate is that of the starts, (k - 1) intervals between k
   * starts, so that it compares with --rate without a fence-post error. */
  double start_s = h->last_start > h->first_start
                       ? (double)(h->last_start - h->first_start) / 1e6 : 0;
  h->start_rps = start_s > 0 ? (double)(h->n_started - 1) / start_s : 0;
  h->submit_rps = h->n_started ? h->start_rps * (double)h->n_ok / (double)h->n_started : 0;
  h->submit_s = h->last_end > h->first_start ? (double)(h->last_end - h->first_start) / 1e6 : 0;
  h->answered_rps = h->submit_s > 0 ? (double)h->n_http / h->submit_s : 0;
}

/* Prints the report's HTTP lines: rate, submissions, statuses, first
 * failure, POST latency (http_lat sorted, h->n_http entries). */
static void lg_print_http(const lg_opts_t *o, const lg_req_t *reqs, size_t n,
                          const lg_submit_info_t *info, const lg_http_sum_t *h,
                          const int64_t *http_lat) {
  if (o->rate) printf("  requested rate:   %ld req/s, %ld in flight at most\n", o->rate, o->concurrency);
  else printf("  requested rate:   unlimited, %ld in flight at most\n", o->concurrency);
  printf("  submitted:        %zu started at %.1f req/s, accepted (201) at %.1f req/s; all "
         "answered %.2f s after the first start\n",
         h->n_started, h->start_rps, h->submit_rps, h->submit_s);
  if (o->submit_only)
    printf("  answered:         %zu responses at %.1f req/s (first start to last response)\n",
           h->n_http, h->answered_rps);
  if (o->extend) {
    size_t n_ext = 0;
    for (size_t i = 0; i < n; i++) n_ext += reqs[i].start_us && reqs[i].extends;
    printf("  extensions:       %zu of the %zu started extend a held grant\n", n_ext,
           h->n_started);
  }
  lg_print_statuses(reqs, n);
  if (n - h->n_ok && info->sample_status[0])
    printf("  first failure:    %s %.200s\n", info->sample_status, info->sample_body);
  printf("  POST latency:     p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms (%zu answered)\n",
         lg_pct_ms(http_lat, h->n_http, 50), lg_pct_ms(http_lat, h->n_http, 90),
         lg_pct_ms(http_lat, h->n_http, 99), lg_pct_ms(http_lat, h->n_http, 100), h->n_http);
}

/* The legs of the path, each from the end of the one before. Their times
 * are wall-clock milliseconds: the request's start, the Kafka timestamps
 * (set when a service's outbox relay produced the event) and the event
 * times (set when the service made the event, in its transaction). */
enum {
  LG_LEG_SUBMITTED,   /* start of the POST -> RequestSubmitted on Kafka */
  LG_LEG_APPROVAL,    /* -> RequestApproved made by approval */
  LG_LEG_APPROVAL_OUT, /* -> RequestApproved on Kafka */
  LG_LEG_APPROVAL_RECV, /* -> received by qm-loadgen */
  LG_LEG_PROVISION,   /* RequestApproved on Kafka -> AccessGranted made by provisioning */
  LG_LEG_PROVISION_OUT, /* -> AccessGranted on Kafka */
  LG_LEG_GRANT_RECV,  /* -> received by qm-loadgen */
  LG_LEGS
};

static const char *const lg_leg_names[LG_LEGS] = {
    "POST + intake outbox -> qm.requests.v1", "-> approval made RequestApproved",
    "-> approval's outbox -> qm.decisions.v1", "-> qm-loadgen received it",
    "qm.decisions.v1 -> provisioning made AccessGranted (incl. SCIM)",
    "-> provisioning's outbox -> qm.access.v1", "-> qm-loadgen received it"};

/* Adds the legs of one request to legs[k][count[k]] (microseconds, for
 * lg_pct_ms), each only when both its ends were seen. */
static void lg_legs_add(const lg_req_t *r, const lg_outcome_t *oc, int64_t **legs,
                        size_t *count) {
  /* Two chains of stamps; leg k runs from stamp k to stamp k + 1. */
  const int64_t a[5] = {r->start_ms, oc->submitted_kafka_ms, oc->approved_ce_ms,
                        oc->approved_kafka_ms, oc->approved_recv_ms};
  const int64_t g[4] = {oc->approved_kafka_ms, oc->granted_ce_ms, oc->granted_kafka_ms,
                        oc->granted_recv_ms};
  for (int k = 0; k < 4; k++)
    if (a[k] > 0 && a[k + 1] > 0)
      legs[LG_LEG_SUBMITTED + k][count[LG_LEG_SUBMITTED + k]++] = (a[k + 1] - a[k]) * 1000;
  for (int k = 0; k < 3; k++)
    if (g[k] > 0 && g[k + 1] > 0)
      legs[LG_LEG_PROVISION + k][count[LG_LEG_PROVISION + k]++] = (g[k + 1] - g[k]) * 1000;
}

/* Prints the legs (sorting them), p50 / p99 / max of each. The stamps are
 * milliseconds from different processes' clocks, so a leg may come out a
 * millisecond negative; it is shown as is. */
static void lg_legs_print(int64_t **legs, const size_t *count) {
  printf("  legs, p50 / p99 / max ms (wall clock, +-1 ms; percentiles of legs do not add up):\n");
  for (int k = 0; k < LG_LEGS; k++) {
    qsort(legs[k], count[k], sizeof(*legs[k]), lg_cmp_i64);
    printf("    %-62s %7.0f / %7.0f / %7.0f  (%zu)\n", lg_leg_names[k],
           lg_pct_ms(legs[k], count[k], 50), lg_pct_ms(legs[k], count[k], 99),
           lg_pct_ms(legs[k], count[k], 100), count[k]);
  }
}

int main(int argc, char **argv) {
  int rc, exit_code = 2;
  lg_opts_t o;
  lg_watch_t *w = NULL;
  lg_held_t *held = NULL;
  lg_req_t *reqs = NULL;
  int64_t *http_lat = NULL, *e2e = NULL, *a2e = NULL;
  int64_t *legs[LG_LEGS] = {NULL};
  size_t n_legs[LG_LEGS] = {0};
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
  int blen = (int)(ilen && o.intake[ilen - 1] == '/' ? ilen - 1 : ilen);
  url = qm_asprintf("%.*s/v1/requests", blen, o.intake);

  if (o.submit_only) {
    printf("qm-loadgen: %ld requests to %s at %ld/s (0 = unlimited), concurrency %ld; submit "
           "only (no Kafka, no wait for approvals or grants)\n",
           o.n, url, o.rate, o.concurrency);
  } else {
    printf("qm-loadgen: %ld requests to %s at %ld/s (0 = unlimited), concurrency %ld; "
           "approvals from %sqm.decisions.v1, grants from %sqm.access.v1 at %s\n",
           o.n, url, o.rate, o.concurrency, o.prefix, o.prefix, o.brokers);
  }
  if (o.n > LG_ROLES * o.people)
    printf("  note: %ld requests over %ld (person, role) pairs: a pair repeats in this run, and "
           "intake refuses a request while the pair's earlier one is still on its way (409 "
           "already_pending)\n", o.n, LG_ROLES * o.people);
  fflush(stdout);

  if (o.extend) {
    int64_t t_held = qm_mono_ms();
    char *base = qm_asprintf("%.*s", blen, o.intake);
    rc = lg_held_load(base, token, (size_t)o.people, &held, errstr, sizeof(errstr));
    free(base);
    if (rc) {
      fprintf(stderr, "qm-loadgen: cannot look up what people hold: %s\n", errstr);
      goto out;
    }
    printf("  held grants:      %zu (person, item, role) found in %lld ms; requests for them "
           "extend them\n", lg_held_count(held), (long long)(qm_mono_ms() - t_held));
    if (o.held_file && lg_held_write(held, o.held_file, errstr, sizeof(errstr)) != QM_OK) {
      fprintf(stderr, "qm-loadgen: %s\n", errstr);
      goto out;
    }
    fflush(stdout);
  }

  if (!o.submit_only) {
    int64_t t_ready = qm_mono_ms();
    rc = lg_watch_start(o.brokers, o.prefix, LG_READY_TIMEOUT_MS, LG_SETTLE_MS, &w, errstr,
                        sizeof(errstr));
    if (rc) {
      fprintf(stderr, "qm-loadgen: cannot watch for approvals and grants: %s\n", errstr);
      goto out;
    }
    printf("  consumer positioned in %lld ms\n", (long long)(qm_mono_ms() - t_ready));
    fflush(stdout);
  }

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
                         .people = (size_t)o.people,
                         .held = held,
                         .on_created = w ? lg_on_created : NULL,
                         .cb_ctx = w};
  rc = lg_submit_run(&sc, reqs, &info, errstr, sizeof(errstr));
  if (rc && rc != QM_ESHUTDOWN) {
    fprintf(stderr, "qm-loadgen: %s\n", errstr);
    goto out;
  }
  if (rc == QM_ESHUTDOWN) fprintf(stderr, "qm-loadgen: %s; reporting what was done\n", errstr);

  lg_http_sum_t h;
  http_lat = qm_calloc(n, sizeof(*http_lat));
  lg_http_sum(reqs, n, http_lat, &h);
  qsort(http_lat, h.n_http, sizeof(*http_lat), lg_cmp_i64);
  size_t errors = n - h.n_ok;

  if (o.submit_only) {
    printf("\n== qm-loadgen report (submit only) ==\n");
    lg_print_http(&o, reqs, n, &info, &h, http_lat);
    if (qm_shutdown_requested())
      printf("  interrupted:      the run was cut short; the figures cover what happened until then\n");
    printf("RESULT n=%zu submit_rps=%.1f start_rps=%.1f answered_rps=%.1f post_p50_ms=%.1f "
           "post_p90_ms=%.1f post_p99_ms=%.1f post_max_ms=%.1f errors=%zu\n",
           n, h.submit_rps, h.start_rps, h.answered_rps, lg_pct_ms(http_lat, h.n_http, 50),
           lg_pct_ms(http_lat, h.n_http, 90), lg_pct_ms(http_lat, h.n_http, 99),
           lg_pct_ms(http_lat, h.n_http, 100), errors);
    fflush(stdout);
    exit_code = errors ? 1 : 0;
    goto out;
  }

  /* ---------------------------------------------------------------- wait */
  /* Progress every few seconds on stderr, so a long wait is not silent. */
  size_t n_ok = h.n_ok;
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
  size_t n_approved = 0, n_rejected = 0;
  char shown[LG_SHOW_MISSING][LG_ID_MAX];
  int64_t last_grant = 0, last_approved = 0;
  e2e = qm_calloc(n, sizeof(*e2e));
  a2e = qm_calloc(n, sizeof(*a2e));
  for (int k = 0; k < LG_LEGS; k++) legs[k] = qm_calloc(n, sizeof(*legs[k]));
  for (size_t i = 0; i < n; i++) {
    if (!reqs[i].id[0]) continue;
    lg_outcome_t oc;
    lg_watch_outcome(w, reqs[i].id, &oc);
    if (!oc.granted_us && n_shown < LG_SHOW_MISSING)
      qm_strlcpy(shown[n_shown++], reqs[i].id, sizeof(shown[0]));
    lg_legs_add(&reqs[i], &oc, legs, n_legs);
    if (oc.approved_us) {
      int64_t d = oc.approved_us - reqs[i].start_us;
      a2e[n_approved++] = d > 0 ? d : 0;
      if (oc.approved_us > last_approved) last_approved = oc.approved_us;
    } else if (oc.rejected_us) {
      n_rejected++;
    }
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
  qsort(e2e, n_granted, sizeof(*e2e), lg_cmp_i64);
  qsort(a2e, n_approved, sizeof(*a2e), lg_cmp_i64);

  size_t missing = n_ok - n_granted;
  double grant_s = last_grant > h.first_start ? (double)(last_grant - h.first_start) / 1e6 : 0;
  double granted_per_s = grant_s > 0 ? (double)n_granted / grant_s : 0;
  double approved_s =
      last_approved > h.first_start ? (double)(last_approved - h.first_start) / 1e6 : 0;
  double approved_per_s = approved_s > 0 ? (double)n_approved / approved_s : 0;

  printf("\n== qm-loadgen report ==\n");
  lg_print_http(&o, reqs, n, &info, &h, http_lat);
  printf("  approved:         %zu of %zu accepted (rejected %zu, neither %zu)\n", n_approved,
         n_ok, n_rejected, n_ok - n_approved - n_rejected);
  printf("  submit->approved: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms\n",
         lg_pct_ms(a2e, n_approved, 50), lg_pct_ms(a2e, n_approved, 90),
         lg_pct_ms(a2e, n_approved, 99), lg_pct_ms(a2e, n_approved, 100));
  printf("  approved throughput: %zu approvals in %.2f s (first submit to last approval) = %.1f "
         "approved/s\n",
         n_approved, approved_s, approved_per_s);
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
  lg_legs_print(legs, n_legs);
  printf("  requests topic:   %llu events read\n", (unsigned long long)ws.request_events);
  printf("  decisions topic:  %llu events read (%llu approvals of any request, %llu undecodable)\n",
         (unsigned long long)ws.decision_events, (unsigned long long)ws.approved,
         (unsigned long long)ws.decision_undecodable);
  printf("  access topic:     %llu events read (%llu grants of any request, %llu undecodable)\n",
         (unsigned long long)ws.events, (unsigned long long)ws.granted,
         (unsigned long long)ws.undecodable);
  if (qm_shutdown_requested())
    printf("  interrupted:      the run was cut short; the figures cover what happened until then\n");
  printf("RESULT n=%zu submit_rps=%.1f granted_per_s=%.1f p50_ms=%.1f p90_ms=%.1f p99_ms=%.1f "
         "max_ms=%.1f errors=%zu missing=%zu approved_per_s=%.1f ap50_ms=%.1f ap99_ms=%.1f\n",
         n, h.submit_rps, granted_per_s, lg_pct_ms(e2e, n_granted, 50),
         lg_pct_ms(e2e, n_granted, 90), lg_pct_ms(e2e, n_granted, 99),
         lg_pct_ms(e2e, n_granted, 100), errors, missing, approved_per_s,
         lg_pct_ms(a2e, n_approved, 50), lg_pct_ms(a2e, n_approved, 99));
  fflush(stdout);
  exit_code = errors || missing ? 1 : 0;
out:
  lg_watch_destroy(w);
  lg_held_destroy(held);
  for (int k = 0; k < LG_LEGS; k++) free(legs[k]);
  free(a2e);
  free(e2e);
  free(http_lat);
  free(reqs);
  free(url);
  free(token);
  if (curl_up) curl_global_cleanup();
  return exit_code;
}
