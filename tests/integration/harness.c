/*
 * harness: runs Quartermaster for real under an integration test — the local
 * stack through deploy/local/stack.sh, and per run an isolated database,
 * topic prefix, private SCIM peer and the five service processes — and
 * gives tests small, assertion-backed helpers for HTTP, SCIM and SQL.
 *
 * Processes are started with fork/execve: each in its own process group (so
 * kill -9 hits the service only) with a parent-death signal (so a test
 * process that dies leaves nothing behind), stdin from /dev/null and
 * stdout/stderr appended to its log file. Everything that can go wrong fails
 * the test with the reason and the relevant log tail: the harness never
 * skips.
 *
 * The one piece of mutable file-level state is `it_live`, the stack of the
 * running test, so that it_fini() (Criterion's .fini, which takes no
 * arguments) can clean up after a failed assertion.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "harness.h"

#include "qm_auth.h"
#include "qm_common.h"
#include "qm_kafka.h"
#include "qm_log.h"
#include "qm_redis.h"
#include "qm_topics.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/hr.pb-c.h"
#include "qm/v1/requests.pb-c.h"

#include <criterion/criterion.h>
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define IT_N_SERVICES 5
#define IT_READY_BOUND_MS 60000
#define IT_STOP_GRACE_MS 10000
#define IT_LOG_TAIL_LINES 30
#define IT_PG_ADMIN_DSN "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=10"

static const char *const it_service_names[IT_N_SERVICES] = {"intake", "approval", "provisioning",
                                                            "fulfillment", "audit"};

/* A NULL-terminated list of "NAME=value" strings (an envp). */
typedef struct it_env {
  char **v;
  size_t n, cap;
} it_env_t;

typedef struct it_svc {
  const char *name; /* one of it_service_names */
  it_env_t extra;   /* per-service overrides ("NAME=value"; "NAME" removes) */
  int port;
  pid_t pid; /* 0 when not running */
  char log_path[PATH_MAX];
  int starts; /* how many times it was started */
} it_svc_t;

struct it_stack {
  char run[48];
  char db[64];
  char dsn[256];
  char prefix[160];
  char log_dir[PATH_MAX];
  int64_t t0_ms;
  int scim_port;
  pid_t scim_pid;
  char scim_log[PATH_MAX + 16];
  it_svc_t svc[IT_N_SERVICES];
  PGconn *pg;                 /* to the run's database, lazily opened */
  qm_producer_t *hr_prod;     /* for it_hr_publish(), lazily created */
  pthread_mutex_t scim_lock;  /* guards scim_users */
  json_t *scim_users;         /* SCIM user id -> userName, lazily loaded */
};

/* The stack of the running test, for it_fini(). */
static it_stack_t *it_live = NULL;

/* ------------------------------------------------------------ small things */

int64_t it_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void it_sleep_ms(int ms) {
  struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
  }
}

char *it_json_text(const json_t *j) {
  if (!j) return qm_strdup("(null)");
  char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
  return s ? s : qm_strdup("(unprintable)");
}

static void it_note(const it_stack_t *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void it_note(const it_stack_t *st, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  fprintf(stderr, "[it %s +%.1fs] %s\n", st ? st->run : "-",
          st ? (double)(it_now_ms() - st->t0_ms) / 1000.0 : 0.0, msg);
  fflush(stderr);
}

/* Reads a whole file into a new NUL-terminated string (NULL when unreadable). */
static char *read_file(const char *path, size_t *len_out) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 4096, len = 0;
  char *buf = qm_malloc(cap);
  size_t n;
  while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
    len += n;
    if (cap - len < 2) {
      cap *= 2;
      buf = qm_realloc(buf, cap);
    }
  }
  fclose(f);
  buf[len] = '\0';
  if (len_out) *len_out = len;
  return buf;
}

/* The last n lines of a file (or a note saying it cannot be read). */
static char *file_tail(const char *path, int n) {
  size_t len = 0;
  char *all = read_file(path, &len);
  if (!all) return qm_asprintf("(cannot read %s: %s)", path, strerror(errno));
  size_t pos = len;
  if (pos > 0 && all[pos - 1] == '\n') pos--;
  int lines = 0;
  while (pos > 0) {
    if (all[pos - 1] == '\n' && ++lines == n) break;
    pos--;
  }
  char *tail = qm_strdup(all + pos);
  free(all);
  return tail;
}

static void append_line(const char *path, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void append_line(const char *path, const char *fmt, ...) {
  FILE *f = fopen(path, "a");
  if (!f) return;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(f, fmt, ap);
  va_end(ap);
  fputc('\n', f);
  fclose(f);
}

static void mkdir_p(const char *path) {
  char buf[PATH_MAX];
  qm_strlcpy(buf, path, sizeof(buf));
  for (char *p = buf + 1; *p; p++) {
    if (*p == '/') {
      *p = '\0';
      mkdir(buf, 0755);
      *p = '/';
    }
  }
  if (mkdir(buf, 0755) != 0 && errno != EEXIST)
    cr_assert_fail("cannot create directory %s: %s", buf, strerror(errno));
}

/* Keeps [a-z0-9] and maps everything else to sep; at most cap-1 characters. */
static void sanitize(const char *in, char sep, char *out, size_t cap) {
  size_t j = 0;
  for (size_t i = 0; in[i] && j + 1 < cap; i++) {
    char c = in[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    out[j++] = ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) ? c : sep;
  }
  out[j] = '\0';
}

/* A TCP port nobody listens on right now (bind port 0, read it back),
 * different from every port in avoid. */
static int free_port(const int *avoid, size_t n_avoid) {
  for (int attempt = 0; attempt < 50; attempt++) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert(fd >= 0, "socket: %s", strerror(errno));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    int ok = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
             getsockname(fd, (struct sockaddr *)&sa, &sl) == 0;
    close(fd);
    cr_assert(ok, "cannot bind an ephemeral port on 127.0.0.1: %s", strerror(errno));
    int port = ntohs(sa.sin_port);
    bool clash = false;
    for (size_t i = 0; i < n_avoid; i++) clash = clash || avoid[i] == port;
    if (!clash) return port;
  }
  cr_assert_fail("no free port found");
  return 0;
}

static void ports_in_use(const it_stack_t *st, int *out, size_t *n) {
  *n = 0;
  if (st->scim_port) out[(*n)++] = st->scim_port;
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (st->svc[i].port) out[(*n)++] = st->svc[i].port;
}

/* ------------------------------------------------------------ environments */

/* The test's environment without any QM_* variable (a developer's shell
 * must not change what the harness runs). */
static void env_init(it_env_t *e) {
  e->n = 0;
  e->cap = 64;
  e->v = qm_calloc(e->cap, sizeof(char *));
  for (char **p = environ; p && *p; p++) {
    if (!strncmp(*p, "QM_", 3)) continue;
    if (e->n + 2 >= e->cap) {
      e->cap *= 2;
      e->v = qm_realloc(e->v, e->cap * sizeof(char *));
    }
    e->v[e->n++] = qm_strdup(*p);
    e->v[e->n] = NULL;
  }
}

/* Sets "NAME=value" (kv), replacing an earlier NAME. */
static void env_put(it_env_t *e, const char *kv) {
  const char *eq = strchr(kv, '=');
  size_t nl = eq ? (size_t)(eq - kv) + 1 : strlen(kv);
  for (size_t i = 0; i < e->n; i++) {
    if (!strncmp(e->v[i], kv, nl)) {
      free(e->v[i]);
      e->v[i] = qm_strdup(kv);
      return;
    }
  }
  if (e->n + 2 >= e->cap) {
    e->cap *= 2;
    e->v = qm_realloc(e->v, e->cap * sizeof(char *));
  }
  e->v[e->n++] = qm_strdup(kv);
  e->v[e->n] = NULL;
}

/* Removes NAME (kv is "NAME" or "NAME=…"). */
static void env_remove(it_env_t *e, const char *kv) {
  const char *eq = strchr(kv, '=');
  size_t nl = eq ? (size_t)(eq - kv) : strlen(kv);
  for (size_t i = 0; i < e->n; i++) {
    if (!strncmp(e->v[i], kv, nl) && e->v[i][nl] == '=') {
      free(e->v[i]);
      memmove(&e->v[i], &e->v[i + 1], (e->n - i) * sizeof(char *));
      e->n--;
      return;
    }
  }
}

/* An override list: "NAME=value" replaces, "NAME" is kept as a removal. */
static void override_put(it_env_t *e, const char *kv) {
  if (!e->v) {
    e->cap = 8;
    e->v = qm_calloc(e->cap, sizeof(char *));
  }
  const char *eq = strchr(kv, '=');
  size_t nl = eq ? (size_t)(eq - kv) : strlen(kv);
  for (size_t i = 0; i < e->n; i++) {
    const char *o = e->v[i];
    if (!strncmp(o, kv, nl) && (o[nl] == '=' || o[nl] == '\0')) {
      free(e->v[i]);
      e->v[i] = qm_strdup(kv);
      return;
    }
  }
  if (e->n + 2 >= e->cap) {
    e->cap *= 2;
    e->v = qm_realloc(e->v, e->cap * sizeof(char *));
  }
  e->v[e->n++] = qm_strdup(kv);
  e->v[e->n] = NULL;
}

static void env_set(it_env_t *e, const char *name, const char *value) {
  char *kv = qm_asprintf("%s=%s", name, value);
  env_put(e, kv);
  free(kv);
}

static void env_free(it_env_t *e) {
  for (size_t i = 0; i < e->n; i++) free(e->v[i]);
  free(e->v);
  e->v = NULL;
  e->n = e->cap = 0;
}

/* ------------------------------------------------------------ processes */

/* Forks and execs path with argv/envp. The child gets its own process group,
 * a parent-death signal (SIGTERM), stdin from /dev/null, stdout on out_fd and
 * stderr on err_fd, and no other inherited descriptor. Everything the child
 * needs is prepared before fork (only async-signal-safe calls after it).
 * Returns the pid, or -1 with errno when fork failed. */
static pid_t spawn_fds(const char *path, char *const argv[], char *const envp[], int out_fd,
                       int err_fd) {
  pid_t parent = getpid();
  int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    if (devnull >= 0) dup2(devnull, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    close_range(3, ~0U, 0);
    execve(path, argv, envp);
    static const char msg[] = "it harness: execve failed\n";
    ssize_t ignored = write(2, msg, sizeof(msg) - 1);
    (void)ignored;
    _exit(127);
  }
  int saved = errno;
  if (devnull >= 0) close(devnull);
  errno = saved;
  return pid;
}

/* Spawns with stdout and stderr appended to log_path. */
static pid_t spawn_logged(const char *path, char *const argv[], char *const envp[],
                          const char *log_path) {
  int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  cr_assert(fd >= 0, "cannot open log %s: %s", log_path, strerror(errno));
  pid_t pid = spawn_fds(path, argv, envp, fd, fd);
  int saved = errno;
  close(fd);
  cr_assert(pid > 0, "fork for %s failed: %s", path, strerror(saved));
  return pid;
}

/* Waits up to timeout_ms for pid to exit. Returns the exit status as
 * it_service_term() does, or -2 when it is still running. */
static int wait_exit(pid_t pid, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  for (;;) {
    int ws = 0;
    pid_t r = waitpid(pid, &ws, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(ws)) return WEXITSTATUS(ws);
      if (WIFSIGNALED(ws)) return 128 + WTERMSIG(ws);
      return 255;
    }
    if (r < 0 && errno != EINTR) return 255; /* not our child any more */
    if (it_now_ms() >= deadline) return -2;
    it_sleep_ms(20);
  }
}

/* SIGTERM, wait up to grace_ms, then SIGKILL. Returns the exit status, or -1
 * when SIGKILL was needed. */
static int stop_pid(pid_t pid, int grace_ms) {
  if (pid <= 0) return 0;
  kill(pid, SIGTERM);
  int rc = wait_exit(pid, grace_ms);
  if (rc != -2) return rc;
  kill(pid, SIGKILL);
  wait_exit(pid, 5000);
  return -1;
}

/* Finds an executable on PATH (cr_assert when absent). Caller frees. */
static char *which(const char *prog) {
  const char *path = getenv("PATH");
  if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
  const char *p = path;
  while (*p) {
    const char *colon = strchr(p, ':');
    size_t len = colon ? (size_t)(colon - p) : strlen(p);
    char *cand = qm_asprintf("%.*s/%s", (int)len, p, prog);
    if (access(cand, X_OK) == 0) return cand;
    free(cand);
    if (!colon) break;
    p = colon + 1;
  }
  cr_assert_fail("%s not found on PATH (%s): run deploy/local/install-deps.sh", prog, path);
  return NULL;
}

