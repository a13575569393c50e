/*
 * qm_scim: a SCIM 2.0 client (RFC 7643/7644) for provisioning group
 * memberships into Okta/Entra-style directories: look up users and groups by
 * name, add and remove members, and list a group's members for drift
 * reconciliation.
 *
 * Every operation is idempotent on purpose: adding a member who is already
 * there, or removing one who is not, succeeds, so a provisioning step may be
 * replayed after a crash. Failures are classified for the caller:
 *  - QM_ETRANSIENT: 5xx, 429, network errors, timeouts, after max_attempts
 *    tries with exponential backoff and full jitter (Retry-After honoured on
 *    429/503, bounded by backoff_max_ms). Try again later;
 *  - QM_EAUTH: 401 or 403 — the bearer token is wrong, expired or lacks scope;
 *  - QM_ENOTFOUND: the user, group or member asked for does not exist;
 *  - QM_EINVAL: any other 4xx (the request is wrong: retrying will not help),
 *    or a TLS verification failure or bad URL (the configuration is wrong);
 *  - QM_ESHUTDOWN: the process is shutting down (a backoff sleep or a
 *    transfer was cut short).
 * errstr then carries the HTTP status and the SCIM error's scimType and
 * detail (urn:ietf:params:scim:api:messages:2.0:Error).
 *
 * Thread safety: a qm_scim_t may be shared by any number of threads. Each
 * call borrows a libcurl easy handle from a small pool (so connections are
 * reused and no lock is held during a transfer or a backoff sleep); the
 * name -> id cache and the counters are internally synchronised.
 */
#ifndef QM_SCIM_H
#define QM_SCIM_H

#include <stddef.h>
#include <stdint.h>

typedef struct qm_scim qm_scim_t;

/* Which directory's quirks to speak. */
typedef enum {
  QM_SCIM_DIALECT_GENERIC = 0, /* RFC 7644 as written */
  QM_SCIM_DIALECT_OKTA,        /* RFC ops; PATCH answers 200 or 204 (accepted by all) */
  QM_SCIM_DIALECT_ENTRA        /* capitalised PATCH ops ("Add", "Remove") */
} qm_scim_dialect_t;

/* Client configuration. Strings are copied by qm_scim_new(); a 0 number
 * means the default shown. */
typedef struct qm_scim_config {
  /* e.g. "https://idp.example.com/scim/v2" (no trailing slash needed). For
   * Entra, the operator includes "?aadOptscim062020" when the tenant needs it;
   * a query string in the base URL is kept after every request path. */
  const char *base_url;
  const char *bearer_token; /* sent as "Authorization: Bearer <token>"; never logged */
  const char *ca_file;      /* PEM bundle to verify the server with; NULL: system store */
  int connect_timeout_ms;   /* 5000 */
  int total_timeout_ms;     /* 30000: one HTTP attempt, end to end */
  int max_attempts;         /* 5: tries per operation, the first included */
  int backoff_base_ms;      /* 200: first retry waits up to this (full jitter) */
  int backoff_max_ms;       /* 10000: cap of any wait, Retry-After included */
  int cache_ttl_ms;         /* 300000: name -> id cache lifetime; < 0 disables it */
  qm_scim_dialect_t dialect;
} qm_scim_config_t;

/* Counters since qm_scim_new(), for metrics. */
typedef struct qm_scim_stats {
  uint64_t attempts;     /* HTTP requests sent (every try) */
  uint64_t retries;      /* tries after the first, within an operation */
  uint64_t failures;     /* operations that returned an error */
  uint64_t cache_hits;   /* find calls answered from the cache */
  uint64_t cache_misses; /* find calls that asked the server */
} qm_scim_stats_t;

/* Parses "generic", "okta" or "entra" (any case). 0 or QM_EINVAL. */
int qm_scim_dialect_parse(const char *s, qm_scim_dialect_t *dialect);

/* Creates a client; no request is made. Returns NULL with the reason in
 * errstr when the configuration is unusable (no base URL or token, a URL that
 * is not http(s)). TLS peer and host verification are always on.
 * Caller frees with qm_scim_destroy(). */
qm_scim_t *qm_scim_new(const qm_scim_config_t *cfg, char *errstr, size_t errstr_size);

/* Frees the client. No call may be running on it. NULL is fine. */
void qm_scim_destroy(qm_scim_t *scim);

/* The id of the user whose userName is user_name (GET /Users?filter=userName
 * eq "..."), written NUL-terminated into id_out. Answers from the cache when
 * the name was found less than cache_ttl_ms ago (misses are not cached: a
 * user created a moment later must be found). QM_ENOTFOUND when no user has
 * that name, QM_ECONFLICT when the server answers several and none matches
 * exactly, QM_EINVAL when id_size is too small for the id. */
int qm_scim_find_user(qm_scim_t *scim, const char *user_name, char *id_out, size_t id_size,
                      char *errstr, size_t errstr_size);

/* The id of the group whose displayName is display_name, as qm_scim_find_user(). */
int qm_scim_find_group(qm_scim_t *scim, const char *display_name, char *id_out, size_t id_size,
                       char *errstr, size_t errstr_size);

/* Makes user_id a member of group_id (PATCH /Groups/{group_id}, op add).
 * Already a member counts as success. QM_ENOTFOUND when the group does not
 * exist (the cache forgets it). */
int qm_scim_add_member(qm_scim_t *scim, const char *group_id, const char *user_id, char *errstr,
                       size_t errstr_size);

/* Adds n users to the group in one PATCH operation (one "add" with a list of
 * values): how a connector keeps up when many grants hit the same group,
 * since directories cost per request more than per member. Same outcomes as
 * qm_scim_add_member() for all n together; a server that answers 409 to the
 * list is asked again one member at a time. */
int qm_scim_add_members(qm_scim_t *scim, const char *group_id, const char *const *user_ids,
                        size_t n, char *errstr, size_t errstr_size);

/* Makes user_id not a member of group_id (PATCH, op remove, path
 * members[value eq "<id>"] — never a bare "members", which would empty the
 * group). Not a member, or no such group, counts as success. */
int qm_scim_remove_member(qm_scim_t *scim, const char *group_id, const char *user_id,
                          char *errstr, size_t errstr_size);

/* Called once per member: value is the member's id, display and type
 * ("User", "Group") may be NULL. All valid only during the call. A non-zero
 * return stops the walk and becomes qm_scim_list_members()'s result. */
typedef int (*qm_scim_member_fn)(void *ctx, const char *value, const char *display,
                                 const char *type);

/* Walks the members of group_id (GET /Groups/{id}?attributes=members,
 * following startIndex/itemsPerPage pages when the server pages them). All
 * pages are fetched before the first callback, so a failed call never calls
 * cb. QM_ENOTFOUND when the group does not exist. */
int qm_scim_list_members(qm_scim_t *scim, const char *group_id, qm_scim_member_fn cb, void *ctx,
                         char *errstr, size_t errstr_size);

/* Forgets every cached name -> id mapping (e.g. after a directory reset). */
void qm_scim_cache_clear(qm_scim_t *scim);

/* The counters so far. */
void qm_scim_stats(qm_scim_t *scim, qm_scim_stats_t *stats);

#endif /* QM_SCIM_H */
