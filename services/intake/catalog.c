/*
 * catalog: loads intake's YAML catalog with libyaml's document API, so every
 * node keeps its line for error messages. Validation is strict: unknown keys,
 * wrong types, duplicate ids, more than five roles, bad risk names and
 * inconsistent durations are all refused with file:line: reason.
 */
#include "catalog.h"

#include "qm_common.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

typedef struct loader {
  yaml_document_t *doc;
  const char *file;
  char *errstr;
  size_t errstr_size;
  int rc;
} loader_t;

static int fail(loader_t *ld, const yaml_node_t *node, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Records the first error only: later ones are usually consequences. */
static int fail(loader_t *ld, const yaml_node_t *node, const char *fmt, ...) {
  if (ld->rc == QM_OK) {
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    snprintf(ld->errstr, ld->errstr_size, "%s:%lu: %s", ld->file,
             node ? (unsigned long)node->start_mark.line + 1 : 0UL, why);
    ld->rc = QM_EINVAL;
  }
  return QM_EINVAL;
}

static const char *scalar(const yaml_node_t *n) {
  return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static int get_str(loader_t *ld, const yaml_node_t *n, const char *key, char **out) {
  const char *s = scalar(n);
  if (!s) return fail(ld, n, "'%s' must be a string", key);
  if (!*s) return fail(ld, n, "'%s' must not be empty", key);
  *out = qm_strdup(s);
  return QM_OK;
}

static int get_int(loader_t *ld, const yaml_node_t *n, const char *key, int64_t min, int64_t max,
                   int64_t *out) {
  const char *s = scalar(n);
  char *end = NULL;
  errno = 0;
  long long v = s ? strtoll(s, &end, 10) : 0;
  if (!s || errno || end == s || *end) return fail(ld, n, "'%s' must be an integer", key);
  if (v < min || v > max)
    return fail(ld, n, "'%s' must be between %lld and %lld", key, (long long)min, (long long)max);
  *out = v;
  return QM_OK;
}

/* Cost in major units with up to two decimals ("1499.99") -> minor units. */
static int get_cost(loader_t *ld, const yaml_node_t *n, int64_t *out) {
  const char *s = scalar(n);
  char *end = NULL;
  errno = 0;
  double v = s ? strtod(s, &end) : 0;
  if (!s || errno || end == s || *end || v < 0 || v > 1e12)
    return fail(ld, n, "'cost' must be a non-negative amount (e.g. 1499.99)");
  *out = (int64_t)(v * 100.0 + 0.5);
  return QM_OK;
}

static int get_bool(loader_t *ld, const yaml_node_t *n, const char *key, bool *out) {
  const char *s = scalar(n);
  if (s && (!strcmp(s, "true") || !strcmp(s, "yes"))) { *out = true; return QM_OK; }
  if (s && (!strcmp(s, "false") || !strcmp(s, "no"))) { *out = false; return QM_OK; }
  return fail(ld, n, "'%s' must be true or false", key);
}

static int get_strlist(loader_t *ld, const yaml_node_t *n, const char *key,
                       catalog_strlist_t *out) {
  if (!n || n->type != YAML_SEQUENCE_NODE) return fail(ld, n, "'%s' must be a list", key);
  size_t cnt = (size_t)(n->data.sequence.items.top - n->data.sequence.items.start);
  out->v = qm_calloc(cnt ? cnt : 1, sizeof(char *));
  out->n = 0;
  for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++) {
    const yaml_node_t *e = yaml_document_get_node(ld->doc, *it);
    const char *s = scalar(e);
    if (!s || !*s) return fail(ld, e, "'%s' entries must be non-empty strings", key);
    out->v[out->n++] = qm_strdup(s);
  }
  return QM_OK;
}

/* Iterates a mapping's pairs as (key node, value node); names derive from k so
 * that nested loops do not shadow each other. */
#define FOR_EACH_PAIR(ld, map, k, v)                                                       \
  for (yaml_node_pair_t *p_##k = (map)->data.mapping.pairs.start;                          \
       p_##k < (map)->data.mapping.pairs.top; p_##k++)                                     \
    for (const yaml_node_t *k = yaml_document_get_node((ld)->doc, p_##k->key),             \
                           *v = yaml_document_get_node((ld)->doc, p_##k->value),           \
                           *once_##k = k;                                                  \
         once_##k; once_##k = NULL)

static int parse_risk(loader_t *ld, const yaml_node_t *n, catalog_risk_t *out) {
  const char *s = scalar(n);
  if (s && !strcmp(s, "standard")) *out = CATALOG_RISK_STANDARD;
  else if (s && !strcmp(s, "sensitive")) *out = CATALOG_RISK_SENSITIVE;
  else if (s && !strcmp(s, "elevated")) *out = CATALOG_RISK_ELEVATED;
  else return fail(ld, n, "'risk' must be standard, sensitive or elevated");
  return QM_OK;
}

static int parse_role(loader_t *ld, const yaml_node_t *n, catalog_item_t *item, catalog_role_t *r) {
  if (n->type != YAML_MAPPING_NODE) return fail(ld, n, "a role must be a mapping");
  int64_t v;
  r->risk = CATALOG_RISK_STANDARD;
  FOR_EACH_PAIR(ld, n, k, val) {
    const char *key = scalar(k);
    if (!key) return fail(ld, k, "keys must be strings");
    if (!strcmp(key, "id")) get_str(ld, val, key, &r->id);
    else if (!strcmp(key, "name")) get_str(ld, val, key, &r->name);
    else if (!strcmp(key, "group")) get_str(ld, val, key, &r->group);
    else if (!strcmp(key, "connector")) get_str(ld, val, key, &r->connector);
    else if (!strcmp(key, "risk")) parse_risk(ld, val, &r->risk);
    else if (!strcmp(key, "auto_approve")) get_bool(ld, val, key, &r->auto_approve);
    else if (!strcmp(key, "default_duration_days")) {
      if (get_int(ld, val, key, 0, 3650, &v) == QM_OK) r->default_duration_days = (int)v;
    } else if (!strcmp(key, "max_duration_days")) {
      if (get_int(ld, val, key, 0, 3650, &v) == QM_OK) r->max_duration_days = (int)v;
    } else return fail(ld, k, "unknown role key '%s'", key);
  }
  if (ld->rc != QM_OK) return ld->rc;
  if (!r->id) return fail(ld, n, "a role needs an 'id'");
  if (item->kind != CATALOG_KIND_ASSET && !r->group)
    return fail(ld, n, "role '%s' needs a 'group' (the identity-provider group)", r->id);
  if (r->group && !r->connector) r->connector = qm_strdup("scim-main");
  if (r->max_duration_days && r->default_duration_days > r->max_duration_days)
    return fail(ld, n, "role '%s': default_duration_days exceeds max_duration_days", r->id);
  if (r->risk == CATALOG_RISK_ELEVATED && r->max_duration_days == 0)
    return fail(ld, n, "role '%s' is elevated: it needs max_duration_days (elevated access is time-bound)", r->id);
  if (r->risk == CATALOG_RISK_ELEVATED && r->default_duration_days == 0)
    r->default_duration_days = r->max_duration_days;
  if (r->auto_approve && r->risk != CATALOG_RISK_STANDARD)
    return fail(ld, n, "role '%s': auto_approve is allowed only at standard risk", r->id);
  if (!r->name) r->name = qm_strdup(r->id);
  return QM_OK;
}

static int parse_eligibility(loader_t *ld, const yaml_node_t *n, catalog_item_t *item) {
  if (n->type != YAML_MAPPING_NODE) return fail(ld, n, "'eligibility' must be a mapping");
  FOR_EACH_PAIR(ld, n, k, val) {
    const char *key = scalar(k);
    if (!key) return fail(ld, k, "keys must be strings");
    if (!strcmp(key, "employment_types")) get_strlist(ld, val, key, &item->employment_types);
    else if (!strcmp(key, "departments")) get_strlist(ld, val, key, &item->departments);
    else if (!strcmp(key, "job_functions")) get_strlist(ld, val, key, &item->job_functions);
    else if (!strcmp(key, "countries_allowed")) get_strlist(ld, val, key, &item->countries_allowed);
    else if (!strcmp(key, "countries_excluded")) get_strlist(ld, val, key, &item->countries_excluded);
    else return fail(ld, k, "unknown eligibility key '%s'", key);
  }
  return ld->rc;
}

static void item_free(catalog_item_t *it);

static int parse_attrs(loader_t *ld, const yaml_node_t *n, catalog_item_t *item) {
  if (n->type != YAML_SEQUENCE_NODE) return fail(ld, n, "'attributes' must be a list");
  for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++) {
    const yaml_node_t *an = yaml_document_get_node(ld->doc, *it);
    if (an->type != YAML_MAPPING_NODE) return fail(ld, an, "an attribute must be a mapping");
    if (item->n_attrs == CATALOG_MAX_ATTRS)
      return fail(ld, an, "item '%s' has more than %d attributes", item->id ? item->id : "?",
                  CATALOG_MAX_ATTRS);
    catalog_attr_t *a = &item->attrs[item->n_attrs++];
    FOR_EACH_PAIR(ld, an, k, v) {
      const char *key = scalar(k);
      if (key && !strcmp(key, "name")) get_str(ld, v, key, &a->name);
      else if (key && !strcmp(key, "label")) get_str(ld, v, key, &a->label);
      else if (key && !strcmp(key, "values")) get_strlist(ld, v, key, &a->values);
      else if (key && !strcmp(key, "default")) get_str(ld, v, key, &a->def);
      else if (key && !strcmp(key, "required")) get_bool(ld, v, key, &a->required);
      else return fail(ld, k, "unknown attribute key '%s'", key ? key : "?");
      if (ld->rc != QM_OK) return ld->rc;
    }
    if (!a->name) return fail(ld, an, "an attribute needs a 'name'");
    if (a->values.n == 0) return fail(ld, an, "attribute '%s' needs 'values'", a->name);
    if (a->def && !catalog_attr_allows(a, a->def))
      return fail(ld, an, "attribute '%s': default '%s' is not one of its values", a->name, a->def);
    for (size_t j = 0; j + 1 < item->n_attrs; j++)
      if (!strcmp(item->attrs[j].name, a->name))
        return fail(ld, an, "two attributes named '%s'", a->name);
    if (!a->label) a->label = qm_strdup(a->name);
  }
  return QM_OK;
}

static int parse_item(loader_t *ld, const yaml_node_t *n, catalog_item_t *item) {
  if (n->type != YAML_MAPPING_NODE) return fail(ld, n, "an item must be a mapping");
  item->source_file = qm_strdup(ld->file);
  const yaml_node_t *roles = NULL;
  FOR_EACH_PAIR(ld, n, k, val) {
    const char *key = scalar(k);
    if (!key) return fail(ld, k, "keys must be strings");
    if (!strcmp(key, "id")) get_str(ld, val, key, &item->id);
    else if (!strcmp(key, "kind")) {
      const char *s = scalar(val);
      if (s && !strcmp(s, "access")) item->kind = CATALOG_KIND_ACCESS;
      else if (s && !strcmp(s, "asset")) item->kind = CATALOG_KIND_ASSET;
      else if (s && !strcmp(s, "licence")) item->kind = CATALOG_KIND_LICENCE;
      else fail(ld, val, "'kind' must be access, asset or licence");
    } else if (!strcmp(key, "name")) get_str(ld, val, key, &item->name);
    else if (!strcmp(key, "description")) get_str(ld, val, key, &item->description);
    else if (!strcmp(key, "owner")) get_str(ld, val, key, &item->owner);
    else if (!strcmp(key, "cost")) get_cost(ld, val, &item->cost_minor);
    else if (!strcmp(key, "regulated")) get_bool(ld, val, key, &item->regulated);
    else if (!strcmp(key, "attestation")) get_str(ld, val, key, &item->attestation);
    else if (!strcmp(key, "asset_model")) get_str(ld, val, key, &item->asset_model);
    else if (!strcmp(key, "eligibility")) parse_eligibility(ld, val, item);
    else if (!strcmp(key, "seats")) {
      int64_t v = 0;
      if (get_int(ld, val, key, 1, 1000000, &v) == QM_OK) item->seats = (int)v;
    } else if (!strcmp(key, "encryption_required_in"))
      get_strlist(ld, val, key, &item->encryption_required_in);
    else if (!strcmp(key, "attributes")) parse_attrs(ld, val, item);
    else if (!strcmp(key, "roles")) roles = val;
    else fail(ld, k, "unknown item key '%s'", key);
    if (ld->rc != QM_OK) return ld->rc;
  }
  if (!item->id) return fail(ld, n, "an item needs an 'id'");
  if (!item->kind) return fail(ld, n, "item '%s' needs a 'kind'", item->id);
  if (!item->name) return fail(ld, n, "item '%s' needs a 'name'", item->id);
  if (!item->owner) return fail(ld, n, "item '%s' needs an 'owner'", item->id);
  if (roles) {
    if (roles->type != YAML_SEQUENCE_NODE) return fail(ld, roles, "'roles' must be a list");
    size_t cnt = (size_t)(roles->data.sequence.items.top - roles->data.sequence.items.start);
    if (cnt > CATALOG_MAX_ROLES)
      return fail(ld, roles, "item '%s' has %zu roles; at most %d are allowed", item->id, cnt,
                  CATALOG_MAX_ROLES);
    for (yaml_node_item_t *it = roles->data.sequence.items.start; it < roles->data.sequence.items.top; it++) {
      const yaml_node_t *rn = yaml_document_get_node(ld->doc, *it);
      catalog_role_t *r = &item->roles[item->n_roles++];
      if (parse_role(ld, rn, item, r) != QM_OK) return ld->rc;
      for (size_t j = 0; j + 1 < item->n_roles; j++)
        if (!strcmp(item->roles[j].id, r->id))
          return fail(ld, rn, "item '%s' has two roles with id '%s'", item->id, r->id);
    }
  }
  if (item->kind != CATALOG_KIND_ASSET && item->n_roles == 0)
    return fail(ld, n, "item '%s' needs at least one role", item->id);
  if (item->seats && item->kind != CATALOG_KIND_LICENCE)
    return fail(ld, n, "item '%s': 'seats' applies to licences only", item->id);
  return QM_OK;
}

static int parse_bundles(loader_t *ld, const yaml_node_t *n, catalog_t *cat) {
  if (n->type != YAML_SEQUENCE_NODE) return fail(ld, n, "'bundles' must be a list");
  for (yaml_node_item_t *it = n->data.sequence.items.start; it < n->data.sequence.items.top; it++) {
    const yaml_node_t *bn = yaml_document_get_node(ld->doc, *it);
    if (bn->type != YAML_MAPPING_NODE) return fail(ld, bn, "a bundle must be a mapping");
    cat->bundles = qm_realloc(cat->bundles, (cat->n_bundles + 1) * sizeof(*cat->bundles));
    catalog_bundle_t *b = &cat->bundles[cat->n_bundles++];
    memset(b, 0, sizeof(*b));
    FOR_EACH_PAIR(ld, bn, k, val) {
      const char *key = scalar(k);
      if (key && !strcmp(key, "department")) get_str(ld, val, key, &b->department);
      else if (key && !strcmp(key, "items")) {
        if (val->type != YAML_SEQUENCE_NODE) return fail(ld, val, "'items' must be a list");
        for (yaml_node_item_t *e = val->data.sequence.items.start; e < val->data.sequence.items.top; e++) {
          const yaml_node_t *en = yaml_document_get_node(ld->doc, *e);
          if (en->type != YAML_MAPPING_NODE) return fail(ld, en, "a bundle entry needs 'item' and 'role'");
          b->entries = qm_realloc(b->entries, (b->n_entries + 1) * sizeof(*b->entries));
          catalog_bundle_entry_t *be = &b->entries[b->n_entries++];
          memset(be, 0, sizeof(*be));
          FOR_EACH_PAIR(ld, en, ek, ev) {
            const char *ekey = scalar(ek);
            if (ekey && !strcmp(ekey, "item")) get_str(ld, ev, ekey, &be->item_id);
            else if (ekey && !strcmp(ekey, "role")) get_str(ld, ev, ekey, &be->role_id);
            else return fail(ld, ek, "unknown bundle entry key '%s'", ekey ? ekey : "?");
          }
          if (ld->rc != QM_OK) return ld->rc;
          if (!be->item_id) return fail(ld, en, "a bundle entry needs 'item'");
        }
      } else return fail(ld, k, "unknown bundle key '%s'", key ? key : "?");
      if (ld->rc != QM_OK) return ld->rc;
    }
    if (!b->department) return fail(ld, bn, "a bundle needs a 'department'");
  }
  return QM_OK;
}

/* One file: a single item mapping, or a mapping with `items:` and/or `bundles:`. */
static int load_file(const char *path, catalog_t *cat, char *errstr, size_t errstr_size) {
  FILE *f = fopen(path, "rb");
  if (!f) return qm_err(errstr, errstr_size, QM_EINVAL, "%s: cannot open: %s", path, strerror(errno));
  yaml_parser_t parser;
  yaml_document_t doc;
  yaml_parser_initialize(&parser);
  yaml_parser_set_input_file(&parser, f);
  loader_t ld = {.doc = &doc, .file = path, .errstr = errstr, .errstr_size = errstr_size};
  if (!yaml_parser_load(&parser, &doc)) {
    int rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s:%lu: YAML syntax error: %s", path,
                    (unsigned long)parser.problem_mark.line + 1,
                    parser.problem ? parser.problem : "unknown");
    yaml_parser_delete(&parser);
    fclose(f);
    return rc;
  }
  yaml_node_t *root = yaml_document_get_root_node(&doc);
  if (!root) goto out; /* empty file */
  if (root->type != YAML_MAPPING_NODE) {
    fail(&ld, root, "the top level must be a mapping (an item, or 'items:'/'bundles:')");
    goto out;
  }
  const yaml_node_t *items = NULL, *bundles = NULL;
  bool single = false;
  FOR_EACH_PAIR(&ld, root, k, v) {
    const char *key = scalar(k);
    if (key && !strcmp(key, "items")) items = v;
    else if (key && !strcmp(key, "bundles")) bundles = v;
    else single = true;
  }
  if (single && (items || bundles)) {
    fail(&ld, root, "a file holds either one item or 'items:'/'bundles:' lists, not both");
    goto out;
  }
  if (single) {
    cat->items = qm_realloc(cat->items, (cat->n_items + 1) * sizeof(*cat->items));
    memset(&cat->items[cat->n_items], 0, sizeof(catalog_item_t));
    cat->n_items++;
    parse_item(&ld, root, &cat->items[cat->n_items - 1]);
  }
  if (items && ld.rc == QM_OK) {
    if (items->type != YAML_SEQUENCE_NODE) { fail(&ld, items, "'items' must be a list"); goto out; }
    for (yaml_node_item_t *it = items->data.sequence.items.start; it < items->data.sequence.items.top && ld.rc == QM_OK; it++) {
      cat->items = qm_realloc(cat->items, (cat->n_items + 1) * sizeof(*cat->items));
      memset(&cat->items[cat->n_items], 0, sizeof(catalog_item_t));
      cat->n_items++;
      parse_item(&ld, yaml_document_get_node(&doc, *it), &cat->items[cat->n_items - 1]);
    }
  }
  if (bundles && ld.rc == QM_OK) parse_bundles(&ld, bundles, cat);
out:
  yaml_document_delete(&doc);
  yaml_parser_delete(&parser);
  fclose(f);
  return ld.rc;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

int catalog_load_dir(const char *dir, catalog_t **out, char *errstr, size_t errstr_size) {
  DIR *d = opendir(dir);
  if (!d)
    return qm_err(errstr, errstr_size, QM_EINVAL, "%s: cannot open catalog directory: %s", dir,
                  strerror(errno));
  char **names = NULL;
  size_t n = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    size_t len = strlen(de->d_name);
    if (de->d_name[0] == '.') continue;
    if ((len > 5 && !strcmp(de->d_name + len - 5, ".yaml")) ||
        (len > 4 && !strcmp(de->d_name + len - 4, ".yml"))) {
      names = qm_realloc(names, (n + 1) * sizeof(char *));
      names[n++] = qm_asprintf("%s/%s", dir, de->d_name);
    }
  }
  closedir(d);
  qsort(names, n, sizeof(char *), cmp_str);
  catalog_t *cat = qm_calloc(1, sizeof(*cat));
  int rc = QM_OK;
  for (size_t i = 0; i < n && rc == QM_OK; i++) rc = load_file(names[i], cat, errstr, errstr_size);
  /* Cross-file checks: unique ids, bundles naming real items and roles. */
  for (size_t i = 0; i < cat->n_items && rc == QM_OK; i++)
    for (size_t j = 0; j < i; j++)
      if (cat->items[i].id && cat->items[j].id && !strcmp(cat->items[i].id, cat->items[j].id)) {
        rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s: item id '%s' is also defined in %s",
                    cat->items[i].source_file, cat->items[i].id, cat->items[j].source_file);
        break;
      }
  for (size_t i = 0; i < cat->n_bundles && rc == QM_OK; i++) {
    const catalog_bundle_t *b = &cat->bundles[i];
    for (size_t j = 0; j < b->n_entries; j++) {
      const catalog_item_t *it = catalog_find(cat, b->entries[j].item_id);
      if (!it || (b->entries[j].role_id && !catalog_find_role(it, b->entries[j].role_id))) {
        rc = qm_err(errstr, errstr_size, QM_EINVAL,
                    "bundle for department '%s' names unknown item/role '%s/%s'", b->department,
                    b->entries[j].item_id, b->entries[j].role_id ? b->entries[j].role_id : "");
        break;
      }
    }
  }
  if (rc == QM_OK && cat->n_items == 0)
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s: no catalog items found (*.yaml)", dir);
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
  if (rc != QM_OK) {
    catalog_destroy(cat);
    return rc;
  }
  *out = cat;
  return QM_OK;
}

const catalog_item_t *catalog_find(const catalog_t *cat, const char *item_id) {
  for (size_t i = 0; i < cat->n_items; i++)
    if (cat->items[i].id && !strcmp(cat->items[i].id, item_id)) return &cat->items[i];
  return NULL;
}

const catalog_role_t *catalog_find_role(const catalog_item_t *item, const char *role_id) {
  for (size_t i = 0; i < item->n_roles; i++)
    if (!strcmp(item->roles[i].id, role_id)) return &item->roles[i];
  return NULL;
}

static bool list_has(const catalog_strlist_t *l, const char *s) {
  if (!s) return false;
  for (size_t i = 0; i < l->n; i++)
    if (!strcasecmp(l->v[i], s)) return true;
  return false;
}

catalog_verdict_t catalog_check(const catalog_item_t *item, const catalog_person_t *p,
                                char *why, size_t why_size) {
  struct { const catalog_strlist_t *l; const char *v; const char *what; } checks[] = {
      {&item->employment_types, p->employment_type, "employment type"},
      {&item->departments, p->department, "department"},
      {&item->job_functions, p->job_function, "job function"},
  };
  for (size_t i = 0; i < QM_ARRAY_LEN(checks); i++)
    if (checks[i].l->n && !list_has(checks[i].l, checks[i].v)) {
      if (why) snprintf(why, why_size, "%s '%s' is not eligible for %s", checks[i].what,
                        checks[i].v ? checks[i].v : "", item->id);
      return CATALOG_NOT_ELIGIBLE;
    }
  if ((item->countries_allowed.n && !list_has(&item->countries_allowed, p->country)) ||
      list_has(&item->countries_excluded, p->country)) {
    if (why) snprintf(why, why_size, "%s is not available in country '%s'", item->id,
                      p->country ? p->country : "");
    return CATALOG_UNAVAILABLE_IN_COUNTRY;
  }
  return CATALOG_OK;
}

bool catalog_eligible(const catalog_item_t *item, const catalog_person_t *p, char *why,
                      size_t why_size) {
  return catalog_check(item, p, why, why_size) == CATALOG_OK;
}

const catalog_attr_t *catalog_find_attr(const catalog_item_t *item, const char *name) {
  for (size_t i = 0; i < item->n_attrs; i++)
    if (!strcmp(item->attrs[i].name, name)) return &item->attrs[i];
  return NULL;
}

bool catalog_attr_allows(const catalog_attr_t *attr, const char *value) {
  for (size_t i = 0; i < attr->values.n; i++)
    if (!strcmp(attr->values.v[i], value)) return true;
  return false;
}

bool catalog_encryption_required(const catalog_item_t *item, const char *country) {
  return list_has(&item->encryption_required_in, country);
}

const char *catalog_kind_name(catalog_kind_t k) {
  return k == CATALOG_KIND_ACCESS ? "access" : k == CATALOG_KIND_ASSET ? "asset" : "licence";
}

const char *catalog_risk_name(catalog_risk_t r) {
  return r == CATALOG_RISK_STANDARD ? "standard" : r == CATALOG_RISK_SENSITIVE ? "sensitive" : "elevated";
}

static void strlist_free(catalog_strlist_t *l) {
  for (size_t i = 0; i < l->n; i++) free(l->v[i]);
  free(l->v);
}

static void item_free(catalog_item_t *it) {
  free(it->id); free(it->name); free(it->description); free(it->owner);
  free(it->attestation); free(it->asset_model); free(it->source_file);
  for (size_t i = 0; i < it->n_roles; i++) {
    catalog_role_t *r = &it->roles[i];
    free(r->id); free(r->name); free(r->group); free(r->connector);
  }
  strlist_free(&it->employment_types); strlist_free(&it->departments);
  strlist_free(&it->job_functions); strlist_free(&it->countries_allowed);
  strlist_free(&it->countries_excluded);
  strlist_free(&it->encryption_required_in);
  for (size_t i = 0; i < it->n_attrs; i++) {
    free(it->attrs[i].name);
    free(it->attrs[i].label);
    free(it->attrs[i].def);
    strlist_free(&it->attrs[i].values);
  }
}

void catalog_destroy(catalog_t *cat) {
  if (!cat) return;
  for (size_t i = 0; i < cat->n_items; i++) item_free(&cat->items[i]);
  free(cat->items);
  for (size_t i = 0; i < cat->n_bundles; i++) {
    for (size_t j = 0; j < cat->bundles[i].n_entries; j++) {
      free(cat->bundles[i].entries[j].item_id);
      free(cat->bundles[i].entries[j].role_id);
    }
    free(cat->bundles[i].entries);
    free(cat->bundles[i].department);
  }
  free(cat->bundles);
  free(cat);
}