int it_run(const char *const *argv, const char *const *env_extra, int timeout_ms, char **out,
           char **err) {
  char out_path[] = "/tmp/qm-it-out-XXXXXX", err_path[] = "/tmp/qm-it-err-XXXXXX";
  int out_fd = mkostemp(out_path, O_CLOEXEC), err_fd = mkostemp(err_path, O_CLOEXEC);
  cr_assert(out_fd >= 0 && err_fd >= 0, "mkstemp: %s", strerror(errno));
  it_env_t env;
  env_init(&env);
  for (size_t i = 0; env_extra && env_extra[i]; i++) env_put(&env, env_extra[i]);
  pid_t pid = spawn_fds(argv[0], (char *const *)argv, env.v, out_fd, err_fd);
  int saved = errno;
  close(out_fd);
  close(err_fd);
  env_free(&env);
  cr_assert(pid > 0, "cannot start %s: %s", argv[0], strerror(saved));
  int rc = wait_exit(pid, timeout_ms);
  if (rc == -2) {
    kill(pid, SIGKILL);
    wait_exit(pid, 5000);
    rc = -1;
  }
  if (out) {
    *out = read_file(out_path, NULL);
    if (!*out) *out = qm_strdup("");
  }
  if (err) {
    *err = read_file(err_path, NULL);
    if (!*err) *err = qm_strdup("");
  }
  unlink(out_path);
  unlink(err_path);
  return rc;
}

/* ------------------------------------------------------------ HTTP */

typedef struct it_buf {
  char *p;
  size_t len, cap;
} it_buf_t;

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
  it_buf_t *b = ud;
  size_t n = size * nmemb;
  if (b->len + n + 1 > b->cap) {
    b->cap = (b->len + n + 1) * 2;
    b->p = qm_realloc(b->p, b->cap);
  }
  memcpy(b->p + b->len, data, n);
  b->len += n;
  b->p[b->len] = '\0';
  return n;
}

/* Copies the value of header `name` from one raw header line, when it is that header. */
static void header_value(const char *line, size_t len, const char *name, char *out, size_t cap) {
  size_t nl = strlen(name);
  if (len <= nl || strncasecmp(line, name, nl) != 0 || line[nl] != ':') return;
  const char *v = line + nl + 1;
  const char *end = line + len;
  while (v < end && (*v == ' ' || *v == '\t')) v++;
  while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ')) end--;
  size_t vl = (size_t)(end - v);
  if (vl >= cap) vl = cap - 1;
  memcpy(out, v, vl);
  out[vl] = '\0';
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ud) {
  it_resp_t *r = ud;
  size_t n = size * nmemb;
  size_t have = r->headers ? strlen(r->headers) : 0;
  r->headers = qm_realloc(r->headers, have + n + 1);
  memcpy(r->headers + have, data, n);
  r->headers[have + n] = '\0';
  header_value(data, n, "Content-Type", r->content_type, sizeof(r->content_type));
  header_value(data, n, "Location", r->location, sizeof(r->location));
  return n;
}

/* One exchange with url; shared by it_http() and the SCIM helpers. */
static long http_do(const char *method, const char *url, const char *bearer, const char *body,
                    const char *const *headers, it_resp_t *out) {
  memset(out, 0, sizeof(*out));
  CURL *h = curl_easy_init();
  cr_assert(h != NULL, "curl_easy_init failed");
  struct curl_slist *hl = NULL;
  char *auth = NULL;
  if (bearer) {
    auth = qm_asprintf("Authorization: Bearer %s", bearer);
    hl = curl_slist_append(hl, auth);
  }
  if (body) hl = curl_slist_append(hl, "Content-Type: application/json");
  hl = curl_slist_append(hl, "Expect:");
  for (size_t i = 0; headers && headers[i]; i++) hl = curl_slist_append(hl, headers[i]);
  it_buf_t b = {.p = qm_calloc(1, 256), .len = 0, .cap = 256};
  char curl_err[CURL_ERROR_SIZE] = "";
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  if (!strcmp(method, "HEAD")) curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  if (body) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
  }
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, out);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 15000L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 3000L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
  CURLcode cc = curl_easy_perform(h);
  if (cc == CURLE_OK) {
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &out->status);
    curl_easy_getinfo(h, CURLINFO_TOTAL_TIME, &out->seconds);
    out->body = b.p;
    if (b.len > 0) out->json = json_loadb(b.p, b.len, JSON_DECODE_ANY, NULL);
  } else {
    out->status = 0;
    out->body = qm_asprintf("%s %s: %s", method, url, curl_err[0] ? curl_err : curl_easy_strerror(cc));
    free(b.p);
  }
  curl_slist_free_all(hl);
  free(auth);
  curl_easy_cleanup(h);
  return out->status;
}

void it_resp_clear(it_resp_t *r) {
  if (!r) return;
  json_decref(r->json);
  free(r->body);
  free(r->headers);
  memset(r, 0, sizeof(*r));
}

bool it_resp_header(const it_resp_t *r, const char *name, char *out, size_t cap) {
  if (cap > 0) out[0] = '\0';
  if (!r->headers || cap == 0) return false;
  /* Only the last response's headers count (curl reports every hop's). */
  const char *p = r->headers, *found = NULL;
  size_t found_len = 0;
  while (*p) {
    const char *eol = strchr(p, '\n');
    size_t len = eol ? (size_t)(eol - p) + 1 : strlen(p);
    if (len >= 5 && !strncmp(p, "HTTP/", 5)) found = NULL;
    size_t nl = strlen(name);
    if (len > nl && !strncasecmp(p, name, nl) && p[nl] == ':') {
      found = p;
      found_len = len;
    }
    p += len;
  }
  if (!found) return false;
  header_value(found, found_len, name, out, cap);
  return true;
}

static it_svc_t *svc_find(it_stack_t *st, const char *name) {
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (!strcmp(st->svc[i].name, name)) return &st->svc[i];
  cr_assert_fail("unknown service '%s' (intake, approval, provisioning, fulfillment, audit)", name);
  return NULL;
}

long it_http(it_stack_t *st, const char *svc, const char *method, const char *path,
             const char *token, const char *body, const char *const *headers, it_resp_t *out) {
  it_svc_t *s = svc_find(st, svc);
  char url[1024];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", s->port, path);
  return http_do(method, url, token, body, headers, out);
}

char *it_token(const char *sub, const char *roles_csv) {
  const char *roles[QM_AUTH_MAX_ROLES] = {NULL};
  char *copies[QM_AUTH_MAX_ROLES] = {NULL};
  size_t n = 0;
  const char *p = roles_csv ? roles_csv : "";
  while (*p && n < QM_AUTH_MAX_ROLES) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    copies[n] = qm_strndup(p, len);
    roles[n] = copies[n];
    n++;
    if (!comma) break;
    p = comma + 1;
  }
  char *token = NULL;
  int rc = qm_auth_mint_hs256(IT_DEV_SECRET, sub, roles, n, 3600, &token);
  for (size_t i = 0; i < n; i++) free(copies[i]);
  cr_assert(rc == QM_OK && token, "cannot mint a token for %s (%s): %s", sub, roles_csv,
            qm_strerror(rc));
  return token;
}

/* ------------------------------------------------------------ requests */

char *it_request_submit(it_stack_t *st, const char *token, const char *body) {
  it_resp_t r;
  it_http(st, "intake", "POST", "/v1/requests", token, body, NULL, &r);
  const char *id = json_string_value(json_object_get(r.json, "id"));
  cr_assert(r.status == 201 && id && *id, "POST /v1/requests %s: expected 201 with an id, got %ld %s",
            body, r.status, r.body);
  char *out = qm_strdup(id);
  it_resp_clear(&r);
  return out;
}

json_t *it_request_wait(it_stack_t *st, const char *id, const char *token, const char *want,
                        int timeout_ms) {
  char path[256];
  snprintf(path, sizeof(path), "/v1/requests/%s", id);
  int64_t deadline = it_now_ms() + timeout_ms;
  it_resp_t r = {0};
  for (;;) {
    it_resp_clear(&r);
    it_http(st, "intake", "GET", path, token, NULL, NULL, &r);
    const char *status = json_string_value(json_object_get(r.json, "status"));
    if (r.status == 200 && status && !strcmp(status, want)) break;
    if (it_now_ms() >= deadline)
      cr_assert_fail("request %s did not reach status '%s' within %d ms; last answer %ld: %s", id,
                     want, timeout_ms, r.status, r.body);
    it_sleep_ms(25);
  }
  json_t *j = json_incref(r.json);
  it_resp_clear(&r);
  return j;
}

json_t *it_requests_of(it_stack_t *st, const char *token, const char *subject) {
  CURL *h = curl_easy_init();
  char *esc = curl_easy_escape(h, subject, 0);
  char *path = qm_asprintf("/v1/requests?subject=%s&limit=200", esc);
  curl_free(esc);
  curl_easy_cleanup(h);
  it_resp_t r;
  it_http(st, "intake", "GET", path, token, NULL, NULL, &r);
  json_t *items = json_object_get(r.json, "items");
  cr_assert(r.status == 200 && json_is_array(items), "GET %s: expected 200 with items, got %ld %s",
            path, r.status, r.body);
  json_incref(items);
  it_resp_clear(&r);
  free(path);
  return items;
}

json_t *it_seed_person(const char *id) {
  json_error_t jerr;
  json_t *root = json_load_file(QM_SOURCE_DIR "/deploy/local/seed/people.json", 0, &jerr);
  cr_assert(root != NULL, "deploy/local/seed/people.json: %s (line %d)", jerr.text, jerr.line);
  json_t *found = NULL;
  size_t i;
  json_t *p;
  json_array_foreach(json_object_get(root, "people"), i, p) {
    const char *pid = json_string_value(json_object_get(p, "id"));
    if (pid && !strcmp(pid, id)) {
      found = json_incref(p);
      break;
    }
  }
  json_decref(root);
  return found;
}

/* ------------------------------------------------------------ files */

char *it_dir_copy_yaml(const char *src_dir, const char *tag) {
  char *dir = qm_asprintf("/tmp/qm-it-%s-XXXXXX", tag);
  cr_assert(mkdtemp(dir) != NULL, "mkdtemp %s: %s", dir, strerror(errno));
  DIR *d = opendir(src_dir);
  cr_assert(d != NULL, "opendir %s: %s", src_dir, strerror(errno));
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    size_t n = strlen(de->d_name);
    bool yaml = (n > 5 && !strcmp(de->d_name + n - 5, ".yaml")) ||
                (n > 4 && !strcmp(de->d_name + n - 4, ".yml"));
    if (!yaml) continue;
    char *src = qm_asprintf("%s/%s", src_dir, de->d_name);
    char *text = read_file(src, NULL);
    cr_assert(text != NULL, "reading %s: %s", src, strerror(errno));
    it_file_write(dir, de->d_name, text);
    free(text);
    free(src);
  }
  closedir(d);
  return dir;
}

void it_file_write(const char *dir, const char *name, const char *text) {
  char *path = qm_asprintf("%s/%s", dir, name);
  char *tmp = qm_asprintf("%s/.%s.tmp", dir, name);
  FILE *f = fopen(tmp, "wb");
  cr_assert(f != NULL, "cannot write %s: %s", tmp, strerror(errno));
  size_t len = strlen(text);
  bool ok = fwrite(text, 1, len, f) == len;
  ok = fclose(f) == 0 && ok;
  cr_assert(ok, "writing %s failed", tmp);
  /* rename: a reader never sees half a file */
  cr_assert(rename(tmp, path) == 0, "rename %s -> %s: %s", tmp, path, strerror(errno));
  free(tmp);
  free(path);
}

void it_dir_remove(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
    char *path = qm_asprintf("%s/%s", dir, de->d_name);
    unlink(path);
    free(path);
  }
  closedir(d);
  rmdir(dir);
}

/* ------------------------------------------------------------ SCIM */

static json_t *scim_get(it_stack_t *st, const char *path_query) {
  char url[2048];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/scim/v2%s", st->scim_port, path_query);
  it_resp_t r;
  http_do("GET", url, IT_SCIM_TOKEN, NULL, NULL, &r);
  cr_assert(r.status == 200 && r.json, "SCIM GET %s: %ld %s", path_query, r.status, r.body);
  json_t *j = json_incref(r.json);
  it_resp_clear(&r);
  return j;
}

