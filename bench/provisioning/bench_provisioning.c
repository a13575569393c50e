/*
 * bench_provisioning: how fast qm-provisioning applies grants to each kind
 * of directory, and how long a leaver with 50 grants takes to deprovision.
 * It prints figures; it is not a test (bench/README.md has the results).
 *
 * It reuses the integration harness (an isolated database and topic prefix,
 * a private SCIM peer, a private slapd) and runs qm-provisioning alone:
 *
 *  1. grants per second, per connector: N approved lines (RequestApproved,
 *     as approval publishes them) are queued on qm.decisions.v1 while
 *     provisioning is stopped; then it starts, and the clock runs from its
 *     readiness to the moment every grant is active (counted in its own
 *     database every 20 ms). This is the backlog drain rate: consume +
 *     record the grant, directory call, AccessGranted to the outbox.
 *     Grants spread over G groups round-robin (people p-0001…).
 *  2. leaver deprovisioning: a person holding 50 grants (50 groups: SCIM or
 *     LDAP) leaves; from publishing the HR leaver event to the last
 *     AccessRevoked on qm.access.v1 (wall time seen by this program), and
 *     provisioning's own record (received → last revoke committed), for R
 *     leavers one after the other.
 *
 * Usage: bench-provisioning [--filter '*'] ; environment BENCH_GRANTS
 * (default 800), BENCH_GROUPS (default 4), BENCH_LEAVERS (default 5).
 * Run it from the build directory after building the services.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int env_int(const char *name, int def) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : def;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Queues n grants over n_groups groups of connector, then times the drain. */
static double grants_per_second(it_stack_t *st, const char *connector, const char *const *groups,
                                int n_groups, int n, int n_people) {
  char *q = qm_asprintf("SELECT count(*) FROM provisioning.grants WHERE connector = '%s'"
                        " AND state = 'active'", connector);
  long long before = 0;
  int64_t t_pub = it_now_ms();
  for (int i = 0; i < n; i++) {
    char rid[QM_UUID_STR_LEN], person[16];
    qm_uuid_new(rid);
    snprintf(person, sizeof(person), "p-%04d", 1 + (i / n_groups) % n_people);
    it_approved_t a = {.request_id = rid, .person_id = person, .item_id = groups[i % n_groups],
                       .role_id = "user", .group = groups[i % n_groups], .connector = connector};
    it_publish_approved(st, &a);
  }
  fprintf(stderr, "[bench] %s: %d approvals queued in %.1f s; starting provisioning\n", connector,
          n, (double)(it_now_ms() - t_pub) / 1000.0);
  int64_t t0 = it_now_ms();
  it_service_start(st, "provisioning");
  int64_t t_ready = it_now_ms();
  long long done = before;
  int64_t deadline = it_now_ms() + 600000;
  while ((done = it_pg_int(st, q)) < n && it_now_ms() < deadline) it_sleep_ms(20);
  int64_t t1 = it_now_ms();
  cr_assert(done >= n, "%s: only %lld of %d grants active after 10 minutes", connector, done, n);
  double secs = (double)(t1 - t_ready) / 1000.0;
  double rate = n / secs;
  printf("grants/s %-10s %6d grants over %d groups: %.2f s from readiness (%.2f s from start)"
         " -> %.0f grants/s\n",
         connector, n, n_groups, secs, (double)(t1 - t0) / 1000.0, rate);
  fflush(stdout);
  cr_assert(it_service_term(st, "provisioning", 15000) == 0, "provisioning did not stop cleanly");
  free(q);
  return rate;
}

/* One leaver with n_grants grants over groups[]; returns the wall time in s. */
static double leaver(it_stack_t *st, it_reader_t *rd, const char *person, const char *connector,
                     const char *const *groups, int n_grants, double *service_s) {
  for (int i = 0; i < n_grants; i++) {
    char rid[QM_UUID_STR_LEN];
    qm_uuid_new(rid);
    it_approved_t a = {.request_id = rid, .person_id = person, .item_id = groups[i],
                       .role_id = "user", .group = groups[i], .connector = connector};
    it_publish_approved(st, &a);
  }
  char pat[256];
  snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"subject_person_id\":\"%s\"}", person);
  json_t *p = json_loads(pat, 0, NULL);
  cr_assert(it_reader_wait(rd, p, n_grants, 120000) >= n_grants, "%s: grants not all applied", person);
  json_decref(p);
  char today[16];
  it_date(0, today, sizeof(today));
  it_hr_event_t ev = {.kind = "leaver", .effective_date = today,
                      .person = {.id = person, .status = "terminated"}};
  int64_t t0 = it_now_ms();
  it_hr_publish(st, &ev);
  snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"subject_person_id\":\"%s\",\"reason\":\"leaver\"}",
           person);
  p = json_loads(pat, 0, NULL);
  int got = it_reader_wait(rd, p, n_grants, 120000);
  int64_t t1 = it_now_ms();
  json_decref(p);
  cr_assert(got >= n_grants, "%s: %d of %d revocations seen", person, got, n_grants);
  char *q = qm_asprintf("SELECT extract(epoch FROM completed_at - received_at)::text"
                        " FROM provisioning.leavers WHERE person_id = '%s'", person);
  char *v = it_pg_scalar(st, q);
  free(q);
  *service_s = v ? strtod(v, NULL) : -1;
  free(v);
  return (double)(t1 - t0) / 1000.0;
}

