/*
 * qm-admin: the operator's and developer's small command-line companion.
 *
 *   qm-admin create-topics   creates the six Quartermaster topics and their
 *                            ".dlq" twins (idempotent: existing ones count as
 *                            created), so a fresh broker is ready for the
 *                            services;
 *   qm-admin token           mints a development HS256 bearer token for a
 *                            person and roles, for curl and the tests.
 *
 * Every option takes its value as "--name value" or "--name=value". Exit
 * codes: 0 done, 1 the operation failed (broker unreachable, minting
 * refused), 2 bad usage (unknown option, a value out of range), with the
 * reason on stderr.
 */
#include "qm_auth.h"
#include "qm_common.h"
#include "qm_kafka.h"
#include "qm_log.h"
#include "qm_topics.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ADMIN_EXIT_OK 0
#define ADMIN_EXIT_FAIL 1
#define ADMIN_EXIT_USAGE 2

/* The secret the services fall back to when QM_AUTH_HS256_SECRET is unset
 * (development only: anyone can read it here). */
#define ADMIN_DEV_SECRET "quartermaster-local-development-secret-do-not-use-in-production"

#define ADMIN_TOPIC_TIMEOUT_MS 30000
#define ADMIN_MAX_TTL_S (366LL * 24 * 3600)

/* One recognised option of a subcommand: "--name" and where its value goes. */
typedef struct admin_opt {
  const char *name;   /* without the leading "--" */
  const char **value; /* receives the borrowed argv text */
} admin_opt_t;

static void usage_main(FILE *out) {
  fprintf(out,
          "usage: qm-admin <command> [options]\n"
          "\n"
          "commands:\n"
          "  create-topics   create the Quartermaster topics and their .dlq twins\n"
          "  token           mint a development HS256 bearer token\n"
          "\n"
          "Run 'qm-admin <command> --help' for the options of a command.\n");
}

static void usage_create_topics(FILE *out) {
  fprintf(out,
          "usage: qm-admin create-topics [--brokers B] [--prefix P] [--partitions N]\n"
          "                              [--replication R]\n"
          "\n"
          "Creates every topic of Quartermaster and its dead-letter twin (<topic>.dlq),\n"
          "each name prefixed with P. Topics that already exist are left as they are,\n"
          "so running it again is harmless.\n"
          "\n"
          "  --brokers B       bootstrap brokers host:port[,...]\n"
          "                    (default: $QM_KAFKA_BROKERS, else 127.0.0.1:9092)\n"
          "  --prefix P        topic name prefix (default: $QM_TOPIC_PREFIX, else none)\n"
          "  --partitions N    partitions per topic, 1..10000 (default 3)\n"
          "  --replication R   replication factor, 1..32 (default 1)\n");
}

static void usage_token(FILE *out) {
  fprintf(out,
          "usage: qm-admin token --sub PERSON [--roles R1,R2,...] [--ttl SECONDS]\n"
          "                      [--secret S]\n"
          "\n"
          "Mints an HS256 bearer token for development and tests and prints it alone\n"
          "on stdout, e.g.\n"
          "  curl -H \"Authorization: Bearer $(qm-admin token --sub p-0001 --roles employee)\" ...\n"
          "\n"
          "  --sub PERSON      the caller's person id (claim sub), required\n"
          "  --roles LIST      comma-separated roles (claim roles): employee, contractor,\n"
          "                    manager, helpdesk, approver, it_admin, security, finance,\n"
          "                    auditor (default: none)\n"
          "  --ttl SECONDS     lifetime, 1..%lld (default 3600)\n"
          "  --secret S        HS256 secret, at least %d bytes (default:\n"
          "                    $QM_AUTH_HS256_SECRET, else the services' development secret)\n",
          (long long)ADMIN_MAX_TTL_S, QM_AUTH_MIN_SECRET);
}

/* Parses argv[1..] of a subcommand against opts. Sets *help when --help or
 * -h is given. Returns 0, or ADMIN_EXIT_USAGE after printing the reason. */