/* Loads every user (id -> userName) into st->scim_users. Called with scim_lock held. */
static void scim_load_users(it_stack_t *st) {
  json_t *users = json_object();
  long start = 1;
  for (;;) {
    char q[128];
    snprintf(q, sizeof(q), "/Users?attributes=userName&count=1000&startIndex=%ld", start);
    json_t *page = scim_get(st, q);
    json_t *res = json_object_get(page, "Resources");
    size_t i;
    json_t *u;
    json_array_foreach(res, i, u) {
      const char *id = json_string_value(json_object_get(u, "id"));
      const char *un = json_string_value(json_object_get(u, "userName"));
      if (id && un) json_object_set_new(users, id, json_string(un));
    }
    long total = (long)json_integer_value(json_object_get(page, "totalResults"));
    size_t got = json_array_size(res);
    json_decref(page);
    if (got == 0 || (long)json_object_size(users) >= total) break;
    start += (long)got;
  }
  st->scim_users = users;
}

json_t *it_scim_members(it_stack_t *st, const char *group_display_name) {
  CURL *h = curl_easy_init();
  char *filter = qm_asprintf("displayName eq \"%s\"", group_display_name);
  char *esc = curl_easy_escape(h, filter, 0);
  char *q = qm_asprintf("/Groups?filter=%s", esc);
  curl_free(esc);
  curl_easy_cleanup(h);
  free(filter);
  json_t *list = scim_get(st, q);
  free(q);
  json_t *res = json_object_get(list, "Resources");
  cr_assert(json_array_size(res) == 1, "SCIM group '%s': expected exactly one match, got %zu",
            group_display_name, json_array_size(res));
  json_t *members = json_object_get(json_array_get(res, 0), "members");
  json_t *set = json_object();
  pthread_mutex_lock(&st->scim_lock);
  if (!st->scim_users) scim_load_users(st);
  size_t i;
  json_t *m;
  json_array_foreach(members, i, m) {
    const char *id = json_string_value(json_object_get(m, "value"));
    if (!id) continue;
    const char *un = json_string_value(json_object_get(st->scim_users, id));
    if (!un) {
      char path[256];
      snprintf(path, sizeof(path), "/Users/%s", id);
      json_t *u = scim_get(st, path);
      const char *fetched = json_string_value(json_object_get(u, "userName"));
      cr_assert(fetched, "SCIM member %s of %s has no userName", id, group_display_name);
      json_object_set_new(st->scim_users, id, json_string(fetched));
      json_decref(u);
      un = json_string_value(json_object_get(st->scim_users, id));
    }
    json_object_set_new(set, un, json_true());
  }
  pthread_mutex_unlock(&st->scim_lock);
  json_decref(list);
  return set;
}

/* ------------------------------------------------------------ PostgreSQL */

static PGconn *pg_conn(it_stack_t *st) {
  if (st->pg && PQstatus(st->pg) == CONNECTION_OK) return st->pg;
  if (st->pg) PQfinish(st->pg);
  st->pg = PQconnectdb(st->dsn);
  cr_assert(PQstatus(st->pg) == CONNECTION_OK, "cannot connect to %s: %s", st->dsn,
            PQerrorMessage(st->pg));
  return st->pg;
}

static PGresult *pg_query(it_stack_t *st, const char *sql) {
  PGresult *res = PQexec(pg_conn(st), sql);
  ExecStatusType es = PQresultStatus(res);
  if (es != PGRES_TUPLES_OK && es != PGRES_COMMAND_OK) {
    char *msg = qm_strdup(PQresultErrorMessage(res));
    PQclear(res);
    cr_assert_fail("SQL failed on %s: %s\n  %s", st->db, msg, sql);
  }
  return res;
}

char *it_pg_scalar(it_stack_t *st, const char *sql) {
  PGresult *res = pg_query(st, sql);
  char *out = NULL;
  if (PQntuples(res) > 0 && PQnfields(res) > 0 && !PQgetisnull(res, 0, 0))
    out = qm_strdup(PQgetvalue(res, 0, 0));
  PQclear(res);
  return out;
}

long long it_pg_int(it_stack_t *st, const char *sql) {
  char *s = it_pg_scalar(st, sql);
  char *end = NULL;
  errno = 0;
  long long v = s ? strtoll(s, &end, 10) : 0;
  bool ok = s && *s && end && !*end && errno == 0;
  cr_assert(ok, "expected an integer from: %s\n  got: %s", sql, s ? s : "(no row / NULL)");
  free(s);
  return v;
}

json_t *it_pg_rows(it_stack_t *st, const char *sql) {
  PGresult *res = pg_query(st, sql);
  json_t *rows = json_array();
  for (int r = 0; r < PQntuples(res); r++) {
    json_t *row = json_array();
    for (int c = 0; c < PQnfields(res); c++)
      json_array_append_new(row, PQgetisnull(res, r, c) ? json_null()
                                                        : json_string(PQgetvalue(res, r, c)));
    json_array_append_new(rows, row);
  }
  PQclear(res);
  return rows;
}

/* Runs one statement on the administrative database; returns the error text
 * (caller frees) or NULL on success. */
static char *pg_admin(const char *sql) {
  PGconn *c = PQconnectdb(IT_PG_ADMIN_DSN);
  if (PQstatus(c) != CONNECTION_OK) {
    char *e = qm_asprintf("cannot connect (%s): %s", IT_PG_ADMIN_DSN, PQerrorMessage(c));
    PQfinish(c);
    return e;
  }
  PGresult *res = PQexec(c, sql);
  char *e = NULL;
  if (PQresultStatus(res) != PGRES_COMMAND_OK) e = qm_strdup(PQresultErrorMessage(res));
  PQclear(res);
  PQfinish(c);
  return e;
}

/* ------------------------------------------------------------ Kafka topics */

static void topic_names(const it_stack_t *st, char **names, size_t *n) {
  *n = 0;
  for (size_t i = 0; i < qm_topics_count; i++) {
    names[(*n)++] = qm_asprintf("%s%s", st->prefix, qm_topics_all[i]);
    names[(*n)++] = qm_asprintf("%s%s%s", st->prefix, qm_topics_all[i], QM_DLQ_SUFFIX);
  }
}

char *it_topic(const it_stack_t *st, const char *base) {
  return qm_asprintf("%s%s", st->prefix, base);
}

/* Best effort: deletes the run's topics so the broker does not pile up
 * partitions from passed runs. Failures are only reported. */
static void topics_delete(const it_stack_t *st) {
  char *names[32];
  size_t n = 0;
  topic_names(st, names, &n);
  char errstr[512];
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", IT_BROKERS, errstr, sizeof(errstr));
  rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
  if (!rk) {
    rd_kafka_conf_destroy(conf);
    it_note(st, "topic clean-up skipped: %s", errstr);
    goto out;
  }
  rd_kafka_DeleteTopic_t *dt[32];
  for (size_t i = 0; i < n; i++) dt[i] = rd_kafka_DeleteTopic_new(names[i]);
  rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
  rd_kafka_DeleteTopics(rk, dt, n, NULL, q);
  rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 15000);
  if (!ev || rd_kafka_event_error(ev))
    it_note(st, "topic clean-up: %s", ev ? rd_kafka_event_error_string(ev) : "timed out");
  if (ev) rd_kafka_event_destroy(ev);
  rd_kafka_DeleteTopic_destroy_array(dt, n);
  rd_kafka_queue_destroy(q);
  rd_kafka_destroy(rk);
out:
  for (size_t i = 0; i < n; i++) free(names[i]);
}

/* ------------------------------------------------------------ services */

static int http_status_quick(int port, const char *path) {
  char url[256];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
  it_resp_t r;
  long s = http_do("GET", url, NULL, NULL, NULL, &r);
  it_resp_clear(&r);
  return (int)s;
}

static void fail_with_log(const it_stack_t *st, const char *log_path, const char *what) {
  char *tail = file_tail(log_path, IT_LOG_TAIL_LINES);
  it_note(st, "%s\n--- last %d lines of %s ---\n%s", what, IT_LOG_TAIL_LINES, log_path, tail);
  cr_assert_fail("%s\n--- last %d lines of %s ---\n%s", what, IT_LOG_TAIL_LINES, log_path, tail);
}

static void service_env(const it_stack_t *st, const it_svc_t *s, it_env_t *env) {
  char buf[64];
  env_init(env);
  env_set(env, "QM_PG_DSN", st->dsn);
  env_set(env, "QM_KAFKA_BROKERS", IT_BROKERS);
  env_set(env, "QM_TOPIC_PREFIX", st->prefix);
  snprintf(buf, sizeof(buf), "%d", s->port);
  env_set(env, "QM_HTTP_PORT", buf);
  env_set(env, "QM_HTTP_ADDR", "127.0.0.1");
  env_set(env, "QM_LOG_LEVEL", "info");
  char *scim = qm_asprintf("http://127.0.0.1:%d/scim/v2", st->scim_port);
  env_set(env, "QM_SCIM_URL", scim);
  free(scim);
  env_set(env, "QM_SCIM_TOKEN", IT_SCIM_TOKEN);
  env_set(env, "QM_INTAKE_CATALOG_DIR", QM_SOURCE_DIR "/deploy/local/catalog");
  env_set(env, "QM_INTAKE_PEOPLE_FILE", QM_SOURCE_DIR "/deploy/local/seed/people.json");
  env_set(env, "QM_APPROVAL_PEOPLE_FILE", QM_SOURCE_DIR "/deploy/local/seed/people.json");
  env_set(env, "QM_PROVISIONING_BACKOFF", "200ms");
  env_set(env, "QM_CARRIER_WEBHOOK_SECRET", IT_CARRIER_WEBHOOK_SECRET);
  env_set(env, "QM_SHUTDOWN_TIMEOUT", "10s");
  /* The machine's PostgreSQL allows 100 connections, shared with whatever
   * else runs here (a developer's own stack takes ~60): keep pools small. */
  env_set(env, "QM_PG_POOL_SIZE", "4");
  for (size_t i = 0; i < s->extra.n; i++) {
    if (strchr(s->extra.v[i], '=')) env_put(env, s->extra.v[i]);
    else env_remove(env, s->extra.v[i]);
  }
}

