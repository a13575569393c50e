/*
 * audit-genreq: a large, realistic audit ledger for timing evidence, search
 * and reports, and a probe that times those queries over HTTP.
 *
 *   audit-genreq gen -n 1000000 --chains 3 --heads heads.copy --facts facts.copy
 *                    --ids ids.txt > ledger.copy
 *   audit-genreq probe URL TOKEN ids.txt N
 *
 * `gen` writes whole request lifecycles — submitted, then approved at once
 * (70%) or after an approval step (25%) or rejected (5%, a fifth of them by
 * timeout); granted; a third later revoked (expiry, leaver, admin) — with
 * real protobuf payloads, chained with the service's own chain_hash() and
 * their report facts from the service's own audit_payload_facts(), as
 * PostgreSQL COPY text for audit.ledger (stdout), audit.ledger_facts
 * (--facts) and audit.chain_heads (--heads), spread over the past year.
 * It BYPASSES THE SERVICE (no Kafka, inbox or outbox). --ids receives a
 * sample of 2000 request ids for the probe.
 *
 * `probe` GETs /v1/audit/requests/{id}/evidence for N ids from the file, one
 * at a time over one keep-alive connection, then a search by person and each
 * report, and prints latency percentiles.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "chain.h"
#include "payload.h"

#include "qm_common.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/hr.pb-c.h"
#include "qm/v1/requests.pb-c.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- gen ------------------------------------------------------------------ */

#define N_PEOPLE 5000

static const char *const items[][3] = {
    /* item, role, group */
    {"figma", "viewer", "app-figma-viewer"},     {"slack", "user", "app-slack-user"},
    {"github", "read", "app-github-read"},       {"github", "write", "app-github-write"},
    {"jira", "user", "app-jira-user"},           {"confluence", "user", "app-confluence-user"},
    {"aws", "readonly", "app-aws-readonly"},     {"aws", "prod-admin", "app-aws-prod-admin"},
    {"salesforce", "user", "app-salesforce-user"}, {"netsuite", "user", "app-netsuite-user"},
    {"tableau", "viewer", "app-tableau-viewer"}, {"zoom", "user", "app-zoom-user"},
};
static const char *const departments[] = {"Engineering", "Sales", "Support", "Finance",
                                          "Marketing",   "HR",    "Legal",   "Operations"};

typedef struct gen {
  int n_chains;
  int64_t *seq;
  uint8_t (*prev)[CHAIN_HASH_LEN];
  FILE *ledger, *facts;
  int64_t written;
  uint64_t rng;
} gen_t;

static uint64_t rnd(gen_t *g) { /* xorshift64* */
  g->rng ^= g->rng >> 12;
  g->rng ^= g->rng << 25;
  g->rng ^= g->rng >> 27;
  return g->rng * 2685821657736338717ULL;
}

static void uuid(gen_t *g, char out[37]) {
  uint64_t a = rnd(g), b = rnd(g);
  snprintf(out, 37, "%08x-%04x-4%03x-8%03x-%012llx", (unsigned)(a >> 32), (unsigned)(a >> 16) & 0xffff,
           (unsigned)a & 0xfff, (unsigned)(b >> 52) & 0xfff, (unsigned long long)(b & 0xffffffffffffULL));
}

static void hex(FILE *f, const uint8_t *p, size_t n) {
  static const char d[] = "0123456789abcdef";
  fputs("\\\\x", f);
  for (size_t i = 0; i < n; i++) {
    fputc(d[p[i] >> 4], f);
    fputc(d[p[i] & 15], f);
  }
}

typedef struct {
  gen_t *g;
  const char *chain_id;
  int64_t seq;
} fact_out_t;

static int fact_write(void *ctx, const audit_fact_t *f) {
  fact_out_t *o = ctx;
  fprintf(o->g->facts, "%s\t%lld\t%s\t%d\t%lld\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", o->chain_id,
          (long long)o->seq, f->kind, f->line_no, (long long)f->at_ms, f->request_id, f->person_id,
          f->actor_id, f->item_id, f->department, f->reason, f->object_id, f->flag ? "t" : "f");
  return 0;
}

