/*
 * walk: recomputes audit chains fed by any source and names the first break
 * of each (see walk.h for the kinds and the two feeding modes).
 */
#include "walk.h"

#include "qm_common.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* One record as the walk keeps it. */
typedef struct wentry {
  int64_t seq;
  uint64_t order;              /* arrival, to keep sorting stable */
  uint8_t prev[CHAIN_HASH_LEN]; /* stored prev_hash */
  uint8_t hash[CHAIN_HASH_LEN]; /* stored hash */
  uint8_t self[CHAIN_HASH_LEN]; /* recomputed over the stored prev_hash */
  bool lens_ok;                 /* stored prev_hash and hash were 32 bytes */
} wentry_t;

typedef enum { CP_UNCHECKED = 0, CP_VERIFIED, CP_BAD_SIGNATURE, CP_OTHER_KEY } wcp_state_t;

typedef struct wcp {
  int64_t seq;
  uint8_t head[CHAIN_HASH_LEN];
  int64_t signed_at_ms;
  char key_id[CHAIN_KEY_ID_LEN];
  wcp_state_t state;
} wcp_t;

typedef struct wchain {
  char *id;
  /* collecting mode */
  wentry_t *ents;
  size_t n_ents, cap_ents;
  /* the walk so far */
  int64_t expect;
  uint8_t prev[CHAIN_HASH_LEN];
  int64_t records, repeats;
  wentry_t last;
  bool have_last;
  /* checkpoints, sorted by sequence before the walk */
  wcp_t *cps;
  size_t n_cps, cap_cps, cp_next;
  bool cps_sorted;
  int64_t cp_verified, cp_other, cp_unchecked;
  /* stored head (database) */
  bool has_head;
  int64_t head_seq;
  uint8_t head_hash[CHAIN_HASH_LEN];
  bool head_len_ok;
  /* pruned by retention up to anchor_seq (walk_anchor()) */
  bool anchored, anchor_checked;
  int64_t anchor_seq, pruned_at_ms;
  uint8_t anchor_hash[CHAIN_HASH_LEN];
  bool anchor_len_ok;
  /* outcome */
  bool broken;
  int64_t bad_seq;
  const char *kind;
  char why[512];
} wchain_t;

struct walk {
  const chain_key_t *pubkey;
  char pub_id[CHAIN_KEY_ID_LEN];
  bool collect;
  walk_find_fn find;
  void *find_ctx;
  char source[16];
  wchain_t *chains;
  size_t n_chains, cap_chains;
  uint64_t order;
  int64_t t0_ms;
};

walk_t *walk_new(const chain_key_t *pubkey, bool collect, walk_find_fn find, void *find_ctx,
                 const char *source) {
  walk_t *w = qm_calloc(1, sizeof(*w));
  w->pubkey = pubkey;
  if (pubkey) chain_key_id(pubkey, w->pub_id);
  w->collect = collect;
  w->find = find;
  w->find_ctx = find_ctx;
  qm_strlcpy(w->source, source ? source : "", sizeof(w->source));
  w->t0_ms = qm_mono_ms();
  return w;
}

static wchain_t *chain_get(walk_t *w, const char *id) {
  for (size_t i = 0; i < w->n_chains; i++)
    if (!strcmp(w->chains[i].id, id)) return &w->chains[i];
  if (w->n_chains == w->cap_chains) {
    w->cap_chains = w->cap_chains ? 2 * w->cap_chains : 8;
    w->chains = qm_realloc(w->chains, w->cap_chains * sizeof(*w->chains));
  }
  wchain_t *ch = &w->chains[w->n_chains++];
  memset(ch, 0, sizeof(*ch));
  ch->id = qm_strdup(id);
  ch->expect = 1;
  return ch;
}

static void chain_break(wchain_t *ch, int64_t seq, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void chain_break(wchain_t *ch, int64_t seq, const char *kind, const char *fmt, ...) {
  if (ch->broken) return;
  ch->broken = true;
  ch->bad_seq = seq;
  ch->kind = kind;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ch->why, sizeof(ch->why), fmt, ap);
  va_end(ap);
}