static int parse_opts(const char *cmd, int argc, char **argv, const admin_opt_t *opts,
                      size_t n_opts, bool *help) {
  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i];
    if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
      *help = true;
      continue;
    }
    if (strncmp(arg, "--", 2) != 0) {
      fprintf(stderr, "qm-admin %s: unexpected argument '%s' (see --help)\n", cmd, arg);
      return ADMIN_EXIT_USAGE;
    }
    const char *name = arg + 2;
    const char *eq = strchr(name, '=');
    size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
    const admin_opt_t *opt = NULL;
    for (size_t k = 0; k < n_opts; k++) {
      if (strlen(opts[k].name) == name_len && !strncmp(opts[k].name, name, name_len)) {
        opt = &opts[k];
        break;
      }
    }
    if (!opt) {
      fprintf(stderr, "qm-admin %s: unknown option '%.*s' (see --help)\n", cmd,
              (int)(name_len + 2), arg);
      return ADMIN_EXIT_USAGE;
    }
    if (eq) {
      *opt->value = eq + 1;
    } else if (i + 1 < argc) {
      *opt->value = argv[++i];
    } else {
      fprintf(stderr, "qm-admin %s: option --%s needs a value\n", cmd, opt->name);
      return ADMIN_EXIT_USAGE;
    }
  }
  return 0;
}

/* Parses text as a decimal integer within [min, max] (strtoll, whole string).
 * Returns 0 and sets *out, or ADMIN_EXIT_USAGE after printing why. */
static int parse_int(const char *cmd, const char *opt, const char *text, long long min,
                     long long max, long long *out) {
  char *end = NULL;
  errno = 0;
  long long v = strtoll(text, &end, 10);
  if (!*text || *end || errno == ERANGE || v < min || v > max) {
    fprintf(stderr, "qm-admin %s: --%s must be an integer from %lld to %lld, not '%s'\n", cmd,
            opt, min, max, text);
    return ADMIN_EXIT_USAGE;
  }
  *out = v;
  return 0;
}

static const char *env_or(const char *name, const char *fallback) {
  const char *v = getenv(name);
  return v && *v ? v : fallback;
}

static int cmd_create_topics(int argc, char **argv) {
  const char *brokers = env_or("QM_KAFKA_BROKERS", "127.0.0.1:9092");
  const char *prefix = env_or("QM_TOPIC_PREFIX", "");
  const char *partitions_s = "3", *replication_s = "1";
  const admin_opt_t opts[] = {{"brokers", &brokers},
                              {"prefix", &prefix},
                              {"partitions", &partitions_s},
                              {"replication", &replication_s}};
  bool help = false;
  long long partitions = 0, replication = 0;
  char **names = NULL;
  size_t n = 0;
  int rc = parse_opts("create-topics", argc, argv, opts, QM_ARRAY_LEN(opts), &help);
  if (rc != 0) goto out;
  if (help) {
    usage_create_topics(stdout);
    goto out;
  }
  if ((rc = parse_int("create-topics", "partitions", partitions_s, 1, 10000, &partitions)) != 0 ||
      (rc = parse_int("create-topics", "replication", replication_s, 1, 32, &replication)) != 0)
    goto out;
  if (!*brokers) {
    fprintf(stderr, "qm-admin create-topics: --brokers must not be empty\n");
    rc = ADMIN_EXIT_USAGE;
    goto out;
  }
  if (strlen(prefix) > 200) {
    fprintf(stderr, "qm-admin create-topics: --prefix is too long (at most 200 characters)\n");
    rc = ADMIN_EXIT_USAGE;
    goto out;
  }
  names = qm_calloc(qm_topics_count * 2, sizeof(*names));
  for (size_t i = 0; i < qm_topics_count; i++) {
    names[n++] = qm_asprintf("%s%s", prefix, qm_topics_all[i]);
    names[n++] = qm_asprintf("%s%s%s", prefix, qm_topics_all[i], QM_DLQ_SUFFIX);
  }
  char errstr[2048] = "";
  int err = qm_kafka_create_topics(brokers, (const char *const *)names, n, (int)partitions,
                                   (int)replication, ADMIN_TOPIC_TIMEOUT_MS, errstr,
                                   sizeof(errstr));
  if (err != QM_OK) {
    fprintf(stderr, "qm-admin create-topics: %s on %s: %s\n", qm_strerror(err), brokers, errstr);
    rc = ADMIN_EXIT_FAIL;
    goto out;
  }
  for (size_t i = 0; i < n; i++) printf("topic %s: present\n", names[i]);
  printf("%zu topics present on %s (%lld partitions, replication %lld for any created now)\n", n,
         brokers, partitions, replication);
out:
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
  return rc;
}