/* Appends one record: msg packed as the payload of topic. */
static void emit(gen_t *g, const char *topic, const char *type, const char *source,
                 const char *person, const char *request_id, int64_t at_ms,
                 const ProtobufCMessage *msg) {
  uint8_t buf[4096];
  size_t len = protobuf_c_message_pack(msg, buf);
  audit_payload_t p;
  audit_payload_decode(topic, buf, len, &p);
  int c = chain_pick(person, strlen(person), g->n_chains);
  char chain_id[CHAIN_ID_MAX];
  chain_name(c, chain_id);
  char event_id[37];
  uuid(g, event_id);
  chain_record_t r = {.chain_id = chain_id,
                      .seq = ++g->seq[c],
                      .recorded_at_ms = at_ms + 40,
                      .topic = topic,
                      .event_id = event_id,
                      .event_type = type,
                      .event_source = source,
                      .subject = request_id,
                      .person_id = person,
                      .actor_id = audit_payload_actor(&p),
                      .request_id = request_id,
                      .event_time_ms = at_ms,
                      .dead_letter = false,
                      .event_bytes = buf,
                      .event_len = len};
  uint8_t h[CHAIN_HASH_LEN];
  chain_hash(g->prev[c], &r, h);
  fprintf(g->ledger, "%s\t%lld\t%lld\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%lld\tf\t", chain_id,
          (long long)r.seq, (long long)r.recorded_at_ms, topic, event_id, type, source, request_id,
          person, r.actor_id, request_id, (long long)at_ms);
  hex(g->ledger, buf, len);
  fputc('\t', g->ledger);
  hex(g->ledger, g->prev[c], CHAIN_HASH_LEN);
  fputc('\t', g->ledger);
  hex(g->ledger, h, CHAIN_HASH_LEN);
  fputc('\n', g->ledger);
  fact_out_t fo = {g, chain_id, r.seq};
  audit_payload_facts(&p, request_id, at_ms, fact_write, &fo);
  audit_payload_clear(&p);
  memcpy(g->prev[c], h, CHAIN_HASH_LEN);
  g->written++;
}

/* An HR joiner or leaver of person (department dept) at t. */
static void hr(gen_t *g, Qm__V1__HrEventKind kind, const char *person, const char *dept, int64_t t) {
  char date[16], request_id[1] = "";
  time_t secs = (time_t)(t / 1000);
  struct tm tm;
  gmtime_r(&secs, &tm);
  strftime(date, sizeof(date), "%Y-%m-%d", &tm);
  char source_id[37];
  uuid(g, source_id);
  Qm__V1__Person p = QM__V1__PERSON__INIT;
  p.id = (char *)person;
  p.department = (char *)dept;
  p.directory_username = (char *)person;
  Qm__V1__HrEvent ev = QM__V1__HR_EVENT__INIT;
  ev.source = "workday";
  ev.source_event_id = source_id;
  ev.kind = kind;
  ev.effective_date = date;
  ev.person = &p;
  ev.recorded_at_ms = t;
  emit(g, "qm.hr.lifecycle.v1",
       kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER ? "qm.hr.joiner.v1" : "qm.hr.leaver.v1",
       "/qm/hr", person, request_id, t, &ev.base);
}

