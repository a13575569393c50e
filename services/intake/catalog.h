/*
 * catalog: intake's catalog as code. Items are loaded from a directory of YAML
 * files (one item per file, or a list under `items:`; bundles under
 * `bundles:`). Every error names the file, the line and the reason, and a
 * catalog with any error is refused whole: the caller keeps the one it had.
 *
 * A loaded catalog is immutable; a reload builds a new one and swaps it in.
 */
#ifndef QM_INTAKE_CATALOG_H
#define QM_INTAKE_CATALOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CATALOG_MAX_ROLES 5

typedef enum { CATALOG_KIND_ACCESS = 1, CATALOG_KIND_ASSET = 2, CATALOG_KIND_LICENCE = 3 } catalog_kind_t;
typedef enum { CATALOG_RISK_STANDARD = 1, CATALOG_RISK_SENSITIVE = 2, CATALOG_RISK_ELEVATED = 3 } catalog_risk_t;

typedef struct catalog_strlist {
  char **v;
  size_t n;
} catalog_strlist_t;

typedef struct catalog_role {
  char *id;
  char *name;
  char *group;     /* identity-provider group */
  char *connector; /* connector instance id */
  catalog_risk_t risk;
  int default_duration_days; /* 0 = open-ended */
  int max_duration_days;     /* 0 = no limit */
  bool auto_approve;         /* standard risk only */
} catalog_role_t;

#define CATALOG_MAX_ATTRS 16

/* A form attribute of an item (e.g. keyboard layout, RAM): a choice from values. */
typedef struct catalog_attr {
  char *name;
  char *label;
  catalog_strlist_t values; /* the allowed values */
  char *def;                /* default value, or NULL */
  bool required;
} catalog_attr_t;

typedef struct catalog_item {
  char *id;
  catalog_kind_t kind;
  char *name;
  char *description;
  char *owner;     /* person id of the owner */
  int64_t cost_minor;
  bool regulated;
  char *attestation; /* NULL when the item touches no personal data */
  char *asset_model; /* assets */
  catalog_role_t roles[CATALOG_MAX_ROLES];
  size_t n_roles;
  int seats; /* licences: seats in all; 0 = unlimited */
  catalog_strlist_t encryption_required_in; /* devices: countries that require disk encryption */
  catalog_attr_t attrs[CATALOG_MAX_ATTRS];
  size_t n_attrs;
  /* eligibility: empty list = no restriction */
  catalog_strlist_t employment_types, departments, job_functions, countries_allowed,
      countries_excluded;
  char *source_file; /* for messages */
} catalog_item_t;

typedef struct catalog_bundle_entry {
  char *item_id;
  char *role_id;
} catalog_bundle_entry_t;

typedef struct catalog_bundle {
  char *department;
  catalog_bundle_entry_t *entries;
  size_t n_entries;
} catalog_bundle_t;

typedef struct catalog {
  catalog_item_t *items;
  size_t n_items;
  catalog_bundle_t *bundles;
  size_t n_bundles;
} catalog_t;

/* Loads every *.yaml / *.yml file of dir (sorted by name). On success *out is a
 * new catalog: caller frees with catalog_destroy(). On failure returns
 * QM_EINVAL with "file:line: reason" in errstr and leaves *out untouched. */
int catalog_load_dir(const char *dir, catalog_t **out, char *errstr, size_t errstr_size);

const catalog_item_t *catalog_find(const catalog_t *cat, const char *item_id);
const catalog_role_t *catalog_find_role(const catalog_item_t *item, const char *role_id);
const catalog_attr_t *catalog_find_attr(const catalog_item_t *item, const char *name);
/* True when the value is one of the attribute's values. */
bool catalog_attr_allows(const catalog_attr_t *attr, const char *value);
/* True when the item needs disk encryption for a person in country. */
bool catalog_encryption_required(const catalog_item_t *item, const char *country);

/* Person attributes used for eligibility. */
typedef struct catalog_person {
  const char *employment_type, *department, *job_function, *country;
} catalog_person_t;
/* True when the person may request the item. why (optional) says why not. */
bool catalog_eligible(const catalog_item_t *item, const catalog_person_t *p, char *why,
                      size_t why_size);

/* Why a person cannot have an item: by attributes (not_eligible) or by
 * country (unavailable_in_country). */
typedef enum { CATALOG_OK = 0, CATALOG_NOT_ELIGIBLE, CATALOG_UNAVAILABLE_IN_COUNTRY } catalog_verdict_t;
catalog_verdict_t catalog_check(const catalog_item_t *item, const catalog_person_t *p,
                                char *why, size_t why_size);

const char *catalog_kind_name(catalog_kind_t k);
const char *catalog_risk_name(catalog_risk_t r);

void catalog_destroy(catalog_t *cat);

#endif
