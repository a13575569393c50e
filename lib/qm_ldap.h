/*
 * qm_ldap: an LDAP client (libldap) for provisioning group memberships into
 * OpenLDAP- and Active-Directory-style directories: find a user's and a
 * group's DN by name, add and delete values of the group's member attribute,
 * and list a group's members for drift reconciliation.
 *
 * Every change is idempotent on purpose, like qm_scim: adding a value that
 * exists (resultCode 20, typeOrValueExists) and deleting one that does not
 * (16, noSuchAttribute) both succeed. groupOfNames requires at least one
 * member (deleting the last fails with 65, objectClassViolation): when a
 * placeholder DN is configured, the last member is swapped for it in one
 * modify, and the placeholder is deleted again when a real member is added;
 * list calls never report it. Active Directory's "group" class has no such
 * rule and needs no placeholder.
 *
 * Failures are classified for the caller:
 *  - QM_ETRANSIENT: server down, timeout, busy or unavailable (after one
 *    reconnect);
 *  - QM_EAUTH: the bind was refused or the bind DN lacks access;
 *  - QM_ENOTFOUND: no entry for the user or group;
 *  - QM_EINVAL: anything else the server refused, or a bad configuration.
 * errstr then carries the LDAP result code, its text and the server's
 * diagnostic message.
 *
 * Thread safety: a qm_ldap_t may be shared by any number of threads; it keeps
 * a small pool of bound connections (one call holds one connection), and the
 * name -> DN cache is internally synchronised. libldap's types never appear
 * here.
 */
#ifndef QM_LDAP_H
#define QM_LDAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct qm_ldap qm_ldap_t;

/* Client configuration. Strings are copied by qm_ldap_new(); a 0 or NULL
 * means the default shown. */
typedef struct qm_ldap_config {
  const char *url;          /* "ldap://host:389" or "ldaps://host:636" (required) */
  const char *bind_dn;      /* simple bind; NULL: anonymous */
  const char *bind_password;
  const char *user_base;    /* subtree searched for users (required) */
  const char *user_attr;    /* "uid" (AD: "sAMAccountName") */
  const char *group_base;   /* subtree searched for groups (required) */
  const char *group_attr;   /* "cn" */
  const char *member_attr;  /* "member" */
  /* DN kept in a groupOfNames emptied of its last member; NULL: none, and
   * removing the last member fails (QM_EINVAL, resultCode 65). */
  const char *placeholder_dn;
  const char *ca_file;      /* PEM bundle for ldaps/StartTLS; NULL: system store */
  int timeout_ms;           /* 10000: network and operation timeout */
  int pool_size;            /* 4 connections */
  int cache_ttl_ms;         /* 300000: name -> DN cache lifetime; < 0 disables it */
} qm_ldap_config_t;

/* Counters since qm_ldap_new(), for metrics. */
typedef struct qm_ldap_stats {
  uint64_t operations; /* LDAP operations sent (searches, modifies, binds) */
  uint64_t reconnects; /* connections (re)established */
  uint64_t failures;   /* calls that returned an error */
  uint64_t cache_hits, cache_misses;
} qm_ldap_stats_t;

/* Creates a client; no connection is made yet. NULL with the reason in errstr
 * when the configuration is unusable. Caller frees with qm_ldap_destroy(). */
qm_ldap_t *qm_ldap_new(const qm_ldap_config_t *cfg, char *errstr, size_t errstr_size);

/* Closes every connection and frees the client. No call may be running. NULL is fine. */
void qm_ldap_destroy(qm_ldap_t *ldap);

/* The DN of the one entry under user_base whose user_attr equals name
 * (value escaped per RFC 4515), written into dn_out. QM_ENOTFOUND when none,
 * QM_ECONFLICT when several, QM_EINVAL when dn_size is too small. Cached. */
int qm_ldap_find_user(qm_ldap_t *ldap, const char *name, char *dn_out, size_t dn_size,
                      char *errstr, size_t errstr_size);

/* The DN of the group whose group_attr equals name, as qm_ldap_find_user(). */
int qm_ldap_find_group(qm_ldap_t *ldap, const char *name, char *dn_out, size_t dn_size,
                       char *errstr, size_t errstr_size);

/* Adds the n member DNs to group_dn in one modify (already a member counts
 * as success; when the server refuses the list because one value exists, the
 * values are added one at a time). Removes the placeholder afterwards. */
int qm_ldap_add_members(qm_ldap_t *ldap, const char *group_dn, const char *const *member_dns,
                        size_t n, char *errstr, size_t errstr_size);

/* qm_ldap_add_members() for one DN. */
int qm_ldap_add_member(qm_ldap_t *ldap, const char *group_dn, const char *member_dn,
                       char *errstr, size_t errstr_size);

/* Deletes member_dn from group_dn's member attribute. Not a member, or no
 * such group, counts as success; the last member of a groupOfNames is
 * replaced by the placeholder (see above). */
int qm_ldap_remove_member(qm_ldap_t *ldap, const char *group_dn, const char *member_dn,
                          char *errstr, size_t errstr_size);

/* Called once per member DN (the placeholder excluded); valid only during
 * the call. A non-zero return stops the walk and becomes the result. */
typedef int (*qm_ldap_member_fn)(void *ctx, const char *member_dn);

/* Walks the members of group_dn. The entry is read in full before the first
 * callback, so a failed call never calls cb. QM_ENOTFOUND when no such entry. */
int qm_ldap_list_members(qm_ldap_t *ldap, const char *group_dn, qm_ldap_member_fn cb, void *ctx,
                         char *errstr, size_t errstr_size);

/* Forgets every cached name -> DN mapping. */
void qm_ldap_cache_clear(qm_ldap_t *ldap);

/* The counters so far. */
void qm_ldap_stats(qm_ldap_t *ldap, qm_ldap_stats_t *stats);

#endif /* QM_LDAP_H */