/* Starts the process of s (does not wait for readiness). */
static void service_spawn(it_stack_t *st, it_svc_t *s) {
  cr_assert(s->pid == 0, "%s is already running (pid %d)", s->name, (int)s->pid);
  char *bin = qm_asprintf("%s/services/qm-%s", QM_BINARY_DIR, s->name);
  cr_assert(access(bin, X_OK) == 0,
            "%s is missing: build it first (cmake --build %s --target qm-%s)", bin, QM_BINARY_DIR,
            s->name);
  it_env_t env;
  service_env(st, s, &env);
  char *argv[] = {bin, NULL};
  char when[40];
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  qm_time_format_rfc3339((int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, when, sizeof(when));
  s->starts++;
  append_line(s->log_path, "=== it harness: start #%d of qm-%s on 127.0.0.1:%d at %s (db %s, prefix %s) ===",
              s->starts, s->name, s->port, when, st->db, st->prefix);
  s->pid = spawn_logged(bin, argv, env.v, s->log_path);
  env_free(&env);
  free(bin);
}

/* Waits until s answers GET /readyz with 200 (bound IT_READY_BOUND_MS). */
static void service_wait_ready(it_stack_t *st, it_svc_t *s) {
  int64_t t0 = it_now_ms(), deadline = t0 + IT_READY_BOUND_MS;
  int last = 0;
  for (;;) {
    int rc = wait_exit(s->pid, 0);
    if (rc != -2) {
      s->pid = 0;
      char what[256];
      snprintf(what, sizeof(what), "qm-%s exited during start-up with status %d", s->name, rc);
      fail_with_log(st, s->log_path, what);
    }
    last = http_status_quick(s->port, "/readyz");
    if (last == 200) break;
    if (it_now_ms() >= deadline) {
      char what[256];
      snprintf(what, sizeof(what), "qm-%s not ready after %d s (last GET /readyz: %d)", s->name,
               IT_READY_BOUND_MS / 1000, last);
      fail_with_log(st, s->log_path, what);
    }
    it_sleep_ms(50);
  }
  it_note(st, "qm-%s ready on :%d (pid %d, %.1fs)", s->name, s->port, (int)s->pid,
          (double)(it_now_ms() - t0) / 1000.0);
}

void it_service_start(it_stack_t *st, const char *name) {
  it_svc_t *s = svc_find(st, name);
  service_spawn(st, s);
  service_wait_ready(st, s);
}

void it_service_kill9(it_stack_t *st, const char *name) {
  it_svc_t *s = svc_find(st, name);
  cr_assert(s->pid > 0, "kill -9 %s: it is not running", name);
  cr_assert(kill(s->pid, SIGKILL) == 0, "kill -9 %s (pid %d): %s", name, (int)s->pid,
            strerror(errno));
  int rc = wait_exit(s->pid, 10000);
  it_note(st, "qm-%s (pid %d) killed with SIGKILL (status %d)", name, (int)s->pid, rc);
  append_line(s->log_path, "=== it harness: qm-%s pid %d killed with SIGKILL ===", name, (int)s->pid);
  s->pid = 0;
}

int it_service_term(it_stack_t *st, const char *name, int timeout_ms) {
  it_svc_t *s = svc_find(st, name);
  cr_assert(s->pid > 0, "SIGTERM %s: it is not running", name);
  kill(s->pid, SIGTERM);
  int rc = wait_exit(s->pid, timeout_ms);
  if (rc == -2) {
    kill(s->pid, SIGKILL);
    wait_exit(s->pid, 5000);
    rc = -1;
  }
  it_note(st, "qm-%s (pid %d) after SIGTERM: status %d", name, (int)s->pid, rc);
  s->pid = 0;
  return rc;
}

void it_service_setenv(it_stack_t *st, const char *name, const char *kv) {
  override_put(&svc_find(st, name)->extra, kv);
}

void it_service_restart(it_stack_t *st, const char *name) {
  int rc = it_service_term(st, name, 15000);
  if (rc != 0) {
    char what[256];
    snprintf(what, sizeof(what), "qm-%s did not stop cleanly for a restart (status %d)", name, rc);
    fail_with_log(st, svc_find(st, name)->log_path, what);
  }
  it_service_start(st, name);
}

void it_service_signal(it_stack_t *st, const char *name, int sig) {
  it_svc_t *s = svc_find(st, name);
  cr_assert(it_service_running(st, name), "signal %d to %s: it is not running", sig, name);
  cr_assert(kill(s->pid, sig) == 0, "signal %d to %s (pid %d): %s", sig, name, (int)s->pid,
            strerror(errno));
  it_note(st, "signal %d sent to qm-%s (pid %d)", sig, name, (int)s->pid);
}

static const it_svc_t *svc_find_const(const it_stack_t *st, const char *name) {
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (!strcmp(st->svc[i].name, name)) return &st->svc[i];
  cr_assert_fail("unknown service '%s'", name);
  return NULL;
}

size_t it_service_log_size(const it_stack_t *st, const char *name) {
  struct stat sb;
  if (stat(svc_find_const(st, name)->log_path, &sb) != 0) return 0;
  return (size_t)sb.st_size;
}

char *it_service_log_since(const it_stack_t *st, const char *name, size_t offset) {
  size_t len = 0;
  char *all = read_file(svc_find_const(st, name)->log_path, &len);
  if (!all) return qm_strdup("");
  char *part = qm_strdup(offset < len ? all + offset : "");
  free(all);
  return part;
}

char *it_service_log_wait(const it_stack_t *st, const char *name, size_t offset,
                          const char *needle, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  for (;;) {
    char *part = it_service_log_since(st, name, offset);
    if (strstr(part, needle)) return part;
    free(part);
    if (it_now_ms() >= deadline) return NULL;
    it_sleep_ms(50);
  }
}

int it_service_port(const it_stack_t *st, const char *name) {
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (!strcmp(st->svc[i].name, name)) return st->svc[i].port;
  cr_assert_fail("unknown service '%s'", name);
  return 0;
}

bool it_service_running(it_stack_t *st, const char *name) {
  it_svc_t *s = svc_find(st, name);
  if (s->pid <= 0) return false;
  int rc = wait_exit(s->pid, 0);
  if (rc == -2) return true;
  append_line(s->log_path, "=== it harness: qm-%s pid %d found exited with status %d ===", name,
              (int)s->pid, rc);
  s->pid = 0;
  return false;
}

char *it_service_log_tail(const it_stack_t *st, const char *name, int n) {
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (!strcmp(st->svc[i].name, name)) return file_tail(st->svc[i].log_path, n);
  cr_assert_fail("unknown service '%s'", name);
  return NULL;
}

/* ------------------------------------------------------------ the stack */

const char *it_stack_dsn(const it_stack_t *st) { return st->dsn; }
const char *it_stack_db(const it_stack_t *st) { return st->db; }
const char *it_stack_prefix(const it_stack_t *st) { return st->prefix; }
const char *it_stack_log_dir(const it_stack_t *st) { return st->log_dir; }
int it_stack_scim_port(const it_stack_t *st) { return st->scim_port; }

static void global_init(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  qm_log_init("it", QM_LOG_WARN, stderr);
}

static void stack_sh_up(it_stack_t *st) {
  char *log = qm_asprintf("%s/stack.log", st->log_dir);
  const char *argv[] = {"/bin/bash", QM_SOURCE_DIR "/deploy/local/stack.sh", "up", NULL};
  char *out = NULL, *err = NULL;
  int rc = it_run(argv, NULL, 300000, &out, &err);
  append_line(log, "=== stack.sh up: status %d ===\n%s%s", rc, out, err);
  free(out);
  free(err);
  if (rc != 0) fail_with_log(st, log, "deploy/local/stack.sh up failed");
  free(log);
}

static void scim_start(it_stack_t *st) {
  int avoid[IT_N_SERVICES + 1];
  size_t n_avoid = 0;
  ports_in_use(st, avoid, &n_avoid);
  st->scim_port = free_port(avoid, n_avoid);
  snprintf(st->scim_log, sizeof(st->scim_log), "%s/scim.log", st->log_dir);
  char *node = which("node");
  it_env_t env;
  env_init(&env);
  char port[16];
  snprintf(port, sizeof(port), "%d", st->scim_port);
  env_set(&env, "QM_SCIM_HOST", "127.0.0.1");
  env_set(&env, "QM_SCIM_PORT", port);
  env_set(&env, "QM_SCIM_SEED", QM_SOURCE_DIR "/deploy/local/seed/scim-seed.json");
  env_set(&env, "QM_SCIM_TOKEN", IT_SCIM_TOKEN);
  env_set(&env, "QM_SCIM_FAULTS", "1"); /* POST /_fault, for it_scim_fault() */
  char *argv[] = {node, QM_SOURCE_DIR "/deploy/local/scim/server.js", NULL};
  append_line(st->scim_log, "=== it harness: private SCIM peer on 127.0.0.1:%d ===", st->scim_port);
  st->scim_pid = spawn_logged(node, argv, env.v, st->scim_log);
  env_free(&env);
  free(node);
  int64_t deadline = it_now_ms() + 20000;
  for (;;) {
    int rc = wait_exit(st->scim_pid, 0);
    if (rc != -2) {
      st->scim_pid = 0;
      fail_with_log(st, st->scim_log, "the private SCIM peer exited during start-up");
    }
    if (http_status_quick(st->scim_port, "/healthz") == 200) break;
    if (it_now_ms() >= deadline)
      fail_with_log(st, st->scim_log, "the private SCIM peer did not answer /healthz within 20 s");
    it_sleep_ms(50);
  }
  it_note(st, "private SCIM peer ready on :%d (pid %d)", st->scim_port, (int)st->scim_pid);
}

it_stack_t *it_stack_up_only(const char *run_name, const char *const *services) {
  return it_stack_up_env(run_name, services, NULL);
}

it_stack_t *it_stack_up_env(const char *run_name, const char *const *services,
                            const it_svc_env_t *env_overrides) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, global_init);
  cr_assert(it_live == NULL, "it_stack_up: a stack is already up in this test");
  it_stack_t *st = qm_calloc(1, sizeof(*st));
  st->t0_ms = it_now_ms();
  pthread_mutex_init(&st->scim_lock, NULL);
  char name_us[32], name_dash[32];
  sanitize(run_name, '_', name_us, sizeof(name_us));
  sanitize(run_name, '-', name_dash, sizeof(name_dash));
  qm_strlcpy(st->run, run_name, sizeof(st->run));
  snprintf(st->db, sizeof(st->db), "qm_it_%s_%d", name_us, (int)getpid());
  snprintf(st->dsn, sizeof(st->dsn), "host=127.0.0.1 port=5432 user=postgres dbname=%s", st->db);
  snprintf(st->prefix, sizeof(st->prefix), "it-%s-%d-%lld.", name_dash, (int)getpid(),
           (long long)time(NULL));
  snprintf(st->log_dir, sizeof(st->log_dir), "%s/it-logs/%s", QM_BINARY_DIR, st->run);
  for (size_t i = 0; i < IT_N_SERVICES; i++) {
    st->svc[i].name = it_service_names[i];
    snprintf(st->svc[i].log_path, sizeof(st->svc[i].log_path), "%s/it-logs/%s/%s.log",
             QM_BINARY_DIR, st->run, it_service_names[i]);
  }
  for (size_t k = 0; env_overrides && env_overrides[k].service; k++)
    override_put(&svc_find(st, env_overrides[k].service)->extra, env_overrides[k].kv);
  it_live = st; /* from here on it_fini() cleans up */
  mkdir_p(st->log_dir);
  it_note(st, "stack up: db %s, prefix %s, logs %s", st->db, st->prefix, st->log_dir);

  stack_sh_up(st);
  it_note(st, "local stack up (stack.sh)");

  char *sql = qm_asprintf("DROP DATABASE IF EXISTS \"%s\" WITH (FORCE)", st->db);
  char *e = pg_admin(sql);
  free(sql);
  cr_assert(e == NULL, "dropping a stale %s: %s", st->db, e);
  sql = qm_asprintf("CREATE DATABASE \"%s\"", st->db);
  e = pg_admin(sql);
  free(sql);
  cr_assert(e == NULL, "CREATE DATABASE %s: %s", st->db, e);

  char *names[32];
  size_t n = 0;
  topic_names(st, names, &n);
  char errstr[1024] = "";
  int rc = qm_kafka_create_topics(IT_BROKERS, (const char *const *)names, n, 3, 1, 30000, errstr,
                                  sizeof(errstr));
  for (size_t i = 0; i < n; i++) free(names[i]);
  cr_assert(rc == QM_OK, "creating topics under %s on %s: %s: %s", st->prefix, IT_BROKERS,
            qm_strerror(rc), errstr);
  it_note(st, "database and %zu topics created", n);

  scim_start(st);

  int avoid[IT_N_SERVICES + 1];
  for (size_t i = 0; i < IT_N_SERVICES; i++) {
    size_t n_avoid = 0;
    ports_in_use(st, avoid, &n_avoid);
    st->svc[i].port = free_port(avoid, n_avoid);
  }
  bool want[IT_N_SERVICES];
  for (size_t i = 0; i < IT_N_SERVICES; i++) {
    want[i] = services == NULL;
    for (size_t k = 0; services && services[k]; k++)
      want[i] = want[i] || !strcmp(services[k], it_service_names[i]);
  }
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (want[i]) service_spawn(st, &st->svc[i]);
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (want[i]) service_wait_ready(st, &st->svc[i]);
  it_note(st, "stack ready");
  return st;
}

it_stack_t *it_stack_up(const char *run_name) { return it_stack_up_only(run_name, NULL); }

/* Stops every process of st (services first, then the SCIM peer) and closes
 * the database connection. */
static void stack_stop(it_stack_t *st) {
  for (size_t i = 0; i < IT_N_SERVICES; i++)
    if (st->svc[i].pid > 0) kill(st->svc[i].pid, SIGTERM);
  for (size_t i = 0; i < IT_N_SERVICES; i++) {
    it_svc_t *s = &st->svc[i];
    if (s->pid <= 0) continue;
    int rc = stop_pid(s->pid, IT_STOP_GRACE_MS);
    if (rc != 0)
      it_note(st, "qm-%s (pid %d) stopped with status %d%s", s->name, (int)s->pid, rc,
              rc == -1 ? " (needed SIGKILL after 10 s)" : "");
    append_line(s->log_path, "=== it harness: qm-%s pid %d stopped, status %d ===", s->name,
                (int)s->pid, rc);
    s->pid = 0;
  }
  if (st->scim_pid > 0) stop_pid(st->scim_pid, 5000);
  st->scim_pid = 0;
  if (st->hr_prod) qm_producer_destroy(st->hr_prod);
  st->hr_prod = NULL;
  if (st->pg) PQfinish(st->pg);
  st->pg = NULL;
}