/* Splits a comma-separated role list into roles[] (copies, caller frees each).
 * Returns 0 or ADMIN_EXIT_USAGE after printing the reason. */
static int split_roles(const char *csv, char **roles, size_t cap, size_t *n) {
  const char *p = csv;
  *n = 0;
  if (!*csv) return 0;
  for (;;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    while (len > 0 && *p == ' ') {
      p++;
      len--;
    }
    while (len > 0 && p[len - 1] == ' ') len--;
    if (len == 0) {
      fprintf(stderr, "qm-admin token: --roles has an empty role in '%s'\n", csv);
      return ADMIN_EXIT_USAGE;
    }
    if (len > QM_AUTH_ROLE_MAX) {
      fprintf(stderr, "qm-admin token: role '%.*s' is longer than %d characters\n", (int)len, p,
              QM_AUTH_ROLE_MAX);
      return ADMIN_EXIT_USAGE;
    }
    if (*n == cap) {
      fprintf(stderr, "qm-admin token: at most %zu roles\n", cap);
      return ADMIN_EXIT_USAGE;
    }
    roles[(*n)++] = qm_strndup(p, len);
    if (!comma) break;
    p = comma + 1;
  }
  return 0;
}

static int cmd_token(int argc, char **argv) {
  const char *sub = NULL, *roles_csv = "", *ttl_s = "3600";
  const char *secret = env_or("QM_AUTH_HS256_SECRET", ADMIN_DEV_SECRET);
  const admin_opt_t opts[] = {
      {"sub", &sub}, {"roles", &roles_csv}, {"ttl", &ttl_s}, {"secret", &secret}};
  bool help = false;
  char *roles[QM_AUTH_MAX_ROLES] = {0};
  size_t n_roles = 0;
  long long ttl = 0;
  char *token = NULL;
  int rc = parse_opts("token", argc, argv, opts, QM_ARRAY_LEN(opts), &help);
  if (rc != 0) goto out;
  if (help) {
    usage_token(stdout);
    goto out;
  }
  if (!sub || !*sub) {
    fprintf(stderr, "qm-admin token: --sub PERSON is required (e.g. --sub p-0001)\n");
    rc = ADMIN_EXIT_USAGE;
    goto out;
  }
  if (strlen(sub) > QM_AUTH_SUB_MAX) {
    fprintf(stderr, "qm-admin token: --sub is longer than %d characters\n", QM_AUTH_SUB_MAX);
    rc = ADMIN_EXIT_USAGE;
    goto out;
  }
  if ((rc = parse_int("token", "ttl", ttl_s, 1, ADMIN_MAX_TTL_S, &ttl)) != 0) goto out;
  if (strlen(secret) < QM_AUTH_MIN_SECRET) {
    fprintf(stderr, "qm-admin token: the secret must be at least %d bytes (RFC 7518 3.2)\n",
            QM_AUTH_MIN_SECRET);
    rc = ADMIN_EXIT_USAGE;
    goto out;
  }
  if ((rc = split_roles(roles_csv, roles, QM_ARRAY_LEN(roles), &n_roles)) != 0) goto out;
  if (qm_auth_mint_hs256(secret, sub, (const char *const *)roles, n_roles, ttl, &token) !=
      QM_OK) {
    fprintf(stderr, "qm-admin token: minting refused (check --sub, --roles and the secret)\n");
    rc = ADMIN_EXIT_FAIL;
    goto out;
  }
  printf("%s\n", token);
out:
  free(token);
  for (size_t i = 0; i < n_roles; i++) free(roles[i]);
  return rc;
}

int main(int argc, char **argv) {
  qm_log_init("admin", QM_LOG_WARN, stderr);
  if (argc < 2) {
    usage_main(stderr);
    return ADMIN_EXIT_USAGE;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
    usage_main(stdout);
    return ADMIN_EXIT_OK;
  }
  if (!strcmp(cmd, "create-topics")) return cmd_create_topics(argc - 1, argv + 1);
  if (!strcmp(cmd, "token")) return cmd_token(argc - 1, argv + 1);
  fprintf(stderr, "qm-admin: unknown command '%s'\n", cmd);
  usage_main(stderr);
  return ADMIN_EXIT_USAGE;
}
