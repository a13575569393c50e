/*
 * qm_auth: verifies the bearer JWTs every HTTP API requires and turns them
 * into a principal (who is calling, with which roles).
 *
 * Two modes, fixed by configuration:
 *  - HS256 with a shared secret: development and tests (qm_auth_mint_hs256()
 *    makes such tokens for the development token command);
 *  - RS256 with a JWKS file: production. Keys are RSA public keys selected by
 *    the token's `kid` header; the file is re-read on qm_auth_reload() (on
 *    SIGHUP, or when a key rotation is announced), keeping the old keys if the
 *    new file is unusable.
 *
 * A token passes only if its header names exactly the configured algorithm
 * (checked on the raw header before any key is used, which defeats the "alg
 * confusion" attack where an HS256 token is signed with the RSA public key as
 * HMAC secret, and rejects alg "none"), its signature verifies, `exp` is
 * present and not past, `nbf` (if present) is not in the future (both with
 * the configured leeway), `iss` and `aud` match when configured, and `sub` is
 * a non-empty string. Claim `roles` is an optional list of strings.
 *
 * A qm_auth_t is safe to use from many threads at once (verification takes a
 * read lock on the key set; reload swaps it under the write lock).
 */
#ifndef QM_AUTH_H
#define QM_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QM_AUTH_MAX_ROLES 16
#define QM_AUTH_ROLE_MAX 32 /* characters in one role name */
#define QM_AUTH_SUB_MAX 128 /* characters in a subject (person id) */
#define QM_AUTH_MIN_SECRET 32 /* bytes in an HS256 secret (RFC 7518 §3.2) */

typedef enum {
  QM_AUTH_HS256 = 1, /* shared secret: development and tests */
  QM_AUTH_RS256 = 2  /* RSA keys from a JWKS file: production */
} qm_auth_mode_t;

typedef struct {
  qm_auth_mode_t mode;
  const char *hs256_secret; /* HS256: at least QM_AUTH_MIN_SECRET bytes */
  const char *jwks_path;    /* RS256: a JWKS file ({"keys":[{"kty":"RSA",…}]}) */
  const char *issuer;       /* expected `iss`; NULL or "" = not checked */
  const char *audience;     /* expected in `aud` (string or list); NULL or "" = not checked */
  int leeway_s;             /* clock skew allowed on exp and nbf, seconds (>= 0) */
} qm_auth_conf_t;

/* The verified caller. A plain value: copy it freely, nothing to free. */
typedef struct {
  char sub[QM_AUTH_SUB_MAX + 1]; /* the caller's person id */
  char roles[QM_AUTH_MAX_ROLES][QM_AUTH_ROLE_MAX + 1];
  size_t nroles; /* unknown role names are kept as given */
  int64_t exp;   /* expiry, Unix seconds */
} qm_principal_t;

typedef struct qm_auth qm_auth_t;

/* Builds a verifier from conf (the strings are copied). In RS256 mode reads
 * the JWKS file now; it must hold at least one usable RSA signing key of at
 * least 2048 bits. On success *out is set; caller frees with
 * qm_auth_destroy(). Returns 0 or QM_EINVAL (bad configuration or key file,
 * reason in errstr); *out is untouched on failure. */
int qm_auth_new(const qm_auth_conf_t *conf, qm_auth_t **out, char *errstr, size_t errstr_size);

/* Frees the verifier. No verification may be running. NULL is a no-op. */
void qm_auth_destroy(qm_auth_t *auth);

/* Re-reads the JWKS file (RS256 mode) and swaps the key set in when it is
 * usable; on failure keeps the keys it had and returns QM_EINVAL with the
 * reason. A no-op returning 0 in HS256 mode. Safe while other threads verify. */
int qm_auth_reload(qm_auth_t *auth, char *errstr, size_t errstr_size);

/* Verifies a compact JWS token (without the "Bearer " prefix). Returns 0 and
 * fills *out, or QM_EAUTH with a precise reason in errstr (suitable for the
 * client: it names what is wrong, never a key) and leaves *out untouched.
 * QM_EINVAL when auth, token or out is NULL. */
int qm_auth_verify(qm_auth_t *auth, const char *token, qm_principal_t *out, char *errstr,
                   size_t errstr_size);

/* True when the principal holds this role (exact, case-sensitive match). */
bool qm_principal_has_role(const qm_principal_t *p, const char *role);

/* Makes an HS256 token for development and tests: claims sub, roles (n
 * strings, each at most QM_AUTH_ROLE_MAX characters, n <= QM_AUTH_MAX_ROLES),
 * iat = now, exp = now + ttl_s, iss "quartermaster-dev". On success
 * *token_out is set; caller frees with free(). Returns 0 or QM_EINVAL (bad
 * arguments, secret shorter than QM_AUTH_MIN_SECRET). */
int qm_auth_mint_hs256(const char *secret, const char *sub, const char *const *roles, size_t n,
                       int64_t ttl_s, char **token_out);

#endif /* QM_AUTH_H */