static void stack_free(it_stack_t *st) {
  for (size_t i = 0; i < IT_N_SERVICES; i++) env_free(&st->svc[i].extra);
  json_decref(st->scim_users);
  pthread_mutex_destroy(&st->scim_lock);
  free(st);
}

void it_stack_down(it_stack_t *st) {
  if (!st) return;
  stack_stop(st);
  char *sql = qm_asprintf("DROP DATABASE IF EXISTS \"%s\" WITH (FORCE)", st->db);
  char *e = pg_admin(sql);
  free(sql);
  if (e) it_note(st, "could not drop database %s: %s", st->db, e);
  free(e);
  topics_delete(st);
  it_note(st, "passed: database %s dropped, topics %s* deleted; logs in %s", st->db, st->prefix,
          st->log_dir);
  if (it_live == st) it_live = NULL;
  stack_free(st);
}

void it_fini(void) {
  it_stack_t *st = it_live;
  if (!st) return;
  it_live = NULL;
  stack_stop(st);
  it_note(st, "FAILED: kept database %s (psql -h 127.0.0.1 -U postgres %s) and topics %s*; logs in %s",
          st->db, st->db, st->prefix, st->log_dir);
  stack_free(st);
}

/* ------------------------------------------------------------ HR events */

void it_date(int days_from_today, char *out, size_t cap) {
  time_t t = time(NULL) + (time_t)days_from_today * 86400;
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(out, cap, "%Y-%m-%d", &tm);
}

static char *nz(const char *s) { return (char *)(s ? s : ""); }

void it_hr_publish(it_stack_t *st, const it_hr_event_t *ev) {
  static const struct {
    const char *name;
    Qm__V1__HrEventKind kind;
    const char *type;
  } kinds[] = {
      {"joiner", QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER, "qm.hr.joiner.v1"},
      {"mover", QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_MOVER, "qm.hr.mover.v1"},
      {"leaver", QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER, "qm.hr.leaver.v1"},
      {"updated", QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_UPDATE, "qm.hr.updated.v1"},
      {"update", QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_UPDATE, "qm.hr.updated.v1"},
  };
  size_t k = 0;
  while (k < sizeof(kinds) / sizeof(kinds[0]) && strcmp(kinds[k].name, ev->kind)) k++;
  cr_assert(k < sizeof(kinds) / sizeof(kinds[0]), "it_hr_publish: unknown kind '%s'", ev->kind);
  const it_hr_person_t *ip = &ev->person;
  cr_assert(ip->id && *ip->id, "it_hr_publish: person.id is required");

  Qm__V1__Person person = QM__V1__PERSON__INIT;
  person.id = nz(ip->id);
  person.name = nz(ip->name);
  person.email = nz(ip->email);
  person.manager_id = nz(ip->manager_id);
  person.department = nz(ip->department);
  person.job_function = nz(ip->job_function);
  person.country = nz(ip->country);
  person.location = nz(ip->location);
  person.start_date = nz(ip->start_date);
  person.end_date = nz(ip->end_date);
  person.directory_username = nz(ip->directory_username);
  const char *et = ip->employment_type ? ip->employment_type : "employee";
  person.employment_type = !strcmp(et, "contractor")    ? QM__V1__EMPLOYMENT_TYPE__EMPLOYMENT_TYPE_CONTRACTOR
                           : !strcmp(et, "third_party") ? QM__V1__EMPLOYMENT_TYPE__EMPLOYMENT_TYPE_THIRD_PARTY
                                                        : QM__V1__EMPLOYMENT_TYPE__EMPLOYMENT_TYPE_EMPLOYEE;
  const char *ps = ip->status ? ip->status : "active";
  person.status = !strcmp(ps, "pre_hire")     ? QM__V1__PERSON_STATUS__PERSON_STATUS_PRE_HIRE
                  : !strcmp(ps, "on_leave")   ? QM__V1__PERSON_STATUS__PERSON_STATUS_ON_LEAVE
                  : !strcmp(ps, "terminated") ? QM__V1__PERSON_STATUS__PERSON_STATUS_TERMINATED
                                              : QM__V1__PERSON_STATUS__PERSON_STATUS_ACTIVE;
  char fresh_id[QM_UUID_STR_LEN];
  qm_uuid_new(fresh_id);
  Qm__V1__HrEvent he = QM__V1__HR_EVENT__INIT;
  he.source = (char *)(ev->source ? ev->source : "hr-test");
  he.source_event_id = (char *)(ev->source_event_id ? ev->source_event_id : fresh_id);
  he.kind = kinds[k].kind;
  he.effective_date = nz(ev->effective_date);
  he.person = &person;
  he.previous_department = nz(ev->previous_department);
  he.previous_job_function = nz(ev->previous_job_function);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  he.recorded_at_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;

  size_t len = qm__v1__hr_event__get_packed_size(&he);
  uint8_t *buf = qm_malloc(len ? len : 1);
  qm__v1__hr_event__pack(&he, buf);
  it_publish(st, QM_TOPIC_HR, ip->id, "hr-test", kinds[k].type, ip->id, buf, len);
  it_note(st, "HR %s published for %s (effective %s, source %s/%s)", ev->kind, ip->id,
          he.effective_date, he.source, he.source_event_id);
  free(buf);
}

void it_hr_leaver_today(it_stack_t *st, const char *person_id) {
  json_t *p = it_seed_person(person_id);
  cr_assert_not_null(p, "it_hr_leaver_today: %s is not in the seed", person_id);
#define IT_SEED(k) json_string_value(json_object_get(p, k))
  char today[16];
  it_date(0, today, sizeof(today));
  it_hr_event_t ev = {.kind = "leaver",
                      .effective_date = today,
                      .person = {.id = person_id,
                                 .name = IT_SEED("name"),
                                 .email = IT_SEED("email"),
                                 .manager_id = IT_SEED("manager_id"),
                                 .department = IT_SEED("department"),
                                 .job_function = IT_SEED("job_function"),
                                 .country = IT_SEED("country"),
                                 .location = IT_SEED("location"),
                                 .employment_type = IT_SEED("employment_type"),
                                 .status = "terminated",
                                 .end_date = today,
                                 .directory_username = IT_SEED("directory_username")}};
#undef IT_SEED
  it_hr_publish(st, &ev);
  json_decref(p);
}

void it_publish(it_stack_t *st, const char *base_topic, const char *key, const char *source,
                const char *type, const char *subject, const void *payload, size_t len) {
  char *topic = it_topic(st, base_topic);
  qm_event_out_t out;
  memset(&out, 0, sizeof(out));
  out.topic = topic;
  out.key = key;
  out.key_len = strlen(key);
  qm_event_meta_init(&out.meta, source, type, subject, NULL);
  out.payload = payload;
  out.payload_len = len;
  char errstr[512] = "";
  int rc;
  if (!st->hr_prod) {
    rc = qm_producer_new(IT_BROKERS, "it-hr", NULL, 0, NULL, NULL, &st->hr_prod, errstr,
                         sizeof(errstr));
    cr_assert_eq(rc, QM_OK, "it_publish: qm_producer_new: %s", errstr);
  }
  int result = 0;
  rc = qm_producer_send_batch(st->hr_prod, &out, 1, 15000, &result, errstr, sizeof(errstr));
  cr_assert(rc == QM_OK && result == QM_OK, "it_publish: producing %s for %s to %s: %s (%d)",
            type, key, topic, errstr, result);
  free(topic);
}

/* ------------------------------------------------------------ topic reader */

struct it_reader {
  it_stack_t *st;
  char *topic;
  bool requests; /* decode qm.v1.RequestEvent */
  bool access;   /* decode qm.v1.AccessEvent */
  bool decisions; /* decode qm.v1.DecisionEvent */
  qm_consumer_t *cons;
  json_t *events;
};

it_reader_t *it_reader_open(it_stack_t *st, const char *base_topic) {
  it_reader_t *rd = qm_calloc(1, sizeof(*rd));
  rd->st = st;
  rd->topic = it_topic(st, base_topic);
  rd->requests = !strcmp(base_topic, QM_TOPIC_REQUESTS);
  rd->access = !strcmp(base_topic, QM_TOPIC_ACCESS);
  rd->decisions = !strcmp(base_topic, QM_TOPIC_DECISIONS);
  rd->events = json_array();
  char u[QM_UUID_STR_LEN];
  qm_uuid_new(u);
  char *group = qm_asprintf("%sit-reader-%s", st->prefix, u);
  const char *topics[] = {rd->topic};
  char errstr[512] = "";
  int rc = qm_consumer_new(IT_BROKERS, group, topics, 1, NULL, 0, &rd->cons, errstr,
                           sizeof(errstr));
  free(group);
  cr_assert_eq(rc, QM_OK, "it_reader_open(%s): %s", rd->topic, errstr);
  return rd;
}

/* Copies every key of x into o and releases x. */
static void merge_new(json_t *o, json_t *x) {
  json_object_update(o, x);
  json_decref(x);
}

static json_t *decode_request_event(const qm_event_in_t *ev, json_t *o) {
  Qm__V1__RequestEvent *re = qm__v1__request_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!re) {
    json_object_set_new(o, "event", json_string("undecodable"));
    return o;
  }
  switch (re->event_case) {
  case QM__V1__REQUEST_EVENT__EVENT_SUBMITTED: {
    const Qm__V1__RequestSubmitted *m = re->submitted;
    json_t *lines = json_array();
    for (size_t i = 0; i < m->n_lines; i++)
      json_array_append_new(lines, json_pack("{s:s, s:s, s:i}", "item_id", m->lines[i]->item_id,
                                             "role_id", m->lines[i]->role_id, "risk",
                                             (int)m->lines[i]->risk));
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:o}", "event", "submitted",
                                    "request_id", m->request_id, "subject_person_id",
                                    m->subject_person_id, "origin", m->origin, "reason", m->reason,
                                    "lines", lines));
    break;
  }
  case QM__V1__REQUEST_EVENT__EVENT_CANCELLED: {
    const Qm__V1__RequestCancelled *m = re->cancelled;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s}", "event", "cancelled", "request_id",
                                    m->request_id, "subject_person_id", m->subject_person_id,
                                    "reason", m->reason));
    break;
  }
  case QM__V1__REQUEST_EVENT__EVENT_REVOCATION_REQUESTED: {
    const Qm__V1__RevocationRequested *m = re->revocation_requested;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "event",
                                    "revocation_requested", "request_id", m->request_id,
                                    "subject_person_id", m->subject_person_id, "item_id",
                                    m->item_id, "role_id", m->role_id, "reason", m->reason));
    break;
  }
  default:
    json_object_set_new(o, "event", json_string("not_set"));
  }
  qm__v1__request_event__free_unpacked(re, NULL);
  return o;
}

/* A list of actors as their person ids ("approval" for a service). */
static json_t *actor_ids(Qm__V1__Actor **a, size_t n) {
  json_t *arr = json_array();
  for (size_t i = 0; i < n; i++)
    json_array_append_new(arr, json_string(a[i]->person_id && a[i]->person_id[0]
                                               ? a[i]->person_id
                                               : (a[i]->service ? a[i]->service : "")));
  return arr;
}

