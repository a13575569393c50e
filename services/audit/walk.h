/*
 * walk: the chain checker behind `qm-audit verify`, independent of where the
 * records come from (the database, an export file, the qm.audit.v1 topic).
 * A source feeds it records, signed checkpoints and, when it has one, the
 * stored chain head; the walk recomputes every chain and names, per chain,
 * the first sequence where it breaks and what kind of break it is:
 *
 *   changed      a record's contents no longer match its hash;
 *   removed      a gap in the sequence (records missing in the middle);
 *   reordered    a record's prev_hash is the hash of a record that comes
 *                after it (records swapped);
 *   inserted     a record's prev_hash is the hash of an earlier, not the
 *                previous, record, or of no record at all; or two different
 *                records share a sequence; or records follow the stored head;
 *   truncated    the stored head or a signed checkpoint is beyond the last
 *                record (records removed from the end);
 *   head         the stored head's hash is not the recomputed one;
 *   checkpoint   a signed checkpoint's head hash is not the recomputed hash
 *                at its sequence (the chain was rewritten after it);
 *   signature    a checkpoint claiming the trusted key's id has an invalid
 *                signature (forged or altered checkpoint);
 *   anchor       the chain was pruned (retention) up to a record no
 *                checkpoint vouches for (records removed from the start).
 *
 * Two ways to feed it. Streaming (collect = false): each chain's records in
 * ascending sequence order, checkpoints and head before the records; memory
 * stays constant, used for the database. Collecting (collect = true): any
 * order; the walk keeps 112 bytes per record, sorts by sequence at the end
 * and drops identical repeats (a topic may carry a record twice).
 *
 * Each record's hash is computed once, over its own stored prev_hash; while
 * the chain links up that is the chain's hash, so nothing else is kept.
 */
#ifndef QM_AUDIT_WALK_H
#define QM_AUDIT_WALK_H

#include "chain.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct walk walk_t;

/* Looks up, in chain chain_id, a record whose stored hash is hash: sets
 * *seq to its sequence and returns true when there is one (used only to
 * explain a break, so it may be slow). */
typedef bool (*walk_find_fn)(void *ctx, const char *chain_id, const uint8_t hash[CHAIN_HASH_LEN],
                             int64_t *seq);

/* A new walk. pubkey (borrowed, may be NULL) is the trusted checkpoint key:
 * without it checkpoints are counted but not checked. find (may be NULL in
 * collecting mode, which searches its own records) explains streaming
 * breaks. source names the source in the output ("db", "export", "topic").
 * Caller frees with walk_destroy(). */
walk_t *walk_new(const chain_key_t *pubkey, bool collect, walk_find_fn find, void *find_ctx,
                 const char *source);

/* Feeds one record: r with its stored prev_hash and hash (any lengths: a
 * wrong length is a break). Borrowed for the call. */
void walk_record(walk_t *w, const chain_record_t *r, const uint8_t *prev, size_t prev_len,
                 const uint8_t *hash, size_t hash_len);

/* Feeds one stored checkpoint (algorithm as stored, signature of sig_len
 * bytes). Its signature is checked now when it names the trusted key. */
void walk_checkpoint(walk_t *w, const chain_checkpoint_t *cp, const char *algorithm,
                     size_t sig_len);

/* Declares the stored chain head (database source): compared at the end. */
void walk_head(walk_t *w, const char *chain_id, int64_t seq, const uint8_t *hash,
               size_t hash_len);

/* Declares that chain_id's records up to seq were pruned by retention and
 * the chain goes on from the record whose hash is hash (an anchor): the walk
 * expects seq + 1 next, linked to hash, and requires a checkpoint at exactly
 * seq with that head hash — signed with the trusted key when there is one —
 * else the chain is broken ("anchor"). Feed it after the checkpoints and
 * before the records. */
void walk_anchor(walk_t *w, const char *chain_id, int64_t seq, const uint8_t *hash,
                 size_t hash_len, int64_t pruned_at_ms);

/* Declares a chain that exists (e.g. a head row) even without records. */
void walk_chain(walk_t *w, const char *chain_id);

/* True when chain_id is already known broken: a streaming source may stop
 * reading it. */
bool walk_broken(const walk_t *w, const char *chain_id);

/* Finishes every chain and prints one line per chain to out, in chain
 * order: "OK: chain …", "EMPTY: chain …" or "BROKEN: chain <id> at sequence
 * <n> (<kind>): <why>". Returns 0 when every chain is intact, 1 otherwise.
 * Call once. */
int walk_finish(walk_t *w, FILE *out);

/* The number of records verified so far, over all chains. */
int64_t walk_records(const walk_t *w);

void walk_destroy(walk_t *w);

#endif
