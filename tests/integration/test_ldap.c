/*
 * test_ldap: lib/qm_ldap against a real OpenLDAP slapd (the harness's
 * private one; no Quartermaster service runs): lookups with RFC 4515
 * escaping, idempotent add and delete (LDAP 20 and 16 count as success),
 * the groupOfNames last-member placeholder, a refused bind, the server going
 * away, and many threads sharing one client.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_ldap.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define USER_DN(n) "uid=p-" n ",ou=people," IT_LDAP_BASE

static qm_ldap_t *client(it_slapd_t *sl, const char *password, const char *placeholder) {
  qm_ldap_config_t lc = {
      .url = it_slapd_url(sl),
      .bind_dn = IT_LDAP_ADMIN,
      .bind_password = password,
      .user_base = "ou=people," IT_LDAP_BASE,
      .group_base = "ou=groups," IT_LDAP_BASE,
      .placeholder_dn = placeholder,
      .timeout_ms = 3000,
  };
  char e[512];
  qm_ldap_t *l = qm_ldap_new(&lc, e, sizeof(e));
  cr_assert(l, "qm_ldap_new: %s", e);
  return l;
}

static int collect(void *ctx, const char *dn) {
  json_object_set_new(ctx, dn, json_true());
  return 0;
}

static json_t *members(qm_ldap_t *l, const char *group_dn) {
  json_t *set = json_object();
  char e[512];
  int rc = qm_ldap_list_members(l, group_dn, collect, set, e, sizeof(e));
  cr_assert_eq(rc, QM_OK, "list %s: %s", group_dn, e);
  return set;
}

typedef struct adder {
  qm_ldap_t *l;
  int first;
  int rc;
} adder_t;

static void *add_many(void *arg) {
  adder_t *a = arg;
  char gdn[256], udn[256], e[512];
  for (int i = 0; i < 10 && a->rc == QM_OK; i++) {
    char name[16];
    snprintf(name, sizeof(name), "p-%04d", a->first + i);
    a->rc = qm_ldap_find_user(a->l, name, udn, sizeof(udn), e, sizeof(e));
    if (a->rc == QM_OK) a->rc = qm_ldap_find_group(a->l, "threads", gdn, sizeof(gdn), e, sizeof(e));
    if (a->rc == QM_OK) a->rc = qm_ldap_add_member(a->l, gdn, udn, e, sizeof(e));
  }
  return NULL;
}

Test(ldap, connector_semantics, .timeout = 300) {
  static const char *const groups[] = {"eng", "solo", "threads", NULL};
  it_slapd_t *sl = it_slapd_start(groups, 100);
  qm_ldap_t *l = client(sl, IT_LDAP_PASSWORD, IT_LDAP_PLACEHOLDER);
  char dn[512], gdn[512], e[512];

  /* Lookups. */
  cr_assert_eq(qm_ldap_find_user(l, "p-0007", dn, sizeof(dn), e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_str_eq(dn, USER_DN("0007"));
  cr_assert_eq(qm_ldap_find_user(l, "p-9999", dn, sizeof(dn), e, sizeof(e)), QM_ENOTFOUND);
  /* A filter injection finds nothing instead of everyone. */
  cr_assert_eq(qm_ldap_find_user(l, "*", dn, sizeof(dn), e, sizeof(e)), QM_ENOTFOUND,
               "'*' was not escaped: %s", e);
  cr_assert_eq(qm_ldap_find_user(l, "p-0001)(uid=*", dn, sizeof(dn), e, sizeof(e)), QM_ENOTFOUND);
  cr_assert_eq(qm_ldap_find_group(l, "eng", gdn, sizeof(gdn), e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_str_eq(gdn, "cn=eng,ou=groups," IT_LDAP_BASE);
  char small[8];
  cr_assert_eq(qm_ldap_find_user(l, "p-0007", small, sizeof(small), e, sizeof(e)), QM_EINVAL);

  /* Add: twice is fine, the placeholder leaves, a list with one present works. */
  cr_assert_eq(qm_ldap_add_member(l, gdn, USER_DN("0001"), e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_eq(qm_ldap_add_member(l, gdn, USER_DN("0001"), e, sizeof(e)), QM_OK,
               "already a member must succeed: %s", e);
  const char *list[] = {USER_DN("0001"), USER_DN("0002"), USER_DN("0003")};
  cr_assert_eq(qm_ldap_add_members(l, gdn, list, 3, e, sizeof(e)), QM_OK, "%s", e);
  json_t *m = it_slapd_members(sl, "eng");
  char *txt = it_json_text(m);
  cr_assert(json_object_size(m) == 3 && json_object_get(m, "p-0001") && json_object_get(m, "p-0003"),
            "eng after adds: %s", txt);
  free(txt);
  json_decref(m);
  m = members(l, gdn);
  cr_assert_eq(json_object_size(m), 3, "qm_ldap_list_members should list 3");
  json_decref(m);

  /* Delete: absent is fine; the others stay. */
  cr_assert_eq(qm_ldap_remove_member(l, gdn, USER_DN("0050"), e, sizeof(e)), QM_OK,
               "not a member must succeed: %s", e);
  cr_assert_eq(qm_ldap_remove_member(l, gdn, USER_DN("0002"), e, sizeof(e)), QM_OK, "%s", e);
  m = it_slapd_members(sl, "eng");
  cr_assert(json_object_size(m) == 2 && !json_object_get(m, "p-0002"), "eng after delete");
  json_decref(m);

  /* The last member of a groupOfNames: swapped for the placeholder. */
  char sdn[512];
  cr_assert_eq(qm_ldap_find_group(l, "solo", sdn, sizeof(sdn), e, sizeof(e)), QM_OK);
  cr_assert_eq(qm_ldap_add_member(l, sdn, USER_DN("0004"), e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_eq(qm_ldap_remove_member(l, sdn, USER_DN("0004"), e, sizeof(e)), QM_OK,
               "removing the last member: %s", e);
  m = it_slapd_members(sl, "solo");
  cr_assert(json_object_size(m) == 1 && json_object_get(m, IT_LDAP_PLACEHOLDER),
            "solo should hold only the placeholder");
  json_decref(m);
  m = members(l, sdn);
  cr_assert_eq(json_object_size(m), 0, "the placeholder must not be listed as a member");
  json_decref(m);
  /* Without a placeholder configured, the last member cannot go. */
  qm_ldap_t *np = client(sl, IT_LDAP_PASSWORD, NULL);
  cr_assert_eq(qm_ldap_add_member(np, sdn, USER_DN("0005"), e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_eq(qm_ldap_remove_member(l, sdn, IT_LDAP_PLACEHOLDER, e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_eq(qm_ldap_remove_member(np, sdn, USER_DN("0005"), e, sizeof(e)), QM_EINVAL,
               "removing the last member without a placeholder should fail");
  cr_assert(strstr(e, "65") != NULL, "the error should carry resultCode 65: %s", e);
  qm_ldap_destroy(np);

  /* A refused bind is QM_EAUTH. */
  qm_ldap_t *bad = client(sl, "wrong-password", NULL);
  cr_assert_eq(qm_ldap_find_user(bad, "p-0001", dn, sizeof(dn), e, sizeof(e)), QM_EAUTH, "%s", e);
  qm_ldap_destroy(bad);

  /* Threads share one client. */
  pthread_t th[6];
  adder_t ad[6];
  for (int i = 0; i < 6; i++) {
    ad[i] = (adder_t){l, 10 + i * 10, QM_OK};
    pthread_create(&th[i], NULL, add_many, &ad[i]);
  }
  for (int i = 0; i < 6; i++) {
    pthread_join(th[i], NULL);
    cr_assert_eq(ad[i].rc, QM_OK, "thread %d failed", i);
  }
  m = it_slapd_members(sl, "threads");
  cr_assert_eq(json_object_size(m), 60, "threads should hold 60 members");
  json_decref(m);

  /* The server goes away: transient (retry later), not a refusal. */
  qm_ldap_stats_t before;
  qm_ldap_stats(l, &before);
  cr_assert(before.operations > 0 && before.cache_hits > 0, "stats should count operations and hits");
  it_slapd_stop(sl);
  qm_ldap_cache_clear(l);
  cr_assert_eq(qm_ldap_find_user(l, "p-0001", dn, sizeof(dn), e, sizeof(e)), QM_ETRANSIENT,
               "server down should be transient: %s", e);
  qm_ldap_destroy(l);
}

/* ldaps: the certificate is verified — trusted through ca_file, refused
 * without it (the system store does not know a self-signed one). */
Test(ldap, tls_verified, .timeout = 120) {
  static const char *const groups[] = {"tls", NULL};
  it_slapd_t *sl = it_slapd_start_tls(groups, 5);
  char e[512], dn[256], gdn[256];
  qm_ldap_config_t lc = {
      .url = it_slapd_tls_url(sl),
      .bind_dn = IT_LDAP_ADMIN,
      .bind_password = IT_LDAP_PASSWORD,
      .user_base = "ou=people," IT_LDAP_BASE,
      .group_base = "ou=groups," IT_LDAP_BASE,
      .placeholder_dn = IT_LDAP_PLACEHOLDER,
      .ca_file = it_slapd_ca_file(sl),
      .timeout_ms = 3000,
  };
  qm_ldap_t *trusted = qm_ldap_new(&lc, e, sizeof(e));
  cr_assert(trusted, "%s", e);
  cr_assert_eq(qm_ldap_find_user(trusted, "p-0002", dn, sizeof(dn), e, sizeof(e)), QM_OK,
               "over ldaps with the CA: %s", e);
  cr_assert_eq(qm_ldap_find_group(trusted, "tls", gdn, sizeof(gdn), e, sizeof(e)), QM_OK, "%s", e);
  cr_assert_eq(qm_ldap_add_member(trusted, gdn, dn, e, sizeof(e)), QM_OK, "%s", e);
  json_t *m = it_slapd_members(sl, "tls");
  cr_assert(json_object_get(m, "p-0002"), "the member added over ldaps is not there");
  json_decref(m);
  qm_ldap_destroy(trusted);
  lc.ca_file = NULL;
  qm_ldap_t *untrusted = qm_ldap_new(&lc, e, sizeof(e));
  cr_assert(untrusted, "%s", e);
  int rc = qm_ldap_find_user(untrusted, "p-0002", dn, sizeof(dn), e, sizeof(e));
  cr_assert_neq(rc, QM_OK, "a certificate nobody vouches for was accepted");
  fprintf(stderr, "[it ldap] untrusted certificate refused: %s (%s)\n", qm_strerror(rc), e);
  qm_ldap_destroy(untrusted);
  it_slapd_stop(sl);
}