static void decode_decision_event(const qm_event_in_t *ev, json_t *o) {
  Qm__V1__DecisionEvent *de = qm__v1__decision_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!de) {
    json_object_set_new(o, "event", json_string("undecodable"));
    return;
  }
  switch (de->event_case) {
  case QM__V1__DECISION_EVENT__EVENT_STEP_PENDING: {
    const Qm__V1__ApprovalStepPending *m = de->step_pending;
    json_t *ids = json_array();
    for (size_t i = 0; i < m->n_approver_ids; i++)
      json_array_append_new(ids, json_string(m->approver_ids[i]));
    merge_new(o, json_pack("{s:s, s:s, s:i, s:s, s:i, s:i, s:o, s:s, s:I}", "event",
                           "step_pending", "request_id", m->request_id, "line_no",
                           (int)m->line_no, "step_id", m->step_id, "stage", (int)m->stage, "kind",
                           (int)m->kind, "approver_ids", ids, "delegated_from",
                           m->delegated_from, "deadline_at_ms", (json_int_t)m->deadline_at_ms));
    break;
  }
  case QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED: {
    const Qm__V1__ApprovalStepDecided *m = de->step_decided;
    Qm__V1__Actor *by[] = {m->decided_by};
    merge_new(o, json_pack("{s:s, s:s, s:s, s:b, s:o, s:s, s:b}", "event", "step_decided",
                           "request_id", m->request_id, "step_id", m->step_id, "approved",
                           (int)m->approved, "decided_by", actor_ids(by, m->decided_by ? 1 : 0),
                           "comment", m->comment, "break_glass", (int)m->break_glass));
    break;
  }
  case QM__V1__DECISION_EVENT__EVENT_APPROVED: {
    const Qm__V1__RequestApproved *m = de->approved;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:i, s:b, s:s}", "event",
                           "approved", "request_id", m->request_id, "subject_person_id",
                           m->subject_person_id, "item_id", m->line ? m->line->item_id : "",
                           "role_id", m->line ? m->line->role_id : "", "approvers",
                           actor_ids(m->approvers, m->n_approvers), "grant_duration_days",
                           (int)m->grant_duration_days, "break_glass", (int)m->break_glass,
                           "break_glass_justification", m->break_glass_justification));
    break;
  }
  case QM__V1__DECISION_EVENT__EVENT_REJECTED: {
    const Qm__V1__RequestRejected *m = de->rejected;
    Qm__V1__Actor *by[] = {m->rejected_by};
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:o}", "event", "rejected", "request_id",
                           m->request_id, "subject_person_id", m->subject_person_id, "reason",
                           m->reason, "rejected_by", actor_ids(by, m->rejected_by ? 1 : 0)));
    break;
  }
  default:
    json_object_set_new(o, "event", json_string("not_set"));
  }
  qm__v1__decision_event__free_unpacked(de, NULL);
}

static void decode_access_event(const qm_event_in_t *ev, json_t *o) {
  Qm__V1__AccessEvent *ae = qm__v1__access_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!ae) {
    json_object_set_new(o, "event", json_string("undecodable"));
    return;
  }
  switch (ae->event_case) {
  case QM__V1__ACCESS_EVENT__EVENT_GRANTED: {
    const Qm__V1__AccessGranted *m = ae->granted;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:b}", "event",
                           "granted", "request_id", m->request_id, "grant_id", m->grant_id,
                           "subject_person_id", m->subject_person_id, "item_id", m->item_id,
                           "role_id", m->role_id, "group", m->group, "connector", m->connector,
                           "granted_at_ms", (json_int_t)m->granted_at_ms, "expires_at_ms",
                           (json_int_t)m->expires_at_ms, "extension", (int)m->extension));
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_REVOKED: {
    const Qm__V1__AccessRevoked *m = ae->revoked;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "event",
                           "revoked", "request_id", m->request_id, "grant_id", m->grant_id,
                           "subject_person_id", m->subject_person_id, "item_id", m->item_id,
                           "role_id", m->role_id, "group", m->group, "connector", m->connector,
                           "reason", m->reason, "actor_person_id",
                           m->actor ? m->actor->person_id : ""));
    json_object_set_new(o, "comment", json_string(m->comment ? m->comment : ""));
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_FAILED: {
    const Qm__V1__ProvisioningFailed *m = ae->failed;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:i, s:b}", "event", "failed",
                           "request_id", m->request_id, "subject_person_id", m->subject_person_id,
                           "operation", m->operation, "group", m->group, "operation_id",
                           m->operation_id, "error", m->error, "attempts", (int)m->attempts,
                           "retryable", (int)m->retryable));
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_EXPIRY_NOTICE: {
    const Qm__V1__ExpiryNotice *m = ae->expiry_notice;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:I}", "event", "expiry_notice", "request_id",
                           m->request_id, "grant_id", m->grant_id, "subject_person_id",
                           m->subject_person_id, "expires_at_ms", (json_int_t)m->expires_at_ms));
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_DRIFT: {
    const Qm__V1__DriftDetected *m = ae->drift;
    merge_new(o, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:b}", "event", "drift", "group",
                           m->group, "connector", m->connector, "finding", m->finding,
                           "directory_user_id", m->directory_user_id, "subject_person_id",
                           m->subject_person_id, "grant_id", m->grant_id, "repaired",
                           (int)m->repaired));
    break;
  }
  default:
    json_object_set_new(o, "event", json_string("not_set"));
  }
  qm__v1__access_event__free_unpacked(ae, NULL);
}

size_t it_reader_poll(it_reader_t *rd, int wait_ms) {
  size_t added = 0;
  int wait = wait_ms;
  for (;;) {
    qm_kmsg_t *msgs[64];
    size_t n = 0;
    int rc = qm_consumer_poll_batch(rd->cons, msgs, 64, wait, &n);
    cr_assert(rc == QM_OK, "polling %s: %s", rd->topic, qm_strerror(rc));
    for (size_t i = 0; i < n; i++) {
      const qm_event_in_t *ev = qm_kmsg_event(msgs[i]);
      json_t *o = json_pack("{s:s, s:s, s:s, s:s%}", "topic", ev->topic, "ce_type",
                            ev->meta_valid ? ev->meta.type : "", "ce_id",
                            ev->meta_valid ? ev->meta.id : "", "key", ev->key ? ev->key : "",
                            ev->key ? ev->key_len : (size_t)0);
      json_object_set_new(o, "ce_subject", json_string(ev->meta_valid ? ev->meta.subject : ""));
      if (rd->requests) decode_request_event(ev, o);
      if (rd->access) decode_access_event(ev, o);
      if (rd->decisions) decode_decision_event(ev, o);
      json_array_append_new(rd->events, o);
      qm_kmsg_destroy(msgs[i]);
      added++;
    }
    if (n < 64) break;
    wait = 0;
  }
  return added;
}

const json_t *it_reader_events(const it_reader_t *rd) { return rd->events; }

static bool json_matches(const json_t *ev, const json_t *pattern) {
  const char *k;
  json_t *v;
  json_object_foreach((json_t *)pattern, k, v) {
    if (!json_equal(json_object_get(ev, k), v)) return false;
  }
  return true;
}

int it_reader_count(const it_reader_t *rd, const json_t *pattern) {
  int n = 0;
  size_t i;
  json_t *e;
  json_array_foreach(rd->events, i, e) if (json_matches(e, pattern)) n++;
  return n;
}

int it_reader_wait(it_reader_t *rd, const json_t *pattern, int min_count, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  for (;;) {
    int n = it_reader_count(rd, pattern);
    if (n >= min_count || it_now_ms() >= deadline) return n;
    it_reader_poll(rd, 250);
  }
}

void it_reader_close(it_reader_t *rd) {
  if (!rd) return;
  qm_consumer_close(rd->cons);
  qm_consumer_destroy(rd->cons);
  json_decref(rd->events);
  free(rd->topic);
  free(rd);
}

/* ------------------------------------------------------------ metrics */

/* True when the label block (between braces, without them) has key="value". */
static bool labels_have(const char *block, size_t block_len, const char *key, size_t key_len,
                        const char *value, size_t value_len) {
  const char *p = block, *end = block + block_len;
  while (p < end) {
    while (p < end && (*p == ',' || *p == ' ')) p++;
    const char *eq = memchr(p, '=', (size_t)(end - p));
    if (!eq || eq + 1 >= end || eq[1] != '"') return false;
    const char *v = eq + 2, *q = v;
    while (q < end && *q != '"') q += (*q == '\\' && q + 1 < end) ? 2 : 1;
    if ((size_t)(eq - p) == key_len && !strncmp(p, key, key_len) &&
        (size_t)(q - v) == value_len && !strncmp(v, value, value_len))
      return true;
    p = q + 1;
  }
  return false;
}

double it_metric(const char *exposition, const char *name, const char *labels_csv, bool *found) {
  double sum = 0;
  bool any = false;
  size_t nl = strlen(name);
  const char *line = exposition ? exposition : "";
  while (*line) {
    const char *eol = strchr(line, '\n');
    size_t len = eol ? (size_t)(eol - line) : strlen(line);
    if (len > nl && line[0] != '#' && !strncmp(line, name, nl) &&
        (line[nl] == '{' || line[nl] == ' ')) {
      const char *block = "", *value = line + nl;
      size_t block_len = 0;
      if (line[nl] == '{') {
        block = line + nl + 1;
        const char *close = memchr(block, '}', len - nl - 1);
        block_len = close ? (size_t)(close - block) : 0;
        value = close ? close + 1 : line + len;
      }
      bool ok = true;
      const char *p = labels_csv ? labels_csv : "";
      while (ok && *p) {
        const char *comma = strchr(p, ',');
        size_t pl = comma ? (size_t)(comma - p) : strlen(p);
        const char *eq = memchr(p, '=', pl);
        if (eq)
          ok = labels_have(block, block_len, p, (size_t)(eq - p), eq + 1, pl - (size_t)(eq - p) - 1);
        p += pl + (comma ? 1 : 0);
      }
      if (ok) {
        char num[64];
        size_t vl = (size_t)(line + len - value);
        if (vl >= sizeof(num)) vl = sizeof(num) - 1;
        memcpy(num, value, vl);
        num[vl] = '\0';
        sum += strtod(num, NULL);
        any = true;
      }
    }
    line += len + (eol ? 1 : 0);
  }
  if (found) *found = any;
  return sum;
}

/* ------------------------------------------------------------ cases */

void it_case_run(it_cases_t *cs, it_stack_t *st, const char *name, it_case_fn fn) {
  if (cs->t0_ms == 0) cs->t0_ms = it_now_ms();
  qm_strlcpy(cs->current, name, sizeof(cs->current));
  int64_t t0 = it_now_ms();
  it_note(st, "case %s: start", name);
  volatile bool failed = false;
  if (setjmp(cs->jb) == 0) fn(st, cs);
  else failed = true;
  double secs = (double)(it_now_ms() - t0) / 1000.0;
  if (failed) cs->failed++;
  else cs->passed++;
  it_note(st, "case %s: %s (%.1fs)", name, failed ? "FAILED" : "passed", secs);
  if (cs->summary_len < sizeof(cs->summary) - 1) {
    int w = snprintf(cs->summary + cs->summary_len, sizeof(cs->summary) - cs->summary_len,
                     "  %-4s %-44s %6.1fs\n", failed ? "FAIL" : "ok", name, secs);
    if (w > 0) cs->summary_len += (size_t)w;
    if (cs->summary_len >= sizeof(cs->summary)) cs->summary_len = sizeof(cs->summary) - 1;
  }
  cs->current[0] = '\0';
}

void it_case_fail(it_cases_t *cs, const char *file, int line, const char *fmt, ...) {
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  const char *base = strrchr(file, '/');
  fprintf(stderr, "[it case %s] FAILED at %s:%d: %s\n", cs->current, base ? base + 1 : file, line,
          msg);
  fflush(stderr);
  cr_expect(false, "[case %s] %s:%d: %s", cs->current, base ? base + 1 : file, line, msg);
  longjmp(cs->jb, 1);
}

bool it_cases_report(it_cases_t *cs, const char *title) {
  fprintf(stderr, "[it %s] %d case(s) passed, %d failed, %.1fs in all:\n%s", title, cs->passed,
          cs->failed, (double)(it_now_ms() - cs->t0_ms) / 1000.0, cs->summary);
  fflush(stderr);
  return cs->failed == 0;
}

json_t *it_case_wait_status(it_cases_t *cs, it_stack_t *st, const char *token, const char *id,
                            const char *want, int timeout_ms) {
  /* A different final status will not change: fail at once. */
  static const char *const final[] = {"granted", "completed", "rejected", "failed",
                                      "cancelled", "ended", NULL};
  char path[256];
  snprintf(path, sizeof(path), "/v1/requests/%s", id);
  int64_t deadline = it_now_ms() + timeout_ms;
  it_resp_t r = {0};
  for (;;) {
    it_resp_clear(&r);
    it_http(st, "intake", "GET", path, token, NULL, NULL, &r);
    const char *s = json_string_value(json_object_get(r.json, "status"));
    if (r.status == 200 && s && !strcmp(s, want)) break;
    for (size_t i = 0; s && final[i]; i++)
      IT_CHECK(cs, strcmp(s, final[i]) != 0, "request %s ended '%s', expected '%s': %s", id, s,
               want, r.body);
    IT_CHECK(cs, it_now_ms() < deadline, "request %s did not reach '%s' in %d ms; last %ld %s",
             id, want, timeout_ms, r.status, r.body);
    it_sleep_ms(50);
  }
  json_t *j = json_incref(r.json);
  it_resp_clear(&r);
  return j;
}

