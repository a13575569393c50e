/*
 * provisioning: the state shared by qm-provisioning's consumer handler, its
 * grant-operation workers (workers.c) and its HTTP API (api.c).
 */
#ifndef QM_PROVISIONING_H
#define QM_PROVISIONING_H

#include "qm_scim.h"
#include "qm_service.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define PROV_MAX_WORKERS 64

typedef struct prov {
  qm_service_t *svc;
  qm_scim_t *scim; /* connector scim-main; thread-safe */
  pthread_t workers[PROV_MAX_WORKERS];
  size_t n_workers;
  atomic_bool stopping;
} prov_t;

int prov_workers_start(prov_t *prov, char *errstr, size_t errstr_size);
void prov_workers_stop(prov_t *prov);
int prov_api_register(prov_t *prov, char *errstr, size_t errstr_size);

#endif