/* One request's whole life starting at t (ms). */
static void lifecycle(gen_t *g, int64_t t, FILE *ids, int64_t *n_ids) {
  char request_id[37], grant_id[37], step_id[37], subject[16], approver[16];
  uuid(g, request_id);
  int pi = (int)(rnd(g) % N_PEOPLE);
  snprintf(subject, sizeof(subject), "p-%05d", pi);
  snprintf(approver, sizeof(approver), "p-%05d", (pi / 10) * 10);
  const char *const *it = items[rnd(g) % QM_ARRAY_LEN(items)];
  const char *dept = departments[pi % QM_ARRAY_LEN(departments)];
  /* One request in 50 is a joiner's first: the joiner event an hour before. */
  if (rnd(g) % 50 == 0) hr(g, QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER, subject, dept, t - 3600 * 1000);
  if (ids && *n_ids < 2000 && rnd(g) % 100 < 5) {
    fprintf(ids, "%s\n", request_id);
    (*n_ids)++;
  }

  Qm__V1__Actor requester = QM__V1__ACTOR__INIT, approver_a = QM__V1__ACTOR__INIT,
                svc = QM__V1__ACTOR__INIT;
  requester.person_id = subject;
  approver_a.person_id = approver;
  svc.service = "approval";
  Qm__V1__RequestLine line = QM__V1__REQUEST_LINE__INIT;
  line.line_no = 1;
  line.item_id = (char *)it[0];
  line.role_id = (char *)it[1];
  line.group = (char *)it[2];
  line.connector = "scim-main";
  line.kind = QM__V1__ITEM_KIND__ITEM_KIND_ACCESS;
  line.risk = QM__V1__RISK__RISK_STANDARD;
  Qm__V1__RequestLine *lines[] = {&line};
  Qm__V1__RequestSubmitted sub = QM__V1__REQUEST_SUBMITTED__INIT;
  sub.request_id = request_id;
  sub.requester = &requester;
  sub.subject_person_id = subject;
  sub.subject_department = (char *)dept;
  sub.reason = "benchmark";
  sub.n_lines = 1;
  sub.lines = lines;
  sub.submitted_at_ms = t;
  sub.origin = "self_service";
  Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
  re.event_case = QM__V1__REQUEST_EVENT__EVENT_SUBMITTED;
  re.submitted = &sub;
  emit(g, "qm.requests.v1", "qm.request.submitted.v1", "/qm/intake", subject, request_id, t, &re.base);

  uint64_t roll = rnd(g) % 100;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  t += 20;
  if (roll >= 70) { /* a human step */
    uuid(g, step_id);
    char *approver_ids[] = {approver};
    Qm__V1__ApprovalStepPending sp = QM__V1__APPROVAL_STEP_PENDING__INIT;
    sp.request_id = request_id;
    sp.line_no = 1;
    sp.step_id = step_id;
    sp.stage = 1;
    sp.kind = QM__V1__STEP_KIND__STEP_KIND_MANAGER;
    sp.n_approver_ids = 1;
    sp.approver_ids = approver_ids;
    sp.subject_person_id = subject;
    de.event_case = QM__V1__DECISION_EVENT__EVENT_STEP_PENDING;
    de.step_pending = &sp;
    emit(g, "qm.decisions.v1", "qm.approval.step_pending.v1", "/qm/approval", subject, request_id, t, &de.base);
    t += (int64_t)(rnd(g) % (3 * 86400)) * 1000; /* up to three days */
    if (roll >= 95) {
      Qm__V1__RequestRejected rj = QM__V1__REQUEST_REJECTED__INIT;
      rj.request_id = request_id;
      rj.line_no = 1;
      rj.subject_person_id = subject;
      rj.rejected_by = roll == 99 ? &svc : &approver_a;
      rj.reason = roll == 99 ? "timeout" : "not needed";
      rj.rejected_at_ms = t;
      de.event_case = QM__V1__DECISION_EVENT__EVENT_REJECTED;
      de.rejected = &rj;
      emit(g, "qm.decisions.v1", "qm.request.rejected.v1", "/qm/approval", subject, request_id, t, &de.base);
      return;
    }
    Qm__V1__ApprovalStepDecided sd = QM__V1__APPROVAL_STEP_DECIDED__INIT;
    sd.request_id = request_id;
    sd.line_no = 1;
    sd.step_id = step_id;
    sd.approved = true;
    sd.decided_by = &approver_a;
    sd.subject_person_id = subject;
    de.event_case = QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED;
    de.step_decided = &sd;
    emit(g, "qm.decisions.v1", "qm.approval.step_decided.v1", "/qm/approval", subject, request_id, t, &de.base);
  }
  Qm__V1__Actor *approvers[] = {roll >= 70 ? &approver_a : &svc};
  Qm__V1__RequestApproved ap = QM__V1__REQUEST_APPROVED__INIT;
  ap.request_id = request_id;
  ap.line = &line;
  ap.subject_person_id = subject;
  ap.n_approvers = 1;
  ap.approvers = approvers;
  ap.approved_at_ms = t;
  ap.requester = &requester;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &ap;
  emit(g, "qm.decisions.v1", "qm.request.approved.v1", "/qm/approval", subject, request_id, t, &de.base);

  t += 300 + (int64_t)(rnd(g) % 2000);
  uuid(g, grant_id);
  Qm__V1__AccessGranted gr = QM__V1__ACCESS_GRANTED__INIT;
  gr.request_id = request_id;
  gr.line_no = 1;
  gr.grant_id = grant_id;
  gr.subject_person_id = subject;
  gr.item_id = (char *)it[0];
  gr.role_id = (char *)it[1];
  gr.group = (char *)it[2];
  gr.connector = "scim-main";
  gr.granted_at_ms = t;
  gr.n_approvers = 1;
  gr.approvers = approvers;
  Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
  ae.event_case = QM__V1__ACCESS_EVENT__EVENT_GRANTED;
  ae.granted = &gr;
  emit(g, "qm.access.v1", "qm.access.granted.v1", "/qm/provisioning", subject, request_id, t, &ae.base);

  if (rnd(g) % 3 == 0) {
    static const char *const reasons[] = {"expired", "leaver", "admin"};
    const char *reason = reasons[rnd(g) % 3];
    Qm__V1__Actor prov = QM__V1__ACTOR__INIT, admin = QM__V1__ACTOR__INIT;
    prov.service = "provisioning";
    admin.person_id = "p-00001";
    t += (int64_t)(rnd(g) % (30 * 86400)) * 1000;
    if (!strcmp(reason, "leaver")) {
      hr(g, QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER, subject, dept, t);
      t += 200 + (int64_t)(rnd(g) % 5000);
    }
    Qm__V1__AccessRevoked rv = QM__V1__ACCESS_REVOKED__INIT;
    rv.request_id = request_id;
    rv.grant_id = grant_id;
    rv.subject_person_id = subject;
    rv.item_id = (char *)it[0];
    rv.role_id = (char *)it[1];
    rv.group = (char *)it[2];
    rv.connector = "scim-main";
    rv.reason = (char *)reason;
    rv.revoked_at_ms = t;
    rv.actor = strcmp(reason, "admin") ? &prov : &admin;
    ae.event_case = QM__V1__ACCESS_EVENT__EVENT_REVOKED;
    ae.revoked = &rv;
    emit(g, "qm.access.v1", "qm.access.revoked.v1", "/qm/provisioning", subject, request_id, t, &ae.base);
  }
}