static int cmp_cp(const void *a, const void *b) {
  const wcp_t *x = a, *y = b;
  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static int cmp_entry(const void *a, const void *b) {
  const wentry_t *x = a, *y = b;
  if (x->seq != y->seq) return x->seq < y->seq ? -1 : 1;
  return x->order < y->order ? -1 : x->order > y->order;
}

static void check_anchor(walk_t *w, wchain_t *ch);

static void sort_cps(wchain_t *ch) {
  if (ch->cps_sorted) return;
  if (ch->n_cps > 1) qsort(ch->cps, ch->n_cps, sizeof(*ch->cps), cmp_cp);
  ch->cps_sorted = true;
}

/* A record's stored hash found in the collected records of ch. */
static bool find_collected(const wchain_t *ch, const uint8_t hash[CHAIN_HASH_LEN], int64_t *seq) {
  for (size_t i = 0; i < ch->n_ents; i++)
    if (ch->ents[i].lens_ok && !memcmp(ch->ents[i].hash, hash, CHAIN_HASH_LEN)) {
      *seq = ch->ents[i].seq;
      return true;
    }
  return false;
}

/* Explains a record whose prev_hash is not the previous record's hash. */
static void explain_unlinked(walk_t *w, wchain_t *ch, const wentry_t *e) {
  int64_t x = 0;
  bool found = e->lens_ok && (w->collect ? find_collected(ch, e->prev, &x)
                                         : (w->find && w->find(w->find_ctx, ch->id, e->prev, &x)));
  int64_t s = e->seq;
  if (found && x >= s) {
    chain_break(ch, s, "reordered",
                "record %lld's prev_hash is the hash of record %lld, which comes after it "
                "(records were reordered)", (long long)s, (long long)x);
  } else if (found && x < s - 1 && s - 1 == x + 1) {
    chain_break(ch, x + 1, "inserted",
                "record %lld's prev_hash is the hash of record %lld, so record %lld between "
                "them was inserted", (long long)s, (long long)x, (long long)(x + 1));
  } else if (found && x < s - 1) {
    chain_break(ch, x + 1, "inserted",
                "record %lld's prev_hash is the hash of record %lld, so records %lld..%lld "
                "between them were inserted", (long long)s, (long long)x, (long long)(x + 1),
                (long long)(s - 1));
  } else {
    chain_break(ch, s, "inserted",
                "record %lld does not follow record %lld: its prev_hash is the hash of no record "
                "in the chain (record %lld was forged or inserted, or a record before it was "
                "rewritten, or removed with the rest renumbered)", (long long)s,
                (long long)(s - 1), (long long)s);
  }
}

/* Checks the checkpoints at the sequence just accepted (the chain's hash
 * there is ch->prev). */
static void check_cps_at(wchain_t *ch, int64_t seq) {
  while (ch->cp_next < ch->n_cps && ch->cps[ch->cp_next].seq <= seq && !ch->broken) {
    wcp_t *cp = &ch->cps[ch->cp_next++];
    if (cp->seq < seq) continue; /* a sequence < 1: never signed by audit; ignored */
    if (cp->state == CP_BAD_SIGNATURE) {
      chain_break(ch, cp->seq, "signature",
                  "the checkpoint at sequence %lld claims key %s but its signature is invalid "
                  "(a forged or altered checkpoint)", (long long)cp->seq, cp->key_id);
    } else if (cp->state == CP_VERIFIED && memcmp(cp->head, ch->prev, CHAIN_HASH_LEN) != 0) {
      char want[65], got[65];
      chain_hex(cp->head, want);
      chain_hex(ch->prev, got);
      chain_break(ch, cp->seq, "checkpoint",
                  "the checkpoint signed at %lld ms says the head at sequence %lld is %s, but "
                  "the chain recomputes to %s there (the chain was rewritten after it was "
                  "signed)", (long long)cp->signed_at_ms, (long long)cp->seq, want, got);
    }
  }
}

/* One walk step over e (records arrive by ascending sequence). */
static void step(walk_t *w, wchain_t *ch, const wentry_t *e) {
  if (ch->broken) return;
  if (ch->have_last && e->seq == ch->last.seq) {
    if (e->lens_ok && ch->last.lens_ok && !memcmp(e->prev, ch->last.prev, CHAIN_HASH_LEN) &&
        !memcmp(e->hash, ch->last.hash, CHAIN_HASH_LEN) &&
        !memcmp(e->self, ch->last.self, CHAIN_HASH_LEN)) {
      ch->repeats++;
      return;
    }
    chain_break(ch, e->seq, "inserted",
                "two different records carry sequence %lld (a record was inserted with a "
                "duplicate sequence, or a different record was published under it)",
                (long long)e->seq);
    return;
  }
  if (e->seq < ch->expect) {
    chain_break(ch, e->seq, "reordered",
                "record %lld arrives after record %lld (records out of order)", (long long)e->seq,
                (long long)(ch->expect - 1));
    return;
  }
  if (e->seq > ch->expect) {
    if (e->seq == ch->expect + 1)
      chain_break(ch, ch->expect, "removed", "record %lld is missing (it was removed)",
                  (long long)ch->expect);
    else
      chain_break(ch, ch->expect, "removed", "records %lld..%lld are missing (they were removed)",
                  (long long)ch->expect, (long long)(e->seq - 1));
    return;
  }
  if (!e->lens_ok) {
    chain_break(ch, e->seq, "changed", "record %lld's prev_hash or hash is not 32 bytes",
                (long long)e->seq);
    return;
  }
  if (memcmp(e->prev, ch->prev, CHAIN_HASH_LEN) != 0) {
    explain_unlinked(w, ch, e);
    return;
  }
  if (memcmp(e->hash, e->self, CHAIN_HASH_LEN) != 0) {
    chain_break(ch, e->seq, "changed",
                "record %lld's contents do not match its hash (the record was changed)",
                (long long)e->seq);
    return;
  }
  memcpy(ch->prev, e->self, CHAIN_HASH_LEN);
  ch->last = *e;
  ch->have_last = true;
  ch->expect = e->seq + 1;
  ch->records++;
  check_cps_at(ch, e->seq);
}

void walk_record(walk_t *w, const chain_record_t *r, const uint8_t *prev, size_t prev_len,
                 const uint8_t *hash, size_t hash_len) {
  wchain_t *ch = chain_get(w, r->chain_id ? r->chain_id : "");
  wentry_t e = {.seq = r->seq, .order = w->order++};
  e.lens_ok = prev_len == CHAIN_HASH_LEN && hash_len == CHAIN_HASH_LEN;
  if (e.lens_ok) {
    memcpy(e.prev, prev, CHAIN_HASH_LEN);
    memcpy(e.hash, hash, CHAIN_HASH_LEN);
    chain_hash(e.prev, r, e.self);
  }
  if (w->collect) {
    if (ch->n_ents == ch->cap_ents) {
      ch->cap_ents = ch->cap_ents ? 2 * ch->cap_ents : 1024;
      ch->ents = qm_realloc(ch->ents, ch->cap_ents * sizeof(*ch->ents));
    }
    ch->ents[ch->n_ents++] = e;
    return;
  }
  sort_cps(ch);
  check_anchor(w, ch);
  step(w, ch, &e);
}

void walk_checkpoint(walk_t *w, const chain_checkpoint_t *cp, const char *algorithm,
                     size_t sig_len) {
  wchain_t *ch = chain_get(w, cp->chain_id ? cp->chain_id : "");
  if (ch->n_cps == ch->cap_cps) {
    ch->cap_cps = ch->cap_cps ? 2 * ch->cap_cps : 16;
    ch->cps = qm_realloc(ch->cps, ch->cap_cps * sizeof(*ch->cps));
  }
  wcp_t *c = &ch->cps[ch->n_cps++];
  memset(c, 0, sizeof(*c));
  c->seq = cp->seq;
  memcpy(c->head, cp->head_hash, CHAIN_HASH_LEN);
  c->signed_at_ms = cp->signed_at_ms;
  qm_strlcpy(c->key_id, cp->key_id, sizeof(c->key_id));
  ch->cps_sorted = false;
  if (!w->pubkey) {
    c->state = CP_UNCHECKED;
    ch->cp_unchecked++;
  } else if (strcmp(cp->key_id, w->pub_id) != 0) {
    c->state = CP_OTHER_KEY;
    ch->cp_other++;
  } else if (sig_len == CHAIN_SIG_LEN && algorithm && !strcmp(algorithm, CHAIN_SIG_ALGORITHM) &&
             chain_checkpoint_verify(w->pubkey, cp)) {
    c->state = CP_VERIFIED;
    ch->cp_verified++;
  } else {
    c->state = CP_BAD_SIGNATURE;
  }
}

void walk_head(walk_t *w, const char *chain_id, int64_t seq, const uint8_t *hash,
               size_t hash_len) {
  wchain_t *ch = chain_get(w, chain_id);
  ch->has_head = true;
  ch->head_seq = seq;
  ch->head_len_ok = hash_len == CHAIN_HASH_LEN;
  if (ch->head_len_ok) memcpy(ch->head_hash, hash, CHAIN_HASH_LEN);
}

void walk_anchor(walk_t *w, const char *chain_id, int64_t seq, const uint8_t *hash,
                 size_t hash_len, int64_t pruned_at_ms) {
  wchain_t *ch = chain_get(w, chain_id);
  ch->anchored = true;
  ch->anchor_seq = seq;
  ch->pruned_at_ms = pruned_at_ms;
  ch->anchor_len_ok = hash_len == CHAIN_HASH_LEN;
  if (ch->anchor_len_ok) memcpy(ch->anchor_hash, hash, CHAIN_HASH_LEN);
  ch->expect = seq + 1;
  if (ch->anchor_len_ok) memcpy(ch->prev, hash, CHAIN_HASH_LEN);
}

/* Once per anchored chain, before its first record: a checkpoint at exactly
 * the anchor's sequence must vouch for the anchor's hash. */
static void check_anchor(walk_t *w, wchain_t *ch) {
  if (!ch->anchored || ch->anchor_checked || ch->broken) return;
  ch->anchor_checked = true;
  sort_cps(ch);
  bool vouched = false;
  for (size_t i = 0; i < ch->n_cps && !vouched; i++) {
    const wcp_t *cp = &ch->cps[i];
    if (cp->seq != ch->anchor_seq || !ch->anchor_len_ok) continue;
    if (memcmp(cp->head, ch->anchor_hash, CHAIN_HASH_LEN) != 0) continue;
    vouched = w->pubkey ? cp->state == CP_VERIFIED : true;
  }
  if (!vouched)
    chain_break(ch, ch->anchor_seq, "anchor",
                "records 1..%lld were pruned (at %lld ms) but no checkpoint%s vouches for the "
                "hash of record %lld the chain now starts from (records removed from the start)",
                (long long)ch->anchor_seq, (long long)ch->pruned_at_ms,
                w->pubkey ? " signed with the trusted key" : "", (long long)ch->anchor_seq);
  /* Checkpoints at or below the anchor cover pruned records: done with them. */
  while (ch->cp_next < ch->n_cps && ch->cps[ch->cp_next].seq <= ch->anchor_seq) ch->cp_next++;
}

void walk_chain(walk_t *w, const char *chain_id) { chain_get(w, chain_id); }

bool walk_broken(const walk_t *w, const char *chain_id) {
  for (size_t i = 0; i < w->n_chains; i++)
    if (!strcmp(w->chains[i].id, chain_id)) return w->chains[i].broken;
  return false;
}

int64_t walk_records(const walk_t *w) {
  int64_t n = 0;
  for (size_t i = 0; i < w->n_chains; i++) n += w->chains[i].records;
  return n;
}

/* The end of one chain: the stored head, then checkpoints beyond the end. */
static void finish_chain(walk_t *w, wchain_t *ch) {
  sort_cps(ch);
  check_anchor(w, ch);
  if (w->collect) {
    if (ch->n_ents > 1) qsort(ch->ents, ch->n_ents, sizeof(*ch->ents), cmp_entry);
    for (size_t i = 0; i < ch->n_ents && !ch->broken; i++) step(w, ch, &ch->ents[i]);
  }
  if (ch->broken) return;
  int64_t last = ch->expect - 1;
  if (ch->has_head) {
    if (ch->head_seq > last) {
      chain_break(ch, last + 1, "truncated",
                  "the chain head says %lld records but the ledger ends at %lld (records were "
                  "removed from the end)", (long long)ch->head_seq, (long long)last);
    } else if (ch->head_seq < last) {
      chain_break(ch, ch->head_seq + 1, "inserted",
                  "the ledger goes on to %lld past the chain head at %lld (records were "
                  "appended around the head)", (long long)last, (long long)ch->head_seq);
    } else if (last > 0 && (!ch->head_len_ok || memcmp(ch->head_hash, ch->prev, CHAIN_HASH_LEN))) {
      chain_break(ch, last, "head",
                  "the chain head's hash differs from the recomputed hash of record %lld",
                  (long long)last);
    }
  }
  check_cps_at(ch, last);
  for (size_t i = ch->cp_next; i < ch->n_cps && !ch->broken; i++) {
    const wcp_t *cp = &ch->cps[i];
    if (cp->state == CP_BAD_SIGNATURE)
      chain_break(ch, cp->seq, "signature",
                  "the checkpoint at sequence %lld claims key %s but its signature is invalid "
                  "(a forged or altered checkpoint)", (long long)cp->seq, cp->key_id);
    else if (cp->state == CP_VERIFIED)
      chain_break(ch, last + 1, "truncated",
                  "a checkpoint signed at %lld ms covers sequence %lld but the chain ends at "
                  "%lld (records were removed from the end)", (long long)cp->signed_at_ms,
                  (long long)cp->seq, (long long)last);
  }
}

/* Chains in a natural order: chain-2 before chain-10. */
static int cmp_chain(const void *a, const void *b) {
  const wchain_t *x = a, *y = b;
  long nx = -1, ny = -1;
  char *end;
  if (!strncmp(x->id, "chain-", 6) && x->id[6]) {
    nx = strtol(x->id + 6, &end, 10);
    if (*end) nx = -1;
  }
  if (!strncmp(y->id, "chain-", 6) && y->id[6]) {
    ny = strtol(y->id + 6, &end, 10);
    if (*end) ny = -1;
  }
  if (nx >= 0 && ny >= 0 && nx != ny) return nx < ny ? -1 : 1;
  return strcmp(x->id, y->id);
}

int walk_finish(walk_t *w, FILE *out) {
  int status = 0;
  if (w->n_chains > 1) qsort(w->chains, w->n_chains, sizeof(*w->chains), cmp_chain);
  for (size_t i = 0; i < w->n_chains; i++) finish_chain(w, &w->chains[i]);
  long long ms = (long long)(qm_mono_ms() - w->t0_ms);
  for (size_t i = 0; i < w->n_chains; i++) {
    wchain_t *ch = &w->chains[i];
    if (ch->broken) {
      status = 1;
      fprintf(out, "BROKEN: chain %s at sequence %lld (%s): %s [%s]\n", ch->id,
              (long long)ch->bad_seq, ch->kind, ch->why, w->source);
      continue;
    }
    char cps[200];
    if (w->pubkey)
      snprintf(cps, sizeof(cps), "%lld checkpoint%s verified with key %s%s",
               (long long)ch->cp_verified, ch->cp_verified == 1 ? "" : "s", w->pub_id,
               ch->cp_other ? ", others by other keys not checked" : "");
    else
      snprintf(cps, sizeof(cps), "%lld checkpoint%s not checked (no --pubkey)",
               (long long)ch->cp_unchecked, ch->cp_unchecked == 1 ? "" : "s");
    char repeats[64] = "";
    if (ch->repeats) snprintf(repeats, sizeof(repeats), ", %lld identical repeats ignored", (long long)ch->repeats);
    if (ch->records == 0 && ch->anchored) {
      fprintf(out, "EMPTY: chain %s has no records left (1..%lld pruned by retention, anchored to a "
              "checkpoint; %s) [%s]\n", ch->id, (long long)ch->anchor_seq, cps, w->source);
      continue;
    }
    if (ch->records == 0) {
      fprintf(out, "EMPTY: chain %s has no records (nothing to verify; %s) [%s]\n", ch->id, cps,
              w->source);
      continue;
    }
    char hex[65];
    chain_hex(ch->prev, hex);
    char pruned[128] = "";
    if (ch->anchored)
      snprintf(pruned, sizeof(pruned), " from %lld (1..%lld pruned by retention, anchored to a checkpoint)",
               (long long)ch->anchor_seq + 1, (long long)ch->anchor_seq);
    fprintf(out, "OK: chain %s intact, %lld records verified%s, head %lld %s; %s%s [%s, %lld ms]\n",
            ch->id, (long long)ch->records, pruned, (long long)(ch->expect - 1), hex, cps, repeats,
            w->source, ms);
  }
  return status;
}

void walk_destroy(walk_t *w) {
  if (!w) return;
  for (size_t i = 0; i < w->n_chains; i++) {
    free(w->chains[i].id);
    free(w->chains[i].ents);
    free(w->chains[i].cps);
  }
  free(w->chains);
  free(w);
}
