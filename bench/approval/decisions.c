/*
 * bench-approval-decisions: approvals decided per second through qm-approval's
 * HTTP API, on the real stack (intake and approval, Kafka, PostgreSQL, Redis).
 *
 * Built on the integration harness (a Criterion Test), run by hand:
 *   build-approval/bench/bench-approval-decisions [--jobs 1]
 * Environment: BENCH_CLIENTS (concurrent HTTP clients, default 4).
 *
 * It submits, through intake, one request per person p-0002 … p-0300 for
 * figma/editor (standard risk: the person's manager decides) and one for
 * github/write (sensitive: the app owner decides) — about 590 human steps —
 * waits until approval has opened all of them, then has BENCH_CLIENTS threads
 * POST /v1/approvals/steps/{id}/approve as each step's approver, and reports
 * decisions per second (HTTP 200s over wall time, each one a transaction that
 * records the decision, cancels the step's three timers, publishes
 * StepDecided and RequestApproved through the outbox and queues two
 * notifications) and the latency of one decision (p50, p99).
 * It prints figures; it is not a test.
 */
#include "harness.h"

#include "qm_common.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct job {
  char step_id[64], approver[32];
} job_t;

typedef struct pool {
  it_stack_t *st;
  job_t *jobs;
  size_t n;
  size_t next; /* guarded by mu */
  pthread_mutex_t mu;
  double *secs; /* per job */
  long *status;
} pool_t;

static void *client(void *arg) {
  pool_t *p = arg;
  for (;;) {
    pthread_mutex_lock(&p->mu);
    size_t i = p->next++;
    pthread_mutex_unlock(&p->mu);
    if (i >= p->n) break;
    char *tok = it_token(p->jobs[i].approver, "employee,manager");
    char path[160];
    snprintf(path, sizeof(path), "/v1/approvals/steps/%s/approve", p->jobs[i].step_id);
    it_resp_t r;
    p->status[i] = it_http(p->st, "approval", "POST", path, tok, "{\"comment\":\"ok\"}", NULL, &r);
    p->secs[i] = r.seconds;
    it_resp_clear(&r);
    free(tok);
  }
  return NULL;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

Test(bench, approval_decisions, .fini = it_fini, .timeout = 3600) {
  int clients = getenv("BENCH_CLIENTS") ? atoi(getenv("BENCH_CLIENTS")) : 4;
  if (clients < 1 || clients > 64) clients = 4;
  static const char *const services[] = {"intake", "approval", NULL};
  it_stack_t *st = it_stack_up_env("benchappr", services, NULL);

  /* Requests needing a person, two per subject. */
  int64_t t0 = it_now_ms();
  int submitted = 0;
  for (int i = 2; i <= 300; i++) {
    char who[16];
    snprintf(who, sizeof(who), "p-%04d", i);
    json_t *p = it_seed_person(who);
    const char *et = json_string_value(json_object_get(p, "employment_type"));
    const char *status = json_string_value(json_object_get(p, "status"));
    bool active = status && !strcmp(status, "active");
    bool third = et && !strcmp(et, "third_party");
    json_decref(p);
    if (!active) continue;
    char *tok = it_token(who, "employee");
    static const char *const items[][2] = {{"figma", "editor"}, {"github", "write"}};
    for (int k = 0; k < 2; k++) {
      if (k == 1 && (third || !strcmp(who, "p-0011"))) continue;
      char *body = qm_asprintf("{\"subject_person_id\":\"%s\",\"reason\":\"bench\",\"lines\":"
                               "[{\"item_id\":\"%s\",\"role_id\":\"%s\"}]}",
                               who, items[k][0], items[k][1]);
      it_resp_t r;
      it_http(st, "intake", "POST", "/v1/requests", tok, body, NULL, &r);
      if (r.status == 201) submitted++;
      it_resp_clear(&r);
      free(body);
    }
    free(tok);
  }
  printf("submitted %d requests in %.1f s\n", submitted, (it_now_ms() - t0) / 1000.0);
  int64_t deadline = it_now_ms() + 120000;
  long long open = 0;
  while ((open = it_pg_int(st, "SELECT count(*) FROM approval.approval_steps"
                               " WHERE status = 'pending'")) < submitted &&
         it_now_ms() < deadline)
    it_sleep_ms(200);
  printf("%lld steps pending after %.1f s\n", open, (it_now_ms() - t0) / 1000.0);
  cr_assert(open > 0, "no pending steps");

  json_t *rows = it_pg_rows(st, "SELECT step_id, approver_ids[1] FROM approval.approval_steps"
                                " WHERE status = 'pending' ORDER BY random()");
  pool_t p = {.st = st, .n = json_array_size(rows)};
  p.jobs = qm_calloc(p.n, sizeof(*p.jobs));
  p.secs = qm_calloc(p.n, sizeof(*p.secs));
  p.status = qm_calloc(p.n, sizeof(*p.status));
  pthread_mutex_init(&p.mu, NULL);
  for (size_t i = 0; i < p.n; i++) {
    json_t *row = json_array_get(rows, i);
    qm_strlcpy(p.jobs[i].step_id, json_string_value(json_array_get(row, 0)),
               sizeof(p.jobs[i].step_id));
    qm_strlcpy(p.jobs[i].approver, json_string_value(json_array_get(row, 1)),
               sizeof(p.jobs[i].approver));
  }
  json_decref(rows);
  pthread_t th[64];
  int64_t d0 = it_now_ms();
  for (int c = 0; c < clients; c++) pthread_create(&th[c], NULL, client, &p);
  for (int c = 0; c < clients; c++) pthread_join(th[c], NULL);
  int64_t d1 = it_now_ms();
  size_t ok = 0;
  for (size_t i = 0; i < p.n; i++) ok += p.status[i] == 200;
  qsort(p.secs, p.n, sizeof(double), cmp_double);
  printf("decided %zu of %zu steps (HTTP 200) in %.2f s with %d clients: %.0f decisions/s;"
         " one decision p50 %.1f ms, p99 %.1f ms\n",
         ok, p.n, (d1 - d0) / 1000.0, clients, ok / ((d1 - d0) / 1000.0),
         p.secs[p.n / 2] * 1000.0, p.secs[(p.n * 99) / 100] * 1000.0);
  long long approved = it_pg_int(st, "SELECT count(*) FROM approval.approval_lines"
                                     " WHERE status = 'approved'");
  long long published = it_pg_int(st, "SELECT count(*) FROM approval.outbox WHERE"
                                      " ce_type = 'qm.request.approved.v1'");
  printf("lines approved: %lld; RequestApproved in the outbox: %lld\n", approved, published);
  free(p.jobs);
  free(p.secs);
  free(p.status);
  it_stack_down(st);
}