static int gen_main(int argc, char **argv) {
  long long n = 0;
  int chains = 3;
  const char *heads = NULL, *facts = NULL, *ids_path = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-n") && i + 1 < argc) n = atoll(argv[++i]);
    else if (!strcmp(argv[i], "--chains") && i + 1 < argc) chains = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--heads") && i + 1 < argc) heads = argv[++i];
    else if (!strcmp(argv[i], "--facts") && i + 1 < argc) facts = argv[++i];
    else if (!strcmp(argv[i], "--ids") && i + 1 < argc) ids_path = argv[++i];
    else {
      fprintf(stderr, "audit-genreq gen: unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (n <= 0 || chains < 1 || !heads || !facts) {
    fprintf(stderr, "usage: audit-genreq gen -n RECORDS [--chains N] --heads FILE --facts FILE "
                    "[--ids FILE] > ledger.copy\n");
    return 2;
  }
  gen_t g = {.n_chains = chains, .ledger = stdout, .rng = 0x9e3779b97f4a7c15ULL};
  g.seq = qm_calloc((size_t)chains, sizeof(*g.seq));
  g.prev = qm_calloc((size_t)chains, sizeof(*g.prev));
  g.facts = fopen(facts, "w");
  FILE *ids = ids_path ? fopen(ids_path, "w") : NULL;
  if (!g.facts || (ids_path && !ids)) {
    perror("audit-genreq");
    return 1;
  }
  /* Requests spread evenly over the past year (about 4 records each). */
  int64_t now = (int64_t)time(NULL) * 1000, span = 365LL * 86400 * 1000;
  int64_t step = span / (n / 4 + 1), t = now - span, n_ids = 0;
  while (g.written < n) {
    lifecycle(&g, t, ids, &n_ids);
    t += step;
  }
  FILE *h = fopen(heads, "w");
  if (!h) {
    perror(heads);
    return 1;
  }
  for (int c = 0; c < chains; c++) {
    char id[CHAIN_ID_MAX];
    chain_name(c, id);
    fprintf(h, "%s\t%lld\t", id, (long long)g.seq[c]);
    hex(h, g.prev[c], CHAIN_HASH_LEN);
    fputc('\n', h);
  }
  fclose(h);
  fclose(g.facts);
  if (ids) fclose(ids);
  fprintf(stderr, "audit-genreq: %lld records, %lld sample ids\n", (long long)g.written, (long long)n_ids);
  free(g.seq);
  free(g.prev);
  return 0;
}

/* ---- probe ------------------------------------------------------------------ */

static size_t sink(char *p, size_t s, size_t n, void *u) {
  (void)p;
  *(size_t *)u += s * n;
  return s * n;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* GETs url; the time in ms, or -1 when the answer is not 200. */
static double timed_get(CURL *c, const char *url, size_t *bytes) {
  long status = 0;
  *bytes = 0;
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, bytes);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  CURLcode rc = curl_easy_perform(c);
  clock_gettime(CLOCK_MONOTONIC, &b);
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  if (rc != CURLE_OK || status != 200) {
    fprintf(stderr, "probe: %s -> %s %ld\n", url, curl_easy_strerror(rc), status);
    return -1;
  }
  return (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
}

static void report(const char *what, double *ms, int n, size_t bytes) {
  if (n == 0) {
    printf("RESULT %-32s no successful calls\n", what);
    return;
  }
  qsort(ms, (size_t)n, sizeof(double), cmp_d);
  double sum = 0;
  for (int i = 0; i < n; i++) sum += ms[i];
  int p50 = (n + 1) / 2 - 1, p99 = (99 * n + 99) / 100 - 1;
  printf("RESULT %-32s n=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f mean_ms=%.2f avg_bytes=%zu\n", what,
         n, ms[p50], ms[p99 < n ? p99 : n - 1], ms[n - 1], sum / n, bytes / (size_t)n);
}

static int probe_main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: audit-genreq probe URL TOKEN IDS_FILE N\n");
    return 2;
  }
  const char *base = argv[1], *token = argv[2];
  int n = atoi(argv[4]);
  FILE *f = fopen(argv[3], "r");
  if (!f || n <= 0) {
    fprintf(stderr, "probe: cannot read %s\n", argv[3]);
    return 2;
  }
  char (*ids)[64] = qm_calloc((size_t)n, sizeof(*ids));
  int have = 0;
  while (have < n && fgets(ids[have], sizeof(ids[have]), f)) {
    ids[have][strcspn(ids[have], "\n")] = '\0';
    if (ids[have][0]) have++;
  }
  fclose(f);
  curl_global_init(CURL_GLOBAL_DEFAULT);
  CURL *c = curl_easy_init();
  char auth[4096];
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
  struct curl_slist *hl = curl_slist_append(NULL, auth);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 60000L);
  double *ms = qm_calloc((size_t)(have > 20 ? have : 20), sizeof(double));
  char url[1024];
  size_t bytes, total = 0;
  int ok = 0;
  for (int i = 0; i < have; i++) {
    snprintf(url, sizeof(url), "%s/v1/audit/requests/%s/evidence", base, ids[i]);
    double t = timed_get(c, url, &bytes);
    if (t >= 0) ms[ok++] = t, total += bytes;
  }
  report("evidence", ms, ok, total);
  ok = 0, total = 0;
  for (int i = 0; i < 20; i++) {
    snprintf(url, sizeof(url), "%s/v1/audit/search?person=p-%05d&limit=100", base, i * 97);
    double t = timed_get(c, url, &bytes);
    if (t >= 0) ms[ok++] = t, total += bytes;
  }
  report("search person= (100/page)", ms, ok, total);
  static const char *const reps[] = {"approval-cycle-time", "top-items", "automatic-revocations",
                                     "break-glass", "timeout-rejections", "joiner-to-access",
                                     "leaver-to-revocation", "leavers-outstanding"};
  for (size_t r = 0; r < QM_ARRAY_LEN(reps); r++) {
    snprintf(url, sizeof(url), "%s/v1/audit/reports/%s", base, reps[r]);
    char what[64];
    snprintf(what, sizeof(what), "report %s", reps[r]);
    ok = 0, total = 0;
    for (int i = 0; i < 3; i++) {
      double t = timed_get(c, url, &bytes);
      if (t >= 0) ms[ok++] = t, total += bytes;
    }
    report(what, ms, ok, total);
  }
  curl_slist_free_all(hl);
  curl_easy_cleanup(c);
  free(ms);
  free(ids);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "gen")) return gen_main(argc - 1, argv + 1);
  if (argc > 1 && !strcmp(argv[1], "probe")) return probe_main(argc - 1, argv + 1);
  fprintf(stderr, "usage: audit-genreq gen … | probe … (see bench/audit/README.md)\n");
  return 2;
}