/* ------------------------------------------------------------ SCIM faults */

json_t *it_scim_fault(it_stack_t *st, const char *json_body) {
  char url[128];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/_fault", st->scim_port);
  it_resp_t r;
  http_do(json_body ? "POST" : "GET", url, NULL, json_body, NULL, &r);
  cr_assert(r.status == 200 && r.json, "SCIM fault %s: %ld %s", json_body ? json_body : "(GET)",
            r.status, r.body);
  json_t *answer = json_incref(r.json);
  it_resp_clear(&r);
  if (json_body) it_note(st, "SCIM peer fault: %s", json_body);
  return answer;
}

/* ------------------------------------------------------------ slapd */

struct it_slapd {
  char dir[PATH_MAX];
  char conf[PATH_MAX + 16];
  char log[PATH_MAX + 16];
  char ca[PATH_MAX + 16]; /* the self-signed certificate (TLS only) */
  char url[64];
  char tls_url[64];
  int port;
  pid_t pid;
};

/* Runs an ldap-utils command with input on stdin from a file; fails the test
 * with its output when it exits non-zero. Returns stdout (caller frees). */
static char *ldap_tool(const char *const *argv, const char *what) {
  char *out = NULL, *err = NULL;
  int rc = it_run(argv, NULL, 30000, &out, &err);
  cr_assert(rc == 0, "%s (%s) exited %d: %s %s", what, argv[0], rc, out ? out : "",
            err ? err : "");
  free(err);
  return out;
}

static it_slapd_t *slapd_start(const char *const *groups, int n_users, bool tls);

it_slapd_t *it_slapd_start(const char *const *groups, int n_users) {
  return slapd_start(groups, n_users, false);
}

it_slapd_t *it_slapd_start_tls(const char *const *groups, int n_users) {
  return slapd_start(groups, n_users, true);
}

static it_slapd_t *slapd_start(const char *const *groups, int n_users, bool tls) {
  it_slapd_t *sl = qm_calloc(1, sizeof(*sl));
  snprintf(sl->dir, sizeof(sl->dir), "/tmp/qm-it-slapd-XXXXXX");
  cr_assert(mkdtemp(sl->dir) != NULL, "mkdtemp: %s", strerror(errno));
  char db[PATH_MAX + 8];
  snprintf(db, sizeof(db), "%s/db", sl->dir);
  cr_assert(mkdir(db, 0700) == 0, "mkdir %s: %s", db, strerror(errno));
  snprintf(sl->conf, sizeof(sl->conf), "%s/slapd.conf", sl->dir);
  snprintf(sl->log, sizeof(sl->log), "%s/slapd.log", sl->dir);
  char *conf = qm_asprintf(
      "include /etc/ldap/schema/core.schema\n"
      "include /etc/ldap/schema/cosine.schema\n"
      "include /etc/ldap/schema/inetorgperson.schema\n"
      "include /etc/ldap/schema/nis.schema\n"
      "pidfile %s/slapd.pid\nargsfile %s/slapd.args\n"
      "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
      "database mdb\nmaxsize 268435456\nsuffix \"" IT_LDAP_BASE "\"\n"
      "rootdn \"" IT_LDAP_ADMIN "\"\nrootpw " IT_LDAP_PASSWORD "\n"
      "directory %s\nindex objectClass eq\nindex uid eq\nindex cn eq\n",
      sl->dir, sl->dir, db);
  if (tls) {
    /* A self-signed certificate for 127.0.0.1 that is its own CA. */
    char key[PATH_MAX + 16];
    snprintf(key, sizeof(key), "%s/key.pem", sl->dir);
    snprintf(sl->ca, sizeof(sl->ca), "%s/cert.pem", sl->dir);
    const char *req[] = {"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                         "-keyout", key, "-out", sl->ca, "-days", "2", "-subj", "/CN=127.0.0.1",
                         "-addext", "subjectAltName=IP:127.0.0.1", NULL};
    free(ldap_tool(req, "making slapd's TLS certificate"));
    char *more = qm_asprintf("%sTLSCACertificateFile %s\nTLSCertificateFile %s\n"
                             "TLSCertificateKeyFile %s\n",
                             conf, sl->ca, sl->ca, key);
    free(conf);
    conf = more;
  }
  it_file_write(sl->dir, "slapd.conf", conf);
  free(conf);
  /* The seed: people p-0001.. and groupOfNames holding only the placeholder. */
  size_t cap = 4096 + (size_t)n_users * 256, len = 0;
  char *ldif = qm_malloc(cap);
  len += (size_t)snprintf(ldif + len, cap - len,
                          "dn: " IT_LDAP_BASE "\nobjectClass: dcObject\nobjectClass: organization\n"
                          "dc: qm\no: Quartermaster tests\n\n"
                          "dn: ou=people," IT_LDAP_BASE "\nobjectClass: organizationalUnit\nou: people\n\n"
                          "dn: ou=groups," IT_LDAP_BASE "\nobjectClass: organizationalUnit\nou: groups\n\n");
  for (int i = 1; i <= n_users; i++)
    len += (size_t)snprintf(ldif + len, cap - len,
                            "dn: uid=p-%04d,ou=people," IT_LDAP_BASE "\nobjectClass: inetOrgPerson\n"
                            "uid: p-%04d\ncn: Person %04d\nsn: %04d\n\n",
                            i, i, i, i);
  for (size_t g = 0; groups && groups[g]; g++) {
    if (len + 512 > cap) {
      cap *= 2;
      ldif = qm_realloc(ldif, cap);
    }
    len += (size_t)snprintf(ldif + len, cap - len,
                            "dn: cn=%s,ou=groups," IT_LDAP_BASE "\nobjectClass: groupOfNames\n"
                            "cn: %s\nmember: " IT_LDAP_PLACEHOLDER "\n\n",
                            groups[g], groups[g]);
  }
  it_file_write(sl->dir, "seed.ldif", ldif);
  free(ldif);
  char seed[PATH_MAX + 16];
  snprintf(seed, sizeof(seed), "%s/seed.ldif", sl->dir);
  const char *add[] = {"/usr/sbin/slapadd", "-q", "-f", sl->conf, "-l", seed, NULL};
  free(ldap_tool(add, "seeding slapd"));
  sl->port = free_port(NULL, 0);
  snprintf(sl->url, sizeof(sl->url), "ldap://127.0.0.1:%d", sl->port);
  char listen[200];
  snprintf(listen, sizeof(listen), "ldap://127.0.0.1:%d/", sl->port);
  if (tls) {
    int avoid[] = {sl->port};
    int tls_port = free_port(avoid, 1);
    snprintf(sl->tls_url, sizeof(sl->tls_url), "ldaps://127.0.0.1:%d", tls_port);
    snprintf(listen, sizeof(listen), "ldap://127.0.0.1:%d/ ldaps://127.0.0.1:%d/", sl->port,
             tls_port);
  }
  /* -d 0: stay in the foreground, so the harness owns (and reaps) it. */
  char *argv[] = {(char *)"/usr/sbin/slapd", (char *)"-d", (char *)"0", (char *)"-f", sl->conf,
                  (char *)"-h", listen, NULL};
  char *envp[] = {NULL};
  sl->pid = spawn_logged("/usr/sbin/slapd", argv, envp, sl->log);
  int64_t deadline = it_now_ms() + 20000;
  for (;;) {
    if (wait_exit(sl->pid, 0) != -2) {
      char *tail = read_file(sl->log, NULL);
      cr_assert_fail("slapd exited during start-up: %s", tail ? tail : "");
    }
    const char *probe[] = {"/usr/bin/ldapsearch", "-x", "-H", sl->url, "-D", IT_LDAP_ADMIN,
                           "-w", IT_LDAP_PASSWORD, "-b", IT_LDAP_BASE, "-s", "base", "-LLL",
                           "dn", NULL};
    char *out = NULL, *err = NULL;
    int rc = it_run(probe, NULL, 5000, &out, &err);
    free(out);
    free(err);
    if (rc == 0) break;
    cr_assert(it_now_ms() < deadline, "slapd did not answer on %s within 20 s", sl->url);
    it_sleep_ms(100);
  }
  fprintf(stderr, "[it] slapd ready on %s (pid %d, %d users, dir %s)\n", sl->url, (int)sl->pid,
          n_users, sl->dir);
  return sl;
}

const char *it_slapd_url(const it_slapd_t *sl) { return sl->url; }

const char *it_slapd_tls_url(const it_slapd_t *sl) { return sl->tls_url; }

const char *it_slapd_ca_file(const it_slapd_t *sl) { return sl->ca; }

char *it_slapd_connector_json(const it_slapd_t *sl) {
  return qm_asprintf("{\"type\": \"ldap\", \"url\": \"%s\", \"bind_dn\": \"" IT_LDAP_ADMIN "\","
                     " \"bind_password\": \"" IT_LDAP_PASSWORD "\","
                     " \"user_base\": \"ou=people," IT_LDAP_BASE "\", \"user_attr\": \"uid\","
                     " \"group_base\": \"ou=groups," IT_LDAP_BASE "\", \"group_attr\": \"cn\","
                     " \"member_attr\": \"member\", \"placeholder_dn\": \"" IT_LDAP_PLACEHOLDER
                     "\", \"timeout_ms\": 5000}",
                     sl->url);
}

json_t *it_slapd_members(it_slapd_t *sl, const char *group) {
  char base[512];
  snprintf(base, sizeof(base), "cn=%s,ou=groups," IT_LDAP_BASE, group);
  const char *argv[] = {"/usr/bin/ldapsearch", "-x", "-H", sl->url, "-D", IT_LDAP_ADMIN, "-w",
                        IT_LDAP_PASSWORD, "-o", "ldif-wrap=no", "-b", base, "-s", "base", "-LLL",
                        "member", NULL};
  char *out = ldap_tool(argv, "listing LDAP members");
  json_t *set = json_object();
  const char *p = out;
  while (p && *p) {
    const char *nl = strchr(p, '\n');
    size_t n = nl ? (size_t)(nl - p) : strlen(p);
    if (n > 8 && !strncasecmp(p, "member: ", 8)) {
      char *dn = qm_strndup(p + 8, n - 8);
      /* uid=p-0001,ou=people,... -> "p-0001"; anything else (the placeholder) as its DN */
      if (!strncasecmp(dn, "uid=", 4) && strchr(dn, ',')) {
        char *uid = qm_strndup(dn + 4, (size_t)(strchr(dn, ',') - dn - 4));
        json_object_set_new(set, uid, json_true());
        free(uid);
      } else {
        json_object_set_new(set, dn, json_true());
      }
      free(dn);
    }
    p = nl ? nl + 1 : NULL;
  }
  free(out);
  return set;
}

void it_slapd_modify(it_slapd_t *sl, const char *group, const char *op, const char *uid) {
  char *ldif = qm_asprintf("dn: cn=%s,ou=groups," IT_LDAP_BASE "\nchangetype: modify\n%s: member\n"
                           "member: uid=%s,ou=people," IT_LDAP_BASE "\n",
                           group, op, uid);
  it_file_write(sl->dir, "modify.ldif", ldif);
  free(ldif);
  char path[PATH_MAX + 16];
  snprintf(path, sizeof(path), "%s/modify.ldif", sl->dir);
  const char *argv[] = {"/usr/bin/ldapmodify", "-x", "-H", sl->url, "-D", IT_LDAP_ADMIN, "-w",
                        IT_LDAP_PASSWORD, "-f", path, NULL};
  free(ldap_tool(argv, "modifying an LDAP group"));
}

void it_slapd_stop(it_slapd_t *sl) {
  if (!sl) return;
  if (sl->pid > 0) stop_pid(sl->pid, 5000);
  char db[PATH_MAX + 8];
  snprintf(db, sizeof(db), "%s/db", sl->dir);
  it_dir_remove(db);
  it_dir_remove(sl->dir);
  free(sl);
}