static void leavers(it_stack_t *st, const char *connector, const char *const *groups, int reps,
                    int first_person) {
  it_reader_t *rd = it_reader_open(st, QM_TOPIC_ACCESS);
  double wall[32], svc[32];
  for (int r = 0; r < reps && r < 32; r++) {
    char person[16];
    snprintf(person, sizeof(person), "p-%04d", first_person + r);
    wall[r] = leaver(st, rd, person, connector, groups, 50, &svc[r]);
    fprintf(stderr, "[bench] leaver %s on %s: 50 grants revoked in %.3f s (service: %.3f s)\n",
            person, connector, wall[r], svc[r]);
  }
  qsort(wall, (size_t)reps, sizeof(double), cmp_double);
  qsort(svc, (size_t)reps, sizeof(double), cmp_double);
  printf("leaver    %-10s 50 grants, %d leavers: HR event -> last AccessRevoked median %.3f s"
         " (min %.3f, max %.3f); in-service received -> last revoke median %.3f s\n",
         connector, reps, wall[reps / 2], wall[0], wall[reps - 1], svc[reps / 2]);
  fflush(stdout);
  it_reader_close(rd);
}

Test(bench, provisioning, .fini = it_fini, .timeout = 3600) {
  int n = env_int("BENCH_GRANTS", 800);
  int n_groups = env_int("BENCH_GROUPS", 4);
  int reps = env_int("BENCH_LEAVERS", 5);
  if (n_groups < 1 || n_groups > 16) n_groups = 4;
  static const char *const scim_groups[] = {"app-jira-user", "app-zoom-user", "app-slack-user",
                                            "app-confluence-user", "app-datadog-user",
                                            "app-hubspot-user", "app-figma-viewer",
                                            "app-github-read", "app-1password-user",
                                            "app-salesforce-user", "app-netsuite-user",
                                            "app-figma-editor", "app-github-write",
                                            "app-aws-readonly", "lic-adobe-cc", "lic-jetbrains"};
  /* LDAP: bench groups for the grant rate, and 50 for the leaver. */
  static char names[66][32];
  static const char *ldap_groups[67];
  for (int i = 0; i < 16; i++) {
    snprintf(names[i], sizeof(names[i]), "bench-grp-%02d", i);
    ldap_groups[i] = names[i];
  }
  for (int i = 0; i < 50; i++) {
    snprintf(names[16 + i], sizeof(names[16 + i]), "leaver-grp-%02d", i);
    ldap_groups[16 + i] = names[16 + i];
  }
  ldap_groups[66] = NULL;
  int n_people = 200; /* p-0001…p-0200 take the grants; p-0201… are the leavers */
  it_slapd_t *slapd = it_slapd_start(ldap_groups, 300);
  char *conn = it_slapd_connector_json(slapd);
  char *file_text = qm_asprintf("{\"connectors\": {\"ldap-corp\": %s}}", conn);
  free(conn);
  char *dir = it_dir_copy_yaml(QM_SOURCE_DIR "/deploy/local/seed", "bench-prov");
  it_file_write(dir, "connectors.json", file_text);
  free(file_text);
  char *cf = qm_asprintf("QM_CONNECTORS_FILE=%s/connectors.json", dir);
  const it_svc_env_t env[] = {{"provisioning", cf},
                              {"provisioning", "QM_DRIFT_INTERVAL=0"},
                              {NULL, NULL}};
  static const char *const none[] = {NULL};
  it_stack_t *st = it_stack_up_env("benchprov", none, env);
  printf("bench-provisioning: %d grants over %d groups per connector, %d leavers of 50 grants\n",
         n, n_groups, reps);
  grants_per_second(st, "scim-main", scim_groups, n_groups, n, n_people);
  grants_per_second(st, "ldap-corp", ldap_groups, n_groups, n, n_people);
  /* Leavers: 50 SCIM groups made for them, and the 50 LDAP ones. */
  static char snames[50][32];
  static const char *sgroups[50];
  for (int i = 0; i < 50; i++) {
    snprintf(snames[i], sizeof(snames[i]), "leaver-grp-%02d", i);
    sgroups[i] = snames[i];
    it_scim_group_create(st, snames[i]);
  }
  it_service_start(st, "provisioning");
  leavers(st, "scim-main", sgroups, reps, 201);
  leavers(st, "ldap-corp", ldap_groups + 16, reps, 251);
  it_stack_down(st);
  it_slapd_stop(slapd);
  it_dir_remove(dir);
  free(dir);
  free(cf);
}
