/*
 * tools: what the command-line tools of qm-audit share (audit.h).
 */
#include "audit.h"

#include <stdio.h>
#include <stdlib.h>

qm_pg_t *audit_tool_connect(const char *tool) {
  const char *dsn = getenv("QM_PG_DSN");
  if (!dsn || !*dsn) dsn = AUDIT_DEFAULT_DSN;
  char errstr[512], app[64];
  snprintf(app, sizeof(app), "qm-audit-%s", tool);
  qm_pg_t *pg = qm_pg_connect_app(dsn, "audit", app, errstr, sizeof(errstr));
  if (!pg) fprintf(stderr, "qm-audit %s: cannot connect (%s); set QM_PG_DSN\n", tool, errstr);
  return pg;
}