/* The SCIM id of the first resource matching filter attr eq "value". */
static char *scim_id_of(it_stack_t *st, const char *resource, const char *attr, const char *value) {
  char *q = qm_asprintf("/%s?filter=%s%%20eq%%20%%22%s%%22", resource, attr, value);
  json_t *list = scim_get(st, q);
  free(q);
  json_t *res = json_object_get(list, "Resources");
  cr_assert(json_array_size(res) == 1, "SCIM %s with %s '%s': expected one, got %zu", resource,
            attr, value, json_array_size(res));
  char *id = qm_strdup(json_string_value(json_object_get(json_array_get(res, 0), "id")));
  json_decref(list);
  return id;
}

void it_scim_member_set(it_stack_t *st, const char *group, const char *user_name, bool member) {
  char *gid = scim_id_of(st, "Groups", "displayName", group);
  char *uid = scim_id_of(st, "Users", "userName", user_name);
  char *body = member
                   ? qm_asprintf("{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:PatchOp\"],"
                                 "\"Operations\":[{\"op\":\"add\",\"path\":\"members\","
                                 "\"value\":[{\"value\":\"%s\"}]}]}",
                                 uid)
                   : qm_asprintf("{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:PatchOp\"],"
                                 "\"Operations\":[{\"op\":\"remove\","
                                 "\"path\":\"members[value eq \\\"%s\\\"]\"}]}",
                                 uid);
  char url[256];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/scim/v2/Groups/%s", st->scim_port, gid);
  it_resp_t r;
  http_do("PATCH", url, IT_SCIM_TOKEN, body, NULL, &r);
  cr_assert(r.status == 200 || r.status == 204, "SCIM PATCH %s (%s %s): %ld %s", group,
            member ? "add" : "remove", user_name, r.status, r.body);
  it_resp_clear(&r);
  free(body);
  free(gid);
  free(uid);
}

/* ------------------------------------------------------------ standing in for approval */

void it_publish_approved(it_stack_t *st, const it_approved_t *a) {
  Qm__V1__RequestLine line = QM__V1__REQUEST_LINE__INIT;
  line.line_no = a->line_no ? a->line_no : 1;
  line.item_id = (char *)a->item_id;
  line.kind = QM__V1__ITEM_KIND__ITEM_KIND_ACCESS;
  line.role_id = (char *)(a->role_id ? a->role_id : "");
  line.group = (char *)a->group;
  line.connector = (char *)(a->connector ? a->connector : "scim-main");
  line.risk = QM__V1__RISK__RISK_STANDARD;
  line.duration_days = a->duration_days;
  Qm__V1__Actor auto_ = QM__V1__ACTOR__INIT;
  auto_.service = (char *)"approval";
  Qm__V1__Actor *approvers[] = {&auto_};
  Qm__V1__RequestApproved ap = QM__V1__REQUEST_APPROVED__INIT;
  ap.request_id = (char *)a->request_id;
  ap.line = &line;
  ap.subject_person_id = (char *)a->person_id;
  ap.subject_directory_username = (char *)(a->username ? a->username : a->person_id);
  ap.n_approvers = 1;
  ap.approvers = approvers;
  ap.grant_duration_days = a->duration_days;
  ap.extends_request_id = (char *)(a->extends_request_id ? a->extends_request_id : "");
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ap.approved_at_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &ap;
  size_t len = qm__v1__decision_event__get_packed_size(&de);
  uint8_t *buf = qm_malloc(len ? len : 1);
  qm__v1__decision_event__pack(&de, buf);
  it_publish(st, QM_TOPIC_DECISIONS, a->person_id, "approval", "qm.request.approved.v1",
             a->request_id, buf, len);
  free(buf);
}

void it_publish_revocation(it_stack_t *st, const char *request_id, const char *person_id,
                           const char *item_id, const char *role_id, const char *reason) {
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  actor.service = (char *)"intake";
  Qm__V1__RevocationRequested rr = QM__V1__REVOCATION_REQUESTED__INIT;
  rr.request_id = (char *)request_id;
  rr.subject_person_id = (char *)person_id;
  rr.item_id = (char *)item_id;
  rr.role_id = (char *)(role_id ? role_id : "");
  rr.reason = (char *)reason;
  rr.actor = &actor;
  Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
  re.event_case = QM__V1__REQUEST_EVENT__EVENT_REVOCATION_REQUESTED;
  re.revocation_requested = &rr;
  size_t len = qm__v1__request_event__get_packed_size(&re);
  uint8_t *buf = qm_malloc(len ? len : 1);
  qm__v1__request_event__pack(&re, buf);
  it_publish(st, QM_TOPIC_REQUESTS, person_id, "intake", "qm.request.revocation_requested.v1",
             request_id, buf, len);
  free(buf);
}

void it_scim_group_create(it_stack_t *st, const char *display_name) {
  char *body = qm_asprintf("{\"schemas\":[\"urn:ietf:params:scim:schemas:core:2.0:Group\"],"
                           "\"displayName\":\"%s\"}",
                           display_name);
  char url[128];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/scim/v2/Groups", st->scim_port);
  it_resp_t r;
  http_do("POST", url, IT_SCIM_TOKEN, body, NULL, &r);
  cr_assert(r.status == 201, "SCIM POST /Groups %s: %ld %s", display_name, r.status, r.body);
  it_resp_clear(&r);
  free(body);
}

/* ------------------------------------------------------------ private Redis */

struct it_redis {
  int port;
  pid_t pid;
  char log[PATH_MAX];
  qm_redis_t *cli;
};

static void redis_spawn(it_redis_t *rd) {
  char *bin = which("redis-server");
  char port[16];
  snprintf(port, sizeof(port), "%d", rd->port);
  char *argv[] = {bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly",
                  "no", "--loglevel", "warning", NULL};
  char *envp[] = {NULL};
  rd->pid = spawn_logged(bin, argv, envp, rd->log);
  free(bin);
  char errstr[256] = "";
  int64_t deadline = it_now_ms() + 15000;
  for (;;) {
    qm_redis_destroy(rd->cli);
    rd->cli = qm_redis_connect("127.0.0.1", rd->port, 500, 5000, errstr, sizeof(errstr));
    if (rd->cli && qm_redis_ping(rd->cli, errstr, sizeof(errstr)) == QM_OK) return;
    cr_assert(it_now_ms() < deadline, "private redis-server on port %d did not answer: %s (log %s)",
              rd->port, errstr, rd->log);
    it_sleep_ms(50);
  }
}

it_redis_t *it_redis_start(void) {
  it_redis_t *rd = qm_calloc(1, sizeof(*rd));
  int avoid[IT_N_SERVICES + 1];
  size_t n_avoid = 0;
  if (it_live) ports_in_use(it_live, avoid, &n_avoid);
  rd->port = free_port(avoid, n_avoid);
  snprintf(rd->log, sizeof(rd->log), "/tmp/qm-it-redis-%d.log", rd->port);
  redis_spawn(rd);
  return rd;
}

int it_redis_port(const it_redis_t *rd) { return rd->port; }

static void text_append(char **out, size_t *len, size_t *cap, const char *s, size_t n) {
  if (*len + n + 1 > *cap) {
    *cap = (*len + n + 1) * 2;
    *out = qm_realloc(*out, *cap);
  }
  memcpy(*out + *len, s, n);
  *len += n;
  (*out)[*len] = '\0';
}

static void redis_reply_text(const qm_redis_reply_t *rep, char **out, size_t *len, size_t *cap) {
  char num[32];
  size_t n = 0;
  const char *s = NULL;
  switch (qm_redis_reply_type(rep)) {
  case QM_REDIS_REPLY_INT:
    snprintf(num, sizeof(num), "%lld", qm_redis_reply_int(rep));
    text_append(out, len, cap, num, strlen(num));
    break;
  case QM_REDIS_REPLY_ERROR:
    text_append(out, len, cap, "ERR: ", 5);
    /* fall through */
  case QM_REDIS_REPLY_STRING:
  case QM_REDIS_REPLY_STATUS:
    s = qm_redis_reply_str(rep, &n);
    text_append(out, len, cap, s, n);
    break;
  case QM_REDIS_REPLY_ARRAY:
    for (size_t i = 0; i < qm_redis_reply_len(rep); i++) {
      if (i) text_append(out, len, cap, "\n", 1);
      redis_reply_text(qm_redis_reply_element(rep, i), out, len, cap);
    }
    break;
  default: break;
  }
}

char *it_redis_cmd(it_redis_t *rd, const char *const *argv, int argc) {
  qm_redis_reply_t *rep = NULL;
  char errstr[256];
  int rc = qm_redis_command(rd->cli, 0, argc, argv, NULL, &rep, errstr, sizeof(errstr));
  cr_assert(rc == QM_OK, "private redis %d: %s: %s", rd->port, argv[0], errstr);
  size_t len = 0, cap = 64;
  char *out = qm_calloc(1, cap);
  redis_reply_text(rep, &out, &len, &cap);
  qm_redis_reply_destroy(rep);
  return out;
}

void it_redis_restart(it_redis_t *rd) {
  if (rd->pid > 0) {
    kill(rd->pid, SIGKILL);
    wait_exit(rd->pid, 10000);
    rd->pid = 0;
  }
  redis_spawn(rd);
}

void it_redis_stop(it_redis_t *rd) {
  if (!rd) return;
  if (rd->pid > 0) {
    kill(rd->pid, SIGKILL);
    wait_exit(rd->pid, 10000);
  }
  qm_redis_destroy(rd->cli);
  free(rd);
}

/* ------------------------------------------------------------ more instances */

struct it_instance {
  it_stack_t *st;
  char name[32];
  int port;
  pid_t pid;
  char log_path[PATH_MAX + 64];
};

it_instance_t *it_instance_start(it_stack_t *st, const char *name, const char *tag,
                                 const char *const *env_extra) {
  it_svc_t *s = svc_find(st, name);
  it_instance_t *in = qm_calloc(1, sizeof(*in));
  in->st = st;
  qm_strlcpy(in->name, name, sizeof(in->name));
  int avoid[IT_N_SERVICES + 1];
  size_t n_avoid = 0;
  ports_in_use(st, avoid, &n_avoid);
  in->port = free_port(avoid, n_avoid);
  snprintf(in->log_path, sizeof(in->log_path), "%s/%s-%s.log", st->log_dir, name, tag);
  it_env_t env;
  service_env(st, s, &env);
  char port[16];
  snprintf(port, sizeof(port), "%d", in->port);
  env_set(&env, "QM_HTTP_PORT", port);
  for (size_t i = 0; env_extra && env_extra[i]; i++) env_put(&env, env_extra[i]);
  char *bin = qm_asprintf("%s/services/qm-%s", QM_BINARY_DIR, name);
  char *argv[] = {bin, NULL};
  append_line(in->log_path, "=== it harness: extra instance %s of qm-%s on 127.0.0.1:%d ===", tag,
              name, in->port);
  in->pid = spawn_logged(bin, argv, env.v, in->log_path);
  env_free(&env);
  free(bin);
  int64_t deadline = it_now_ms() + IT_READY_BOUND_MS;
  for (;;) {
    int rc = wait_exit(in->pid, 0);
    if (rc != -2) {
      in->pid = 0;
      char what[128];
      snprintf(what, sizeof(what), "an extra instance of qm-%s exited during start-up with status %d",
               name, rc);
      fail_with_log(st, in->log_path, what);
    }
    if (http_status_quick(in->port, "/readyz") == 200) break;
    if (it_now_ms() >= deadline) fail_with_log(st, in->log_path, "an extra instance is not ready");
    it_sleep_ms(50);
  }
  it_note(st, "extra qm-%s (%s) ready on :%d (pid %d)", name, tag, in->port, (int)in->pid);
  return in;
}

int it_instance_port(const it_instance_t *in) { return in->port; }

bool it_instance_running(it_instance_t *in) {
  if (in->pid <= 0) return false;
  if (wait_exit(in->pid, 0) != -2) in->pid = 0;
  return in->pid > 0;
}

void it_instance_kill9(it_instance_t *in) {
  cr_assert(in->pid > 0, "kill -9 extra %s: not running", in->name);
  kill(in->pid, SIGKILL);
  wait_exit(in->pid, 10000);
  append_line(in->log_path, "=== it harness: pid %d killed with SIGKILL ===", (int)in->pid);
  it_note(in->st, "extra qm-%s (pid %d) killed with SIGKILL", in->name, (int)in->pid);
  in->pid = 0;
}

void it_instance_stop(it_instance_t *in) {
  if (!in) return;
  if (in->pid > 0) stop_pid(in->pid, IT_STOP_GRACE_MS);
  free(in);
}
